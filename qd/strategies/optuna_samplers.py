"""Optuna's samplers behind the ask/tell contract: ``tpe``, ``nsga2``, ``nsga3``, ``gp``.

Each adapter drives a private in-memory Optuna study (its *mirror*): the run's store remains the
only record, and the mirror is rebuilt from it on resume. Optuna's define-by-run suggestion
handles conditional parameters natively (inactive ones are simply not suggested).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import optuna
from optuna.trial import TrialState

from qd.problem import Problem
from qd.space import Config
from qd.strategy import Strategy
from qd.store import Trial


#: Draws of a repeated configuration before a uniform random one takes its place.
MAX_REDRAWS = 20


def resumed_seed(seed: int, n_trials: int) -> int:
    """The sampler seed of a run resumed after ``n_trials`` recorded trials: both mixed by
    ``numpy.random.SeedSequence``, so a resume is repeatable and its stream is not the fresh run's."""
    return int(np.random.SeedSequence([seed, n_trials]).generate_state(1)[0])


def _constraints(ft: optuna.trial.FrozenTrial) -> Sequence[float]:
    return ft.user_attrs.get("constraints", ())


class OptunaSampler(Strategy):
    """Base adapter; subclasses build the sampler. Options are passed to the sampler."""

    sampler_class: ClassVar[type[optuna.samplers.BaseSampler]]

    def __init__(self, problem: Problem, seed: int = 0, **sampler_options: Any):
        super().__init__(problem, seed)
        self._options = sampler_options
        self._study = optuna.create_study(directions=problem.directions, sampler=self._sampler(seed))
        self._running: dict[bytes, list[optuna.Trial]] = defaultdict(list)
        #: Hashes of the configurations asked or told (8 bytes each: a run of 10^6 holds ~70 MB);
        #: a collision only costs a redraw.
        self._seen: set[int] = set()
        self._rng: np.random.Generator | None = None  # for the rare uniform fallback
        self.repeats_dropped = 0

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        raise TypeError(f"{type(self).__name__} must define _sampler")

    @property
    def _constraints_func(self) -> Callable | None:
        return _constraints if self.problem.constraints else None

    def ask(self, n: int, pending: Sequence[Config] = ()) -> list[Config]:
        """``n`` configurations, none pending, evaluated already or twice in the batch.

        A sampler's repeat (a genetic child equal to its parent, a start-up draw of a small
        discrete space) is dropped from the mirror as a failed trial, which every Optuna sampler
        ignores, and drawn again; after ``MAX_REDRAWS`` repeats a uniform random configuration
        that is new takes its place (enqueued, so the mirror holds what is evaluated).
        """
        taken = {hash(self.space.key(c)) for c in pending}
        out = []
        for _ in range(n):
            for _attempt in range(MAX_REDRAWS):
                trial = self._study.ask()
                config = self.space.suggest(trial)
                h = hash(self.space.key(config))
                if h not in self._seen and h not in taken:
                    break
                self._study.tell(trial, state=TrialState.FAIL)
                self.repeats_dropped += 1
            else:
                trial, config = self._new_uniform(taken)
                h = hash(self.space.key(config))
            taken.add(h)
            self._seen.add(h)
            self._running[self.space.key(config)].append(trial)
            out.append(config)
        return out

    def _new_uniform(self, taken: set[int]) -> tuple[optuna.Trial, Config]:
        """A mirror trial of a uniform random configuration not seen or ``taken``."""
        if self._rng is None:
            self._rng = np.random.default_rng(np.random.SeedSequence([self.seed, len(self._study.trials)]))
        for _ in range(MAX_REDRAWS):
            config = self.space.decode(self._rng.random(self.space.dim))
            h = hash(self.space.key(config))
            if h not in self._seen and h not in taken:
                break
        self._study.enqueue_trial(config, skip_if_exists=False)
        trial = self._study.ask()
        return trial, self.space.suggest(trial)

    def tell(self, trial: Trial) -> None:
        key = self.space.key(trial.params)
        self._seen.add(hash(key))
        waiting = self._running.get(key)
        if waiting:
            mirror = waiting.pop(0)
            if not waiting:
                del self._running[key]
            if trial.constraints:
                mirror.set_user_attr("constraints", trial.constraints)
            if trial.state == "complete":
                self._study.tell(mirror, trial.values)
            else:
                self._study.tell(mirror, state=TrialState.FAIL)
            return
        # A configuration this mirror never proposed (resume, requeue): add it as history.
        self._study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE if trial.state == "complete" else TrialState.FAIL,
            params=trial.params, distributions=self.space.active_distributions(trial.params),
            values=trial.values if trial.state == "complete" else None,
            user_attrs={"constraints": trial.constraints} if trial.constraints else {},
        ))

    def restore(self, trials: Sequence[Trial]) -> None:
        """Replay a resumed run's trials into the mirror, then give the sampler a random stream of
        its own: the seed's stream would draw the fresh run's first configurations again. An empty
        history (a fresh run) changes nothing: the sampler keeps the seed ``seed`` itself."""
        if not trials:
            return
        super().restore(trials)
        self._study.sampler = self._sampler(resumed_seed(self.seed, len(trials)))


class TPE(OptunaSampler):
    sampler_class = optuna.samplers.TPESampler
    name = "tpe"
    #: qd's defaults where they differ from Optuna's (``qd strategies`` shows these).
    option_defaults = {"multivariate": True, "constant_liar": True}

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        opts = {**self.option_defaults, **self._options}
        return optuna.samplers.TPESampler(seed=seed, constraints_func=self._constraints_func, **opts)


class NSGA2(OptunaSampler):
    sampler_class = optuna.samplers.NSGAIISampler
    name = "nsga2"

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=self._constraints_func, **self._options)


class NSGA3(OptunaSampler):
    sampler_class = optuna.samplers.NSGAIIISampler
    name = "nsga3"

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.NSGAIIISampler(seed=seed, constraints_func=self._constraints_func, **self._options)


class GP(OptunaSampler):
    sampler_class = optuna.samplers.GPSampler
    name = "gp"

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.GPSampler(seed=seed, constraints_func=self._constraints_func, **self._options)
