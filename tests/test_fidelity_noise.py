"""Multi-fidelity promotion (``qd.fidelity``) and repeated noisy evaluations (``qd.noise``, aggregated archives)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qd.archive import EliteArchive, build_archive, elite_spec, spec_for_run
from qd.fidelity import MAX_RUNGS, FidelityError, FidelityWrapper, Promotions, rung_values
from qd.noise import RepeatStats, config_key
from qd.problem import Evaluation, Measure, Objective, Problem
from qd.registry import get_problem
from qd.space import Categorical, Float, Int, Space
from qd.store import Trial
from qd.strategies import get_strategy

from tests.test_sail import LIGHT, drive

torch.set_num_threads(1)


class Budgeted(Problem):
    """Training-like: the loss falls with steps (the fidelity); the best x is 0.3 in every coordinate."""

    name = "budgeted"

    def __init__(self, objectives: int = 1):
        self.space = Space([Float("x0", 0.0, 1.0), Float("x1", 0.0, 1.0), Int("steps", 1, 27)])
        self.objectives = tuple(Objective(n) for n in ("loss", "size")[:objectives])
        self.measures = (Measure("x0", 0.0, 1.0), Measure("x1", 0.0, 1.0))
        self.fidelity = "steps"

    def evaluate(self, config, seed):
        x = np.array([config["x0"], config["x1"]])
        loss = float(((x - 0.3) ** 2).sum() + 1.0 / config["steps"])
        return Evaluation(values=[loss, float(x.sum())][: len(self.objectives)], measures=x.tolist())

    def cheap_measures(self, config):
        return {"x0": config["x0"], "x1": config["x1"]}


def trial(number, params, values, measures=(0.5, 0.5), state="complete"):
    return Trial(number=number, params=params, state=state, values=list(values), measures=list(measures))


# --- rungs and promotion -------------------------------------------------------------------------
def test_rung_values_are_geometric_and_end_at_the_top():
    assert rung_values(Int("steps", 1, 27), 3) == [1, 3, 9, 27]
    assert rung_values(Int("steps", 50, 500, log=True), 3) == [56, 167, 500]
    assert rung_values(Int("epochs", 1, 10), 3, min_fidelity=3) == [3, 10]
    fractions = rung_values(Float("fraction", 0.0, 1.0), 2)
    assert len(fractions) == MAX_RUNGS and fractions[-1] == 1.0 and fractions[0] == pytest.approx(0.125)
    assert rung_values(Categorical("size", ("s", "m", "l")), 3) == ["s", "m", "l"]
    with pytest.raises(FidelityError, match=r"min_fidelity=99"):
        rung_values(Int("steps", 1, 27), 3, min_fidelity=99)


def test_promotions_take_the_best_third_of_a_rung_once_each():
    problem = Budgeted()
    p = Promotions(problem, eta=3)
    configs = [p.start({"x0": i / 10, "x1": 0.3, "steps": 27}) for i in range(9)]
    assert all(c["steps"] == 1 for c in configs)
    assert p.ready(5) == []  # nothing finished yet
    for i, c in enumerate(configs):
        p.tell(trial(i, c, [abs(c["x0"] - 0.3)]))
    promoted = p.ready(5)
    assert [c["steps"] for c in promoted] == [3, 3, 3]  # 9 finished at rung 0: the best 3 go up
    assert sorted(c["x0"] for c in promoted) == [0.2, 0.3, 0.4]
    assert p.ready(5) == []  # handed out once
    with pytest.raises(FidelityError, match="eta=1"):
        Promotions(problem, eta=1)
    with pytest.raises(FidelityError, match="names a fidelity parameter; problem .sphere. names none"):
        Promotions(get_problem("sphere", dim=3))


def test_several_objectives_promote_by_non_dominated_rank():
    problem = Budgeted(objectives=2)
    p = Promotions(problem, eta=2)
    # Three on a front, three dominated by them.
    values = [(0.0, 3.0), (1.0, 1.0), (3.0, 0.0), (0.5, 3.5), (1.5, 1.5), (3.5, 0.5)]
    for i, v in enumerate(values):
        p.tell(trial(i, p.start({"x0": i / 10, "x1": 0.0, "steps": 1}), v))
    assert sorted(c["x0"] for c in p.ready(10)) == [0.0, 0.1, 0.2]


def test_per_cell_ranking_keeps_diversity():
    problem = Budgeted()
    p = Promotions(problem, eta=3, cell_of=lambda t: int(t.params["x0"] >= 0.5))
    # Cell 0 holds the six best; cell 1's best is worse than all of them, but goes up first with cell 0's best.
    losses = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9, 1.0, 1.1]
    xs = [0.0, 0.1, 0.2, 0.3, 0.4, 0.45, 0.6, 0.7, 0.8]
    for i, (x, v) in enumerate(zip(xs, losses)):
        p.tell(trial(i, p.start({"x0": x, "x1": 0.0, "steps": 1}), [v]))
    assert sorted(c["x0"] for c in p.ready(10)) == [0.0, 0.1, 0.6]


def test_wrapper_puts_any_strategy_behind_promotions_and_restores():
    problem = Budgeted()
    wrapped = FidelityWrapper(get_strategy("random", problem, seed=0), eta=3)
    trials = drive(wrapped, problem, 45, workers=3)
    steps = [t.params["steps"] for t in trials]
    assert steps[:3] == [1, 1, 1] and max(steps) == 27  # starts low, reaches the top
    counts = wrapped.promotions.counts()
    assert counts[0] > counts[1] > counts[2] >= counts[3] >= 1
    # A restored wrapper has the same rungs and hands out the same next promotions.
    restored = FidelityWrapper(get_strategy("random", problem, seed=0), eta=3)
    restored.restore(trials)
    assert restored.promotions.counts() == counts
    assert restored.promotions.ready(5) == wrapped.promotions.ready(5)
    assert "rungs" in wrapped.state()


def test_sail_with_asha_counts_only_top_fidelity_results():
    problem = Budgeted()
    s = get_strategy("sail", problem, seed=0, fidelity="asha", min_fidelity=3, n_init=9, bins=4, **LIGHT)
    trials = drive(s, problem, 30, workers=3)
    top = [t for t in trials if t.params["steps"] == 27]
    assert top and len(top) < len(trials) / 3  # most evaluations were cheap ones
    assert trials[0].params["steps"] == 3 and s.promotions.values == [3, 9, 27]
    assert s.archive.n_inserted == len(top)
    # The run's archive (what qd show rebuilds) filters the same way.
    spec = spec_for_run(problem, "sail", {"fidelity": "asha", "min_fidelity": 3, "bins": 4}, 0)
    rebuilt = build_archive(problem, spec)
    rebuilt.add_trials(trials)
    assert rebuilt.metrics() == s.archive.metrics() and spec.fidelity == "steps" and spec.fidelity_top == 27
    # Candidates are scored at the top fidelity: every identity has steps = 27 encoded.
    assert all(problem.space.decode(np.frombuffer(k))["steps"] == 27 for k in s._proposed)


# --- repeated evaluations ------------------------------------------------------------------------
def test_repeat_stats_mean_and_spread():
    stats = RepeatStats(2, 1)
    x = np.array([0.1, 0.2])
    assert stats.add(x, 1.0, [0.5]) is False and stats.add(x, 3.0, [0.7]) is True
    key = config_key(x)
    mean, measures = stats.mean(key)
    assert mean == 2.0 and measures == pytest.approx([0.6]) and stats.std(key) == pytest.approx(np.sqrt(2.0))
    table = stats.table()
    assert table["count"].tolist() == [2] and table["std"] == pytest.approx([np.sqrt(2.0)])


def test_a_lucky_seed_does_not_hold_a_cell_in_an_aggregated_archive():
    problem = get_problem("sphere", dim=2)
    lucky, steady = {"x0": 1.0, "x1": 1.0}, {"x0": 1.2, "x1": 0.8}  # same cell of a 2x2 grid
    evaluations = [trial(0, lucky, [90.0], (2.0, 2.0)), trial(1, steady, [60.0], (2.0, 2.0)),
                   trial(2, lucky, [20.0], (2.0, 2.0)), trial(3, lucky, [25.0], (2.0, 2.0))]
    plain = EliteArchive(problem, elite_spec(problem, bins=2))
    plain.add_trials(evaluations)
    assert plain.elites()["objective"].tolist() == [90.0]  # the lucky seed holds the cell
    averaged = EliteArchive(problem, elite_spec(problem, bins=2, aggregate=True))
    for t in evaluations:  # one at a time, as results arrive
        averaged.add_trials([t])
    elites = averaged.elites()
    assert elites["objective"].tolist() == [60.0]  # lucky's mean is 45
    assert elites["count"].tolist() == [1] and elites["std"].tolist() == [0.0]
    assert averaged.describe()["aggregate"]
    with pytest.raises(ValueError, match="learning_rate"):
        elite_spec(problem, bins=2, aggregate=True, learning_rate=0.1)


def test_sail_repeats_noisy_evaluations_and_keeps_their_mean():
    problem = get_problem("zdt1", dim=4, noise=0.5)
    s = get_strategy("sail", problem, seed=0, objective="f2", repeats=3, n_init=4, bins=4, **LIGHT)
    trials = drive(s, problem, 24, workers=4)
    by_config: dict[bytes, list[float]] = {}
    for t in trials:
        by_config.setdefault(config_key(problem.space.encode(t.params)), []).append(t.values[1])
    assert sorted(len(v) for v in by_config.values()) == [3] * 8  # every configuration three times
    assert len({t.seed for t in trials}) == len(trials)  # each with its own seed
    elites = s.archive.elites()
    for x, value, count, std in zip(elites["solution"], elites["objective"], elites["count"], elites["std"]):
        seen = by_config[config_key(x)]
        assert count == 3 and value == pytest.approx(np.mean(seen)) and std == pytest.approx(np.std(seen, ddof=1))
    # qd show's archive (rebuilt from the run's options) is the same averaged one.
    rebuilt = build_archive(problem, spec_for_run(problem, "sail", {"objective": "f2", "repeats": 3, "bins": 4}, 0))
    rebuilt.add_trials(trials)
    assert rebuilt.metrics() == s.archive.metrics()


def test_sail_reevaluates_new_elites():
    problem = get_problem("zdt1", dim=4, noise=0.2)
    s = get_strategy("sail", problem, seed=0, objective="f2", reevaluate=2, n_init=6, bins=3, **LIGHT)
    trials = drive(s, problem, 24, workers=2)
    counts: dict[bytes, int] = {}
    for t in trials:
        key = config_key(problem.space.encode(t.params))
        counts[key] = counts.get(key, 0) + 1
    assert max(counts.values()) >= 3  # some elite was evaluated 1 + 2 times
    assert min(counts.values()) == 1  # configurations that never led their cell were not repeated
    assert any(c >= 3 for c in s.archive.elites()["count"])


def test_sail_resumed_mid_repeats_asks_for_the_owed_ones_first():
    problem = get_problem("zdt1", dim=4, noise=0.5)
    opts = dict(objective="f2", repeats=3, n_init=4, bins=4, **LIGHT)
    trials = drive(get_strategy("sail", problem, seed=0, **opts), problem, 7, workers=4)
    counts: dict[bytes, int] = {}
    for t in trials:
        key = config_key(problem.space.encode(t.params))
        counts[key] = counts.get(key, 0) + 1
    owed = {k: 3 - c for k, c in counts.items() if c < 3}
    assert owed
    resumed = get_strategy("sail", problem, seed=0, **opts)
    resumed.restore(trials)
    again = resumed.ask(sum(owed.values()))
    got: dict[bytes, int] = {}
    for c in again:
        key = config_key(problem.space.encode(c))
        got[key] = got.get(key, 0) + 1
    assert got == owed


@pytest.mark.parametrize("name", ["tpe", "nsga2", "random"])
def test_fidelity_asha_is_an_option_of_every_strategy(name):
    problem = Budgeted(objectives=2)
    s = get_strategy(name, problem, seed=1, fidelity="asha", eta=3)
    assert isinstance(s, FidelityWrapper) and s.promotions.eta == 3
    trials = drive(s, problem, 40, workers=2)
    steps = [t.params["steps"] for t in trials]
    assert steps[0] == 1 and max(steps) >= 9  # starts at the lowest rung, promotes up the rungs
    # Several objectives: promoted by non-dominated rank at their rung.
    rung0 = [t for t in trials if t.params["steps"] == 1]
    promoted = {config_key(problem.space.encode({**t.params, "steps": 1})) for t in trials if t.params["steps"] == 3}
    Y = np.array([t.values for t in rung0])
    from moocore import pareto_rank

    ranks = pareto_rank(Y)
    best = {config_key(problem.space.encode(t.params)) for t, r in zip(rung0, ranks) if r == 0}
    assert promoted and promoted & best


def test_fidelity_option_from_an_experiment_file_and_its_errors(tmp_path):
    from qd.experiment import ExperimentError, from_dict
    from qd.session import prepare

    doc = {"run": {"storage": f"sqlite:///{tmp_path}/f.db", "budget": 5, "evaluator": "inprocess"},
           "problem": {"name": "zdt1"}, "strategy": {"name": "tpe", "options": {"fidelity": "asha"}}}
    with pytest.raises(ExperimentError, match="names no fidelity parameter|fidelity"):
        prepare(from_dict(doc))  # zdt1 has no fidelity parameter: refused before any evaluation
    with pytest.raises(ValueError, match="fidelity='fast' is not allowed"):
        get_strategy("tpe", Budgeted(), fidelity="fast")
    with pytest.raises(ValueError, match="need fidelity='asha'"):
        get_strategy("tpe", Budgeted(), eta=2)


@pytest.mark.parametrize("name, objectives, options", [
    ("map-elites", 1, {"bins": 4}),
    ("mome", 2, {"bins": 4, "reference_point": [5.0, 5.0]}),
])
def test_a_runs_map_under_asha_holds_top_fidelity_results_only(tmp_path, name, objectives, options):
    """With ``fidelity="asha"`` the run's archive (what ``qd show``, the dashboard and the loop's
    metrics read) takes only trials at the most faithful value, elite and Pareto archives alike:
    a lower rung is a cheap estimate, not a result for the map."""
    from evaluators import make_evaluator
    from qd.archive import archive_for_run
    from qd.run import run
    from qd.store import RunInfo, Store

    problem = Budgeted(objectives=objectives)
    options = {**options, "fidelity": "asha", "eta": 3}
    spec = spec_for_run(problem, name, options, 0)
    assert spec.fidelity == "steps" and spec.fidelity_top == 27
    info = RunInfo(name="a", problem="budgeted", problem_options={}, strategy=name, strategy_options=options, seed=0)
    store = Store.create(f"sqlite:///{tmp_path}/a.db", info, problem)
    run(problem, get_strategy(name, problem, seed=0, **options), make_evaluator("inprocess"), store, budget=120,
        progress=False)
    cols = store.columns()
    top = cols.complete & (cols.raw[:, 2] == 27)
    assert 0 < top.sum() < cols.complete.sum()  # the run evaluated several rungs
    assert np.all(cols.cell[~top] == -1) and np.all(cols.cell[top] >= 0)
    archive = archive_for_run(store, problem, cols)
    assert archive.n_inserted == int(top.sum())
