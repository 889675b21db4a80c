"""Interactive archive maps (plotly) and the per-trial cell facts they are built from.

``archive_heatmap`` draws a run's archive as a native plotly figure, for the dashboard and
notebooks: a heatmap over one or two measures of a grid archive (more measures: the best cell over
the other measures, projected on the first two), a scatter of centroids for a CVT archive, and for
a Pareto (MOME) archive the hypervolume of each cell's front. Hovering a cell shows its bin ranges
(integer and categorical measures: their value), its value and the trial number(s) of its elite(s);
with ``trial_url`` each filled cell carries a link to its trial.

``measure_bins`` and ``is_elite`` say, per trial, which bin of each measure it fell in and
whether it holds a cell: what a trial records next to its opaque archive cell number.

Everything here is a pure function of an archive (``qd.archive.EliteArchive``/``ParetoArchive``,
or a pyribs ``GridArchive``/``CVTArchive``) and, where trial numbers are wanted, the trials it
was built from. Nothing is written anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from qd.store import Trial

if TYPE_CHECKING:
    import plotly.graph_objects as go

#: Above this many filled cells, cells carry no text labels (links): they would be unreadable.
MAX_LABELLED_CELLS = 150


# --- the archive as cells --------------------------------------------------------------------------
@dataclass
class Cells:
    """An archive's filled cells, in objective units.

    ``index`` (c,) pyribs cell indices; ``value`` (c,) the colour value (an elite's objective, or a
    Pareto cell's front hypervolume); ``numbers`` the trial numbers of each cell's elite(s) (empty
    lists when unknown); ``grid`` (c, k) the bin of each measure (None for a CVT archive);
    ``centres`` (c, k) the cell's point in measure space (bin centres, or CVT centroids).
    """

    index: np.ndarray
    value: np.ndarray
    numbers: list[list[int]]
    grid: np.ndarray | None
    centres: np.ndarray
    edges: list[np.ndarray] | None  # grid: (bins + 1,) boundaries per measure
    names: list[str]
    labels: list[tuple[str, ...] | None]  # categorical measures: the label of each value
    integer: list[bool]
    value_label: str
    better_is_low: bool


def _pyribs(archive: Any) -> Any:
    """The pyribs archive that holds the cells: a run archive's ``layout``, or a pyribs archive."""
    return getattr(archive, "layout", archive)


def measure_bins(archive: Any, measures: np.ndarray) -> np.ndarray | None:
    """(n, k) measures -> (n, k) bin index per measure (grid archives; None for CVT archives).

    Measures outside the bounds go to the edge bins, as the archive itself places them.
    """
    grid = _pyribs(archive)
    if not hasattr(grid, "int_to_grid_index"):
        return None
    measures = np.atleast_2d(np.asarray(measures, dtype=float))
    if len(measures) == 0:
        return np.empty((0, len(grid.dims)), dtype=int)
    return np.asarray(grid.int_to_grid_index(grid.index_of(measures)), dtype=int)


def elite_numbers(archive: Any, trials: Sequence[Trial]) -> dict[int, list[int]]:
    """Trial numbers holding each cell (see ``qd.explore.elite_numbers``)."""
    from qd.explore import elite_numbers as numbers

    return numbers(archive, trials)


def is_elite(archive: Any, trials: Sequence[Trial]) -> np.ndarray:
    """(n,) whether each of ``trials`` holds (or shares, for a Pareto cell's front) an archive cell."""
    held = {n for ns in elite_numbers(archive, trials).values() for n in ns}
    return np.array([t.number in held for t in trials], dtype=bool)


def trial_cells(archive: Any, trials: Sequence[Trial], measure_names: Sequence[str]) -> dict[int, dict[str, Any]]:
    """Per trial with measures: ``{"bins": {measure: bin}, "is_elite": bool}`` (CVT: no ``bins``).

    What a trial's user attributes can carry so a reader sees where it landed without decoding an
    integer cell number.
    """
    with_measures = [t for t in trials if t.measures]
    if not with_measures:
        return {}
    bins = measure_bins(archive, np.array([t.measures for t in with_measures]))
    elite = is_elite(archive, with_measures)
    out: dict[int, dict[str, Any]] = {}
    for i, t in enumerate(with_measures):
        row: dict[str, Any] = {"is_elite": bool(elite[i])}
        if bins is not None:
            row["bins"] = {n: int(b) for n, b in zip(measure_names, bins[i])}
        out[t.number] = row
    return out


def cells(archive: Any, *, trials: Sequence[Trial] | None = None, measure_names: Sequence[str] | None = None,
          measures: Sequence[Any] | None = None) -> Cells:
    """The filled cells of ``archive`` (qd or pyribs), with trial numbers when ``trials`` are given.

    ``measures``: the problem's ``Measure`` objects (names, integer and categorical labels); taken
    from a qd archive's problem when not given. ``measure_names`` names the measures of a bare
    pyribs archive.
    """

    problem = getattr(archive, "problem", None)
    if measures is None and problem is not None:
        measures = problem.measures
    grid = _pyribs(archive)
    k = int(grid.measure_dim)
    names = list(measure_names or ([m.name for m in measures] if measures else [f"measure_{i}" for i in range(k)]))
    labels = [getattr(m, "labels", None) for m in measures] if measures else [None] * k
    integer = [bool(getattr(m, "integer", False)) for m in measures] if measures else [False] * k
    numbers_by_cell = elite_numbers(archive, trials) if trials is not None and problem is not None else {}
    if getattr(archive, "kind", None) == "pareto":
        hv = archive.cell_hypervolumes()
        index = np.array(sorted(hv), dtype=int)
        value = np.array([hv[c] for c in index], dtype=float)
        ref = tuple(round(r, 4) for r in archive.spec.reference_point)
        value_label, low = f"hypervolume of the cell's front (reference {ref})", False
        numbers_by_cell = {int(c): list(f.numbers) for c, f in archive.fronts.items()}
    else:
        data = grid.data()
        index = np.asarray(data["index"], dtype=int)
        spec = getattr(archive, "spec", None)
        sign = spec.score_factor if spec is not None else 1.0
        value = sign * np.asarray(data["objective"], dtype=float)
        value_label = f"{spec.objective} ({spec.direction[:3]})" if spec is not None else "objective"
        low = spec is not None and spec.direction == "minimize"
    order = np.argsort(index)
    index, value = index[order], value[order]
    if hasattr(grid, "int_to_grid_index"):
        coords = np.asarray(grid.int_to_grid_index(index), dtype=int) if len(index) else np.empty((0, k), dtype=int)
        edges = [np.asarray(b, dtype=float) for b in grid.boundaries]
        centres = np.array([[(edges[j][c[j]] + edges[j][c[j] + 1]) / 2 for j in range(k)] for c in coords]) \
            if len(coords) else np.empty((0, k))
    else:
        coords, edges = None, None
        centres = np.asarray(grid.centroids, dtype=float)[index] if len(index) else np.empty((0, k))
    return Cells(index=index, value=value, numbers=[numbers_by_cell.get(int(c), []) for c in index], grid=coords,
                 centres=centres, edges=edges, names=names, labels=labels, integer=integer, value_label=value_label,
                 better_is_low=low)


# --- the figure -----------------------------------------------------------------------------------
def _bin_text(c: Cells, j: int, b: int) -> str:
    """How bin ``b`` of measure ``j`` reads: its label, its whole value, or its range."""
    assert c.edges is not None
    lo, hi = c.edges[j][b], c.edges[j][b + 1]
    if c.integer[j]:
        v = int(round((lo + hi) / 2))
        labels = c.labels[j]
        return labels[v] if labels and 0 <= v < len(labels) else str(v)
    return f"[{lo:.4g}, {hi:.4g})"


def _axis(c: Cells, j: int) -> dict[str, Any]:
    """Axis settings: categorical labels or integer ticks for whole-valued measures."""
    out: dict[str, Any] = {"title": {"text": c.names[j]}}
    if c.edges is not None:
        out["range"] = [float(c.edges[j][0]), float(c.edges[j][-1])]
    if c.integer[j] and c.edges is not None:
        centres = (c.edges[j][:-1] + c.edges[j][1:]) / 2
        values = [int(round(v)) for v in centres]
        labels = c.labels[j]
        step = max(1, len(values) // 20)
        out.update(tickmode="array", tickvals=values[::step],
                   ticktext=[labels[v] if labels and 0 <= v < len(labels) else str(v) for v in values[::step]])
    return out


def _numbers_text(numbers: list[int]) -> str:
    if not numbers:
        return "-"
    shown = ", ".join(f"#{n}" for n in numbers[:6])
    return shown + (f" (+{len(numbers) - 6})" if len(numbers) > 6 else "")


def archive_heatmap(archive: Any, *, trials: Sequence[Trial] | None = None, title: str = "",
                    vmin: float | None = None, vmax: float | None = None,
                    trial_url: Callable[[int], str] | None = None, measure_names: Sequence[str] | None = None,
                    measures: Sequence[Any] | None = None, height: int | None = None) -> go.Figure:
    """The archive as an interactive plotly figure (see the module docstring).

    Args:
        archive: a qd ``EliteArchive``/``ParetoArchive``, or a pyribs ``GridArchive``/``CVTArchive``.
        trials: the trials the archive was built from (gives each cell its trial number).
        title: the figure title.
        vmin, vmax: colour limits in objective units (shared limits make several runs' maps
            comparable, as pyribs' ``vmin``/``vmax``); default: the archive's own range.
        trial_url: trial number -> URL (or None for a trial without a page); filled cells then
            carry a link to their (first) trial.
        measure_names, measures: names / ``Measure`` objects for a bare pyribs archive.
        height: figure height in pixels.

    Returns:
        A ``plotly.graph_objects.Figure``; ``layout.meta`` holds ``{"qd": "archive", "cells": c}``.
    """
    import plotly.graph_objects as go

    return go.Figure(archive_heatmap_spec(archive, trials=trials, title=title, vmin=vmin, vmax=vmax,
                                          trial_url=trial_url, measure_names=measure_names, measures=measures,
                                          height=height))


def archive_heatmap_spec(archive: Any, *, trials: Sequence[Trial] | None = None, title: str = "",
                         vmin: float | None = None, vmax: float | None = None,
                         trial_url: Callable[[int], str] | None = None, measure_names: Sequence[str] | None = None,
                         measures: Sequence[Any] | None = None, height: int | None = None) -> dict[str, Any]:
    """``archive_heatmap``'s figure as plotly's JSON structure (``{"data": [...], "layout": {...}}``),
    built without plotly: what the dashboard stores (a run process need not import plotly).
    Arguments as ``archive_heatmap``."""
    c = cells(archive, trials=trials, measure_names=measure_names, measures=measures)
    k = len(c.names)
    colorscale, reverse = "Magma", c.better_is_low  # bright = better
    colorbar = {"title": {"text": c.value_label, "side": "right"}, "thickness": 14}
    hover_numbers = [_numbers_text(n) for n in c.numbers]
    layout: dict[str, Any] = {}
    if c.grid is not None and c.edges is not None:
        x_edges = c.edges[0]
        y_edges = c.edges[1] if k >= 2 else np.array([0.0, 1.0])
        nx, ny = len(x_edges) - 1, len(y_edges) - 1
        z = np.full((ny, nx), np.nan)
        text = np.full((ny, nx), "", dtype=object)
        custom = np.full((ny, nx, 3), "", dtype=object)
        first: dict[tuple[int, int], int] = {}
        better = (lambda a, b: a < b) if c.better_is_low else (lambda a, b: a > b)
        for i in range(len(c.index)):
            bx, by = int(c.grid[i, 0]), int(c.grid[i, 1]) if k >= 2 else 0
            if not np.isnan(z[by, bx]) and not better(c.value[i], z[by, bx]):
                continue  # more than two measures: keep the best cell over the others
            z[by, bx] = c.value[i]
            first[(by, bx)] = i
            custom[by, bx] = [_bin_text(c, 0, bx), _bin_text(c, 1, by) if k >= 2 else "", hover_numbers[i]]
        if trial_url is not None and len(first) <= MAX_LABELLED_CELLS:
            for (by, bx), i in first.items():
                if c.numbers[i]:
                    n = c.numbers[i][0]
                    url = trial_url(n)  # None: the trial has no page (not copied to the dashboard's study)
                    text[by, bx] = f"<a href=\"{url}\" target=\"_top\">#{n}</a>" if url else f"#{n}"
        lines = [f"{c.names[0]}: %{{customdata[0]}}"] + ([f"{c.names[1]}: %{{customdata[1]}}"] if k >= 2 else [])
        lines += [f"{c.value_label.split(' (reference')[0]}: %{{z:.5g}}", "trial %{customdata[2]}"]
        if k > 2:
            lines.append(f"(best over {', '.join(c.names[2:])})")
        trace = {"type": "heatmap", "x": ((x_edges[:-1] + x_edges[1:]) / 2).tolist(),
                 "y": ((y_edges[:-1] + y_edges[1:]) / 2).tolist(),
                 "z": [[None if v != v else v for v in row] for row in z.tolist()], "customdata": custom.tolist(),
                 "text": text.tolist(), "texttemplate": "%{text}", "textfont": {"size": 9},
                 "hovertemplate": "<br>".join(lines) + "<extra></extra>", "colorscale": colorscale,
                 "reversescale": reverse, "zmin": vmin, "zmax": vmax, "colorbar": colorbar, "hoverongaps": False,
                 "xgap": 1, "ygap": 1 if k >= 2 else 0}
        layout.update(xaxis=_axis(c, 0), yaxis=_axis(c, 1) if k >= 2 else {"visible": False},
                      plot_bgcolor="#f4f4f4")
    else:  # CVT: each filled centroid as a marker
        lines = [f"{n}: %{{customdata[{j}]:.4g}}" for j, n in enumerate(c.names[:2])]
        lines += [f"{c.value_label}: %{{marker.color:.5g}}", "cell %{customdata[2]}, trial %{customdata[3]}"]
        custom = [[*(list(p[:2]) + [0.0] * (2 - min(2, k))), int(ix), hn]
                  for p, ix, hn in zip(c.centres.tolist(), c.index, hover_numbers)]
        trace = {"type": "scatter", "x": c.centres[:, 0].tolist(),
                 "y": (c.centres[:, 1] if k >= 2 else np.zeros(len(c.index))).tolist(),
                 "mode": "markers", "customdata": custom, "hovertemplate": "<br>".join(lines) + "<extra></extra>",
                 "marker": {"color": c.value.tolist(), "colorscale": colorscale, "reversescale": reverse,
                            "cmin": vmin, "cmax": vmax, "size": 9, "colorbar": colorbar, "line": {"width": 0}}}
        layout.update(xaxis={"title": {"text": c.names[0]}},
                      yaxis={"title": {"text": c.names[1] if k >= 2 else ""}, "visible": k >= 2})
    layout.update(title={"text": title or "Archive", "x": 0.02, "font": {"size": 14}},
                  margin={"l": 60, "r": 20, "t": 50, "b": 50}, meta={"qd": "archive", "cells": int(len(c.index))})
    if height is not None:
        layout["height"] = height
    return {"data": [trace], "layout": layout}


def shared_limits(archives: Sequence[Any]) -> tuple[float | None, float | None]:
    """(vmin, vmax) over the filled cells of several archives, for maps drawn on one colour scale."""
    values = [cells(a).value for a in archives]
    values = [v for v in values if len(v)]
    if not values:
        return None, None
    allv = np.concatenate(values)
    return float(allv.min()), float(allv.max())


__all__ = ["Cells", "archive_heatmap", "archive_heatmap_spec", "cells", "is_elite", "measure_bins", "shared_limits", "trial_cells"]
