"""Problems: what is searched (a space), what is optimised (objectives), what is mapped (measures).

A problem is a plain object; plug-ins register a *class* under the entry-point group
``qd.problems`` and are built with keyword options (``get_problem("zdt1", dim=6)``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import traceback
import reprlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from qd.checks import QdError
from qd.space import Config, Space

if TYPE_CHECKING:
    from qd.scaling import Scaling

Direction = Literal["minimize", "maximize"]


def sign_of(direction: str) -> float:
    """+1.0 for "minimize", -1.0 for "maximize": multiply a value by it to get one to minimise.
    The only meaning of "sign" in qd."""
    return 1.0 if direction == "minimize" else -1.0


def signs_of(directions: Sequence[str]) -> np.ndarray:
    """(m,) ``sign_of`` each direction."""
    return np.array([sign_of(d) for d in directions])


@dataclass(frozen=True)
class Objective:
    """An objective. ``cheap`` ones are computed by ``Problem.cheap_values`` without evaluating.

    ``scale`` and ``bounds`` say in which units hypervolumes, MOQD scores and plots measure it
    (``qd.scaling``): ``scale="log"`` for counts and costs spanning decades (``log10(1 + value)``),
    ``bounds=(low, high)`` for a stated range of interest, mapped to [0, 1]. Neither changes what
    is recorded, nor which configurations are better.

    Args:
        name: the objective's name (the key of ``Evaluation.values`` given as a mapping).
        direction: ``"minimize"`` or ``"maximize"``.
        cheap: known from the configuration alone (``Problem.cheap_values``).
        scale: ``"linear"`` or ``"log"``.
        bounds: ``(low, high)`` with low < high, or None.

    Raises:
        ValueError: a direction, scale or bounds not allowed.
    """

    name: str
    direction: Direction = "minimize"
    cheap: bool = False
    scale: str = "linear"
    bounds: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.direction not in ("minimize", "maximize"):
            raise ValueError(f"objective {self.name!r}: direction {self.direction!r}; allowed: 'minimize', 'maximize'")
        from qd.scaling import check_scale

        object.__setattr__(self, "bounds", check_scale(self.scale, self.bounds, f"objective {self.name!r}"))

    @property
    def sign(self) -> float:
        """``sign_of(direction)``: multiply by this to turn the objective into one to minimise."""
        return sign_of(self.direction)


@dataclass(frozen=True)
class Measure:
    """A feature of a solution that places it in the archive; ``low``/``high`` bound the map.

    Args:
        name: the measure's name.
        low: the map's lower bound.
        high: the map's upper bound; must be > ``low``.
        integer: the measure takes whole values only (a layer count, a depth). Its map has one bin
            per whole value in ``[low, high]`` by default, each bin centred on its value, with
            integer ticks.
        labels: a categorical measure (``Measure.categorical``): value ``i`` is ``labels[i]``.

    Raises:
        ValueError: ``low >= high``, or an integer measure with no whole value in range.
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
        """A measure whose value is the index of one of ``labels`` (0, 1, ...).

        Args:
            name: the measure's name.
            labels: the categories, at least one, in value order.

        Returns:
            An integer ``Measure`` over ``0 .. len(labels) - 1`` with ``labels`` set.

        Raises:
            ValueError: ``labels`` is empty.
        """
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
    """What one evaluation needs, as evaluators reserve it.

    Args:
        cpus: CPU cores.
        gpus: GPUs; fractional values let several evaluations share a GPU.
        memory_mb: memory to reserve (None: no reservation).
        timeout_s: a bound on one evaluation's time (None: none).
    """

    cpus: float = 1.0
    gpus: float = 0.0
    memory_mb: int | None = None
    timeout_s: float | None = None


@dataclass
class Evaluation:
    """What ``Problem.evaluate`` returns; ``Problem.normalise`` checks it.

    Args:
        values: one number per objective, a sequence in declared order or a mapping by name.
        measures: one number per measure, in declared order.
        constraints: one number per constraint, feasible when <= 0.
        metadata: anything JSON-serialisable (wall time, peak memory, ...), at most
            ``MAX_METADATA_BYTES`` as JSON.
    """

    values: Sequence[float] | Mapping[str, float]
    measures: Sequence[float] = ()
    constraints: Sequence[float] = ()
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchEvaluation:
    """What ``Problem.evaluate_batch`` returns for n configurations, as arrays.

    ``values``: (n, m) objective values in declared order. ``measures``: (n, k) or None when the
    problem has none. ``constraints``: (n, c) or None, feasible when <= 0. ``errors``: None, or n
    entries, each None for a row that evaluated or the reason it failed (its numbers are then
    ignored). A row whose numbers are not finite is recorded as failed, as for ``evaluate``.
    """

    values: np.ndarray
    measures: np.ndarray | None = None
    constraints: np.ndarray | None = None
    errors: Sequence[str | None] | None = None


class EvaluationError(QdError, ValueError):
    """An evaluation result that cannot be recorded as complete (wrong type or shape, NaN, inf, too large)."""


#: Largest magnitude of a recorded objective, measure or constraint value. Sums over 10^6 archive
#: cells (QD scores) and hypervolumes of up to three objectives of such values stay finite in floats.
MAX_ABS_VALUE = 1e100
#: Largest size of one evaluation's metadata, as JSON: metadata is for small facts (times, memory,
#: sizes); a store of 10^6 trials must stay readable. Write big artefacts to files and record paths.
MAX_METADATA_BYTES = 64 * 1024


def _json_default(o: Any) -> Any:
    """What the store does with a value JSON does not know: numpy scalars as numbers, the rest as text."""
    return o.item() if hasattr(o, "item") else str(o)


def check_metadata(metadata: Any) -> None:
    """Raise ``EvaluationError`` unless ``metadata`` is None or a mapping storable as at most
    ``MAX_METADATA_BYTES`` of JSON."""
    if metadata is None:
        return
    if not isinstance(metadata, Mapping):
        raise EvaluationError(f"metadata {_short_repr(metadata)} is a {type(metadata).__name__}; allowed: a dict")
    if not metadata:
        return
    try:
        size = len(json.dumps(dict(metadata), default=_json_default).encode())
    except Exception as e:  # noqa: BLE001 - circular, unsortable keys, objects whose item() fails, ...
        raise EvaluationError(f"metadata cannot be stored as JSON: {type(e).__name__}: {e}") from e
    if size > MAX_METADATA_BYTES:
        raise EvaluationError(f"metadata is {size} bytes as JSON; allowed: at most {MAX_METADATA_BYTES} bytes "
                              f"(write large results to a file and record its path)")


def _as_list(kind: str, xs: Any) -> list[Any]:
    if xs is None:
        return []
    if type(xs) in (list, tuple):  # the common case, without the abstract-class checks below
        return list(xs)
    if isinstance(xs, (str, bytes)) or not isinstance(xs, Iterable):
        raise EvaluationError(f"{kind} values {_short_repr(xs)} are a {type(xs).__name__}; allowed: a sequence of "
                              f"numbers")
    return list(xs)


def _short_repr(obj: Any) -> str:
    try:
        return reprlib.repr(obj)
    except Exception:  # noqa: BLE001 - a broken __repr__
        return f"<{type(obj).__name__} object>"


class Problem(ABC):
    """A search problem: subclass it and set ``space`` and ``objectives`` (and optionally the rest)
    in ``__init__``; implement ``evaluate``.

    Plug-ins register the class under the entry-point group ``qd.problems``; keyword arguments of
    ``__init__`` are the problem's options. The class attributes below are its declared extension
    points, each with a default: ``measures`` and ``constraints`` (empty), ``resources``,
    ``fidelity``, ``reference_point``, ``vectorized``, and the methods ``evaluate_batch``,
    ``cheap_values``, ``cheap_measures`` and ``max_hypervolume``.
    """

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
    #: The hypervolume of the true Pareto front against ``reference_point``, when known (test
    #: problems; a constant or a property): progress then shows the share reached. None: unknown.
    max_hypervolume: float | None = None
    #: Options it was built with; set by ``qd.registry.get_problem`` so a run can rebuild it.
    options: dict[str, Any]
    #: True when ``evaluate_batch`` computes a whole batch with array operations: the in-process
    #: evaluator then hands it every batch a strategy proposes, and nothing per configuration is
    #: built on the way (see ``experiments/bench_scale.py``).
    vectorized: ClassVar[bool] = False
    #: The most configurations ``evaluate_population`` takes at once. Above 1, evaluators hand one
    #: worker up to this many pending configurations in one call (several trainings sharing one
    #: resident model, say); a problem may set it per instance from an option.
    max_population: int = 1

    @abstractmethod
    def evaluate(self, config: Config, seed: int) -> Evaluation:
        """Evaluate one valid configuration.

        Args:
            config: a configuration valid in ``space`` (inactive parameters absent).
            seed: the evaluation's seed; use it for every random choice, so a re-run repeats it.

        Returns:
            An ``Evaluation`` with one value per objective, measure and constraint.

        Raises:
            Exception: anything; the evaluator records it as the trial's failure reason and the run
                goes on.
        """

    def evaluate_batch(self, X: np.ndarray, seeds: np.ndarray) -> BatchEvaluation:
        """Evaluate n valid configurations at once.

        Args:
            X: (n, d) raw values, one column per parameter in space order (``Space.to_raw``:
                floats as they are, integers as float-valued integers, categoricals as the index of
                their choice, NaN for inactive conditional parameters).
            seeds: (n,) integer seeds, one per row.

        Returns:
            A ``BatchEvaluation`` with n rows. The default calls ``evaluate`` row by row; an
            exception fails that row only. Vectorised problems override it and set ``vectorized``.
        """
        configs = self.space.from_raw(X)
        n, m, k, c = len(configs), len(self.objectives), len(self.measures), len(self.constraints)
        values, measures, constraints = np.full((n, m), np.nan), np.full((n, k), np.nan), np.full((n, c), np.nan)
        errors: list[str | None] = [None] * n
        for i, (config, seed) in enumerate(zip(configs, np.asarray(seeds).tolist())):
            try:
                v, mm, cc = self.normalise(self.evaluate(config, int(seed)))
                values[i], measures[i], constraints[i] = v, mm, cc
            except EvaluationError as e:
                errors[i] = f"invalid result: {e}"
            except Exception as e:
                errors[i] = f"exception: {type(e).__name__}: {e}\n" + "".join(traceback.format_exception(e))[-2000:]
        return BatchEvaluation(values, measures if k else None, constraints if c else None, errors)

    def evaluate_population(self, configs: Sequence[Config], seeds: Sequence[int]) -> list[Evaluation | Exception]:
        """Evaluate up to ``max_population`` valid configurations in one call.

        Args:
            configs: n configurations (n <= ``max_population``).
            seeds: n integer seeds, one per configuration.

        Returns:
            n entries in the order given: the ``Evaluation`` of each configuration, or the exception
            that failed it (one failure fails that configuration only). The default calls
            ``evaluate`` one by one; problems that share work between configurations override it.
        """
        out: list[Evaluation | Exception] = []
        for config, seed in zip(configs, seeds, strict=True):
            try:
                out.append(self.evaluate(config, int(seed)))
            except Exception as e:  # noqa: BLE001 - returned in its place, as documented
                out.append(e)
        return out

    def cheap_measures(self, config: Config) -> dict[str, float]:
        """Values of measures known from the configuration alone, without evaluating (``sail``
        uses them instead of modelling them). The default knows none: an empty mapping.

        Args:
            config: a valid configuration.

        Returns:
            Measure name -> value, for the measures it knows.
        """
        return {}

    def cheap_values(self, config: Config) -> dict[str, float]:
        """Values of the objectives declared ``cheap``, computed without an evaluation.

        Args:
            config: a valid configuration.

        Returns:
            Objective name -> value, for the cheap objectives. The default: an empty mapping.

        Raises:
            TypeError: the problem declares cheap objectives but does not override this.
        """
        cheap = [o.name for o in self.objectives if o.cheap]
        if cheap:
            raise TypeError(f"{type(self).__name__} declares cheap objectives {cheap} but no cheap_values()")
        return {}

    # --- helpers --------------------------------------------------------------------------
    @property
    def objective_names(self) -> list[str]:
        """Objective names in declared order."""
        return [o.name for o in self.objectives]

    @property
    def directions(self) -> list[str]:
        """Each objective's direction (``"minimize"`` or ``"maximize"``), in declared order."""
        return [o.direction for o in self.objectives]

    @property
    def scaling(self) -> Scaling:
        """The objectives' scales and bounds (``qd.scaling``): the units of hypervolumes and plots."""
        from qd.scaling import Scaling

        return Scaling.of(self.objectives)

    def rescale(self, spec: Mapping[str, Any]) -> None:
        """Give objectives a scale and bounds (the problem option ``scaling``; see ``qd.scaling.parse``).

        Args:
            spec: objective name -> ``"log"``, ``"linear"``, ``[low, high]``, or a mapping with ``scale`` and
                ``bounds``.

        Raises:
            ValueError: naming the objective, the value and what is allowed.
        """
        from qd.scaling import parse

        given = parse(spec, self.objective_names)
        self.objectives = tuple(dataclasses.replace(o, **given[o.name]) if o.name in given else o
                                for o in self.objectives)

    @property
    def measure_names(self) -> list[str]:
        """Measure names in declared order."""
        return [m.name for m in self.measures]

    def normalise(self, ev: Any) -> tuple[list[float], list[float], list[float]]:
        """Check whatever ``evaluate`` returned.

        Args:
            ev: the returned object.

        Returns:
            ``(values, measures, constraints)``: lists of m, k and c floats in declared order.

        Raises:
            EvaluationError: (never anything else) naming what is wrong, for a result that is not an
                ``Evaluation``, has the wrong number of values, values that are not finite numbers or
                larger in magnitude than ``MAX_ABS_VALUE``, or metadata that is not a JSON-storable
                mapping of at most ``MAX_METADATA_BYTES``.
        """
        if not isinstance(ev, Evaluation):
            hint = ("; wrap the numbers: Evaluation(values=[...])"
                    if isinstance(ev, (Sequence, Mapping, int, float)) and not isinstance(ev, (str, bytes)) else "")
            raise EvaluationError(f"evaluate returned {type(ev).__name__} {_short_repr(ev)}, not a qd.Evaluation{hint}")
        try:
            if type(ev.values) not in (list, tuple) and isinstance(ev.values, Mapping):
                missing = [n for n in self.objective_names if n not in ev.values]
                if missing:
                    raise EvaluationError(f"evaluation lacks objective(s) {missing}; got {sorted(map(str, ev.values))}")
                values = [ev.values[n] for n in self.objective_names]
            else:
                values = _as_list("objective", ev.values)
            parts = {"objective": (values, len(self.objectives)),
                     "measure": (_as_list("measure", ev.measures), len(self.measures)),
                     "constraint": (_as_list("constraint", ev.constraints), len(self.constraints))}
            out = []
            for kind, (xs, n) in parts.items():
                if len(xs) != n:
                    raise EvaluationError(f"evaluation returned {len(xs)} {kind} value(s); the problem declares {n}")
                try:
                    xs = [float(x) for x in xs]
                except Exception as e:  # noqa: BLE001 - any object may come back from a plug-in
                    raise EvaluationError(f"{kind} values {_short_repr(xs)} are not numbers") from e
                if not all(math.isfinite(x) for x in xs):
                    raise EvaluationError(f"{kind} values {xs!r} are not finite")
                big = [x for x in xs if abs(x) > MAX_ABS_VALUE] if xs else xs
                if big:
                    raise EvaluationError(f"{kind} values {big!r} exceed {MAX_ABS_VALUE:g} in magnitude (the bound "
                                          f"on recorded values: QD scores and hypervolumes of larger ones overflow)")
                out.append(xs)
            check_metadata(ev.metadata)
        except EvaluationError:
            raise
        except Exception as e:  # noqa: BLE001 - a plug-in's odd object must fail its trial, not the driver
            raise EvaluationError(f"the evaluation could not be read: {type(e).__name__}: {e}") from e
        return out[0], out[1], out[2]

    def describe(self) -> dict[str, Any]:
        """The problem as a plain dict (name, first doc line, objectives, measures, constraints, space,
        resources), as ``qd problems`` prints it."""
        return {
            "name": self.name,
            "doc": (type(self).__doc__ or "").strip().split("\n")[0],
            "objectives": [{"name": o.name, "direction": o.direction, "cheap": o.cheap,
                            **({"scale": o.scale} if o.scale != "linear" else {}),
                            **({"bounds": list(o.bounds)} if o.bounds is not None else {})} for o in self.objectives],
            "measures": [{"name": m.name, "low": m.low, "high": m.high,
                          **({"integer": True} if m.integer else {}), **({"labels": list(m.labels)} if m.labels else {})}
                         for m in self.measures],
            "constraints": list(self.constraints),
            "space": self.space.describe(),
            "resources": dataclasses.asdict(self.resources),
        }
