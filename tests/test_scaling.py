"""Objective scaling (``qd.scaling``): log scales for counts and stated bounds give hypervolumes,
MOQD scores and plots in readable units, recorded with the run so every surface agrees.

Hypervolumes are checked against moocore on values transformed by hand, not against qd's own code."""

import json

import matplotlib
import moocore
import numpy as np
import pytest

from qd.archive import ParetoArchive, _Row, pareto_spec, spec_from_json, spec_to_json
from qd.cli import main
from qd.dashboard import pareto_plotly
from qd.experiment import Experiment
from qd.plots import pareto_figure
from qd.problem import Objective
from qd.registry import get_problem
from qd.results import hypervolume, reference_point_of_values, summary
from qd.scaling import Scaling, parse
from qd.session import execute, prepare, problem_of
from qd.store import Store


def test_log_and_bounds_map_values_and_invert():
    s = Scaling(("log", "linear", "log"), ((0.0, 999.0), None, None))
    X = np.array([[0.0, -3.0, 9.0], [999.0, 2.5, 99.0], [99.0, 0.0, 0.0]])
    Y = s.apply(X)
    assert Y[:, 0].tolist() == pytest.approx([0.0, 1.0, 2 / 3])  # log10(1 + v) / log10(1000)
    assert Y[:, 1].tolist() == [-3.0, 2.5, 0.0]
    assert Y[:, 2].tolist() == pytest.approx([1.0, 2.0, 0.0])
    assert np.allclose(s.invert(Y), X)
    assert Scaling.identity(3).apply(X) is not None and np.array_equal(Scaling.identity(3).apply(X), X)


@pytest.mark.parametrize("spec, message", [
    ({"f3": "log"}, "'f3' is not an objective; allowed: f1, f2"),
    ({"f1": "ln"}, "scaling.f1: scale='ln' is not allowed; allowed: 'linear', 'log'"),
    ({"f1": [1, 0]}, "scaling.f1: bounds=[1, 0] is not allowed; allowed: [low, high]"),
    ({"f1": {"scale": "log", "bounds": [-1, 3]}}, "with scale='log' is not allowed; allowed: low >= 0"),
    ({"f1": {"scal": "log"}}, "unknown key(s) ['scal']"),
    ("log", "allowed: a table from objective name"),
])
def test_bad_scaling_names_the_objective_the_value_and_what_is_allowed(spec, message):
    with pytest.raises(ValueError) as e:
        parse(spec, ["f1", "f2"])
    assert message in str(e.value)
    with pytest.raises(ValueError, match="objective 'x': scale='lin'"):
        Objective("x", scale="lin")


def test_a_bad_scaling_option_stops_qd_run_before_any_work(tmp_path, capsys):
    db = tmp_path / "runs.db"
    code = main(["run", "--problem", "zdt1", "--budget", "5", "--storage", f"sqlite:///{db}", "--no-progress",
                 "-P", 'scaling={"f2": "ln"}'])
    assert code == 2 and "scaling.f2: scale='ln' is not allowed" in capsys.readouterr().err
    assert not db.exists()


def _run(tmp_path, problem, options, strategy="random", budget=40, **strategy_options):
    url = f"sqlite:///{tmp_path}/runs.db"
    exp = Experiment(problem=problem, problem_options=options, strategy=strategy, strategy_options=strategy_options,
                     budget=budget, storage=url, name="r", evaluator="inprocess", progress=False)
    execute(prepare(exp), dashboard_every_s=None)
    store = Store.open(url, "r")
    return store, problem_of(store)


def test_bounded_objectives_give_a_share_of_the_box_recorded_with_the_run(tmp_path, capsys):
    bounds = {"f1": [0, 1], "f2": [0, 10]}
    store, problem = _run(tmp_path, "zdt1", {"dim": 3, "measures": False, "scaling": bounds})
    problem.reference_point = None  # the stated bounds, not zdt's declared point, set the reference
    result = summary(store, problem)
    ref = result["hypervolume_reference"]
    assert ref["source"] == "bounds" and ref["point"] == [1.0, 10.0]
    assert ref["scaling"] == {"f1": {"scale": "linear", "bounds": [0.0, 1.0]},
                              "f2": {"scale": "linear", "bounds": [0.0, 10.0]}}
    F = np.array([p["values"] for p in result["pareto_front"]])
    expected = moocore.hypervolume(F / [1.0, 10.0], ref=[1.0, 1.0])
    assert 0.0 < result["hypervolume"] <= 1.0
    assert result["hypervolume"] == pytest.approx(expected)
    # The rebuilt problem carries the scaling (it is one of the recorded problem options).
    assert store.info.problem_options["scaling"] == bounds and problem.scaling.bounded


def test_a_log_scaled_count_is_measured_in_decades_on_every_surface(tmp_path, capsys):
    store, problem = _run(tmp_path, "mixed", {"scaling": {"cost": "log"}})
    result = summary(store, problem)
    F = np.array([p["values"] for p in result["pareto_front"]])
    ref = np.array(result["hypervolume_reference"]["point"])
    logged = lambda a: np.column_stack([a[:, 0], np.log10(1 + a[:, 1])])  # noqa: E731
    assert result["hypervolume"] == pytest.approx(moocore.hypervolume(logged(F), ref=logged(ref[None])[0]))
    assert result["hypervolume_reference"]["scaling"] == {"cost": {"scale": "log"}}
    # Raw units give another number: the scaling is what was measured.
    assert hypervolume(F, store.directions, tuple(ref)) != pytest.approx(result["hypervolume"])

    assert main(["show", "--storage", f"sqlite:///{tmp_path}/runs.db", "--name", "r"]) == 0
    assert "measured in log10(1 + cost)" in capsys.readouterr().out

    cols = store.columns()
    ok = cols.feasible
    reference = reference_point_of_values(problem, cols.values[ok], store.directions)
    fig = pareto_plotly(store, cols, reference)
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis.type == "linear"
    fig = pareto_figure(store.trials(), store.objective_names, store.directions, scaling=problem.scaling)
    assert fig.axes[0].get_yscale() == "log" and fig.axes[0].get_xscale() == "linear"
    matplotlib.pyplot.close(fig)


def test_data_derived_reference_is_taken_in_scaled_units():
    problem = get_problem("mixed", scaling={"cost": "log"})
    problem.reference_point = None
    V = np.array([[0.2, 9.0], [0.6, 999.0], [0.4, 99.0]])
    ref = reference_point_of_values(problem, V, problem.directions)
    assert ref.source == "data"
    # 10% of the logged span beyond the worst logged cost (log10(1000) = 3, span 2), back in units.
    assert ref.point[1] == pytest.approx(10 ** 3.2 - 1)
    assert ref.point[0] == pytest.approx(0.64)


def test_mome_cells_measure_hypervolume_in_the_problems_scaling():
    problem = get_problem("zdt1", dim=6, scaling={"f1": [0, 1], "f2": [0, 10]})
    spec = pareto_spec(problem, bins=2, front_size=4)
    assert spec_from_json(json.loads(json.dumps(spec_to_json(spec)))) == spec
    archive = ParetoArchive(problem, spec)
    rng = np.random.default_rng(0)
    X = rng.random((200, problem.space.dim))
    V = np.column_stack([X[:, 0], 1 + 9 * X[:, 1]])
    M = X[:, 2:4]
    for i, (x, v, mm) in enumerate(zip(X, V, M)):
        archive._add_one(x, _Row(i, v, mm))
    ref = np.array([11.0, 11.0]) / [1.0, 10.0]
    for front in archive.fronts.values():
        assert front.hypervolume == pytest.approx(moocore.hypervolume(front.values / [1.0, 10.0], ref=ref))
    m = archive.metrics()
    assert m["global_hypervolume"] == pytest.approx(
        moocore.hypervolume(archive.members()[1] / [1.0, 10.0], ref=ref))
    assert archive.describe()["scaling"]["bounds"] == [[0.0, 1.0], [0.0, 10.0]]


def test_builtin_problems_declare_readable_units():
    arch = get_problem("arch").scaling
    assert arch.scales == ("linear", "log", "log") and arch.bounds[0] == (0.0, 1.0)
    rag_objectives = get_problem("rag").describe()["objectives"]
    assert [o.get("scale", "linear") for o in rag_objectives] == ["linear", "linear", "log", "log"]
