"""qd: quality-diversity and multi-objective search over ML configuration spaces.

The objects, each with one job: ``Space`` (what can be configured), ``Problem`` (what an
evaluation measures), ``Strategy`` (where to look next: ask/tell), ``Evaluator`` (where
evaluations run), ``Store`` (the record of every evaluation, mirrored into an Optuna study).
``qd.optimize(problem, strategy, budget=...)`` runs them together and returns the run.
"""

import warnings

from tqdm import TqdmWarning

# Optuna imports tqdm.auto, which in a notebook without ipywidgets warns "IProgress not found"
# before qd has done anything; qd draws no notebook widget (its progress there is a plain line).
warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)

from optuna.exceptions import ExperimentalWarning  # noqa: E402 (after the filter above)

from qd.checks import OptionError, QdError  # noqa: E402
from qd.optimize import optimize  # noqa: E402
from qd.problem import Evaluation, Measure, Objective, Problem, Resources  # noqa: E402
from qd.space import Bool, Categorical, Float, Int, Space, SpaceError  # noqa: E402

# set_metric_names and friends are marked experimental in Optuna; the warning is noise to users.
warnings.filterwarnings("ignore", category=ExperimentalWarning)

__all__ = ["Space", "Float", "Int", "Categorical", "Bool", "SpaceError", "Problem", "Objective", "Measure",
           "Resources", "Evaluation", "optimize", "QdError", "OptionError"]
