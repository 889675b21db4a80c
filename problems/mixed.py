"""Mixed: a synthetic "train a network" benchmark over ints, categoricals, a bool and floats.

Parameters: ``layers`` (int 1..8), ``width`` (int 16..512, log), ``activation`` (relu, gelu,
tanh, sigmoid), ``batch_norm`` (bool), ``lr`` (float 1e-5..1e-1, log), ``dropout`` (float 0..0.5).

Objectives, both minimised:

- ``error``: with ``capacity = 2 log2(layers) + 2 log2(width) - 8`` (0..16),

      0.05 + 0.4 exp(-capacity / 4)              under-fitting, falls with size
           + depth_penalty (layers - 1)          0.01, or 0.002 with batch norm: depth is
                                                 hard to train, less so when normalised
           + 0.2 (dropout - 0.025 capacity)^2    bigger nets want more dropout
           + 0.02 (log10 lr - best_log10_lr)^2   best lr depends on the activation, and
                                                 batch norm allows 0.5 decades more
           + ACTIVATION_ERROR[activation]

- ``cost``: ``log2(layers * width^2 * ACTIVATION_COST[activation] * (1.1 if batch_norm))``,
  scaled to [0, 1] (0 for the smallest relu net, 1 for the largest gelu net with batch norm).

Known answers: the continuous optima are interior and closed-form (``dropout = 0.025 capacity``,
``lr = 10^best_log10_lr``), so the exact Pareto front comes from enumerating the discrete
parameters (``pareto_front()``, 565 points). The lowest error is 0.05 + 0.4 e^-3.5 + 0.006 =
0.06808 (4 layers of width 512, gelu, batch norm, dropout 0.35, lr 1e-3): depth helps capacity
twice as much as width but costs a training penalty. tanh and sigmoid are always dominated by
relu; gelu costs more than relu but errs less, so both appear on the front, with depths 1 to 8.
Reference point (1.1, 1.1) bounds every value (error < 0.9, cost <= 1); the front's hypervolume,
the most a run can reach, is 1.05806 (``max_hypervolume``).

Measures: ``layers`` in [1, 8] and ``log2_width`` in [4, 9], a depth-by-width map.
"""

from __future__ import annotations

import math

import moocore
import numpy as np

from qd.problem import BatchEvaluation, Evaluation, Measure, Objective, Problem
from qd.space import Bool, Categorical, Config, Float, Int, Space

ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid")
ACTIVATION_BEST_LOG10_LR = np.array([-3.0, -3.5, -2.5, -2.0])
ACTIVATION_ERROR = np.array([0.02, 0.0, 0.04, 0.08])
ACTIVATION_COST = np.array([1.0, 1.25, 1.1, 1.1])
BATCH_NORM_LR_SHIFT = 0.5
DEPTH_PENALTY, DEPTH_PENALTY_BATCH_NORM = 0.01, 0.002
BATCH_NORM_COST = 1.1
MIN_LAYERS, MAX_LAYERS = 1, 8
MIN_WIDTH, MAX_WIDTH = 16, 512
MIN_LOG2_COST = math.log2(MIN_LAYERS * MIN_WIDTH**2)
MAX_LOG2_COST = math.log2(MAX_LAYERS * MAX_WIDTH**2 * ACTIVATION_COST.max() * BATCH_NORM_COST)


def capacity(layers: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Shapes (n,) -> (n,) in [0, 16]."""
    return 2.0 * np.log2(layers) + 2.0 * np.log2(width) - 8.0


def best_dropout(layers: np.ndarray, width: np.ndarray) -> np.ndarray:
    """(n,) layers and widths -> (n,) the dropout with the lowest error."""
    return 0.025 * capacity(layers, width)


def best_log10_lr(activation: np.ndarray, batch_norm: np.ndarray) -> np.ndarray:
    """(n,) activation indices and batch-norm flags -> (n,) the log10 learning rate with the lowest
    error."""
    return ACTIVATION_BEST_LOG10_LR[activation] + BATCH_NORM_LR_SHIFT * batch_norm


def mixed_objectives(
    layers: np.ndarray,
    width: np.ndarray,
    activation: np.ndarray,
    batch_norm: np.ndarray,
    lr: np.ndarray,
    dropout: np.ndarray,
) -> np.ndarray:
    """Columns of shape (n,) (``activation`` as an index into ACTIVATIONS) -> (n, 2): (error, cost)."""
    layers, width = np.asarray(layers, dtype=float), np.asarray(width, dtype=float)
    activation, batch_norm = np.asarray(activation, dtype=int), np.asarray(batch_norm, dtype=bool)
    cap = capacity(layers, width)
    error = (
        0.05
        + 0.4 * np.exp(-cap / 4.0)
        + np.where(batch_norm, DEPTH_PENALTY_BATCH_NORM, DEPTH_PENALTY) * (layers - 1.0)
        + 0.2 * (np.asarray(dropout, dtype=float) - 0.025 * cap) ** 2
        + 0.02 * (np.log10(lr) - best_log10_lr(activation, batch_norm)) ** 2
        + ACTIVATION_ERROR[activation]
    )
    log2_cost = np.log2(layers * width**2 * ACTIVATION_COST[activation] * np.where(batch_norm, BATCH_NORM_COST, 1.0))
    cost = (log2_cost - MIN_LOG2_COST) / (MAX_LOG2_COST - MIN_LOG2_COST)
    return np.stack([error, cost], axis=1)


class Mixed(Problem):
    """Mixed int/categorical/float network benchmark: minimise (error, cost); exact Pareto front known."""

    reference_point = (1.1, 1.1)
    vectorized = True

    def __init__(self) -> None:
        self.space = Space(
            [
                Int("layers", MIN_LAYERS, MAX_LAYERS),
                Int("width", MIN_WIDTH, MAX_WIDTH, log=True),
                Categorical("activation", ACTIVATIONS),
                Bool("batch_norm"),
                Float("lr", 1e-5, 1e-1, log=True),
                Float("dropout", 0.0, 0.5),
            ]
        )
        self.objectives = (Objective("error"), Objective("cost"))
        self.measures = (
            Measure("layers", MIN_LAYERS, MAX_LAYERS, integer=True),
            Measure("log2_width", math.log2(MIN_WIDTH), math.log2(MAX_WIDTH)),
        )

    @property
    def max_hypervolume(self) -> float:
        """Hypervolume of the exact front: the most any run can reach (cost takes discrete values only)."""
        return float(moocore.hypervolume(self.pareto_front()[1], ref=self.reference_point))

    def evaluate(self, config: Config, seed: int) -> Evaluation:
        """The exact objectives and measures of the configuration; ``seed`` is unused."""
        values = mixed_objectives(
            np.array([config["layers"]]),
            np.array([config["width"]]),
            np.array([ACTIVATIONS.index(config["activation"])]),
            np.array([config["batch_norm"]]),
            np.array([config["lr"]]),
            np.array([config["dropout"]]),
        )[0]
        return Evaluation(values=values.tolist(), measures=[float(config["layers"]), math.log2(config["width"])])

    def evaluate_batch(self, X: np.ndarray, seeds: np.ndarray) -> BatchEvaluation:
        """X (n, 6) raw columns in space order (activation and batch_norm as choice indices)
        -> values (n, 2), measures (n, 2); seeds unused."""
        X = np.asarray(X, dtype=float)
        layers, width, activation, batch_norm, lr, dropout = X.T
        values = mixed_objectives(layers, width, activation.astype(int), batch_norm.astype(bool), lr, dropout)
        return BatchEvaluation(values=values, measures=np.stack([layers, np.log2(width)], axis=1))

    def pareto_front(self) -> tuple[list[Config], np.ndarray]:
        """The exact Pareto front: its configurations and their values, shape (k, 2), sorted by cost."""
        grid = np.array(
            np.meshgrid(
                np.arange(MIN_LAYERS, MAX_LAYERS + 1),
                np.arange(MIN_WIDTH, MAX_WIDTH + 1),
                np.arange(len(ACTIVATIONS)),
                [False, True],
                indexing="ij",
            )
        ).reshape(4, -1)
        layers, width, activation, batch_norm = grid[0], grid[1], grid[2], grid[3].astype(bool)
        lr = 10.0 ** best_log10_lr(activation, batch_norm)
        dropout = best_dropout(layers, width)
        values = mixed_objectives(layers, width, activation, batch_norm, lr, dropout)
        keep = np.flatnonzero(moocore.is_nondominated(values))
        keep = keep[np.argsort(values[keep, 1], kind="stable")]
        configs = [
            {
                "layers": int(layers[i]),
                "width": int(width[i]),
                "activation": ACTIVATIONS[activation[i]],
                "batch_norm": bool(batch_norm[i]),
                "lr": float(lr[i]),
                "dropout": float(dropout[i]),
            }
            for i in keep
        ]
        return configs, values[keep]
