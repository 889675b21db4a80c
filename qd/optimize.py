"""``qd.optimize``: one call that runs a problem (registered or not) and returns the run.

The same parts as ``qd run`` (``qd.session``) for a script or a notebook that holds a ``Problem``
object::

    import qd
    run = qd.optimize(MyProblem(), "map-elites", budget=2000, storage="sqlite:///runs.db")
    run.heatmap(); run.pareto

A run of an unregistered problem is recorded like any other; views that rebuild problems by name
(``qd show``, ``load_run``) read its record without the problem (no archive map there), while the
``Run`` returned here has it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from qd.checks import check_bool, check_int, check_number
from qd.experiment import DEFAULT_STORAGE, Experiment, ExperimentError, check
from qd.problem import Problem

if TYPE_CHECKING:
    from evaluators import Evaluator
    from qd.explore import Run
    from qd.run import Callback
    from qd.strategy import Strategy


def optimize(
    problem: Problem | str,
    strategy: str | Strategy = "random",
    *,
    budget: int,
    storage: str = DEFAULT_STORAGE,
    name: str | None = None,
    evaluator: str | Evaluator = "inprocess",
    workers: int = 1,
    seed: int = 0,
    problem_options: Mapping[str, Any] | None = None,
    strategy_options: Mapping[str, Any] | None = None,
    evaluator_options: Mapping[str, Any] | None = None,
    resume: bool = False,
    time_limit_s: float | None = None,
    timeout_s: float | None = None,
    progress: bool = True,
    dashboard_every_s: float | None = None,
    callbacks: Sequence[Callback] = (),
) -> Run:
    """Run ``problem`` with ``strategy`` until ``budget`` evaluations have finished; return the run.

    Everything is checked before the first evaluation; a bad value raises and records nothing.

    Args:
        problem: a ``Problem`` object (registered or not), or a registered name (built with
            ``problem_options``).
        strategy: a registered strategy name (built with ``strategy_options`` and ``seed``), or a
            ``Strategy`` object already built for ``problem``.
        budget: finished evaluations the run ends with (also when resuming: the run's total).
        storage: where the run is recorded (``sqlite:///PATH``, ``postgresql://...``,
            ``journal:///PATH``).
        name: the run's name (default ``"<problem>-<strategy>-s<seed>"``).
        evaluator: ``"inprocess"``, ``"process"``, ``"ray"`` (built with ``evaluator_options``), or
            an ``Evaluator`` object.
        workers: evaluations in flight at once.
        seed: the run's seed (the strategy's, and the root of every evaluation's seed).
        resume: continue the run ``name`` if it exists (its recorded strategy state is restored).
        time_limit_s: stop launching evaluations after this long.
        timeout_s: bound on one evaluation, for evaluators that support it.
        progress: a progress bar (terminal) or log lines.
        dashboard_every_s: refresh optuna-dashboard's figures this often (None: never).
        callbacks: ``callback(store, trial)`` after each finished evaluation.

    Returns:
        The ``qd.explore.Run`` (its ``report`` attribute holds the loop's ``RunReport``).

    Raises:
        OptionError: a bad problem, strategy or evaluator option, or a bad argument here.
        ExperimentError: a bad budget, name or storage, or a run that exists without ``resume``.
    """
    from evaluators import Evaluator, make_evaluator
    from qd.explore import build_run
    from qd.registry import get_problem
    from qd.run import run
    from qd.store import RunInfo, Store
    from qd.strategies import get_strategy
    from qd.strategy import Strategy

    owner = "optimize"
    check_int(budget, "budget", owner, low=1)
    check_int(workers, "workers", owner, low=1)
    check_int(seed, "seed", owner)
    check_bool(resume, "resume", owner)
    for option, value in (("time_limit_s", time_limit_s), ("timeout_s", timeout_s),
                          ("dashboard_every_s", dashboard_every_s)):
        check_number(value, option, owner, low=0, low_open=True, none=True)
    if isinstance(problem, str):
        problem = get_problem(problem, **dict(problem_options or {}))
    elif not isinstance(problem, Problem):
        raise ExperimentError(f"{owner}: problem={problem!r} is not allowed; allowed: a qd.Problem or a registered "
                              f"problem name")
    elif problem_options:
        raise ExperimentError(f"{owner}: problem_options are for a problem given by name; build the problem object "
                              f"with its options instead")
    problem_name = problem.name or type(problem).__name__
    if isinstance(strategy, Strategy):
        strategy_name, options = type(strategy).__name__, dict(strategy_options or {})
    else:
        strategy_name, options = strategy, dict(strategy_options or {})
        strategy = get_strategy(strategy_name, problem, seed=seed, **options)
    if not isinstance(evaluator, Evaluator):
        evaluator = make_evaluator(evaluator, **dict(evaluator_options or {}))
    exp = Experiment(problem=problem_name, name=name or "", storage=storage, budget=budget, workers=workers,
                     seed=seed, strategy=strategy_name, resume=resume, time_limit_s=time_limit_s, timeout_s=timeout_s)
    check(exp)
    info = RunInfo(name=exp.run_name, problem=problem_name, problem_options=dict(getattr(problem, "options", {}) or {}),
                   strategy=strategy_name, strategy_options=options, seed=seed)
    try:
        store = Store.create(storage, info, problem, resume=resume)
    except ValueError as e:
        raise ExperimentError(str(e).replace("pass --resume", "pass resume=True").replace("--name", "name")) from None
    listeners = []
    if dashboard_every_s is not None:
        from qd.dashboard import Publisher

        listeners.append(Publisher(store, problem, budget, every_s=dashboard_every_s))
    report = run(problem, strategy, evaluator, store, budget=budget, workers=workers, time_limit_s=time_limit_s,
                 timeout_s=timeout_s, progress=progress, callbacks=callbacks, listeners=listeners)
    out = build_run(store, problem)
    out.report = report
    return out
