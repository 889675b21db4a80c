"""``random``: scrambled Sobol points over the encoded space (space-filling, not i.i.d.)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from scipy.stats import qmc

from qd.problem import Problem
from qd.space import Config
from qd.strategy import Strategy
from qd.store import Trial


class RandomSearch(Strategy):
    name = "random"

    def __init__(self, problem: Problem, seed: int = 0):
        super().__init__(problem, seed)
        self._sobol = qmc.Sobol(d=self.space.dim, scramble=True, seed=seed)

    def ask(self, n: int, pending: Sequence[Config] = ()) -> list[Config]:
        with warnings.catch_warnings():  # Sobol prefers powers of two; any n is still low-discrepancy
            warnings.simplefilter("ignore", UserWarning)
            return self.space.decode_many(self._sobol.random(n))

    def restore(self, trials: Sequence[Trial]) -> None:
        # Continue the same sequence: every configuration this strategy proposed was one Sobol point.
        proposed = sum(t.origin == "strategy" for t in trials)
        if proposed:  # scipy rejects fast_forward(0)
            self._sobol.fast_forward(proposed)
