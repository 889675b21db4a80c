"""``sail``: surrogate-assisted illumination (SAIL, Gaiier et al. 2018; BOP-Elites, Kent et al. 2024).

For expensive evaluations: a few hundred evaluations should already give a good map. Each ask,
once a Sobol warm-up is over:

1. **Models.** BoTorch GPs (``qd.strategies._botorch_common``: ``SingleTaskGP``, or
   ``MixedSingleTaskGP`` when there are categoricals; warm-started refits) of the illuminated
   objective, of every measure that is not cheap, and of every constraint, on all complete
   trials. A cheap objective (``Objective(cheap=True)``) is not modelled: ``problem.cheap_values``
   is called on each candidate (a deterministic BoTorch model).
2. **Illumination of the acquisition.** MAP-Elites (pyribs Gaussian and iso-line emitters) runs
   ``generations`` iterations on a pyribs archive with the run archive's cells, seeded with the
   evaluated configurations and fresh Sobol points. A candidate ``x`` lands in the cell of its
   measures (computed when cheap, else the GP mean) and is scored by the acquisition against that
   cell's current elite ``e`` (``qd_score_offset`` for an empty cell), all in maximised units:

   - ``"ei"`` (default): BoTorch's ``LogExpectedImprovement`` with ``best_f = e``, the expected
     gain of the run's QD score if ``x`` were evaluated (BOP-Elites' per-cell improvement, with
     the cell known rather than integrated over);
   - ``"ucb"``: ``UpperConfidenceBound(beta) - e`` (SAIL's acquisition map);
   - ``"mean"``: ``PosteriorMean - e`` (the prediction map; no exploration).

   With constraints, ``"ei"`` adds the log-probability of feasibility; the others drop
   candidates that are more likely infeasible than not.
3. **Batch.** The best acquisition elites, one per cell, skipping cells that hold a pending
   evaluation and configurations evaluated, pending or chosen already: asynchronous workers get
   different cells. Candidates are snapped through ``space.snap`` as they are made, so the map
   (and the batch) holds only valid configurations of mixed and conditional spaces.

**Cheap measures.** Measures that can be computed from the configuration (a network's size and
depth, a sum of parameters) need no model. A problem says so by defining
``cheap_measures(config) -> {measure name: value}``, in the manner of ``cheap_values``; the
measures it returns are computed, the others modelled. Option ``measures="model"`` models them
all anyway (to compare with methods that must), ``"cheap"`` insists on the method.

**Several objectives.** One is illuminated (option ``objective``, default the first), as in
``map-elites``; the others are recorded (and in the Pareto set of ``qd show``), not modelled.

**Noise.** ``repeats`` evaluates each new configuration that many times (the run loop gives each
evaluation its own seed); ``reevaluate`` evaluates a configuration that becomes its cell's elite
again until it has ``1 + reevaluate`` evaluations. The archive (``EliteSpec.aggregate``, always
on for ``sail``) places and ranks a configuration by the means over its evaluations and keeps
its spread, so one lucky seed does not hold a cell; the GPs see every evaluation (noise inferred).

**Multi-fidelity.** With ``fidelity="asha"`` and a problem that names a fidelity parameter,
new configurations start at the lowest rung and promising ones are promoted (``qd.fidelity``,
ranked within archive cells first). The GPs take the fidelity as an input and candidates are
scored at the top fidelity; only top-fidelity results enter the archive (``EliteSpec.fidelity``).

**Latency.** Every model-based ask is timed (``latencies``: (observations, seconds); ``state()``
shows the last one); ``experiments/bench_sail.py`` reports them.

**Resume.** ``restore`` replays the trials (models, archive, repeat counts, rungs) and moves the
Sobol sequence and the random streams on, so a resumed run does not repeat its asks.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import torch
from botorch.acquisition.analytic import LogExpectedImprovement, PosteriorMean, UpperConfidenceBound
from botorch.models.model import Model
from ribs.archives import ArchiveBase
from ribs.emitters import EmitterBase, GaussianEmitter, IsoLineEmitter
from scipy.stats import norm, qmc

from qd.archive import EliteArchive, EliteSpec, elite_spec
from qd.checks import OptionError, check_int, check_number
from qd.fidelity import Promotions
from qd.space import config_key
from qd.problem import Problem
from qd.space import Config
from qd.store import Trial
from qd.strategies._botorch_common import CheapValues, SpaceGeometry, WarmFits, as_tensor, quiet
from qd.strategy import Strategy

ACQUISITIONS = ("ei", "ucb", "mean")
MEASURE_MODES = ("auto", "cheap", "model")
FIDELITY_MODES = (None, "asha")
MIN_OBSERVATIONS = 2
#: GP hyperparameters are re-optimised once the data have grown by this factor; in between, the
#: GPs condition on new data with the last hyperparameters (a fit costs ~0.3 s, conditioning ~ms).
HYPER_GROWTH = 1.1
#: Score for candidates dropped as likely infeasible (pyribs needs finite objectives).
DROPPED = -1e12


OWNER = "strategy 'sail'"


def _fail(option: str, value: Any, allowed: str) -> OptionError:
    return OptionError(f"{OWNER}: option {option}={value!r} is not allowed; allowed: {allowed}")



def cheap_measure_values(problem: Problem, config: Config) -> dict[str, float]:
    """``problem.cheap_measures(config)`` as measure name -> value, checked.

    Raises:
        ValueError: it returned neither a mapping of measure names nor one value per measure.
    """
    got = problem.cheap_measures(config)
    names = problem.measure_names
    if not isinstance(got, dict):
        got = dict(zip(names, got)) if len(got) == len(names) else None
    if got is None or not set(got) <= set(names):
        raise ValueError(f"{type(problem).__name__}.cheap_measures() must return a mapping of measure names "
                         f"({names}) to values, or one value per measure; got {got!r}")
    return got


def cheap_measure_indices(problem: Problem, measures: str, owner: str) -> list[int]:
    """Indices of the measures the problem computes from a configuration (``Problem.cheap_measures``):
    none when ``measures`` is "model"; "cheap" with none is an ``OptionError``."""
    space = problem.space
    known = cheap_measure_values(problem, space.decode(np.full(space.dim, 0.5))) if measures != "model" else {}
    if measures == "cheap" and not known:
        raise OptionError(f"{owner}: option measures='cheap' is not allowed; allowed: 'auto' or 'model': problem "
                          f"{problem.name or type(problem).__name__!r} knows no measure from the configuration "
                          f"(Problem.cheap_measures)")
    return [i for i, n in enumerate(problem.measure_names) if n in known]


def fill_cheap_measures(problem: Problem, configs: Sequence[Config], indices: Sequence[int], M: np.ndarray) -> None:
    """Write the computed measures ``indices`` of each of ``configs`` into the rows of ``M`` (n, k)."""
    names = problem.measure_names
    for r, config in enumerate(configs if indices else ()):
        got = cheap_measure_values(problem, config)
        for i in indices:
            M[r, i] = got[names[i]]


def new_sobol_points(sobol: qmc.Sobol, snap: Callable[[np.ndarray], np.ndarray], k: int, seen: set[bytes],
                     dim: int) -> np.ndarray:
    """(k, dim) snapped points of ``sobol`` whose identities (``config_key``) are not in ``seen``
    (nor repeated among themselves), where 100 draws find one; ``seen`` is not changed."""
    seen = set(seen)
    rows: list[np.ndarray] = []
    with warnings.catch_warnings():  # Sobol prefers powers of two; any count is still low-discrepancy
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(k):
            for _attempt in range(100):
                x = snap(sobol.random(1))[0]
                if config_key(x) not in seen:
                    break
            seen.add(config_key(x))
            rows.append(x)
    return np.array(rows).reshape(k, dim)

class Sail(Strategy):
    """Surrogate-assisted illumination: MAP-Elites on a BoTorch acquisition picks each batch.

    Options (see the module docstring):
        acquisition: "ei" (per-cell expected improvement, default), "ucb", "mean".
        ucb_beta: UCB's beta (the bound is ``mean + sqrt(beta) * std``).
        n_init: Sobol warm-up size (default ``min(2 (d + 1), 20)``).
        measures: "auto" (cheap when the problem defines ``cheap_measures``), "cheap", "model".
        generations, emitters, emitter_batch, sigma: the acquisition MAP-Elites (iterations per ask,
            pyribs emitters alternating Gaussian and iso-line, candidates per emitter and iteration,
            mutation step in encoded units).
        repeats, reevaluate: evaluations of each new configuration; extra ones of a new elite.
        fidelity, eta, min_fidelity: ``"asha"`` for multi-fidelity promotion (``qd.fidelity``).
        archive, bins, cells, objective, qd_score_offset: the archive, as for ``map-elites``.
    """

    name: ClassVar[str] = "sail"

    def __init__(self, problem: Problem, seed: int = 0, *, acquisition: str = "ei", ucb_beta: float = 4.0,
                 n_init: int | None = None, measures: str = "auto", generations: int = 30, emitters: int = 4,
                 emitter_batch: int = 64, sigma: float = 0.1, repeats: int = 1, reevaluate: int = 0,
                 fidelity: str | None = None, eta: float = 3, min_fidelity: float | None = None,
                 archive: str = "grid", bins: Any = None, cells: int | None = None, objective: str | None = None,
                 qd_score_offset: float | None = None):
        super().__init__(problem, seed)
        if acquisition not in ACQUISITIONS:
            raise _fail("acquisition", acquisition, f"{list(ACQUISITIONS)}")
        if measures not in MEASURE_MODES:
            raise _fail("measures", measures, f"{list(MEASURE_MODES)}")
        if fidelity not in FIDELITY_MODES:
            raise _fail("fidelity", fidelity, "null (single fidelity) or 'asha'")
        self.acquisition, self.ucb_beta = acquisition, check_number(ucb_beta, "ucb_beta", OWNER, low=0, low_open=True)
        d = self.space.dim
        self.n_init = min(2 * (d + 1), 20) if n_init is None else check_int(n_init, "n_init", OWNER, low=1)
        self.generations = check_int(generations, "generations", OWNER, low=0)
        self.n_emitters = check_int(emitters, "emitters", OWNER, low=1)
        self.emitter_batch = check_int(emitter_batch, "emitter_batch", OWNER, low=1)
        self.sigma = check_number(sigma, "sigma", OWNER, low=0, low_open=True)
        self.repeats = check_int(repeats, "repeats", OWNER, low=1)
        self.reevaluate = check_int(reevaluate, "reevaluate", OWNER, low=0)
        self.spec: EliteSpec = self.archive_spec(problem, seed, dict(
            archive=archive, bins=bins, cells=cells, objective=objective, qd_score_offset=qd_score_offset,
            fidelity=fidelity))
        self.archive = EliteArchive(problem, self.spec)
        # The acquisition map: the same cells (CVT centroids included), nothing else.
        self._acq: ArchiveBase = EliteArchive(problem, replace(self.spec, aggregate=False, fidelity=None)).result
        self._offset = self.spec.score_factor * self.spec.qd_score_offset  # an empty cell's incumbent (maximised)

        # Measures computed from the configuration, and those modelled.
        self._cheap_measures: list[int] = cheap_measure_indices(problem, measures, OWNER)
        self._modelled_measures = [i for i in range(len(problem.measures)) if i not in self._cheap_measures]
        obj = problem.objectives[self.spec.objective_index]
        self._cheap_objective = (CheapValues(problem, [obj.name], [self.spec.score_factor]) if obj.cheap else None)

        self.promotions: Promotions | None = None
        self._fid_index: int | None = None
        if fidelity == "asha":
            self.promotions = Promotions(problem, eta=eta, min_fidelity=min_fidelity, cell_of=self._cell_of,
                                         owner="strategy 'sail'")
            self._fid_index = self.promotions.index
            self._fid_top = self.space.params[self._fid_index].encode(self.promotions.top)

        self.geometry = SpaceGeometry(self.space)
        self._fits = WarmFits(self.geometry, hyper_growth=HYPER_GROWTH)
        self._continuous = self.geometry.is_continuous and not self.space.is_conditional
        # Observations (complete trials): inputs (n, d), illuminated objective (maximised), measures, constraints.
        self._X: list[np.ndarray] = []
        self._y: list[float] = []
        self._M: list[list[float]] = []
        self._C: list[list[float]] = []
        self._version = 0
        self._models: tuple[int, dict[str, Model]] | None = None
        # Evaluation bookkeeping: by evaluation key (configuration and fidelity) and by identity.
        self._done: Counter[bytes] = Counter()
        self._target: dict[bytes, int] = {}
        self._configs: dict[bytes, Config] = {}
        self._proposed: set[bytes] = set()

        self._sobol = qmc.Sobol(d=d, scramble=True, seed=seed)
        self._warmup_issued = 0
        self._asks = 0
        self.latencies: list[tuple[int, float]] = []  # (observations, seconds) of model-based asks

    # --- archive ------------------------------------------------------------------------------
    @classmethod
    def archive_spec(cls, problem: Problem, seed: int, options: dict[str, Any]) -> EliteSpec:
        """The run's archive for ``options``: averaged repeats; only the top fidelity with ASHA."""
        kw = {k: options[k] for k in ("archive", "bins", "cells", "objective", "qd_score_offset") if k in options}
        fidelity = problem.fidelity if options.get("fidelity") == "asha" else None
        if options.get("fidelity") == "asha" and not problem.fidelity:
            raise _fail("fidelity", "asha", f"null: problem {problem.name or type(problem).__name__!r} names no "
                                            f"fidelity parameter (Problem.fidelity)")
        return elite_spec(problem, seed=seed, owner=f"strategy {cls.name!r}", aggregate=True, fidelity=fidelity, **kw)

    # --- helpers ------------------------------------------------------------------------------
    def _key(self, config: Config) -> bytes:
        """Evaluation key: the configuration with its fidelity."""
        return config_key(self.space.encode(config))

    def _identity_x(self, X: np.ndarray) -> np.ndarray:
        """(n, d) -> (n, d) with the fidelity coordinate (if any) at the top value."""
        if self._fid_index is None:
            return X
        X = np.array(X, dtype=float, copy=True)
        X[:, self._fid_index] = self._fid_top
        return X

    def _identity(self, config: Config) -> bytes:
        return config_key(self._identity_x(self.space.encode(config)[None])[0])

    def _snap(self, X: np.ndarray) -> np.ndarray:
        """(n, d) -> (n, d) vectors of valid configurations (at the top fidelity)."""
        X = np.clip(X, 0.0, 1.0) if self._continuous else self.space.snap(X)
        return self._identity_x(X)

    def _cell_of(self, trial: Trial) -> int | None:
        if not trial.measures:
            return None
        return int(self._acq.index_of(np.asarray(trial.measures, dtype=float)[None])[0])

    # --- observations -------------------------------------------------------------------------
    def tell(self, trial: Trial) -> None:
        key = self._key(trial.params)
        self._done[key] += 1
        self._configs.setdefault(key, trial.params)
        self._proposed.add(self._identity(trial.params))
        if self.promotions is not None:
            self.promotions.tell(trial)
        if trial.state != "complete" or trial.values is None:
            self._target[key] = min(self._target.get(key, 0), self._done[key])  # do not repeat a failure
            self._settle(key)
            return
        x = self.space.encode(trial.params)
        self._X.append(x)
        self._y.append(self.spec.score_factor * float(trial.values[self.spec.objective_index]))
        self._M.append(list(trial.measures or [0.0] * len(self.problem.measures)))
        self._C.append(list(trial.constraints or []))
        self._version += 1
        self.archive.add_trials([trial])
        if self.reevaluate and self.archive.takes(trial) and self._is_elite(key):
            self._target[key] = max(self._target.get(key, 0), 1 + self.reevaluate)
        self._settle(key)

    def _settle(self, key: bytes) -> None:
        if key in self._target and self._done[key] >= self._target[key]:
            del self._target[key]

    def _is_elite(self, key: bytes) -> bool:
        """Whether the configuration of ``key`` is its cell's elite (by its mean measures)."""
        if self.archive.repeats is None or key not in self.archive.repeats:
            return False
        _, measures = self.archive.repeats.mean(key)
        occupied, data = self.archive.result.retrieve(measures[None])
        return bool(occupied[0]) and config_key(data["solution"][0]) == key

    def restore(self, trials: Sequence[Trial]) -> None:
        if not trials:
            return
        for t in trials:
            if t.origin == "strategy" and t.state != "failed":  # repeats still owed when the run stopped
                key = self._key(t.params)
                self._configs.setdefault(key, t.params)
                self._target[key] = max(self._target.get(key, 0), self.repeats)
            if t.finished:
                self.tell(t)
            self._proposed.add(self._identity(t.params))
        for key in list(self._target):
            self._settle(key)
        proposed = {self._identity(t.params) for t in trials if t.origin == "strategy"}
        self._warmup_issued = min(self.n_init, len(proposed))
        self._sobol = qmc.Sobol(d=self.space.dim, scramble=True, seed=self.seed)
        if proposed:
            self._sobol.fast_forward(len(proposed))
        self._asks += len(trials) + 1  # fresh random streams: a resumed run does not replay its asks

    def state(self) -> dict[str, Any]:
        m = self.archive.metrics()
        out: dict[str, Any] = {"coverage": m["coverage"], "qd_score": m["qd_score"],
                               "phase": "model" if self._use_model() else "sobol"}
        if self.latencies:
            out["ask_s"] = self.latencies[-1][1]
        if self.promotions is not None:
            out["rungs"] = "/".join(map(str, self.promotions.counts()))
        return out

    # --- asking -------------------------------------------------------------------------------
    def _use_model(self) -> bool:
        return self._warmup_issued >= self.n_init and len(self._X) >= MIN_OBSERVATIONS

    def ask(self, n: int, pending: Sequence[Config] = ()) -> list[Config]:
        self._asks += 1
        t0 = time.perf_counter()
        in_flight = Counter(self._key(c) for c in pending)
        out: list[Config] = []
        # 1. Evaluations owed: repeats of new configurations, re-evaluations of new elites.
        for key, target in list(self._target.items()):
            owed = target - self._done[key] - in_flight[key]
            for _ in range(max(owed, 0)):
                if len(out) >= n:
                    return out
                out.append(self._configs[key])
                in_flight[key] += 1
        # 2. Promotions to higher fidelities.
        if self.promotions is not None and len(out) < n:
            for config in self.promotions.ready(math.ceil((n - len(out)) / self.repeats)):
                self._issue(config, out, n)
        # 3. New configurations: Sobol during the warm-up, then the acquisition map.
        wanted = math.ceil((n - len(out)) / self.repeats)
        if wanted <= 0:
            return out
        use_model = self._use_model()
        rng_seed = int(np.random.SeedSequence([self.seed, self._asks]).generate_state(1)[0])
        if use_model:
            X = self._from_map(wanted, pending, rng_seed)
        else:
            X = np.empty((0, self.space.dim))
        if len(X) < wanted:
            X = np.vstack([X, self._sobol_points(wanted - len(X), pending)])
        for x in X:
            config = self.space.decode(x)
            if self.promotions is not None:
                config = self.promotions.start(config)
            self._issue(config, out, n)
        if use_model:
            self.latencies.append((len(self._X), time.perf_counter() - t0))
        return out

    def _issue(self, config: Config, out: list[Config], n: int) -> None:
        key = self._key(config)
        self._configs[key] = config
        self._target[key] = max(self._target.get(key, 0), self.repeats + self._done[key])
        self._proposed.add(self._identity(config))
        for _ in range(min(self.repeats, n - len(out))):
            out.append(config)

    def _sobol_points(self, k: int, pending: Sequence[Config]) -> np.ndarray:
        """(k, d) snapped Sobol points whose configurations are new, where possible."""
        X = new_sobol_points(self._sobol, self._snap, k, self._proposed | {self._identity(c) for c in pending},
                             self.space.dim)
        self._warmup_issued = min(self.n_init, self._warmup_issued + k)
        return X

    # --- models and acquisition ---------------------------------------------------------------
    def _fitted(self) -> dict[str, Model]:
        """GPs (refit when data changed): "objective" (or the cheap model), "measure<i>", "constraint<j>"."""
        if self._models is not None and self._models[0] == self._version:
            return self._models[1]
        X = as_tensor(np.array(self._X))
        models: dict[str, Model] = {}
        with quiet():
            if self._cheap_objective is not None:
                models["objective"] = self._cheap_objective.model()
            else:
                models["objective"] = self._fits.fit("objective", X, as_tensor(np.array(self._y)[:, None]))
            M = np.array(self._M)
            for i in self._modelled_measures:
                models[f"measure{i}"] = self._fits.fit(f"measure{i}", X, as_tensor(M[:, i:i + 1]))
            C = np.array(self._C).reshape(len(self._X), -1)
            for j in range(C.shape[1]):
                models[f"constraint{j}"] = self._fits.fit(f"constraint{j}", X, as_tensor(C[:, j:j + 1]))
        self._models = (self._version, models)
        return models

    def _measures(self, X: np.ndarray, models: dict[str, Model]) -> np.ndarray:
        """(b, d) snapped candidates -> (b, k) measures: computed when cheap, else the GP mean."""
        M = np.zeros((len(X), len(self.problem.measures)))
        if self._cheap_measures:
            fill_cheap_measures(self.problem, self.space.decode_many(X), self._cheap_measures, M)
        if self._modelled_measures:
            Xt = as_tensor(X)
            with torch.no_grad():
                for i in self._modelled_measures:
                    M[:, i] = models[f"measure{i}"].posterior(Xt).mean[:, 0].numpy()
        return M

    def _score(self, X: np.ndarray, models: dict[str, Model], incumbent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(b, d) snapped candidates -> acquisition (b,) and measures (b, k) (see the module docstring)."""
        M = self._measures(X, models)
        best = torch.as_tensor(incumbent[self._acq.index_of(M)], dtype=torch.float64)
        Xt = as_tensor(X).unsqueeze(1)  # b x 1 x d
        model = models["objective"]
        with torch.no_grad(), quiet():
            if self.acquisition == "ei":
                value = LogExpectedImprovement(model, best_f=best.unsqueeze(-1))(Xt)  # best_f: b x 1, as the mean
            elif self.acquisition == "ucb":
                value = UpperConfidenceBound(model, beta=self.ucb_beta)(Xt) - best
            else:
                value = PosteriorMean(model)(Xt) - best
            value = value.numpy().astype(float)
            n_constraints = sum(k.startswith("constraint") for k in models)
            if n_constraints:
                log_feasible = np.zeros(len(X))
                for j in range(n_constraints):
                    post = models[f"constraint{j}"].posterior(Xt[:, 0])
                    mu, sd = post.mean[:, 0].numpy(), post.variance[:, 0].clamp_min(1e-12).sqrt().numpy()
                    log_feasible += norm.logcdf(-mu / sd)
                if self.acquisition == "ei":
                    value = value + log_feasible
                else:
                    value = np.where(log_feasible >= math.log(0.5), value, DROPPED)
        value = np.nan_to_num(value, nan=DROPPED, posinf=DROPPED, neginf=DROPPED)
        return np.maximum(value, DROPPED), M

    def _emitters(self, seed: int) -> list[EmitterBase]:
        d = self.space.dim
        seeds = np.random.SeedSequence([self.seed, seed]).generate_state(self.n_emitters)
        common = dict(x0=np.full(d, 0.5), bounds=[(0.0, 1.0)] * d, batch_size=self.emitter_batch)
        return [GaussianEmitter(self._acq, sigma=self.sigma, seed=int(s), **common) if i % 2 == 0 else
                IsoLineEmitter(self._acq, iso_sigma=self.sigma / 5, line_sigma=0.2, seed=int(s), **common)
                for i, s in enumerate(seeds)]

    def _from_map(self, k: int, pending: Sequence[Config], seed: int) -> np.ndarray:
        """Illuminate the acquisition; return up to ``k`` picks (k', d), one per cell, best first."""
        models = self._fitted()
        incumbent = np.full(self._acq.cells, self._offset)
        elites = self.archive.result.data(["index", "objective"])
        incumbent[elites["index"]] = elites["objective"]
        rng = np.random.default_rng(seed)

        # Seed the map: evaluated configurations (at the top fidelity) and fresh uniform points.
        self._acq.clear()
        starts = self._snap(np.vstack([np.array(self._X), rng.random((self.n_emitters * self.emitter_batch,
                                                                      self.space.dim))]))
        value, M = self._score(starts, models, incumbent)
        self._acq.add(solution=starts, objective=value, measures=M)
        emitters = self._emitters(seed)
        for _ in range(self.generations):
            asked = [e.ask() for e in emitters]
            X = self._snap(np.vstack(asked))
            value, M = self._score(X, models, incumbent)
            start = 0
            for e, batch in zip(emitters, asked):
                end = start + len(batch)
                info = self._acq.add(solution=X[start:end], objective=value[start:end], measures=M[start:end])
                e.tell(X[start:end], value[start:end], M[start:end], info)
                start = end

        # Pick: best acquisition first, one per cell, away from pending cells and known configurations.
        data = self._acq.data(["solution", "objective", "index"])
        seen = self._proposed | {self._identity(c) for c in pending}
        busy: set[int] = set()
        if pending:
            P = self._identity_x(self.space.encode_many(list(pending)))
            busy = set(self._acq.index_of(self._measures(P, models)).tolist())
        picks: list[np.ndarray] = []
        for i in np.argsort(-data["objective"], kind="stable"):
            if len(picks) >= k:
                break
            x, cell = data["solution"][i], int(data["index"][i])
            key = config_key(x)
            if cell in busy or key in seen:
                continue
            picks.append(x)
            busy.add(cell)
            seen.add(key)
        return np.array(picks).reshape(len(picks), self.space.dim)
