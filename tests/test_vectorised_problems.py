"""Vectorised problems and raw matrices.

``Problem.evaluate_batch`` of every vectorised benchmark equals ``evaluate`` row by row (values,
measures, constraints, noise under per-row seeds), and ``Space``'s raw-matrix functions
(``to_raw``, ``from_raw``, ``decode_raw``, ``encode_raw``) agree with the scalar encode/decode
on mixed and conditional spaces.
"""

from __future__ import annotations

import numpy as np
import pytest

from qd.problem import BatchEvaluation, Problem
from qd.registry import get_problem
from qd.space import Bool, Categorical, Float, Int, Space, SpaceError

CASES = [
    ("sphere", {"dim": 2}),
    ("sphere", {"dim": 3}),
    ("sphere", {}),
    ("rastrigin", {"dim": 2}),
    ("rastrigin", {"dim": 7}),
    ("rastrigin", {}),
    ("arm", {"dof": 2}),
    ("arm", {"dof": 5}),
    ("arm", {}),
    ("zdt1", {}),
    ("zdt1", {"dim": 2, "measures": False}),
    ("zdt1", {"dim": 11, "noise": 0.1}),
    ("zdt2", {"dim": 3}),
    ("zdt2", {"dim": 5, "noise": 0.3}),
    ("zdt3", {}),
    ("zdt3", {"dim": 4, "measures": False, "noise": 0.05}),
    ("dtlz2", {}),
    ("dtlz2", {"dim": 3, "n_objectives": 2}),
    ("dtlz2", {"dim": 10, "n_objectives": 5, "measures": False}),
    ("branin-currin", {}),
    ("branin-currin", {"noise": 0.5}),
    ("mixed", {}),
    ("conditional", {}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in options.items()) for name, options in CASES]


def random_vectors(space: Space, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, d) encoded vectors: uniform, plus corners and exact bin edges, where rounding bites."""
    U = rng.random((n, space.dim))
    U[: n // 8] = rng.integers(0, 2, (n // 8, space.dim))
    edges = rng.integers(0, 13, (n // 8, space.dim)) / 12.0
    U[n // 8 : n // 4] = edges
    return U


def row_by_row(problem: Problem, configs: list[dict], seeds: np.ndarray) -> tuple[list, np.ndarray]:
    """``normalise(evaluate(config, seed))`` per row -> (rows, ok mask); a row that fails is None."""
    rows = []
    for config, seed in zip(configs, seeds.tolist()):
        try:
            rows.append(problem.normalise(problem.evaluate(config, int(seed))))
        except ValueError:
            rows.append(None)
    return rows, np.array([r is not None for r in rows], dtype=bool)


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_evaluate_batch_equals_evaluate_row_by_row(name: str, options: dict) -> None:
    problem = get_problem(name, **options)
    assert problem.vectorized and type(problem).evaluate_batch is not Problem.evaluate_batch
    rng = np.random.default_rng(len(name) + 31 * len(options))
    configs = problem.space.decode_many(random_vectors(problem.space, 400, rng))
    seeds = rng.integers(0, 2**62, len(configs))
    batch = problem.evaluate_batch(problem.space.to_raw(configs), seeds)
    assert isinstance(batch, BatchEvaluation)
    m, k, c = len(problem.objectives), len(problem.measures), len(problem.constraints)
    assert batch.values.shape == (len(configs), m)
    assert (batch.measures is None) if k == 0 else (batch.measures.shape == (len(configs), k))
    assert (batch.constraints is None) if c == 0 else (batch.constraints.shape == (len(configs), c))
    assert batch.errors is None or all(e is None for e in batch.errors)
    rows, ok = row_by_row(problem, configs, seeds)
    assert ok.all(), "random valid configurations all evaluate; a failing row would need a non-finite batch row"
    for part, got, width in ((0, batch.values, m), (1, batch.measures, k), (2, batch.constraints, c)):
        if width:
            want = np.array([r[part] for r in rows])
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("name", "options"), [case for case in CASES if case[1].get("noise")])
def test_noisy_batches_draw_each_rows_noise_from_its_own_seed(name: str, options: dict) -> None:
    noisy, clean = get_problem(name, **options), get_problem(name, **{**options, "noise": 0.0})
    X = noisy.space.to_raw(noisy.space.sample(50, np.random.default_rng(3)))
    seeds = np.arange(50)
    first, again = noisy.evaluate_batch(X, seeds), noisy.evaluate_batch(X, seeds)
    np.testing.assert_array_equal(first.values, again.values)
    assert not np.allclose(first.values, clean.evaluate_batch(X, seeds).values)
    shifted = noisy.evaluate_batch(X, seeds + 1).values
    assert not np.isclose(first.values, shifted).any()
    # A row's value does not depend on the rest of the batch.
    np.testing.assert_array_equal(noisy.evaluate_batch(X[7:8], seeds[7:8]).values, first.values[7:8])


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_empty_and_single_row_batches(name: str, options: dict) -> None:
    problem = get_problem(name, **options)
    empty = problem.evaluate_batch(np.empty((0, problem.space.dim)), np.empty(0, dtype=np.int64))
    assert empty.values.shape == (0, len(problem.objectives))
    config = problem.space.sample(1, np.random.default_rng(0))[0]
    one = problem.evaluate_batch(problem.space.to_raw([config]), np.array([5]))
    np.testing.assert_allclose(one.values[0], problem.normalise(problem.evaluate(config, 5))[0], rtol=1e-12)


# --- raw matrices ---------------------------------------------------------------------------


def hand_built_space() -> Space:
    """Log floats and ints, categoricals over bool/str/None/int/float choices, chained conditions."""
    return Space(
        [
            Categorical("kind", ("a", None, True, 3, 2.5)),
            Float("scale", 1e-4, 10.0, log=True, active_if={"kind": ["a", None]}),
            Int("count", 1, 1000, log=True, active_if={"kind": [None]}),
            Categorical("flag", (False, True, 0), active_if={"kind": [True, 3]}),
            Float("offset", -1.0, 1.0, active_if={"flag": [True]}),
            Int("steps", -3, 7, active_if={"flag": [0], "kind": [3]}),
            Categorical("only", (None,), active_if={"count": [1, 2, 3]}),
            Categorical("number", (1, 1.0, True, "1"), active_if={"steps": [-3, 0, 7]}),
            Int("single", 5, 5),
            Int("big", 2, 2**40, log=True, active_if={"number": [1.0, True]}),
            Bool("last"),
        ]
    )


SPACES = {
    "mixed": lambda: get_problem("mixed").space,
    "conditional": lambda: get_problem("conditional").space,
    "hand-built": hand_built_space,
}


def same_config(a: dict, b: dict) -> bool:
    """Equal keys, values and value types (True is not 1, 1.0 is not 1)."""
    return a.keys() == b.keys() and all(type(a[k]) is type(b[k]) and a[k] == b[k] for k in a)


@pytest.mark.parametrize("space_name", SPACES)
def test_from_raw_inverts_to_raw(space_name: str) -> None:
    space = SPACES[space_name]()
    configs = space.decode_many(random_vectors(space, 3000, np.random.default_rng(1)))
    R = space.to_raw(configs)
    assert R.shape == (len(configs), space.dim)
    back = space.from_raw(R)
    bad = [(a, b) for a, b in zip(configs, back) if not same_config(a, b)]
    assert not bad, bad[:3]
    # Every active parameter is a number, every inactive one NaN.
    assert np.array_equal(~np.isnan(R), np.array([[p.name in c for p in space.params] for c in configs]))


@pytest.mark.parametrize("space_name", SPACES)
def test_decode_raw_equals_to_raw_of_decode(space_name: str) -> None:
    space = SPACES[space_name]()
    rng = np.random.default_rng(2)
    U = np.concatenate([random_vectors(space, 3000, rng), rng.uniform(-0.5, 1.5, (300, space.dim))])
    D = space.decode_raw(U)
    want = np.concatenate([space.to_raw([space.decode(u)]) for u in U])
    np.testing.assert_allclose(D, want, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize("space_name", SPACES)
def test_encode_raw_equals_encode_many(space_name: str) -> None:
    space = SPACES[space_name]()
    configs = space.decode_many(random_vectors(space, 3000, np.random.default_rng(3)))
    encoded = space.encode_raw(space.to_raw(configs))
    np.testing.assert_allclose(encoded, space.encode_many(configs), rtol=1e-12, atol=1e-15)


def test_from_raw_keeps_a_none_choice() -> None:
    space = Space([Categorical("norm", (None, "layer")), Float("x", 0.0, 1.0, active_if={"norm": [None]})])
    configs = [{"norm": None, "x": 0.25}, {"norm": "layer"}]
    R = space.to_raw(configs)
    np.testing.assert_array_equal(R, [[0.0, 0.25], [1.0, np.nan]])
    assert space.from_raw(R) == configs


def test_a_condition_tells_apart_choices_python_calls_equal() -> None:
    # False == 0 in Python, but they are two choices; only the 0 activates "x".
    space = Space([Categorical("p", (0, False)), Float("x", 0.0, 1.0, active_if={"p": [0]})])
    assert space.decode([0.9, 0.5]) == {"p": False}
    assert space.decode([0.1, 0.5]) == {"p": 0, "x": 0.5}
    with pytest.raises(SpaceError, match="inactive"):
        space.validate({"p": False, "x": 0.5})
    np.testing.assert_array_equal(space.decode_raw([[0.9, 0.5], [0.1, 0.5]]), [[1.0, np.nan], [0.0, 0.5]])
