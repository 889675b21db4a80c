"""Strategy registry: built-in names, plus plug-ins from the entry-point group ``qd.strategies``.

Options every strategy accepts (from ``-S key=value`` or an experiment file's strategy options),
applied by wrapping the strategy:

- ``fidelity = "asha"`` (with ``eta``, ``min_fidelity``): ASHA promotion over the problem's
  fidelity parameter (``qd.fidelity.FidelityWrapper``; non-dominated rank per rung for several
  objectives). Strategies with their own multi-fidelity handling (``sail``) take it themselves.
- ``background = true`` or ``ask_time_limit_s = S``: asks computed on a thread beside the run
  loop, with a quasi-random fallback once a proposal has run ``S`` seconds
  (``qd.background.BackgroundAsks``).
"""

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


#: Options of the wrappers, accepted by every strategy (see the module docstring).
FIDELITY_OPTIONS = ("fidelity", "eta", "min_fidelity")
BACKGROUND_OPTIONS = ("background", "ask_time_limit_s")


def _wrapper_options(cls: type[Strategy], options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``options`` into (the strategy's own, the wrappers'); a strategy's own options win."""
    own = allowed_options(cls)
    wrapper_names = [k for k in (*FIDELITY_OPTIONS, *BACKGROUND_OPTIONS) if own is None or k not in own]
    return ({k: v for k, v in options.items() if k not in wrapper_names},
            {k: v for k, v in options.items() if k in wrapper_names})


def check_options(name: str, options: dict[str, Any]) -> None:
    cls = strategy_class(name)
    allowed = allowed_options(cls)
    own, wrapped = _wrapper_options(cls, options)
    unknown = sorted(set(own) - set(allowed or own))
    if unknown:
        extra = [k for k in (*FIDELITY_OPTIONS, *BACKGROUND_OPTIONS) if k not in (allowed or [])]
        raise ValueError(f"strategy {name!r}: unknown option(s) {unknown}; allowed options: {allowed} "
                         f"and, for every strategy, {extra}")
    fidelity = wrapped.get("fidelity")
    if fidelity not in (None, "asha"):
        raise ValueError(f"strategy {name!r}: option fidelity={fidelity!r} is not allowed; allowed: null (single "
                         f"fidelity) or 'asha'")
    if fidelity is None and ({"eta", "min_fidelity"} & set(wrapped)):
        raise ValueError(f"strategy {name!r}: options eta and min_fidelity need fidelity='asha'")
    background = wrapped.get("background", False)
    if not isinstance(background, bool):
        raise ValueError(f"strategy {name!r}: option background={background!r} is not allowed; allowed: true or false")


def get_strategy(name: str, problem: Problem, seed: int = 0, **options: Any) -> Strategy:
    check_options(name, options)
    cls = strategy_class(name)
    own, wrapped = _wrapper_options(cls, options)
    strategy = cls(problem, seed=seed, **own)
    if wrapped.get("fidelity") == "asha":
        from qd.fidelity import FidelityWrapper

        strategy = FidelityWrapper(strategy, eta=wrapped.get("eta", 3), min_fidelity=wrapped.get("min_fidelity"))
    if wrapped.get("background") or wrapped.get("ask_time_limit_s") is not None:
        from qd.background import BackgroundAsks

        strategy = BackgroundAsks(strategy, ask_time_limit_s=wrapped.get("ask_time_limit_s"))
    return strategy
