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

from qd.checks import accepted_options, check_bool, is_int, check_name, check_option_names
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
    "mo-sail": "qd.strategies.mo_sail:MoSail",
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
    check_name(name, "strategy", strategy_names())
    module, attr = _targets()[name].split(":")
    return getattr(importlib.import_module(module), attr)


def allowed_options(cls: type[Strategy]) -> list[str] | None:
    """Option names a strategy accepts (None: any)."""
    target = cls.sampler_class or cls
    skip = ("self", "problem", "seed", "constraints_func")
    if cls.sampler_class is None:
        return accepted_options(target, skip)
    params = inspect.signature(target.__init__).parameters  # an Optuna sampler: its named options only
    return [p for p, v in params.items() if p not in skip and v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]


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
    extra = [k for k in (*FIDELITY_OPTIONS, *BACKGROUND_OPTIONS) if k not in (allowed or [])]
    check_option_names(own, allowed, f"strategy {name!r}", f" and, for every strategy, {extra}")
    fidelity = wrapped.get("fidelity")
    if fidelity not in (None, "asha"):
        raise ValueError(f"strategy {name!r}: option fidelity={fidelity!r} is not allowed; allowed: null (single "
                         f"fidelity) or 'asha'")
    if fidelity is None and ({"eta", "min_fidelity"} & set(wrapped)):
        raise ValueError(f"strategy {name!r}: options eta and min_fidelity need fidelity='asha'")
    check_bool(wrapped.get("background", False), "background", f"strategy {name!r}")


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


# --- the catalogue (``qd strategies``) ---------------------------------------------------------------
#: Options that make a strategy start with evaluations it does not choose by learning (random or
#: space-filling ones): a budget not much larger than this is spent before the strategy learns.
WARMUP_OPTIONS: tuple[str, ...] = ("initial_population", "n_init", "n_startup_trials", "population_size")


def _summary_line(doc: str | None, sentences: int | None = None) -> str:
    text = " ".join(inspect.cleandoc(doc or "").split("\n\n")[0].split())
    if sentences is not None:
        text = " ".join(text.split(". ")[:sentences]).rstrip(".") + "."
    return text


def _description(cls: type[Strategy]) -> str:
    """The class's own docstring, else its sampler's (Optuna strategies), else its module's."""
    own = cls.__dict__.get("__doc__")
    if own:
        return _summary_line(own)
    sampler = cls.sampler_class
    if sampler is not None:
        return f"Optuna's {sampler.__name__}: {_summary_line(sampler.__doc__, sentences=1)}"
    return _summary_line(importlib.import_module(cls.__module__).__doc__)


def describe_strategy(name: str) -> dict[str, Any]:
    """What ``qd strategies`` prints for one strategy: ``name``, ``description`` (its docstring's
    first paragraph), ``options`` (each ``{"name", "default"}``; a sampler's own options for the
    Optuna strategies) and ``accepts_any_option``."""
    cls = strategy_class(name)
    target = cls.sampler_class or cls
    params = inspect.signature(target.__init__).parameters
    allowed = allowed_options(cls)
    options = []
    own = cls.option_defaults  # a strategy's defaults for its sampler's options
    for option in allowed or []:
        default = own[option] if option in own else params[option].default
        options.append({"name": option, "default": None if default is inspect.Parameter.empty else default})
    description = _description(cls).replace("``", "")
    description = description[len(name) + 2:] if description.startswith(f"{name}: ") else description
    return {"name": name, "description": description, "options": options, "accepts_any_option": allowed is None}


def describe_strategies() -> list[dict[str, Any]]:
    """``describe_strategy`` for every available strategy (one that fails to load says why)."""
    out = []
    for name in strategy_names():
        try:
            out.append(describe_strategy(name))
        except Exception as e:  # a broken plug-in must not hide the others
            out.append({"name": name, "error": f"{type(e).__name__}: {e}"})
    return out


def warmup(strategy: Strategy) -> tuple[str, int] | None:
    """(option, count) of the evaluations a built strategy spends before it learns from results
    (its initial population or start-up trials), or None when it has none."""
    sampler = getattr(getattr(strategy, "_study", None), "sampler", None)  # the Optuna strategies
    for source in (strategy, sampler):
        for option in WARMUP_OPTIONS:
            value = getattr(source, option, None)
            if value is None and source is not None:
                value = getattr(source, f"_{option}", None)  # Optuna keeps its options private
            if is_int(value) and value > 0:
                return option, value
    return None
