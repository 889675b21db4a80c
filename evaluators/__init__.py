"""Where evaluations run: ``inprocess``, ``process`` (local worker pool) and ``ray``."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from evaluators.base import Evaluator, Job, Outcome

EVALUATORS: dict[str, str] = {
    "inprocess": "evaluators.inprocess:InProcessEvaluator",
    "process": "evaluators.process:ProcessPoolEvaluator",
    "ray": "evaluators.ray_cluster:RayEvaluator",
}


def evaluator_class(name: str) -> type[Evaluator]:
    if name not in EVALUATORS:
        from qd.suggest import did_you_mean

        raise ValueError(f"evaluator {name!r} is unknown; allowed: {sorted(EVALUATORS)}"
                         f"{did_you_mean([name], EVALUATORS)}")
    module, attr = EVALUATORS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def make_evaluator(name: str, **options: Any) -> Evaluator:
    cls = evaluator_class(name)
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p != "self"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"evaluator {name!r}: unknown option(s) {unknown}; allowed options: {allowed}")
    return cls(**options)


__all__ = ["Evaluator", "Job", "Outcome", "make_evaluator", "evaluator_class", "EVALUATORS"]
