"""The record and its Optuna mirror: round-trips, failure reasons, frames, identity checks."""

import numpy as np
import optuna
import pytest

from problems.zdt import ZDT1
from qd.columns import COMPLETE, FAILED, Columns
from qd.mirror import Mirror
from qd.registry import get_problem
from qd.store import RunInfo, RunNotFound, Store


@pytest.fixture
def storage(tmp_path):
    return f"sqlite:///{tmp_path}/runs.db"


def _info(name="r", strategy="random"):
    return RunInfo(name=name, problem="zdt1", problem_options={"dim": 4}, strategy=strategy, strategy_options={},
                   seed=3)


def test_round_trip_through_a_fresh_connection(storage):
    problem = get_problem("zdt1", dim=4)
    store = Store.create(storage, _info(), problem)
    config = {f"x{i}": 0.25 * i for i in range(4)}
    t = store.start(config, problem.space.active_distributions(config), seed=11)
    store.complete(t, [0.1, 0.9], measures=[0.2, 0.3][: len(problem.measures)], metadata={"wall_time_s": 1.5})
    f = store.start(config, problem.space.active_distributions(config))
    store.fail(f, "exception: ValueError: boom")
    store.start(config, problem.space.active_distributions(config))

    again = Store.open(storage, "r")
    assert again.info == _info()
    trials = again.trials()
    assert [t.state for t in trials] == ["complete", "failed", "running"]
    assert trials[0].params == config and trials[0].values == [0.1, 0.9] and trials[0].seed == 11
    assert trials[0].metadata == {"wall_time_s": 1.5}
    assert trials[1].reason == "exception: ValueError: boom" and trials[1].finished and not trials[1].stale
    assert again.counts() == {"n_complete": 1, "n_failed": 1, "n_stale": 0, "n_running": 1}
    df = again.dataframe()
    assert list(df["state"]) == ["complete", "failed", "running"]
    assert df.loc[0, "values.f1"] == 0.1 and df.loc[1, "reason"].startswith("exception")
    # The mirror copies finished trials into an ordinary Optuna study: what the dashboard reads.
    assert Mirror(again, problem).sync(again.columns()) == 2
    assert Mirror(again, problem).sync(again.columns()) == 0  # copied once
    study = optuna.load_study(study_name="r", storage=storage)
    assert study.metric_names == ["f1", "f2"]
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    assert study.trials[0].params == config and study.trials[0].user_attrs["qd_number"] == 0
    assert study.trials[1].user_attrs["fail_reason"] == "exception: ValueError: boom"


class _Constrained(ZDT1):
    constraints = ("c",)


def test_constraints_are_visible_to_optuna(storage):
    problem = _Constrained(dim=4)
    store = Store.create(storage, _info(), problem)
    config = {f"x{i}": 0.5 for i in range(4)}
    t = store.start(config, problem.space.active_distributions(config))
    store.complete(t, [1.0, 2.0], constraints=[0.5])
    assert not store.trials()[0].feasible
    Mirror(store, problem).sync(store.columns())
    assert optuna.load_study(study_name="r", storage=storage).trials[0].system_attrs["constraints"] == [0.5]


def test_many_trials_round_trip_as_columns(storage):
    """Trials written in grouped flushes come back as the same columns, in number order."""
    problem = get_problem("mixed")
    store = Store.create(storage, _info("cols"), problem)
    store.autoflush = False
    rng = np.random.default_rng(0)
    configs = problem.space.sample(300, rng)
    raw = problem.space.to_raw(configs)
    d, m, k, c = store.dims
    cols = Columns.empty(d, m, k, c, n=300)
    cols.number[:] = store.next_numbers(300)
    cols.raw[:] = raw
    cols.state[:] = np.where(np.arange(300) % 7 == 0, FAILED, COMPLETE)
    ok = cols.state == COMPLETE
    cols.values[ok] = rng.normal(size=(ok.sum(), m))
    cols.measures[ok] = rng.normal(size=(ok.sum(), k))
    cols.reason = [None if o else "exception: boom" for o in ok]
    for part in np.array_split(np.arange(300)[::-1], 5):  # finished out of order, five flushes
        store.finish_many(cols.select(part))
        store.flush()
    back = Store.open(storage, "cols").columns()
    assert back.equals(cols)
    assert [t.params for t in Store.open(storage, "cols").trials()] == configs


def test_existing_runs_need_resume_and_must_match(storage):
    problem = get_problem("zdt1", dim=4)
    Store.create(storage, _info(), problem)
    with pytest.raises(ValueError, match="already exists .* pass --resume"):
        Store.create(storage, _info(), problem)
    with pytest.raises(ValueError, match="strategy 'random', not 'tpe'"):
        Store.create(storage, _info(strategy="tpe"), problem, resume=True)
    assert Store.create(storage, _info(), problem, resume=True).info.name == "r"


def test_missing_run_lists_what_exists(storage):
    Store.create(storage, _info("present"), get_problem("zdt1", dim=4))
    with pytest.raises(RunNotFound, match=r"no run named 'absent' .* runs there: \['present'\]"):
        Store.open(storage, "absent")
