"""``qd compare``: several runs side by side, the comparison every benchmark user makes by hand.

- ``curves.png``: hypervolume against finished evaluations (several objectives; one reference point
  for all runs: the problem's, else one derived from all runs' trials together), or the best value
  so far (one objective), on shared axes;
- ``qd_metrics.png``: QD score (MOQD score) and coverage against evaluations, when the runs have maps;
- ``map_<run>.png``: each run's archive map on one colour scale (shared ``vmin``/``vmax``);
- a table of final figures (printed; ``Comparison.rows`` for ``--json``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qd.problem import Problem
from qd.results import Reference
from qd.store import Store, Trial


@dataclass
class Comparison:
    """The table rows (one dict per run) and the figures written."""

    rows: list[dict[str, Any]]
    figures: list[Path] = field(default_factory=list)
    reference: Reference | None = None
    names: tuple[str, ...] = ()
    limits: tuple[float | None, float | None] = (None, None)

    def table(self) -> str:
        """The text table ``qd compare`` prints: one row per run (finished, best, Pareto set size,
        hypervolume, coverage, QD scores where any run has them), then notes on the shared reference
        and colour limits."""
        from qd.text import num, pct, table

        keys = [k for k in ("finished", "best", "pareto", "hypervolume", "coverage", "qd_score", "moqd_score")
                if any(r.get(k) is not None for r in self.rows)]
        labels = {"qd_score": "QD score", "moqd_score": "MOQD score", "pareto": "Pareto set"}

        def cell(r: dict[str, Any], k: str) -> str:
            v = r.get(k)
            if v is None:
                return "-"
            if k == "coverage":
                return pct(v)
            if k == "best":
                return f"{num(v['value'])} (#{v['number']})"
            return num(v, 6) if k == "hypervolume" else num(v)

        body = [[r["name"], r["strategy"], *[cell(r, k) for k in keys]] for r in self.rows]
        text = table(body, ["run", "strategy", *[labels.get(k, k) for k in keys]],
                     [False, False, *[True] * len(keys)])
        notes = []
        if self.reference is not None:
            notes.append(f"hypervolume: of each run's Pareto set, {self.reference.caption(self.names)}, for all runs")
        if self.limits != (None, None):
            notes.append(f"maps share the colour limits {num(self.limits[0])} .. {num(self.limits[1])}")
        return "\n".join([text, *notes])


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _common_reference(problems: Sequence[Problem | None], trials: Sequence[Sequence[Trial]],
                      directions: Sequence[str]) -> Reference | None:
    """One reference for all runs: their problems' point and scaling when they agree, else raw
    units and a point from all runs' data."""
    from qd.results import reference_of

    known = [p for p in problems if p is not None]
    scalings = {p.scaling for p in known}
    scaling = scalings.pop() if len(known) == len(problems) and len(scalings) == 1 else None
    declared = {tuple(p.reference_point) if p.reference_point is not None else None for p in known}
    point = declared.pop() if len(known) == len(problems) and len(declared) == 1 else None
    values = [t.values for ts in trials for t in ts if t.feasible]
    return reference_of(np.array(values) if values else np.empty((0, len(directions))), directions, scaling, point)


def compare(storage: str, names: Sequence[str], out: str | Path, *, vmin: float | None = None,
            vmax: float | None = None) -> Comparison:
    """Compare runs ``names`` of ``storage``; write the figures into ``out``.

    Args:
        storage: an Optuna storage URL.
        names: two or more run names; their objectives must be the same (names and directions).
        out: output folder.
        vmin, vmax: the maps' colour limits (default: the lowest and highest cell of all runs).

    Returns:
        A ``Comparison`` (its ``table()`` is what ``qd compare`` prints).

    Raises:
        ValueError: fewer than two different names, or runs with different objectives.
        RunNotFound: a name that is not a run in ``storage``.
    """
    import matplotlib.pyplot as plt

    from qd.explore import run_archive
    from qd.figures import shared_limits
    from qd.metrics import history
    from qd.plots_archive import elite_heatmap_figure, moqd_heatmap_figure
    from qd.results import best_so_far, best_trial, hypervolume, hypervolume_history, pareto_trials
    from qd.session import problem_of

    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"compare: runs {list(names)!r} are not allowed; allowed: two or more different run names")
    stores = [Store.open(storage, n) for n in names]
    objectives = [(tuple(s.objective_names), tuple(s.directions)) for s in stores]
    if len(set(objectives)) != 1:
        raise ValueError("compare: the runs have different objectives: "
                         + "; ".join(f"{n}: {list(o[0])} {list(o[1])}" for n, o in zip(names, objectives))
                         + "; allowed: runs of the same objectives")
    obj_names, directions = list(objectives[0][0]), list(objectives[0][1])
    problems: list[Problem | None] = []
    for s in stores:
        try:
            problems.append(problem_of(s))
        except Exception:  # a plug-in missing here: no archive, a data-derived reference
            problems.append(None)
    trials = [s.trials() for s in stores]
    archives = [run_archive(s, p) for s, p in zip(stores, problems)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    comparison = Comparison(rows=[], names=tuple(obj_names))

    def save(fig: Any, name: str) -> None:
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        comparison.figures.append(out / name)

    # Curves on shared axes.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(directions) > 1:
        comparison.reference = _common_reference(problems, trials, directions)
        if comparison.reference is not None:
            for name, ts in zip(names, trials):
                counts, hvs = hypervolume_history(ts, directions, comparison.reference)
                ax.plot(counts, hvs, label=name)
            ax.set_ylabel(f"hypervolume\n({comparison.reference.caption(comparison.names)})", fontsize=8)
    else:
        for name, ts in zip(names, trials):
            counts, best = best_so_far(ts, directions[0])
            ax.plot(counts, best, label=name)
        ax.set_ylabel(f"best {obj_names[0]} so far ({directions[0][:3]})")
    ax.set_xlabel("finished evaluations")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("runs compared: " + ", ".join(names), fontsize=10)
    fig.tight_layout()
    save(fig, "curves.png")

    # Archive metrics on shared axes, maps on one colour scale.
    mapped = [(n, s, p, a, ts) for n, s, p, a, ts in zip(names, stores, problems, archives, trials) if a is not None]
    if mapped:
        pareto = any(a.kind == "pareto" for _, _, _, a, _ in mapped)
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        key = "moqd_score" if pareto else "qd_score"
        for n, s, p, a, ts in mapped:
            rows = history(s, p)
            x = [r["evaluations"] for r in rows]
            axes[0].plot(x, [r.get(key, r["qd_score"]) for r in rows], label=n)
            axes[1].plot(x, [r["coverage"] for r in rows], label=n)
        axes[0].set_ylabel("MOQD score" if pareto else "QD score")
        axes[1].set_ylabel("coverage")
        axes[1].yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
        for a in axes:
            a.set_xlabel("finished evaluations")
            a.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        save(fig, "qd_metrics.png")
        lo, hi = shared_limits([a for _, _, _, a, _ in mapped if not a.empty])
        comparison.limits = (lo if vmin is None else vmin, hi if vmax is None else vmax)
        for n, s, p, a, ts in mapped:
            if a.empty:
                continue
            draw = moqd_heatmap_figure if a.kind == "pareto" else elite_heatmap_figure
            title = f"{n}: {s.info.problem} / {s.info.strategy}"
            save(draw(a, p, title, vmin=comparison.limits[0], vmax=comparison.limits[1]), f"map_{_file_name(n)}.png")

    # The table.
    for n, s, p, a, ts in zip(names, stores, problems, archives, trials):
        row: dict[str, Any] = {"name": n, "problem": s.info.problem, "strategy": s.info.strategy,
                               "finished": sum(t.finished for t in ts)}
        if len(directions) == 1:
            b = best_trial(ts, directions[0])
            row["best"] = {"number": b.number, "value": b.values[0]} if b else None
        else:
            front = pareto_trials(ts, directions)
            row["pareto"] = len(front)
            row["hypervolume"] = (hypervolume(np.array([t.values for t in front]), directions, comparison.reference)
                                  if front and comparison.reference is not None else None)
        if a is not None:
            m = a.metrics()
            row.update(coverage=m["coverage"], qd_score=None if "moqd_score" in m else m["qd_score"],
                       moqd_score=m.get("moqd_score"))
        comparison.rows.append(row)
    return comparison


__all__ = ["Comparison", "compare"]
