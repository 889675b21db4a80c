"""The Optuna-backed store: round-trips, failure reasons, frames, identity checks."""

import optuna
import pytest

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
    # It is an ordinary Optuna study: what the dashboard reads.
    study = optuna.load_study(study_name="r", storage=storage)
    assert study.metric_names == ["f1", "f2"]
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                                                 optuna.trial.TrialState.RUNNING]
    assert study.trials[1].user_attrs["fail_reason"] == "exception: ValueError: boom"


def test_constraints_are_visible_to_optuna(storage):
    problem = get_problem("zdt1", dim=4)
    store = Store.create(storage, _info(), problem)
    config = {f"x{i}": 0.5 for i in range(4)}
    t = store.start(config, problem.space.active_distributions(config))
    store.complete(t, [1.0, 2.0], constraints=[0.5])
    assert not store.trials()[0].feasible
    assert optuna.load_study(study_name="r", storage=storage).trials[0].system_attrs["constraints"] == [0.5]


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
