"""Runs in optuna-dashboard: the archive heatmap, the Pareto front and a summary note, kept current.

Every qd run is an Optuna study, so optuna-dashboard shows its trials as is. This module adds
what the dashboard cannot work out itself, written into the study where the dashboard reads it:

- figures (the format of ``optuna_dashboard.save_plotly_graph_object``, shown on the study's top page):
  ``qd-archive``, the archive as a plotly heatmap (``qd.figures``; problems with measures);
  ``qd-pareto``, the objectives with the Pareto set (several objectives) or the best value so far
  (one objective); ``qd-metrics``, coverage and QD score against evaluations (archives) or the
  hypervolume history (several objectives);
- a study note (as ``optuna_dashboard.save_note`` writes it): problem, strategy, budget, counts and metrics;
- trials: ``qd.mirror`` copies them from the record (every trial of a small run, then the elites
  and the Pareto set), each with its measures, ``cell``, per-measure ``bins`` and ``is_elite``.

Figures draw at most ``MAX_POINTS`` evaluated points (an even sample) besides the Pareto set, so
a study page stays small whatever the size of the run.

``Publisher`` is the run loop's listener that refreshes figures, note and mirror while a run
progresses (every ``every_s`` seconds, and at the end); ``serve`` starts the dashboard
(``qd dashboard``) after bringing finished runs' figures up to date.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from qd.columns import Columns
from qd.checks import is_int
from qd.problem import Problem, sign_of
from qd.results import Reference, hypervolume, pareto_front_mask, reference_point_of_values
from qd.run import Listener, RunState
from qd.store import Store

if TYPE_CHECKING:
    import optuna
    import plotly.graph_objects as go

    from qd.archive import RunArchive

ARCHIVE_ID = "qd-archive"
PARETO_ID = "qd-pareto"
METRICS_ID = "qd-metrics"
FIGURE_IDS = (ARCHIVE_ID, PARETO_ID, METRICS_ID)
#: Study system attribute: finished evaluations when the figures were last published.
PUBLISHED_KEY = "qd:dashboard:published"
BUDGET_KEY = "budget"
#: optuna-dashboard 0.21 shows user-defined figures in cards of this height.
CARD_HEIGHT_PX = 440
DEFAULT_PORT = 8080
#: A live publish may take at most this share of the run's wall time (figures of big runs cost more).
MAX_PUBLISH_SHARE = 0.05
#: Evaluated points drawn besides the Pareto set (an even sample of the run's trials).
MAX_POINTS = 2000


# --- figures ------------------------------------------------------------------------------------
def _names(store: Store) -> tuple[list[str], list[str]]:
    return list(store.objective_names), list(store.directions)


def _sample(index: np.ndarray, n: int = MAX_POINTS) -> np.ndarray:
    """At most ``n`` entries of ``index``, evenly spread."""
    if len(index) <= n:
        return index
    return index[np.linspace(0, len(index) - 1, n).astype(int)]


def _short(values: np.ndarray) -> list[float | None]:
    """Values for a figure's JSON: 6 significant digits (what a hover shows), None for NaN."""
    return [None if v != v else float(f"{v:.6g}") for v in np.asarray(values, dtype=float).tolist()]


def _title(store: Store) -> str:
    return f"{store.info.name}: {store.info.problem} / {store.info.strategy}"


def _figure(spec: dict[str, Any]) -> go.Figure:
    """A figure's plotly JSON structure as a ``plotly.graph_objects.Figure`` (for notebooks)."""
    import plotly.graph_objects as go

    return go.Figure(spec)


def archive_figure(store: Store, problem: Problem, archive: RunArchive, cols: Columns | None = None,
                   elite_rows: np.ndarray | None = None, pages: Mapping[int, int] | None = None) -> go.Figure:
    """The archive as a native plotly heatmap (``qd.figures.archive_heatmap``): hovering a cell
    shows its bin ranges, value and qd's trial number; a filled cell whose trial is in the study
    links to its page there (``pages``: qd number -> dashboard trial number, ``Mirror.pages``).
    ``elite_rows``: the elites' rows of ``cols`` when known (the run loop keeps them)."""
    return _figure(archive_figure_spec(store, problem, archive, cols, elite_rows, pages))


def archive_figure_spec(store: Store, problem: Problem, archive: RunArchive, cols: Columns | None = None,
                        elite_rows: np.ndarray | None = None, pages: Mapping[int, int] | None = None) -> dict[str, Any]:
    """``archive_figure`` as plotly's JSON structure, built without plotly (what ``publish`` stores)."""
    from qd.explore import elite_rows as find_elite_rows
    from qd.figures import archive_heatmap_spec

    cols = store.columns() if cols is None else cols
    rows = find_elite_rows(cols, archive) if elite_rows is None else elite_rows
    elites = store.to_trials(cols.select(rows))  # one per cell, not the whole run
    study_id = store.study._study_id
    m = archive.metrics()
    score = f"MOQD score {m['moqd_score']:.4g}" if "moqd_score" in m else f"QD score {m['qd_score']:.4g}"
    return archive_heatmap_spec(archive, trials=elites, height=CARD_HEIGHT_PX,
                                title=f"Archive: coverage {m['coverage']:.1%}, {score}",
                                trial_url=lambda n: (f"/dashboard/studies/{study_id}/trials?numbers={pages[n]}"
                                                     if pages is not None and n in pages else None))


def pareto_plotly(store: Store, cols: Columns, reference: Reference | None = None) -> go.Figure:
    """Several objectives: evaluated points and the Pareto set (2-D, 3-D or parallel coordinates),
    trial numbers on hover. One objective: the best value so far against finished evaluations."""
    return _figure(pareto_spec(store, cols, reference))


def _title_text(text: str) -> dict[str, Any]:
    return {"title": {"text": text}}


def pareto_spec(store: Store, cols: Columns, reference: Reference | None = None) -> dict[str, Any]:
    """``pareto_plotly`` as plotly's JSON structure, built without plotly (what ``publish`` stores)."""
    names, directions = _names(store)
    ok = np.flatnonzero(cols.feasible)
    on_front = ok[pareto_front_mask(cols.values[ok], directions)] if len(ok) else ok
    others = np.zeros(len(cols), dtype=bool)  # a mask, not a set difference: linear at 10^6 rows
    others[ok] = True
    others[on_front] = False
    rest = _sample(np.flatnonzero(others))
    labels = [f"{n} ({d[:3]})" for n, d in zip(names, directions)]
    m = len(names)
    V, N = cols.values, cols.number
    if m == 1:
        fin = np.flatnonzero(cols.finished)
        y = np.where(cols.feasible[fin], V[fin, 0], np.nan)
        sign = sign_of(directions[0])
        best = sign * np.fmin.accumulate(sign * y) if len(y) else y
        x = np.arange(1, len(fin) + 1)
        pick = _sample(np.arange(len(fin)))
        # A step line needs only the evaluations that improved it (and the last one).
        steps = np.flatnonzero(np.r_[True, best[1:] != best[:-1]]) if len(best) else np.arange(0)
        steps = _sample(np.union1d(steps, [len(best) - 1]) if len(best) else steps)
        data = [{"type": "scatter", "x": x[pick].tolist(), "y": _short(y[pick]), "mode": "markers",
                 "marker": {"color": "lightgray", "size": 5}, "name": "evaluated"},
                {"type": "scatter", "x": x[steps].tolist(), "y": _short(best[steps]), "mode": "lines",
                 "line": {"color": "#1f77b4", "shape": "hv"}, "name": "best so far"}]
        return {"data": data, "layout": {"title": {"text": f"Best {names[0]} so far", "x": 0.02},
                                         "xaxis": _title_text("finished evaluations"),
                                         "yaxis": _title_text(labels[0])}}
    hover = "trial #%{customdata}<br>" + "<br>".join(f"{n}=%{{{a}:.4g}}" for n, a in zip(names[:3], "xyz"))
    layout: dict[str, Any] = {}
    if m == 2:
        order = on_front[np.argsort(V[on_front, 0])]
        shape = "hv" if directions[0] == directions[1] else "vh"
        data = [{"type": "scatter", "x": V[rest, 0].tolist(), "y": V[rest, 1].tolist(), "mode": "markers",
                 "marker": {"color": "lightgray", "size": 6}, "name": "evaluated",
                 "customdata": N[rest].tolist(), "hovertemplate": hover},
                {"type": "scatter", "x": V[order, 0].tolist(), "y": V[order, 1].tolist(),
                 "mode": "lines+markers", "line": {"shape": shape, "color": "#1f77b4"}, "marker": {"size": 8},
                 "name": f"Pareto set ({len(on_front)})", "customdata": N[order].tolist(), "hovertemplate": hover}]
        layout.update(xaxis={**_title_text(labels[0]), "type": _axis_type(reference, 0)},
                      yaxis={**_title_text(labels[1]), "type": _axis_type(reference, 1)})
    elif m == 3:
        data = [{"type": "scatter3d", "x": V[group, 0].tolist(), "y": V[group, 1].tolist(),
                 "z": V[group, 2].tolist(), "mode": "markers", "name": label,
                 "marker": {"color": color, "size": size}, "customdata": N[group].tolist(), "hovertemplate": hover}
                for group, color, size, label in ((rest, "lightgray", 3, "evaluated"),
                                                  (on_front, "#1f77b4", 5, f"Pareto set ({len(on_front)})"))]
        layout["scene"] = {f"{a}axis": {**_title_text(labels[i]), "type": _axis_type(reference, i)}
                           for i, a in enumerate("xyz")}
    else:
        rows = np.concatenate([rest, on_front])
        # Scaled units: a log-scaled count reads in decades (qd.scaling); the labels say so.
        S = reference.scaling.apply(V[rows]) if reference is not None and reference.scaling is not None else V[rows]
        scaled = [reference.scaling.label(i, n) if reference is not None and reference.scaling is not None else n
                  for i, n in enumerate(names)]
        data = [{"type": "parcoords",
                 "line": {"color": [0] * len(rest) + [1] * len(on_front),
                          "colorscale": [[0, "lightgray"], [1, "#1f77b4"]]},
                 "dimensions": [{"label": f"{scaled[i]} ({directions[i][:3]})", "values": S[:, i].tolist()}
                                for i in range(m)]}]
    text = f"Pareto set: {len(on_front)} of {len(ok)} feasible evaluations"
    if reference is not None and len(on_front):
        text += f", hypervolume {hypervolume(V[on_front], directions, reference):.5g}"
    layout["title"] = {"text": text, "x": 0.02}
    return {"data": data, "layout": layout}


def _axis_type(reference: Reference | None, i: int) -> str:
    """Plotly's axis type for objective ``i``: "log" where it is measured on a log scale."""
    scaling = reference.scaling if reference is not None else None
    return "log" if scaling is not None and scaling.scales[i] == "log" else "linear"


def hypervolume_curve(cols: Columns, directions: Sequence[str], reference: Reference | Sequence[float],
                      points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Hypervolume after k finished evaluations at up to ``points`` values of k: (p,) counts, (p,) values."""
    fin = np.flatnonzero(cols.finished)
    if not len(fin):
        return np.array([], dtype=int), np.array([])
    ks = np.unique(np.linspace(1, len(fin), min(points, len(fin))).astype(int))
    front = np.empty((0, len(directions)))
    out, done = [], 0
    for k in ks:
        rows = fin[done:k]
        rows = rows[cols.feasible[rows]]
        if len(rows):
            Y = np.vstack([front, cols.values[rows]])
            front = Y[pareto_front_mask(Y, directions)]
        done = k
        out.append(hypervolume(front, directions, reference) if len(front) else 0.0)
    return ks, np.array(out)


def metrics_plotly(store: Store, problem: Problem | None, cols: Columns,
                   reference: Reference | None) -> go.Figure | None:
    """Archives: coverage and QD score against evaluations (``qd.metrics``). Several objectives
    without an archive: the hypervolume history. None when there is nothing to draw."""
    spec = metrics_spec(store, problem, cols, reference)
    return None if spec is None else _figure(spec)


def metrics_spec(store: Store, problem: Problem | None, cols: Columns,
                 reference: Reference | None) -> dict[str, Any] | None:
    """``metrics_plotly`` as plotly's JSON structure, built without plotly (what ``publish`` stores)."""
    if problem is not None and problem.measures:
        from qd.metrics import history

        rows = history(store, problem, cols)
        if not rows:
            return None
        pareto = "moqd_score" in rows[-1]
        score = "moqd_score" if pareto else "qd_score"
        x = [r["evaluations"] for r in rows]
        data = [{"type": "scatter", "x": x, "y": [r[score] for r in rows], "mode": "lines", "name": score,
                 "xaxis": "x", "yaxis": "y"},
                {"type": "scatter", "x": x, "y": [r["coverage"] for r in rows], "mode": "lines", "name": "coverage",
                 "xaxis": "x2", "yaxis": "y2"}]
        # Two panels side by side, as plotly's make_subplots(rows=1, cols=2) lays them out.
        titles = [{"text": t, "x": x0, "y": 1.0, "xref": "paper", "yref": "paper", "xanchor": "center",
                   "yanchor": "bottom", "showarrow": False, "font": {"size": 16}}
                  for t, x0 in (("MOQD score" if pareto else "QD score", 0.225), ("coverage", 0.775))]
        axis_x = _title_text("finished evaluations")
        layout = {"xaxis": {**axis_x, "domain": [0.0, 0.45], "anchor": "y"}, "yaxis": {"anchor": "x"},
                  "xaxis2": {**axis_x, "domain": [0.55, 1.0], "anchor": "y2"},
                  "yaxis2": {"anchor": "x2", "tickformat": ".0%"}, "annotations": titles,
                  "title": {"text": "Archive metrics", "x": 0.02}, "showlegend": False}
        return {"data": data, "layout": layout}
    names, directions = _names(store)
    if len(names) < 2 or reference is None:
        return None
    counts, hvs = hypervolume_curve(cols, directions, reference)
    if not len(counts):
        return None
    return {"data": [{"type": "scatter", "x": counts.tolist(), "y": hvs.tolist(), "mode": "lines",
                      "name": "hypervolume"}],
            "layout": {"title": {"text": f"Hypervolume ({reference.caption(names)})", "x": 0.02},
                       "xaxis": _title_text("finished evaluations"), "yaxis": _title_text("hypervolume")}}


# --- the note --------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.5g}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return str(v)


def note_markdown(store: Store, problem: Problem | None, cols: Columns, archive: RunArchive | None,
                  reference: Reference | None, budget: int | None, mirrored: int | None = None) -> str:
    """The study note: what the run is, how far it got and how good it is (Markdown)."""
    info = store.info
    names, directions = _names(store)
    c = cols.counts()
    counts = {"complete": c["n_complete"], "failed": c["n_failed"], "running": c["n_running"], "stale": c["n_stale"]}
    finished = counts["complete"] + counts["failed"]
    rows: list[tuple[str, str]] = [
        ("problem", f"`{info.problem}` {info.problem_options or ''}".strip()),
        ("strategy", f"`{info.strategy}` {info.strategy_options or ''}".strip()),
        ("seed", str(info.seed)),
        ("budget", f"{finished} of {budget} evaluations finished" if budget else f"{finished} evaluations finished"),
        ("evaluations", ", ".join(f"{v} {k}" for k, v in counts.items())),
        ("objectives", ", ".join(f"{n} ({d[:3]})" for n, d in zip(names, directions))),
    ]
    ok = np.flatnonzero(cols.feasible)
    if len(ok):
        V = cols.values[ok]
        best = [(V[:, i].min() if d == "minimize" else V[:, i].max()) for i, d in enumerate(directions)]
        rows.append(("best values", ", ".join(f"{n} = {b:.5g}" for n, b in zip(names, best))))
    if len(names) > 1 and len(ok):
        front = ok[pareto_front_mask(cols.values[ok], directions)]
        numbers = cols.number[front].tolist()
        rows.append(("Pareto set", f"{len(front)} trials: " + ", ".join(f"#{n}" for n in numbers[:12])
                     + (" ..." if len(front) > 12 else "")))
        if reference is not None:
            hv = hypervolume(cols.values[front], directions, reference)
            rows.append(("hypervolume", f"{hv:.6g} ({reference.caption(names)})"))
    if archive is not None:
        m = archive.metrics()
        desc = archive.describe()
        cells = desc.get("cells")
        rows.append(("archive", f"{desc.get('kind')}, {cells} cells over " + ", ".join(store.measure_names)))
        rows.append(("coverage", f"{m['coverage']:.1%} ({m['num_elites']} elites)"))
        rows.append(("QD score" if "moqd_score" not in m else "MOQD score", f"{m['qd_score']:.6g}"))
        if "global_hypervolume" in m:
            rows.append(("global hypervolume", f"{m['global_hypervolume']:.6g}"))
    if mirrored is not None and mirrored < len(cols):
        rows.append(("trials shown", f"{mirrored} of {len(cols)} (the first ones, then elites and the Pareto set); "
                                     f"`qd show` and `qd export` read them all"))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    figures = "archive heatmap, " if archive is not None else ""
    attrs = ["qd_number"] + (["measures"] if store.measure_names else []) + \
        (["cell", "bins", "is_elite"] if archive is not None else []) + \
        ["seed", "origin", "metadata", "fail_reason (failed trials)"]
    return (f"## qd run `{info.name}`\n\n| | |\n|---|---|\n{table}\n\n"
            f"Figures on the study page: {figures}{'Pareto set' if len(names) > 1 else 'best value so far'}, metrics. "
            f"Trial user attributes: {', '.join(f'`{a}`' for a in attrs)}.\n\n"
            f"*Updated {stamp} by qd; edits here are replaced at the next update while the run progresses.*\n")


# --- publishing -------------------------------------------------------------------------------
def featured_numbers(cols: Columns, archive: RunArchive | None, directions: Sequence[str],
                     elite_rows: np.ndarray | None = None) -> tuple[list[int], set[int]]:
    """(trial numbers worth mirroring beyond the first ones, the numbers of the elites): the
    archive's elites (the best trial of each cell) and the Pareto set."""
    elites: set[int] = set()
    ok = np.flatnonzero(cols.feasible)
    if elite_rows is not None:
        elites = set(cols.number[elite_rows].tolist())
    elif archive is not None and len(ok):
        from qd.explore import elite_rows as find_elite_rows

        elites = set(cols.number[find_elite_rows(cols, archive)].tolist())
    front: list[int] = []
    if len(directions) > 1 and len(ok):
        front = cols.number[ok[pareto_front_mask(cols.values[ok], directions)]].tolist()
    return sorted(set(front) | elites), elites


def publish(store: Store, problem: Problem | None = None, *, budget: int | None = None,
            cols: Columns | None = None, archive: RunArchive | None = None,
            mirror_budget_s: float | None = None, elite_rows: np.ndarray | None = None) -> list[str]:
    """Write the run's figures and note into its study, and mirror its trials there (``qd.mirror``).
    ``elite_rows``: the rows of ``cols`` holding the archive's elites, when the caller keeps them.
    Returns the figure ids written."""
    from qd.mirror import Mirror

    cols = store.columns() if cols is None else cols
    names, directions = _names(store)
    ok = cols.feasible
    reference = reference_point_of_values(problem, cols.values[ok], directions)
    if archive is None and problem is not None and store.archive_spec_json is not None:
        from qd.archive import archive_for_run

        archive = archive_for_run(store, problem, cols)
    if budget is None:
        budget = store.attrs().get(BUDGET_KEY)
    mirrored, left, pages = None, 0, None
    if problem is not None:
        featured, elites = featured_numbers(cols, archive, directions, elite_rows)
        bins = _cell_bins(archive)
        mirror = Mirror(store, problem)
        mirror.sync(cols, featured, elites, bins, time_budget_s=mirror_budget_s)
        mirrored, left = len(mirror.mirrored()), mirror.left
        pages = mirror.pages()
    specs: list[tuple[str, dict[str, Any] | None]] = []
    if archive is not None and not archive.empty:
        specs.append((ARCHIVE_ID, archive_figure_spec(store, problem, archive, cols, elite_rows, pages)))
    specs.append((PARETO_ID, pareto_spec(store, cols, reference)))
    specs.append((METRICS_ID, metrics_spec(store, problem, cols, reference)))
    storage, study_id = store.study._storage, store.study._study_id
    existing = storage.get_study_system_attrs(study_id)
    attrs: dict[str, Any] = {}
    written = []
    for graph_id, spec in specs:
        if spec is not None:
            attrs.update(_chunks(f"{PLOT_DATA_PREFIX}{graph_id}:", _json(spec), existing))
            written.append(graph_id)
    body = note_markdown(store, problem, cols, archive, reference, budget, mirrored)
    attrs[NOTE_VERSION_KEY] = int(existing.get(NOTE_VERSION_KEY, 0)) + 1
    attrs.update(_chunks(NOTE_PREFIX, body, existing))
    # Up to date only once every trial due is mirrored: `qd dashboard` copies what a run's own
    # (time-bounded) publishing left.
    attrs[PUBLISHED_KEY] = -1 if left else int(cols.finished.sum())
    set_study_system_attrs(storage, study_id, attrs)
    return written


# optuna-dashboard's study attributes (``save_plotly_graph_object``, ``save_note``): long texts
# are split into chunks ``<prefix><i>``; a shorter text blanks the chunks a longer one left. Written
# here in one transaction, without importing optuna-dashboard (botorch, sklearn: half a second)
# into a run; tests read them back with optuna-dashboard's own readers.
PLOT_DATA_PREFIX = "dashboard:plot_data:"
NOTE_PREFIX = "dashboard:note_str:"
NOTE_VERSION_KEY = "dashboard:note_ver"
_CHUNK = 2045


def _chunks(prefix: str, text: str, existing: Mapping[str, Any]) -> dict[str, str]:
    """``text`` as optuna-dashboard's chunked attributes under ``prefix``, blanking stale ones."""
    out = {f"{prefix}{i}": text[i * _CHUNK:(i + 1) * _CHUNK] for i in range(-(-len(text) // _CHUNK))}
    stale = sum(1 for k in existing if k.startswith(prefix))
    out.update({f"{prefix}{i}": "" for i in range(len(out), stale)})
    return out


def _json(spec: dict[str, Any]) -> str:
    """A figure's JSON as plotly writes it: NaN and infinities as null, numpy scalars as numbers."""
    def safe(o: Any) -> Any:
        if isinstance(o, float):
            return o if o == o and o not in (float("inf"), float("-inf")) else None
        if isinstance(o, dict):
            return {k: safe(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [safe(v) for v in o]
        return o

    import json

    return json.dumps(safe(spec), separators=(",", ":"), default=lambda o: o.item() if hasattr(o, "item") else str(o))


def set_study_system_attrs(storage: optuna.storages.BaseStorage, study_id: int, attrs: Mapping[str, Any]) -> None:
    """Set many study system attributes: in one transaction on an RDB storage (Optuna commits each
    ``set_study_system_attr``: a figure of 200 KB is a hundred commits), one by one elsewhere."""
    import json

    from qd.mirror import rdb_backend

    backend = rdb_backend(storage)
    if backend is None:
        for key, value in attrs.items():
            storage.set_study_system_attr(study_id, key, value)
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    model = models.StudySystemAttributeModel
    with _create_scoped_session(backend.scoped_session, True) as session:
        keys = list(attrs)
        held = {}
        for i in range(0, len(keys), 500):
            held.update((a.key, a) for a in session.query(model).filter(model.study_id == study_id,
                                                                          model.key.in_(keys[i:i + 500])))
        for key, value in attrs.items():
            text = json.dumps(value)
            if key in held:
                held[key].value_json = text
            else:
                session.add(model(study_id=study_id, key=key, value_json=text))


def _cell_bins(archive: RunArchive | None) -> dict[int, list[int]] | None:
    """cell -> per-measure bin indices, for grid archives."""
    if archive is None:
        return None
    from ribs.archives import GridArchive

    grid = archive.layout
    if not isinstance(grid, GridArchive):
        return None
    cells = np.arange(int(np.prod(grid.dims)))
    return {int(c): [int(b) for b in row] for c, row in zip(cells, grid.int_to_grid_index(cells))}


def published_figures(store: Store) -> dict[str, dict[str, Any]]:
    """The figures the dashboard will show for this run, by id, as plotly JSON dicts."""
    import json

    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    attrs = store.study._storage.get_study_system_attrs(store.study._study_id)
    return {k: json.loads(v) for k, v in get_plotly_graph_objects(attrs).items()}


class Publisher(Listener):
    """The run loop's listener that keeps the dashboard's figures, note and mirrored trials current.

    Publishes every ``every_s`` seconds and at the end, and never spends more than
    ``MAX_PUBLISH_SHARE`` of the run's time doing it: the interval stretches when figures get
    expensive, and mirroring trials into the study (Optuna writes a trial in tens of
    milliseconds) gets what is left of that share, at least ``MIN_MIRROR_S`` per publish. What a
    fast run leaves unmirrored, ``qd dashboard`` copies before it serves. Publishing errors are
    reported once on stderr and never stop the run.
    """

    #: Each publish may mirror trials for at least this long.
    MIN_MIRROR_S = 0.25
    #: What the first publish is expected to cost (figures, note, mirror), before one was timed.
    FIRST_COST_S = 1.0

    def __init__(self, store: Store, problem: Problem, budget: int | None = None, every_s: float = 10.0,
                 max_share: float | None = MAX_PUBLISH_SHARE):
        if every_s is None or every_s <= 0:
            raise ValueError(f"dashboard: every_s={every_s!r} is not allowed; allowed: a number of seconds > 0")
        self.store, self.problem, self.budget = store, problem, budget
        self.base_every_s = self.every_s = float(every_s)
        self.max_share = max_share
        self._failed = False
        self.published = 0
        self._published_at = -1
        self._t0 = time.monotonic()
        #: Seconds spent publishing so far.
        self.spent_s = 0.0
        self._last_cost = 0.0
        if budget is not None:
            store.set_attr(BUDGET_KEY, int(budget))

    def _mirror_budget(self, most_s: float) -> float:
        if self.max_share is None:
            return most_s
        allowed = self.max_share * (time.monotonic() - self._t0) - self.spent_s
        return min(most_s, max(self.MIN_MIRROR_S, allowed))

    def update(self, state: RunState) -> None:
        """Publish, unless that would take the dashboard past ``max_share`` of the run's time."""
        if self.max_share is not None:
            # Not before the run has lasted long enough for a publish (as costly as the last one, or
            # ``FIRST_COST_S``) to fit in the share: a fast run is published once, at its end.
            cost = self._last_cost if self.published else self.FIRST_COST_S
            if self.spent_s + cost > self.max_share * (time.monotonic() - self._t0):
                return
        self.publish(state, mirror_budget_s=self._mirror_budget(1.0))

    def publish(self, state: RunState, mirror_budget_s: float | None = None) -> None:
        """Flush the store and redraw the run's figures; an error is reported once and never stops the run.

        Args:
            state: The run as the loop holds it.
            mirror_budget_s: Seconds the Optuna mirror may spend now (None: no bound).
        """
        t0 = time.monotonic()
        try:
            self.store.flush()
            publish(self.store, self.problem, budget=self.budget, cols=state.columns(), archive=state.archive,
                    mirror_budget_s=mirror_budget_s, elite_rows=state.elite_rows())
            self.published += 1
            self._published_at = state.n_finished
        except Exception as e:  # the dashboard is a view: it must never stop a run
            if not self._failed:
                print(f"qd: dashboard figures not updated: {type(e).__name__}: {e}", file=sys.stderr)
            self._failed = True
        spent = time.monotonic() - t0
        self.spent_s += spent
        self._last_cost = spent
        if self.max_share is not None:
            self.every_s = max(self.base_every_s, spent / self.max_share)

    def close(self, state: RunState) -> None:
        """Publish the final state (after the metrics' last row, which the loop writes first)."""
        if self._published_at != state.n_finished or not self.published:
            self.publish(state, mirror_budget_s=self._mirror_budget(10.0))


# --- serving ----------------------------------------------------------------------------------
def study_url(store: Store, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> str:
    """The optuna-dashboard address of the store's study."""
    return f"http://{host}:{port}/dashboard/studies/{store.study._study_id}"


def refresh(storage: str, names: Sequence[str] | None = None, out: Any = sys.stdout) -> list[Store]:
    """Bring the figures of the named runs (default: every qd run in ``storage``) up to date.

    A run with trials still running is left alone: its own run loop publishes, and two writers
    of the same figure could interleave their chunks. Returns the qd runs' stores.
    """
    from qd.session import problem_of
    from qd.store import RunNotFound

    stores = []
    for name in (names if names else Store.run_names(storage)):
        try:
            store = Store.open(storage, name)
        except RunNotFound as e:
            if names:
                raise
            print(f"skipping study {name!r}: {e}", file=out)
            continue
        stores.append(store)
        cols = store.columns()
        finished = int(cols.finished.sum())
        system = store.study._storage.get_study_system_attrs(store.study._study_id)
        if (cols.state == 0).any():
            print(f"run {name!r}: evaluations running; the run itself keeps its figures current", file=out)
            continue
        if system.get(PUBLISHED_KEY) == finished:
            continue
        try:
            problem = problem_of(store)
        except Exception as e:  # the problem's plug-in may be missing here
            print(f"run {name!r}: problem {store.info.problem!r} cannot be built ({e}); no archive figure", file=out)
            problem = None
        publish(store, problem, cols=cols)
        print(f"run {name!r}: figures and note updated ({finished} evaluations)", file=out)
    return stores


def check_port(host: str, port: int) -> None:
    """Fail early, with the fix, when the port cannot be listened on."""
    if not (is_int(port) and 0 < port < 65536):
        raise ValueError(f"--port {port!r} is not allowed; allowed: an integer in 1..65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); "
                             f"allowed: a free port, e.g. --port {port + 1}") from None


def serve(storage: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, names: Sequence[str] | None = None,
          update: bool = True, out: Any = sys.stdout, allow_writes: bool = False,
          allow_hosts: Sequence[str] = ()) -> None:
    """Start optuna-dashboard on ``host:port`` for ``storage`` (blocks until interrupted).

    Read-only unless ``allow_writes`` (then writes need the token printed here); requests whose
    ``Host`` is not this machine or one of ``allow_hosts`` are refused (``qd.dashboard_guard``).
    The storage is printed with its password masked.
    """
    from wsgiref.simple_server import make_server

    import optuna
    from optuna_dashboard._app import create_app
    from optuna_dashboard._cli import ThreadedWSGIServer

    from qd.dashboard_guard import Guard, local_names, new_token
    from qd.storage_url import mask
    from qd.store import optuna_storage

    check_port(host, port)
    stores = refresh(storage, names, out) if update else [Store.open(storage, n) for n in names or []]
    if not update and not names:
        Store.run_names(storage)  # checks the storage exists; never creates it
    token = new_token() if allow_writes else None
    app = Guard(create_app(optuna.storages.get_storage(optuna_storage(storage))), local_names(host, allow_hosts), token)
    query = f"?token={token}" if token else ""
    mode = "writes need the token in this URL" if token else "read-only; --allow-writes to change runs"
    print(f"optuna-dashboard for {mask(storage)} at http://{host}:{port}/dashboard{query} ({mode})", file=out)
    for store in stores:
        print(f"  run {store.info.name!r}: {study_url(store, host, port)}", file=out)
    out.flush()
    with make_server(host, port, app, server_class=ThreadedWSGIServer) as httpd:
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            print("qd dashboard: stopped", file=out)
