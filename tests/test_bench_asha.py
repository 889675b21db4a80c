"""experiments/bench_asha.py's fairness pieces: the problem searched on the quality it is judged on,
and an ASHA run long enough to spend what the full-fidelity run spends."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import qd
from qd.fidelity import rung_values
from qd.strategies import get_strategy

from tests.test_fidelity_noise import Budgeted

_path = Path(__file__).resolve().parents[1] / "experiments" / "bench_asha.py"
_spec = importlib.util.spec_from_file_location("bench_asha", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_first_objective_keeps_the_space_and_fidelity_and_evaluates_the_first_value():
    inner = Budgeted(objectives=2)
    pb = bench.FirstObjective(inner)
    config = {"x0": 0.1, "x1": 0.9, "steps": 9}
    assert [o.name for o in pb.objectives] == ["loss"] and pb.fidelity == "steps" and pb.space is inner.space
    assert pb.measures == inner.measures
    ev = pb.evaluate(config, 0)
    whole = inner.evaluate(config, 0)
    assert list(ev.values) == [whole.values[0]] and ev.measures == whole.measures


def test_asha_run_of_that_many_evaluations_spends_at_least_the_full_runs_spend(tmp_path):
    pb = bench.FirstObjective(Budgeted(objectives=2))
    values = rung_values(pb.space["steps"], 3)
    spend = 6 * 27  # six full-fidelity evaluations
    budget = bench.asha_evaluations(spend, values, 3)
    strat = get_strategy("random", pb, seed=0, fidelity="asha", eta=3)
    run = qd.optimize(pb, strat, budget=budget, seed=0, storage=f"sqlite:///{tmp_path}/a.db", name="a", progress=False)
    trials = [t for t in run.store.trials() if t.state == "complete"]
    assert len(trials) == budget
    assert sum(t.params["steps"] for t in trials) >= spend  # so the cut at the full run's spend binds
    assert any(t.params["steps"] == 27 for t in trials)  # and the run reached the top rung
