"""The strategy contract (``qd.testing``) over every registered strategy, with small budgets.

Each built-in strategy is a ``StrategyCase``: options that keep warm-ups and model fits tiny,
which problems it takes, whether a resumed run continues exactly, and how to count what it has
learned. A strategy registered without a case here fails ``test_every_strategy_has_a_case``.
"""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from qd.store import RunInfo, Store
from qd.strategies import BUILTIN, get_strategy
from qd.testing import StrategyCase, StrategyContract, check_refuses, config_id, contract_problem, evaluate, run_for


def _optuna_complete(strategy) -> int:
    return sum(t.state == TrialState.COMPLETE for t in strategy._study.trials)


def _observations(strategy) -> int:
    return len(strategy._X)


CASES = [
    StrategyCase("random", resumes_exactly=True, warmup=0),
    StrategyCase("tpe", {"n_startup_trials": 4}, learned=_optuna_complete, warmup=4),
    StrategyCase("nsga2", {"population_size": 4}, learned=_optuna_complete, warmup=8),
    StrategyCase("nsga3", {"population_size": 4}, learned=_optuna_complete, warmup=8),
    StrategyCase("gp", {"n_startup_trials": 2}, learned=_optuna_complete, warmup=2, heavy=True),
    StrategyCase("botorch", {"n_init": 2, "num_restarts": 1, "raw_samples": 8, "mc_samples": 8,
                             "init_mc_samples": 4}, learned=_observations, warmup=2, heavy=True),
    StrategyCase("map-elites", {"initial_population": 4, "batch_size": 2, "eval_batch": 4}, warmup=6),
    StrategyCase("cma-me", {"emitters": 2, "batch_size": 3}, warmup=6),
    StrategyCase("cma-mae", {"emitters": 2, "batch_size": 3}, warmup=6),
    StrategyCase("mome", {"initial_population": 4}, warmup=6),
    StrategyCase("sail", {"n_init": 2, "generations": 1, "emitters": 2, "emitter_batch": 4},
                 learned=_observations, warmup=2, heavy=True),
    StrategyCase("mo-sail", {"n_init": 2, "generations": 1, "emitters": 2, "emitter_batch": 4},
                 learned=_observations, warmup=2, heavy=True),
]


def test_every_strategy_has_a_case():
    assert sorted(c.name for c in CASES) == sorted(BUILTIN)


class TestBuiltinStrategies(StrategyContract):
    cases = CASES


# --- seeds: the Optuna strategies are Optuna's samplers with the run's seed ------------------------
def _mixed_objective(problem, asked: list):
    """Optuna's define-by-run objective for ``mixed``, written out by hand (not through qd's Space)."""
    from problems.mixed import ACTIVATIONS

    def objective(trial):
        config = {"layers": trial.suggest_int("layers", 1, 8), "width": trial.suggest_int("width", 16, 512, log=True),
                  "activation": trial.suggest_categorical("activation", ACTIVATIONS),
                  "batch_norm": trial.suggest_categorical("batch_norm", (False, True)),
                  "lr": trial.suggest_float("lr", 1e-5, 1e-1, log=True),
                  "dropout": trial.suggest_float("dropout", 0.0, 0.5)}
        asked.append(config)
        return tuple(problem.evaluate(config, 0).values)

    return objective


OPTUNA_SAMPLERS = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, n_startup_trials=4, multivariate=True,
                                                   constant_liar=True),
    "gp": lambda seed: optuna.samplers.GPSampler(seed=seed, n_startup_trials=4),
    "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed, population_size=4),
    "nsga3": lambda seed: optuna.samplers.NSGAIIISampler(seed=seed, population_size=4),
}
OPTUNA_OPTIONS = {"tpe": {"n_startup_trials": 4}, "gp": {"n_startup_trials": 4}, "nsga2": {"population_size": 4},
                  "nsga3": {"population_size": 4}}


@pytest.mark.parametrize("name", sorted(OPTUNA_SAMPLERS))
def test_a_fresh_run_asks_what_optunas_sampler_with_its_seed_asks(name, tmp_path):
    """A fresh qd run (``qd.run.run``, its record in a store) with seed s evaluates exactly the
    configurations Optuna's own sampler with seed s proposes in ``study.optimize`` on the same
    space, past the start-up trials into the model-based ones: qd never re-seeds a fresh run."""
    from problems.mixed import Mixed

    problem, seed = Mixed(), 11
    k = 5 if name == "gp" else 7  # start-up trials, then model-based ones (an Optuna GP ask here takes seconds)
    info = RunInfo(name="fresh", problem="mixed", problem_options={}, strategy=name,
                   strategy_options=OPTUNA_OPTIONS[name], seed=seed)
    store = Store.create(f"sqlite:///{tmp_path}/fresh.db", info, problem)
    run_for(problem, get_strategy(name, problem, seed=seed, **OPTUNA_OPTIONS[name]), store, k, columnar=False)
    ours = [t.params for t in store.trials()]

    theirs: list = []
    study = optuna.create_study(directions=problem.directions, sampler=OPTUNA_SAMPLERS[name](seed))
    study.optimize(_mixed_objective(problem, theirs), n_trials=k)
    assert ours == theirs


@pytest.mark.parametrize("name", sorted(OPTUNA_SAMPLERS))
def test_a_resumed_run_draws_a_new_stream(name, tmp_path):
    """Restoring a history re-seeds the sampler from (seed, history length): its next asks are not
    the fresh run's first ones (the same stream would re-propose them), and repeat across resumes."""
    from problems.mixed import Mixed

    problem, seed = Mixed(), 11
    fresh = get_strategy(name, problem, seed=seed, **OPTUNA_OPTIONS[name])
    first = fresh.ask(3)
    history = [evaluate(problem, c, i) for i, c in enumerate(first)]
    resumed = []
    for _ in range(2):
        strategy = get_strategy(name, problem, seed=seed, **OPTUNA_OPTIONS[name])
        strategy.restore(history)
        resumed.append(strategy.ask(3))
    assert resumed[0] == resumed[1]
    assert not {config_id(c) for c in resumed[0]} & {config_id(c) for c in first}


# --- refusals: a problem kind an option does not take is refused before any work ----------------------
@pytest.mark.parametrize("acquisition, objectives", [("nehvi", "one"), ("parego", "one"), ("nei", "several")])
def test_an_acquisition_for_the_other_kind_of_problem_is_refused(acquisition, objectives):
    """Every built-in strategy takes one objective and several; BoTorch's acquisitions each take one
    kind, and building one for the other kind fails naming the option and what is allowed."""
    takes = "several" if objectives == "one" else "one"
    check_refuses(StrategyCase("botorch", {"acquisition": acquisition}, objectives=takes),
                  contract_problem("mixed", objectives))
