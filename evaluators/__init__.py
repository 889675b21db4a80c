"""Where evaluations run: ``inprocess``, ``process`` (local worker pool) and ``ray``."""

from __future__ import annotations

import importlib
from typing import Any

from evaluators.base import Evaluator, Job, Outcome
from qd.checks import accepted_options, check_name, check_option_names

EVALUATORS: dict[str, str] = {
    "inprocess": "evaluators.inprocess:InProcessEvaluator",
    "process": "evaluators.process:ProcessPoolEvaluator",
    "ray": "evaluators.ray_cluster:RayEvaluator",
}


def evaluator_class(name: str) -> type[Evaluator]:
    """The class registered as ``name``.

    Raises:
        UnknownName: ``name`` is not one of ``EVALUATORS``.
    """
    check_name(name, "evaluator", list(EVALUATORS))
    module, attr = EVALUATORS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def make_evaluator(name: str, **options: Any) -> Evaluator:
    """Build evaluator ``name`` with keyword ``options``.

    Raises:
        UnknownName: an unregistered name. UnknownOption: an option the evaluator does not take.
        OptionError: a bad option value.
    """
    cls = evaluator_class(name)
    check_option_names(options, accepted_options(cls), f"evaluator {name!r}")
    return cls(**options)


__all__ = ["Evaluator", "Job", "Outcome", "make_evaluator", "evaluator_class", "EVALUATORS"]
