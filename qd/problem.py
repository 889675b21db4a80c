"""Problems: what is searched (a space), what is optimised (objectives), what is mapped (measures).

A problem is a plain object; plug-ins register a *class* under the entry-point group
``qd.problems`` and are built with keyword options (``get_problem("zdt1", dim=6)``).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from qd.space import Config, Space

Direction = Literal["minimize", "maximize"]


@dataclass(frozen=True)
class Objective:
    """An objective. ``cheap`` ones are computed by ``Problem.cheap_values`` without evaluating."""

    name: str
    direction: Direction = "minimize"
    cheap: bool = False

    def __post_init__(self) -> None:
        if self.direction not in ("minimize", "maximize"):
            raise ValueError(f"objective {self.name!r}: direction {self.direction!r}; allowed: 'minimize', 'maximize'")

    @property
    def sign(self) -> float:
        """Multiply by this to turn the objective into one to minimise."""
        return 1.0 if self.direction == "minimize" else -1.0


@dataclass(frozen=True)
class Measure:
    """A feature of a solution that places it in the archive; ``low``/``high`` bound the map.

    ``integer``: the measure takes whole values only (a layer count, a depth). Its map has one bin
    per whole value in ``[low, high]`` by default, each bin centred on its value, with integer ticks.
    ``labels``: a categorical measure (``Measure.categorical``): value ``i`` is ``labels[i]``.
    """

    name: str
    low: float
    high: float
    integer: bool = False
    labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"measure {self.name!r}: low={self.low!r}, high={self.high!r}; allowed: low < high")
        if self.integer and math.floor(self.high) < math.ceil(self.low):
            raise ValueError(f"measure {self.name!r}: integer measure with no whole value in "
                             f"[{self.low}, {self.high}]")

    @classmethod
    def categorical(cls, name: str, labels: Sequence[str]) -> Measure:
        """A measure whose value is the index of one of ``labels`` (0, 1, ...)."""
        labels = tuple(str(v) for v in labels)
        if not labels:
            raise ValueError(f"measure {name!r}: a categorical measure needs at least one label")
        return cls(name, 0.0, float(len(labels) - 1) if len(labels) > 1 else 0.5, integer=True, labels=labels)

    @property
    def values(self) -> list[int] | None:
        """The whole values of an integer (or categorical) measure; None for a continuous one."""
        if not self.integer:
            return None
        return list(range(math.ceil(self.low), math.floor(self.high) + 1))

    @property
    def map_range(self) -> tuple[float, float]:
        """The range the archive spans: ``(low, high)``, or for an integer measure the half-integers
        around its first and last value, so every bin of one per value is centred on its value."""
        if not self.integer:
            return float(self.low), float(self.high)
        values = self.values
        return values[0] - 0.5, values[-1] + 0.5


@dataclass(frozen=True)
class Resources:
    """What one evaluation needs. Fractional ``gpus`` let several evaluations share a GPU."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_mb: int | None = None
    timeout_s: float | None = None


@dataclass
class Evaluation:
    """What ``Problem.evaluate`` returns.

    ``values``: one number per objective (a sequence in declared order, or a mapping by name).
    ``measures``: one number per measure. ``constraints``: one number per constraint, feasible
    when <= 0. ``metadata``: anything JSON-serialisable (wall time, peak memory, ...).
    """

    values: Sequence[float] | Mapping[str, float]
    measures: Sequence[float] = ()
    constraints: Sequence[float] = ()
    metadata: dict[str, Any] = field(default_factory=dict)


class EvaluationError(ValueError):
    """An evaluation result that cannot be recorded as complete (wrong shape, NaN, inf)."""


class Problem(ABC):
    """Subclass and set ``space``, ``objectives`` (and optionally the rest) in ``__init__``."""

    #: Registered name; set by subclasses.
    name: ClassVar[str] = ""
    space: Space
    objectives: tuple[Objective, ...]
    measures: tuple[Measure, ...] = ()
    constraints: tuple[str, ...] = ()
    resources: Resources = Resources()
    #: Name of a parameter that sets an evaluation's cost and fidelity (training steps, data
    #: fraction), larger meaning dearer and more faithful; strategies may evaluate cheaply first.
    fidelity: str | None = None
    #: Hypervolume reference point in objective units (None: derived from the data, and stated).
    reference_point: tuple[float, ...] | None = None
    #: Options it was built with; set by ``qd.registry.get_problem`` so a run can rebuild it.
    options: dict[str, Any]

    @abstractmethod
    def evaluate(self, config: Config, seed: int) -> Evaluation:
        """Evaluate one valid configuration. Exceptions become failed trials with their reason."""

    def cheap_values(self, config: Config) -> dict[str, float]:
        """Values of the objectives declared ``cheap``, computed without an evaluation."""
        cheap = [o.name for o in self.objectives if o.cheap]
        if cheap:
            raise TypeError(f"{type(self).__name__} declares cheap objectives {cheap} but no cheap_values()")
        return {}

    # --- helpers --------------------------------------------------------------------------
    @property
    def objective_names(self) -> list[str]:
        return [o.name for o in self.objectives]

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def measure_names(self) -> list[str]:
        return [m.name for m in self.measures]

    def normalise(self, ev: Evaluation) -> tuple[list[float], list[float], list[float]]:
        """Check an evaluation's shape and finiteness; return (values, measures, constraints)."""
        if isinstance(ev.values, Mapping):
            missing = [n for n in self.objective_names if n not in ev.values]
            if missing:
                raise EvaluationError(f"evaluation lacks objective(s) {missing}; got {sorted(ev.values)}")
            values = [ev.values[n] for n in self.objective_names]
        else:
            values = list(ev.values)
        parts = {"objective": (values, len(self.objectives)), "measure": (list(ev.measures), len(self.measures)),
                 "constraint": (list(ev.constraints), len(self.constraints))}
        out = []
        for kind, (xs, n) in parts.items():
            if len(xs) != n:
                raise EvaluationError(f"evaluation returned {len(xs)} {kind} value(s); the problem declares {n}")
            try:
                xs = [float(x) for x in xs]
            except (TypeError, ValueError) as e:
                raise EvaluationError(f"{kind} values {xs!r} are not numbers") from e
            bad = [x for x in xs if not math.isfinite(x)]
            if bad:
                raise EvaluationError(f"{kind} values {xs!r} are not finite")
            out.append(xs)
        return out[0], out[1], out[2]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "doc": (type(self).__doc__ or "").strip().split("\n")[0],
            "objectives": [{"name": o.name, "direction": o.direction, "cheap": o.cheap} for o in self.objectives],
            "measures": [{"name": m.name, "low": m.low, "high": m.high,
                          **({"integer": True} if m.integer else {}), **({"labels": list(m.labels)} if m.labels else {})}
                         for m in self.measures],
            "constraints": list(self.constraints),
            "space": self.space.describe(),
            "resources": dataclasses.asdict(self.resources),
        }
