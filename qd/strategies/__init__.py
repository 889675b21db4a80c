"""Strategy registry: built-in names, plus plug-ins from the entry-point group ``qd.strategies``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from importlib.metadata import entry_points
from typing import Any

from qd.problem import Problem
from qd.strategy import Strategy

BUILTIN: dict[str, str] = {
    "random": "qd.strategies.random:RandomSearch",
    "tpe": "qd.strategies.optuna_samplers:TPE",
    "nsga2": "qd.strategies.optuna_samplers:NSGA2",
    "nsga3": "qd.strategies.optuna_samplers:NSGA3",
    "gp": "qd.strategies.optuna_samplers:GP",
    "map-elites": "qd.strategies.illumination:MapElites",
    "cma-me": "qd.strategies.illumination:CmaMe",
    "cma-mae": "qd.strategies.illumination:CmaMae",
    "mome": "qd.strategies.mome:Mome",
    "botorch": "qd.strategies.botorch_mobo:BoTorch",
    "sail": "qd.strategies.sail:Sail",
}


def _targets() -> dict[str, str]:
    targets = dict(BUILTIN)
    targets.update({ep.name: ep.value for ep in entry_points(group="qd.strategies")})
    return targets


def strategy_names() -> list[str]:
    """Names whose implementation can be imported in this installation."""
    names = []
    for name, target in _targets().items():
        module = target.split(":")[0]
        if importlib.util.find_spec(module) is not None:
            names.append(name)
    return names


def strategy_class(name: str) -> type[Strategy]:
    if name not in strategy_names():
        raise ValueError(f"strategy {name!r} is not available; allowed: {strategy_names()}")
    module, attr = _targets()[name].split(":")
    return getattr(importlib.import_module(module), attr)


def allowed_options(cls: type[Strategy]) -> list[str] | None:
    """Option names a strategy accepts (None: any)."""
    target = getattr(cls, "sampler_class", cls)
    params = inspect.signature(target.__init__).parameters
    if not hasattr(cls, "sampler_class") and any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    skip = {"self", "problem", "seed", "constraints_func", "args", "kwargs"}
    return [p for p, v in params.items() if p not in skip and v.kind != v.VAR_KEYWORD]


def check_options(name: str, options: dict[str, Any]) -> None:
    allowed = allowed_options(strategy_class(name))
    unknown = sorted(set(options) - set(allowed or options))
    if unknown:
        raise ValueError(f"strategy {name!r}: unknown option(s) {unknown}; allowed options: {allowed}")


def get_strategy(name: str, problem: Problem, seed: int = 0, **options: Any) -> Strategy:
    check_options(name, options)
    return strategy_class(name)(problem, seed=seed, **options)
