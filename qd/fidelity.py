"""Multi-fidelity search: evaluate cheaply first, promote the promising (asynchronous successive halving).

A problem names a *fidelity* parameter (``Problem.fidelity``: training steps, epochs, a data
fraction; larger is dearer and more faithful). ``Promotions`` runs ASHA (Li et al. 2020) over it:

- **Rungs.** The fidelity values ``top, top / eta, top / eta^2, ...`` down to ``min_fidelity``
  (default: the parameter's low end; at most ``MAX_RUNGS`` rungs when that is 0), rounded for
  integer parameters; a categorical fidelity uses its choices in order. ``top`` is the
  parameter's high end (last choice).
- **New configurations** start at the lowest rung.
- **Promotion.** A configuration that finished at rung ``k`` goes to rung ``k + 1`` when it is
  among the best ``floor(n_k / eta)`` of the ``n_k`` configurations finished at rung ``k``.
  Promotions are handed out before new configurations, highest rung first, so good
  configurations reach the top quickly and no rung waits for a full batch (no barrier).
- **Ranking.** Objectives in minimised units, by non-dominated rank (moocore's ``pareto_rank``),
  ties by the first objective: with one objective, simply the best values; with several, the
  Pareto layers. For quality diversity (``cell_of`` given) the ranking is per archive cell first:
  every cell's best comes before any cell's second best, so promotion keeps the map's diversity
  instead of sending only the globally best region to the top. Repeated evaluations of one
  configuration at one rung are averaged.
- **What counts.** Only top-rung evaluations are full-fidelity results: archives built with
  ``elite_spec(..., fidelity=name)`` insert only trials at the top value (``EliteSpec.fidelity``);
  the lower rungs are in the store, marked by their fidelity parameter, and models may use them.

``FidelityWrapper`` puts this in front of any strategy: the inner strategy proposes
configurations (its choice of the fidelity parameter is replaced by the lowest rung), the wrapper
hands out promotions first, and every finished trial is told to both. ``sail`` uses
``Promotions`` directly (option ``fidelity="asha"``) because its models take the fidelity as an
input and it scores candidates at the top fidelity.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import moocore
import numpy as np

from qd.checks import OptionError, is_finite_number
from qd.space import config_key
from qd.problem import Problem
from qd.space import Categorical, Config, Float, Int
from qd.store import Trial
from qd.strategy import Strategy

#: Rungs when the fidelity parameter's low end gives no floor (e.g. a fraction starting at 0).
MAX_RUNGS = 4


class FidelityError(OptionError):
    """A bad multi-fidelity option; the message names it, the value and what is allowed."""


def rung_values(param: Any, eta: float, min_fidelity: float | None = None) -> list[Any]:
    """Ascending fidelity values of the rungs, ending at the parameter's top value.

    Args:
        param: the fidelity parameter (``Int``, ``Float`` or ``Categorical``).
        eta: the reduction factor between rungs (> 1).
        min_fidelity: the lowest rung's value (default: the parameter's low end); ignored for a
            categorical, whose choices are the rungs.

    Returns:
        The rung values, lowest first (integers for an ``Int`` parameter).

    Raises:
        FidelityError: a parameter of another type, or ``min_fidelity`` outside its range.
    """
    if isinstance(param, Categorical):
        return list(param.choices)
    if not isinstance(param, (Int, Float)):
        raise FidelityError(f"fidelity parameter {param.name!r} must be an int, a float or a categorical")
    floor = param.low if min_fidelity is None else float(min_fidelity)
    if not param.low <= floor <= param.high:
        raise FidelityError(f"option min_fidelity={min_fidelity!r} is not allowed; allowed: a value in "
                            f"[{param.low}, {param.high}] of parameter {param.name!r}")
    values: list[Any] = []
    v = float(param.high)
    while len(values) < (MAX_RUNGS if floor <= 0 else 1_000) and v >= floor - 1e-12:
        value = int(round(v)) if isinstance(param, Int) else v
        if not values or value != values[-1]:
            values.append(value)
        v /= eta
    return values[::-1]


class Promotions:
    """ASHA rungs over ``problem.fidelity`` (see the module docstring).

    Args:
        problem: declares ``fidelity``.
        eta: reduction factor (> 1): a rung keeps its best 1/eta.
        min_fidelity: the lowest rung's value (default the parameter's low end).
        cell_of: trial -> archive cell, to rank within cells first (quality diversity), or None.
        owner: who takes the options, for error messages.

    Raises:
        FidelityError: the problem names no fidelity parameter, or ``eta`` or ``min_fidelity`` is
            not allowed.
    """

    def __init__(self, problem: Problem, *, eta: float = 3, min_fidelity: float | None = None,
                 cell_of: Callable[[Trial], int | None] | None = None, owner: str = "fidelity"):
        if not problem.fidelity:
            raise FidelityError(f"{owner}: multi-fidelity search needs a problem that names a fidelity parameter; "
                                f"problem {problem.name or type(problem).__name__!r} names none (Problem.fidelity)")
        if not (is_finite_number(eta) and eta > 1):
            raise FidelityError(f"{owner}: option eta={eta!r} is not allowed; allowed: a number > 1")
        self.problem, self.space = problem, problem.space
        self.name = problem.fidelity
        self.param = problem.space[self.name]
        self.index = problem.space.names.index(self.name)
        self.eta = float(eta)
        try:
            self.values = rung_values(self.param, self.eta, min_fidelity)
        except FidelityError as e:
            raise FidelityError(f"{owner}: {e}") from None
        self.top = self.values[-1]
        self.cell_of = cell_of
        self._signs = np.array([o.sign for o in problem.objectives])
        # rung -> identity -> [sum of minimised values (m,), count, config at that rung, cell]
        self._results: list[dict[bytes, list[Any]]] = [dict() for _ in self.values]
        self._reached: dict[bytes, int] = {}  # identity -> highest rung handed out or seen
        self.promoted = 0

    @property
    def rungs(self) -> int:
        """The number of rungs."""
        return len(self.values)

    def identity(self, config: Config) -> bytes:
        """A configuration's identity whatever its fidelity: its encoding at the top value."""
        return config_key(self.space.encode({**config, self.name: self.top}))

    def at(self, config: Config, rung: int) -> Config:
        """``config`` at rung ``rung``'s fidelity."""
        return self.space.validate({**config, self.name: self.values[rung]})

    def rung_of(self, config: Config) -> int | None:
        """The rung of ``config``'s fidelity value, or None when it is not a rung value."""
        value = config.get(self.name)
        for k, v in enumerate(self.values):
            if value == v:
                return k
        return None

    def start(self, config: Config) -> Config:
        """A new configuration at the lowest rung (marked as handed out)."""
        config = self.at(config, 0)
        self._reached.setdefault(self.identity(config), 0)
        return config

    def seen(self, config: Config) -> bool:
        """Whether this configuration (at any fidelity) was handed out or evaluated."""
        return self.identity(config) in self._reached

    def tell(self, trial: Trial) -> None:
        """Count a finished trial at its rung; failed and infeasible ones are never promoted, and trials
        whose fidelity is not a rung value are ignored."""
        rung = self.rung_of(trial.params)
        if rung is None:
            return
        key = self.identity(trial.params)
        self._reached[key] = max(self._reached.get(key, 0), rung)
        if trial.state != "complete" or not trial.feasible:
            return  # failed or infeasible: never promoted
        values = np.asarray(trial.values, dtype=float) * self._signs
        row = self._results[rung].get(key)
        if row is None:
            cell = self.cell_of(trial) if self.cell_of is not None else None
            self._results[rung][key] = [values, 1, trial.params, cell]
        else:
            row[0], row[1] = row[0] + values, row[1] + 1

    def _ranked(self, rung: int) -> list[bytes]:
        """Identities finished at ``rung``, best first (see the module docstring)."""
        rows = self._results[rung]
        keys = list(rows)
        if not keys:
            return []
        Y = np.array([rows[k][0] / rows[k][1] for k in keys])
        layer = moocore.pareto_rank(Y) if Y.shape[1] > 1 else np.zeros(len(keys), dtype=int)
        order = sorted(range(len(keys)), key=lambda i: (layer[i], Y[i, 0]))
        if self.cell_of is not None:
            seen: dict[Any, int] = defaultdict(int)
            within = {}
            for i in order:
                cell = rows[keys[i]][3]
                within[i] = seen[cell] if cell is not None else 0
                seen[cell] += 1
            order = sorted(order, key=lambda i: within[i])  # stable: global order within each level
        return [keys[i] for i in order]

    def ready(self, n: int) -> list[Config]:
        """Up to ``n`` promotions, highest rung first; each is marked as handed out."""
        out: list[Config] = []
        for rung in range(self.rungs - 2, -1, -1):
            rows = self._results[rung]
            quota = int(len(rows) // self.eta)
            for key in self._ranked(rung)[:quota]:
                if len(out) >= n:
                    return out
                if self._reached.get(key, 0) > rung:
                    continue
                self._reached[key] = rung + 1
                self.promoted += 1
                out.append(self.at(rows[key][2], rung + 1))
        return out

    def counts(self) -> list[int]:
        """Configurations finished per rung, lowest first."""
        return [len(r) for r in self._results]


class FidelityWrapper(Strategy):
    """Any strategy behind ASHA promotions: ``FidelityWrapper(get_strategy("tpe", problem), eta=3)``.

    The inner strategy's proposals start at the lowest rung; promotions go first. Every finished
    trial (any rung) is told to the inner strategy, so a model-based one sees the fidelity as an
    input. An archive of the run should count only the top rung (``elite_spec(..., fidelity=...)``).

    Args:
        inner: the strategy that proposes new configurations.
        eta, min_fidelity, cell_of: as for ``Promotions``.

    Raises:
        FidelityError: as for ``Promotions``.
    """

    def __init__(self, inner: Strategy, *, eta: float = 3, min_fidelity: float | None = None,
                 cell_of: Callable[[Trial], int | None] | None = None):
        super().__init__(inner.problem, inner.seed)
        self.inner = inner
        self.name = f"{inner.name}+asha"
        self.promotions = Promotions(inner.problem, eta=eta, min_fidelity=min_fidelity, cell_of=cell_of,
                                     owner=f"strategy {inner.name!r}")

    def ask(self, n: int, pending: Sequence[Config] = ()) -> list[Config]:
        """Up to ``n`` configurations: promotions first, then the inner strategy's at the lowest rung."""
        out = self.promotions.ready(n)
        if len(out) < n:
            for config in self.inner.ask(n - len(out), pending):
                out.append(self.promotions.start(config))
        return out

    def tell(self, trial: Trial) -> None:
        """Tell the trial to the promotions and to the inner strategy."""
        self.promotions.tell(trial)
        self.inner.tell(trial)

    def restore(self, trials: Sequence[Trial]) -> None:
        """Restore the inner strategy and the rungs; stale trials count as handed out at their rung."""
        self.inner.restore(trials)
        for t in trials:
            if t.finished:
                self.promotions.tell(t)
            elif self.promotions.rung_of(t.params) is not None:  # stale: re-queued by the run loop
                key = self.promotions.identity(t.params)
                rung = self.promotions.rung_of(t.params)
                self.promotions._reached[key] = max(self.promotions._reached.get(key, 0), rung)

    def state(self) -> dict[str, Any]:
        """The inner strategy's numbers, plus ``rungs``: configurations finished per rung."""
        return {**self.inner.state(), "rungs": "/".join(map(str, self.promotions.counts()))}
