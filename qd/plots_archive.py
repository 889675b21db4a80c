"""Archive figures (PNG): heatmaps of the map, MOQD heatmap, QD metrics over time.

- Elite archives: pyribs' ``grid_archive_heatmap`` / ``cvt_archive_heatmap`` for 1 or 2 measures,
  ``parallel_axes_plot`` for more; colours are the objective in its own units.
- Pareto archives (MOME): the same pyribs plots of a grid whose cell value is the hypervolume of
  the cell's front.
- Metrics: QD score (or MOQD score) and coverage against finished evaluations, from the run's
  recorded history (``qd.metrics``), replayed from the trials when none was recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt  # the backend is the user's (without a display matplotlib uses Agg)
import numpy as np
from ribs.archives import ArchiveBase, CVTArchive, GridArchive
from ribs.visualize import cvt_archive_heatmap, grid_archive_heatmap, parallel_axes_plot

from qd.archive import EliteArchive, ParetoArchive, RunArchive, archive_for_run
from qd.metrics import history
from qd.problem import Problem
from qd.store import Store, Trial


def _integer_ticks(ax: plt.Axes, measures: Sequence[Any], axis: str, j: int) -> None:
    """Whole-valued measures: a tick per value (at most ~20), labelled by value or category."""
    m = measures[j] if j < len(measures) else None
    if m is None or not getattr(m, "integer", False):
        return
    values = m.values[::max(1, len(m.values) // 20)]
    labels = [m.labels[v] if m.labels and 0 <= v < len(m.labels) else str(v) for v in values]
    (ax.set_xticks if axis == "x" else ax.set_yticks)(values, labels)


def _map_figure(archive: ArchiveBase, df: Any, names: Sequence[str], colour_label: str, title: str,
                better_is_low: bool = False, measures: Sequence[Any] = (), vmin: float | None = None,
                vmax: float | None = None) -> plt.Figure:
    """1-2 measures: heatmap over the measures; more: parallel axes over all of them.
    Bright colours are the better values (the colour map is reversed when lower is better).
    ``vmin``/``vmax``: colour limits (shared by maps of several runs), default the archive's range."""
    k = len(names)
    cmap = "magma_r" if better_is_low else "magma"
    if k <= 2:
        fig, ax = plt.subplots(figsize=(6.5, 5) if k == 2 else (7, 2.6))
        plot = cvt_archive_heatmap if isinstance(archive, CVTArchive) else grid_archive_heatmap
        plot(archive, ax, df=df, cmap=cmap, vmin=vmin, vmax=vmax, cbar_kwargs={"label": colour_label})
        ax.set_xlabel(names[0])
        _integer_ticks(ax, measures, "x", 0)
        if k == 2:
            ax.set_ylabel(names[1])
            _integer_ticks(ax, measures, "y", 1)
        else:
            ax.set_yticks([])
        if title:
            ax.set_title(title, fontsize=10)
        fig.tight_layout()
    else:
        fig, ax = plt.subplots(figsize=(1.6 * k + 3.5, 5))
        fig.subplots_adjust(top=0.8, right=0.85)  # room for the title above the measure names
        parallel_axes_plot(archive, ax, df=df, cmap=cmap, vmin=vmin, vmax=vmax,
                           measure_order=[(i, n) for i, n in enumerate(names)],
                           cbar_kwargs={"label": colour_label, "orientation": "vertical", "pad": 0.1})
        if title:
            fig.suptitle(title, fontsize=10)
    return fig


def elite_heatmap_figure(archive: EliteArchive, problem: Problem, title: str = "", *, vmin: float | None = None,
                         vmax: float | None = None) -> plt.Figure:
    """The best value per cell (objective units); ``vmin``/``vmax`` fix the colour limits."""
    df = archive.result.data(return_type="pandas")
    df["objective"] = archive.spec.score_factor * df["objective"]
    label = f"{archive.spec.objective} ({archive.spec.direction[:3]})"
    m = archive.metrics()
    subtitle = f"coverage {m['coverage']:.1%}, QD score {m['qd_score']:.4g}, {m['num_elites']} elites"
    return _map_figure(archive.result, df, problem.measure_names, label, f"{title}\n{subtitle}" if title else subtitle,
                       better_is_low=archive.spec.direction == "minimize",
                       measures=problem.measures, vmin=vmin, vmax=vmax)


def moqd_heatmap_figure(archive: ParetoArchive, problem: Problem, title: str = "", *, vmin: float | None = None,
                        vmax: float | None = None) -> plt.Figure:
    """Hypervolume of each cell's Pareto front (reference point stated in the colour bar)."""
    hv = archive.cell_hypervolumes()
    grid = GridArchive(solution_dim=1, dims=archive.spec.bins, ranges=[m.map_range for m in problem.measures])
    if hv:
        cells = np.array(sorted(hv))
        coords = grid.int_to_grid_index(cells)
        centres = grid.lower_bounds + (coords + 0.5) * grid.interval_size / np.array(archive.spec.bins)
        grid.add(solution=np.zeros((len(cells), 1)), objective=np.array([hv[c] for c in cells]), measures=centres)
    m = archive.metrics()
    ref = tuple(round(r, 4) for r in archive.spec.reference_point)
    subtitle = (f"coverage {m['coverage']:.1%}, MOQD score {m['moqd_score']:.4g}, "
                f"global hypervolume {m['global_hypervolume']:.4g}")
    return _map_figure(grid, None, problem.measure_names, f"hypervolume of the cell's front (reference {ref})",
                       f"{title}\n{subtitle}" if title else subtitle, measures=problem.measures, vmin=vmin, vmax=vmax)


def metrics_figure(rows: Sequence[dict[str, Any]], pareto: bool, title: str = "") -> plt.Figure:
    """QD score (MOQD score for Pareto archives) and coverage against finished evaluations."""
    x = [r["evaluations"] for r in rows]
    panels = [("moqd_score" if pareto else "qd_score", "MOQD score" if pareto else "QD score"),
              ("coverage", "coverage")]
    if pareto:
        panels.append(("global_hypervolume", "global hypervolume"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, label) in zip(np.atleast_1d(axes), panels):
        ax.plot(x, [r[key] for r in rows], color="C0")
        ax.set_xlabel("finished evaluations")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_archive(store: Store, problem: Problem, out: str | Path, trials: Sequence[Trial] | None = None,
                 title: str = "", *, vmin: float | None = None, vmax: float | None = None) -> list[Path]:
    """Write the archive heatmap and the metrics curves of a run whose problem has measures
    (``vmin``/``vmax``: the map's colour limits, e.g. shared by several runs)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cols = store.columns()
    archive: RunArchive = archive_for_run(store, problem, cols)
    written = []
    if archive.kind == "pareto":
        written.append(_save(moqd_heatmap_figure(archive, problem, title, vmin=vmin, vmax=vmax),
                             out / "moqd_heatmap.png"))
    else:
        written.append(_save(elite_heatmap_figure(archive, problem, title, vmin=vmin, vmax=vmax),
                             out / "archive_heatmap.png"))
    rows = history(store, problem, cols)
    if rows:
        written.append(_save(metrics_figure(rows, archive.kind == "pareto", title), out / "qd_metrics.png"))
    return written


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
