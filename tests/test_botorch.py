"""The ``botorch`` strategy: pending points, constraints, mixed and conditional spaces, cheap
objectives, failures, options, resume. Small problems and a light optimiser keep this quick."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from qd.problem import Evaluation, Objective, Problem
from qd.space import Bool, Categorical, Float, Int, Space
from qd.store import Trial
from qd.strategies import get_strategy
from qd.strategies._botorch_common import ConditionalProjection, SpaceGeometry, as_tensor
from qd.strategies.botorch_mobo import BoTorch

torch.set_num_threads(1)
# The fused qLogNEHVI kernel takes minutes to compile on 2 cores: these tests use BoTorch's Python
# path (the kernel and its build are tested in test_kernel.py).
os.environ.setdefault("QD_FUSED_KERNEL", "0")
LIGHT = {"num_restarts": 2, "raw_samples": 64, "mc_samples": 32}


class TwoObjective(Problem):
    """f1 = x0, f2 = 1 - x0 + 2 (x1 - 0.3)^2 (front: x1 = 0.3); optional constraint 0.5 - x0 <= 0."""

    name = "two-objective"

    def __init__(self, constrained: bool = False, reference: bool = True):
        self.space = Space([Float("x0", 0.0, 1.0), Float("x1", 0.0, 1.0)])
        self.objectives = (Objective("f1"), Objective("f2"))
        self.constraints = ("x0_at_least_half",) if constrained else ()
        self.reference_point = (1.2, 3.0) if reference else None

    def evaluate(self, config, seed):
        x0, x1 = config["x0"], config["x1"]
        return Evaluation(values=[x0, 1.0 - x0 + 2.0 * (x1 - 0.3) ** 2],
                          constraints=[0.5 - x0] if self.constraints else [])


class Quadratic(Problem):
    """One objective, minimum 0 at (0.8, 0.2)."""

    name = "quadratic"

    def __init__(self):
        self.space = Space([Float("x0", 0.0, 1.0), Float("x1", 0.0, 1.0)])
        self.objectives = (Objective("loss"),)

    def evaluate(self, config, seed):
        return Evaluation(values=[(config["x0"] - 0.8) ** 2 + (config["x1"] - 0.2) ** 2])


class MixedNet(Problem):
    """An int, a categorical, a bool and a float; activation "b" is clearly best."""

    name = "mixed-net"

    def __init__(self):
        self.space = Space([Int("layers", 1, 6), Categorical("activation", ("a", "b", "c")), Bool("norm"),
                            Float("lr", 1e-4, 1e-1, log=True)])
        self.objectives = (Objective("error"), Objective("size"))

    def evaluate(self, config, seed):
        act = {"a": 0.3, "b": 0.0, "c": 0.5}[config["activation"]]
        error = act + 0.1 * (math.log10(config["lr"]) + 2.5) ** 2 + 0.3 / config["layers"] + 0.05 * config["norm"]
        return Evaluation(values=[error, config["layers"] + 0.5 * config["norm"]])


class Conditional(Problem):
    """``method`` chooses which parameters exist; ``rank`` only under "lora", ``tokens`` only under "prefix"."""

    name = "conditional-small"

    def __init__(self):
        self.space = Space([
            Categorical("method", ("lora", "prefix", "full")),
            Int("rank", 1, 16, active_if={"method": ["lora"]}),
            Bool("all_layers", active_if={"method": ["lora"]}),
            Float("ratio", 0.5, 2.0, active_if={"all_layers": [True]}),
            Int("tokens", 1, 32, active_if={"method": ["prefix"]}),
            Float("lr", 1e-5, 1e-2, log=True),
        ])
        self.objectives = (Objective("loss"), Objective("trainable"))

    def evaluate(self, config, seed):
        lr_term = 0.05 * (math.log10(config["lr"]) + 3.5) ** 2
        if config["method"] == "lora":
            r = config["rank"] * (1 + config.get("ratio", 0.0))
            return Evaluation(values=[0.3 + 0.1 * math.exp(-r / 4) + lr_term, math.log10(r * 1e-4)])
        if config["method"] == "prefix":
            return Evaluation(values=[0.35 + 0.1 * math.exp(-config["tokens"] / 8) + lr_term,
                                      math.log10(config["tokens"] * 2e-5)])
        return Evaluation(values=[0.28 + lr_term, 0.0])


class WithCheap(Problem):
    """``params`` (cheap, a function of ``width`` alone) against ``error`` (expensive)."""

    name = "with-cheap"

    def __init__(self):
        self.space = Space([Int("width", 1, 64, log=True), Float("lr", 0.0, 1.0)])
        self.objectives = (Objective("error"), Objective("params", cheap=True))
        self.reference_point = (2.0, 2.0)
        self.cheap_calls = 0

    def cheap_values(self, config):
        self.cheap_calls += 1
        return {"params": math.log2(config["width"]) / 6.0}

    def evaluate(self, config, seed):
        error = 1.0 / (1.0 + math.log2(config["width"])) + (config["lr"] - 0.3) ** 2
        return Evaluation(values=[error, self.cheap_values(config)["params"]])


def _tell(strategy: BoTorch, problem: Problem, configs, start: int = 0) -> None:
    for i, c in enumerate(configs, start=start):
        values, _, constraints = problem.normalise(problem.evaluate(c, 0))
        strategy.tell(Trial(number=i, params=c, state="complete", values=values, constraints=constraints))


def _loop(strategy: BoTorch, problem: Problem, steps: int, start: int = 0) -> list[dict]:
    """Ask one, evaluate, tell, ``steps`` times; return the asked configurations."""
    asked = []
    for k in range(steps):
        c = strategy.ask(1)[0]
        _tell(strategy, problem, [c], start=start + k)
        asked.append(c)
    return asked


def _key(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


# --- pending points -------------------------------------------------------------------------
def test_four_workers_get_four_distinct_configs_from_the_model():
    problem = TwoObjective()
    s = get_strategy("botorch", problem, seed=1, n_init=6, **LIGHT)
    _tell(s, problem, s.ask(6))
    assert s.state()["phase"] == "model"
    batch = s.ask(4)
    assert len({_key(c) for c in batch}) == 4
    # A fifth worker asking while those four run gets a fifth configuration, away from them:
    # X_pending lowers the acquisition near the pending points (no duplicate was replaced).
    fifth = s.ask(1, pending=batch)[0]
    assert _key(fifth) not in {_key(c) for c in batch}
    assert s.duplicates_replaced == 0
    X = problem.space.encode_many(batch)
    assert np.min(np.linalg.norm(X - problem.space.encode(fifth), axis=1)) > 1e-3
    assert len(s.latencies) == 2


def test_run_loop_with_four_workers_never_duplicates_a_running_config(tmp_path):
    from evaluators.inprocess import InProcessEvaluator
    from qd.run import run
    from qd.store import RunInfo, Store

    problem = TwoObjective()
    s = get_strategy("botorch", problem, seed=5, n_init=4, **LIGHT)
    seen_pending = []
    ask = s.ask

    def recording_ask(n, pending=()):
        out = ask(n, pending)
        seen_pending.append((list(pending), out))
        return out

    s.ask = recording_ask
    info = RunInfo(name="w4", problem="two-objective", problem_options={}, strategy="botorch",
                   strategy_options={}, seed=5)
    store = Store.create(f"sqlite:///{tmp_path}/w4.db", info, problem)
    report = run(problem, s, InProcessEvaluator(), store, budget=8, workers=4, progress=False)
    assert report.finished == 8
    trials = store.trials()
    assert len({_key(t.params) for t in trials}) == len(trials) == 8
    # After the first batch of 4, each ask comes while 3 others run, and proposes none of them.
    model_asks = [(p, out) for p, out in seen_pending if len(p) == 3]
    assert model_asks and len(s.latencies) >= 3
    for pending, out in model_asks:
        assert not {_key(c) for c in out} & {_key(c) for c in pending}


def test_warm_up_is_sobol_and_distinct_with_pending():
    problem = TwoObjective()
    s = get_strategy("botorch", problem, seed=0, n_init=4, **LIGHT)
    first = s.ask(2)
    second = s.ask(2, pending=first)
    assert len({_key(c) for c in first + second}) == 4
    assert s.state()["phase"] == "sobol"  # nothing has completed yet: still no model
    assert s.latencies == []


# --- constraints ----------------------------------------------------------------------------
def test_constraint_is_modelled_and_respected():
    problem = TwoObjective(constrained=True)
    s = get_strategy("botorch", problem, seed=3, n_init=6, **LIGHT)
    _tell(s, problem, s.ask(6))
    acqf = s._acquisition(torch.empty(0, 2, dtype=torch.float64))
    assert acqf.constraints is not None and len(acqf.constraints) == 1
    asked = _loop(s, problem, 8, start=6)
    feasible = [c["x0"] >= 0.5 for c in asked]
    # Half the unit square is infeasible; the modelled constraint keeps proposals out of it.
    assert sum(feasible) >= 7, asked


def test_reference_point_inferred_from_feasible_front_when_problem_has_none():
    problem = TwoObjective(reference=False)
    s = get_strategy("botorch", problem, seed=0, n_init=4, **LIGHT)
    _tell(s, problem, s.ask(4))
    ref = s.reference_point()
    F = -np.array(s._F)  # back to minimised units
    # BoTorch's rule (maximised units): nadir of the front minus 10% of its range, i.e. worse than every point.
    assert ref.shape == (2,)
    assert np.all(-ref.numpy() >= F.min(axis=0))


# --- single objective -----------------------------------------------------------------------
def test_single_objective_uses_nei_and_finds_the_minimum():
    problem = Quadratic()
    s = get_strategy("botorch", problem, seed=0, n_init=5, **LIGHT)
    assert s.acquisition == "nei"
    _tell(s, problem, s.ask(5))
    asked = _loop(s, problem, 8, start=5)
    best = min(problem.evaluate(c, 0).values[0] for c in asked)
    assert best < 1e-2, best


# --- mixed spaces ---------------------------------------------------------------------------
def test_mixed_space_geometry_and_valid_proposals():
    problem = MixedNet()
    g = SpaceGeometry(problem.space)
    assert sorted(g.discrete_dims) == [0] and sorted(g.cat_dims) == [1, 2]
    assert g.discrete_dims[0][0] == pytest.approx(problem.space["layers"].encode(1))
    assert g.cat_dims[1] == pytest.approx([1 / 6, 1 / 2, 5 / 6])
    s = get_strategy("botorch", problem, seed=0, n_init=8, **LIGHT)
    _tell(s, problem, s.ask(8))
    model, _, _ = s._model()
    # Both outcomes in one batched MixedSingleTaskGP (botorch's batched_gp), or a list of them.
    assert all(type(m).__name__ == "MixedSingleTaskGP" for m in getattr(model, "models", [model]))
    assert model.num_outputs == 2
    asked = _loop(s, problem, 4, start=8)
    for c in asked:
        assert problem.space.validate(c) == c
        assert isinstance(c["layers"], int) and c["activation"] in ("a", "b", "c")
    # The best activation ("b") is learned: the model's proposals mostly use it.
    assert sum(c["activation"] == "b" for c in asked) >= 3, asked  # 1 in 3 by chance


class Levels(Problem):
    """Integer parameters of 2, 4 and 16 levels and a float (a ZDT1-like trade-off)."""

    name = "levels"
    reference_point = (1.1, 11.0)

    def __init__(self):
        self.space = Space([Int("a", 0, 1), Int("b", 0, 3), Int("e", 0, 15), Float("x", 0.0, 1.0)])
        self.objectives = (Objective("f1"), Objective("f2"))

    def evaluate(self, config, seed):
        g = 1 + 9 * (config["a"] + abs(config["b"] / 3 - 0.5) + config["e"] / 15) / 3
        return Evaluation(values=[config["x"], g * (1 - math.sqrt(config["x"] / g))])


def test_mixed_integer_optimiser_returns_valid_levels_and_learns_the_best_ones():
    problem = Levels()
    s = get_strategy("botorch", problem, seed=0, n_init=8, **LIGHT)
    assert sorted(s.geometry.discrete_dims) == [0, 1, 2] and len(s.geometry.discrete_dims[2]) == 16
    _tell(s, problem, s.ask(8))
    asked = _loop(s, problem, 6, start=8)
    for c in asked:
        assert problem.space.validate(c) == c
        assert all(isinstance(c[k], int) for k in "abe") and 0 <= c["e"] <= 15 and 0 <= c["b"] <= 3
        x = s.geometry.encode([c])
        assert torch.equal(s.geometry.snap(x), x)  # on the integer grid, not a relaxed value
    # g is smallest at a = 0, e = 0: the model's proposals mostly go there.
    assert sum(c["a"] == 0 and c["e"] <= 3 for c in asked) >= 4, asked


def test_hyper_growth_keeps_hyperparameters_and_extends_the_pruned_baseline_until_data_grow():
    problem = TwoObjective()
    s = get_strategy("botorch", problem, seed=0, n_init=10, hyper_growth=1.5, **LIGHT)
    _tell(s, problem, s.ask(10))
    c = s.ask(1)[0]
    optimised, pruned = s._fits.optimisations, s._pruned[3]
    assert optimised == 2  # f1 and f2
    _tell(s, problem, [c], start=10)
    s.ask(1)
    assert s._fits.optimisations == optimised  # 11 < 1.5 x 10: conditioned, not refitted
    new = as_tensor([problem.space.encode(c)])
    assert torch.equal(s._pruned[3], torch.cat([pruned, new]))
    lengthscale = s._model()[0].covar_module.lengthscale  # f1 and f2 in one batched GP
    _loop(s, problem, 4, start=11)
    refitted = s._model()[0].covar_module.lengthscale
    assert len(s._X) == 15 and s._fits.optimisations > optimised  # 15 >= 1.5 x 10: refitted
    assert not torch.equal(refitted, lengthscale)
    every = get_strategy("botorch", problem, seed=0, n_init=10, hyper_growth=1, **LIGHT)
    _tell(every, problem, every.ask(10))
    _loop(every, problem, 2, start=10)
    assert every._fits.optimisations == 4  # two refits of two GPs


class ThreeWithCheap(Problem):
    """A mixed conditional space; error and latency (expensive) and params (cheap)."""

    name = "three-with-cheap"
    reference_point = (1.5, 1.5, 1.1)

    def __init__(self):
        self.space = Space([Categorical("optimizer", ("adam", "sgd")),
                            Float("momentum", 0.0, 0.99, active_if={"optimizer": ["sgd"]}),
                            Int("layers", 1, 8), Float("lr", 1e-4, 1e-1, log=True)])
        self.objectives = (Objective("error"), Objective("latency"), Objective("params", cheap=True))
        self.cheap_calls = 0

    def cheap_values(self, config):
        self.cheap_calls += 1
        return {"params": config["layers"] / 8}

    def evaluate(self, config, seed):
        error = 0.5 / config["layers"] + 0.05 * (math.log10(config["lr"]) + 2.5) ** 2 \
            + (0.1 * (config["momentum"] - 0.9) ** 2 if config["optimizer"] == "sgd" else 0.02)
        return Evaluation(values=[error, 0.1 * config["layers"] + 0.05 * (config["optimizer"] == "adam"),
                                  config["layers"] / 8])


def test_three_objectives_with_a_cheap_one_ask_with_approximate_nehvi():
    from botorch.acquisition.multi_objective import qLogNoisyExpectedHypervolumeImprovement

    from qd.strategies.botorch_mobo import NEHVI_ALPHA_3PLUS

    problem = ThreeWithCheap()
    s = get_strategy("botorch", problem, seed=0, n_init=8, **LIGHT)
    _tell(s, problem, s.ask(8))
    asked = _loop(s, problem, 2, start=8)
    assert all(problem.space.validate(c) == c for c in asked)
    acqf = s._acquisition(torch.empty(0, problem.space.dim, dtype=torch.float64))
    assert isinstance(acqf, qLogNoisyExpectedHypervolumeImprovement) and acqf.alpha == NEHVI_ALPHA_3PLUS > 0
    two = get_strategy("botorch", TwoObjective(), seed=0, n_init=5, **LIGHT)
    _tell(two, TwoObjective(), two.ask(5))
    assert two._acquisition(torch.empty(0, 2, dtype=torch.float64)).alpha == 0.0  # exact for 2


def test_cheap_values_are_looked_up_by_row_and_match_the_problem():
    from qd.strategies._botorch_common import CheapValues

    problem = WithCheap()
    cheap = CheapValues(problem, ["params"], [-1.0])
    X = torch.rand(5, 3, 2, dtype=torch.float64)
    first = cheap(X)
    calls = problem.cheap_calls
    assert calls <= 15 and torch.equal(cheap(X), first)
    assert problem.cheap_calls == calls  # the same rows again: no call, no decode
    exact = [-problem.cheap_values(c)["params"] for c in problem.space.decode_many(X.reshape(-1, 2).numpy())]
    assert torch.allclose(first.reshape(-1), torch.tensor(exact, dtype=torch.float64))


# --- conditional spaces ---------------------------------------------------------------------
def test_conditional_projection_matches_decoding():
    space = Conditional().space
    projection = ConditionalProjection(space)
    X = torch.rand(200, space.dim, dtype=torch.float64)
    P = projection.transform(X)
    snapped = as_tensor(space.snap(X.numpy()))
    inactive = snapped == 0.5
    for i, row in enumerate(X.numpy()):
        present = space.decode(row)
        for j, p in enumerate(space.params):
            if p.name in present:
                assert P[i, j] == X[i, j]  # active: unchanged (the optimiser keeps moving it)
            else:
                assert P[i, j] == 0.5 and inactive[i, j]
    # Gradient flows through active coordinates only.
    X.requires_grad_(True)
    projection.transform(X).sum().backward()
    assert torch.equal(X.grad, projection.active_mask(X).to(X.grad))


def test_conditional_space_proposals_are_valid_configs():
    problem = Conditional()
    s = get_strategy("botorch", problem, seed=2, n_init=8, **LIGHT)
    _tell(s, problem, s.ask(8))
    asked = s.ask(3)
    assert len({_key(c) for c in asked}) == 3
    for c in asked:
        assert problem.space.validate(c) == c  # inactive parameters are absent, active ones valid
    # The GP inputs hold the 0.5 placeholder for inactive parameters.
    X = np.array(s._X)
    for row in X:
        present = problem.space.decode(row)
        for j, p in enumerate(problem.space.params):
            if p.name not in present:
                assert row[j] == 0.5


# --- cheap objectives -----------------------------------------------------------------------
def test_cheap_objective_is_computed_not_modelled():
    problem = WithCheap()
    s = get_strategy("botorch", problem, seed=0, n_init=5, **LIGHT)
    _tell(s, problem, s.ask(5))
    model, objective_outputs, _ = s._model()
    kinds = [type(m).__name__ for m in model.models]
    assert kinds == ["SingleTaskGP", "GenericDeterministicModel"]  # one GP: the expensive objective
    assert objective_outputs == [0, 1]
    X = torch.rand(7, 2, dtype=torch.float64)
    with torch.no_grad():
        mean = model.posterior(X).mean[:, 1]
    exact = [-problem.cheap_values(c)["params"] for c in problem.space.decode_many(X.numpy())]
    assert torch.allclose(mean, torch.tensor(exact, dtype=torch.float64))  # maximised: negated
    before = problem.cheap_calls
    asked = _loop(s, problem, 3, start=5)
    assert problem.cheap_calls > before + 3  # candidates were scored with cheap_values
    assert all(problem.space.validate(c) == c for c in asked)


# --- failures -------------------------------------------------------------------------------

def test_nehvi_with_a_cheap_objective_models_gps_alone_and_caches_the_baseline_root():
    """The cheap objective is part of qLogNEHVI's objective, so its model is the GP alone and
    BoTorch's cached Cholesky of the baseline (cache_root) is used; the objective returns the
    exact cheap values beside the modelled samples."""
    problem = WithCheap()
    s = get_strategy("botorch", problem, seed=0, n_init=5, **LIGHT)
    _tell(s, problem, s.ask(5))
    acqf = s._acquisition(torch.empty(0, 2, dtype=torch.float64))
    assert type(acqf.model).__name__ == "SingleTaskGP" and acqf._cache_root
    X = torch.rand(3, 1, 2, dtype=torch.float64)
    samples = torch.randn(4, 3, 1, 1, dtype=torch.float64)
    obj = acqf.objective(samples, X=X)
    assert obj.shape == (4, 3, 1, 2)
    assert torch.equal(obj[..., 0], samples[..., 0])
    exact = [-problem.cheap_values(c)["params"] for c in problem.space.decode_many(X.reshape(3, 2).numpy())]
    assert torch.allclose(obj[..., 1], torch.tensor(exact, dtype=torch.float64).view(1, 3, 1).expand(4, 3, 1))
    with torch.no_grad():
        assert torch.isfinite(acqf(X)).all()

def _run_with_failures(avoid_failures: bool) -> tuple[BoTorch, list[dict]]:
    """TwoObjective where every evaluation with x0 > 0.6 fails: 10 Sobol points, then 6 model asks."""
    problem = TwoObjective()
    s = get_strategy("botorch", problem, seed=1, n_init=10, avoid_failures=avoid_failures, **LIGHT)

    def evaluate(c: dict, number: int) -> None:
        if c["x0"] > 0.6:
            s.tell(Trial(number=number, params=c, state="failed", reason="exception: boom"))
        else:
            _tell(s, problem, [c], start=number)

    for i, c in enumerate(s.ask(10)):
        evaluate(c, i)
    asked = []
    for k in range(6):
        asked.append(s.ask(1)[0])
        evaluate(asked[-1], 10 + k)
    return s, asked


def test_failed_trials_are_excluded_and_their_region_avoided():
    s, asked = _run_with_failures(avoid_failures=True)
    assert len(s._X) + len(s._X_failed) == 16 and 0 < len(s._X_failed)
    assert all(x[0] <= 0.6 for x in s._X)  # the objective GPs see complete trials only
    model, _, constraint_outputs = s._model()
    # f1 and f2 in one batched GP, then the failure label: output 2, after both of the batched model's
    assert len(model.models) == 2 and model.num_outputs == 3 and constraint_outputs == [2]
    ok = sum(c["x0"] <= 0.6 for c in asked)
    # Without the failure model the front's unexplored end (x0 > 0.6) keeps attracting proposals.
    _, blind = _run_with_failures(avoid_failures=False)
    assert ok >= 4 and ok > sum(c["x0"] <= 0.6 for c in blind), (asked, blind)



@pytest.mark.parametrize("relax", [True, False])
def test_mixed_optimiser_relaxes_large_integers_only_when_asked(relax):
    """``width`` has 64 values: relaxed, L-BFGS-B scores it between grid values; not relaxed
    (the choice with cheap objectives, piecewise constant along it), only grid values."""
    from qd.strategies._botorch_common import optimize_candidate

    problem = WithCheap()
    s = get_strategy("botorch", problem, seed=0, n_init=6, **LIGHT)
    _tell(s, problem, s.ask(6))
    acqf = s._acquisition(torch.empty(0, 2, dtype=torch.float64))
    seen = []
    acqf.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().reshape(-1, 2)[:, 0].clone()))
    x = optimize_candidate(acqf, s.geometry, num_restarts=2, raw_samples=16, relax_integers=relax)
    grid = torch.tensor(s.geometry.discrete_dims[0], dtype=torch.float64)
    widths = torch.cat(seen)
    on_grid = (widths.unsqueeze(-1) - grid).abs().min(dim=-1).values < 1e-9
    assert on_grid.all() != relax
    assert problem.space.validate(s.geometry.decode(x)[0])

# --- options, resume ------------------------------------------------------------------------
@pytest.mark.parametrize(("option", "value", "allowed"), [
    ("acquisition", "ehvi", "'auto', 'nehvi', 'parego'"),
    ("n_init", 0, "an integer >= 1"),
    ("num_restarts", 2.5, "an integer >= 1"),
    ("noise", "loud", "'inferred'"),
    ("noise", {"f3": 1.0}, "outcome names: ['f1', 'f2']"),
    ("noise", {"f1": -1.0}, "a number >= 0"),
    ("avoid_failures", "yes", "true or false"),
    ("hyper_growth", 0.5, "a number >= 1"),
    ("hyper_growth", True, "a number >= 1"),
])
def test_bad_options_name_option_value_and_allowed(option, value, allowed):
    with pytest.raises(ValueError) as e:
        get_strategy("botorch", TwoObjective(), **{option: value})
    assert option in str(e.value) and repr(value) in str(e.value) and allowed in str(e.value)



def test_acquisition_effort_defaults_by_space_and_explicit_values_win():
    from qd.strategies.botorch_mobo import DEFAULT_EFFORT

    continuous = get_strategy("botorch", TwoObjective())
    mixed = get_strategy("botorch", MixedNet())
    assert (continuous.num_restarts, continuous.raw_samples) == DEFAULT_EFFORT["continuous"]
    assert (mixed.num_restarts, mixed.raw_samples) == DEFAULT_EFFORT["mixed"]
    many = get_strategy("botorch", TwoObjective(), num_restarts=100)
    assert (many.num_restarts, many.raw_samples) == (100, 100)  # never fewer raw samples than starts
    given = get_strategy("botorch", MixedNet(), num_restarts=3, raw_samples=40)
    assert (given.num_restarts, given.raw_samples) == (3, 40)
    with pytest.raises(ValueError, match="num_restarts=5"):
        get_strategy("botorch", TwoObjective(), num_restarts=5, raw_samples=4)

def test_noise_per_outcome_fixes_the_named_outcomes_and_infers_the_others():
    from gpytorch.likelihoods import FixedNoiseGaussianLikelihood

    problem = TwoObjective(constrained=True)
    s = get_strategy("botorch", problem, seed=0, noise={"f2": 0.5, "x0_at_least_half": 0.0})
    _tell(s, problem, s.ask(6))
    model, _, _ = s._model()
    f1, f2, constraint = model.models
    assert not isinstance(f1.likelihood, FixedNoiseGaussianLikelihood)  # inferred
    assert isinstance(f2.likelihood, FixedNoiseGaussianLikelihood)
    assert isinstance(constraint.likelihood, FixedNoiseGaussianLikelihood)
    # The known variance in the model's standardised units: 0.5^2 / (variance of the observed f2).
    f2_values = torch.tensor([y[1] for y in s._Y], dtype=torch.float64)
    assert torch.allclose(f2.likelihood.noise, 0.25 / f2_values.var())


def test_single_objective_rejects_multi_objective_acquisitions():
    with pytest.raises(ValueError, match="acquisition='nehvi'.*'auto', 'nei'"):
        get_strategy("botorch", Quadratic(), acquisition="nehvi")


def test_unknown_option_is_rejected_by_the_registry():
    with pytest.raises(ValueError, match="unknown option"):
        get_strategy("botorch", TwoObjective(), restarts=3)


def test_problem_with_only_cheap_objectives_is_refused():
    class AllCheap(WithCheap):
        def __init__(self):
            super().__init__()
            self.objectives = (Objective("params", cheap=True),)

    with pytest.raises(ValueError, match="every objective .* is cheap"):
        get_strategy("botorch", AllCheap())


def test_parego_for_many_objectives():
    from problems.dtlz import DTLZ2

    problem = DTLZ2(dim=6, n_objectives=5, measures=False)
    s = get_strategy("botorch", problem, seed=0, n_init=8, **LIGHT)
    assert s.acquisition == "parego"
    _tell(s, problem, s.ask(8))
    asked = s.ask(2)
    assert len({_key(c) for c in asked}) == 2 and s.duplicates_replaced == 0


def test_restore_continues_instead_of_repeating():
    problem = TwoObjective()
    fresh = get_strategy("botorch", problem, seed=0, n_init=6, **LIGHT)
    first = fresh.ask(3)
    history = []
    for i, c in enumerate(first):
        values, _, _ = problem.normalise(problem.evaluate(c, 0))
        history.append(Trial(number=i, params=c, state="complete", values=values))
    resumed = get_strategy("botorch", problem, seed=0, n_init=6, **LIGHT)
    resumed.restore(history)
    assert len(resumed._X) == 3
    again = resumed.ask(3)
    assert not ({_key(c) for c in again} & {_key(c) for c in first})
    assert _key(again[0]) == _key(fresh.ask(1)[0])  # the same Sobol sequence, continued


@pytest.mark.slow
def test_cli_botorch_beats_random_on_branin_currin(tmp_path):
    from qd.cli import main

    storage = f"sqlite:///{tmp_path}/runs.db"
    hv = {}
    for strategy in ("botorch", "random"):
        assert main(["run", "--problem", "branin-currin", "--strategy", strategy, "--budget", "40", "--seed", "0",
                     "--storage", storage, "--name", strategy, "--no-progress", "--evaluator", "inprocess"]) == 0
    import io
    from contextlib import redirect_stdout

    for strategy in ("botorch", "random"):
        buf = io.StringIO()
        with redirect_stdout(buf):
            main(["show", "--storage", storage, "--name", strategy, "--json"])
        hv[strategy] = json.loads(buf.getvalue())["hypervolume"]
    assert hv["botorch"] > hv["random"] + 10, hv


# --- qLogNEHVI without recomputing the baseline's posterior ----------------------------------
def _nehvi_case(case: str) -> tuple[BoTorch, torch.Tensor]:
    """A fitted strategy of each model kind the cached path covers, and its pending points."""
    if case == "near-deterministic":  # f1 = x0 is learned almost exactly: BoTorch's low-rank update fails
        s, _ = _run_with_failures(avoid_failures=True)
        return s, torch.empty(0, 2, dtype=torch.float64)
    if case == "failures":  # ModelListGP: the batched objective GP and the failure label's GP (categorical kernels)
        problem = MixedNet()
        s = get_strategy("botorch", problem, seed=3, n_init=12, **LIGHT)
        for i, c in enumerate(s.ask(12)):
            if c["layers"] > 4:
                s.tell(Trial(number=i, params=c, state="failed", reason="exception: boom"))
            else:
                _tell(s, problem, [c], start=i)
        assert s._X_failed
        return s, torch.empty(0, s.space.dim, dtype=torch.float64)
    problem = {"continuous": TwoObjective, "pending": TwoObjective, "constrained": lambda: TwoObjective(True),
               "conditional": Conditional, "cheap": WithCheap}[case]()
    s = get_strategy("botorch", problem, seed=3, n_init=10, **LIGHT)
    _tell(s, problem, s.ask(10))
    pending = s.geometry.encode(s.ask(2)) if case == "pending" else torch.empty(0, s.space.dim, dtype=torch.float64)
    return s, pending


@pytest.mark.parametrize("case", ["continuous", "pending", "constrained", "conditional", "cheap", "failures",
                                  "near-deterministic"])
def test_cached_baseline_nehvi_matches_botorch_values_and_gradients(case):
    """CachedBaselineLogNEHVI's candidate-only posterior gives BoTorch's qLogNEHVI values and
    gradients (same base samples) for batched, single-output, mixed/conditional and model-list GPs;
    where the candidates' covariance given the baseline is numerically not PSD (BoTorch then
    samples the joint posterior), BoTorch's path runs and the values are its own."""
    s, pending = _nehvi_case(case)
    torch.manual_seed(0)
    acqf = s._acquisition(pending)
    assert type(acqf).__name__ == "CachedBaselineLogNEHVI" and acqf._cache_root
    for batch in (1, 6):
        X = torch.rand(batch, 1, s.space.dim, dtype=torch.float64, requires_grad=True)
        acqf._fast_failed = False
        fast = acqf(X)
        if case != "near-deterministic":
            assert acqf._fast is not None and not acqf._fast_failed  # the cached path ran
        (g_fast,) = torch.autograd.grad(fast.sum(), X)
        acqf._fast_failed = True  # BoTorch's own path
        ref = acqf(X)
        (g_ref,) = torch.autograd.grad(ref.sum(), X)
        assert torch.allclose(fast, ref, rtol=1e-6, atol=1e-6), (fast, ref)
        assert torch.allclose(g_fast, g_ref, rtol=1e-4, atol=1e-5), (g_fast, g_ref)


def test_cached_baseline_nehvi_falls_back_to_botorch_for_other_models():
    """A model the candidate terms do not cover (here a deterministic model in a ModelList) runs
    BoTorch's path unchanged."""
    from botorch.models import GenericDeterministicModel, ModelList

    from qd.strategies._botorch_common import _supports_candidate_terms

    s, _ = _nehvi_case("continuous")
    model, _, _ = s._model()
    assert _supports_candidate_terms(model)
    assert not _supports_candidate_terms(ModelList(model, GenericDeterministicModel(lambda X: X[..., :1])))


def test_cached_baseline_nehvi_falling_back_adds_uncached_pending_points_once():
    """With pending points kept out of the baseline (``max_iep``), BoTorch's path, when the cached
    one is not used, sees each pending point once: the values are plain qLogNEHVI's."""
    from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
    from botorch.models import SingleTaskGP
    from botorch.sampling import SobolQMCNormalSampler

    from qd.strategies._botorch_common import CachedBaselineLogNEHVI

    g = torch.Generator().manual_seed(0)
    X = torch.rand(12, 2, generator=g, dtype=torch.float64)
    Y = torch.stack([X.sum(-1), (1 - X).prod(-1)], dim=-1)
    model = SingleTaskGP(X, Y).eval()
    pending = torch.rand(2, 2, generator=g, dtype=torch.float64)
    candidates = torch.rand(5, 1, 2, generator=g, dtype=torch.float64)
    values = []
    for cls in (qLogNoisyExpectedHypervolumeImprovement, CachedBaselineLogNEHVI):
        acqf = cls(model, ref_point=[0.0, 0.0], X_baseline=X, sampler=SobolQMCNormalSampler(torch.Size([32]), seed=1),
                   X_pending=pending, max_iep=2, prune_baseline=False)
        if cls is CachedBaselineLogNEHVI:
            acqf._fast_failed = True
        with torch.no_grad():
            values.append(acqf(candidates))
    assert torch.allclose(values[0], values[1]), values
