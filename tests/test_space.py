"""Space encoding round-trips, validation messages and Optuna conversion."""

import numpy as np
import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qd.space import Bool, Categorical, Float, Int, Space, SpaceError

SPACE = Space([
    Categorical("method", ("lora", "ia3", "prefix")),
    Int("rank", 1, 64, log=True, active_if={"method": ["lora"]}),
    Float("alpha", 1.0, 64.0, active_if={"method": ["lora"]}),
    Int("prefix_len", 1, 30, active_if={"method": ["prefix"]}),
    Float("lr", 1e-5, 1e-2, log=True),
    Int("steps", 10, 20),
    Bool("bias"),
    Categorical("size", (8, 16.5, "auto")),
])


@given(st.lists(st.floats(0, 1), min_size=SPACE.dim, max_size=SPACE.dim))
@settings(max_examples=300, deadline=None)
def test_decode_encode_decode_is_stable(xs):
    config = SPACE.decode(xs)
    assert SPACE.validate(config) == config
    assert SPACE.decode(SPACE.encode(config)) == config
    x = SPACE.encode(config)
    assert x.shape == (SPACE.dim,) and np.all((0 <= x) & (x <= 1))


@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=SPACE.dim, max_size=SPACE.dim))
@settings(max_examples=100, deadline=None)
def test_out_of_cube_vectors_are_clipped_to_valid_configs(xs):
    SPACE.validate(SPACE.decode(xs))


def test_conditional_parameters_follow_their_parent():
    lora = SPACE.decode([0.1] + [0.5] * (SPACE.dim - 1))
    prefix = SPACE.decode([0.9] + [0.5] * (SPACE.dim - 1))
    assert lora["method"] == "lora" and "rank" in lora and "prefix_len" not in lora
    assert prefix["method"] == "prefix" and "prefix_len" in prefix and "rank" not in prefix
    assert SPACE.encode(prefix)[1] == 0.5  # inactive coordinates sit at the placeholder


def test_integer_bins_cover_every_value_equally():
    p = Int("n", 0, 3)
    counts = np.bincount([p.decode(u) for u in np.linspace(0, 1, 4000, endpoint=False)])
    assert list(counts) == [1000] * 4


@pytest.mark.parametrize("config, fragment", [
    ({"method": "lora", "rank": 100, "alpha": 2.0, "lr": 1e-3, "steps": 10, "bias": True, "size": 8},
     "parameter 'rank': value 100 is not allowed; allowed: an integer in [1, 64]"),
    ({"method": "dora", "lr": 1e-3, "steps": 10, "bias": True, "size": 8}, "parameter 'method': value 'dora'"),
    ({"method": "ia3", "rank": 4, "lr": 1e-3, "steps": 10, "bias": True, "size": 8}, "'rank' is given but inactive"),
    ({"method": "ia3", "lr": 1e-3, "steps": 10, "bias": True}, "parameter 'size' is missing"),
    ({"method": "ia3", "lr": 1e-3, "steps": 10, "bias": True, "size": 8, "zzz": 1}, "unknown parameter(s) ['zzz']"),
    ({"method": "ia3", "lr": 1e-3, "steps": 10.5, "bias": True, "size": 8}, "parameter 'steps': value 10.5"),
    ({"method": "ia3", "lr": 1e-3, "steps": 10, "bias": 1, "size": 8}, "parameter 'bias': value 1"),
])
def test_invalid_configs_name_parameter_value_and_allowed(config, fragment):
    with pytest.raises(SpaceError) as e:
        SPACE.validate(config)
    assert fragment in str(e.value)


def test_bad_space_definitions_are_rejected():
    with pytest.raises(SpaceError, match="must be defined before"):
        Space([Int("r", 1, 4, active_if={"m": ["a"]}), Categorical("m", ("a", "b"))])
    with pytest.raises(SpaceError, match="log scale needs low > 0"):
        Float("lr", 0.0, 1.0, log=True)
    with pytest.raises(SpaceError, match="defined twice"):
        Space([Bool("a"), Bool("a")])


def test_optuna_define_by_run_suggests_only_active_parameters():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        trial = study.ask()
        config = SPACE.suggest(trial)
        assert SPACE.validate(config) == config
        assert set(trial.params) == set(config)
        study.tell(trial, 0.0)
    assert set(SPACE.distributions()) == set(SPACE.names)


def test_structure_for_vector_optimisers():
    assert SPACE.categorical_dims == {0: 3, 6: 2, 7: 3}
    assert SPACE.integer_dims == {1: 64, 3: 30, 5: 11}
    X = SPACE.snap(np.random.default_rng(0).random((5, SPACE.dim)))
    assert np.allclose(SPACE.snap(X), X)
