"""The contract every strategy keeps, as checks a plug-in author can run on their own strategy.

A strategy is described by a ``StrategyCase`` (how to build it, which problems it takes, whether
a restored run continues exactly). ``StrategyContract`` is a pytest base class with one test per
contract point; subclass it and set ``case``::

    from qd.testing import StrategyCase, StrategyContract

    class TestMyStrategy(StrategyContract):
        case = StrategyCase("mine", make=lambda problem, seed: MyStrategy(problem, seed=seed))

Every ``check_*`` function can also be called on its own. The points (``qd.strategy`` states the
contract itself):

- ``check_asks``: ``ask(n, pending)`` returns n valid configurations (``Space.validate`` returns
  them unchanged), distinct, none equal to a pending one or to one already told, over rounds in
  which some asks stay pending while others are told in shuffled order, with failures among them.
  While evaluations are pending it may return fewer (a CMA-ES batch waits for its results); with
  nothing pending it returns n.
- ``check_same_seed``: two strategies with one seed, told the same results, ask the same
  configurations; another seed asks others; ``restore`` of an empty history changes nothing
  (a fresh run is exactly what its seed makes).
- ``check_failures``: failed trials are not learned from (an archive stays empty, a model's
  observation count does not grow) and the strategy still asks valid configurations.
- ``check_columns``: the array methods (``ask_raw``, ``tell_columns``) keep the same contract.
- ``check_restore``: a run interrupted and resumed from its store (``qd.run.run``, per
  configuration and, for vectorised problems, as arrays) continues with exactly the asks of an
  uninterrupted run when ``StrategyCase.resumes_exactly``; otherwise it restores the told
  history (archive, observations) and proposes nothing it has evaluated already.
- ``check_refuses``: a problem kind the strategy does not take (one objective, several) is
  refused when the strategy is built, with an error that says what is allowed.

The problems are ``mixed`` (integers, categoricals, a bool, floats) and ``conditional``
(parameters active only for some choices, a condition under a condition), with their two
objectives or with only the first, and with a deterministic quarter of evaluations failing
(``ContractProblem``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import pytest

from qd.columns import COMPLETE, FAILED, Columns
from qd.problem import BatchEvaluation, Evaluation, Problem
from qd.space import Config
from qd.store import RunInfo, Store, Trial
from qd.strategy import Strategy

ObjectiveKind = Literal["one", "several"]
#: A failed evaluation's reason in these checks.
FAILURE_REASON = "exception: RuntimeError: contract failure"


# --- problems -----------------------------------------------------------------------------------
class ContractProblem(Problem):
    """A problem with its first objective only (``objectives="one"``) or all of them, where the
    configurations whose identity hashes to 0 modulo ``fail_every`` fail (0: none fail).

    The space, measures, directions and reference point are the inner problem's (the reference
    point cut to the objectives kept); vectorised when the inner problem is.
    """

    def __init__(self, inner: Problem, objectives: ObjectiveKind = "several", fail_every: int = 4):
        self.inner, self.fail_every = inner, int(fail_every)
        self.m = 1 if objectives == "one" else len(inner.objectives)
        self.name = f"{inner.name or type(inner).__name__.lower()}-{objectives}"
        self.space, self.measures, self.constraints = inner.space, inner.measures, inner.constraints
        self.objectives = tuple(inner.objectives[:self.m])
        ref = inner.reference_point
        self.reference_point = None if ref is None else tuple(ref[:self.m])
        self.vectorized = bool(inner.vectorized)  # type: ignore[misc]
        self.options = {}

    def fails(self, config: Config) -> bool:
        """Whether ``config``'s evaluation fails (a function of the configuration alone)."""
        key = repr(sorted(self.space.validate(config).items())).encode()
        return self.fail_every > 0 and zlib.crc32(key) % self.fail_every == 0

    def evaluate(self, config: Config, seed: int) -> Evaluation:
        if self.fails(config):
            raise RuntimeError("contract failure")
        ev = self.inner.evaluate(config, seed)
        return Evaluation(values=list(ev.values)[:self.m], measures=ev.measures, constraints=ev.constraints)

    def evaluate_batch(self, X: np.ndarray, seeds: np.ndarray) -> BatchEvaluation:
        """X (n, d) raw -> the inner problem's batch, objectives cut, failing rows marked."""
        be = self.inner.evaluate_batch(X, seeds)
        errors = [FAILURE_REASON if self.fails(c) else None for c in self.space.from_raw(X)]
        return BatchEvaluation(values=np.asarray(be.values)[:, :self.m], measures=be.measures,
                               constraints=be.constraints, errors=errors)


def contract_problem(name: str, objectives: ObjectiveKind = "several", fail_every: int = 4) -> ContractProblem:
    """``mixed`` or ``conditional`` as a ``ContractProblem``."""
    from problems.conditional import Conditional
    from problems.mixed import Mixed

    inner = {"mixed": Mixed, "conditional": Conditional}[name]()
    return ContractProblem(inner, objectives, fail_every)


# --- the strategy under test ----------------------------------------------------------------------
@dataclass(frozen=True)
class StrategyCase:
    """A strategy under test.

    Attributes:
        name: a registered strategy name, or a label for a plug-in's own.
        options: options for ``qd.strategies.get_strategy`` (small budgets keep the checks quick).
        make: ``make(problem, seed) -> Strategy``; default ``get_strategy(name, problem, seed, **options)``.
        objectives: the problems it takes: "one" objective, "several", or "any".
        resumes_exactly: a run restored from its store asks exactly what the uninterrupted run
            would have asked (its state is a function of the seed and the recorded trials).
        learned: ``learned(strategy) -> int``, how many complete trials its archive or models
            hold as observations (None: not observable); failures must not count.
        warmup: asks after which its proposals come from what it learned (the rounds of the
            checks go past it).
        heavy: its asks take seconds (a model fit and an acquisition optimisation each): only the
            first point of each test but the restore runs by default, the others are marked ``slow``.
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    make: Callable[[Problem, int], Strategy] | None = None
    objectives: Literal["one", "several", "any"] = "any"
    resumes_exactly: bool = False
    learned: Callable[[Strategy], int] | None = None
    warmup: int = 6
    heavy: bool = False

    def build(self, problem: Problem, seed: int = 0) -> Strategy:
        if self.make is not None:
            return self.make(problem, seed)
        from qd.strategies import get_strategy

        return get_strategy(self.name, problem, seed=seed, **self.options)

    def takes(self, objectives: ObjectiveKind) -> bool:
        return self.objectives in ("any", objectives)


# --- helpers ------------------------------------------------------------------------------------
def config_id(config: Config) -> tuple:
    """Exact identity of a configuration (values compared by their repr)."""
    return tuple(sorted((k, repr(v)) for k, v in config.items()))


def evaluate(problem: Problem, config: Config, number: int) -> Trial:
    """The finished ``Trial`` of ``config`` (complete, or failed with its reason)."""
    try:
        values, measures, constraints = problem.normalise(problem.evaluate(config, number))
    except Exception as e:  # noqa: BLE001 - a failing evaluation is a failed trial
        return Trial(number=number, params=dict(config), state="failed", reason=f"exception: {e}")
    return Trial(number=number, params=dict(config), state="complete", values=values, measures=measures or None,
                 constraints=constraints or None)


def assert_valid(problem: Problem, configs: Sequence[Config], what: str = "ask") -> None:
    """Each configuration is valid in ``problem.space`` and already normalised."""
    for config in configs:
        assert isinstance(config, dict), f"{what} returned {type(config).__name__} {config!r}, not a dict"
        assert problem.space.validate(config) == config, f"{what} returned {config!r}, not a valid configuration"


def assert_new(configs: Sequence[Config], seen: set[tuple], what: str = "ask") -> None:
    """The configurations are distinct and none is in ``seen`` (identities, ``config_id``)."""
    ids = [config_id(c) for c in configs]
    assert len(set(ids)) == len(ids), f"{what} returned one configuration twice: {configs}"
    again = [c for c, i in zip(configs, ids) if i in seen]
    assert not again, f"{what} returned configurations that are pending or evaluated already: {again}"


@dataclass
class Drive:
    """An asynchronous ask/tell session: rounds of ``ask(n, pending)``, then half of what is
    pending told in shuffled order (``rng``), the rest left pending."""

    problem: Problem
    strategy: Strategy
    rng: np.random.Generator
    pending: list[Config] = field(default_factory=list)
    told: list[Trial] = field(default_factory=list)
    asked: list[list[Config]] = field(default_factory=list)

    def round(self, n: int, check: bool = True) -> list[Config]:
        got = self.strategy.ask(n, pending=list(self.pending))
        if check:
            # Fewer than n only while evaluations are pending (a batch waiting for its results).
            assert len(got) <= n and (self.pending or len(got) == n), \
                f"ask({n}) returned {len(got)} configurations with {len(self.pending)} pending"
            assert_valid(self.problem, got)
            assert_new(got, {config_id(c) for c in self.pending} | {config_id(t.params) for t in self.told})
        self.asked.append(got)
        self.pending += got
        if not self.pending:
            return got
        order = self.rng.permutation(len(self.pending))
        tell, keep = order[:max(1, len(order) // 2)], order[max(1, len(order) // 2):]
        for i in tell:
            trial = evaluate(self.problem, self.pending[i], len(self.told))
            self.strategy.tell(trial)
            self.told.append(trial)
        self.pending = [self.pending[i] for i in keep]
        return got

    def finish(self) -> None:
        """Tell everything still pending (shuffled)."""
        for i in self.rng.permutation(len(self.pending)):
            trial = evaluate(self.problem, self.pending[i], len(self.told))
            self.strategy.tell(trial)
            self.told.append(trial)
        self.pending = []


def _rounds(case: StrategyCase, n: int) -> int:
    return max(3, -(-case.warmup // n) + 2)


# --- the checks ---------------------------------------------------------------------------------
def check_asks(case: StrategyCase, problem: Problem, n: int = 3, seed: int = 0) -> Drive:
    """Rounds of ``ask(n, pending)`` past the warm-up with shuffled tells (see the module docstring)."""
    drive = Drive(problem, case.build(problem, seed), np.random.default_rng(seed))
    for _ in range(_rounds(case, n)):
        drive.round(n)
    drive.finish()
    got = drive.strategy.ask(n, pending=())  # nothing outstanding: a full batch
    assert len(got) == n, f"ask({n}) with nothing pending returned {len(got)} configurations"
    assert_valid(problem, got)
    assert_new(got, {config_id(t.params) for t in drive.told})
    return drive


def check_same_seed(case: StrategyCase, problem: Problem, n: int = 3, seed: int = 0) -> None:
    """One seed and one history give one sequence of asks; another seed another; restoring an
    empty history (a fresh run) leaves the sequence as it is."""
    a = Drive(problem, case.build(problem, seed), np.random.default_rng(seed))
    b = Drive(problem, case.build(problem, seed), np.random.default_rng(seed))
    b.strategy.restore([])
    space = problem.space
    b.strategy.restore_columns(Columns.empty(space.dim, len(problem.objectives), len(problem.measures),
                                             len(problem.constraints)))
    for r in range(_rounds(case, n)):
        got_a, got_b = a.round(n, check=False), b.round(n, check=False)
        assert got_a == got_b, f"round {r}: one seed, one history, other asks: {got_a} != {got_b}"
    other = case.build(problem, seed + 1).ask(n, pending=())
    assert other != a.asked[0], f"seeds {seed} and {seed + 1} asked the same first configurations {other}"


def check_failures(case: StrategyCase, problem: Problem, n: int = 4, seed: int = 0) -> None:
    """Failed trials are not learned from; the strategy keeps asking valid configurations."""
    strategy = case.build(problem, seed)
    told: set[tuple] = set()
    for r in range(max(2, -(-case.warmup // n))):
        got = strategy.ask(n, pending=())
        assert_valid(problem, got)
        assert_new(got, told)
        for i, config in enumerate(got):
            told.add(config_id(config))
            strategy.tell(Trial(number=r * n + i, params=config, state="failed", reason=FAILURE_REASON))
    archive = getattr(strategy, "archive", None)
    if archive is not None:
        assert archive.empty, "failed trials were inserted into the archive"
    if case.learned is not None:
        assert case.learned(strategy) == 0, f"failed trials were learned from: {case.learned(strategy)} observations"
    # Then complete and failed ones mixed: only the complete ones count.
    got = strategy.ask(n, pending=())
    assert_valid(problem, got)
    complete = 0
    for i, config in enumerate(got):
        trial = evaluate(problem, config, 1000 + i)
        if i % 2:
            trial = Trial(number=trial.number, params=config, state="failed", reason=FAILURE_REASON)
        complete += trial.state == "complete"
        strategy.tell(trial)
    if case.learned is not None:
        assert case.learned(strategy) == complete, f"{case.learned(strategy)} observations after {complete} complete"
    assert_valid(problem, strategy.ask(n, pending=()))


def columns_of(problem: Problem, R: np.ndarray, first: int) -> Columns:
    """Finished trials of the raw rows ``R`` (n, d), numbered from ``first``, as the run loop records them."""
    n = len(R)
    cols = Columns.empty(problem.space.dim, len(problem.objectives), len(problem.measures), len(problem.constraints),
                         n=n)
    cols.number[:] = np.arange(first, first + n)
    cols.raw[:] = R
    cols.seed[:] = cols.number
    be = problem.evaluate_batch(R, cols.seed)
    errors = list(be.errors) if be.errors is not None else [None] * n
    ok = np.array([e is None for e in errors], dtype=bool)
    cols.state[:] = np.where(ok, COMPLETE, FAILED)
    cols.values[ok] = np.asarray(be.values, dtype=float).reshape(n, -1)[ok]
    if len(problem.measures):
        cols.measures[ok] = np.asarray(be.measures, dtype=float).reshape(n, -1)[ok]
    if len(problem.constraints):
        cols.constraints[ok] = np.asarray(be.constraints, dtype=float).reshape(n, -1)[ok]
    cols.reason = [e for e in errors]
    return cols


def check_columns(case: StrategyCase, problem: Problem, n: int = 4, seed: int = 0) -> None:
    """``ask_raw`` returns (n', d) raw rows of valid, new configurations; ``tell_columns`` learns
    from the complete rows only."""
    strategy = case.build(problem, seed)
    seen: set[tuple] = set()
    complete, first = 0, 0
    for _ in range(max(3, -(-case.warmup // n) + 1)):
        R = np.asarray(strategy.ask_raw(n))
        assert R.ndim == 2 and R.shape[1] == problem.space.dim and 1 <= len(R) <= n, \
            f"ask_raw({n}) returned an array of shape {R.shape}"
        configs = problem.space.from_raw(R)
        assert_valid(problem, configs, "ask_raw")
        assert_new(configs, seen, "ask_raw")
        seen |= {config_id(c) for c in configs}
        cols = columns_of(problem, R, first)
        first += len(R)
        complete += int(cols.complete.sum())
        strategy.tell_columns(cols)
    if case.learned is not None:
        assert case.learned(strategy) == complete, f"{case.learned(strategy)} observations after {complete} complete"


def run_for(problem: Problem, strategy: Strategy, store: Store, budget: int, columnar: bool) -> None:
    """``qd.run.run`` in process: as arrays (``columnar``, a vectorised problem) or per configuration."""
    from evaluators.inprocess import InProcessEvaluator
    from qd.run import run

    assert not columnar or problem.vectorized, "the columnar path needs a vectorised problem"
    callbacks = () if columnar else (lambda store, trial: None,)  # a callback forces the per-trial path
    run(problem, strategy, InProcessEvaluator(), store, budget=budget, workers=1, progress=False,
        callbacks=callbacks)


def check_restore(case: StrategyCase, problem: Problem, storage: str, *, columnar: bool = False, budget: int = 0,
                  seed: int = 0) -> None:
    """Interrupt a run at ``budget`` evaluations and resume it to twice that, against an
    uninterrupted run (``storage``: an SQLite URL or any other storage; two runs are made there)."""
    budget = budget or case.warmup + 4
    tag = "cols" if columnar else "rows"

    def store(name: str) -> Store:
        info = RunInfo(name=f"contract-{name}-{tag}", problem=problem.name, problem_options={}, strategy=case.name,
                       strategy_options=dict(case.options), seed=seed)
        return Store.create(storage, info, problem, resume=True)

    whole = store("whole")
    run_for(problem, case.build(problem, seed), whole, 2 * budget, columnar)
    parts = store("parts")
    run_for(problem, case.build(problem, seed), parts, budget, columnar)
    head = parts.trials()
    assert len(head) == budget

    # What a new driver does first: a strategy restored from the record holds the told history.
    restored = case.build(problem, seed)
    restored.restore_columns(parts.columns(), parts)
    if case.learned is not None:
        n_complete = sum(t.state == "complete" for t in head)
        assert case.learned(restored) == n_complete, \
            f"restored from {n_complete} complete trials, the strategy holds {case.learned(restored)} observations"
    archive = getattr(restored, "archive", None)
    if archive is not None:
        from qd.archive import archive_for_run

        assert archive.metrics() == archive_for_run(parts, problem).metrics(), \
            "the restored archive differs from the one recorded"

    run_for(problem, case.build(problem, seed), store("parts"), 2 * budget, columnar)
    tail = [t for t in Store.open(storage, parts.info.name).trials() if t.number >= budget]
    assert len(tail) == budget
    configs = [t.params for t in tail]
    assert_valid(problem, configs, "the resumed run")
    if case.resumes_exactly:
        expected = [t.params for t in whole.trials()[budget:]]
        assert configs == expected, "the resumed run asked other configurations than the uninterrupted run"
    else:
        assert_new(configs, {config_id(t.params) for t in head}, "the resumed run")


def check_refuses(case: StrategyCase, problem: Problem) -> None:
    """Building the strategy for a problem kind it does not take raises an error saying what is allowed."""
    with pytest.raises(ValueError, match="allowed") as info:
        case.build(problem, 0)
    assert "objective" in str(info.value), f"the refusal does not say it is about objectives: {info.value}"
    named = [option for option in case.options if option in str(info.value)]
    assert named or not case.options, f"the refusal names none of the options {sorted(case.options)}: {info.value}"


# --- the pytest base class ----------------------------------------------------------------------
PROBLEMS = ("conditional", "mixed")
OBJECTIVE_KINDS: tuple[ObjectiveKind, ...] = ("one", "several")


@dataclass(frozen=True)
class Point:
    """Where a check runs: a problem (``contract_problem``) and, for ``check_restore``, the path."""

    problem: str
    objectives: ObjectiveKind
    columnar: bool = False

    @property
    def id(self) -> str:
        return f"{self.problem}-{self.objectives}" + ("-columns" if self.columnar else "")


def _points(test: str, case: StrategyCase) -> list[Point]:
    """The points of each test; the problem kinds a case does not take are left to test_refuses."""
    kinds = [k for k in OBJECTIVE_KINDS if case.takes(k)]
    if test == "test_asks":
        return [Point(p, k) for p in PROBLEMS for k in kinds]
    if test == "test_same_seed":
        return [Point("conditional", k) for k in kinds]
    if test == "test_failures":
        return [Point("mixed", k) for k in kinds]
    if test == "test_columns":
        return [Point("conditional", kinds[-1])]
    if test == "test_restore":
        return [Point("conditional", kinds[-1]), Point("mixed", kinds[-1], columnar=True)]
    return []


class StrategyContract:
    """One test per contract point (``_points``: ``mixed`` and ``conditional``, one objective and
    several). Subclass and set ``case``, or ``cases`` for several strategies. The points of a
    ``StrategyCase.heavy`` case past the first of each test, and its restores, are marked ``slow``."""

    case: ClassVar[StrategyCase | None] = None
    cases: ClassVar[Sequence[StrategyCase]] = ()

    def pytest_generate_tests(self, metafunc: Any) -> None:
        cases = list(self.cases) or ([self.case] if self.case is not None else [])
        assert cases, f"{type(self).__name__} must set case = StrategyCase(...) or cases = [...]"
        test = metafunc.function.__name__
        if "point" not in metafunc.fixturenames:
            metafunc.parametrize("strategy_case", cases, ids=[c.name for c in cases])
            return
        params = []
        for case in cases:
            for i, point in enumerate(_points(test, case)):
                # A restore makes three runs (~30 model-based asks): slow for a heavy case.
                marks = [pytest.mark.slow] if case.heavy and (i > 0 or test == "test_restore") else []
                params.append(pytest.param(case, point, id=f"{case.name}-{point.id}", marks=marks))
        metafunc.parametrize("strategy_case, point", params)

    def test_asks(self, strategy_case: StrategyCase, point: Point) -> None:
        check_asks(strategy_case, contract_problem(point.problem, point.objectives))

    def test_same_seed(self, strategy_case: StrategyCase, point: Point) -> None:
        check_same_seed(strategy_case, contract_problem(point.problem, point.objectives))

    def test_failures(self, strategy_case: StrategyCase, point: Point) -> None:
        check_failures(strategy_case, contract_problem(point.problem, point.objectives))

    def test_columns(self, strategy_case: StrategyCase, point: Point) -> None:
        check_columns(strategy_case, contract_problem(point.problem, point.objectives))

    def test_restore(self, strategy_case: StrategyCase, point: Point, tmp_path: Any) -> None:
        check_restore(strategy_case, contract_problem(point.problem, point.objectives),
                      f"sqlite:///{tmp_path}/contract.db", columnar=point.columnar)

    def test_refuses(self, strategy_case: StrategyCase) -> None:
        missing = [k for k in OBJECTIVE_KINDS if not strategy_case.takes(k)]
        if not missing:
            pytest.skip(f"{strategy_case.name} takes problems with one objective and with several")
        check_refuses(strategy_case, contract_problem("mixed", missing[0]))
