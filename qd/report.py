"""``qd report`` (a self-contained folder: PNG figures, an HTML summary with tables, the data) and
``qd export`` (trials, elites and the Pareto set as CSV, Parquet or JSON).

Both read only the store, through ``qd.explore.build_run``, so they agree with ``qd show``,
``qd plot`` and notebooks on what the elites and the Pareto set are.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from qd.explore import Run, build_run
from qd.problem import Problem
from qd.store import Store

EXPORT_FORMATS: tuple[str, ...] = ("csv", "parquet", "json")
TABLES: tuple[str, ...] = ("trials", "elites", "pareto")


# --- export -------------------------------------------------------------------------------------
def _parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns pyarrow cannot type (e.g. a categorical parameter mixing ints and strings,
    lists in metadata) become JSON text; everything else keeps its type."""
    import pyarrow as pa

    out = df.copy()
    for col in out.columns:
        if out[col].dtype != object:
            continue
        try:
            pa.array(out[col], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            out[col] = [None if v is None or (isinstance(v, float) and math.isnan(v)) else
                        v if isinstance(v, str) else json.dumps(v, default=str) for v in out[col]]
    return out


def write_table(df: pd.DataFrame, path: Path, fmt: str) -> Path:
    """Write one table; ``path`` without suffix."""
    path = path.with_suffix(f".{fmt}")
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "parquet":
        _parquet_safe(df).to_parquet(path, index=False)
    elif fmt == "json":
        path.write_text(df.to_json(orient="records", indent=1, default_handler=str) + "\n")
    else:
        raise ValueError(f"--format {fmt!r} is not allowed; allowed: {list(EXPORT_FORMATS)}")
    return path


def export(run: Run, out: str | Path, fmt: str = "csv") -> list[Path]:
    """Write ``trials``, ``elites`` (empty when the problem has no measures) and ``pareto`` tables,
    plus ``run.json`` (the run's summary) into ``out``.

    Args:
        run: the run (``qd.explore.load_run``).
        out: the output folder (created if missing).
        fmt: the tables' format, one of ``EXPORT_FORMATS``.

    Returns:
        The paths written, ``run.json`` last.

    Raises:
        ValueError: ``fmt`` is not allowed.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--format {fmt!r} is not allowed; allowed: {list(EXPORT_FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_table(getattr(run, name), out / name, fmt) for name in TABLES]
    summary = out / "run.json"
    summary.write_text(json.dumps(run.summary(), indent=2, default=str) + "\n")
    return [*written, summary]


# --- figures --------------------------------------------------------------------------------------
def write_figures(run: Run, out: Path) -> list[Path]:
    """The run's PNGs: Pareto front and hypervolume (several objectives) or best so far (one), and
    the archive heatmap and QD metrics (``qd.plots_archive``) when the problem has measures."""
    import matplotlib.pyplot as plt

    from qd.plots import best_so_far_figure, hypervolume_figure, pareto_figure
    from qd.results import hypervolume_history

    title = f"{run.name}: {run.store.info.problem} / {run.store.info.strategy}"
    trials = run.store.trials()
    written = []

    def save(fig: Any, name: str) -> None:
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)

    if len(run.objectives) > 1:
        scaling = run.problem.scaling if run.problem is not None else None
        save(pareto_figure(trials, run.objectives, run.directions, title, scaling), "pareto_front.png")
        if run.reference is not None:
            counts, hvs = hypervolume_history(trials, run.directions, run.reference)
            save(hypervolume_figure(counts, hvs, run.reference, title, run.objectives), "hypervolume.png")
    elif any(t.finished for t in trials):
        save(best_so_far_figure(trials, run.objectives[0], run.directions[0], title), "best_so_far.png")
    if run.archive is not None and not run.archive.empty:
        from qd.plots_archive import plot_archive

        written += plot_archive(run.store, run.problem, out, trials, title)
    return written


# --- the HTML summary ------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; width: 100%; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
td.params { text-align: left; overflow-wrap: anywhere; font-size: 0.95em; }
.figures figure { margin: 1.5em 0; } .figures img { display: block; max-width: 100%; border: 1px solid #eee; }
.figures figcaption { color: #666; font-size: 0.85em; }
.note { color: #666; font-size: 0.85em; }
.kv { width: auto; } .kv td { text-align: left; }
"""

#: Archive figures in words (``qd.archive``'s metrics() and describe() keys).
ARCHIVE_LABELS: dict[str, str] = {
    "kind": "archive", "objective": "archive objective", "direction": "archive direction",
    "qd_score_offset": "QD score offset (the value counted as zero)", "bins": "bins per measure",
    "cells": "cells", "coverage": "coverage (share of cells filled)", "qd_score": "QD score",
    "norm_qd_score": "QD score per cell", "num_elites": "elites", "best": "best value in the archive",
    "moqd_score": "MOQD score (sum of the cells' hypervolumes)",
    "global_hypervolume": "global hypervolume (of the archive's fronts)", "front_size": "front size per cell",
    "reference_point": "archive reference point", "reference_source": "archive reference point from",
    "learning_rate": "CMA-MAE learning rate", "threshold_min": "CMA-MAE initial threshold",
    "aggregate": "repeated evaluations", "fidelity": "fidelity",
}

#: Figure captions in words.
CAPTIONS: dict[str, str] = {
    "pareto_front": "The objectives of every evaluated configuration; the Pareto set in blue.",
    "hypervolume": "Hypervolume of the Pareto set so far against finished evaluations.",
    "best_so_far": "Every finished evaluation's value (grey) and the best so far (line).",
    "archive_heatmap": "The archive: the best value found in each cell of the measures.",
    "moqd_heatmap": "The archive: the hypervolume of each cell's Pareto front.",
    "qd_metrics": "Archive metrics against finished evaluations.",
}


def _archive_value(key: str, value: Any) -> Any:
    if key == "coverage" and isinstance(value, float):
        return f"{value:.1%}"
    return value


def _params_text(row: pd.Series, names: Sequence[str]) -> str:
    parts = []
    for n in names:
        v = row[f"params.{n}"]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue  # an inactive conditional parameter
        parts.append(f"{n}={v:.4g}" if isinstance(v, float) else f"{n}={v}")
    return ", ".join(parts)


def _short(df: pd.DataFrame, run: Run, limit: int) -> pd.DataFrame:
    """The columns a reader needs, named in words: trial, cell, the objectives, the measures, and
    the parameters as one wrapped ``key=value`` column (the data files have one column each)."""
    df = df.head(limit)
    out = pd.DataFrame(index=df.index)
    for c, label in (("pick", "pick"), ("number", "trial"), ("cell", "cell")):
        if c in df.columns:
            out[label] = df[c]
    for prefix in ("values.", "measures."):
        for c in df.columns:
            if c.startswith(prefix):
                out[c[len(prefix):]] = df[c]
    params = [c[len("params."):] for c in df.columns if c.startswith("params.")]
    if params:
        out["parameters"] = [_params_text(row, params) for _, row in df.iterrows()]
    return out


def _html_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p class='note'>(none)</p>"
    table = df.to_html(index=False, border=0, float_format=lambda v: f"{v:.5g}", na_rep="", escape=True)
    if "parameters" in df.columns and df.columns[-1] == "parameters":  # it wraps instead of widening the table
        rows = table.split("</tr>")
        table = "</tr>".join("<td class='params'>".join(r.rsplit("<td>", 1)) if "<td>" in r else r for r in rows)
    return table


def _kv_table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table class='kv'>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items()) or "-"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return "-" if v is None else str(v)


def report(run: Run, out: str | Path, *, pareto_rows: int = 50, elite_rows: int = 30, picks: int = 6) -> Path:
    """Write the report folder ``out``: ``index.html``, its PNGs, and the tables as CSV. Everything
    is referenced relatively, so the folder can be moved or zipped.

    Args:
        run: the run (``qd.explore.load_run``).
        out: the output folder (created if missing).
        pareto_rows: the most Pareto-set rows shown in the page.
        elite_rows: the most elite rows shown in the page.
        picks: how many spread-out rows (``Run.select``) the page lists.

    Returns:
        The path of ``index.html``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(run, out)
    data = export(run, out / "data", "csv")
    s = run.summary()
    info = run.store.info
    budget = run.store.attrs().get("budget")
    rows: list[tuple[str, Any]] = [
        ("problem", f"{info.problem} {_fmt(info.problem_options)}"), ("strategy", f"{info.strategy} "
                                                                                f"{_fmt(info.strategy_options)}"),
        ("seed", info.seed), ("budget", budget),
        ("evaluations", f"{s['n_complete']} complete, {s['n_failed']} failed, {s['n_running']} running, "
                        f"{s['n_stale']} stale"),
        ("objectives", ", ".join(f"{o['name']} ({o['direction'][:3]})" for o in s["objectives"])),
        ("measures", ", ".join(run.measures) or None),
    ]
    ok = run.trials[run.trials["feasible"]] if "feasible" in run.trials else run.trials.iloc[0:0]
    if len(run.objectives) == 1 and s.get("best"):
        rows.append((f"best {run.objectives[0]}", f"{s['best']['value']:.6g} (trial #{s['best']['number']})"))
    elif len(ok):
        best = [(ok[f"values.{n}"].min() if d == "minimize" else ok[f"values.{n}"].max())
                for n, d in zip(run.objectives, run.directions)]
        rows.append(("best value of each objective (not one trial)",
                     ", ".join(f"{n} = {b:.6g}" for n, b in zip(run.objectives, best))))
    if len(run.objectives) > 1:
        rows.append(("Pareto set", f"{len(run.pareto)} trials"))
    if s.get("hypervolume") is not None:
        ref = s["hypervolume_reference"]
        rows.append(("hypervolume (of the Pareto set of all feasible trials)",
                     f"{s['hypervolume']:.6g} (reference point {_fmt(ref['point'])}, from the {ref['source']})"))
    for key, value in (s.get("archive") or {}).items():
        rows.append((ARCHIVE_LABELS.get(key, key.replace("_", " ")), _archive_value(key, value)))

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>qd report: {html.escape(run.name)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>qd report: run <code>{html.escape(run.name)}</code></h1>",
             f"<p class='note'>Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} from "
             f"{html.escape(_storage_label(run.store))}.</p>",
             "<h2>Run</h2>", _kv_table(rows), "<h2>Figures</h2><div class='figures'>"]
    parts += [f"<figure><a href='{p.name}'><img src='{p.name}' alt='{p.stem}'></a>"
              f"<figcaption>{html.escape(CAPTIONS.get(p.stem, p.stem))}</figcaption></figure>" for p in figures]
    parts.append("</div>")
    if len(run.objectives) > 1:
        ordered = run.pareto.sort_values(f"values.{run.objectives[0]}") if len(run.pareto) else run.pareto
        parts += [f"<h2>Pareto set ({len(run.pareto)})</h2>", _html_table(_short(ordered, run, pareto_rows))]
        if len(run.pareto) > pareto_rows:
            parts.append(f"<p class='note'>First {pareto_rows} of {len(run.pareto)}; all in data/pareto.csv.</p>")
        if len(run.pareto) > 1:
            chosen = run.select(min(picks, len(run.pareto)), among="pareto")
            parts += [f"<h2>A spread-out subset of the Pareto set ({len(chosen)}, greedy hypervolume "
                      f"contribution)</h2>", _html_table(_short(chosen, run, picks))]
    if run.archive is not None:
        i = getattr(run.archive.spec, "objective_index", 0)
        name, direction = run.objectives[i], run.directions[i]
        elites = run.elites.sort_values(f"values.{name}", ascending=direction == "minimize") \
            if len(run.elites) else run.elites
        parts += [f"<h2>Elites ({len(run.elites)}; best {min(elite_rows, len(run.elites))} by {html.escape(name)})"
                  f"</h2>", _html_table(_short(elites, run, elite_rows))]
        if len(run.elites) > 1:
            chosen = run.select(min(picks, len(run.elites)), among="elites")
            parts += [f"<h2>A spread-out subset of the elites ({len(chosen)}, greedy max-min distance in measure "
                      f"space)</h2>", _html_table(_short(chosen, run, picks))]
    failures = pd.DataFrame(s["failures"])
    parts += [f"<h2>Failures ({len(failures)})</h2>", _html_table(failures.head(50))]
    parts.append("<h2>Data</h2><ul>" + "".join(f"<li><a href='data/{p.name}'>data/{p.name}</a></li>" for p in data)
                 + "</ul></body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts))
    return index


def _storage_label(store: Store) -> str:
    """The storage without credentials (a PostgreSQL URL may hold a password)."""
    url = str(getattr(store.study._storage, "url", "") or getattr(getattr(store.study._storage, "_backend", None),
                                                                   "url", "") or "")
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        url = f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url or "the run's storage"


def report_run(store: Store, problem: Problem | None, out: str | Path) -> Path:
    """``report`` for an open store."""
    return report(build_run(store, problem), out)


__all__ = ["EXPORT_FORMATS", "export", "report", "report_run", "write_figures", "write_table"]
