"""``qd.optimize``: one call runs a problem object (registered or not) and returns the run; it
records what ``qd run`` records, checks everything before any work, and resumes."""

from pathlib import Path

import pytest

import qd
from qd import Evaluation, Float, Measure, Objective, Problem, Space
from qd.experiment import Experiment
from qd.explore import load_run
from qd.session import execute, prepare
from qd.store import Store


class Bowl(Problem):
    """Not registered anywhere: only this test knows it."""

    def __init__(self):
        self.space = Space([Float("x", -1.0, 1.0), Float("y", -1.0, 1.0)])
        self.objectives = (Objective("f"),)
        self.measures = (Measure("x", -1.0, 1.0), Measure("y", -1.0, 1.0))

    def evaluate(self, config, seed):
        return Evaluation(values=[config["x"] ** 2 + config["y"] ** 2], measures=[config["x"], config["y"]])


def test_an_unregistered_problem_runs_and_comes_back_as_a_run(tmp_path):
    url = f"sqlite:///{tmp_path}/runs.db"
    run = qd.optimize(Bowl(), "map-elites", budget=60, storage=url, strategy_options={"bins": 5}, progress=False)
    assert run.name == "Bowl-map-elites-s0" and run.report.finished == 60
    assert len(run.trials) == 60 and (run.trials["state"] == "complete").all()
    assert run.archive is not None and 0 < len(run.elites) <= 25
    best = run.trials["values.f"].min()
    assert run.pareto["values.f"].tolist() == [best]
    # The record is a run like any other; without the problem it reads without an archive.
    with pytest.warns(UserWarning, match="cannot be rebuilt"):
        again = load_run(url, run.name)
    assert again.trials["values.f"].tolist() == run.trials["values.f"].tolist() and again.archive is None


def test_optimize_records_what_qd_run_records(tmp_path):
    url = f"sqlite:///{tmp_path}/runs.db"
    run = qd.optimize("zdt1", "tpe", budget=12, storage=url, name="a", seed=3, problem_options={"dim": 3},
                      strategy_options={"n_startup_trials": 4}, progress=False)
    exp = Experiment(problem="zdt1", problem_options={"dim": 3}, strategy="tpe",
                     strategy_options={"n_startup_trials": 4}, seed=3, budget=12, storage=url, name="b",
                     evaluator="inprocess", progress=False)
    execute(prepare(exp), dashboard_every_s=None)
    ours, theirs = Store.open(url, "a"), Store.open(url, "b")
    assert [t.params for t in ours.trials()] == [t.params for t in theirs.trials()]
    assert [t.values for t in ours.trials()] == [t.values for t in theirs.trials()]
    assert ours.info.to_json() == theirs.info.to_json()
    assert run.reference is not None


def test_resume_continues_to_exactly_the_budget(tmp_path):
    url = f"sqlite:///{tmp_path}/runs.db"
    qd.optimize("sphere", "map-elites", budget=30, storage=url, name="r", problem_options={"dim": 3}, progress=False)
    with pytest.raises(qd.QdError, match="already exists .* pass resume=True to continue it"):
        qd.optimize("sphere", "map-elites", budget=50, storage=url, name="r", problem_options={"dim": 3},
                    progress=False)
    run = qd.optimize("sphere", "map-elites", budget=50, storage=url, name="r", problem_options={"dim": 3},
                      resume=True, progress=False)
    assert len(run.trials) == 50 and run.report.finished == 50  # the run's total


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 0}, "optimize: option budget=0 is not allowed; allowed: an integer >= 1"),
    ({"budget": 5, "workers": 1.5}, "option workers=1.5 is not allowed"),
    ({"budget": 5, "strategy": "anneal"}, "strategy 'anneal' is not registered"),
    ({"budget": 5, "strategy_options": {"sigmaa": 1}}, "unknown option(s) ['sigmaa']"),
    ({"budget": 5, "evaluator": "gpu"}, "evaluator 'gpu' is not registered"),
    ({"budget": 5, "problem_options": {"dim": 3}}, "problem_options are for a problem given by name"),
    ({"budget": 5, "timeout_s": -1}, "option timeout_s=-1 is not allowed"),
])
def test_bad_arguments_are_refused_before_any_record_is_made(tmp_path, kwargs, message):
    db = tmp_path / "runs.db"
    kwargs = {"strategy": "map-elites", **kwargs}
    with pytest.raises(qd.QdError) as e:
        qd.optimize(Bowl(), storage=f"sqlite:///{db}", progress=False, **kwargs)
    assert message in str(e.value)
    assert not Path(db).exists()
