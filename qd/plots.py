"""Plots a person looks at: Pareto fronts and hypervolume history for several objectives, the best
value so far for one (PNG, matplotlib; the pyplot backend stays the user's)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt  # without a display matplotlib falls back to Agg by itself
import numpy as np

from qd.problem import Problem
from qd.results import Reference, best_so_far, hypervolume_history, pareto_trials, reference_point
from qd.scaling import Scaling
from qd.store import Store, Trial


def pareto_figure(trials: Sequence[Trial], names: Sequence[str], directions: Sequence[str], title: str = "",
                  scaling: Scaling | None = None) -> plt.Figure:
    """2 objectives: scatter with the front as a step line; 3: 3-D and pairwise views; more: parallel
    coordinates. Objectives measured on a log scale (``qd.scaling``) get log axes; parallel
    coordinates are drawn in scaled units."""
    scaling = scaling if scaling is not None else Scaling.identity(len(names))
    done = [t for t in trials if t.state == "complete"]
    front = pareto_trials(done, directions)
    Y = np.array([t.values for t in done]) if done else np.empty((0, len(names)))
    F = np.array([t.values for t in front]) if front else np.empty((0, len(names)))
    m = len(names)
    if m == 2:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.scatter(Y[:, 0], Y[:, 1], s=12, c="lightgray", label="evaluated")
        if len(F):
            order = np.argsort(F[:, 0])
            ax.step(F[order, 0], F[order, 1], where="post" if directions[0] == directions[1] else "pre",
                    color="C0", lw=1)
            ax.scatter(F[:, 0], F[:, 1], s=24, c="C0", label=f"Pareto set ({len(F)})")
        ax.set_xlabel(f"{names[0]} ({directions[0][:3]})")
        ax.set_ylabel(f"{names[1]} ({directions[1][:3]})")
        _log_axes(ax, scaling, Y, (0, 1))
        ax.legend()
    elif m == 3:
        # A 3-D view for the shape, and the three pairwise projections to read values from.
        fig = plt.figure(figsize=(18, 4.5))
        ax = fig.add_subplot(1, 4, 1, projection="3d")
        ax.scatter(*Y.T, s=8, c="lightgray", label="evaluated")
        if len(F):
            ax.scatter(*F.T, s=20, c="C0", label=f"Pareto set ({len(F)})")
        ax.set_xlabel(names[0]), ax.set_ylabel(names[1]), ax.set_zlabel(names[2])
        ax.legend(fontsize=8)
        for k, (i, j) in enumerate(((0, 1), (0, 2), (1, 2)), start=2):
            ax = fig.add_subplot(1, 4, k)
            ax.scatter(Y[:, i], Y[:, j], s=10, c="lightgray")
            if len(F):
                ax.scatter(F[:, i], F[:, j], s=22, c="C0")
            _log_axes(ax, scaling, Y, (i, j))
            ax.set_xlabel(f"{names[i]} ({directions[i][:3]})")
            ax.set_ylabel(f"{names[j]} ({directions[j][:3]})")
    else:
        fig, ax = plt.subplots(figsize=(1.6 * m + 2, 4.5))
        Y, F = scaling.apply(Y), scaling.apply(F)
        lo, hi = Y.min(axis=0), Y.max(axis=0)
        scale = np.where(hi > lo, hi - lo, 1.0)
        for row in (Y - lo) / scale:
            ax.plot(range(m), row, color="lightgray", lw=0.5)
        for row in (F - lo) / scale:
            ax.plot(range(m), row, color="C0", lw=1.2)
        ax.set_xticks(range(m), [f"{scaling.label(i, n)}\n({d[:3]})" for i, (n, d) in enumerate(zip(names, directions))])
        ax.set_ylabel("normalised value (0 = min seen, 1 = max seen)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _log_axes(ax: plt.Axes, scaling: Scaling, Y: np.ndarray, columns: tuple[int, int]) -> None:
    """Log axes for the objectives measured on a log scale (symlog when a value is 0 or less)."""
    for set_scale, col in zip((ax.set_xscale, ax.set_yscale), columns):
        if scaling.scales[col] == "log":
            positive = len(Y) == 0 or Y[:, col].min() > 0
            set_scale("log") if positive else set_scale("symlog", linthresh=1.0)


def hypervolume_figure(counts: np.ndarray, hvs: np.ndarray, reference: Reference | Sequence[float], title: str = "",
                       names: Sequence[str] | None = None) -> plt.Figure:
    """Hypervolume against finished evaluations; the y label states the reference and the units."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(counts, hvs, color="C0")
    ax.set_xlabel("finished evaluations")
    if isinstance(reference, Reference):
        caption = reference.caption(names if names is not None else [f"f{i + 1}" for i in range(len(reference.point))])
    else:
        caption = f"reference {tuple(round(r, 4) for r in reference)}"
    ax.set_ylabel(f"hypervolume\n({caption})", fontsize=8 if len(caption) > 40 else 10)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def best_so_far_figure(trials: Sequence[Trial], name: str, direction: str, title: str = "") -> plt.Figure:
    """One objective: every finished evaluation's value (grey) and the best so far (line)."""
    finished = [t for t in trials if t.finished]
    xs = [i for i, t in enumerate(finished, start=1) if t.feasible]
    ys = [t.values[0] for t in finished if t.feasible]
    counts, best = best_so_far(trials, direction)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(xs, ys, s=8, c="lightgray", label="evaluated")
    ax.plot(counts, best, color="C0", label="best so far")
    ax.set_xlabel("finished evaluations")
    ax.set_ylabel(f"{name} ({direction[:3]})")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_run(store: Store, problem: Problem | None, out: str | Path, *, vmin: float | None = None,
             vmax: float | None = None) -> list[Path]:
    """Write the run's standard figures into ``out``; return their paths.

    Several objectives: ``pareto_front.png`` and ``hypervolume.png``; one: ``best_so_far.png``.
    Problems with measures add the archive map and QD metrics (``qd.plots_archive``); ``vmin`` and
    ``vmax`` fix the map's colour limits (objective units) so maps of several runs compare.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trials = store.trials()
    names, directions = list(store.objective_names), list(store.directions)
    title = f"{store.info.name}: {store.info.problem} / {store.info.strategy}"
    written = []
    if len(directions) == 1:
        if any(t.finished for t in trials):
            written.append(_save(best_so_far_figure(trials, names[0], directions[0], title), out / "best_so_far.png"))
    else:
        scaling = problem.scaling if problem is not None else None
        written.append(_save(pareto_figure(trials, names, directions, title, scaling), out / "pareto_front.png"))
        ref = reference_point(problem, trials, directions)
        if ref is not None:
            counts, hvs = hypervolume_history(trials, directions, ref)
            written.append(_save(hypervolume_figure(counts, hvs, ref, title, names), out / "hypervolume.png"))
    if problem is not None and problem.measures:  # archive heatmap and QD metrics (qd.plots_archive)
        from qd.plots_archive import plot_archive

        written += plot_archive(store, problem, out, trials, title, vmin=vmin, vmax=vmax)
    return written


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
