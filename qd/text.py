"""Results as text a person reads at a glance (``qd show``, ``qd run``, ``qd strategies``, ``qd compare``).

Numbers get 4 significant digits (whole numbers stay whole), shares are percentages, parameters
are ``key=value`` cut to the terminal width (``--json`` has everything in full), the strategy's
settings are kept apart from the results, and every hypervolume says what it is the volume of.
"""

from __future__ import annotations

import math
import shutil
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qd.problem import sign_of

#: Rows of a Pareto set printed before "... more".
MAX_ROWS = 20


def num(v: Any, digits: int = 4) -> str:
    """A number for reading: whole numbers in full (``103373``), others to ``digits`` significant digits."""
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v.is_integer() and abs(v) < 1e9:
            return str(int(v))
        return f"{v:.{digits}g}"
    return str(v)


def pct(v: float) -> str:
    """A fraction as a percentage with one decimal (``0.253`` -> ``"25.3%"``)."""
    return f"{100 * v:.1f}%"


def kv(mapping: Mapping[str, Any]) -> str:
    """``a=1 b=0.25 c=adam`` (numbers through ``num``)."""
    return " ".join(f"{k}={num(v) if isinstance(v, (int, float)) else v}" for k, v in mapping.items())


def width() -> int:
    """The terminal's width in columns (at least 60)."""
    return max(60, shutil.get_terminal_size((100, 24)).columns)


def cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in an ellipsis when cut."""
    return text if len(text) <= limit else text[: max(1, limit - 1)] + "…"


def table(rows: Sequence[Sequence[str]], header: Sequence[str], right: Sequence[bool] | None = None,
          indent: str = "", last_free: bool = False) -> str:
    """An aligned text table; with ``last_free`` the last column is cut to the terminal width."""
    right = list(right) if right is not None else [False] * len(header)
    cols = [[h, *[r[i] for r in rows]] for i, h in enumerate(header)]
    widths = [max(len(c) for c in col) for col in cols]
    out = []
    for row in [list(header), *[list(r) for r in rows]]:
        cells = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        line = indent + "  ".join(cells[:-1] + [row[-1]] if last_free else cells).rstrip()
        out.append(cut(line, width()) if last_free else line)
    return "\n".join(out)


# --- qd show / qd run ---------------------------------------------------------------------------
def _ref_text(ref: Mapping[str, Any]) -> str:
    point = "(" + ", ".join(num(v) for v in ref["point"]) + ")"
    source = {"problem": "declared by the problem", "data": "from the data: 10% beyond the worst values seen",
              "option": "the strategy's option",
              "bounds": "the worst corner of the objectives' bounds (1 = the whole box)"}.get(ref["source"], ref["source"])
    text = f"reference point {point}, {source}"
    scaled = ref.get("scaling") or {}
    if scaled:
        text += "; measured in " + ", ".join(_scaled_name(n, s) for n, s in scaled.items())
    return text


def _scaled_name(name: str, entry: Mapping[str, Any]) -> str:
    from qd.scaling import Scaling

    one = Scaling((entry["scale"],), (tuple(entry["bounds"]) if entry.get("bounds") else None,))
    return one.label(0, name)


def summary_text(result: Mapping[str, Any], *, header: bool = True, budget: int | None = None) -> str:
    """``qd show``'s text for ``qd.results.summary``'s dict."""
    lines: list[str] = []
    names = [o["name"] for o in result["objectives"]]
    directions = [o["direction"] for o in result["objectives"]]
    if header:
        opts = f" ({kv(result['problem_options'])})" if result.get("problem_options") else ""
        lines.append(f"run {result['name']!r}: problem {result['problem']}{opts}, strategy {result['strategy']}, "
                     f"seed {result['seed']}")
        if result.get("strategy_options"):
            lines.append(f"  strategy settings: {kv(result['strategy_options'])}")
        total = f" of a budget of {budget}" if budget else ""
        lines.append(f"evaluations: {result['n_complete']} complete, {result['n_failed']} failed, "
                     f"{result['n_running']} running, {result['n_stale']} stale (re-queued){total}")
    objectives = ", ".join(f"{n} ({d[:3]})" for n, d in zip(names, directions))
    if len(names) == 1:
        best = result.get("best")
        if best is None:
            lines.append(f"best {names[0]}: none yet (no feasible evaluation)")
        else:
            lines.append(f"best {names[0]} ({directions[0][:3]}): {num(best['value'])} (trial #{best['number']})")
            lines.append(cut(f"  parameters: {kv(best['params'])}", width()))
    else:
        front = sorted(result["pareto_front"], key=lambda r: r["values"])
        lines.append(f"Pareto set: {len(front)} of {result['n_complete']} complete trials; objectives {objectives}")
        rows = [[f"#{r['number']}", *[num(v) for v in r["values"]], kv(r["params"])] for r in front[:MAX_ROWS]]
        if rows:
            lines.append(table(rows, ["trial", *names, "parameters"], [True] * (len(names) + 1) + [False],
                               indent="  ", last_free=True))
        if len(front) > MAX_ROWS:
            lines.append(f"  ... {len(front) - MAX_ROWS} more (qd show --json lists all)")
        if result.get("hypervolume") is not None:
            lines.append(f"hypervolume: {num(result['hypervolume'], 6)} (of the Pareto set of all feasible trials; "
                         f"{_ref_text(result['hypervolume_reference'])})")
    archive = result.get("archive")
    if archive:
        lines.extend(archive_text(archive, result.get("measures") or []))
    failures = result.get("failures") or []
    if failures:
        lines.append(f"failures: {len(failures)}, e.g. #{failures[0]['number']}: {cut(failures[0]['reason'], 80)}")
    return "\n".join(lines)


def archive_text(archive: Mapping[str, Any], measure_names: Sequence[str] = ()) -> list[str]:
    """The archive lines of ``qd show``: what the map is, then its figures."""
    kind = archive.get("kind", "archive")
    shape = " x ".join(str(b) for b in archive["bins"]) + " bins" if archive.get("bins") else \
        f"{archive.get('cells')} cells"
    what = f"archive: {kind}, {shape}"
    if archive.get("objective"):
        what += f", objective {archive['objective']} ({archive.get('direction', '')[:3]})"
    lines = [what]
    elites = archive.get("num_elites")
    cells = archive.get("cells")
    figures = f"coverage {pct(archive['coverage'])}"
    if elites is not None:
        figures += f" ({elites} {'front members' if 'moqd_score' in archive else 'elites'}"
        figures += f" in {cells} cells)" if cells else ")"
    if "moqd_score" in archive:
        figures += f", MOQD score {num(archive['moqd_score'])}"
    else:
        figures += f", QD score {num(archive['qd_score'])} (offset {num(archive.get('qd_score_offset', 0.0))})"
        if archive.get("best") is not None:
            figures += f", best {num(archive['best'])}"
    lines.append("  " + figures)
    if "global_hypervolume" in archive:
        lines.append(f"  global hypervolume {num(archive['global_hypervolume'], 6)}: of the archive's fronts (each cell "
                     f"keeps at most {archive.get('front_size')} points), reference point "
                     f"({', '.join(num(v) for v in archive.get('reference_point', []))}); it can be below the run's "
                     f"hypervolume above, which counts every feasible trial")
    return lines


# --- qd show without a name: the runs table -------------------------------------------------------
def missing_sqlite_file(storage: str) -> Path | None:
    """The file a ``sqlite:///`` URL names when it does not exist (None: exists, or not a SQLite file)."""
    if not storage.startswith("sqlite:///"):
        return None
    path = storage[len("sqlite:///"):].split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return None if Path(path).exists() else Path(path)


def run_rows(storage: str) -> list[dict[str, Any]]:
    """One dict per study in ``storage``: name, problem, strategy, trials, budget, state, best."""
    import numpy as np

    from qd.results import pareto_front_mask
    from qd.store import RunNotFound, Store

    rows = []
    for name in Store.run_names(storage):
        try:
            store = Store.open(storage, name)
        except RunNotFound:
            rows.append({"name": name, "problem": None, "strategy": None, "trials": None, "budget": None,
                         "state": "not a qd run", "best": None})
            continue
        cols = store.columns()
        directions, names = list(store.directions), list(store.objective_names)
        finished = int(cols.finished.sum())
        budget = store.attrs().get("budget")
        if (cols.state == 0).any():
            state = "running"
        elif budget is not None and finished >= budget:
            state = "finished"
        elif budget is not None:
            state = "stopped"  # short of its budget: `qd run --resume` continues it
        else:
            state = "not running" if len(cols) else "empty"
        ok = np.flatnonzero(cols.feasible)
        best = None
        if len(ok) and len(directions) == 1:
            sign = sign_of(directions[0])
            i = ok[np.lexsort((cols.number[ok], sign * cols.values[ok, 0]))[0]]
            best = f"{names[0]}={num(float(cols.values[i, 0]))} (#{int(cols.number[i])})"
        elif len(ok):
            best = f"Pareto set of {int(pareto_front_mask(cols.values[ok], directions).sum())}"
        rows.append({"name": name, "problem": store.info.problem, "strategy": store.info.strategy,
                     "trials": finished, "budget": budget, "state": state, "best": best})
    return rows


def runs_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """``qd show``'s table of runs, like ``optuna studies``."""
    body = [[r["name"], r["problem"] or "-", r["strategy"] or "-",
             "-" if r["trials"] is None else f"{r['trials']}" + (f"/{r['budget']}" if r["budget"] else ""),
             r["state"], r["best"] or "-"] for r in rows]
    return table(body, ["name", "problem", "strategy", "finished", "state", "best"],
                 [False, False, False, True, False, False], last_free=True)


# --- qd strategies ----------------------------------------------------------------------------------
def strategies_text(described: Sequence[Mapping[str, Any]]) -> str:
    """``qd strategies``'s text for ``describe_strategies``'s list: each strategy's description and
    options with their defaults."""
    out = []
    for d in described:
        if "error" in d:
            out.append(f"{d['name']:<11} (fails to load: {d['error']})")
            continue
        pad = " " * 12
        out.append(textwrap.fill(d["description"], width(), initial_indent=f"{d['name']:<11} ",
                                 subsequent_indent=pad))
        if d["options"]:
            listed = ", ".join(f"{o['name']}={o['default']!r}" if o["default"] is not None else o["name"]
                               for o in d["options"])
            out.append(textwrap.fill(f"options: {listed}", width(), initial_indent=pad, subsequent_indent=pad + "  "))
        elif d.get("accepts_any_option"):
            out.append(pad + "options: any")
    return "\n".join(out)


def warmup_warning(strategy: Any, name: str, budget: int) -> str | None:
    """A warning when the strategy's initial evaluations (not chosen by learning) take half or more
    of the budget: the run would say little about the strategy."""
    from qd.strategies import warmup

    found = warmup(strategy)
    if found is None:
        return None
    option, n = found
    if 2 * n <= budget:
        return None
    left = max(0, budget - n)
    return (f"budget {budget} leaves {left} evaluation(s) after the {n} initial ones of strategy {name} "
            f"({option}={n}), so the run says little about the strategy; raise --budget or lower them with "
            f"-S {option}=N")


__all__ = ["archive_text", "kv", "num", "pct", "run_rows", "runs_table", "strategies_text", "summary_text", "table",
           "warmup_warning"]
