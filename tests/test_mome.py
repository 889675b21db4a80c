"""mome: per-cell bounded Pareto fronts, MOQD score and global hypervolume (moocore), runs end to end."""

from __future__ import annotations

import json

import moocore
import numpy as np
import pytest

from qd.archive import ArchiveOptionError, ParetoArchive, pareto_spec
from qd.cli import main
from qd.metrics import METRICS_KEY
from qd.problem import Evaluation, Measure, Objective, Problem
from qd.registry import get_problem
from qd.space import Float, Space
from qd.store import Store, Trial
from qd.strategies import get_strategy

from test_illumination import drive


class TwoCells(Problem):
    """Two objectives (one maximised), one measure in [0, 1] cut into 2 cells; values given by the test."""

    def __init__(self, reference_point=(0.0, 10.0)):
        self.space = Space([Float("x", 0.0, 1.0)])
        self.objectives = (Objective("gain", "maximize"), Objective("cost"))
        self.measures = (Measure("m", 0.0, 1.0),)
        self.reference_point = reference_point

    def evaluate(self, config, seed):  # pragma: no cover - the tests build trials directly
        raise AssertionError


def point(n: int, gain: float, cost: float, m: float = 0.25) -> Trial:
    return Trial(number=n, params={"x": n / 100}, state="complete", values=[gain, cost], measures=[m])


def test_cell_front_keeps_the_non_dominated_and_drops_the_smallest_contributor():
    problem = TwoCells()
    archive = ParetoArchive(problem, pareto_spec(problem, bins=2, front_size=3))
    status = archive.add(np.zeros((0, 1)), [])
    assert status.shape == (0,)

    def add(t):
        return int(archive.add(problem.space.encode(t.params)[None], [t])[0])

    assert add(point(1, 5, 5)) == 2  # a new cell
    assert add(point(2, 4, 6)) == 0  # dominated: less gain, more cost
    assert add(point(3, 5, 5)) == 0  # equal to a member
    assert add(point(4, 8, 7)) == 1 and add(point(5, 2, 1)) == 1
    assert add(point(6, 6, 4)) == 1  # dominates 1 (gain 5, cost 5): replaces it
    front = archive.fronts[int(archive.cell_of(np.array([0.25]))[0])]
    assert sorted(front.numbers) == [4, 5, 6]
    # A fourth member overflows front_size=3: the smallest exclusive hypervolume leaves.
    assert add(point(7, 7, 5.5)) in (0, 1)
    front = archive.fronts[int(archive.cell_of(np.array([0.25]))[0])]
    assert len(front.numbers) == 3
    Y = np.array([[-8, 7], [-2, 1], [-6, 4], [-7, 5.5]], dtype=float)  # gain negated: all minimised
    contributions = moocore.hv_contributions(Y, ref=[0.0, 10.0])
    dropped = [4, 5, 6, 7][int(np.argmin(contributions))]
    assert dropped not in front.numbers
    # MOQD score = sum of per-cell hypervolumes; the global hypervolume covers all cells at once.
    assert add(point(8, 9, 9, m=0.75)) == 2
    m = archive.metrics()
    per_cell = [moocore.hypervolume(f.values * [-1, 1], ref=[0.0, 10.0]) for f in archive.fronts.values()]
    assert m["moqd_score"] == pytest.approx(sum(per_cell)) and m["qd_score"] == m["moqd_score"]
    members = np.vstack([f.values for f in archive.fronts.values()]) * [-1, 1]
    assert m["global_hypervolume"] == pytest.approx(moocore.hypervolume(members, ref=[0.0, 10.0]))
    assert m["coverage"] == 1.0 and m["num_elites"] == 4 and m["best"] == [9.0, 1.0]


def test_points_beyond_the_reference_add_no_hypervolume_but_are_kept():
    problem = TwoCells()
    archive = ParetoArchive(problem, pareto_spec(problem, bins=2))
    archive.add_trials([point(1, -1.0, 5.0)])  # gain below the reference's 0
    assert archive.metrics()["num_elites"] == 1 and archive.metrics()["moqd_score"] == 0.0


def test_reference_point_comes_from_the_option_or_the_problem_or_is_demanded():
    assert pareto_spec(TwoCells()).reference_source == "problem"
    spec = pareto_spec(TwoCells(), reference_point=[-1, 20])
    assert spec.reference_point == (-1.0, 20.0) and spec.reference_source == "option"
    with pytest.raises(ArchiveOptionError, match="option reference_point is needed because problem"):
        get_strategy("mome", TwoCells(reference_point=None))
    with pytest.raises(ArchiveOptionError, match=r"option reference_point=\[1\] is not allowed; allowed: a list of 2"):
        get_strategy("mome", TwoCells(), reference_point=[1])
    with pytest.raises(ArchiveOptionError, match="option front_size=0 is not allowed; allowed: an integer >= 1"):
        get_strategy("mome", TwoCells(), front_size=0)


@pytest.mark.parametrize("options", [{"sigma": 0.2}, {"operator": "iso-line", "iso_sigma": 0.05}])
def test_mome_on_zdt1_fills_cells_with_mutually_non_dominated_fronts(options):
    # dim 30 (the usual ZDT1): uniform samples have measures (means of 14 and 15 coordinates) near 0.5.
    problem = get_problem("zdt1", dim=30)
    strategy = get_strategy("mome", problem, seed=0, bins=10, front_size=6, **options)
    trials = drive(strategy, problem, 1500)
    random = drive(get_strategy("random", problem, seed=0), problem, 1500)
    archive = strategy.archive
    for front in archive.fronts.values():
        assert 1 <= len(front.numbers) <= 6
        assert moocore.is_nondominated(front.values).all()
    # Every member is an evaluated configuration in that cell, stored as its encoded vector.
    by_number = {t.number: t for t in trials}
    for cell, front in archive.fronts.items():
        for x, n in zip(front.solutions, front.numbers):
            assert np.array_equal(x, problem.space.encode(by_number[n].params))
            assert archive.cell_of(np.array(by_number[n].measures))[0] == cell
    baseline = ParetoArchive(problem, strategy.spec)
    baseline.add_trials(random)
    ours, theirs = archive.metrics(), baseline.metrics()
    assert ours["coverage"] > 1.15 * theirs["coverage"] and ours["moqd_score"] > 1.15 * theirs["moqd_score"]
    assert ours["global_hypervolume"] > theirs["global_hypervolume"]


def test_mome_run_show_plot_through_the_cli(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/m.db"
    common = ["--problem", "zdt1", "-P", "dim=4", "--strategy", "mome", "-S", "bins=4", "-S", "initial_population=8",
              "--evaluator", "inprocess", "--storage", url, "--name", "m", "--no-progress"]
    assert main(["run", *common, "--budget", "30"]) == 0
    assert main(["run", *common, "--budget", "40", "--resume"]) == 0
    capsys.readouterr()
    assert main(["show", "--storage", url, "--name", "m", "--json"]) == 0
    archive = json.loads(capsys.readouterr().out)["archive"]
    assert archive["kind"] == "pareto-grid" and archive["reference_point"] == [11.0, 11.0]
    assert archive["moqd_score"] > 0 and archive["global_hypervolume"] > 0 and archive["qd_score"] == archive["moqd_score"]
    assert 0 < archive["coverage"] <= 1 and archive["num_elites"] >= 1
    history = Store.open(url, "m").attrs()[METRICS_KEY]
    assert [r["evaluations"] for r in history] == [10, 20, 30, 40]
    assert history[-1]["global_hypervolume"] == pytest.approx(archive["global_hypervolume"])
    assert main(["plot", "--storage", url, "--name", "m", "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "moqd_heatmap.png").stat().st_size > 10_000
    assert (tmp_path / "p" / "qd_metrics.png").stat().st_size > 10_000
