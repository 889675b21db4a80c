"""``mome``: Multi-Objective MAP-Elites (Pierrot et al. 2022), any number of objectives.

pyribs has no multi-objective archive, so the cell bookkeeping is ``qd.archive.ParetoArchive``:
a grid over the measures (``bins``, per measure or one int) whose cells each keep a Pareto front
of at most ``front_size`` points; moocore decides non-domination, hypervolume contributions (a full
front drops its smallest contributor) and hypervolumes. The reference point is the problem's
``reference_point`` unless the option ``reference_point`` states one (one number per objective,
in objective units); without either the strategy refuses to start.

Scores: MOQD score = the sum over cells of each front's hypervolume; the global hypervolume is
that of all front members together (``ParetoArchive.metrics``).

Variation, on the encoded space ``[0, 1]^d`` like the single-objective strategies: parents are
drawn uniformly from *all* front members (every cell's), mutated by pyribs' ``GaussianOperator``
(``sigma``) or ``IsoLineOperator`` (``iso_sigma``, ``line_sigma``, with a second uniform member
giving the line's direction), clipped to ``[0, 1]`` and decoded to a configuration; the archive
stores the encoded vector of that configuration. The first ``initial_population``
configurations are a scrambled Sobol sample (and more while the archive is empty).

Asynchrony: MOME is steady state here. Each ``ask`` draws parents from the archive as it is; each
``tell`` inserts its result at once. Nothing waits for a batch, so workers never idle on the
strategy. Failed and infeasible results are not inserted. ``restore`` rebuilds the archive from
the recorded trials and continues the Sobol sequence and the random stream past them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from ribs.emitters.operators import GaussianOperator, IsoLineOperator
from scipy.stats import qmc

from qd.archive import ParetoArchive, ParetoSpec, pareto_spec
from qd.problem import Problem
from qd.space import Config
from qd.store import Trial
from qd.checks import check_choice, check_int, check_number
from qd.strategies.illumination import OPERATORS
from qd.strategy import Strategy


class Mome(Strategy):
    """MOME on a grid of bounded Pareto fronts (see the module docstring)."""

    name = "mome"

    def __init__(self, problem: Problem, seed: int = 0, *, bins: Any = None, front_size: int = 10,
                 reference_point: Sequence[float] | None = None, operator: str = "gaussian", sigma: float = 0.1,
                 iso_sigma: float = 0.01, line_sigma: float = 0.2, initial_population: int = 32):
        super().__init__(problem, seed)
        owner = f"strategy {self.name!r}"
        check_choice(operator, "operator", owner, OPERATORS)
        for option, value in (("sigma", sigma), ("iso_sigma", iso_sigma), ("line_sigma", line_sigma)):
            check_number(value, option, owner, low=0, low_open=True)
        check_int(initial_population, "initial_population", owner, low=1)
        self.spec: ParetoSpec = self.archive_spec(
            problem, seed, dict(bins=bins, front_size=front_size, reference_point=reference_point))
        self.operator, self.initial_population = operator, int(initial_population)
        self.sigma, self.iso_sigma, self.line_sigma = float(sigma), float(iso_sigma), float(line_sigma)
        self.archive = ParetoArchive(problem, self.spec)
        self._start(generation=0, proposed=0)

    @classmethod
    def archive_spec(cls, problem: Problem, seed: int, options: dict[str, Any]) -> ParetoSpec:
        kw = {k: v for k, v in options.items() if k in ("bins", "front_size", "reference_point") and v is not None}
        return pareto_spec(problem, owner=f"strategy {cls.name!r}", **kw)

    def _start(self, generation: int, proposed: int) -> None:
        seeds = np.random.SeedSequence([self.seed, generation]).spawn(2)
        self._rng = np.random.default_rng(seeds[0])
        op_seed = int(seeds[1].generate_state(1)[0])
        self._mutate = (GaussianOperator(self.sigma, seed=op_seed) if self.operator == "gaussian"
                        else IsoLineOperator(self.iso_sigma, self.line_sigma, seed=op_seed))
        self._sobol = qmc.Sobol(d=self.space.dim, scramble=True, seed=self.seed)
        self._n_initial = min(proposed, self.initial_population)
        if self._n_initial:
            self._sobol.fast_forward(self._n_initial)

    def ask(self, n: int, pending: Sequence[Config] = ()) -> list[Config]:
        if self._n_initial < self.initial_population or self.archive.empty:
            self._n_initial += n
            with warnings.catch_warnings():  # Sobol prefers powers of two; any n is still low-discrepancy
                warnings.simplefilter("ignore", UserWarning)
                return self.space.decode_many(self._sobol.random(n))
        parents = self.archive.sample(n, self._rng)
        if self.operator == "iso-line":
            parents = np.stack([parents, self.archive.sample(n, self._rng)])
        children = np.clip(self._mutate.ask(parents), 0.0, 1.0)
        return self.space.decode_many(children)

    def tell(self, trial: Trial) -> None:
        self.archive.add_trials([trial])

    def restore(self, trials: Sequence[Trial]) -> None:
        if not trials:  # a new run: nothing to rebuild
            return
        self.archive = ParetoArchive(self.problem, self.spec)
        self.archive.add_trials([t for t in trials if t.state == "complete"])
        self._start(generation=len(trials), proposed=sum(t.origin == "strategy" for t in trials))

    def state(self) -> dict[str, Any]:
        m = self.archive.metrics()
        return {"coverage": m["coverage"], "moqd": m["moqd_score"]}
