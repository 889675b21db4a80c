"""qd: quality-diversity and multi-objective search over ML configuration spaces.

The objects, each with one job: ``Space`` (what can be configured), ``Problem`` (what an
evaluation measures), ``Strategy`` (where to look next: ask/tell), ``Evaluator`` (where
evaluations run), ``Store`` (the Optuna study that records every evaluation).
"""

import warnings

from optuna.exceptions import ExperimentalWarning

from qd.problem import Evaluation, Measure, Objective, Problem, Resources
from qd.space import Bool, Categorical, Float, Int, Space, SpaceError

# set_metric_names and friends are marked experimental in Optuna; the warning is noise to users.
warnings.filterwarnings("ignore", category=ExperimentalWarning)

__all__ = ["Space", "Float", "Int", "Categorical", "Bool", "SpaceError", "Problem", "Objective", "Measure",
           "Resources", "Evaluation"]
