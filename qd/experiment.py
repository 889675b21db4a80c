"""Experiment files (TOML) and their validation, done before any evaluation starts.

```toml
[run]
name = "quickstart"            # the Optuna study name
storage = "sqlite:///qd.db"    # any Optuna storage URL
budget = 60                    # finished evaluations
workers = 2                    # evaluations in flight
evaluator = "process"          # inprocess | process | ray
seed = 0
time_limit_s = 600             # optional wall-time limit
timeout_s = 120                # optional per-evaluation timeout

[problem]
name = "zdt1"
options = { dim = 6 }          # or a [problem.options] table

[strategy]
name = "tpe"
options = {}

[evaluator]
options = {}                   # e.g. { address = "auto" } for ray
```
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qd.checks import QdError, is_int, is_number

DEFAULT_STORAGE = "sqlite:///qd.db"


class ExperimentError(QdError, ValueError):
    """An experiment file or flag that is wrong; the message names field, value and what is allowed."""


@dataclass(frozen=True)
class Experiment:
    """One run as an experiment file or the CLI's flags state it; the fields are the file's keys.

    Build it with ``load`` or ``from_dict`` (which check types) or directly in code; ``check``
    checks values, ``qd.session.prepare`` builds what it names.
    """

    problem: str
    name: str = ""
    storage: str = DEFAULT_STORAGE
    budget: int = 100
    workers: int = 1
    evaluator: str = "process"
    seed: int = 0
    time_limit_s: float | None = None
    timeout_s: float | None = None
    resume: bool = False
    progress: bool = True
    strategy: str = "random"
    problem_options: dict[str, Any] = field(default_factory=dict)
    strategy_options: dict[str, Any] = field(default_factory=dict)
    evaluator_options: dict[str, Any] = field(default_factory=dict)
    #: The fields given explicitly (by a file or flags); None: all of them (built in code).
    #: On resume, a given identity field must match the recorded run (``resume_conflicts``).
    given: frozenset[str] | None = field(default=None, compare=False)

    @property
    def run_name(self) -> str:
        """The run's name: ``name``, or ``"<problem>-<strategy>-s<seed>"``."""
        return self.name or f"{self.problem}-{self.strategy}-s{self.seed}"

    def with_overrides(self, **overrides: Any) -> Experiment:
        """A copy with the given fields changed (None values are ignored) and marked as given."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        given = None if self.given is None else self.given | set(changes)
        return replace(self, **changes, given=given)


_RUN_KEYS = {"name": str, "storage": str, "budget": int, "workers": int, "evaluator": str, "seed": int,
             "time_limit_s": float, "timeout_s": float, "resume": bool, "progress": bool}
_ALLOWED_TEXT = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table"}


def _typed(where: str, value: Any, kind: type) -> Any:
    ok = is_int(value) if kind is int else is_number(value) if kind is float else isinstance(value, kind)
    if kind is float and ok:
        value = float(value)
    if not ok:
        raise ExperimentError(f"{where} = {value!r} is not allowed; allowed: {_ALLOWED_TEXT[kind]}")
    return value


def _section(doc: dict[str, Any], name: str, keys: dict[str, type], source: str) -> dict[str, Any]:
    table = doc.get(name, {})
    if not isinstance(table, dict):
        raise ExperimentError(f"{source}: [{name}] = {table!r} is not allowed; allowed: a table")
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise ExperimentError(f"{source}: [{name}] has unknown key(s) {unknown}; allowed keys: {sorted(keys)}")
    return {k: _typed(f"{source}: [{name}].{k}", v, keys[k]) for k, v in table.items()}


def load(path: str | Path) -> Experiment:
    """Read and check an experiment file.

    Args:
        path: a TOML file with the sections [run], [problem], [strategy] and [evaluator].

    Returns:
        The ``Experiment``.

    Raises:
        ExperimentError: a missing file, invalid TOML, or a section or key not allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file {str(path)!r} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ExperimentError(f"{path}: not valid TOML: {e}") from None
    return from_dict(doc, source=str(path))


def from_dict(doc: dict[str, Any], source: str = "experiment") -> Experiment:
    """An experiment from a parsed experiment file.

    Args:
        doc: the file's tables: [run], [problem] (with ``name``), [strategy], [evaluator].
        source: where ``doc`` came from, for error messages.

    Returns:
        The ``Experiment``; its ``given`` holds the fields ``doc`` sets.

    Raises:
        ExperimentError: an unknown section or key, a value of the wrong type, no problem name, or
            [run].evaluator and [evaluator].name that disagree.
    """
    unknown = sorted(set(doc) - {"run", "problem", "strategy", "evaluator"})
    if unknown:
        raise ExperimentError(f"{source}: unknown section(s) {unknown}; allowed: [run], [problem], [strategy], [evaluator]")
    run = _section(doc, "run", _RUN_KEYS, source)
    problem = _section(doc, "problem", {"name": str, "options": dict}, source)
    strategy = _section(doc, "strategy", {"name": str, "options": dict}, source)
    evaluator = _section(doc, "evaluator", {"name": str, "options": dict}, source)
    if "name" not in problem:
        raise ExperimentError(f"{source}: [problem].name is missing; allowed: a registered problem (see `qd problems`)")
    if "name" in evaluator:
        if "evaluator" in run and run["evaluator"] != evaluator["name"]:
            raise ExperimentError(f"{source}: [run].evaluator and [evaluator].name disagree")
        run["evaluator"] = evaluator["name"]
    given = {"problem", *run} | {f for f, present in (("problem_options", "options" in problem),
                                                      ("strategy", "name" in strategy),
                                                      ("strategy_options", "options" in strategy),
                                                      ("evaluator_options", "options" in evaluator)) if present}
    return Experiment(problem=problem["name"], problem_options=problem.get("options", {}),
                      strategy=strategy.get("name", "random"), strategy_options=strategy.get("options", {}),
                      evaluator_options=evaluator.get("options", {}), given=frozenset(given), **run)


def check(exp: Experiment) -> None:
    """Value checks that need no imports of plug-ins (those are checked when built).

    Raises:
        ExperimentError: a budget or workers < 1, a time limit <= 0, a run name or a storage that
            is not allowed.
    """
    if exp.budget < 1:
        raise ExperimentError(f"budget = {exp.budget} is not allowed; allowed: an integer >= 1")
    if exp.workers < 1:
        raise ExperimentError(f"workers = {exp.workers} is not allowed; allowed: an integer >= 1")
    for name in ("time_limit_s", "timeout_s"):
        v = getattr(exp, name)
        if v is not None and v <= 0:
            raise ExperimentError(f"{name} = {v} is not allowed; allowed: a number of seconds > 0")
    from qd.storage_url import check_run_name

    try:
        check_run_name(exp.run_name)
    except ValueError as e:
        raise ExperimentError(f"name: {e}") from None
    if "://" not in exp.storage:
        raise ExperimentError(f"storage = {exp.storage!r} is not allowed; allowed: an Optuna storage URL such as "
                              f"'sqlite:///qd.db' or 'postgresql://user:pass@host/db'")


#: What makes a run the run it is: fixed when it starts, checked against the record on resume.
IDENTITY = ("problem", "problem_options", "strategy", "strategy_options", "seed")


def resume_conflicts(exp: Experiment, recorded: dict[str, Any]) -> None:
    """On resume: raise naming the recorded and the given value of every identity field given
    (by the file or a flag) that differs from the recorded run. Budget, workers, evaluator and
    time limits may change between sessions; these may not."""
    given = IDENTITY if exp.given is None else [f for f in IDENTITY if f in exp.given]
    diffs = [f"{f} is {recorded[f]!r} in the run, {getattr(exp, f)!r} given" for f in given
             if f in recorded and getattr(exp, f) != recorded[f]]
    if diffs:
        raise ExperimentError(f"--resume: run {exp.run_name!r} cannot change what it is: " + "; ".join(diffs) +
                              ". Leave these out to continue it as recorded, or choose another --name for a new run")


__all__ = ["IDENTITY", "resume_conflicts", "Experiment", "ExperimentError", "load", "from_dict", "check", "DEFAULT_STORAGE"]
