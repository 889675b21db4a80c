"""Every check of user input in one place, and the errors they raise.

Problems, strategies, evaluators, archives and experiment files check their options with these
functions, before any work starts. Each message names the owner and the option, the value given
and what is allowed, e.g. ``"map-elites: option sigma=-1 is not allowed; allowed: a number > 0"``.

Errors (all subclass ``QdError``; each also subclasses the builtin a caller would expect):

- ``OptionError`` (``ValueError``): a bad option of a problem, strategy, evaluator or archive;
- ``UnknownOption`` (``OptionError``): an option name that is not one of the allowed ones;
- ``UnknownName`` (``OptionError``): a problem, strategy or evaluator name that is not registered.

Errors about other causes live with their cause and subclass ``QdError`` too: ``SpaceError``
(``qd.space``), ``EvaluationError`` (``qd.problem``), ``ExperimentError`` (``qd.experiment``),
``StorageError``/``RunNotFound`` (``qd.storage_url``), ``RunInUse`` (``qd.run``).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np


class QdError(Exception):
    """Base of every error qd raises about its input or its state."""


class OptionError(QdError, ValueError):
    """A bad option value; the message names the owner, the option, the value and what is allowed."""


class UnknownOption(OptionError):
    """Option names that are not among the allowed ones."""


class UnknownName(OptionError):
    """A problem, strategy or evaluator name that is not registered."""


# --- types ------------------------------------------------------------------------------------
def is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def is_finite_number(value: Any) -> bool:
    """A finite real number (Python or numpy), not a bool."""
    return is_number(value) and math.isfinite(value)


# --- checks: each returns the value, converted, or raises OptionError ----------------------------
def _fail(owner: str, option: str, value: Any, allowed: str) -> OptionError:
    return OptionError(f"{owner}: option {option}={value!r} is not allowed; allowed: {allowed}")


def check_int(value: Any, option: str, owner: str, *, low: int | None = None, high: int | None = None,
              none: bool = False) -> int | None:
    """An integer in [``low``, ``high``] (either end open when None); None passes when ``none``.

    Raises:
        OptionError: naming ``owner``, ``option``, the value and the allowed range.
    """
    if value is None and none:
        return None
    if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        span = (f"an integer >= {low}" if high is None else f"an integer <= {high}" if low is None
                else f"an integer in [{low}, {high}]") if (low is not None or high is not None) else "an integer"
        raise _fail(owner, option, value, span + (" or null" if none else ""))
    return int(value)


def check_number(value: Any, option: str, owner: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, none: bool = False) -> float | None:
    """A finite number within the bounds (``low_open``/``high_open``: the end itself is excluded).

    Raises:
        OptionError: naming ``owner``, ``option``, the value and the allowed range.
    """
    if value is None and none:
        return None
    ok = is_finite_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high:g}")
        raise _fail(owner, option, value, ("a number " + " and ".join(parts) if parts else "a finite number")
                    + (" or null" if none else ""))
    return float(value)


def check_bool(value: Any, option: str, owner: str) -> bool:
    """True or False (numpy bools too; not 0 or 1).

    Raises:
        OptionError: naming ``owner``, ``option`` and the value.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise _fail(owner, option, value, "true or false")
    return bool(value)


def check_choice(value: Any, option: str, owner: str, allowed: Sequence[Any]) -> Any:
    """One of ``allowed``.

    Raises:
        OptionError: naming ``owner``, ``option``, the value and the choices (with a close match).
    """
    if isinstance(value, bool) or value not in allowed:
        from qd.suggest import did_you_mean

        hint = did_you_mean([value], [str(a) for a in allowed]) if isinstance(value, str) else ""
        raise _fail(owner, option, value, repr(list(allowed)) + hint)
    return value


def check_device(value: Any, option: str, owner: str) -> str:
    """A torch device name: ``"auto"`` (a GPU when there is one), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        OptionError: naming ``owner``, ``option`` and the value.
    """
    if not (value in ("auto", "cpu", "cuda") or (isinstance(value, str) and re.fullmatch(r"cuda:\d+", value))):
        raise _fail(owner, option, value, "'auto', 'cpu', 'cuda' or 'cuda:N'")
    return value


def check_numbers(value: Any, option: str, owner: str, length: int, what: str = "") -> tuple[float, ...]:
    """A list of ``length`` finite numbers (``what`` says what each is, for the message).

    Raises:
        OptionError: naming ``owner``, ``option``, the value and the allowed shape.
    """
    ok = (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == length
          and all(is_finite_number(v) for v in value))
    if not ok:
        raise _fail(owner, option, value, f"a list of {length} finite numbers{', ' + what if what else ''}")
    return tuple(float(v) for v in value)


# --- option names ------------------------------------------------------------------------------
def accepted_options(target: Callable[..., Any], skip: Iterable[str] = ("self",)) -> list[str] | None:
    """The keyword options ``target`` (a class or function) accepts; None when it takes ``**kwargs``."""
    fn = target.__init__ if inspect.isclass(target) else target
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    skip = set(skip)
    return [n for n, p in params.items() if n not in skip
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_option_names(options: Mapping[str, Any], allowed: Sequence[str] | None, owner: str,
                       extra: str = "") -> None:
    """Every name in ``options`` is ``allowed`` (None: anything is).

    Raises:
        UnknownOption: naming ``owner``, the unknown names, the allowed ones (and a close match).
    """
    if allowed is None:
        return
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        from qd.suggest import did_you_mean

        raise UnknownOption(f"{owner}: unknown option(s) {unknown}; allowed options: {list(allowed)}{extra}"
                            f"{did_you_mean(unknown, list(allowed))}")


def check_name(name: Any, kind: str, registered: Sequence[str]) -> str:
    """``name`` is one of the ``registered`` names of ``kind`` (problem, strategy, evaluator).

    Raises:
        UnknownName: naming the kind, the name, the registered names (and a close match).
    """
    if name not in registered:
        from qd.suggest import did_you_mean

        plural = kind[:-1] + "ies" if kind.endswith("y") else kind + "s"
        raise UnknownName(f"{kind} {name!r} is not registered; registered {plural}: {sorted(registered)}"
                          f"{did_you_mean([str(name)], list(registered))}")
    return name
