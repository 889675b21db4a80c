"""Asks beside the run loop (``qd.background``): results are recorded while a proposal is computed,
``ask_time_limit_s`` hands out quasi-random fallbacks (recorded as such), tells are never lost."""

from __future__ import annotations

import time

import pytest

from evaluators.process import ProcessPoolEvaluator as ProcessEvaluator
from qd.background import BackgroundAsks
from qd.problem import Evaluation, Objective, Problem
from qd.run import run
from qd.space import Float, Int, Space
from qd.store import RunInfo, Store, Trial
from qd.strategies import get_strategy
from qd.strategies.random import RandomSearch


class Sleepy(Problem):
    """Evaluations of ``seconds`` each; each says when it finished."""

    name = "sleepy"

    def __init__(self, seconds: float = 0.3):
        self.seconds = seconds
        self.space = Space([Float("x", 0.0, 1.0), Int("k", 0, 50)])
        self.objectives = (Objective("f"), Objective("g"))

    def evaluate(self, config, seed):
        time.sleep(self.seconds)
        return Evaluation(values=[config["x"], 1 - config["x"] + config["k"] / 50],
                          metadata={"finished_at": time.time()})


class SlowAsks(RandomSearch):
    """Sobol points, each ask after the first taking ``seconds`` (a model-based proposal's cost)."""

    name = "slow"

    def __init__(self, problem, seed=0, seconds=1.5):
        super().__init__(problem, seed)
        self.seconds, self.asks, self.told = seconds, 0, []

    def ask(self, n, pending=()):
        self.asks += 1
        if self.asks > 1:
            time.sleep(self.seconds)
        return super().ask(n, pending)

    def tell(self, trial):
        self.told.append(trial.number)


def _run(tmp_path, strategy, problem, budget, workers, name):
    delays = []
    info = RunInfo(name=name, problem="sleepy", problem_options={}, strategy="slow", strategy_options={}, seed=0)
    store = Store.create(f"sqlite:///{tmp_path}/{name}.db", info, problem)

    def on_record(store, trial):
        if trial.state == "complete":
            delays.append(time.time() - trial.metadata["finished_at"])

    report = run(problem, strategy, ProcessEvaluator(), store, budget=budget, workers=workers, progress=False,
                 callbacks=[on_record])
    return report, store, delays


def test_results_are_recorded_while_a_proposal_is_computed(tmp_path):
    problem = Sleepy(0.3)
    blocking = SlowAsks(problem, seconds=1.5)
    report, _, delays_blocking = _run(tmp_path, blocking, problem, budget=6, workers=2, name="blocking")
    assert report.finished == 6
    # The plain loop records an evaluation that finished during an ask only after the ask.
    assert max(delays_blocking) > 0.8

    inner = SlowAsks(problem, seconds=1.5)
    report, store, delays = _run(tmp_path, BackgroundAsks(inner), problem, budget=6, workers=2, name="background")
    assert report.finished == 6 and report.complete == 6
    assert max(delays) < 0.6, delays  # recorded as it arrives, proposal or not
    assert sorted(inner.told) == [t.number for t in store.trials()]  # every tell reached the strategy
    assert len({(t.params["x"], t.params["k"]) for t in store.trials()}) == 6


def test_time_limit_hands_out_quasi_random_fallbacks_recorded_in_the_trial(tmp_path):
    problem = Sleepy(0.4)
    inner = SlowAsks(problem, seconds=1.0)
    strategy = BackgroundAsks(inner, ask_time_limit_s=0.3)
    report, store, _ = _run(tmp_path, strategy, problem, budget=6, workers=1, name="limit")
    assert report.finished == 6
    trials = store.trials()
    fallback = [t for t in trials if t.origin == "fallback"]
    assert fallback and len(fallback) == len(strategy.fallbacks)
    assert all(seconds >= 0.3 for _, seconds in strategy.fallbacks)
    assert any(t.origin == "strategy" for t in trials[1:])  # the late proposal is still used
    assert len({(t.params["x"], t.params["k"]) for t in trials}) == 6
    for t in trials:
        assert problem.space.validate(t.params) == t.params


def test_tells_during_a_proposal_are_replayed_in_order_and_errors_surface():
    problem = Sleepy(0.0)
    inner = SlowAsks(problem, seconds=0.5)
    s = BackgroundAsks(inner, quick_s=0.0)
    assert s.ask(1) == []  # computed on the thread; with quick_s=0 the ask does not wait for it
    assert s.wait(5.0)
    first = s.ask(1)
    assert len(first) == 1 and not s.busy
    assert s.ask(1) == [] and s.busy  # the next proposal (0.5 s) is under way
    assert s.state()["proposing"].endswith("s")
    for k in range(3):
        s.tell(Trial(number=k, params=first[0], state="complete", values=[0.0, 1.0]))
    assert inner.told == []  # held: the inner strategy is busy in its thread
    assert s.wait(5.0)
    assert len(s.ask(1)) == 1 and inner.told == [0, 1, 2]

    class Broken(RandomSearch):
        def ask(self, n, pending=()):
            raise RuntimeError("model blew up")

    b = BackgroundAsks(Broken(problem), quick_s=0.0)
    with pytest.raises(RuntimeError, match="model blew up"):  # raised in the loop's thread, by the next ask
        b.ask(1)
        b.wait(5.0)
        b.ask(1)


def test_options_from_the_registry_wrap_any_strategy():
    problem = Sleepy(0.0)
    s = get_strategy("tpe", problem, seed=0, ask_time_limit_s=5)
    assert isinstance(s, BackgroundAsks) and s.ask_time_limit_s == 5.0
    with pytest.raises(ValueError, match="ask_time_limit_s=-1"):
        get_strategy("random", problem, ask_time_limit_s=-1)
    with pytest.raises(ValueError, match="background='yes'"):
        get_strategy("random", problem, background="yes")
