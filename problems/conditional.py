"""Conditional: a synthetic fine-tuning benchmark whose parameters depend on the chosen method.

Parameters (``active_if`` in brackets):

- ``method``: lora, prefix or full.
- ``rank`` (int 1..64, log) [method = lora], ``lora_targets`` (attention, all) [method = lora],
  ``mlp_rank_ratio`` (0.5, 1.0, 2.0) [lora_targets = all: a condition under a condition],
  ``lora_dropout`` (float 0..0.3) [method = lora].
- ``n_prefix`` (int 1..64, log) [method = prefix].
- ``freeze_embeddings`` (bool) [method = full].
- ``lr`` (float 1e-5..1e-2, log), always active; its best value depends on the method.

Objectives, both minimised:

- ``loss``:
  lora ``0.31 + 0.12 exp(-r / 16) + 0.3 (lora_dropout - 0.1)^2 + 0.04 (log10 lr + 3.5)^2`` with the
  effective rank ``r = rank`` (attention) or ``rank (1 + mlp_rank_ratio)`` (all);
  prefix ``0.38 + 0.12 exp(-n_prefix / 8) + 0.04 (log10 lr + 2.5)^2``;
  full ``0.30 + 0.02 freeze_embeddings + 0.04 (log10 lr + 4.5)^2``.
- ``log10_trainable``: log10 of the trainable fraction of the model's weights:
  lora ``rank * 1e-4`` (attention) or ``rank * (1e-4 + 2e-4 mlp_rank_ratio)`` (all);
  prefix ``n_prefix * 2e-5``; full 1, or 0.75 with frozen embeddings.

Known answers: the lowest loss is 0.30 (full, embeddings trained, lr = 10^-4.5). The continuous
optima are closed-form (lora_dropout 0.1; lr 10^-3.5, 10^-2.5, 10^-4.5 by method), so the exact
Pareto front comes from enumerating the discrete parameters (``pareto_front()``, 158 points):
prefix tuning and low-rank LoRA interleave at the smallest footprints, LoRA on attention then on
all layers (past rank 64 on attention) follow, and full fine-tuning is the top; frozen
embeddings are always dominated. Reference point (1.0, 0.5) bounds every value (loss < 0.75,
log10_trainable <= 0); the front's hypervolume, the most a run can reach, is 3.36344
(``max_hypervolume``).

Measures: ``log10_trainable`` (as the objective) in [log10(2e-5), 0] and ``log10_lr`` in [-5, -2]:
a map of the best loss by model footprint and learning rate.
"""

from __future__ import annotations

import moocore
import numpy as np

from qd.problem import BatchEvaluation, Evaluation, Measure, Objective, Problem
from qd.space import Bool, Categorical, Config, Float, Int, Space

METHODS = ("lora", "prefix", "full")
LORA, PREFIX, FULL = range(3)
MLP_RANK_RATIOS = (0.5, 1.0, 2.0)
MAX_RANK = 64
MAX_PREFIX = 64
LR_LOW, LR_HIGH = 1e-5, 1e-2
BEST_LOG10_LR = np.array([-3.5, -2.5, -4.5])  # by method index
BEST_LORA_DROPOUT = 0.1
PREFIX_FRACTION_PER_TOKEN = 2e-5
MIN_LOG10_TRAINABLE = float(np.log10(PREFIX_FRACTION_PER_TOKEN))


def conditional_objectives(
    method: np.ndarray,
    rank: np.ndarray,
    mlp_rank_ratio: np.ndarray,
    lora_dropout: np.ndarray,
    n_prefix: np.ndarray,
    freeze_embeddings: np.ndarray,
    lr: np.ndarray,
) -> np.ndarray:
    """Columns of shape (n,) -> (n, 2): (loss, log10_trainable).

    ``method`` indexes METHODS; ``mlp_rank_ratio`` is 0 for LoRA on attention only. Entries of
    parameters inactive for a row's method are ignored (any finite value will do).
    """
    method = np.asarray(method, dtype=int)
    rank, mlp_rank_ratio = np.asarray(rank, dtype=float), np.asarray(mlp_rank_ratio, dtype=float)
    n_prefix, freeze = np.asarray(n_prefix, dtype=float), np.asarray(freeze_embeddings, dtype=bool)
    lr_term = 0.04 * (np.log10(lr) - BEST_LOG10_LR[method]) ** 2
    effective_rank = rank * (1.0 + mlp_rank_ratio)
    lora_dropout = np.asarray(lora_dropout, dtype=float)
    lora_loss = 0.31 + 0.12 * np.exp(-effective_rank / 16.0) + 0.3 * (lora_dropout - BEST_LORA_DROPOUT) ** 2
    prefix_loss = 0.38 + 0.12 * np.exp(-n_prefix / 8.0)
    full_loss = 0.30 + 0.02 * freeze
    loss = np.choose(method, [lora_loss, prefix_loss, full_loss]) + lr_term
    lora_fraction = rank * np.where(mlp_rank_ratio > 0, 1e-4 + 2e-4 * mlp_rank_ratio, 1e-4)
    fraction = np.choose(method, [lora_fraction, PREFIX_FRACTION_PER_TOKEN * n_prefix, np.where(freeze, 0.75, 1.0)])
    return np.stack([loss, np.log10(fraction)], axis=1)


class Conditional(Problem):
    """Conditional fine-tuning benchmark (lora/prefix/full): minimise (loss, log10 trainable); exact front known."""

    reference_point = (1.0, 0.5)
    vectorized = True

    def __init__(self) -> None:
        self.space = Space(
            [
                Categorical("method", METHODS),
                Int("rank", 1, MAX_RANK, log=True, active_if={"method": ["lora"]}),
                Categorical("lora_targets", ("attention", "all"), active_if={"method": ["lora"]}),
                Categorical("mlp_rank_ratio", MLP_RANK_RATIOS, active_if={"lora_targets": ["all"]}),
                Float("lora_dropout", 0.0, 0.3, active_if={"method": ["lora"]}),
                Int("n_prefix", 1, MAX_PREFIX, log=True, active_if={"method": ["prefix"]}),
                Bool("freeze_embeddings", active_if={"method": ["full"]}),
                Float("lr", LR_LOW, LR_HIGH, log=True),
            ]
        )
        self.objectives = (Objective("loss"), Objective("log10_trainable"))
        self.measures = (
            Measure("log10_trainable", MIN_LOG10_TRAINABLE, 0.0),
            Measure("log10_lr", float(np.log10(LR_LOW)), float(np.log10(LR_HIGH))),
        )

    @property
    def max_hypervolume(self) -> float:
        """Hypervolume of the exact front: the most any run can reach (log10_trainable takes discrete values only)."""
        return float(moocore.hypervolume(self.pareto_front()[1], ref=self.reference_point))

    def evaluate(self, config: Config, seed: int) -> Evaluation:
        # Inactive parameters are absent from the config; their placeholders are never used.
        """The objectives and measures of the configuration's method; ``seed`` is unused."""
        values = conditional_objectives(
            np.array([METHODS.index(config["method"])]),
            np.array([config.get("rank", 1)]),
            np.array([config.get("mlp_rank_ratio", 0.0)]),
            np.array([config.get("lora_dropout", BEST_LORA_DROPOUT)]),
            np.array([config.get("n_prefix", 1)]),
            np.array([config.get("freeze_embeddings", False)]),
            np.array([config["lr"]]),
        )[0]
        return Evaluation(values=values.tolist(), measures=[float(values[1]), float(np.log10(config["lr"]))])

    def evaluate_batch(self, X: np.ndarray, seeds: np.ndarray) -> BatchEvaluation:
        """X (n, 8) raw columns in space order, NaN where inactive -> values (n, 2), measures (n, 2);
        seeds unused. Inactive entries take ``evaluate``'s placeholders."""
        X = np.asarray(X, dtype=float)
        method, rank, _, ratio_index, lora_dropout, n_prefix, freeze, lr = X.T
        # NaN ratio: LoRA on attention only (or another method), ratio 0 as in ``evaluate``.
        ratios = np.asarray(MLP_RANK_RATIOS)[np.nan_to_num(ratio_index).astype(int)]
        ratio = np.where(np.isnan(ratio_index), 0.0, ratios)
        values = conditional_objectives(
            method.astype(int),
            np.where(np.isnan(rank), 1.0, rank),
            ratio,
            np.where(np.isnan(lora_dropout), BEST_LORA_DROPOUT, lora_dropout),
            np.where(np.isnan(n_prefix), 1.0, n_prefix),
            np.nan_to_num(freeze).astype(bool),
            lr,
        )
        return BatchEvaluation(values=values, measures=np.stack([values[:, 1], np.log10(lr)], axis=1))

    def pareto_front(self) -> tuple[list[Config], np.ndarray]:
        """The exact Pareto front: its configurations and their values, shape (k, 2), sorted by size."""
        configs: list[Config] = []
        for rank in range(1, MAX_RANK + 1):
            configs.append({"method": "lora", "rank": rank, "lora_targets": "attention"})
            configs += [
                {"method": "lora", "rank": rank, "lora_targets": "all", "mlp_rank_ratio": ratio}
                for ratio in MLP_RANK_RATIOS
            ]
        for config in configs:
            config["lora_dropout"] = BEST_LORA_DROPOUT
        configs += [{"method": "prefix", "n_prefix": n} for n in range(1, MAX_PREFIX + 1)]
        configs += [{"method": "full", "freeze_embeddings": freeze} for freeze in (False, True)]
        for config in configs:
            config["lr"] = float(10.0 ** BEST_LOG10_LR[METHODS.index(config["method"])])
        values = np.array([self.evaluate(config, 0).values for config in configs])
        keep = np.flatnonzero(moocore.is_nondominated(values))
        keep = keep[np.argsort(values[keep, 1], kind="stable")]
        return [configs[i] for i in keep], values[keep]
