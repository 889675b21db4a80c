"""``mo-sail``: multi-objective surrogate-assisted illumination (SAIL's loop on MOME's archive).

``sail`` models one objective and fills one elite per cell; ``mome`` keeps a Pareto front per
cell but learns nothing between evaluations. ``mo-sail`` keeps ``mome``'s archive (the run's
``ParetoArchive``, same options and MOQD score) and chooses each batch on models. Each ask, once
a Sobol warm-up is over:

1. **Models.** One BoTorch GP per objective (``qd.strategies._botorch_common.WarmFits``, warm
   started, ``MixedSingleTaskGP`` for categoricals), fitted in the units the hypervolume is
   measured in (the problem's scaling, ``qd.scaling``, signed so that every objective is
   minimised); one per measure that is not cheap (``Problem.cheap_measures``) and per constraint.
   A cheap objective (``Objective(cheap=True)``) is computed (``Problem.cheap_values``).
2. **Illumination of the surrogate.** MOME runs ``generations`` iterations on an acquisition
   ``ParetoArchive`` (the run archive's grid, reference point and front size), seeded with the
   evaluated configurations and uniform points; children of uniformly drawn front members
   (pyribs' Gaussian and iso-line operators, alternating) are inserted with their optimistic
   predictions ``mean - sqrt(ucb_beta) * std`` per (minimised) objective in the cell of their
   measures (computed when cheap, else the GP mean). With constraints, candidates more likely
   infeasible than not are left out.
3. **Batch by per-cell hypervolume improvement.** Every member of the acquisition fronts is scored
   by how much its optimistic prediction would add to the hypervolume of *its cell's* front in
   the run archive (moocore; an empty cell: the point's own hypervolume), i.e. by its gain of
   the MOQD score. The best ones are picked, one per cell, skipping cells that hold a pending
   evaluation and configurations evaluated, pending or chosen already; what the map cannot fill
   is filled with Sobol points.

Repeats and re-evaluation (``sail``'s noise handling) are not offered; ``fidelity="asha"`` is the
wrapper every strategy takes (``qd.fidelity``). ``restore`` replays the trials (models, archive)
and moves the Sobol sequence and random streams on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import moocore
import numpy as np
import torch
from botorch.models.model import Model
from ribs.emitters.operators import GaussianOperator, IsoLineOperator
from scipy.stats import norm, qmc

from qd.archive import ParetoArchive, ParetoSpec, _Row, pareto_spec
from qd.checks import OptionError, check_int, check_number
from qd.problem import Problem
from qd.space import Config, config_key
from qd.store import Trial
from qd.strategies._botorch_common import CheapValues, SpaceGeometry, WarmFits, as_tensor, quiet
from qd.strategies.sail import cheap_measure_indices, fill_cheap_measures, new_sobol_points
from qd.strategy import Strategy

MEASURE_MODES = ("auto", "cheap", "model")
MIN_OBSERVATIONS = 2
#: As in ``sail``: hyperparameters re-optimised once the data grew by this factor, else conditioning.
HYPER_GROWTH = 1.1
OWNER = "strategy 'mo-sail'"


class MoSail(Strategy):
    """Multi-objective SAIL: GPs of every objective, MOME on their predictions, batches by per-cell
    hypervolume improvement (see the module docstring).

    Options:
        n_init: Sobol warm-up size (default ``min(2 (d + 1), 20)``).
        ucb_beta: optimism of the predictions (``mean - sqrt(beta) * std``, minimised units); 0: the mean.
        measures: "auto" (cheap when the problem defines ``cheap_measures``), "cheap", "model".
        generations, emitters, emitter_batch, sigma, iso_sigma, line_sigma: the acquisition MOME
            (iterations per ask, operators per iteration alternating Gaussian and iso-line,
            children per operator, mutation steps in encoded units).
        bins, front_size, reference_point: the archive, as for ``mome``.
    """

    name: ClassVar[str] = "mo-sail"

    def __init__(self, problem: Problem, seed: int = 0, *, n_init: int | None = None, ucb_beta: float = 1.0,
                 measures: str = "auto", generations: int = 10, emitters: int = 2, emitter_batch: int = 32,
                 sigma: float = 0.1, iso_sigma: float = 0.01, line_sigma: float = 0.2, bins: Any = None,
                 front_size: int = 10, reference_point: Sequence[float] | None = None):
        super().__init__(problem, seed)
        if measures not in MEASURE_MODES:
            raise OptionError(f"{OWNER}: option measures={measures!r} is not allowed; allowed: {list(MEASURE_MODES)}")
        d = self.space.dim
        self.n_init = min(2 * (d + 1), 20) if n_init is None else check_int(n_init, "n_init", OWNER, low=1)
        self.ucb_beta = check_number(ucb_beta, "ucb_beta", OWNER, low=0)
        self.generations = check_int(generations, "generations", OWNER, low=0)
        self.n_emitters = check_int(emitters, "emitters", OWNER, low=1)
        self.emitter_batch = check_int(emitter_batch, "emitter_batch", OWNER, low=1)
        self.sigma = check_number(sigma, "sigma", OWNER, low=0, low_open=True)
        self.iso_sigma = check_number(iso_sigma, "iso_sigma", OWNER, low=0, low_open=True)
        self.line_sigma = check_number(line_sigma, "line_sigma", OWNER, low=0, low_open=True)
        self.spec: ParetoSpec = self.archive_spec(
            problem, seed, dict(bins=bins, front_size=front_size, reference_point=reference_point))
        self.archive = ParetoArchive(problem, self.spec)

        names = problem.measure_names
        self._cheap_measures = cheap_measure_indices(problem, measures, OWNER)
        self._modelled_measures = [i for i in range(len(names)) if i not in self._cheap_measures]
        objectives = problem.objectives
        self._cheap_objectives = [i for i, o in enumerate(objectives) if o.cheap]
        self._cheap_values = (CheapValues(problem, [objectives[i].name for i in self._cheap_objectives],
                                          [1.0] * len(self._cheap_objectives)) if self._cheap_objectives else None)

        self.geometry = SpaceGeometry(self.space)
        self._fits = WarmFits(self.geometry, hyper_growth=HYPER_GROWTH)
        self._continuous = self.geometry.is_continuous and not self.space.is_conditional
        # Observations (complete trials): encoded inputs, objectives (minimised scaled units), measures, constraints.
        self._X: list[np.ndarray] = []
        self._Z: list[np.ndarray] = []
        self._M: list[list[float]] = []
        self._C: list[list[float]] = []
        self._version = 0
        self._models: tuple[int, dict[str, Model]] | None = None
        self._proposed: set[bytes] = set()
        self._sobol = qmc.Sobol(d=d, scramble=True, seed=seed)
        self._warmup_issued = 0
        self._asks = 0
        self.latencies: list[tuple[int, float]] = []  # (observations, seconds) of model-based asks

    @classmethod
    def archive_spec(cls, problem: Problem, seed: int, options: dict[str, Any]) -> ParetoSpec:
        """MOME's archive for ``options`` (``bins``, ``front_size``, ``reference_point``)."""
        kw = {k: v for k, v in options.items() if k in ("bins", "front_size", "reference_point") and v is not None}
        return pareto_spec(problem, owner=f"strategy {cls.name!r}", **kw)

    # --- helpers ------------------------------------------------------------------------------
    def _minimised(self, values: np.ndarray) -> np.ndarray:
        """(n, m) objective values -> (n, m) scaled values to minimise (the hypervolume's units)."""
        return self.archive._minimised(values)

    def _objective_units(self, Z: np.ndarray) -> np.ndarray:
        """``_minimised``'s inverse: (n, m) -> (n, m) objective values."""
        return self.spec.scaling.invert(Z * self.archive.signs)

    def _snap(self, X: np.ndarray) -> np.ndarray:
        """(n, d) -> (n, d) encoded vectors of valid configurations."""
        return np.clip(X, 0.0, 1.0) if self._continuous else self.space.snap(X)

    # --- observations -------------------------------------------------------------------------
    def tell(self, trial: Trial) -> None:
        self._proposed.add(config_key(self.space.encode(trial.params)))
        if trial.state != "complete" or trial.values is None:
            return
        self._X.append(self.space.encode(trial.params))
        self._Z.append(self._minimised(np.asarray(trial.values, dtype=float)[None])[0])
        self._M.append(list(trial.measures or [0.0] * len(self.problem.measures)))
        self._C.append(list(trial.constraints or []))
        self._version += 1
        self.archive.add_trials([trial])

    def restore(self, trials: Sequence[Trial]) -> None:
        if not trials:
            return
        for t in trials:
            if t.finished:
                self.tell(t)
            self._proposed.add(config_key(self.space.encode(t.params)))
        proposed = sum(t.origin == "strategy" for t in trials)
        self._warmup_issued = min(self.n_init, proposed)
        self._sobol = qmc.Sobol(d=self.space.dim, scramble=True, seed=self.seed)
        if proposed:
            self._sobol.fast_forward(proposed)
        self._asks += len(trials) + 1  # fresh random streams: a resumed run does not replay its asks

    def state(self) -> dict[str, Any]:
        m = self.archive.metrics()
        out: dict[str, Any] = {"coverage": m["coverage"], "moqd": m["moqd_score"],
                               "phase": "model" if self._use_model() else "sobol"}
        if self.latencies:
            out["ask_s"] = self.latencies[-1][1]
        return out

    # --- asking -------------------------------------------------------------------------------
    def _use_model(self) -> bool:
        return self._warmup_issued >= self.n_init and len(self._X) >= MIN_OBSERVATIONS

    def ask(self, n: int, pending: Sequence[Config] = ()) -> list[Config]:
        self._asks += 1
        t0 = time.perf_counter()
        use_model = self._use_model()
        seed = int(np.random.SeedSequence([self.seed, self._asks]).generate_state(1)[0])
        X = self._from_map(n, pending, seed) if use_model else np.empty((0, self.space.dim))
        if len(X) < n:
            X = np.vstack([X, self._sobol_points(n - len(X), pending)])
        for x in X:
            self._proposed.add(config_key(x))
        if use_model:
            self.latencies.append((len(self._X), time.perf_counter() - t0))
        return self.space.decode_many(X)

    def _sobol_points(self, k: int, pending: Sequence[Config]) -> np.ndarray:
        """(k, d) snapped Sobol points whose configurations are new, where possible."""
        X = new_sobol_points(self._sobol, self._snap, k,
                             self._proposed | {config_key(self.space.encode(c)) for c in pending}, self.space.dim)
        self._warmup_issued = min(self.n_init, self._warmup_issued + k)
        return X

    # --- models -------------------------------------------------------------------------------
    def _fitted(self) -> dict[str, Model]:
        """GPs (refit when data changed): "objective<i>" (not cheap ones), "measure<i>", "constraint<j>"."""
        if self._models is not None and self._models[0] == self._version:
            return self._models[1]
        X = as_tensor(np.array(self._X))
        Z, M = np.array(self._Z), np.array(self._M)
        C = np.array(self._C).reshape(len(self._X), -1)
        models: dict[str, Model] = {}
        with quiet():
            for i in range(Z.shape[1]):
                if i not in self._cheap_objectives:
                    models[f"objective{i}"] = self._fits.fit(f"objective{i}", X, as_tensor(Z[:, i:i + 1]))
            for i in self._modelled_measures:
                models[f"measure{i}"] = self._fits.fit(f"measure{i}", X, as_tensor(M[:, i:i + 1]))
            for j in range(C.shape[1]):
                models[f"constraint{j}"] = self._fits.fit(f"constraint{j}", X, as_tensor(C[:, j:j + 1]))
        self._models = (self._version, models)
        return models

    def _predict(self, X: np.ndarray, models: dict[str, Model]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(b, d) snapped candidates -> optimistic objectives (b, m) in minimised scaled units,
        measures (b, k), and whether each is likely feasible (b,)."""
        b, m = len(X), len(self.problem.objectives)
        Xt = as_tensor(X)
        Z = np.zeros((b, m))
        M = np.zeros((b, len(self.problem.measures)))
        feasible = np.ones(b, dtype=bool)
        root_beta = math.sqrt(self.ucb_beta)
        with torch.no_grad(), quiet():
            for i in range(m):
                if i in self._cheap_objectives:
                    continue
                post = models[f"objective{i}"].posterior(Xt)
                sd = post.variance[:, 0].clamp_min(0).sqrt().numpy() if root_beta else 0.0
                Z[:, i] = post.mean[:, 0].numpy() - root_beta * sd
            for i in self._modelled_measures:
                M[:, i] = models[f"measure{i}"].posterior(Xt).mean[:, 0].numpy()
            for j in range(len(self.problem.constraints)):
                post = models[f"constraint{j}"].posterior(Xt)
                mu, sd = post.mean[:, 0].numpy(), post.variance[:, 0].clamp_min(1e-12).sqrt().numpy()
                feasible &= norm.cdf(-mu / sd) >= 0.5
        if self._cheap_objectives or self._cheap_measures:
            configs = self.space.decode_many(X)
            if self._cheap_objectives:
                raw = np.full((b, m), np.nan)
                raw[:, self._cheap_objectives] = self._cheap_values(as_tensor(X)[:, None]).numpy()[:, 0]
                Z[:, self._cheap_objectives] = self._minimised(np.nan_to_num(raw))[:, self._cheap_objectives]
            fill_cheap_measures(self.problem, configs, self._cheap_measures, M)
        ok = feasible & np.isfinite(Z).all(axis=1) & np.isfinite(M).all(axis=1)
        return Z, M, ok

    # --- the acquisition map and the batch ------------------------------------------------------
    def _insert(self, acq: ParetoArchive, X: np.ndarray, models: dict[str, Model]) -> None:
        Z, M, ok = self._predict(X, models)
        values = self._objective_units(Z)
        for x, v, mm in zip(X[ok], values[ok], M[ok]):
            acq._add_one(x, _Row(-1, v, mm))

    def _from_map(self, k: int, pending: Sequence[Config], seed: int) -> np.ndarray:
        """Illuminate the surrogate; return up to ``k`` picks (k', d), one per cell, best gain first."""
        models = self._fitted()
        rng = np.random.default_rng(seed)
        d = self.space.dim
        acq = ParetoArchive(self.problem, self.spec)
        self._insert(acq, self._snap(np.vstack([np.array(self._X), rng.random((self.n_emitters * self.emitter_batch,
                                                                                d))])), models)
        seeds = np.random.SeedSequence([self.seed, seed]).generate_state(2)
        gaussian = GaussianOperator(self.sigma, seed=int(seeds[0]))
        iso = IsoLineOperator(self.iso_sigma, self.line_sigma, seed=int(seeds[1]))
        for _ in range(self.generations):
            if acq.empty:
                break
            children = []
            for e in range(self.n_emitters):
                parents = acq.sample(self.emitter_batch, rng)
                if e % 2:
                    children.append(iso.ask(np.stack([parents, acq.sample(self.emitter_batch, rng)])))
                else:
                    children.append(gaussian.ask(parents))
            self._insert(acq, self._snap(np.vstack(children)), models)

        # Score every acquisition front member by the hypervolume it adds to its cell's real front.
        ref = self.archive._ref_min
        cells, solutions, gains = [], [], []
        for cell, front in acq.fronts.items():
            real = self.archive.fronts.get(cell)
            base = real.hypervolume if real is not None else 0.0
            known = self._minimised(real.values) if real is not None else np.empty((0, len(ref)))
            for x, z in zip(front.solutions, self._minimised(front.values)):
                Y = np.vstack([known, z])
                Y = Y[np.all(Y < ref, axis=1)]
                gain = float(moocore.hypervolume(Y, ref=ref)) - base if len(Y) else 0.0
                cells.append(cell)
                solutions.append(x)
                gains.append(gain)
        seen = self._proposed | {config_key(self.space.encode(c)) for c in pending}
        busy: set[int] = set()
        if pending:
            _, M, _ = self._predict(self._snap(self.space.encode_many(list(pending))), models)
            busy = set(self.archive.cell_of(M).tolist())
        picks: list[np.ndarray] = []
        for i in np.argsort(-np.asarray(gains), kind="stable"):
            if len(picks) >= k:
                break
            x, cell, key = solutions[i], cells[i], config_key(solutions[i])
            if cell in busy or key in seen:
                continue
            picks.append(x)
            busy.add(cell)
            seen.add(key)
        return np.array(picks).reshape(len(picks), d)
