"""``random``: scrambled Sobol points over the encoded space (space-filling, not i.i.d.)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy.stats import qmc

from qd.problem import Problem
from qd.space import Config
from qd.strategy import Strategy
from qd.store import Trial


class RandomSearch(Strategy):
    name = "random"
    #: Points drawn from the engine at once: the sequence is the same as drawn one by one, and a
    #: run that asks one configuration at a time does not pay scipy's per-call cost for each.
    DRAW = 256

    def __init__(self, problem: Problem, seed: int = 0):
        super().__init__(problem, seed)
        self._sobol = qmc.Sobol(d=self.space.dim, scramble=True, seed=seed)
        self._drawn = np.empty((0, self.space.dim))  # the sequence's next points, drawn ahead

    def ask(self, n: int, pending: Sequence[Config] = ()) -> list[Config]:
        if len(self._drawn) < n:
            with warnings.catch_warnings():  # Sobol prefers powers of two; any n is still low-discrepancy
                warnings.simplefilter("ignore", UserWarning)
                self._drawn = np.vstack([self._drawn, self._sobol.random(max(n - len(self._drawn), self.DRAW))])
        X, self._drawn = self._drawn[:n], self._drawn[n:]
        return self.space.decode_many(X)

    def restore(self, trials: Sequence[Trial]) -> None:
        # Continue the same sequence: every configuration this strategy proposed was one Sobol point.
        proposed = sum(t.origin == "strategy" for t in trials)
        self._sobol, self._drawn = qmc.Sobol(d=self.space.dim, scramble=True, seed=self.seed), self._drawn[:0]
        if proposed:  # scipy rejects fast_forward(0)
            self._sobol.fast_forward(proposed)
