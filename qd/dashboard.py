"""Runs in optuna-dashboard: the archive heatmap, the Pareto front and a summary note, kept current.

Every qd run is an Optuna study, so optuna-dashboard shows its trials as is. This module adds
what the dashboard cannot work out itself, written into the study where the dashboard reads it:

- figures (``optuna_dashboard.save_plotly_graph_object``, shown on the study's top page):
  ``qd-archive``, the archive as a plotly heatmap (``qd.figures``; problems with measures);
  ``qd-pareto``, the objectives with the Pareto set (several objectives) or the best value so far
  (one objective); ``qd-metrics``, coverage and QD score against evaluations (archives) or the
  hypervolume history (several objectives);
- a study note (``optuna_dashboard.save_note``): problem, strategy, budget, counts and metrics;
- trial user attributes: the store writes ``measures``; ``CellStore`` adds ``cell``, the integer
  archive cell (pyribs' index; for a grid, ``int_to_grid_index`` gives the bin per measure).
  Optuna freezes a trial once it is complete, so the cell is written just before completion.

``Publisher`` is the run-loop callback that refreshes figures and note while a run progresses
(every ``every_s`` seconds, or ``every_n`` evaluations, and at the end); ``serve`` starts the
dashboard (``qd dashboard``) after bringing finished runs' figures up to date.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from qd.problem import Problem
from qd.results import hypervolume, hypervolume_history, pareto_trials, reference_point
from qd.store import RunInfo, Store, Trial

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


# --- cells in trial user attributes ------------------------------------------------------------
class CellStore(Store):
    """The same run's store, recording each completed trial's archive cell as user attributes.

    Used by the run loop in place of the plain store for problems with measures. The cell is the
    one ``qd.archive`` would put the trial in (measures outside the bounds go to an edge cell),
    whether or not the trial became an elite.
    """

    def __init__(self, study: optuna.Study, info: RunInfo, measure_names: Sequence[str], archive: RunArchive):
        super().__init__(study, info, measure_names)
        self.archive = archive

    @classmethod
    def wrap(cls, store: Store, problem: Problem) -> Store:
        """``store`` itself when the problem has no measures, else a ``CellStore`` on the same study."""
        if not problem.measures:
            return store
        from qd.archive import build_archive, spec_for_run

        info = store.info
        archive = build_archive(problem, spec_for_run(problem, info.strategy, info.strategy_options, info.seed))
        return cls(store.study, info, store.measure_names, archive)

    def complete(self, trial: Trial, values: Sequence[float], measures: Sequence[float] = (),
                 constraints: Sequence[float] = (), metadata: dict[str, Any] | None = None) -> Trial:
        if measures:  # one attribute: every extra write is a database commit per trial
            from qd.explore import cells_of

            cell = cells_of(self.archive, np.array([measures], dtype=float))
            self._storage.set_trial_user_attr(trial._id, "cell", int(cell[0]))
        return super().complete(trial, values, measures, constraints, metadata)


# --- figures ------------------------------------------------------------------------------------
def _names(store: Store) -> tuple[list[str], list[str]]:
    directions = [d.name.lower() for d in store.study.directions]
    return list(store.study.metric_names or [f"value_{i}" for i in range(len(directions))]), directions


def _title(store: Store) -> str:
    return f"{store.info.name}: {store.info.problem} / {store.info.strategy}"


def archive_figure(store: Store, problem: Problem, archive: RunArchive,
                   trials: Sequence[Trial] | None = None) -> go.Figure:
    """The archive as a native plotly heatmap (``qd.figures.archive_heatmap``): hovering a cell
    shows its bin ranges, value and trial number; each filled cell links to its trial's page."""
    from qd.figures import archive_heatmap

    study_id = store.study._study_id
    m = archive.metrics()
    score = f"MOQD score {m['moqd_score']:.4g}" if "moqd_score" in m else f"QD score {m['qd_score']:.4g}"
    return archive_heatmap(archive, trials=store.trials() if trials is None else trials, height=CARD_HEIGHT_PX,
                           title=f"Archive: coverage {m['coverage']:.1%}, {score}",
                           trial_url=lambda n: f"/dashboard/studies/{study_id}/trials?numbers={n}")


def pareto_plotly(store: Store, trials: Sequence[Trial], reference: Sequence[float] | None = None) -> go.Figure:
    """Several objectives: evaluated points and the Pareto set (2-D, 3-D or parallel coordinates),
    trial numbers on hover. One objective: the best value so far against finished evaluations."""
    import plotly.graph_objects as go

    names, directions = _names(store)
    done = [t for t in trials if t.feasible]
    front = pareto_trials(done, directions)
    on_front = {t.number for t in front}
    rest = [t for t in done if t.number not in on_front]
    labels = [f"{n} ({d[:3]})" for n, d in zip(names, directions)]
    fig = go.Figure()
    m = len(names)
    if m == 1:
        finished = [t for t in trials if t.finished]
        better = min if directions[0] == "minimize" else max
        best, xs, ys = None, [], []
        for i, t in enumerate(finished, start=1):
            if t.feasible:
                best = t.values[0] if best is None else better(best, t.values[0])
            if best is not None:
                xs.append(i), ys.append(best)
        fig.add_trace(go.Scatter(x=list(range(1, len(finished) + 1)),
                                 y=[t.values[0] if t.feasible else None for t in finished], mode="markers",
                                 marker={"color": "lightgray", "size": 5}, name="evaluated"))
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": "#1f77b4"}, name="best so far"))
        fig.update_layout(title={"text": f"Best {names[0]} so far", "x": 0.02}, xaxis_title="finished evaluations",
                          yaxis_title=labels[0])
        return fig
    hover = "trial #%{customdata}<br>" + "<br>".join(f"{n}=%{{{a}:.4g}}" for n, a in zip(names[:3], "xyz"))
    if m == 2:
        order = sorted(front, key=lambda t: t.values[0])
        fig.add_trace(go.Scatter(x=[t.values[0] for t in rest], y=[t.values[1] for t in rest], mode="markers",
                                 marker={"color": "lightgray", "size": 6}, name="evaluated",
                                 customdata=[t.number for t in rest], hovertemplate=hover))
        shape = "hv" if directions[0] == directions[1] else "vh"
        fig.add_trace(go.Scatter(x=[t.values[0] for t in order], y=[t.values[1] for t in order],
                                 mode="lines+markers", line={"shape": shape, "color": "#1f77b4"},
                                 marker={"size": 8}, name=f"Pareto set ({len(front)})",
                                 customdata=[t.number for t in order], hovertemplate=hover))
        fig.update_layout(xaxis_title=labels[0], yaxis_title=labels[1])
    elif m == 3:
        for group, color, size, label in ((rest, "lightgray", 3, "evaluated"),
                                          (front, "#1f77b4", 5, f"Pareto set ({len(front)})")):
            fig.add_trace(go.Scatter3d(x=[t.values[0] for t in group], y=[t.values[1] for t in group],
                                       z=[t.values[2] for t in group], mode="markers", name=label,
                                       marker={"color": color, "size": size},
                                       customdata=[t.number for t in group], hovertemplate=hover))
        fig.update_layout(scene={"xaxis_title": labels[0], "yaxis_title": labels[1], "zaxis_title": labels[2]})
    else:
        rows = rest + front
        fig.add_trace(go.Parcoords(
            line={"color": [1 if t.number in on_front else 0 for t in rows], "colorscale": [[0, "lightgray"],
                                                                                              [1, "#1f77b4"]]},
            dimensions=[{"label": labels[i], "values": [t.values[i] for t in rows]} for i in range(m)]))
    text = f"Pareto set: {len(front)} of {len(done)} feasible evaluations"
    if reference is not None and front:
        text += f", hypervolume {hypervolume(np.array([t.values for t in front]), directions, reference):.5g}"
    fig.update_layout(title={"text": text, "x": 0.02})
    return fig


def metrics_plotly(store: Store, problem: Problem | None, trials: Sequence[Trial],
                   reference: Sequence[float] | None) -> go.Figure | None:
    """Archives: coverage and QD score against evaluations (``qd.metrics``). Several objectives
    without an archive: the hypervolume history. None when there is nothing to draw."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if problem is not None and problem.measures:
        from qd.metrics import history

        rows = history(store, problem, trials)
        if not rows:
            return None
        pareto = "moqd_score" in rows[-1]
        score = "moqd_score" if pareto else "qd_score"
        fig = make_subplots(rows=1, cols=2, subplot_titles=("MOQD score" if pareto else "QD score", "coverage"))
        x = [r["evaluations"] for r in rows]
        fig.add_trace(go.Scatter(x=x, y=[r[score] for r in rows], mode="lines", name=score), row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=[r["coverage"] for r in rows], mode="lines", name="coverage"), row=1, col=2)
        fig.update_yaxes(tickformat=".0%", row=1, col=2)
        fig.update_xaxes(title_text="finished evaluations")
        fig.update_layout(title={"text": "Archive metrics", "x": 0.02}, showlegend=False)
        return fig
    names, directions = _names(store)
    if len(names) < 2 or reference is None:
        return None
    counts, hvs = hypervolume_history(trials, directions, reference)
    if not len(counts):
        return None
    fig = go.Figure(go.Scatter(x=counts.tolist(), y=hvs.tolist(), mode="lines", name="hypervolume"))
    fig.update_layout(title={"text": f"Hypervolume (reference {tuple(round(r, 4) for r in reference)})", "x": 0.02},
                      xaxis_title="finished evaluations", yaxis_title="hypervolume")
    return fig


# --- the note --------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.5g}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return str(v)


def note_markdown(store: Store, problem: Problem | None, trials: Sequence[Trial], archive: RunArchive | None,
                  reference: Any, budget: int | None) -> str:
    """The study note: what the run is, how far it got and how good it is (Markdown)."""
    info = store.info
    names, directions = _names(store)
    counts = {"complete": sum(t.state == "complete" for t in trials),
              "failed": sum(t.state == "failed" and not t.stale for t in trials),
              "running": sum(t.state == "running" for t in trials), "stale": sum(t.stale for t in trials)}
    finished = counts["complete"] + counts["failed"]
    rows: list[tuple[str, str]] = [
        ("problem", f"`{info.problem}` {info.problem_options or ''}".strip()),
        ("strategy", f"`{info.strategy}` {info.strategy_options or ''}".strip()),
        ("seed", str(info.seed)),
        ("budget", f"{finished} of {budget} evaluations finished" if budget else f"{finished} evaluations finished"),
        ("evaluations", ", ".join(f"{v} {k}" for k, v in counts.items())),
        ("objectives", ", ".join(f"{n} ({d[:3]})" for n, d in zip(names, directions))),
    ]
    ok = [t for t in trials if t.feasible]
    if ok:
        best = [(min if d == "minimize" else max)(t.values[i] for t in ok) for i, d in enumerate(directions)]
        rows.append(("best values", ", ".join(f"{n} = {b:.5g}" for n, b in zip(names, best))))
    if len(names) > 1 and ok:
        front = pareto_trials(ok, directions)
        rows.append(("Pareto set", f"{len(front)} trials: " + ", ".join(f"#{t.number}" for t in front[:12])
                     + (" ..." if len(front) > 12 else "")))
        if reference is not None:
            hv = hypervolume(np.array([t.values for t in front]), directions, reference.point)
            rows.append(("hypervolume", f"{hv:.6g} (reference {_fmt(list(reference.point))}, from the "
                                        f"{reference.source})"))
    if archive is not None:
        m = archive.metrics()
        desc = archive.describe()
        cells = desc.get("cells")
        rows.append(("archive", f"{desc.get('kind')}, {cells} cells over " + ", ".join(store.measure_names)))
        rows.append(("coverage", f"{m['coverage']:.1%} ({m['num_elites']} elites)"))
        rows.append(("QD score" if "moqd_score" not in m else "MOQD score", f"{m['qd_score']:.6g}"))
        if "global_hypervolume" in m:
            rows.append(("global hypervolume", f"{m['global_hypervolume']:.6g}"))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    figures = "archive heatmap, " if archive is not None else ""
    attrs = (["measures"] if store.measure_names else []) + (["cell"] if archive is not None else []) + \
        ["seed", "origin", "metadata", "fail_reason (failed trials)"]
    return (f"## qd run `{info.name}`\n\n| | |\n|---|---|\n{table}\n\n"
            f"Figures on the study page: {figures}{'Pareto set' if len(names) > 1 else 'best value so far'}, metrics. "
            f"Trial user attributes: {', '.join(f'`{a}`' for a in attrs)}.\n\n"
            f"*Updated {stamp} by qd; edits here are replaced at the next update while the run progresses.*\n")


# --- publishing -------------------------------------------------------------------------------
def publish(store: Store, problem: Problem | None = None, *, budget: int | None = None,
            trials: Sequence[Trial] | None = None) -> list[str]:
    """Write the run's figures and note into its study; returns the figure ids written."""
    from optuna_dashboard import save_note, save_plotly_graph_object

    from qd.explore import run_archive

    trials = store.trials() if trials is None else list(trials)
    names, directions = _names(store)
    reference = reference_point(problem, trials, directions)
    archive = run_archive(store, problem, trials)
    if budget is None:
        budget = store.attrs().get(BUDGET_KEY)
    written = []
    figures: list[tuple[str, go.Figure | None]] = []
    if archive is not None and not archive.empty:
        figures.append((ARCHIVE_ID, archive_figure(store, problem, archive, trials)))
    figures.append((PARETO_ID, pareto_plotly(store, trials, reference.point if reference else None)))
    figures.append((METRICS_ID, metrics_plotly(store, problem, trials, reference.point if reference else None)))
    for graph_id, fig in figures:
        if fig is not None:
            save_plotly_graph_object(store.study, fig, graph_object_id=graph_id)
            written.append(graph_id)
    save_note(store.study, note_markdown(store, problem, trials, archive, reference, budget))
    store.study._storage.set_study_system_attr(store.study._study_id, PUBLISHED_KEY,
                                               sum(t.finished for t in trials))
    return written


def published_figures(store: Store) -> dict[str, dict[str, Any]]:
    """The figures the dashboard will show for this run, by id, as plotly JSON dicts."""
    import json

    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    attrs = store.study._storage.get_study_system_attrs(store.study._study_id)
    return {k: json.loads(v) for k, v in get_plotly_graph_objects(attrs).items()}


class Publisher:
    """Run-loop callback that keeps the dashboard's figures and note current.

    Publishes at most every ``every_s`` seconds (or every ``every_n`` finished evaluations when
    given), and never spends more than ``MAX_PUBLISH_SHARE`` of the run's time doing it: the
    interval stretches when figures get expensive. ``close()`` publishes the final state.
    Publishing errors are reported once on stderr and never stop the run.
    """

    def __init__(self, store: Store, problem: Problem, budget: int | None = None, every_s: float = 10.0,
                 every_n: int | None = None):
        if every_s is not None and every_s <= 0:
            raise ValueError(f"dashboard: every_s={every_s!r} is not allowed; allowed: a number of seconds > 0")
        if every_n is not None and (isinstance(every_n, bool) or not isinstance(every_n, int) or every_n < 1):
            raise ValueError(f"dashboard: every_n={every_n!r} is not allowed; allowed: an integer >= 1 or None")
        self.store, self.problem, self.budget = store, problem, budget
        self.every_s, self.every_n = every_s, every_n
        self._since = 0
        self._last = time.monotonic()
        self._cost = 0.0
        self._failed = False
        self.published = 0
        if budget is not None:
            store.set_attr(BUDGET_KEY, int(budget))

    def __call__(self, store: Store, trial: Trial) -> None:
        self._since += 1
        due = self.every_n is not None and self._since >= self.every_n
        interval = max(self.every_s or 0.0, self._cost / MAX_PUBLISH_SHARE)
        if due or (self.every_n is None and time.monotonic() - self._last >= interval):
            self.publish()

    def publish(self) -> None:
        t0 = time.monotonic()
        try:
            publish(self.store, self.problem, budget=self.budget)
            self.published += 1
        except Exception as e:  # the dashboard is a view: it must never stop a run
            if not self._failed:
                print(f"qd: dashboard figures not updated: {type(e).__name__}: {e}", file=sys.stderr)
            self._failed = True
        self._cost = time.monotonic() - t0
        self._last, self._since = time.monotonic(), 0

    def close(self) -> None:
        """Publish the final state (unless nothing finished since the last publish)."""
        if self._since or not self.published:
            self.publish()


# --- serving ----------------------------------------------------------------------------------
def study_url(store: Store, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> str:
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
        trials = store.trials()
        finished = sum(t.finished for t in trials)
        system = store.study._storage.get_study_system_attrs(store.study._study_id)
        if any(t.state == "running" for t in trials):
            print(f"run {name!r}: evaluations running; the run itself keeps its figures current", file=out)
            continue
        if system.get(PUBLISHED_KEY) == finished:
            continue
        try:
            problem = problem_of(store)
        except Exception as e:  # the problem's plug-in may be missing here
            print(f"run {name!r}: problem {store.info.problem!r} cannot be built ({e}); no archive figure", file=out)
            problem = None
        publish(store, problem, trials=trials)
        print(f"run {name!r}: figures and note updated ({finished} evaluations)", file=out)
    return stores


def check_port(host: str, port: int) -> None:
    """Fail early, with the fix, when the port cannot be listened on."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"--port {port!r} is not allowed; allowed: an integer in 1..65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); "
                             f"allowed: a free port, e.g. --port {port + 1}") from None


def serve(storage: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, names: Sequence[str] | None = None,
          update: bool = True, out: Any = sys.stdout) -> None:
    """Start optuna-dashboard on ``host:port`` for ``storage`` (blocks until interrupted)."""
    from optuna_dashboard import run_server

    check_port(host, port)
    stores = refresh(storage, names, out) if update else [Store.open(storage, n) for n in names or []]
    print(f"optuna-dashboard for {storage} at http://{host}:{port}/dashboard", file=out)
    for store in stores:
        print(f"  run {store.info.name!r}: {study_url(store, host, port)}", file=out)
    out.flush()
    run_server(storage, host=host, port=port)
