"""``mo-sail``: multi-objective surrogate illumination on real problems, small settings."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from problems.arm import Arm
from problems.zdt import ZDT1
from qd.checks import OptionError
from qd.strategies import get_strategy
from qd.testing import assert_new, assert_valid, config_id, evaluate

torch.set_num_threads(1)
#: A small acquisition map: quick on two shared cores.
LIGHT = {"n_init": 8, "generations": 4, "emitters": 2, "emitter_batch": 16, "bins": [5, 5]}


def told(strategy, problem, rounds: int, n: int = 4) -> list:
    trials = []
    for _ in range(rounds):
        for config in strategy.ask(n):
            trials.append(evaluate(problem, config, len(trials)))
            strategy.tell(trials[-1])
    return trials


def test_the_arm_with_two_objectives_adds_bend_and_a_reference_point():
    one, two = Arm(dof=3), Arm(dof=3, objectives=2)
    config = {"theta0": 0.5, "theta1": -0.5, "theta2": 1.0}
    a, b = one.evaluate(config, 0), two.evaluate(config, 0)
    assert len(a.values) == 1 and one.reference_point is None
    assert b.values[0] == a.values[0] and b.values[1] == pytest.approx(2.0 / 3.0)
    assert [o.direction for o in two.objectives] == ["maximize", "minimize"]
    assert two.reference_point == pytest.approx(((1 - math.pi**2) * 100, math.pi))
    batch = two.evaluate_batch(np.array([[0.5, -0.5, 1.0]]), np.zeros(1))
    assert np.allclose(batch.values, [b.values])
    with pytest.raises(OptionError, match="objectives"):
        Arm(objectives=3)


def test_asks_are_valid_and_new_on_the_two_objective_arm():
    problem = Arm(dof=4, objectives=2)
    strategy = get_strategy("mo-sail", problem, seed=0, **LIGHT)
    trials = told(strategy, problem, rounds=4)
    assert strategy.latencies, "no model-based ask after the warm-up"
    got = strategy.ask(4)
    assert_valid(problem, got)
    assert_new(got, {config_id(t.params) for t in trials})
    assert strategy.state()["phase"] == "model" and strategy.state()["moqd"] > 0


def test_a_model_batch_gains_more_moqd_than_a_random_batch():
    """After the warm-up, the batch mo-sail picks by per-cell hypervolume improvement adds more to
    the MOQD score than a uniformly random batch of the same size added to the same archive."""
    problem = ZDT1(dim=4)
    strategy = get_strategy("mo-sail", problem, seed=1, **LIGHT)
    told(strategy, problem, rounds=4)
    before = strategy.archive.metrics()["moqd_score"]
    ours, theirs = copy.deepcopy(strategy.archive), copy.deepcopy(strategy.archive)
    ours.add_trials([evaluate(problem, c, 100 + i) for i, c in enumerate(strategy.ask(8))])
    random = get_strategy("random", problem, seed=1).ask(8)
    theirs.add_trials([evaluate(problem, c, 200 + i) for i, c in enumerate(random)])
    gain, random_gain = ours.metrics()["moqd_score"] - before, theirs.metrics()["moqd_score"] - before
    assert gain > random_gain, (gain, random_gain)


def test_pending_cells_are_left_to_other_workers():
    problem = ZDT1(dim=4)
    strategy = get_strategy("mo-sail", problem, seed=0, **LIGHT)
    told(strategy, problem, rounds=3)
    first = strategy.ask(3)
    second = strategy.ask(3, pending=first)
    assert_new(second, {config_id(c) for c in first})


@pytest.mark.parametrize("options, named", [
    ({"measures": "some"}, "measures"), ({"measures": "cheap"}, "measures"), ({"ucb_beta": -1}, "ucb_beta"),
    ({"generations": -1}, "generations"), ({"emitters": 0}, "emitters"), ({"sigma": 0}, "sigma"),
    ({"front_size": 0}, "front_size"), ({"reference_point": [1.0]}, "reference_point"), ({"bins": "x"}, "bins"),
    ({"n_init": 0}, "n_init"), ({"repeats": 2}, "repeats"),
])
def test_bad_options_are_named(options, named):
    with pytest.raises(ValueError, match=named) as info:
        get_strategy("mo-sail", ZDT1(dim=4), seed=0, **options)
    assert "allowed" in str(info.value)


def test_asha_wraps_it_and_promotes_by_non_dominated_rank():
    """``fidelity="asha"`` (the wrapper every strategy takes) on a two-objective problem with a
    fidelity parameter: new configurations start at the lowest rung, promotions climb the rungs,
    and those promoted from the lowest rung are on its first non-dominated layer."""
    from moocore import pareto_rank

    from qd.fidelity import FidelityWrapper
    from qd.space import config_key
    from tests.test_fidelity_noise import Budgeted
    from tests.test_sail import drive

    problem = Budgeted(objectives=2)
    strategy = get_strategy("mo-sail", problem, seed=0, fidelity="asha", eta=3, n_init=4, generations=2,
                            emitters=2, emitter_batch=8, bins=[3, 3], reference_point=[5.0, 5.0])
    assert isinstance(strategy, FidelityWrapper) and strategy.promotions.values == [1, 3, 9, 27]
    trials = drive(strategy, problem, 30, workers=2)
    steps = [t.params["steps"] for t in trials]
    assert steps[0] == 1 and max(steps) >= 9
    rung0 = [t for t in trials if t.params["steps"] == 1]
    promoted = {config_key(problem.space.encode({**t.params, "steps": 1})) for t in trials if t.params["steps"] == 3}
    ranks = pareto_rank(np.array([t.values for t in rung0]))
    first_layer = {config_key(problem.space.encode(t.params)) for t, r in zip(rung0, ranks) if r == 0}
    assert promoted and promoted & first_layer
