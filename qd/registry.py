"""Problem plug-ins, found through the entry-point group ``qd.problems``.

A third-party package registers its problems in its own ``pyproject.toml``::

    [project.entry-points."qd.problems"]
    my-problem = "my_package.module:MyProblem"
"""

from __future__ import annotations

import inspect
import tomllib
from importlib.metadata import EntryPoint, PackageNotFoundError, distribution, entry_points
from pathlib import Path
from typing import Any

from qd.checks import accepted_options, check_name, check_option_names
from qd.problem import Problem

GROUP = "qd.problems"


def _entry_points() -> dict[str, Any]:
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    try:
        distribution("qd")
    except PackageNotFoundError:  # run from a source checkout (PYTHONPATH=.): read our own pyproject
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        if pyproject.is_file():
            table = tomllib.loads(pyproject.read_text())["project"]["entry-points"].get(GROUP, {})
            found = {name: EntryPoint(name, value, GROUP) for name, value in table.items()} | found
    return found


def problem_names() -> list[str]:
    """The registered problem names, sorted."""
    return sorted(_entry_points())


def problem_class(name: str) -> type[Problem]:
    """The class registered as ``name`` (loaded from its entry point).

    Args:
        name: a registered problem name.

    Returns:
        The ``Problem`` subclass.

    Raises:
        UnknownName: ``name`` is not registered.
        TypeError: the entry point is not a ``Problem`` subclass.
    """
    eps = _entry_points()
    check_name(name, "problem", list(eps))
    cls = eps[name].load()
    if not (inspect.isclass(cls) and issubclass(cls, Problem)):
        raise TypeError(f"entry point {name!r} ({eps[name].value}) is not a qd.Problem subclass")
    return cls


def get_problem(name: str, **options: Any) -> Problem:
    """Build a registered problem; unknown options are rejected with the allowed ones.

    Args:
        name: a registered problem name.
        **options: the problem's keyword options, plus ``scaling`` (every problem's; see
            ``Problem.rescale``).

    Returns:
        The problem, with ``name`` and ``options`` set so a run can rebuild it.

    Raises:
        UnknownName: ``name`` is not registered.
        UnknownOption: an option the problem does not take.
        ValueError: a ``scaling`` not allowed. The problem's own option checks raise their
            errors through.
    """
    cls = problem_class(name)
    # ``scaling`` is every problem's option (qd.scaling): it is kept with the others so a run rebuilds it.
    scaling = options.pop("scaling", None)
    allowed = accepted_options(cls)
    check_option_names(options, None if allowed is None else [*allowed, "scaling"], f"problem {name!r}")
    problem = cls(**options)
    problem.name = name
    if scaling is not None:
        problem.rescale(scaling)
        options["scaling"] = scaling
    problem.options = dict(options)
    return problem


def list_problems() -> list[dict[str, Any]]:
    """One description per registered problem (``Problem.describe``); a plug-in that fails to load is
    listed as ``{"name": ..., "error": ...}``."""
    out = []
    for name in problem_names():
        try:
            out.append(get_problem(name).describe())
        except Exception as e:  # a broken plug-in must not hide the others
            out.append({"name": name, "error": f"{type(e).__name__}: {e}"})
    return out
