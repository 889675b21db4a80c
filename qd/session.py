"""Build everything an experiment names, check it all, then run it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from evaluators import Evaluator, make_evaluator
from qd.experiment import Experiment, ExperimentError, check, resume_conflicts
from qd.problem import Problem
from qd.registry import get_problem
from qd.run import Callback, RunReport, run
from qd.storage_url import mask
from qd.store import RunInfo, RunNotFound, Store
from qd.strategies import get_strategy
from qd.strategy import Strategy


@dataclass
class Prepared:
    """What ``prepare`` built for an experiment: checked, nothing evaluated yet."""

    experiment: Experiment
    problem: Problem
    strategy: Strategy
    evaluator: Evaluator
    store: Store


def prepare(exp: Experiment) -> Prepared:
    """Validate and build the problem, strategy, evaluator and store; no evaluation runs here.

    On resume the recorded problem, strategy and seed are used (a given one that differs is an
    error).

    Args:
        exp: the experiment.

    Returns:
        The ``Prepared`` run.

    Raises:
        ExperimentError: any bad field or option (the message names it), a resume that conflicts
            with the record, or a run that exists without ``resume``.
    """
    if exp.resume:
        exp = _as_recorded(exp)
    check(exp)
    try:
        problem = get_problem(exp.problem, **exp.problem_options)
    except (ValueError, TypeError) as e:
        raise ExperimentError(f"problem: {e}") from None
    try:
        strategy = get_strategy(exp.strategy, problem, seed=exp.seed, **exp.strategy_options)
    except (ValueError, TypeError) as e:
        raise ExperimentError(f"strategy: {e}") from None
    try:
        evaluator = make_evaluator(exp.evaluator, **exp.evaluator_options)
    except (ValueError, TypeError) as e:
        raise ExperimentError(f"evaluator: {e}") from None
    info = RunInfo(name=exp.run_name, problem=exp.problem, problem_options=exp.problem_options,
                   strategy=exp.strategy, strategy_options=exp.strategy_options, seed=exp.seed)
    try:
        store = Store.create(exp.storage, info, problem, resume=exp.resume)
    except ValueError as e:
        raise ExperimentError(str(e)) from None
    return Prepared(exp, problem, strategy, evaluator, store)


def _as_recorded(exp: Experiment) -> Experiment:
    """On resume the recorded problem, strategy and seed are used; flags may change budget, workers, evaluator."""
    try:
        info = Store.open(exp.storage, exp.run_name).info
    except RunNotFound:
        if not exp.problem:
            raise ExperimentError(f"--resume: no run named {exp.run_name!r} in {mask(exp.storage)}, and no problem given "
                                  f"to start it") from None
        return exp
    resume_conflicts(exp, info.to_json())  # a conflicting flag is an error, not dropped
    return replace(exp, problem=info.problem, problem_options=info.problem_options, strategy=info.strategy,
                   strategy_options=info.strategy_options, seed=info.seed)


def execute(prepared: Prepared, callbacks: Sequence[Callback] = (), dashboard_every_s: float | None = 10.0) -> RunReport:
    """Run a prepared experiment. Figures, a note and trials for optuna-dashboard are refreshed every
    ``dashboard_every_s`` seconds and at the end (None: not at all; see ``qd.dashboard``)."""
    exp = prepared.experiment
    listeners = []
    if dashboard_every_s is not None:
        from qd.dashboard import Publisher

        listeners.append(Publisher(prepared.store, prepared.problem, exp.budget, every_s=dashboard_every_s))
    return run(prepared.problem, prepared.strategy, prepared.evaluator, prepared.store, budget=exp.budget,
               workers=exp.workers, time_limit_s=exp.time_limit_s, timeout_s=exp.timeout_s,
               progress=exp.progress, callbacks=callbacks, listeners=listeners)


def problem_of(store: Store) -> Problem:
    """Rebuild the problem a stored run was made with."""
    return get_problem(store.info.problem, **store.info.problem_options)
