"""BoTorch pieces shared by surrogate-assisted strategies: the space as BoTorch sees it, GP
models built from encoded configurations, cheap objectives as deterministic models, and
acquisition optimisation over mixed (continuous, integer, categorical, conditional) spaces.

Conventions (all tensors are float64 on the CPU):

- Inputs are the space's own encoding, ``X`` of shape ``(n, d)`` in ``[0, 1]^d`` (see
  ``qd.space``). It already is the unit cube, so no ``Normalize`` input transform is needed.
- Integer coordinates hold bin centres: the GP treats them as ordinal (continuous kernel),
  the optimiser as discrete values. Categorical coordinates hold index-bin centres
  ``(k + 0.5) / n``: the GP (``MixedSingleTaskGP``) compares them with a categorical
  (Hamming) kernel, the optimiser enumerates them.
- Conditional parameters: an inactive coordinate is the 0.5 placeholder. The GP sees the
  encoded vectors (the common flattening of a hierarchical space) through a
  ``ConditionalProjection`` input transform that sets inactive coordinates to 0.5, so the
  acquisition function scores a candidate exactly as the configuration it decodes to, and an
  inactive coordinate has no gradient (the optimiser leaves it alone).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import math

import moocore
import numpy as np
import gpytorch
import torch
from botorch.acquisition import AcquisitionFunction
from botorch.acquisition.multi_objective import qLogNoisyExpectedHypervolumeImprovement
from botorch.acquisition.utils import _prune_inferior_shared_processing
from botorch.exceptions.errors import ModelFittingError
from botorch.exceptions.warnings import BadInitialCandidatesWarning, InputDataWarning, OptimizationWarning
from botorch.fit import fit_gpytorch_mll
from botorch.models import GenericDeterministicModel, MixedSingleTaskGP, ModelListGP, SingleTaskGP
from botorch.models.model import Model
from botorch.models.transforms.input import InputTransform
from botorch.models.transforms.outcome import Standardize
from botorch.models.utils.assorted import gpt_posterior_settings
from botorch.utils.low_rank import _reshape_base_samples
from botorch.utils.transforms import match_batch_shape
from linear_operator.utils.cholesky import psd_safe_cholesky
from linear_operator.utils.errors import NanError, NotPSDError
from botorch.optim import optimize_acqf, optimize_acqf_mixed_alternating
from botorch.optim.initializers import gen_batch_initial_conditions
from gpytorch.mlls import ExactMarginalLogLikelihood
from linear_operator.utils.warnings import NumericalWarning

from qd.strategies._kernel import disable_botorch_loader
from torch import Tensor

from qd.problem import Problem
from qd.space import INACTIVE, Categorical, Config, Int, Param, Space, config_key

# qd builds BoTorch's fused qLogNEHVI kernel itself (qd.strategies._kernel): BoTorch's own loader
# would compile it inside the asking process and wait on torch's lock file without a timeout.
disable_botorch_loader()

DTYPE = torch.float64
#: L-BFGS-B iterations of one GP fit. Continuous GPs converge in well under this; the categorical
#: kernel's hyperparameters (no priors) can drift for many hundreds of iterations without
#: changing the fit. A fit stopped here is kept (BoTorch does not retry a stopped fit), and the
#: next fit is warm-started from it.
FIT_MAXITER = 200
FIT_OPTIONS = {"options": {"maxiter": FIT_MAXITER}}
#: Integer parameters with more values than this are optimised as continuous, then snapped.
MAX_ENUMERATED_INT_VALUES = 1000
#: Start candidates sprayed around the incumbents by the mixed optimiser, in all (see
#: ``optimize_candidate``); none once the pruned baseline has more points than this.
SPRAY_BUDGET = 64
#: The mixed optimiser's convergence test: an alternation that improves a start's log-acquisition
#: by less than this ends that start (see ``optimize_candidate``).
MIXED_TOL = 1e-2
#: Warnings BoTorch raises during routine fitting and optimisation, not actionable by a user.
QUIET_WARNINGS: tuple[type[Warning], ...] = (OptimizationWarning, BadInitialCandidatesWarning, InputDataWarning,
                                             NumericalWarning)


@contextmanager
def quiet() -> Iterator[None]:
    """Silence BoTorch's routine warnings (a restart of L-BFGS-B that stopped early, and the like)."""
    with warnings.catch_warnings():
        for category in QUIET_WARNINGS:
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("ignore", message="Optimization failed",
                                category=RuntimeWarning)
        yield


def as_tensor(x: np.ndarray | Sequence[Sequence[float]]) -> Tensor:
    """Array-like of shape (n, d) -> float64 tensor of shape (n, d)."""
    return torch.as_tensor(np.asarray(x, dtype=float), dtype=DTYPE)


def _parent_decoder(param: Param, allowed: Sequence[Any]) -> Callable[[np.ndarray], np.ndarray]:
    """A vectorised test ``u (n,) -> bool (n,)``: does the coordinate decode to an allowed value?"""
    if isinstance(param, Categorical):
        n = len(param.choices)
        ok = np.zeros(n, dtype=bool)
        ok[[param.index(v) for v in allowed]] = True
        # Categorical.decode: choices[min(int(clip(u) * n), n - 1)]
        return lambda u: ok[np.minimum((np.clip(u, 0.0, 1.0) * n).astype(int), n - 1)]
    values = [param.check(v) for v in allowed]
    decode = np.vectorize(param.decode, otypes=[float])
    return lambda u: np.isin(decode(u), values)


class ConditionalProjection(InputTransform):
    """Sets the coordinates of inactive parameters to the 0.5 placeholder.

    ``X`` of shape ``batch x n x d`` -> same shape. Which parameters are active depends only on
    the parents' coordinates, through piecewise-constant decoding, so the mask is computed
    without gradient; active coordinates pass through with their gradient, inactive ones get
    none. Idempotent, so it is applied to training inputs too (they are already projected).
    """

    is_one_to_many = False

    def __init__(self, space: Space):
        super().__init__()
        self.transform_on_train = True
        self.transform_on_eval = True
        self.transform_on_fantasize = True
        self._space = space
        index = {p.name: i for i, p in enumerate(space.params)}
        # (child index, [(parent index, test), ...]) in space order: parents come first.
        self._rules: list[tuple[int, list[tuple[int, Callable[[np.ndarray], np.ndarray]]]]] = [
            (i, [(index[parent], _parent_decoder(space[parent], values)) for parent, values in p.active_if.items()])
            for i, p in enumerate(space.params) if p.active_if
        ]

    def active_mask(self, X: Tensor) -> Tensor:
        """``batch x n x d`` -> bool tensor of the same shape, True where the parameter is active."""
        flat = X.detach().reshape(-1, X.shape[-1]).cpu().numpy()
        active = np.ones(flat.shape, dtype=bool)
        for child, parents in self._rules:
            ok = np.ones(len(flat), dtype=bool)
            for parent, test in parents:
                ok &= active[:, parent] & test(flat[:, parent])
            active[:, child] = ok
        return torch.as_tensor(active, device=X.device).reshape(X.shape)

    def transform(self, X: Tensor) -> Tensor:
        return torch.where(self.active_mask(X), X, torch.full_like(X, INACTIVE))

    def equals(self, other: InputTransform) -> bool:
        return isinstance(other, ConditionalProjection) and other._space is self._space


class SpaceGeometry:
    """A ``Space`` as BoTorch's optimisers see it.

    Attributes:
        bounds: ``2 x d``; for an integer or categorical coordinate, its lowest and highest
            encoded value (BoTorch's mixed optimiser wants discrete values to span the bounds).
        discrete_dims: integer coordinate -> its sorted encoded values (ordinal).
        cat_dims: categorical coordinate -> its encoded values (unordered).
        fixed_features: coordinates with a single possible value -> that value.
        projection: the conditional projection, or None for a space without conditions.
    """

    def __init__(self, space: Space):
        self.space = space
        self.dim = space.dim
        lower, upper = np.zeros(self.dim), np.ones(self.dim)
        self.discrete_dims: dict[int, list[float]] = {}
        self.cat_dims: dict[int, list[float]] = {}
        self.fixed_features: dict[int, float] = {}
        for i, p in enumerate(space.params):
            if isinstance(p, Categorical):
                values = [(k + 0.5) / len(p.choices) for k in range(len(p.choices))]
            elif isinstance(p, Int) and p.high - p.low < MAX_ENUMERATED_INT_VALUES:
                values = sorted({p.encode(v) for v in range(p.low, p.high + 1)})
            else:
                continue
            lower[i], upper[i] = values[0], values[-1]
            if len(values) == 1:
                self.fixed_features[i] = values[0]
            elif isinstance(p, Categorical):
                self.cat_dims[i] = values
            else:
                self.discrete_dims[i] = values
        self.bounds = torch.tensor(np.stack([lower, upper]), dtype=DTYPE)
        self.projection = ConditionalProjection(space) if space.is_conditional else None

    @property
    def is_continuous(self) -> bool:
        return not self.discrete_dims and not self.cat_dims

    @property
    def has_categoricals(self) -> bool:
        return bool(self.cat_dims)

    def encode(self, configs: Sequence[Config]) -> Tensor:
        """n configs -> ``n x d``."""
        return as_tensor(self.space.encode_many(configs)) if configs else torch.empty(0, self.dim, dtype=DTYPE)

    def decode(self, X: Tensor) -> list[Config]:
        """``n x d`` -> n configs."""
        return self.space.decode_many(X.detach().cpu().numpy())

    def snap(self, X: Tensor) -> Tensor:
        """``n x d`` -> ``n x d``: the vectors of the configurations ``X`` decodes to."""
        return as_tensor(self.space.snap(X.detach().cpu().numpy()))


def make_gp(X: Tensor, Y: Tensor, geometry: SpaceGeometry, Yvar: Tensor | None = None) -> SingleTaskGP:
    """An unfitted GP on ``X`` (``n x d``) and ``Y`` (``n x m``), with the kernel ``geometry`` calls for."""
    kwargs: dict[str, Any] = {"train_Yvar": Yvar, "outcome_transform": Standardize(m=Y.shape[-1]),
                              "input_transform": geometry.projection}
    if geometry.has_categoricals:
        return MixedSingleTaskGP(X, Y, cat_dims=sorted(geometry.cat_dims), **kwargs)
    return SingleTaskGP(X, Y, **kwargs)


def fit_gp(
    X: Tensor,
    Y: Tensor,
    geometry: SpaceGeometry,
    Yvar: Tensor | None = None,
    warm_start: dict[str, Tensor] | None = None,
) -> SingleTaskGP:
    """Fit a GP with one output per column of ``Y``.

    Args:
        X: ``n x d`` encoded inputs.
        Y: ``n x m`` outcomes (any units; standardised inside the model).
        geometry: decides the kernel (``MixedSingleTaskGP`` when there are categoricals) and the
            conditional projection.
        Yvar: ``n x m`` known observation noise variances, or None to infer a noise level.
        warm_start: hyperparameters of a previous fit of the same shape (``hyperparameters``),
            used as the starting point of this fit: refits stay quick as data accumulate.

    Returns:
        The fitted model, in eval mode.
    """
    model = make_gp(X, Y, geometry, Yvar)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    if warm_start is not None:
        try:
            model.load_state_dict(warm_start, strict=False)
        except RuntimeError:  # shapes changed (another output count): start from the defaults
            model.load_state_dict(initial)
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    try:
        fit_gpytorch_mll(mll, optimizer_kwargs=FIT_OPTIONS)
    except ModelFittingError:
        if warm_start is None:
            raise
        model.load_state_dict(initial)  # a bad warm start: refit from the defaults
        fit_gpytorch_mll(mll, optimizer_kwargs=FIT_OPTIONS)
    return model.eval()


def hyperparameters(model: Model) -> dict[str, Tensor]:
    """The learned parameters of a fitted GP (not its transforms' data statistics), for warm starts."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.startswith(("outcome_transform", "input_transform"))}


def batched_gp(gps: Sequence[SingleTaskGP], X: Tensor, Y: Tensor, geometry: SpaceGeometry,
               Yvar: Tensor | None = None) -> SingleTaskGP | None:
    """One multi-output GP (batched kernel, one output per column of ``Y``) holding the
    hyperparameters of the fitted single-output ``gps`` (one per column, all on ``X``).

    The same posterior as a ``ModelListGP`` of ``gps``, at about half the cost per acquisition
    evaluation: one pass through GPyTorch's layers for all outputs instead of one per output
    (that overhead, not arithmetic, is most of an evaluation at a few candidates).

    Returns:
        The model in eval mode, or None when the parameters do not map one to one (a model of
        another structure): then keep the ``ModelListGP``.
    """
    model = make_gp(X, Y, geometry, Yvar)
    singles = [hyperparameters(gp) for gp in gps]
    state = {}
    for key, target in model.state_dict().items():
        if key.startswith(("outcome_transform", "input_transform")):
            continue
        values = [single.get(key) for single in singles]
        if any(v is None for v in values):
            return None
        if target.shape == (len(values), *values[0].shape):
            state[key] = torch.stack(values)
        elif target.shape == values[0].shape and all(torch.equal(values[0], v) for v in values):
            state[key] = values[0]
        else:
            return None
    model.load_state_dict(state, strict=False)
    return model.eval()


class WarmFits:
    """Single-output GPs kept per name and refitted as data grow, warm-started from their last fit.

    A warm start makes a refit take a few L-BFGS steps; a cold fit whenever the data have grown
    by ``growth`` since the last cold one keeps a poor early optimum from sticking. With
    ``hyper_growth``, hyperparameters are re-optimised only once the data have grown by that factor
    since the last optimisation; in between, the GP conditions on the new data with the last
    hyperparameters (no optimisation: milliseconds instead of a fit).
    """

    def __init__(self, geometry: SpaceGeometry, growth: float = 1.25, hyper_growth: float | None = None):
        self.geometry, self.growth, self.hyper_growth = geometry, float(growth), hyper_growth
        self._warm: dict[str, dict[str, Tensor]] = {}
        self._cold_size: dict[str, int] = {}
        self._hyper_size: dict[str, int] = {}
        #: Hyperparameter optimisations so far (all keys): unchanged means every model since kept
        #: its hyperparameters, so what was derived from them (a pruned baseline) still holds.
        self.optimisations = 0

    def fit(self, key: str, X: Tensor, y: Tensor, Yvar: Tensor | None = None) -> SingleTaskGP:
        """``X``: ``n x d``, ``y`` (and ``Yvar``): ``n x 1`` -> a fitted GP in eval mode."""
        warm = self._warm.get(key)
        if warm is not None and self.hyper_growth is not None \
                and len(X) < self.hyper_growth * self._hyper_size.get(key, 0):
            gp = make_gp(X, y, self.geometry, Yvar)
            gp.load_state_dict(warm, strict=False)
            return gp.eval()
        cold = len(X) >= self.growth * self._cold_size.get(key, 0)
        gp = fit_gp(X, y, self.geometry, Yvar=Yvar, warm_start=None if cold else warm)
        if cold:
            self._cold_size[key] = len(X)
        self._hyper_size[key] = len(X)
        self.optimisations += 1
        self._warm[key] = hyperparameters(gp)
        return gp


class CheapValues:
    """Problem.cheap_values as a batched function of encoded inputs, memoised per configuration.

    ``X`` of shape ``batch x q x d`` -> ``batch x q x k`` values of the ``names`` objectives,
    multiplied by ``factors`` (e.g. -1 for a minimised objective, so that larger is better). Candidates are decoded first, so inactive and off-grid coordinates do not matter.
    """

    def __init__(self, problem: Problem, names: Sequence[str], factors: Sequence[float], cache_size: int = 100_000):
        self.problem = problem
        self.names = list(names)
        self.factors = torch.tensor(list(factors), dtype=DTYPE)
        self.cache_size = cache_size
        self._cache: OrderedDict[Any, list[float]] = OrderedDict()
        self._by_row: dict[bytes, list[float]] = {}  # encoded row (exact bytes) -> values
        self.calls = 0  # calls into the problem (cache misses)

    def _values(self, config: Config) -> list[float]:
        # A decoded configuration is valid and its keys come in the space's order, so its items
        # identify it; Space.key (validate, encode) costs more than most cheap objectives.
        key: Any = tuple(config.items())
        try:
            hit = self._cache.get(key)
        except TypeError:  # an unhashable categorical choice
            key = self.problem.space.key(config)
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        self.calls += 1
        got = self.problem.cheap_values(config)
        missing = [n for n in self.names if n not in got]
        if missing:
            raise ValueError(f"{type(self.problem).__name__}.cheap_values() lacks objective(s) {missing}; "
                             f"it returned {sorted(got)}")
        row = [float(got[n]) for n in self.names]
        self._cache[key] = row
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return row

    def __call__(self, X: Tensor) -> Tensor:
        flat = X.detach().reshape(-1, X.shape[-1]).cpu().numpy()
        # Most rows recur exactly (NEHVI appends the whole baseline to every candidate batch; the
        # mixed optimiser re-scores neighbours): look those up by their bytes before decoding.
        rows: list[list[float] | None] = [self._by_row.get(r.tobytes()) for r in flat]
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            for i, config in zip(missing, self.problem.space.decode_many(flat[missing])):
                rows[i] = self._by_row[flat[i].tobytes()] = self._values(config)
            while len(self._by_row) > self.cache_size:
                self._by_row.pop(next(iter(self._by_row)))
        out = torch.tensor(rows, dtype=DTYPE).reshape(*X.shape[:-1], len(self.names))
        return out * self.factors.to(out)

    def model(self) -> GenericDeterministicModel:
        return GenericDeterministicModel(self, num_outputs=len(self.names))


def optimize_candidate(
    acqf: AcquisitionFunction,
    geometry: SpaceGeometry,
    *,
    num_restarts: int,
    raw_samples: int,
    maxiter: int = 100,
    local_starts: bool = True,
    init_acqf: AcquisitionFunction | None = None,
    relax_integers: bool = True,
) -> Tensor:
    """Maximise ``acqf`` for one candidate over the space; return it snapped, shape ``1 x d``.

    Continuous spaces use ``optimize_acqf`` (L-BFGS-B from the best of ``raw_samples`` Sobol
    points); spaces with integers or categoricals use ``optimize_acqf_mixed_alternating``
    (alternating discrete neighbourhood search and continuous L-BFGS-B steps). With
    ``local_starts``, start points are also drawn close to the incumbents (the modelled Pareto
    set or best points of ``X_baseline``): space-filling points alone rarely land close enough
    to refine a front that is already good (the last digits of hypervolume are won there).
    ``init_acqf`` (continuous spaces): a cheaper estimate of ``acqf`` (fewer Monte-Carlo
    samples) to choose the start points with; scoring the raw samples is most of the cost.
    ``relax_integers`` (mixed spaces): integers of more than 20 values are optimised as
    continuous (BoTorch's default), else every integer is searched by discrete steps. Relaxing
    is quicker for a smooth acquisition, but where the acquisition is piecewise constant along
    such an integer (a cheap objective computed on the decoded configuration) L-BFGS-B's line
    searches fail, at up to 20 evaluations an iteration.
    """
    with quiet():
        if geometry.is_continuous:
            options = {"maxiter": maxiter, "sample_around_best": local_starts}
            X0 = None
            if init_acqf is not None:
                X0 = gen_batch_initial_conditions(init_acqf, geometry.bounds, q=1, num_restarts=num_restarts,
                                                  raw_samples=raw_samples,
                                                  fixed_features=geometry.fixed_features or None, options=options)
            X, _ = optimize_acqf(acqf, geometry.bounds, q=1, num_restarts=num_restarts, raw_samples=raw_samples,
                                 fixed_features=geometry.fixed_features or None, options=options,
                                 batch_initial_conditions=X0)
        else:
            # BoTorch sprays ``num_spray_points`` around EACH point of the acquisition's
            # baseline (the pruned Pareto set): 20 per point made 1,520 start candidates at 76
            # baseline points, scored in one batch (80% of an ask). Spread a fixed budget
            # over the baseline instead (at least one per point while it is small).
            n_baseline = len(getattr(acqf, "X_baseline", ()))
            spray = max(1, round(SPRAY_BUDGET / n_baseline)) if local_starts and 0 < n_baseline <= SPRAY_BUDGET else 0
            X, _ = optimize_acqf_mixed_alternating(
                acqf, geometry.bounds, discrete_dims=geometry.discrete_dims, cat_dims=geometry.cat_dims,
                q=1, num_restarts=num_restarts, raw_samples=raw_samples,
                fixed_features=geometry.fixed_features or None,
                # Start points: the best of the raw Sobol points (rounded) and of points sprayed
                # around the incumbents; a continuous relaxation to seed them cost most of an ask
                # (L-BFGS-B on every restart) for starts the alternating search reaches anyway.
                # Each continuous step is a batched L-BFGS-B run (a forward and backward pass per
                # iteration, most of the cost of an ask). A start stops alternating once an
                # alternation gains less than ``MIXED_TOL`` in log-acquisition (0.01: 1% of the
                # improvement): with 4 L-BFGS-B iterations per step, the same optima as
                # BoTorch's 1e-8 on mixed-conditional-2 (200 observations) and mixed-int (100) in
                # 50-60% of the time; 8 iterations cost up to 1.6 times more on
                # mixed-conditional-3 (a cheap objective is piecewise constant along the
                # relaxed integer `width`) for the same optima.
                options={"initialization_strategy": "random", "maxiter_continuous": 4, "maxiter_alternating": 8,
                         "tol": MIXED_TOL, "num_spray_points": spray,
                         **({} if relax_integers else {"max_discrete_values": MAX_ENUMERATED_INT_VALUES})},
            )
    return geometry.snap(X.reshape(1, -1))


def non_dominated(Y: Tensor) -> Tensor:
    """``S x n x m`` (maximised) -> ``S x n`` bool: non-dominated within each of the ``S`` sets.

    BoTorch's ``is_non_dominated`` compares all pairs, or loops over points in Python beyond
    5 MB (2048 posterior samples of 200 points already): seconds per call. Two objectives take
    a sort and a running maximum; more take moocore per set. Of identical points one is kept.
    """
    S, n, m = Y.shape
    if m == 2:
        order = torch.argsort(Y[..., 1], dim=-1, descending=True, stable=True)
        order = order.gather(-1, torch.argsort(Y[..., 0].gather(-1, order), dim=-1, descending=True, stable=True))
        y1 = Y[..., 1].gather(-1, order)
        best_before = torch.cat([torch.full_like(y1[..., :1], -math.inf), y1.cummax(dim=-1).values[..., :-1]], -1)
        keep_sorted = (y1 > best_before) & ~Y.gather(-2, order.unsqueeze(-1).expand(-1, -1, m)).isnan().any(-1)
        return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    Yn = Y.detach().cpu().numpy()
    out = np.zeros((S, n), dtype=bool)
    for k in range(S):
        ok = ~np.isnan(Yn[k]).any(-1)
        idx = np.flatnonzero(ok)
        if len(idx):
            out[k, idx] = moocore.is_nondominated(Yn[k, idx], maximise=True, keep_weakly=False)
    return torch.as_tensor(out)


def prune_baseline(model: Model, X: Tensor, ref_point: Tensor, objective: Any = None,
                   constraints: list[Callable[[Tensor], Tensor]] | None = None, num_samples: int = 2048) -> Tensor:
    """The points of ``X`` (``n x d``) that may be Pareto optimal: ``n' x d``.

    What ``prune_inferior_points_multi_objective`` (qLogNEHVI's ``prune_baseline``) computes,
    with ``non_dominated`` instead of BoTorch's pairwise test: the points that are feasible,
    better than ``ref_point`` and non-dominated in at least one of ``num_samples`` joint
    posterior samples.
    """
    _, obj_vals, infeas = _prune_inferior_shared_processing(model=model, X=X, is_moo=True, objective=objective,
                                                            constraints=constraints, num_samples=num_samples)
    if infeas.any():
        obj_vals[infeas] = ref_point
    obj_vals = obj_vals.reshape(-1, *obj_vals.shape[-2:])
    mask = non_dominated(obj_vals) & (obj_vals > ref_point).all(dim=-1)
    idcs = mask.any(dim=0).nonzero().view(-1)
    return X[idcs] if len(idcs) else X


class _CandidateTerms:
    """The posterior terms of one exact GP (a ``SingleTaskGP``, one or several batched outputs)
    that involve candidates, jointly with a fixed baseline whose own terms are computed once.

    With ``S`` (the GP's cached root, ``S S^T = (K_TT + noise)^-1``, GPyTorch's ``covar_cache``)
    and ``R_B = K_BT S``, the joint posterior's new blocks at candidates ``X`` are
    ``cov(X, B) = K_XB - R_X R_B^T`` and ``cov(X, X) = K_XX - R_X R_X^T`` with ``R_X = K_XT S``,
    and the mean is ``mu(X) + K_XT alpha`` (GPyTorch's ``mean_cache``): the equations GPyTorch
    evaluates for the whole ``[B; X]`` at every call, here with the GP's own kernel, mean and
    caches, so only the ``q`` candidate rows are computed per evaluation.
    """

    def __init__(self, gp: SingleTaskGP, X_baseline: Tensor):
        """
        Args:
            gp: a fitted GP in eval mode (several outputs as a batched kernel, or one).
            X_baseline: ``nb x d``, the acquisition's baseline (with any cached pending points).
        """
        with torch.no_grad(), gpt_posterior_settings():
            if getattr(gp, "prediction_strategy", None) is None:  # built by the acquisition's first posterior, usually
                gp.posterior(X_baseline[:1])
            strategy = gp.prediction_strategy
            self.gp = gp
            self.batched = gp._num_outputs > 1
            self.train = gp.train_inputs[0]  # (m x) n x d, already transformed
            n = self.n = self.train.shape[-2]
            # With an output dimension also for one output: m x n, m x n x n, m x nb x n.
            self.alpha = strategy.mean_cache.detach().reshape(-1, n)
            self.root = strategy.covar_cache.detach().reshape(-1, n, n)
            B = self._inputs(X_baseline)
            self.nb = B.shape[-2]
            K_BT = gp.covar_module(B, self.train).to_dense().reshape(-1, self.nb, n)
            self.R_B = K_BT @ self.root
            # train and baseline points as one kernel argument: one kernel call per evaluation
            self.points = torch.cat([self.train, B.expand(*self.train.shape[:-2], *B.shape[-2:])], dim=-2)
        tf = getattr(gp, "outcome_transform", None)
        self.offset, self.scale = (None, None) if tf is None else (tf.means.reshape(-1), tf.stdvs.reshape(-1))  # m

    def _inputs(self, X: Tensor) -> Tensor:
        X = self.gp.transform_inputs(X)
        return X.unsqueeze(-3) if self.batched else X  # an output batch dimension, as BoTorch's posterior

    def __call__(self, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The candidates' part of the joint posterior of ``[X_baseline; X]``, in the outcomes' units.

        Args:
            X: ``b x q x d`` candidates (untransformed, as the acquisition function gets them).

        Returns:
            The mean at ``X`` (``b x m x q``), ``cov(X, X_baseline)`` (``b x m x q x nb``) and
            ``cov(X, X)`` (``b x m x q x q``), one block per output ``m``.
        """
        gp, n, nb = self.gp, self.n, self.nb
        b, q = X.shape[:2]
        Xt = self._inputs(X)
        batch = torch.broadcast_shapes(Xt.shape[:-2], self.points.shape[:-2])
        Xt = Xt.expand(*batch, *Xt.shape[-2:])
        with gpytorch.settings.lazily_evaluate_kernels(False):  # GPyTorch's lazy kernel tensor costs more than the kernel
            K = gp.covar_module(Xt, torch.cat([self.points.expand(*batch, *self.points.shape[-2:]), Xt], dim=-2))
        K = K.to_dense().reshape(b, -1, q, n + nb + q)  # b x m x q x (n + nb + q)
        mu = gp.mean_module(Xt).reshape(b, -1, q)
        m = K.shape[1]
        # Candidates as rows (m x bq x ...): a batch of b matrix products against the cached
        # m x n x n root would copy the root b times.
        K_cross = K[..., :n + nb].transpose(0, 1).reshape(m, b * q, n + nb)
        K_XT = K_cross[..., :n]
        R_X = K_XT @ self.root  # m x bq x n
        mean = (K_XT @ self.alpha.unsqueeze(-1)).reshape(m, b, q).transpose(0, 1) + mu
        cov_XB = (K_cross[..., n:] - R_X @ self.R_B.transpose(-1, -2)).reshape(m, b, q, nb).transpose(0, 1)
        R_X = R_X.reshape(m, b, q, n).transpose(0, 1)
        cov_XX = K[..., n + nb:] - R_X @ R_X.transpose(-1, -2)
        if self.scale is not None:
            s = self.scale.unsqueeze(-1)
            mean = self.offset.unsqueeze(-1) + s * mean
            cov_XB = cov_XB * (s * s).unsqueeze(-1)
            cov_XX = cov_XX * (s * s).unsqueeze(-1)
        return mean, cov_XB, cov_XX


def _supports_candidate_terms(model: Model) -> bool:
    """Exact GPs whose posterior ``_CandidateTerms`` reproduces (else BoTorch's own path runs)."""
    if isinstance(model, ModelListGP):
        return all(_supports_candidate_terms(m) for m in model.models)
    tf = getattr(model, "outcome_transform", None)
    return (isinstance(model, SingleTaskGP) and len(model._input_batch_shape) == 0
            and not getattr(getattr(model, "input_transform", None), "is_one_to_many", False)
            and (tf is None or (type(tf) is Standardize and tf._outputs is None)))


class CachedBaselineLogNEHVI(qLogNoisyExpectedHypervolumeImprovement):
    """``qLogNoisyExpectedHypervolumeImprovement`` that does not recompute the baseline's posterior
    at every evaluation.

    BoTorch 0.18 computes the joint posterior of the whole baseline and the candidates at each
    call (its TODO in ``_compute_posterior_samples_and_concat_pending``), although with
    ``cache_root`` only the candidates' rows of it are used (``sample_cached_cholesky``). Here
    those rows come from ``_CandidateTerms`` (the baseline's terms computed once per acquisition
    function), and the samples are drawn as ``sample_cached_cholesky`` draws them, with the
    same base samples, so values agree with BoTorch's to rounding. The first evaluation (per
    candidate count) runs BoTorch's path on one candidate batch to set the sampler up and checks
    that both paths agree; on any disagreement, or for a model ``_CandidateTerms`` does not cover,
    BoTorch's path is used throughout.
    """

    _fast: tuple[Any, ...] | None = None  # (baseline_L, q_in, per-model terms, base samples, m x nb x nb L)
    _fast_failed = False

    def _compute_posterior_samples_and_concat_pending(self, X: Tensor) -> tuple[Tensor, Tensor]:
        if (self._fast_failed or not self._cache_root or not hasattr(self, "_baseline_L")
                or not _supports_candidate_terms(self.model)):
            return super()._compute_posterior_samples_and_concat_pending(X)
        X_in = X  # BoTorch's path adds the uncached pending points itself
        if self.X_pending is not None:  # pending points not in the baseline (cache_pending off): as BoTorch
            num_pending = self.X_pending.shape[-2]
            uncached = (num_pending + self._X_baseline.shape[-2] - self.X_baseline.shape[-2]
                        if self.cache_pending else num_pending)
            if uncached:
                X = torch.cat([X, match_batch_shape(self.X_pending[..., num_pending - uncached:, :], X)], dim=-2)
        q = X.shape[-2]
        fast = self._fast
        if fast is None or fast[0] is not self._baseline_L or fast[1] != q or self.q_in != q:
            if not self._set_up_fast(X):
                return super()._compute_posterior_samples_and_concat_pending(X_in)
        try:
            return self._fast_samples(X), X
        except (NanError, NotPSDError):  # as sample_cached_cholesky: BoTorch's path, which falls back to full sampling
            return super()._compute_posterior_samples_and_concat_pending(X_in)

    def _terms(self, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        parts = [t(X) for t in self._fast[2]]
        return tuple(torch.cat(p, dim=1) for p in zip(*parts)) if len(parts) > 1 else parts[0]

    def _fast_samples(self, X: Tensor) -> Tensor:
        """``batch x q x d`` -> ``sample_shape x batch x q x m`` samples at ``X`` (see ``sample_cached_cholesky``)."""
        batch, q = X.shape[:-2], X.shape[-2]
        mean, bl, br = self._terms(X.reshape(-1, q, X.shape[-1]))
        L = self._fast[4]
        bl_chol = torch.linalg.solve_triangular(L, bl.transpose(-1, -2), upper=False).transpose(-1, -2)
        br_chol = psd_safe_cholesky(br - bl_chol @ bl_chol.transpose(-1, -2), max_tries=6)
        new_Lq = torch.cat([bl_chol, br_chol], dim=-1)  # b x m x q x (nb + q)
        res = (new_Lq @ self._fast[3]).add(mean.unsqueeze(-1))  # b x m x q x S
        res = res.permute(-1, 0, -2, -3)  # S x b x q x m
        if not torch.isfinite(res).all():
            raise NanError("Samples contain nans or infs.")
        return res.reshape(*res.shape[:1], *batch, *res.shape[-2:])

    def _set_up_fast(self, X: Tensor) -> bool:
        """Set the sampler up for ``q`` candidates on one batch of ``X`` through BoTorch's path and
        check the fast path against it there; False (and BoTorch's path from now on) if they differ."""
        q = X.shape[-2]
        X1 = X.reshape(-1, q, X.shape[-1])[:1].detach()
        X_full = torch.cat([match_batch_shape(self.X_baseline, X1), X1], dim=-2)
        with torch.no_grad():
            posterior = self.model.posterior(X_full)
            self._set_sampler(q_in=q, posterior=posterior)
            reference = self._get_f_X_samples(posterior=posterior, q_in=q)
            base = _reshape_base_samples(self.sampler.base_samples, self.sampler.sample_shape, posterior)
        base = base.reshape(-1, *base.shape[-3:])[0]  # m x (nb + q) x S, the same for every batch
        L = self._baseline_L if self._baseline_L.dim() > 2 else self._baseline_L.unsqueeze(0)  # m x nb x nb
        models = self.model.models if isinstance(self.model, ModelListGP) else [self.model]
        try:
            self._fast = (self._baseline_L, q, [_CandidateTerms(m, self.X_baseline) for m in models], base, L)
            with torch.no_grad():
                got = self._fast_samples(X1)
        except (RuntimeError, ValueError, AttributeError):
            # NotPSDError, NanError: the candidates' covariance given the baseline is numerically
            # not PSD (an outcome learned almost exactly); BoTorch's path samples the joint then
            got = None
        ok = (got is not None and got.shape == reference.shape
              and torch.allclose(got, reference, rtol=1e-6, atol=1e-6 * (1 + reference.abs().max().item())))
        if not ok:
            self._fast, self._fast_failed = None, True
        return ok


def row_keys(X: Tensor) -> set[bytes]:
    """``n x d`` encoded rows -> their identities (``qd.space.config_key``), for duplicate checks."""
    return {config_key(r) for r in X.detach().cpu().numpy().reshape(-1, X.shape[-1])}


__all__ = ["DTYPE", "quiet", "CheapValues", "non_dominated", "prune_baseline", "ConditionalProjection", "SpaceGeometry", "as_tensor", "fit_gp",
           "hyperparameters", "optimize_candidate", "row_keys", "WarmFits", "make_gp", "batched_gp", "CachedBaselineLogNEHVI"]
