"""The notebook API on real runs: trials, elites and Pareto set, post-hoc selection, re-evaluation."""

import itertools

import numpy as np
import pytest

from qd.experiment import Experiment
from qd.explore import hypervolume_subset, load_run, maxmin_subset
from qd.results import hypervolume, summary
from qd.session import execute, prepare
from qd.store import Store


def _run(storage, name, problem, strategy="random", budget=60, **options):
    exp = Experiment(problem=problem, problem_options=options, strategy=strategy, budget=budget, storage=storage,
                     name=name, evaluator="inprocess", progress=False)
    execute(prepare(exp), dashboard_every_s=None)


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('explore')}/runs.db"
    _run(url, "sphere", "sphere", budget=60, dim=4)
    _run(url, "zdt", "zdt1", budget=30, dim=4, noise=0.05)
    return url


# --- selection, on known point sets -------------------------------------------------------------
def test_maxmin_picks_the_ends_then_the_middle_of_a_line():
    points = np.linspace(0, 1, 11)[:, None]
    assert maxmin_subset(points, 3, start=0) == [0, 10, 5]


def test_maxmin_scales_each_column_so_units_do_not_decide():
    # Column 1 spans 1000x column 0; unscaled, every pick after the first would follow column 1.
    points = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1000.0], [0.5, 500.0]])
    assert sorted(maxmin_subset(points, 3, start=0)) == [0, 1, 2]
    # With bounds that make column 1 tiny, the far point in column 0 comes second.
    assert maxmin_subset(points, 2, start=0, bounds=(np.zeros(2), np.array([1.0, 1e6]))) == [0, 1]


def test_maxmin_stops_at_duplicates_and_checks_arguments():
    points = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    assert maxmin_subset(points, 3) == [0, 2]
    with pytest.raises(ValueError, match="start=5 is not allowed; allowed: 0 <= start < 3"):
        maxmin_subset(points, 2, start=5)


def test_greedy_hypervolume_subset_is_near_the_best_subset():
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = np.sort(rng.random(9))
        front = np.stack([x, 1 - np.sqrt(x)], axis=1)  # a convex front, both minimised
        directions, ref = ["minimize", "minimize"], [1.1, 1.1]
        for k in (1, 2, 3):
            picked = hypervolume_subset(front, directions, ref, k)
            assert len(picked) == k and len(set(picked)) == k
            best = max(hypervolume(front[list(c)], directions, ref) for c in itertools.combinations(range(9), k))
            got = hypervolume(front[picked], directions, ref)
            assert got >= (1 - 1 / np.e) * best and got <= best + 1e-12
        boxes = [(1.1 - a) * (1.1 - b) for a, b in front]  # k=1 is exact: the largest dominated box
        assert hypervolume_subset(front, directions, ref, 1) == [int(np.argmax(boxes))]


def test_hypervolume_subset_skips_points_that_add_nothing():
    values = np.array([[0.0, 1.0], [0.5, 0.5], [0.6, 0.6], [2.0, 0.0]])  # [2] dominated, [3] past the reference
    assert sorted(hypervolume_subset(values, ["minimize", "minimize"], [1.5, 1.5], 4)) == [0, 1]


# --- a real run ---------------------------------------------------------------------------------
def test_elites_are_the_best_trial_of_each_cell(storage):
    run = load_run(storage, "sphere")
    assert len(run.trials) == 60 and run.archive is not None
    metrics = run.archive.metrics()
    assert len(run.elites) == metrics["num_elites"] > 10
    assert run.elites["cell"].is_unique
    done = run.trials[run.trials["state"] == "complete"]
    best_per_cell = done.groupby("cell")["values.score"].max()  # sphere's score is maximised
    assert np.allclose(run.elites.set_index("cell")["values.score"].sort_index(), best_per_cell.sort_index())
    # The cell the run loop recorded in each trial's user attributes is the one the archive uses.
    cols = Store.open(storage, "sphere").columns()
    recorded = dict(zip(cols.number.tolist(), cols.cell.tolist()))
    assert all(recorded[n] == c for n, c in zip(run.trials["number"], run.trials["cell"]))


def test_pareto_set_matches_qd_show(storage):
    run = load_run(storage, "zdt")
    shown = summary(run.store, run.problem)
    assert sorted(run.pareto["number"]) == sorted(p["number"] for p in shown["pareto_front"])
    assert len(run.elites) > 0  # zdt1 has measures: a Pareto archive, every cell's front
    assert set(run.elites["number"]) <= set(run.trials["number"])


def test_select_spreads_elites_over_the_measure_space(storage):
    run = load_run(storage, "sphere")
    picked = run.select(5, among="elites")
    assert list(picked["pick"]) == [1, 2, 3, 4, 5] and picked["cell"].is_unique
    assert picked["values.score"].iloc[0] == run.elites["values.score"].max()  # starts from the best elite
    cols = [f"measures.{m}" for m in run.measures]

    def spread(rows):
        X = rows[cols].to_numpy()
        return min(np.linalg.norm(a - b) for a, b in itertools.combinations(X, 2))

    top5 = run.elites.nlargest(5, "values.score")
    assert spread(picked) > spread(top5)


def test_select_on_a_front_by_hypervolume(storage):
    run = load_run(storage, "zdt")
    k = min(3, len(run.pareto))
    picked = run.select(k, among="pareto")
    cols = ["values.f1", "values.f2"]
    hv = hypervolume(picked[cols].to_numpy(), run.directions, run.reference.point)
    worst = min(hypervolume(run.pareto[cols].to_numpy()[list(c)], run.directions, run.reference.point)
                for c in itertools.combinations(range(len(run.pareto)), k))
    assert hv >= worst
    assert len(run.select(k, among="pareto", method="maxmin")) == k


@pytest.mark.parametrize("kwargs, message", [
    ({"among": "cells"}, "among='cells' is not allowed; allowed: ['elites', 'pareto', 'trials']"),
    ({"method": "random"}, "method='random' is not allowed; allowed: ['maxmin', 'hypervolume']"),
    ({"k": 0}, "k=0 is not allowed; allowed: an integer >= 1"),
])
def test_select_errors_name_the_field(storage, kwargs, message):
    run = load_run(storage, "zdt")
    with pytest.raises(ValueError) as err:
        run.select(**{"k": 2, **kwargs})
    assert message in str(err.value)


def test_hypervolume_selection_needs_several_objectives(storage):
    with pytest.raises(ValueError, match="method='hypervolume' is not allowed .* one objective; allowed: 'maxmin'"):
        load_run(storage, "sphere").select(3, among="elites", method="hypervolume")


def test_reevaluate_with_more_seeds_and_changed_options(storage):
    run = load_run(storage, "zdt")
    number = int(run.pareto["number"].iloc[0])
    noisy = run.reevaluate(number, seeds=4)
    assert list(noisy.index) == [0, 1, 2, 3, "mean", "std"]
    assert noisy.loc[[0, 1, 2, 3], "ok"].all()
    assert noisy.loc["std", "values.f1"] > 0  # noise 0.05: seeds differ
    assert np.isclose(noisy.loc["mean", "values.f2"], noisy.loc[[0, 1, 2, 3], "values.f2"].astype(float).mean())
    clean = run.reevaluate(number, seeds=[7, 8], problem_options={"noise": 0.0})
    assert clean.loc["std", "values.f1"] < 1e-12 and clean.loc["std", "values.f2"] < 1e-12
    config = run.config(number)
    assert np.isclose(clean.loc[7, "values.f1"], config["x0"])  # ZDT1's f1 is x0 without noise
    assert clean.loc[7, "measures.mean_x_first_half"] == run.pareto["measures.mean_x_first_half"].iloc[0]


def test_reevaluate_on_the_process_pool_gives_the_same_numbers(storage):
    run = load_run(storage, "zdt")
    number = int(run.pareto["number"].iloc[0])
    a = run.reevaluate(number, seeds=2)
    b = run.reevaluate(number, seeds=2, evaluator="process", workers=2)
    assert np.allclose(a[["values.f1", "values.f2"]].astype(float), b[["values.f1", "values.f2"]].astype(float))


@pytest.mark.parametrize("kwargs, message", [
    ({"problem_options": {"nois": 0.0}}, "unknown option(s) ['nois']"),
    ({"seeds": 0}, "seeds=0 is not allowed; allowed: an integer >= 1"),
    ({"what": 10_000}, "trial number 10000 is not in run 'zdt'"),
    ({"what": {"x0": 2.0}}, "is not valid for 'zdt1'"),
    ({"evaluator": "gpu"}, "evaluator 'gpu' is not registered; registered evaluators:"),
])
def test_reevaluate_errors_name_the_field(storage, kwargs, message):
    run = load_run(storage, "zdt")
    args = {"what": int(run.pareto["number"].iloc[0]), **kwargs}
    with pytest.raises(ValueError) as err:
        run.reevaluate(args.pop("what"), **args)
    assert message in str(err.value)


def test_figures_draw(storage):
    import matplotlib.pyplot as plt

    sphere, zdt = load_run(storage, "sphere"), load_run(storage, "zdt")
    for fig in (sphere.heatmap(), zdt.heatmap(), zdt.front(highlight=zdt.select(2))):
        assert fig.axes
        plt.close(fig)
    assert len(sphere.metrics()) and "coverage" in sphere.metrics()
