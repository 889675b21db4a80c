"""The benchmark problems reproduce their known answers and reference implementations."""

from __future__ import annotations

import math
import pickle

import moocore
import numpy as np
import pytest
import torch
from botorch.test_functions import multi_objective as botorch_mo
from hypothesis import given, settings
from hypothesis import strategies as st

from qd.problem import Problem
from qd.registry import get_problem

BENCHMARKS = ["zdt1", "zdt2", "zdt3", "dtlz2", "branin-currin", "sphere", "rastrigin", "arm", "mixed", "conditional"]


def values_of(problem: Problem, configs: list[dict], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate configs -> (values (n, m), measures (n, k)), checked by Problem.normalise."""
    rows = [problem.normalise(problem.evaluate(c, seed)) for c in configs]
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows]).reshape(len(rows), len(problem.measures))


def botorch_values(function: botorch_mo.MultiObjectiveTestProblem, X: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return function(torch.tensor(X, dtype=torch.double)).numpy()


def x_configs(X: np.ndarray) -> list[dict]:
    """Points (n, d) -> configs, for problems whose parameters are x0 .. x{d-1}."""
    return [{f"x{i}": float(v) for i, v in enumerate(row)} for row in X]


# --- every problem --------------------------------------------------------------------------


@pytest.mark.parametrize("name", BENCHMARKS)
def test_builds_describes_and_pickles(name: str) -> None:
    problem = get_problem(name)
    description = problem.describe()
    assert description["name"] == name and description["doc"], "the one-line docstring is what `qd problems` shows"
    config = problem.space.sample(1, np.random.default_rng(1))[0]
    clone = pickle.loads(pickle.dumps(problem))
    first, second = problem.evaluate(config, 3), clone.evaluate(config, 3)
    assert first.values == second.values and list(first.measures) == list(second.measures)
    if len(problem.objectives) > 1:
        assert problem.reference_point is not None and len(problem.reference_point) == len(problem.objectives)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_random_evaluations_are_well_formed_deterministic_and_within_measure_bounds(name: str) -> None:
    problem = get_problem(name)
    configs = problem.space.sample(300, np.random.default_rng(7))
    values, measures = values_of(problem, configs, seed=0)
    again, _ = values_of(problem, configs[:20], seed=5)
    np.testing.assert_array_equal(values[:20], again, err_msg="seed must not matter without noise")
    low = np.array([m.low for m in problem.measures])
    high = np.array([m.high for m in problem.measures])
    assert np.all(measures >= low) and np.all(measures <= high)
    if name in ("mixed", "conditional"):  # their reference points are documented to bound every value
        assert np.all(values < np.array(problem.reference_point))


# --- ZDT ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "front"), [("zdt1", lambda f1: 1 - np.sqrt(f1)), ("zdt2", lambda f1: 1 - f1**2)])
def test_zdt_front_and_botorch_agreement(name: str, front) -> None:
    problem = get_problem(name, dim=6)
    rng = np.random.default_rng(0)
    on_front = np.zeros((50, 6))
    on_front[:, 0] = rng.random(50)
    values, measures = values_of(problem, x_configs(on_front))
    np.testing.assert_allclose(values[:, 1], front(values[:, 0]), atol=1e-12)
    np.testing.assert_array_equal(measures, 0.0)
    X = rng.random((200, 6))
    reference = botorch_values(getattr(botorch_mo, name.upper())(dim=6), X)
    np.testing.assert_allclose(values_of(problem, x_configs(X))[0], reference, rtol=1e-12)


def test_zdt3_is_the_original_g_times_h_and_matches_botorch_on_the_front() -> None:
    problem = get_problem("zdt3", dim=5)
    rng = np.random.default_rng(1)
    X = rng.random((200, 5))
    reference = botorch_values(botorch_mo.ZDT3(dim=5), X)  # BoTorch leaves g out of f2
    g = 1 + 9 * X[:, 1:].mean(axis=1)
    ours = values_of(problem, x_configs(X))[0]
    np.testing.assert_allclose(ours[:, 0], reference[:, 0])
    np.testing.assert_allclose(ours[:, 1], g * reference[:, 1], rtol=1e-12, atol=1e-12)
    X[:, 1:] = 0.0
    on_front, _ = values_of(problem, x_configs(X))
    np.testing.assert_allclose(on_front, botorch_values(botorch_mo.ZDT3(dim=5), X))


@pytest.mark.parametrize("name", ["zdt1", "zdt2", "zdt3"])
def test_zdt_front_reaches_botorchs_maximum_hypervolume(name: str) -> None:
    problem = get_problem(name)
    assert problem.reference_point == tuple(getattr(botorch_mo, name.upper())(dim=6)._ref_point)
    assert problem.max_hypervolume == pytest.approx(getattr(botorch_mo, name.upper())._max_hv)
    hv = moocore.hypervolume(problem.pareto_front(3000), ref=problem.reference_point)
    assert hv == pytest.approx(problem.max_hypervolume, abs=2e-3)
    assert hv <= problem.max_hypervolume
    random_values, _ = values_of(problem, problem.space.sample(500, np.random.default_rng(0)))
    assert moocore.hypervolume(random_values, ref=problem.reference_point) < hv - 1.0


def test_zdt_measures_split_the_distance_variables() -> None:
    problem = get_problem("zdt1", dim=6)  # distance variables x1..x5: halves x1..x2 and x3..x5
    x = np.array([[0.3, 0.2, 0.4, 0.1, 0.1, 0.7]])
    _, measures = values_of(problem, x_configs(x))
    np.testing.assert_allclose(measures[0], [0.3, 0.3])
    assert [m.name for m in get_problem("zdt1", dim=2, measures=False).measures] == []


def test_noise_is_reproducible_per_seed_and_reports_the_noise_free_values() -> None:
    noisy, clean = get_problem("zdt1", noise=0.1), get_problem("zdt1")
    config = noisy.space.sample(1, np.random.default_rng(2))[0]
    first, repeat, other = noisy.evaluate(config, 1), noisy.evaluate(config, 1), noisy.evaluate(config, 2)
    assert first.values == repeat.values and first.values != other.values
    assert first.metadata["noise_free_values"] == clean.evaluate(config, 1).values
    assert np.abs(np.subtract(first.values, first.metadata["noise_free_values"])).max() < 1.0
    bc = get_problem("branin-currin", noise=1.0)
    assert bc.evaluate({"x0": 0.5, "x1": 0.5}, 0).values != bc.evaluate({"x0": 0.5, "x1": 0.5}, 1).values


# --- DTLZ2 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("dim", "n_objectives"), [(6, 3), (4, 2), (8, 4)])
def test_dtlz2_matches_botorch_and_its_front_lies_on_the_unit_sphere(dim: int, n_objectives: int) -> None:
    problem = get_problem("dtlz2", dim=dim, n_objectives=n_objectives)
    reference_function = botorch_mo.DTLZ2(dim=dim, num_objectives=n_objectives)
    rng = np.random.default_rng(dim)
    X = rng.random((200, dim))
    values, _ = values_of(problem, x_configs(X))
    np.testing.assert_allclose(values, botorch_values(reference_function, X), rtol=1e-12, atol=1e-15)
    X[:, n_objectives - 1 :] = 0.5
    front_values, measures = values_of(problem, x_configs(X))
    np.testing.assert_allclose(np.linalg.norm(front_values, axis=1), 1.0)
    np.testing.assert_allclose(measures, 0.5)
    assert problem.reference_point == (1.1,) * n_objectives
    assert problem.max_hypervolume == pytest.approx(reference_function._max_hv)
    assert moocore.hypervolume(problem.pareto_front(2000), ref=problem.reference_point) <= problem.max_hypervolume


# --- Branin-Currin --------------------------------------------------------------------------


def test_branin_currin_matches_botorch_including_the_x1_zero_edge() -> None:
    problem = get_problem("branin-currin")
    X = np.random.default_rng(3).random((300, 2))
    X[:5, 1] = 0.0
    X[5:10, 0] = 0.0
    values, _ = values_of(problem, x_configs(X))
    np.testing.assert_allclose(values, botorch_values(botorch_mo.BraninCurrin(), X), rtol=1e-12)
    assert problem.reference_point == tuple(botorch_mo.BraninCurrin._ref_point)
    assert problem.max_hypervolume == botorch_mo.BraninCurrin._max_hv


def test_branin_currin_dense_grid_approaches_botorchs_59_36() -> None:
    problem = get_problem("branin-currin")
    grid = np.linspace(0.0, 1.0, 301)
    X = np.array(np.meshgrid(grid, grid)).reshape(2, -1).T
    from problems.branin_currin import branin_currin_objectives

    hv = moocore.hypervolume(branin_currin_objectives(X), ref=problem.reference_point)
    assert 58.5 < hv < problem.max_hypervolume


# --- sphere and Rastrigin (pyribs linear projection) ----------------------------------------


def pyribs_sphere(solutions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sphere function of pyribs' examples/sphere.py, written out as the reference."""
    dim = solutions.shape[1]
    shift = 5.12 * 0.4
    best, worst = 0.0, (-5.12 - shift) ** 2 * dim
    raw = np.sum(np.square(solutions - shift), axis=1)
    objectives = (raw - worst) / (best - worst) * 100
    clipped = solutions.copy()
    mask = (clipped < -5.12) | (clipped > 5.12)
    clipped[mask] = 5.12 / clipped[mask]
    measures = np.stack([clipped[:, : dim // 2].sum(axis=1), clipped[:, dim // 2 :].sum(axis=1)], axis=1)
    return objectives, measures


@pytest.mark.parametrize("dim", [20, 7])
def test_sphere_matches_pyribs_and_scores_100_at_the_shifted_optimum(dim: int) -> None:
    problem = get_problem("sphere", dim=dim)
    X = np.random.default_rng(dim).uniform(-5.12, 5.12, (200, dim))
    values, measures = values_of(problem, x_configs(X))
    reference_objectives, reference_measures = pyribs_sphere(X)
    np.testing.assert_allclose(values[:, 0], reference_objectives)
    np.testing.assert_allclose(measures, reference_measures)
    assert np.all((values >= 0) & (values <= 100))
    optimum, _ = values_of(problem, x_configs(np.full((1, dim), 2.048)))
    assert optimum[0, 0] == pytest.approx(100.0)
    worst, low_corner = values_of(problem, x_configs(np.full((1, dim), -5.12)))
    assert worst[0, 0] == pytest.approx(0.0)
    # The declared bounds are attained at the corners: they are the true bounds.
    _, high_corner = values_of(problem, x_configs(np.full((1, dim), 5.12)))
    np.testing.assert_allclose(low_corner[0], [m.low for m in problem.measures])
    np.testing.assert_allclose(high_corner[0], [m.high for m in problem.measures])


def test_rastrigin_scores_100_at_the_optimum_and_is_multimodal() -> None:
    problem = get_problem("rastrigin", dim=10)
    optimum, measures = values_of(problem, x_configs(np.full((1, 10), 2.048)))
    assert optimum[0, 0] == pytest.approx(100.0)
    np.testing.assert_allclose(measures[0], [5 * 2.048, 5 * 2.048])
    corner, _ = values_of(problem, x_configs(np.full((1, 10), -5.12)))
    assert corner[0, 0] == pytest.approx(0.0)
    # A neighbouring integer lattice point is a local optimum: worse than 100, better than half a step away.
    lattice, _ = values_of(problem, x_configs(np.full((1, 10), 2.048 - 1.0)))
    ridge, _ = values_of(problem, x_configs(np.full((1, 10), 2.048 - 0.5)))
    assert ridge[0, 0] < lattice[0, 0] < 100.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=5, max_size=5))
def test_projection_measures_stay_in_bounds_for_any_point(unit: list[float]) -> None:
    problem = get_problem("sphere", dim=5)
    _, measures = values_of(problem, [problem.space.decode(unit)])
    assert all(m.low <= v <= m.high for m, v in zip(problem.measures, measures[0]))


# --- arm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dof", [12, 3])
def test_arm_end_effector_and_score(dof: int) -> None:
    problem = get_problem("arm", dof=dof)

    def run(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return values_of(problem, [{f"theta{i}": float(v) for i, v in enumerate(row)} for row in theta])

    values, measures = run(np.zeros((1, dof)))
    np.testing.assert_allclose(measures[0], [dof, 0.0], atol=1e-12)
    assert values[0, 0] == pytest.approx(100.0)
    up = np.zeros((1, dof))
    up[0, 0] = math.pi / 2  # the first joint turns the whole straight arm upwards
    values, measures = run(up)
    np.testing.assert_allclose(measures[0], [0.0, dof], atol=1e-12)
    assert values[0, 0] == pytest.approx((1 - np.var(up)) * 100)
    folded = np.zeros((1, dof))
    folded[0, 1] = math.pi  # the second link folds back onto the first
    _, measures = run(folded)
    np.testing.assert_allclose(measures[0], [1.0 - (dof - 1), 0.0], atol=1e-12)


# --- mixed and conditional: exact fronts by enumeration -------------------------------------


def assert_exact_front(problem: Problem, n_random: int) -> tuple[list[dict], np.ndarray]:
    configs, front = problem.pareto_front()
    for config in configs:
        problem.space.validate(config)
    np.testing.assert_allclose(values_of(problem, configs)[0], front)
    assert moocore.is_nondominated(front).all()
    random_values, _ = values_of(problem, problem.space.sample(n_random, np.random.default_rng(11)))
    # Every random point is weakly dominated by the front, and none dominates a front point.
    covered = (front[None, :, :] <= random_values[:, None, :] + 1e-12).all(axis=2).any(axis=1)
    assert covered.all()
    beats = (random_values[:, None, :] <= front[None, :, :]).all(axis=2) & (
        random_values[:, None, :] < front[None, :, :]
    ).any(axis=2)
    assert not beats.any()
    front_hypervolume = moocore.hypervolume(front, ref=problem.reference_point)
    assert moocore.hypervolume(random_values, ref=problem.reference_point) < front_hypervolume
    assert problem.max_hypervolume == pytest.approx(front_hypervolume)
    return configs, front


def test_mixed_exact_front_and_known_optimum() -> None:
    problem = get_problem("mixed")
    configs, front = assert_exact_front(problem, n_random=3000)
    best = configs[int(np.argmin(front[:, 0]))]
    assert front[:, 0].min() == pytest.approx(0.05 + 0.4 * math.exp(-3.5) + 0.006)
    assert (best["layers"], best["width"], best["activation"], best["batch_norm"]) == (4, 512, "gelu", True)
    assert best["dropout"] == pytest.approx(0.35) and best["lr"] == pytest.approx(1e-3)
    assert {c["activation"] for c in configs} == {"relu", "gelu"}
    assert {c["layers"] for c in configs} == set(range(1, 9))
    # The front runs from the cheapest net (cost 0) to the lowest-error one; bigger nets only cost more.
    assert front[:, 1].min() == 0.0 and front[:, 1].max() == front[np.argmin(front[:, 0]), 1] < 1.0


def test_mixed_activation_shifts_the_best_learning_rate() -> None:
    problem = get_problem("mixed")
    base = {"layers": 2, "width": 64, "batch_norm": False, "dropout": 0.1}

    def best_lr(activation: str) -> float:
        lrs = np.logspace(-5, -1, 81)
        errors = [problem.evaluate({**base, "activation": activation, "lr": float(lr)}, 0).values[0] for lr in lrs]
        return float(lrs[int(np.argmin(errors))])

    assert best_lr("gelu") == pytest.approx(10**-3.5)
    assert best_lr("sigmoid") == pytest.approx(1e-2)


def test_conditional_exact_front_and_known_optimum() -> None:
    problem = get_problem("conditional")
    assert problem.space.is_conditional
    configs, front = assert_exact_front(problem, n_random=3000)
    best = configs[int(np.argmin(front[:, 0]))]
    assert front[:, 0].min() == pytest.approx(0.30)
    assert best["method"] == "full" and best["freeze_embeddings"] is False
    assert best["lr"] == pytest.approx(10**-4.5)
    assert {c["method"] for c in configs} == {"lora", "prefix", "full"}
    assert {c.get("lora_targets") for c in configs if c["method"] == "lora"} == {"attention", "all"}


def test_conditional_nested_condition_and_measures() -> None:
    problem = get_problem("conditional")
    configs = problem.space.sample(400, np.random.default_rng(4))
    for config in configs:
        assert ("mlp_rank_ratio" in config) == (config.get("lora_targets") == "all")
        assert ("n_prefix" in config) == (config["method"] == "prefix")
    config = {"method": "lora", "rank": 8, "lora_targets": "all", "mlp_rank_ratio": 2.0}
    config |= {"lora_dropout": 0.1, "lr": 1e-3}
    values, measures = values_of(problem, [config])
    assert values[0, 1] == pytest.approx(math.log10(8 * 5e-4))
    np.testing.assert_allclose(measures[0], [values[0, 1], -3.0])


# --- bad options ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("zdt1", {"dim": 1}, "dim=1"),
        ("zdt2", {"dim": 2}, "dim=2"),  # two measure halves need dim >= 3
        ("zdt3", {"dim": 6.0}, "dim=6.0"),
        ("zdt1", {"dim": True}, "dim=True"),
        ("zdt1", {"noise": -0.1}, "noise=-0.1"),
        ("zdt1", {"measures": "yes"}, "measures='yes'"),
        ("dtlz2", {"dim": 3, "n_objectives": 3}, "dim=3"),
        ("dtlz2", {"n_objectives": 1}, "n_objectives=1"),
        ("branin-currin", {"noise": math.nan}, "noise=nan"),
        ("sphere", {"dim": 1}, "dim=1"),
        ("rastrigin", {"dim": "20"}, "dim='20'"),
        ("arm", {"dof": 0}, "dof=0"),
    ],
)
def test_bad_options_are_rejected_naming_the_value_and_what_is_allowed(name: str, options: dict, field: str) -> None:
    with pytest.raises(ValueError, match="allowed") as error:
        get_problem(name, **options)
    assert field in str(error.value) and name in str(error.value)


def test_unknown_option_and_smallest_valid_sizes() -> None:
    with pytest.raises(ValueError, match="unknown option"):
        get_problem("sphere", dimension=10)
    assert get_problem("zdt1", dim=2, measures=False).space.dim == 2
    assert get_problem("dtlz2", dim=3, n_objectives=2).space.dim == 3
    assert len(get_problem("arm", dof=2).space) == 2
