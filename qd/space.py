"""Configuration spaces: typed parameters, conditions, and the [0, 1]^d encoding.

Every parameter owns exactly one coordinate of the encoded vector, whatever its type, so a
space of ``d`` parameters is always searched as the unit cube ``[0, 1]^d``:

- ``Float``: linear, or logarithmic when ``log=True``; ``encode`` is the position in the range.
- ``Int``: the range is cut into ``high - low + 1`` equal bins (on a log scale when ``log=True``);
  decoding takes the bin, encoding returns the bin's centre.
- ``Categorical`` (and ``Bool``): *ordinal index* encoding, ``n`` equal bins in choice order.
  Index rather than one-hot keeps ``d`` fixed and small for pyribs emitters and lets BoTorch
  treat the coordinate as a categorical feature (see ``categorical_dims``).
- A parameter that is inactive (its condition does not hold) encodes to 0.5 and is dropped when
  decoding, so any vector decodes to a valid configuration.

``decode(encode(c)) == c`` for every valid configuration ``c``; ``snap(x)`` maps any vector to the
vector of the configuration it decodes to.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from qd.checks import QdError, is_number

Config = dict[str, Any]


def config_key(x: np.ndarray) -> bytes:
    """The identity of a configuration, from its encoded vector of shape (d,) (``Space.encode``):
    two configurations are the same one exactly when their keys are equal. Rounded to 12 decimals
    so that encode/decode round trips do not tell a configuration from itself. The only such
    definition in qd (``Space.key`` applies it to a configuration)."""
    return np.round(np.asarray(x, dtype=float), 12).tobytes()
Scalar = bool | int | float | str | None

INACTIVE = 0.5
_ABSENT = object()  # an inactive entry of a raw row (see ``Space.from_raw``)


class SpaceError(QdError, ValueError):
    """A configuration or a space definition that breaks the rules; the message says how."""


@dataclass(frozen=True)
class Param(ABC):
    """One named parameter; it owns one coordinate of the encoded vector.

    Args:
        name: the parameter's name, unique in its space.
        active_if: parent name -> the parent values that activate it (all must hold); empty:
            always active. An inactive parameter is absent from a configuration.
    """

    name: str
    active_if: Mapping[str, Sequence[Scalar]] = field(default_factory=dict, kw_only=True)

    @abstractmethod
    def check(self, value: Any) -> Any:
        """Check one value and normalise it to this parameter's type.

        Args:
            value: the value a configuration gives this parameter.

        Returns:
            The value in this parameter's own type (e.g. an integral float becomes an int).

        Raises:
            SpaceError: the value is not allowed; the message names the parameter and what is allowed.
        """

    @abstractmethod
    def encode(self, value: Any) -> float:
        """Map a valid value to its coordinate in [0, 1].

        Args:
            value: a value that ``check`` accepts.

        Returns:
            The coordinate, a float in [0, 1].
        """

    @abstractmethod
    def decode(self, u: float) -> Any:
        """Map a coordinate to a valid value; any number decodes (it is clipped to [0, 1] first).

        Args:
            u: the coordinate.

        Returns:
            A value that ``check`` accepts.
        """

    @abstractmethod
    def distribution(self) -> BaseDistribution:
        """The equivalent Optuna distribution (``FloatDistribution``, ``IntDistribution`` or
        ``CategoricalDistribution``)."""

    @abstractmethod
    def allowed(self) -> str:
        """The allowed values in words, as error messages quote them (e.g. ``"a float in [0, 1]"``)."""

    def _reject(self, value: Any) -> SpaceError:
        return SpaceError(f"parameter {self.name!r}: value {value!r} is not allowed; allowed: {self.allowed()}")


def _clip01(u: float) -> float:
    return min(max(float(u), 0.0), 1.0)


@dataclass(frozen=True)
class Float(Param):
    """A float parameter in ``[low, high]``, linear or, with ``log=True``, on a log scale.

    Args:
        name: the parameter's name.
        low: the lowest value.
        high: the highest value; must be > ``low``.
        log: encode the position on a log scale (needs ``low > 0``).
        active_if: parent name -> the parent values under which this parameter is active.

    Raises:
        SpaceError: ``low >= high``, or ``log`` with ``low <= 0``.
    """

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise SpaceError(f"parameter {self.name!r}: low={self.low} must be < high={self.high}")
        if self.log and self.low <= 0:
            raise SpaceError(f"parameter {self.name!r}: log scale needs low > 0, got low={self.low}")

    def check(self, value: Any) -> float:
        """A number in ``[low, high]`` as a float (bools are refused); else ``SpaceError``."""
        if not is_number(value):
            raise self._reject(value)
        v = float(value)
        if not (self.low <= v <= self.high):
            raise self._reject(value)
        return v

    def _t(self, v: float) -> float:
        return math.log(v) if self.log else v

    def encode(self, value: Any) -> float:
        """The value's position in the range (in log space when ``log``), in [0, 1]."""
        lo, hi = self._t(self.low), self._t(self.high)
        return _clip01((self._t(float(value)) - lo) / (hi - lo))

    def decode(self, u: float) -> float:
        """The value at position ``u`` (clipped to [0, 1]) of the range."""
        lo, hi = self._t(self.low), self._t(self.high)
        v = lo + _clip01(u) * (hi - lo)
        v = math.exp(v) if self.log else v
        return min(max(v, self.low), self.high)

    def distribution(self) -> FloatDistribution:
        """Optuna's ``FloatDistribution(low, high, log=log)``."""
        return FloatDistribution(self.low, self.high, log=self.log)

    def allowed(self) -> str:
        """The range in words, e.g. ``"a float in [0.0, 1.0] (log scale)"``."""
        return f"a float in [{self.low}, {self.high}]" + (" (log scale)" if self.log else "")


@dataclass(frozen=True)
class Int(Param):
    """An integer parameter in ``[low, high]``; ``[0, 1]`` is cut into ``high - low + 1`` equal bins
    (equal on a log scale with ``log=True``).

    Args:
        name: the parameter's name.
        low: the lowest value.
        high: the highest value; must be >= ``low``.
        log: bins equal on a log scale (needs ``low > 0``).
        active_if: parent name -> the parent values under which this parameter is active.

    Raises:
        SpaceError: ``low > high``, or ``log`` with ``low <= 0``.
    """

    low: int
    high: int
    log: bool = False

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise SpaceError(f"parameter {self.name!r}: low={self.low} must be <= high={self.high}")
        if self.log and self.low <= 0:
            raise SpaceError(f"parameter {self.name!r}: log scale needs low > 0, got low={self.low}")

    def check(self, value: Any) -> int:
        """An integer in ``[low, high]`` as an int (integral floats accepted, bools refused); else
        ``SpaceError``."""
        if isinstance(value, bool):
            raise self._reject(value)
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
        if not isinstance(value, (int, np.integer)) or not (self.low <= value <= self.high):
            raise self._reject(value)
        return int(value)

    # Bins are equal in t-space, with edges at t(v -/+ 0.5) so every integer gets a bin.
    def _edges(self) -> tuple[float, float]:
        if self.log:
            return math.log(self.low - 0.5) if self.low > 0.5 else math.log(0.5), math.log(self.high + 0.5)
        return self.low - 0.5, self.high + 0.5

    def encode(self, value: Any) -> float:
        """The centre of the value's bin, in [0, 1]."""
        lo, hi = self._edges()
        t = math.log(value) if self.log else float(value)
        return _clip01((t - lo) / (hi - lo))

    def decode(self, u: float) -> int:
        """The integer whose bin holds ``u`` (clipped to [0, 1])."""
        lo, hi = self._edges()
        t = lo + _clip01(u) * (hi - lo)
        v = math.exp(t) if self.log else t
        return int(min(max(math.floor(v + 0.5), self.low), self.high))  # half-up: equal bins

    def distribution(self) -> IntDistribution:
        """Optuna's ``IntDistribution(low, high, log=log)``."""
        return IntDistribution(self.low, self.high, log=self.log)

    def allowed(self) -> str:
        """The range in words, e.g. ``"an integer in [1, 8]"``."""
        return f"an integer in [{self.low}, {self.high}]" + (" (log scale)" if self.log else "")


@dataclass(frozen=True)
class Categorical(Param):
    """A choice among ``choices`` (scalars), encoded by ordinal index: ``n`` equal bins in choice order.

    Args:
        name: the parameter's name.
        choices: the allowed values, at least one, none repeated.
        active_if: parent name -> the parent values under which this parameter is active.

    Raises:
        SpaceError: no choices, or a repeated choice.
    """

    choices: tuple[Scalar, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        if len(self.choices) < 1:
            raise SpaceError(f"parameter {self.name!r}: needs at least one choice")
        if len(set(map(repr, self.choices))) != len(self.choices):
            raise SpaceError(f"parameter {self.name!r}: choices {self.choices!r} repeat a value")

    def index(self, value: Any) -> int:
        """The position of ``value`` among ``choices``.

        Numbers match numeric choices of another numeric type (``1`` matches ``1.0``), but a bool never
        matches an int, since ``True == 1`` would pick another choice.

        Args:
            value: a candidate value.

        Returns:
            Its index in ``choices``.

        Raises:
            SpaceError: ``value`` is not one of the choices.
        """
        for i, c in enumerate(self.choices):
            if type(c) is type(value) and c == value:
                return i
        # Accept numpy scalars and ints for float choices, but never bools for ints (True == 1).
        if not isinstance(value, bool):
            for i, c in enumerate(self.choices):
                if not isinstance(c, bool) and isinstance(c, (int, float)) and isinstance(value, (int, float, np.number)) and c == value:
                    return i
        raise self._reject(value)

    def check(self, value: Any) -> Scalar:
        """The choice equal to ``value`` (see ``index``); else ``SpaceError``."""
        return self.choices[self.index(value)]

    def encode(self, value: Any) -> float:
        """The centre of the choice's bin, ``(index + 0.5) / n``."""
        return (self.index(value) + 0.5) / len(self.choices)

    def decode(self, u: float) -> Scalar:
        """The choice whose bin holds ``u`` (clipped to [0, 1])."""
        return self.choices[min(int(_clip01(u) * len(self.choices)), len(self.choices) - 1)]

    def distribution(self) -> CategoricalDistribution:
        """Optuna's ``CategoricalDistribution(choices)``."""
        return CategoricalDistribution(self.choices)

    def allowed(self) -> str:
        """The choices in words, e.g. ``"one of ['a', 'b']"``."""
        return f"one of {list(self.choices)!r}"


def Bool(name: str, **kw: Any) -> Categorical:  # noqa: N802 - reads like the other parameter types
    """A boolean parameter: a categorical over (False, True)."""
    return Categorical(name, (False, True), **kw)


class Space:
    """An ordered set of parameters; parents come before the parameters they condition.

    Args:
        params: the parameters in coordinate order. A parameter's ``active_if`` may name only
            parameters before it, with values those parents allow.

    Raises:
        SpaceError: a name defined twice, a condition on a later or unknown parameter, or a
            condition value its parent does not allow.
    """

    def __init__(self, params: Sequence[Param]):
        self.params: tuple[Param, ...] = tuple(params)
        self._by_name: dict[str, Param] = {}
        for p in self.params:
            if p.name in self._by_name:
                raise SpaceError(f"parameter {p.name!r} is defined twice")
            for parent, values in p.active_if.items():
                if parent not in self._by_name:
                    raise SpaceError(
                        f"parameter {p.name!r}: condition parent {parent!r} must be defined before it; "
                        f"defined so far: {list(self._by_name)}"
                    )
                for v in values:
                    self._by_name[parent].check(v)
            self._by_name[p.name] = p

    def key(self, config: Config) -> bytes:
        """The identity of a configuration (``config_key`` of its encoding); inactive conditional
        parameters do not count.

        Args:
            config: a valid configuration.

        Returns:
            Bytes, equal for two configurations exactly when they are the same one.

        Raises:
            SpaceError: ``config`` is not valid in this space.
        """
        return config_key(self.encode(config))

    def __len__(self) -> int:
        return len(self.params)

    def __iter__(self):
        return iter(self.params)

    def __getitem__(self, name: str) -> Param:
        return self._by_name[name]

    @property
    def names(self) -> list[str]:
        """Parameter names in coordinate order."""
        return [p.name for p in self.params]

    @property
    def dim(self) -> int:
        """The number of parameters ``d``: the length of an encoded vector."""
        return len(self.params)

    @property
    def is_conditional(self) -> bool:
        """Whether any parameter has a condition (``active_if``)."""
        return any(p.active_if for p in self.params)

    def is_active(self, param: Param, config: Mapping[str, Any]) -> bool:
        """Whether ``param``'s condition holds in ``config`` (its parents present, active, and at one of
        the activating values).

        Args:
            param: a parameter of this space.
            config: a (possibly partial) configuration holding the parents.

        Returns:
            True when ``param`` is active.
        """
        for parent, values in param.active_if.items():
            if parent not in config or not self.is_active(self._by_name[parent], config):
                return False
            # Compare in raw units (a categorical by its choice index): for choices (0, False),
            # False == 0 in Python but is another choice.
            parent_param = self._by_name[parent]
            if _raw_value(parent_param, config[parent]) not in [_raw_value(parent_param, v) for v in values]:
                return False
        return True

    def validate(self, config: Mapping[str, Any]) -> Config:
        """Check a configuration and normalise its values.

        Args:
            config: parameter name -> value, one entry per active parameter.

        Returns:
            A new dict, in space order, with each value normalised by its parameter's ``check``.

        Raises:
            SpaceError: not a mapping, an unknown name, a missing active parameter, a given inactive
                one, or a value not allowed; the message names the parameter.
        """
        if not isinstance(config, Mapping):
            raise SpaceError(f"a configuration must be a mapping of parameter names to values, got {config!r}")
        unknown = sorted(set(config) - set(self._by_name))
        if unknown:
            raise SpaceError(f"unknown parameter(s) {unknown}; the space has {self.names}")
        out: Config = {}
        for p in self.params:
            active = self.is_active(p, out)
            if not active:
                if p.name in config:
                    cond = ", ".join(f"{k} in {list(v)!r}" for k, v in p.active_if.items())
                    raise SpaceError(f"parameter {p.name!r} is given but inactive: it is active only when {cond}")
                continue
            if p.name not in config:
                raise SpaceError(f"parameter {p.name!r} is missing; allowed: {p.allowed()}")
            out[p.name] = p.check(config[p.name])
        return out

    def encode(self, config: Mapping[str, Any]) -> np.ndarray:
        """Encode one configuration.

        Args:
            config: a valid configuration.

        Returns:
            (d,) array in [0, 1]; inactive parameters are 0.5.

        Raises:
            SpaceError: ``config`` is not valid (see ``validate``).
        """
        config = self.validate(config)
        return np.array([p.encode(config[p.name]) if p.name in config else INACTIVE for p in self.params])

    def encode_many(self, configs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Encode configurations.

        Args:
            configs: n valid configurations.

        Returns:
            (n, d) array in [0, 1].

        Raises:
            SpaceError: a configuration is not valid.
        """
        return np.array([self.encode(c) for c in configs]).reshape(len(configs), self.dim)

    def decode(self, x: Sequence[float]) -> Config:
        """Decode one vector; every vector gives a valid configuration.

        Args:
            x: (d,) vector; values outside [0, 1] are clipped.

        Returns:
            The configuration, without its inactive parameters.

        Raises:
            SpaceError: ``x`` does not have length d.
        """
        x = np.asarray(x, dtype=float).reshape(-1)
        if x.shape[0] != self.dim:
            raise SpaceError(f"a vector for this space has length {self.dim}, got {x.shape[0]}")
        out: Config = {}
        for p, u in zip(self.params, x):
            if self.is_active(p, out):
                out[p.name] = p.decode(u)
        return out

    def decode_many(self, X: np.ndarray) -> list[Config]:
        """Decode vectors.

        Args:
            X: (n, d) array (or one (d,) vector); values outside [0, 1] are clipped.

        Returns:
            A list of n valid configurations.

        Raises:
            SpaceError: rows do not have length d.
        """
        return [self.decode(x) for x in np.atleast_2d(X)]

    def snap(self, X: np.ndarray) -> np.ndarray:
        """Map vectors to the vectors of the configurations they decode to.

        Args:
            X: (n, d) array.

        Returns:
            (n, d) array, ``encode_many(decode_many(X))``.
        """
        return self.encode_many(self.decode_many(X))

    def sample(self, n: int, rng: np.random.Generator) -> list[Config]:
        """Draw configurations uniformly in the encoded cube.

        Args:
            n: how many.
            rng: the generator to draw from.

        Returns:
            A list of n valid configurations.
        """
        return self.decode_many(rng.random((n, self.dim)))

    # --- raw matrices: one row per configuration, one float column per parameter -----------
    # A raw row holds each parameter in its own units: floats as they are, integers as
    # float-valued integers, categoricals as the index of their choice, and NaN where a
    # conditional parameter is inactive. It is how the record stores configurations (exact, and
    # columnar) and what vectorised problems (``Problem.evaluate_batch``) receive.
    def to_raw(self, configs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Configurations as a raw matrix (see the comment above).

        Args:
            configs: n valid configurations.

        Returns:
            (n, d) float array of raw values, NaN where a parameter is inactive.
        """
        R = np.full((len(configs), self.dim), np.nan)
        for i, c in enumerate(configs):
            for j, p in enumerate(self.params):
                if p.name in c:
                    v = c[p.name]
                    R[i, j] = p.index(v) if isinstance(p, Categorical) else float(v)
        return R

    def from_raw(self, R: np.ndarray) -> list[Config]:
        """Configurations from a raw matrix; the inverse of ``to_raw``.

        Args:
            R: (n, d) raw values (or one (d,) row).

        Returns:
            A list of n configurations; NaN entries are left out.
        """
        R = np.atleast_2d(np.asarray(R, dtype=float))
        cols = []
        # ``_ABSENT`` marks inactive entries: None is a value a categorical may take.
        for j, p in enumerate(self.params):
            col = R[:, j]
            if isinstance(p, Categorical):
                cols.append([_ABSENT if v != v else p.choices[int(v)] for v in col.tolist()])
            elif isinstance(p, Int):
                cols.append([_ABSENT if v != v else int(v) for v in col.tolist()])
            else:
                cols.append([_ABSENT if v != v else v for v in col.tolist()])
        names = self.names
        return [{n: v for n, v in zip(names, row) if v is not _ABSENT} for row in zip(*cols)] if cols else \
            [{} for _ in range(len(R))]

    def _linear_box(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(low, high, high - low) when every parameter is a plain linear ``Float`` without
        conditions: (d,) arrays, or floats when all parameters share their bounds (a scalar
        broadcasts over a batch at half the cost of a row)."""
        if not hasattr(self, "_box"):
            self._box = None
            if self.params and all(type(p) is Float and not p.log and not p.active_if for p in self.params):
                lo, hi = (np.array([getattr(p, end) for p in self.params], dtype=float) for end in ("low", "high"))
                if (lo == lo[0]).all() and (hi == hi[0]).all():
                    lo, hi = float(lo[0]), float(hi[0])
                self._box = (lo, hi, hi - lo)
        return self._box

    def decode_raw(self, X: np.ndarray) -> np.ndarray:
        """Decode vectors straight to raw values, without building configurations.

        Args:
            X: (n, d) encoded array; values outside [0, 1] are clipped.

        Returns:
            (n, d) raw array, row-wise equal to ``to_raw(decode_many(X))``.
        """
        box = self._linear_box()
        if box is not None:  # all plain floats: in place, one array (a batch of 10^6 rows is decoded per ask)
            lo, hi, span = box
            R = np.maximum(np.atleast_2d(np.asarray(X, dtype=float)), 0.0)  # ufuncs: np.clip's checks cost more
            np.minimum(R, 1.0, out=R)
            R *= span
            R += lo
            np.maximum(R, lo, out=R)
            return np.minimum(R, hi, out=R)
        U = np.clip(np.atleast_2d(np.asarray(X, dtype=float)), 0.0, 1.0)
        R = np.empty_like(U)
        active = np.ones(U.shape, dtype=bool)
        index = {p.name: j for j, p in enumerate(self.params)}
        for j, p in enumerate(self.params):
            u = U[:, j]
            if type(p) not in (Float, Int, Categorical):  # a subclass with its own encoding
                R[:, j] = [_raw_value(p, p.decode(x)) for x in u.tolist()]
            elif isinstance(p, Float):
                lo, hi = p._t(p.low), p._t(p.high)
                v = lo + u * (hi - lo)
                R[:, j] = np.clip(np.exp(v) if p.log else v, p.low, p.high)
            elif isinstance(p, Int):
                lo, hi = p._edges()
                t = lo + u * (hi - lo)
                v = np.exp(t) if p.log else t
                R[:, j] = np.clip(np.floor(v + 0.5), p.low, p.high)
            else:
                k = len(p.choices)
                R[:, j] = np.minimum((u * k).astype(np.int64), k - 1)
            for parent, values in p.active_if.items():
                q = index[parent]
                parent_param = self.params[q]
                allowed = [_raw_value(parent_param, v) for v in values]
                active[:, j] &= active[:, q] & np.isin(R[:, q], allowed)
        R[~active] = np.nan
        return R

    def encode_raw(self, R: np.ndarray) -> np.ndarray:
        """Encode raw values straight to vectors, without building configurations.

        Args:
            R: (n, d) raw array (NaN for inactive parameters).

        Returns:
            (n, d) encoded array in [0, 1], row-wise equal to ``encode_many(from_raw(R))``.
        """
        R = np.atleast_2d(np.asarray(R, dtype=float))
        box = self._linear_box()
        if box is not None:  # in place, as ``decode_raw``
            lo, _, span = box
            X = R - lo
            X /= span
            np.maximum(X, 0.0, out=X)
            return np.minimum(X, 1.0, out=X)
        X = np.empty_like(R)
        for j, p in enumerate(self.params):
            r = R[:, j]
            if type(p) not in (Float, Int, Categorical):  # a subclass with its own encoding
                X[:, j] = [INACTIVE if v != v else p.encode(_from_raw_value(p, v)) for v in r.tolist()]
                continue
            with np.errstate(invalid="ignore", divide="ignore"):
                if isinstance(p, Float):
                    lo, hi = p._t(p.low), p._t(p.high)
                    x = ((np.log(r) if p.log else r) - lo) / (hi - lo)
                elif isinstance(p, Int):
                    lo, hi = p._edges()
                    x = ((np.log(r) if p.log else r) - lo) / (hi - lo)
                else:
                    x = (r + 0.5) / len(p.choices)
            X[:, j] = np.where(np.isnan(r), INACTIVE, np.clip(x, 0.0, 1.0))
        return X

    # --- Optuna -------------------------------------------------------------------------
    def distributions(self) -> dict[str, BaseDistribution]:
        """Parameter name -> its Optuna distribution, for every parameter."""
        return {p.name: p.distribution() for p in self.params}

    def suggest(self, trial: optuna.Trial) -> Config:
        """Suggest a configuration through an Optuna trial, define-by-run: only active parameters are
        suggested, in order.

        Args:
            trial: the Optuna trial to suggest with.

        Returns:
            The suggested configuration.
        """
        out: Config = {}
        for p in self.params:
            if self.is_active(p, out):
                d = p.distribution()
                if isinstance(d, FloatDistribution):
                    out[p.name] = trial.suggest_float(p.name, d.low, d.high, log=d.log)
                elif isinstance(d, IntDistribution):
                    out[p.name] = trial.suggest_int(p.name, d.low, d.high, log=d.log)
                else:
                    out[p.name] = trial.suggest_categorical(p.name, d.choices)
        return out

    def active_distributions(self, config: Mapping[str, Any]) -> dict[str, BaseDistribution]:
        """Parameter name -> Optuna distribution, for the parameters present in ``config``."""
        return {p.name: p.distribution() for p in self.params if p.name in config}

    # --- structure for vector optimisers ---------------------------------------------------
    @property
    def categorical_dims(self) -> dict[int, int]:
        """Index of each categorical coordinate -> its number of choices."""
        return {i: len(p.choices) for i, p in enumerate(self.params) if isinstance(p, Categorical)}

    @property
    def integer_dims(self) -> dict[int, int]:
        """Index of each integer coordinate -> its number of values."""
        return {i: p.high - p.low + 1 for i, p in enumerate(self.params) if isinstance(p, Int)}

    def describe(self) -> list[dict[str, Any]]:
        """One row per parameter: ``name``, ``type``, ``allowed``, and ``active_if`` where conditional
        (what ``qd problems`` prints)."""
        rows = []
        for p in self.params:
            row = {"name": p.name, "type": type(p).__name__.lower(), "allowed": p.allowed()}
            if p.active_if:
                row["active_if"] = {k: list(v) for k, v in p.active_if.items()}
            rows.append(row)
        return rows


def _raw_value(param: Param, value: Any) -> float:
    """One value of ``param`` in raw units (see ``Space.to_raw``)."""
    return float(param.index(value)) if isinstance(param, Categorical) else float(param.check(value))


def _from_raw_value(param: Param, value: float) -> Any:
    """One raw value of ``param`` back in its own units."""
    if isinstance(param, Categorical):
        return param.choices[int(value)]
    return int(value) if isinstance(param, Int) else float(value)
