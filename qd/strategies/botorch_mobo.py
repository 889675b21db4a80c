"""``botorch``: Bayesian optimisation with BoTorch, for one or many objectives.

What it does on each ``ask`` once the warm-up is over:

1. Fit a GP to the complete trials: one output per expensive objective and per constraint
   (``SingleTaskGP``, or ``MixedSingleTaskGP`` with a categorical kernel when the space has
   categoricals), outcomes standardised, observation noise inferred unless ``noise`` is given.
   Minimised objectives are negated: everything is maximised inside.
2. Build the acquisition function: ``qLogNEHVI`` for 2 to 4 objectives (as
   ``CachedBaselineLogNEHVI``, see "Cost of an ask"), ``qLogNParEGO`` (a random Chebyshev
   scalarisation per candidate) beyond, ``qLogNEI`` for one objective (``acquisition`` forces a
   choice). Constraints (feasible when <= 0) are modelled outcomes passed as ``constraints``;
   the configurations being evaluated now (``pending``) are ``X_pending``, so parallel workers
   get different configurations.
3. Optimise it one candidate at a time (sequential greedy: each chosen candidate joins
   ``X_pending`` for the next), with ``optimize_acqf`` on continuous spaces and
   ``optimize_acqf_mixed_alternating`` when there are integers or categoricals, from Sobol
   points and points next to the incumbents (the modelled Pareto set), then snap it to the
   configuration it decodes to.

Details:

- Warm-up: the first ``n_init`` configurations (default ``min(2 (d + 1), 20)``) are scrambled
  Sobol points, as is every ask until two trials have completed.
- Reference point (NEHVI): the problem's ``reference_point`` if it declares one (the point its
  hypervolume is measured against), else BoTorch's ``infer_reference_point`` on the observed
  feasible front (the nadir pushed out by 10% of the range).
- Cheap objectives (``Objective(cheap=True)``) are not modelled: ``problem.cheap_values`` is
  called on each decoded candidate (memoised per configuration), so the acquisition knows them
  exactly; ``cheap_values`` should therefore be fast. With qLogNEHVI they are computed in the
  acquisition's objective (the model is the GPs alone, so BoTorch caches the baseline's
  Cholesky factor, ``cache_root``), with qLogNParEGO and qLogNEI by a ``GenericDeterministicModel``.
- Conditional spaces: the GP sees the encoded vectors, with inactive coordinates at the 0.5
  placeholder (also for candidates, through ``ConditionalProjection``).
- Failed trials are left out of the objective model. With ``avoid_failures`` (default) and at
  least one failure, a GP on a success (-1) / failure (+1) label over all finished trials is an
  extra constraint, so the acquisition is weighted by the modelled chance of not failing:
  regions that fail (out of memory at large sizes, diverging learning rates) are avoided.
- A configuration is never proposed twice (evaluated, pending or in the same batch): if the
  acquisition's optimum is one, a fresh Sobol point is used instead.
- Randomness (Sobol warm-up, MC base samples, raw samples) comes from ``seed`` and the ask
  count, so runs repeat, and a resumed run (``restore``) does not replay its first asks.

Cost of an ask (CPU): qLogNEHVI's baseline is pruned once per fit with a sort-based
non-dominance test (``prune_baseline``; BoTorch's pairwise/loop test over 2048 posterior
samples took about a second at 200 observations); on continuous spaces L-BFGS-B's start points
are chosen on a 16-sample estimate of the acquisition (``init_mc_samples``); fits are
warm-started, and hyperparameters are re-optimised only once the data grew by ``hyper_growth``
(in between the GPs condition on new data and the pruned baseline is extended, not recomputed);
cheap objectives are looked up per encoded row; with 3 or more objectives the baseline's box
decompositions are approximate (``NEHVI_ALPHA_3PLUS``); mixed spaces start the alternating
optimiser from scored Sobol and sprayed points (no continuous relaxation; 64 sprayed points in
all, ``SPRAY_BUDGET``) and stop a start once it converges (``MIXED_TOL``), from 2 starts
(``DEFAULT_EFFORT``), and search every integer by discrete steps when there are cheap objectives
(``relax_integers``); the outcome GPs are fitted one by one and evaluated as one batched GP
(``batched_gp``). qLogNEHVI does not recompute the pruned baseline's posterior at each evaluation
(BoTorch 0.18 does: the joint posterior of the whole baseline and the candidates, of which it
uses the candidates' rows; ``CachedBaselineLogNEHVI`` computes those rows alone from the
baseline's terms, cached once per acquisition function, with the same base samples, checked
against BoTorch's path at its first evaluation). At 200 observations an evaluation of one or two
candidates with its gradient now costs 5-10 ms (it was 15-40 ms); what remains is mostly
qLogNEHVI's own work over the baseline's box decompositions (MC samples x cells per candidate,
2-3 ms per candidate in a batch), so on mixed spaces scoring the 128 raw samples is about a third
of an ask. BoTorch's fused C++ qLogNEHVI kernel is
built once per environment by ``qd.strategies._kernel`` (never waited on for more than
``QD_KERNEL_TIMEOUT_S``; ``state()["kernel"]`` says which path ran). To keep the run loop going
while a proposal is computed, use the option ``background=true`` or ``ask_time_limit_s``
(``qd.background``). ``experiments/bench_mobo.py --latency`` times asks against GPSampler.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from botorch.acquisition import AcquisitionFunction
from botorch.acquisition.logei import qLogNoisyExpectedImprovement
from botorch.acquisition.multi_objective.objective import (
    GenericMCMultiOutputObjective,
    IdentityMCMultiOutputObjective,
    MCMultiOutputObjective,
)
from botorch.acquisition.multi_objective.parego import qLogNParEGO
from botorch.acquisition.objective import GenericMCObjective
from botorch.models import ModelList, ModelListGP
from botorch.models.model import Model
from botorch.sampling.get_sampler import get_sampler
from botorch.utils.multi_objective.hypervolume import infer_reference_point
from botorch.utils.multi_objective.pareto import is_non_dominated
from botorch.utils.sampling import sample_simplex
from scipy.stats import qmc
from torch import Tensor

from qd.checks import OptionError, check_bool, check_int, is_finite_number
from qd.problem import Problem, signs_of
from qd.space import Config
from qd.strategies._botorch_common import (
    DTYPE,
    CachedBaselineLogNEHVI,
    CheapValues,
    SpaceGeometry,
    as_tensor,
    optimize_candidate,
    prune_baseline,
    quiet,
    row_keys,
    WarmFits,
    batched_gp,
)
from qd.strategies._kernel import KernelStatus, default_kernel
from qd.strategy import Strategy
from qd.store import Trial

#: Up to this many objectives, qLogNEHVI; beyond, its box decompositions grow too costly: ParEGO.
NEHVI_MAX_OBJECTIVES = 4
MIN_OBSERVATIONS = 2
#: qLogNEHVI's box decompositions (one per posterior sample of the baseline, rebuilt at each ask)
#: are exact for 2 objectives; for 3 or more, an approximate partitioning with this ``alpha``
#: (cells smaller than alpha times the front's hypervolume are merged) cut their cost about
#: fourfold at 37 baseline points with 3 objectives (BoTorch's default is exact up to 4).
NEHVI_ALPHA_3PLUS = 1e-2
#: Default (num_restarts, raw_samples) by space. Measured as the log-qLogNEHVI reached on the same
#: fitted model at 180-200 observations (two optimiser seeds each): on branin-currin, 64 raw
#: samples (plus 64 around the incumbents) reached what 128 did at 0.7 times the CPU, and 40-evaluation
#: runs kept their hypervolume; on mixed spaces (mixed-conditional-2 at 200, mixed-conditional-3
#: at 30-50, mixed-int at 40-60 observations) the best of 2 starts was the best of 4 at 0.7-0.8
#: times the CPU, while 64 raw samples missed the optimum in two of six.
DEFAULT_EFFORT = {"continuous": (4, 64), "mixed": (2, 128)}
#: A GP is fitted from scratch (not warm-started) once its data have grown by this factor.
COLD_REFIT_GROWTH = 1.25
ACQUISITIONS_MULTI = ("auto", "nehvi", "parego")
ACQUISITIONS_SINGLE = ("auto", "nei")


OWNER = "strategy 'botorch'"


def _option_error(option: str, value: Any, allowed: str) -> OptionError:
    return OptionError(f"{OWNER}: option {option}={value!r} is not allowed; allowed: {allowed}")


def _noise_levels(noise: Any, problem: Problem) -> list[float | None]:
    """The ``noise`` option -> the known noise sd of each modelled outcome (None: inferred).

    Modelled outcomes: the expensive objectives, then the constraints, in declared order.
    """
    names = [o.name for o in problem.objectives if not o.cheap] + list(problem.constraints)
    allowed = ("'inferred', a number >= 0 (the known noise standard deviation of every modelled outcome), or a "
               f"mapping from outcome name to either (unnamed outcomes are inferred); outcome names: {names}")

    def level(value: Any) -> float | None:
        if isinstance(value, str) and value == "inferred":
            return None
        if is_finite_number(value) and not isinstance(value, bool) and value >= 0:
            return float(value)
        raise _option_error("noise", noise, allowed)

    if isinstance(noise, dict):
        unknown = [k for k in noise if k not in names]
        if unknown:
            raise _option_error("noise", noise, f"{allowed}; unknown name(s) {unknown}")
        return [level(noise.get(name, "inferred")) for name in names]
    return [level(noise)] * len(names)


def _column(index: int, Z: Tensor) -> Tensor:
    """Constraint callable: ``sample_shape x batch x q x outputs`` -> ``... x q`` (feasible <= 0)."""
    return Z[..., index]


def _pick(index: int, Z: Tensor, X: Tensor | None = None) -> Tensor:
    return Z[..., index]


def _with_cheap(layout: Sequence[tuple[bool, int]], cheap: CheapValues, Z: Tensor, X: Tensor) -> Tensor:
    """Objective samples with the cheap objectives computed from ``X``.

    ``Z``: ``sample_shape x batch x q x outputs`` model samples; ``X``: ``batch x q x d`` ->
    ``sample_shape x batch x q x m``; objective ``i`` is ``layout[i] = (cheap, column)``: a
    model output, or a column of ``cheap(X)``.
    """
    values = cheap(X)
    columns = [values[..., j].expand(Z.shape[:-1]) if is_cheap else Z[..., j] for is_cheap, j in layout]
    return torch.stack(columns, dim=-1)


class BoTorch(Strategy):
    """Multi-objective (and single-objective) Bayesian optimisation with BoTorch's qLogNEHVI/qLogNParEGO/qLogNEI.

    Options:
        acquisition: "auto" (qLogNEHVI up to 4 objectives, qLogNParEGO beyond, qLogNEI for one),
            "nehvi" or "parego" (several objectives), "nei" (one objective).
        n_init: Sobol warm-up size (default ``min(2 (d + 1), 20)``).
        num_restarts, raw_samples: acquisition optimisation effort (L-BFGS-B starts, and the
            Sobol points they are chosen from). Defaults: 4 and 64 on continuous spaces, 2 and
            128 on spaces with integers or categoricals (see ``DEFAULT_EFFORT``).
        mc_samples: quasi-Monte-Carlo samples of the posterior in the acquisition function.
        init_mc_samples: samples of the cheaper estimate that picks L-BFGS-B's start points among
            the raw samples (continuous spaces; most of an ask's cost is scoring them).
        noise: "inferred" (a noise level is fitted), the known noise standard deviation of
            every modelled outcome in its own units (0 for deterministic evaluations), or a
            mapping from objective or constraint name to either, e.g. ``{"f1": 15.0}`` (outcomes
            not named are inferred). Give it when it is known: with few observations an
            inferred level is mostly the prior's, a small one (on noisy branin-currin, up to 14
            observations), so the first GPs interpolate the noise.
        avoid_failures: model failures as a constraint (see the module docstring).
        hyper_growth: GP hyperparameters are re-optimised once the data have grown by this
            factor since their last optimisation (1 = at every ask); in between, the GPs
            condition on the new data with the last hyperparameters (milliseconds instead of a
            fit), and NEHVI's pruned baseline is extended with the new points, not recomputed.
    """

    name = "botorch"

    def __init__(
        self,
        problem: Problem,
        seed: int = 0,
        acquisition: str = "auto",
        n_init: int | None = None,
        num_restarts: int | None = None,
        raw_samples: int | None = None,
        mc_samples: int = 64,
        init_mc_samples: int = 16,
        noise: str | float | dict[str, str | float] = "inferred",
        avoid_failures: bool = True,
        hyper_growth: float = 1.1,
    ):
        super().__init__(problem, seed)
        m = len(problem.objectives)
        allowed = ACQUISITIONS_SINGLE if m == 1 else ACQUISITIONS_MULTI
        if acquisition not in allowed:
            raise _option_error("acquisition", acquisition,
                                f"{list(allowed)} for a problem with {m} objective{'s' if m > 1 else ''}")
        if acquisition == "auto":
            acquisition = "nei" if m == 1 else ("nehvi" if m <= NEHVI_MAX_OBJECTIVES else "parego")
        self.acquisition = acquisition
        d = self.space.dim
        self.n_init = min(2 * (d + 1), 20) if n_init is None else check_int(n_init, "n_init", OWNER, low=1)
        self.geometry = SpaceGeometry(self.space)
        effort = DEFAULT_EFFORT["continuous" if self.geometry.is_continuous else "mixed"]
        self.num_restarts = effort[0] if num_restarts is None else check_int(num_restarts, "num_restarts", OWNER, low=1)
        self.raw_samples = (max(effort[1], self.num_restarts) if raw_samples is None
                            else check_int(raw_samples, "raw_samples", OWNER, low=1))
        if self.raw_samples < self.num_restarts:
            raise _option_error("raw_samples", raw_samples, f"an integer >= num_restarts={self.num_restarts}")
        self.mc_samples = check_int(mc_samples, "mc_samples", OWNER, low=1)
        self.init_mc_samples = check_int(init_mc_samples, "init_mc_samples", OWNER, low=1)
        #: Known noise standard deviation per modelled outcome (expensive objectives, then
        #: constraints); None where it is inferred.
        self.noise_std: list[float | None] = _noise_levels(noise, problem)
        self.avoid_failures = check_bool(avoid_failures, "avoid_failures", OWNER)
        if not (is_finite_number(hyper_growth) and not isinstance(hyper_growth, bool) and hyper_growth >= 1):
            raise _option_error("hyper_growth", hyper_growth, "a number >= 1 (1: re-optimise at every ask)")
        self.hyper_growth = float(hyper_growth)

        objectives = problem.objectives
        self._to_max = -signs_of([o.direction for o in objectives])  # x this: maximised units (BoTorch maximises)
        self._expensive = [i for i, o in enumerate(objectives) if not o.cheap]
        cheap = [i for i, o in enumerate(objectives) if o.cheap]
        self._cheap = (CheapValues(problem, [objectives[i].name for i in cheap], self._to_max[cheap])
                       if cheap else None)
        self._cheap_index = cheap
        if not self._expensive and not problem.constraints:
            raise ValueError(
                f"strategy 'botorch': every objective of problem {problem.name or type(problem).__name__!r} is cheap "
                f"and it has no constraints, so there is nothing to model; allowed: a problem with at least one "
                f"objective that is not cheap, or with constraints"
            )
        self._n_constraints = len(problem.constraints)

        # Observations: encoded inputs, modelled outcomes (expensive objectives maximised, then
        # constraints), all objectives maximised (for the reference point), feasibility.
        self._X: list[np.ndarray] = []
        self._Y: list[list[float]] = []
        self._F: list[list[float]] = []
        self._feasible: list[bool] = []
        self._X_failed: list[np.ndarray] = []
        self._version = 0
        self._fitted: tuple[int, Model, list[int], list[int]] | None = None
        self._modelled: Model | None = None  # the fitted model without the cheap objectives' outputs
        self._pruned: tuple[int, int, int, Tensor] | None = None  # version, optimisations, rows, baseline
        # Independent single-output GPs (several times faster to fit here than one batched
        # multi-output GP), each warm-started from its last fit (qd.strategies._botorch_common).
        self._fits = WarmFits(self.geometry, growth=COLD_REFIT_GROWTH,
                              hyper_growth=self.hyper_growth if self.hyper_growth > 1 else None)

        self._sobol = qmc.Sobol(d=d, scramble=True, seed=seed)
        self._warmup_issued = 0
        self._asks = 0
        self.latencies: list[tuple[int, float]] = []  # (observations, seconds) of model-based asks
        self.duplicates_replaced = 0
        self.kernel: KernelStatus | None = None  # the qLogNEHVI path of the last model-based ask
        self.kernel_history: list[tuple[int, str]] = []  # (ask, path) whenever the path changed

    # --- observations ------------------------------------------------------------------------
    def tell(self, trial: Trial) -> None:
        if trial.state == "complete" and trial.values is not None:
            x = self.space.encode(trial.params)
            values = np.asarray(trial.values, dtype=float) * self._to_max
            constraints = list(trial.constraints or [])
            self._X.append(x)
            self._Y.append([*values[self._expensive].tolist(), *constraints])
            self._F.append(values.tolist())
            self._feasible.append(all(c <= 0 for c in constraints))
            self._version += 1
        elif trial.state == "failed" and not trial.stale:
            self._X_failed.append(self.space.encode(trial.params))
            self._version += 1

    def restore(self, trials: Sequence[Trial]) -> None:
        super().restore(trials)
        proposed = sum(t.origin == "strategy" for t in trials)
        self._warmup_issued = min(self.n_init, proposed)
        if proposed:  # scipy rejects fast_forward(0)
            self._sobol.fast_forward(proposed)
        self._asks += len(trials) + 1  # fresh random streams: a resumed run does not replay its asks

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"phase": "model" if self._use_model() else "sobol"}
        if self.latencies:
            out["ask_s"] = self.latencies[-1][1]
        if self.kernel is not None:
            out["kernel"] = self.kernel.path
        return out

    # --- asking ------------------------------------------------------------------------------
    def _use_model(self) -> bool:
        return self._warmup_issued >= self.n_init and len(self._X) >= MIN_OBSERVATIONS

    def _sobol_point(self, seen: set) -> Tensor:
        """One Sobol point, snapped, avoiding ``seen`` rows when possible: ``1 x d``."""
        with warnings.catch_warnings():  # Sobol prefers powers of two; any count is still low-discrepancy
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(100):
                x = self.geometry.snap(as_tensor(self._sobol.random(1)))
                if not row_keys(x) & seen:
                    break
        return x

    def ask(self, n: int, pending: Sequence[Config] = ()) -> list[Config]:
        self._asks += 1
        t0 = time.perf_counter()
        X_pending = self.geometry.encode(list(pending))
        observed = [*self._X, *self._X_failed]
        seen = row_keys(X_pending) | (row_keys(as_tensor(observed)) if observed else set())
        use_model = self._use_model()
        out: list[Config] = []
        seed = int(np.random.SeedSequence([self.seed, self._asks]).generate_state(1)[0])
        with torch.random.fork_rng(), quiet():
            torch.manual_seed(seed)
            for _ in range(n):
                x = None
                if use_model:
                    x = self._propose(X_pending)
                    if row_keys(x) & seen:
                        self.duplicates_replaced += 1
                        x = None
                if x is None:
                    x = self._sobol_point(seen)
                    if self._warmup_issued < self.n_init:
                        self._warmup_issued += 1
                seen |= row_keys(x)
                X_pending = torch.cat([X_pending, x])
                out.append(self.geometry.decode(x)[0])
        if use_model:
            self.latencies.append((len(self._X), time.perf_counter() - t0))
        return out

    def _model(self) -> tuple[Model, list[int], list[int]]:
        """The fitted model (refit when data changed) with its objective and constraint output indices.

        Outputs, in order: expensive objectives (maximised), constraints, the failure label
        (when modelled), cheap objectives (maximised, deterministic).
        """
        if self._fitted is not None and self._fitted[0] == self._version:
            return self._fitted[1:]
        X = as_tensor(self._X)
        Y = as_tensor(self._Y).reshape(len(X), -1)
        models: list[Model] = []
        objective_outputs = [0] * len(self._to_max)
        for k, i in enumerate(self._expensive):
            objective_outputs[i] = k
        constraint_outputs = list(range(len(self._expensive), Y.shape[-1]))
        # Known noise per outcome (None: inferred); one batched model needs all known or all inferred.
        Yvars = [None if sd is None else torch.full_like(Y[:, j : j + 1], max(sd**2, 1e-6))
                 for j, sd in enumerate(self.noise_std)]
        for j in range(Y.shape[-1]):
            models.append(self._fits.fit(f"outcome{j}", X, Y[:, j : j + 1], Yvars[j]))
        known = [v is not None for v in Yvars]
        if len(models) > 1 and (all(known) or not any(known)):
            # fitted one by one (faster), evaluated as one batched model (see batched_gp)
            batched = batched_gp(models, X, Y, self.geometry, torch.cat(Yvars, dim=-1) if all(known) else None)
            if batched is not None:
                models = [batched]
        n_outputs = Y.shape[-1]  # of the models so far (the batched model has several)
        if self.avoid_failures and self._X_failed:
            X_all = torch.cat([X, as_tensor(self._X_failed)])
            label = torch.cat([-torch.ones(len(X), 1, dtype=DTYPE), torch.ones(len(self._X_failed), 1, dtype=DTYPE)])
            constraint_outputs.append(n_outputs)
            models.append(self._fits.fit("failure", X_all, label, None))
            n_outputs += 1
        self._modelled = models[0] if len(models) == 1 else ModelListGP(*models)
        if self._cheap is not None:
            for k, i in enumerate(self._cheap_index):
                objective_outputs[i] = n_outputs + k
            model: Model = ModelList(*models, self._cheap.model())
        else:
            model = self._modelled
        self._fitted = (self._version, model, objective_outputs, constraint_outputs)
        return model, objective_outputs, constraint_outputs

    def reference_point(self) -> Tensor:
        """The NEHVI reference point in maximised units, shape ``(m,)``."""
        if self.problem.reference_point is not None:
            return torch.tensor(np.asarray(self.problem.reference_point, dtype=float) * self._to_max, dtype=DTYPE)
        F = as_tensor(self._F)
        feasible = torch.tensor(self._feasible)
        if feasible.any():
            F = F[feasible]
        return infer_reference_point(F[is_non_dominated(F)])

    def _acquisition(self, X_pending: Tensor, mc_samples: int | None = None,
                     weights: Tensor | None = None) -> AcquisitionFunction:
        model, objective_outputs, constraint_outputs = self._model()
        X_baseline = as_tensor(self._X)
        constraints: list[Callable[[Tensor], Tensor]] | None = (
            [partial(_column, i) for i in constraint_outputs] or None
        )
        sample_shape = torch.Size([mc_samples or self.mc_samples])
        sampler_seed = int(torch.randint(2**31 - 1, (1,)).item())
        sampler = get_sampler(model.posterior(X_baseline[:1]), sample_shape=sample_shape, seed=sampler_seed)
        pending = X_pending if len(X_pending) else None
        common = {"X_baseline": X_baseline, "sampler": sampler, "constraints": constraints, "X_pending": pending,
                  "prune_baseline": True}
        if self.acquisition == "nei":
            objective = GenericMCObjective(partial(_pick, objective_outputs[0]))
            return qLogNoisyExpectedImprovement(model, objective=objective, **common)
        objective: MCMultiOutputObjective = IdentityMCMultiOutputObjective(outcomes=objective_outputs)
        if self.acquisition == "nehvi":
            self._use_kernel()
            if self._cheap is not None:
                # Cheap objectives in the objective, not in the model: the model is then GPs
                # alone, for which qLogNEHVI caches the baseline's Cholesky factor (cache_root)
                # instead of factorising the joint covariance at every evaluation.
                model = self._modelled
                n_modelled = objective_outputs[self._cheap_index[0]]
                layout = [(j >= n_modelled, j - n_modelled if j >= n_modelled else j) for j in objective_outputs]
                objective = GenericMCMultiOutputObjective(partial(_with_cheap, layout, self._cheap))
                common["sampler"] = get_sampler(model.posterior(X_baseline[:1]), sample_shape=sample_shape,
                                                seed=sampler_seed)
            ref_point = self.reference_point()
            common["X_baseline"] = self._pruned_baseline(model, X_baseline, ref_point, objective, constraints)
            common["prune_baseline"] = False
            alpha = 0.0 if len(objective_outputs) <= 2 else NEHVI_ALPHA_3PLUS
            return CachedBaselineLogNEHVI(model, ref_point=ref_point, objective=objective, alpha=alpha, **common)
        if weights is None:
            weights = sample_simplex(len(objective_outputs), dtype=DTYPE).view(-1)
        return qLogNParEGO(model, scalarization_weights=weights, objective=objective, **common)

    def _pruned_baseline(self, model: Model, X: Tensor, ref_point: Tensor, objective: Any,
                         constraints: Any) -> Tensor:
        """The observed points that may be Pareto optimal (``prune_baseline``), once per model fit.

        While the GPs keep their hyperparameters (``hyper_growth``), the last pruned set plus the
        points observed since is used: a superset of the pruned set (a point dominated in every
        posterior sample rarely stops being so with a few more observations), at no cost.
        """
        if self._pruned is not None and self._pruned[0] == self._version:
            return self._pruned[3]
        optimisations = self._fits.optimisations
        if self._pruned is not None and self._pruned[1] == optimisations and self._pruned[2] <= len(X):
            baseline = torch.cat([self._pruned[3], X[self._pruned[2]:]])
        else:
            with torch.random.fork_rng():
                torch.manual_seed(self.seed + self._version)
                baseline = prune_baseline(model, X, ref_point, objective, constraints)
        self._pruned = (self._version, optimisations, len(X), baseline)
        return baseline

    def _use_kernel(self) -> None:
        """Decide (once per process, then on each ask while a build runs) whether qLogNEHVI runs fused."""
        self.kernel = default_kernel().ensure()
        if not self.kernel_history or self.kernel_history[-1][1] != self.kernel.path:
            self.kernel_history.append((self._asks, self.kernel.path))

    def _propose(self, X_pending: Tensor) -> Tensor:
        """One candidate given the pending ones (``k x d``): ``1 x d``, snapped."""
        acqf = self._acquisition(X_pending)
        init_acqf = None
        if self.geometry.is_continuous and self.init_mc_samples < self.mc_samples:
            state = torch.random.get_rng_state()
            init_acqf = self._acquisition(X_pending, mc_samples=self.init_mc_samples,
                                          weights=getattr(acqf, "scalarization_weights", None))
            torch.random.set_rng_state(state)  # the same random streams with or without it
        # Cheap objectives are piecewise constant along a relaxed integer: search integers as discrete.
        return optimize_candidate(acqf, self.geometry, num_restarts=self.num_restarts,
                                  raw_samples=self.raw_samples, init_acqf=init_acqf, relax_integers=self._cheap is None)
