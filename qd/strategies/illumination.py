"""Single-objective quality diversity on pyribs: ``map-elites``, ``cma-me``, ``cma-mae``.

Archives, emitters, CMA-ES, rankers and restarts are pyribs' (``GridArchive``/``CVTArchive``,
``GaussianEmitter``/``IsoLineEmitter``, ``EvolutionStrategyEmitter``); this module only feeds
them through the asynchronous ask/tell contract.

**Search space.** Emitters search the encoded cube ``[0, 1]^d`` (emitter bounds ``[0, 1]``), one
coordinate per parameter whatever its type. A proposed vector ``x`` is decoded into a valid
configuration (integers rounded, categoricals by index bin, inactive conditional parameters
dropped), and the archive receives ``space.snap(x)``, the encoded vector of the configuration that
was actually evaluated, not ``x``: an elite is then exactly what was evaluated, mutating it
cannot hide a rounding step, and an archive rebuilt from the store (``space.encode(params)``) is
identical to the live one. CMA-ES still adapts on its own samples ``x`` (pyribs keeps them): its
update assumes the points it drew, and rounding inside the objective is the usual way CMA-ES
handles integer and categorical coordinates.

**Objective.** pyribs maximises: the archive stores ``value`` for a maximised objective and
``-value`` for a minimised one. A multi-objective problem is illuminated on one objective, option
``objective`` (a name; default the first). ``qd_score_offset`` (objective units) is the value that
counts as zero in the QD score (default: the problem's reference point for it, else 0).

**Failures and infeasible results are never inserted** (no penalty): a penalised entry would
occupy a cell, inflate coverage and be selected as a parent. In its emitter's batch such a result
gets status "not added" and an improvement value below all the others, so CMA-ES ranks it last
and, with the "filter" selection rule, never uses it as a parent.

**Asynchrony.** pyribs' ``Scheduler`` asks every emitter, then wants all the results before the
next ask: with W workers, each batch ends with workers idle while its last results come in, and
one failed-and-missing result would stall the run. Here every emitter is an independent *lane*:

- ``cma-me``/``cma-mae``: a lane asks its emitter for a batch, hands its solutions out one by one,
  and when all of that batch's results are in, inserts them into the archive as one batch
  (pyribs' batch ``add``, as the Scheduler does) and tells its emitter (``emitter.tell`` with the
  archive's add info). Meanwhile the other lanes keep handing out their batches, so workers only
  wait when *every* lane has handed out its whole batch and waits for a result (e.g. with 5
  lanes of 12 solutions and 4 workers, never in steady state: see ``experiments/bench_qd.py``,
  which measures worker idleness against a Scheduler-style barrier). CMA-ES updates need the
  whole batch, so a lane cannot ask ahead of its own results.
- ``map-elites``: Gaussian and iso-line emitters keep no state between ask and tell, so there is
  no barrier at all: each result is inserted the moment it arrives (steady-state MAP-Elites) and
  a new batch is asked whenever the queue is empty; parents come from the freshest archive.

Results the lanes did not propose (re-queued evaluations of a resumed run) are inserted directly.

**Resume.** ``restore`` rebuilds the archive from the recorded trials (``qd.archive``), then starts
fresh emitters with new seeds; a CMA-ES emitter then starts from a random elite instead of the
centre. The emitters' internal state (CMA-ES mean and covariance) is not recorded: a resumed
CMA-ME behaves like a restart of every emitter on the restored archive.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from ribs.emitters import EmitterBase, EvolutionStrategyEmitter, GaussianEmitter, IsoLineEmitter
from scipy.stats import qmc

from qd.checks import OptionError, check_choice, check_int, check_number, is_int
from qd.archive import EliteArchive, EliteSpec, elite_spec, insertable
from qd.columns import Columns
from qd.problem import Problem
from qd.space import Config, config_key
from qd.store import Trial
from qd.strategy import Strategy

RANKERS = ("2imp", "imp", "obj", "2obj", "rd", "2rd", "nov")
SELECTION_RULES = ("filter", "mu")
RESTART_RULES = ("no_improvement", "basic")
OPERATORS = ("gaussian", "iso-line")


@dataclass
class _Lane:
    """One emitter and its current batch: (b, d) snapped solutions and b results as they arrive."""

    emitter: EmitterBase
    solutions: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    configs: list[Config] = field(default_factory=list)
    results: list[Trial | None] = field(default_factory=list)
    handed: int = 0
    batch: int = 0  # how many batches this lane has asked for

    @property
    def open(self) -> bool:
        """Solutions of the current batch are still waiting to be handed out."""
        return self.handed < len(self.configs)

    @property
    def complete(self) -> bool:
        return len(self.configs) > 0 and not self.open and all(r is not None for r in self.results)


class _Illumination(Strategy):
    """Lanes of pyribs emitters around one ``EliteArchive`` (see the module docstring)."""

    #: True when emitters keep no state between ask and tell (no per-lane barrier).
    pipelined: ClassVar[bool] = False
    #: CMA-MAE's thresholded archive defaults: None for a plain elitist archive.
    default_learning_rate: ClassVar[float | None] = None

    def __init__(self, problem: Problem, seed: int, *, archive_options: dict[str, Any], emitters: int,
                 batch_size: int | None):
        super().__init__(problem, seed)
        owner = f"strategy {self.name!r}"
        check_int(emitters, "emitters", owner, low=1)
        check_int(batch_size, "batch_size", owner, low=1, none=True)
        self.n_emitters, self.batch_size = int(emitters), batch_size
        self.spec: EliteSpec = self.archive_spec(problem, seed, archive_options)
        self.archive = EliteArchive(problem, self.spec)
        self._generation = 0  # bumped on restore so resumed emitters draw new numbers
        self._lanes: list[_Lane] = []
        self._open: deque[int] = deque()  # lanes with solutions left to hand out, oldest batch first
        self._outstanding: dict[bytes, deque[tuple[int, int, int]]] = {}  # key -> (lane, batch, slot)
        # How often ask() could not fill its request because every lane waited for results.
        self.starved_asks = 0

    # --- archive ----------------------------------------------------------------------------
    ARCHIVE_OPTIONS: ClassVar[tuple[str, ...]] = ("archive", "bins", "cells", "objective", "qd_score_offset")

    @classmethod
    def archive_spec(cls, problem: Problem, seed: int, options: dict[str, Any]) -> EliteSpec:
        """The archive this strategy builds for ``options`` (also used to rebuild it from a store)."""
        kw = {k: options[k] for k in cls.ARCHIVE_OPTIONS + ("learning_rate", "threshold_min") if k in options}
        if cls.default_learning_rate is not None:
            kw.setdefault("learning_rate", cls.default_learning_rate)
        return elite_spec(problem, seed=seed, owner=f"strategy {cls.name!r}", **kw)

    # --- emitters ---------------------------------------------------------------------------
    def _emitter_seed(self, lane: int) -> np.random.SeedSequence:
        return np.random.SeedSequence([self.seed, self._generation, lane])

    def _make_emitter(self, lane: int) -> EmitterBase:
        raise NotImplementedError

    def _bounds(self) -> list[tuple[float, float]]:
        return [(0.0, 1.0)] * self.space.dim

    def _build_lanes(self) -> None:
        self._lanes = [_Lane(self._make_emitter(i)) for i in range(self.n_emitters)]
        self._open.clear()
        self._outstanding.clear()

    def _can_start(self, lane: _Lane) -> bool:
        if lane.open:
            return False
        return self.pipelined or not lane.configs or lane.complete

    def _start_batch(self, index: int) -> bool:
        """Ask lane ``index``'s emitter for a new batch; False if it returned nothing."""
        lane = self._lanes[index]
        X = np.asarray(self._propose(lane), dtype=float)
        if len(X) == 0:
            return False
        configs = self.space.decode_many(X)
        lane.solutions, lane.configs = self.space.encode_many(configs), configs
        lane.results, lane.handed, lane.batch = [None] * len(configs), 0, lane.batch + 1
        self._open.append(index)
        return True

    def _propose(self, lane: _Lane) -> np.ndarray:
        """(b, d) new solutions from the lane's emitter."""
        return lane.emitter.ask()

    # --- ask/tell ---------------------------------------------------------------------------
    def ask(self, n: int, pending: Sequence[Config] = ()) -> list[Config]:
        if not self._lanes:
            self._build_lanes()
        out: list[Config] = []
        while len(out) < n:
            if not self._open:
                ready = [i for i, lane in enumerate(self._lanes) if self._can_start(lane)]
                # Start the lane that has waited longest (fewest batches) so emitters share evaluations.
                ready.sort(key=lambda i: self._lanes[i].batch)
                if not ready or not self._start_batch(ready[0]):
                    self.starved_asks += 1
                    break
            index = self._open[0]
            lane = self._lanes[index]
            slot = lane.handed
            lane.handed += 1
            if not lane.open:
                self._open.popleft()
            self._outstanding.setdefault(config_key(lane.solutions[slot]), deque()).append((index, lane.batch, slot))
            out.append(lane.configs[slot])
        return out

    def tell(self, trial: Trial) -> None:
        x = self.space.encode(trial.params)
        waiting = self._outstanding.get(config_key(x))
        if not waiting:  # not proposed by a lane (re-queued after a resume): insert it as it is
            self.archive.add(x[None], [trial])
            return
        index, batch, slot = waiting.popleft()
        if not waiting:
            del self._outstanding[config_key(x)]
        lane = self._lanes[index]
        if batch != lane.batch:  # a batch the lane has moved past (pipelined lanes): insert directly
            self.archive.add(x[None], [trial])
            return
        lane.results[slot] = trial
        if self.pipelined:
            info = self.archive.add(lane.solutions[slot:slot + 1], [trial])
            if insertable(trial):
                self._tell_emitter(lane, lane.solutions[slot:slot + 1], info)
        elif lane.complete:
            results = [r for r in lane.results if r is not None]
            info = self.archive.add(lane.solutions, results)
            if not self.archive.archive.empty:  # restarts sample elites: nothing to learn from yet
                self._tell_emitter(lane, lane.solutions, info)

    def _tell_emitter(self, lane: _Lane, solutions: np.ndarray, info: dict[str, np.ndarray]) -> None:
        lane.emitter.tell(solutions, info["objective"], info["measures"],
                          add_info={"status": info["status"], "value": info["value"]})

    def restore(self, trials: Sequence[Trial]) -> None:
        if not trials:  # a new run: nothing to rebuild
            return
        self.archive = EliteArchive(self.problem, self.spec)
        self.archive.add_trials([t for t in trials if t.state == "complete"])
        self._generation = len(trials)
        self._lanes = []

    def restore_columns(self, cols: Columns, store: Any = None) -> None:
        """``restore`` from columns: the archive rebuilt in one batch (or in order for CMA-MAE)."""
        if not len(cols):
            return
        self.archive = EliteArchive(self.problem, self.spec)
        self.archive.add_columns(cols)
        self._generation = len(cols)
        self._lanes = []
        self._after_restore(int((cols.origin == 0).sum()))

    def _after_restore(self, proposed: int) -> None:
        """Advance what depends on how many configurations were proposed (MAP-Elites' Sobol start)."""

    @property
    def batch_hint(self) -> int:
        return self.n_emitters * int(self.batch_size or max(1, 4 + int(3 * np.log(max(self.space.dim, 1)))))

    def state(self) -> dict[str, Any]:
        m = self.archive.metrics()
        return {"coverage": m["coverage"], "qd_score": m["qd_score"]}


class MapElites(_Illumination):
    """MAP-Elites with pyribs' Gaussian (``operator="gaussian"``, ``sigma``) or iso-line
    (``operator="iso-line"``, ``iso_sigma``, ``line_sigma``) emitters; steady state, no barrier.

    The first ``initial_population`` configurations are a scrambled Sobol sample of the space
    (and more are drawn while the archive is still empty); mutation starts after that.

    A vectorised problem on the in-process evaluator is handed ``eval_batch`` configurations at
    a time (each lane's emitter then draws ``eval_batch / emitters`` parents from the archive as
    it is, like pyribs' Scheduler with that batch size), so the archive is updated in batches of
    that size; with any other evaluator the run is steady state, ``batch_size`` per draw.
    """

    name = "map-elites"
    pipelined = True

    def __init__(self, problem: Problem, seed: int = 0, *, operator: str = "gaussian", sigma: float = 0.1,
                 iso_sigma: float = 0.01, line_sigma: float = 0.2, initial_population: int = 32,
                 emitters: int = 1, batch_size: int = 8, eval_batch: int = 256, archive: str = "grid",
                 bins: Any = None, cells: int | None = None, objective: str | None = None,
                 qd_score_offset: float | None = None):
        owner = f"strategy {self.name!r}"
        check_choice(operator, "operator", owner, OPERATORS)
        check_int(eval_batch, "eval_batch", owner, low=1)
        self.eval_batch = int(eval_batch)
        for option, value in (("sigma", sigma), ("iso_sigma", iso_sigma), ("line_sigma", line_sigma)):
            check_number(value, option, owner, low=0, low_open=True)
        check_int(initial_population, "initial_population", owner, low=1)
        super().__init__(problem, seed, emitters=emitters, batch_size=batch_size,
                         archive_options=dict(archive=archive, bins=bins, cells=cells, objective=objective,
                                              qd_score_offset=qd_score_offset))
        self.operator, self.sigma, self.iso_sigma, self.line_sigma = operator, sigma, iso_sigma, line_sigma
        self.initial_population = int(initial_population)
        self._sobol = qmc.Sobol(d=self.space.dim, scramble=True, seed=seed)
        self._n_initial = 0

    def _make_emitter(self, lane: int, batch_size: int | None = None) -> EmitterBase:
        common = dict(x0=np.full(self.space.dim, 0.5), bounds=self._bounds(), batch_size=batch_size or self.batch_size,
                      seed=self._emitter_seed(lane).generate_state(1)[0])
        if self.operator == "gaussian":
            return GaussianEmitter(self.archive.archive, sigma=self.sigma, **common)
        return IsoLineEmitter(self.archive.archive, iso_sigma=self.iso_sigma, line_sigma=self.line_sigma, **common)

    def _propose(self, lane: _Lane) -> np.ndarray:
        if self._n_initial < self.initial_population or self.archive.archive.empty:
            n = min(lane.emitter.batch_size, max(1, self.initial_population - self._n_initial))
            self._n_initial += n
            with warnings.catch_warnings():  # Sobol prefers powers of two; any n is still low-discrepancy
                warnings.simplefilter("ignore", UserWarning)
                return self._sobol.random(n)
        return lane.emitter.ask()

    def restore(self, trials: Sequence[Trial]) -> None:
        if not trials:
            return
        super().restore(trials)
        self._after_restore(sum(t.origin == "strategy" for t in trials))

    def _after_restore(self, proposed: int) -> None:
        self._n_initial = min(proposed, self.initial_population)
        self._sobol = qmc.Sobol(d=self.space.dim, scramble=True, seed=self.seed)
        if self._n_initial:
            self._sobol.fast_forward(self._n_initial)
        self._raw_queue = None
        self._array_lanes = None

    # Array path (a vectorised problem on the in-process evaluator): steady-state MAP-Elites keeps no
    # per-solution state between ask and tell, so a batch goes out and comes back as arrays.
    _raw_queue: np.ndarray | None = None

    _array_lanes: list[_Lane] | None = None

    @property
    def batch_hint(self) -> int:
        return self.eval_batch

    def ask_raw(self, n: int) -> np.ndarray:
        """Up to ``n`` configurations (raw, (n', d)): the array lanes' next batches, decoded as arrays."""
        if not self._array_lanes:
            per = max(1, self.eval_batch // self.n_emitters)
            self._array_lanes = [_Lane(self._make_emitter(i, per)) for i in range(self.n_emitters)]
        parts = [] if self._raw_queue is None else [self._raw_queue]
        have = sum(len(p) for p in parts)
        lane = 0
        while have < n:
            X = np.asarray(self._propose(self._array_lanes[lane % len(self._array_lanes)]), dtype=float)
            lane += 1
            if not len(X):
                break
            parts.append(self.space.decode_raw(X))
            have += len(X)
        if not parts:
            return np.empty((0, self.space.dim))
        R = parts[0] if len(parts) == 1 else np.vstack(parts)
        self._raw_queue = R[n:] if len(R) > n else None
        return R[:n]

    def tell_columns(self, cols: Columns) -> None:
        """Insert a batch of results into the archive as one pyribs batch (Gaussian and iso-line
        emitters learn nothing from ``tell``: parents come from the archive)."""
        self.archive.add_columns(cols)


class _Cma(_Illumination):
    """Lanes of pyribs ``EvolutionStrategyEmitter``s (CMA-ES); shared by ``cma-me`` and ``cma-mae``."""

    default_ranker: ClassVar[str]
    default_selection: ClassVar[str]
    default_restart: ClassVar[str]

    def _setup(self, problem: Problem, seed: int, *, emitters: int, batch_size: int | None, sigma0: float,
               ranker: str | None, selection_rule: str | None, restart_rule: str | int | None,
               archive_options: dict[str, Any]) -> None:
        owner = f"strategy {self.name!r}"
        check_number(sigma0, "sigma0", owner, low=0, low_open=True)
        self.ranker = ranker or self.default_ranker
        self.selection_rule = selection_rule or self.default_selection
        self.restart_rule = self.default_restart if restart_rule is None else restart_rule
        check_choice(self.ranker, "ranker", owner, RANKERS)
        check_choice(self.selection_rule, "selection_rule", owner, SELECTION_RULES)
        if not (self.restart_rule in RESTART_RULES or (is_int(self.restart_rule) and self.restart_rule >= 1)):
            raise OptionError(f"{owner}: option restart_rule={restart_rule!r} is not allowed; allowed: "
                                     f"{list(RESTART_RULES)} or an integer >= 1 (restart after that many iterations)")
        self.sigma0 = float(sigma0)
        _Illumination.__init__(self, problem, seed, emitters=emitters, batch_size=batch_size,
                               archive_options=archive_options)

    def _make_emitter(self, lane: int) -> EmitterBase:
        if self.archive.empty:
            x0 = np.full(self.space.dim, 0.5)
        else:  # resumed: start from an elite, as a pyribs restart would
            x0 = self.archive.archive.sample_elites(1)["solution"][0]
        return EvolutionStrategyEmitter(
            self.archive.archive, x0=x0, sigma0=self.sigma0, ranker=self.ranker, selection_rule=self.selection_rule,
            restart_rule=self.restart_rule, bounds=self._bounds(), batch_size=self.batch_size,
            seed=self._emitter_seed(lane))


class CmaMe(_Cma):
    """CMA-ME (Fontaine et al. 2020): ``emitters`` pyribs CMA-ES improvement emitters ("2imp" ranker,
    "filter" selection, "no_improvement" restarts), each an asynchronous lane of ``batch_size``
    solutions (default CMA-ES's ``4 + 3 ln d``); ``sigma0`` in encoded units."""

    name = "cma-me"
    default_ranker, default_selection, default_restart = "2imp", "filter", "no_improvement"

    def __init__(self, problem: Problem, seed: int = 0, *, emitters: int = 5, batch_size: int | None = None,
                 sigma0: float = 0.1, ranker: str | None = None, selection_rule: str | None = None,
                 restart_rule: str | int | None = None, archive: str = "grid", bins: Any = None,
                 cells: int | None = None, objective: str | None = None, qd_score_offset: float | None = None):
        self._setup(problem, seed, emitters=emitters, batch_size=batch_size, sigma0=sigma0, ranker=ranker,
                    selection_rule=selection_rule, restart_rule=restart_rule,
                    archive_options=dict(archive=archive, bins=bins, cells=cells, objective=objective,
                                         qd_score_offset=qd_score_offset))


class CmaMae(_Cma):
    """CMA-MAE (Fontaine & Nikolaidis 2023): CMA-ME's lanes on a soft-threshold archive
    (``learning_rate``, ``threshold_min`` in objective units, default the QD-score offset), with
    pyribs' "imp" ranker, "mu" selection and "basic" restarts; metrics come from the result archive.

    The default learning rate, 0.01, is the paper's, tuned for millions of evaluations. In shorter
    runs thresholds barely move: on sphere (dim 20, 50x50 cells, 20,000 evaluations,
    ``experiments/bench_qd.py``) 0.1 gave a 36% higher QD score than 0.01, and more than CMA-ME."""

    name = "cma-mae"
    default_ranker, default_selection, default_restart = "imp", "mu", "basic"
    default_learning_rate = 0.01

    def __init__(self, problem: Problem, seed: int = 0, *, emitters: int = 5, batch_size: int | None = None,
                 sigma0: float = 0.1, learning_rate: float = 0.01, threshold_min: float | None = None,
                 ranker: str | None = None, selection_rule: str | None = None, restart_rule: str | int | None = None,
                 archive: str = "grid", bins: Any = None, cells: int | None = None, objective: str | None = None,
                 qd_score_offset: float | None = None):
        self._setup(problem, seed, emitters=emitters, batch_size=batch_size, sigma0=sigma0, ranker=ranker,
                    selection_rule=selection_rule, restart_rule=restart_rule,
                    archive_options=dict(archive=archive, bins=bins, cells=cells, objective=objective,
                                         qd_score_offset=qd_score_offset, learning_rate=learning_rate,
                                         threshold_min=threshold_min))
