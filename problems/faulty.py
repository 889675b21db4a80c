"""``faulty``: evaluations that fail on purpose, chosen by configuration, to exercise failure handling.

The categorical parameter ``behaviour`` says what an evaluation does; ``x`` gives the objective
``loss = (x - 0.3)^2`` of the evaluations that succeed:

- ``ok``: returns the loss (after ``sleep_s`` seconds).
- ``raise``: raises ``RuntimeError`` (an application exception).
- ``nan``: returns NaN as the loss (an invalid result).
- ``hang``: sleeps ``hang_s`` seconds, past the declared per-evaluation timeout ``timeout_s``.
- ``exit``: ends its own process with ``os._exit(13)`` (a crashed worker).
- ``oom``: allocates ``oom_mb`` MiB, more than the declared ``memory_mb``. Under an address-space
  limit (the process pool's, or the Ray evaluator's) the allocation itself raises ``MemoryError``.
  With no limit in force (the in-process evaluator) it raises ``MemoryError`` without
  allocating, so a test never exhausts the machine it runs on.

Behaviours left out by default (weight 0; give them a weight to use them) return what a broken
plug-in returns, or die the way native code dies:

- ``none``: returns ``None``; ``list``: returns a plain list of numbers instead of an ``Evaluation``;
- ``huge``: returns ``1e308`` as the loss (finite, but past ``qd.problem.MAX_ABS_VALUE``);
- ``bigmeta``: returns metadata larger than ``qd.problem.MAX_METADATA_BYTES``;
- ``object``: returns an object that is not a number as the loss;
- ``segv``: kills its own process with ``SIGSEGV`` (a crash in native code);
- ``bare-oom``: the allocator's ``MemoryError``, which has no message, unwrapped (without an
  address-space limit it is raised bare without allocating).

``weights`` (behaviour -> weight) sets how often a uniform draw of the encoded space (the
``random`` strategy) lands on each behaviour: the behaviour coordinate's bins are as wide as the
weights. A behaviour of weight 0 is left out of the space. The default weighs all six equally, so
a random run of 30 evaluations meets each about five times.

Each evaluation's metadata holds the process id and how many evaluations that process has run
(``calls_in_process``), so tests can see whether workers, and a problem's caches, are reused.
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qd.checks import is_finite_number
from qd.problem import Evaluation, Objective, Problem, Resources
from qd.space import Categorical, Config, Float, Scalar, Space, SpaceError

BEHAVIOURS = ("ok", "raise", "nan", "hang", "exit", "oom")
#: Behaviours of weight 0 unless given one.
EXTRA_BEHAVIOURS = ("none", "list", "huge", "bigmeta", "object", "segv", "bare-oom")
ALL_BEHAVIOURS = BEHAVIOURS + EXTRA_BEHAVIOURS
EXIT_CODE = 13

# Evaluations run by this process: module state, so it survives between evaluations in one worker.
_calls_in_process = 0


@dataclass(frozen=True)
class WeightedCategorical(Categorical):
    """A categorical whose encoded bins are as wide as its ``weights`` (positive, one per choice).

    ``decode`` of a uniform draw then picks choice ``i`` with probability ``weights[i] / sum``;
    ``encode`` returns the centre of the choice's bin, so ``decode(encode(c)) == c``.
    """

    weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if len(self.weights) != len(self.choices) or not all(w > 0 and math.isfinite(w) for w in self.weights):
            raise SpaceError(f"parameter {self.name!r}: weights {self.weights!r} are not allowed; allowed: one "
                             f"positive finite number per choice ({len(self.choices)})")

    def _edges(self) -> list[float]:
        total, acc, edges = sum(self.weights), 0.0, [0.0]
        for w in self.weights:
            acc += w
            edges.append(acc / total)
        edges[-1] = 1.0
        return edges

    def encode(self, value: Any) -> float:
        """The centre of the choice's weighted bin."""
        edges, i = self._edges(), self.index(value)
        return (edges[i] + edges[i + 1]) / 2

    def decode(self, u: float) -> Scalar:
        """The choice whose weighted bin holds ``u`` (clipped to [0, 1])."""
        u = min(max(float(u), 0.0), 1.0)
        edges = self._edges()
        for i in range(len(self.choices)):
            if u < edges[i + 1]:
                return self.choices[i]
        return self.choices[-1]


def _number(name: str, value: Any, *, low: float = 0.0, allow_none: bool = False, strict: bool = False) -> Any:
    if value is None and allow_none:
        return None
    ok = is_finite_number(value) and (
        value > low if strict else value >= low)
    if not ok:
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise ValueError(f"faulty option {name}={value!r} is not allowed; allowed: a number {bound}"
                         + (" or None" if allow_none else ""))
    return value


class Faulty(Problem):
    """Evaluations that succeed, raise, return NaN, hang, kill their process or run out of memory, by configuration."""

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        timeout_s: float = 2.0,
        memory_mb: int = 1024,
        sleep_s: float = 0.0,
        hang_s: float | None = None,
        oom_mb: int | None = None,
    ):
        """Options:

        - ``weights``: behaviour -> weight >= 0 (missing behaviours weigh 0); default all equal.
        - ``timeout_s``: the declared per-evaluation timeout (``resources.timeout_s``).
        - ``memory_mb``: the declared memory per evaluation (``resources.memory_mb``).
        - ``sleep_s``: how long an ``ok`` evaluation takes.
        - ``hang_s``: how long a ``hang`` evaluation sleeps (default ``10 * timeout_s``; bounded so a
          worker nobody kills still ends).
        - ``oom_mb``: how much an ``oom`` evaluation allocates (default ``4 * memory_mb``).
        """
        if weights is None:
            weights = {b: 1.0 for b in BEHAVIOURS}
        if not isinstance(weights, Mapping):
            raise ValueError(f"faulty option weights={weights!r} is not allowed; allowed: a mapping of behaviours "
                             f"{list(BEHAVIOURS)} to weights >= 0")
        unknown = sorted(set(weights) - set(ALL_BEHAVIOURS))
        if unknown:
            raise ValueError(f"faulty option weights has unknown behaviour(s) {unknown}; allowed: {list(ALL_BEHAVIOURS)}")
        for b, w in weights.items():
            _number(f"weights[{b!r}]", w)
        if not any(w > 0 for w in weights.values()):
            raise ValueError(f"faulty option weights={dict(weights)!r} is not allowed; allowed: at least one "
                             f"behaviour of weight > 0")
        self.timeout_s = float(_number("timeout_s", timeout_s, strict=True))
        memory_mb = _number("memory_mb", memory_mb, low=1)
        if not isinstance(memory_mb, int):
            raise ValueError(f"faulty option memory_mb={memory_mb!r} is not allowed; allowed: an integer >= 1")
        self.memory_mb = memory_mb
        self.sleep_s = float(_number("sleep_s", sleep_s))
        self.hang_s = float(_number("hang_s", hang_s, strict=True, allow_none=True) or 10 * self.timeout_s)
        self.oom_mb = int(_number("oom_mb", oom_mb, low=1, allow_none=True) or 4 * memory_mb)

        chosen = [b for b in ALL_BEHAVIOURS if weights.get(b, 0) > 0]
        self.weights = {b: float(weights[b]) for b in chosen}
        self.space = Space([
            WeightedCategorical("behaviour", tuple(chosen), weights=tuple(self.weights[b] for b in chosen)),
            Float("x", 0.0, 1.0),
        ])
        self.objectives = (Objective("loss", "minimize"),)
        self.resources = Resources(cpus=1, gpus=0, memory_mb=self.memory_mb, timeout_s=self.timeout_s)

    def evaluate(self, config: Config, seed: int) -> Evaluation:
        """Succeed, raise, return NaN, hang, kill the process or exhaust memory, as the configuration's
        ``behaviour`` says."""
        global _calls_in_process
        _calls_in_process += 1
        config = self.space.validate(config)
        behaviour, x = config["behaviour"], config["x"]
        meta = {"pid": os.getpid(), "calls_in_process": _calls_in_process, "behaviour": behaviour}
        if behaviour == "ok":
            if self.sleep_s:
                time.sleep(self.sleep_s)
            return Evaluation(values=[(x - 0.3) ** 2], metadata=meta)
        if behaviour == "raise":
            raise RuntimeError(f"faulty: behaviour 'raise' (x={x:.4f})")
        if behaviour == "nan":
            return Evaluation(values=[math.nan], metadata=meta)
        if behaviour == "hang":
            time.sleep(self.hang_s)
            return Evaluation(values=[(x - 0.3) ** 2], metadata=meta)
        if behaviour == "exit":
            os._exit(EXIT_CODE)
        if behaviour in EXTRA_BEHAVIOURS:
            return self._broken(behaviour, x, meta)
        # "oom"
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            raise MemoryError(f"faulty: behaviour 'oom' wants {self.oom_mb} MiB; no address-space limit is in force, "
                              f"so this is raised without allocating")
        try:
            block = bytearray(self.oom_mb * 2**20)
        except MemoryError as e:  # the allocator's MemoryError has no message: say what failed
            raise MemoryError(f"faulty: behaviour 'oom' could not allocate {self.oom_mb} MiB under an address-space "
                              f"limit of {soft // 2**20} MiB") from e
        return Evaluation(values=[float(len(block) > 0)], metadata=meta)

    def _broken(self, behaviour: str, x: float, meta: dict[str, Any]) -> Any:
        from qd.problem import MAX_METADATA_BYTES

        if behaviour == "none":
            return None
        if behaviour == "list":
            return [(x - 0.3) ** 2]
        if behaviour == "huge":
            return Evaluation(values=[1e308], metadata=meta)
        if behaviour == "bigmeta":
            return Evaluation(values=[(x - 0.3) ** 2], metadata={**meta, "blob": "x" * (2 * MAX_METADATA_BYTES)})
        if behaviour == "object":
            return Evaluation(values=[object()], metadata=meta)
        if behaviour == "segv":
            import signal

            os.kill(os.getpid(), signal.SIGSEGV)
            time.sleep(10)  # the signal is delivered at once; never reached
        # "bare-oom"
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            raise MemoryError()
        return Evaluation(values=[float(len(bytearray(self.oom_mb * 2**20)) > 0)], metadata=meta)
