"""map-elites, cma-me, cma-mae: archive contents, asynchronous lanes, failures, options, runs and resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qd.checks import OptionError
from qd.archive import ArchiveOptionError, EliteArchive, archive_for_run, elite_spec
from qd.cli import main
from qd.metrics import METRICS_KEY, replay
from qd.problem import Evaluation, Measure, Objective, Problem
from qd.registry import get_problem
from qd.space import Config, Float, Space
from qd.store import Store, Trial
from qd.strategies import get_strategy


def evaluate(problem: Problem, config: Config, number: int) -> Trial:
    v, m, c = problem.normalise(problem.evaluate(config, 0))
    return Trial(number=number, params=config, state="complete", values=v, measures=m, constraints=c)


def drive(strategy, problem: Problem, budget: int, workers: int = 3, seed: int = 0) -> list[Trial]:
    """Keep ``workers`` configurations in flight and finish them in random order, as the run loop may."""
    rng = np.random.default_rng(seed)
    pending: list[Config] = []
    done: list[Trial] = []
    while len(done) < budget:
        pending += strategy.ask(workers - len(pending), pending)
        assert pending, "the strategy starved every worker"
        config = pending.pop(int(rng.integers(len(pending))))
        trial = evaluate(problem, config, len(done))
        strategy.tell(trial)
        done.append(trial)
    return done


class Constrained(Problem):
    """One measure and a constraint (always met: tests record infeasible results themselves)."""

    constraints = ("x0_at_most_half",)

    def __init__(self):
        self.space = Space([Float("x0", 0.0, 1.0), Float("x1", 0.0, 1.0)])
        self.objectives = (Objective("loss"),)
        self.measures = (Measure("x1", 0.0, 1.0),)

    def evaluate(self, config, seed):
        return Evaluation(values=[config["x0"] ** 2], measures=[config["x1"]], constraints=[-1.0])


def test_archive_holds_the_encoded_decoded_vector_of_what_was_evaluated():
    problem = get_problem("mixed")  # ints, a log int, a categorical, a bool, floats
    strategy = get_strategy("map-elites", problem, seed=1, objective="error", bins=[8, 5])
    trials = drive(strategy, problem, 150)
    elites = strategy.archive.elites()
    assert len(elites["solution"]) > 10
    np.testing.assert_array_equal(elites["solution"], problem.space.snap(elites["solution"]))
    # Every elite is the encoding of an evaluated configuration, with that configuration's error.
    by_vector = {problem.space.encode(t.params).tobytes(): t.values[0] for t in trials}
    for x, error in zip(elites["solution"], elites["objective"]):
        assert by_vector[x.tobytes()] == error
    # The archive rebuilt from the trials holds the same elites, cell for cell.
    rebuilt = EliteArchive(problem, strategy.spec)
    rebuilt.add_trials(trials)
    again = rebuilt.elites()
    order, order_again = np.argsort(elites["index"]), np.argsort(again["index"])
    np.testing.assert_array_equal(elites["index"][order], again["index"][order_again])
    np.testing.assert_array_equal(elites["objective"][order], again["objective"][order_again])


def test_cma_me_lanes_hand_out_batches_without_a_global_barrier():
    problem = get_problem("sphere", dim=4)
    strategy = get_strategy("cma-me", problem, seed=0, emitters=2, batch_size=4, bins=10)
    first = strategy.ask(8)
    assert len(first) == 8 and strategy.ask(1) == []  # both lanes wait for their results
    trials = [evaluate(problem, c, i) for i, c in enumerate(first)]
    # Lane 0's results, out of order: nothing is inserted until its batch is complete ...
    for t in (trials[2], trials[0], trials[3]):
        strategy.tell(t)
    assert strategy.archive.metrics()["num_elites"] == 0 and strategy.ask(1) == []
    strategy.tell(trials[1])
    assert strategy.archive.metrics()["num_elites"] > 0
    # ... then lane 0 asks its next batch while lane 1's results are still out.
    assert len(strategy.ask(4)) == 4 and strategy.ask(1) == []
    for t in trials[4:]:
        strategy.tell(t)
    assert len(strategy.ask(4)) == 4


def test_map_elites_never_starves_workers():
    problem = get_problem("sphere", dim=4)
    strategy = get_strategy("map-elites", problem, seed=0, batch_size=4, initial_population=8)
    asked = [c for _ in range(10) for c in strategy.ask(5)]  # no result told at all
    assert len(asked) == 50 and strategy.starved_asks == 0


@pytest.mark.parametrize("name", ["map-elites", "cma-me", "cma-mae"])
def test_failed_and_infeasible_results_are_not_inserted(name):
    problem = Constrained()
    strategy = get_strategy(name, problem, seed=0, bins=10, batch_size=4)
    trials = [evaluate(problem, c, i) for i, c in enumerate(strategy.ask(4))]
    trials[0].constraints = [0.4]  # recorded as infeasible
    trials[1] = Trial(number=1, params=trials[1].params, state="failed", reason="exception: boom")
    for t in reversed(trials):
        strategy.tell(t)
    elites = {x.tobytes() for x in strategy.archive.elites()["solution"]}
    vector = {t.number: problem.space.encode(t.params).tobytes() for t in trials}
    assert elites and elites <= {vector[2], vector[3]}
    # The lane's batch is complete despite the failure, so it asks the next one.
    assert len(strategy.ask(4)) == 4


def test_objective_option_picks_what_is_illuminated():
    problem = get_problem("mixed")
    strategy = get_strategy("map-elites", problem, seed=0, objective="cost", bins=[8, 5])
    trials = drive(strategy, problem, 60)
    costs = [t.values[1] for t in trials]
    assert strategy.spec.direction == "minimize" and math.isclose(strategy.archive.metrics()["best"], min(costs))
    assert strategy.spec.qd_score_offset == problem.reference_point[1]  # 1.1: QD score = sum(1.1 - cost)
    elites = strategy.archive.elites()
    assert math.isclose(strategy.archive.metrics()["qd_score"], float(np.sum(1.1 - elites["objective"])))


@pytest.mark.parametrize("name, options, message", [
    ("map-elites", {"objective": "accuracy"}, "option objective='accuracy' is not allowed; allowed: one of ['error', 'cost']"),
    ("map-elites", {"bins": [4]}, "option bins=[4] is not allowed; allowed: one integer >= 1, or a list of 2 integers"),
    ("cma-me", {"archive": "hex"}, "option archive='hex' is not allowed; allowed: ['grid', 'cvt']"),
    ("cma-me", {"cells": 50}, "option cells=50 is only for archive='cvt'"),
    ("cma-mae", {"learning_rate": 2}, "option learning_rate=2 is not allowed; allowed: a number in [0, 1]"),
    ("map-elites", {"operator": "cross"}, "option operator='cross' is not allowed; allowed: ['gaussian', 'iso-line']"),
    ("cma-me", {"emitters": 0}, "option emitters=0 is not allowed; allowed: an integer >= 1"),
    ("cma-me", {"ranker": "best"}, "option ranker='best' is not allowed; allowed: ['2imp'"),
])
def test_bad_options_name_the_option_the_value_and_what_is_allowed(name, options, message):
    with pytest.raises(OptionError) as err:
        get_strategy(name, get_problem("mixed"), **options)
    assert message in str(err.value) and f"strategy {name!r}" in str(err.value)


def test_problem_without_measures_is_refused():
    with pytest.raises(ArchiveOptionError, match="needs a problem with measures; problem 'zdt1' declares none"):
        get_strategy("map-elites", get_problem("zdt1", measures=False))


def test_cvt_archive_and_its_rebuild_use_the_same_cells():
    problem = get_problem("arm", dof=4)
    strategy = get_strategy("map-elites", problem, seed=3, archive="cvt", cells=60)
    trials = drive(strategy, problem, 120)
    assert strategy.archive.n_cells == 60 and 0 < strategy.archive.metrics()["coverage"] <= 1
    rebuilt = EliteArchive(problem, strategy.spec)
    rebuilt.add_trials(trials)
    np.testing.assert_array_equal(rebuilt.result.centroids, strategy.archive.result.centroids)
    assert rebuilt.metrics() == pytest.approx(strategy.archive.metrics())


def test_cma_mae_metrics_come_from_the_result_archive():
    problem = get_problem("sphere", dim=6)
    strategy = get_strategy("cma-mae", problem, seed=0, bins=10, emitters=2)
    drive(strategy, problem, 300)
    a = strategy.archive
    assert a.archive is not a.result and a.archive.learning_rate == 0.01
    # The thresholded archive may replace an elite by a worse one; the result archive keeps the best.
    assert a.result.stats.qd_score >= a.archive.stats.qd_score
    assert a.metrics()["qd_score"] == pytest.approx(float(a.result.stats.qd_score))


def test_map_elites_illuminates_more_than_random_search_in_the_same_archive():
    # dim 20: the measures of uniform samples (sums of 10 coordinates) crowd the map's centre.
    problem = get_problem("sphere", dim=20)
    ours = drive(get_strategy("map-elites", problem, seed=0, bins=20), problem, 1000)
    random = drive(get_strategy("random", problem, seed=0), problem, 1000)
    spec = elite_spec(problem, bins=20)
    rows_ours = replay(problem, ours, lambda: EliteArchive(problem, spec), every=200)
    rows_random = replay(problem, random, lambda: EliteArchive(problem, spec), every=200)
    assert [r["evaluations"] for r in rows_ours] == [200, 400, 600, 800, 1000]
    assert rows_ours[-1]["coverage"] > 1.2 * rows_random[-1]["coverage"]
    assert rows_ours[-1]["qd_score"] > 1.2 * rows_random[-1]["qd_score"]


def test_run_show_plot_and_resume_through_the_cli(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/r.db"
    common = ["--problem", "sphere", "-P", "dim=4", "--strategy", "cma-mae", "-S", "emitters=2", "-S", "batch_size=4",
              "-S", "bins=[8,8]", "--evaluator", "inprocess", "--storage", url, "--name", "a", "--no-progress"]
    assert main(["run", *common, "--budget", "40"]) == 0
    assert main(["run", *common, "--budget", "64", "--resume"]) == 0
    capsys.readouterr()
    assert main(["show", "--storage", url, "--name", "a", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    archive = shown["archive"]
    assert {"coverage", "qd_score", "num_elites", "norm_qd_score", "best"} <= set(archive)
    assert archive["kind"] == "grid" and archive["bins"] == [8, 8] and archive["learning_rate"] == 0.01
    store = Store.open(url, "a")
    assert 0 < archive["num_elites"] <= shown["n_complete"] == 64
    history = store.attrs()[METRICS_KEY]
    # A row at (or, for batches, just past) every 10 finished evaluations and one at each session's
    # end: continued across the resume.
    counts = [r["evaluations"] for r in history]
    assert counts == sorted(set(counts)) and 40 in counts and counts[-1] == 64
    assert all(b - a <= 10 + 16 for a, b in zip([0, *counts], counts))
    assert history[-1]["qd_score"] == pytest.approx(archive["qd_score"])
    assert all(a["coverage"] <= b["coverage"] for a, b in zip(history, history[1:]))
    # What the resumed strategy restored is what `qd show` rebuilds.
    strategy = get_strategy("cma-mae", get_problem("sphere", dim=4), emitters=2, batch_size=4, bins=[8, 8])
    strategy.restore(store.trials())
    assert strategy.archive.metrics() == pytest.approx(archive_for_run(store, get_problem("sphere", dim=4)).metrics())
    assert main(["plot", "--storage", url, "--name", "a", "--out", str(tmp_path / "p")]) == 0
    written = capsys.readouterr().out.split()
    assert {"archive_heatmap.png", "qd_metrics.png"} <= {p.rsplit("/", 1)[-1] for p in written}
    assert (tmp_path / "p" / "archive_heatmap.png").stat().st_size > 10_000


class Measured(Problem):
    """``k`` measures (the first ``k`` coordinates) and two objectives, for drawing archives of any shape."""

    reference_point = (2.0, 2.0)

    def __init__(self, k: int):
        self.space = Space([Float(f"x{i}", 0.0, 1.0) for i in range(max(k, 2))])
        self.objectives = (Objective("a"), Objective("b", "maximize"))
        self.measures = tuple(Measure(f"m{i}", 0.0, 1.0) for i in range(k))

    def evaluate(self, config, seed):
        x = np.array(list(config.values()))
        return Evaluation(values=[float(x.sum()), float(x[0])], measures=list(x[: len(self.measures)]))


@pytest.mark.parametrize("k, archive", [(1, "grid"), (2, "cvt"), (3, "grid")])
def test_archive_figures_for_one_two_and_more_measures(k, archive):
    from qd.archive import ParetoArchive, pareto_spec
    from qd.plots_archive import elite_heatmap_figure, metrics_figure, moqd_heatmap_figure

    problem = Measured(k)
    trials = [evaluate(problem, c, i) for i, c in enumerate(problem.space.sample(60, np.random.default_rng(k)))]
    options = {"bins": 4} if archive == "grid" else {"archive": "cvt", "cells": 12}
    elites = EliteArchive(problem, elite_spec(problem, **options))
    elites.add_trials(trials)
    fronts = ParetoArchive(problem, pareto_spec(problem, bins=3))
    fronts.add_trials(trials)
    for fig in (elite_heatmap_figure(elites, problem, "t"), moqd_heatmap_figure(fronts, problem, "t"),
                metrics_figure(replay(problem, trials, lambda: fronts.__class__(problem, fronts.spec)), True)):
        assert fig.axes and any(ax.collections or ax.lines for ax in fig.axes)
