"""The ``qd`` command: ``problems``, ``strategies``, ``run``, ``show``, ``plot``, ``compare``,
``dashboard``, ``report``, ``export``, ``new-problem``.

Each subcommand has its ``cmd_*`` function and its parser section in ``build_parser``; text
formatting of results lives in ``qd.text``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import re
import sys
from typing import Any

from qd.experiment import DEFAULT_STORAGE, Experiment, ExperimentError, load


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _existing_storage(storage: str) -> str:
    """Readers (show, plot, compare, report, export, dashboard) never create a database: a missing
    one is an error (``qd.storage_url.check_storage``), not a new empty store."""
    from qd.storage_url import check_storage

    check_storage(storage, create=False)
    return storage


def cmd_problems(args: argparse.Namespace) -> int:
    """``qd problems``: list the registered problems (``--json``: their full descriptions)."""
    from qd.registry import list_problems

    problems = list_problems()
    if args.json:
        _print_json(problems)
        return 0
    for p in problems:
        if "error" in p:
            print(f"{p['name']:<15} (fails to load: {p['error']})")
            continue
        objs = ", ".join(f"{o['name']} ({o['direction'][:3]}{', cheap' if o['cheap'] else ''})" for o in p["objectives"])
        meas = ", ".join(m["name"] for m in p["measures"]) or "-"
        print(f"{p['name']:<15} {p['doc']}")
        print(f"{'':<15} {len(p['space'])} params; objectives: {objs}; measures: {meas}")
    return 0


# --- qd strategies -------------------------------------------------------------------------------
def cmd_strategies(args: argparse.Namespace) -> int:
    """``qd strategies``: list the strategies with their options and defaults."""
    from qd.strategies import describe_strategies
    from qd.text import strategies_text

    described = describe_strategies()
    if args.json:
        _print_json(described)
    else:
        print(strategies_text(described))
    return 0


# --- qd run ------------------------------------------------------------------------------------
def _experiment_from_args(args: argparse.Namespace) -> Experiment:
    if args.experiment:
        exp = load(args.experiment)
    else:
        if not args.problem and not args.resume:
            raise ExperimentError("give an experiment file or --problem NAME (see `qd problems`)")
        exp = Experiment(problem=args.problem or "", given=frozenset())
    overrides = {"problem": args.problem, "strategy": args.strategy, "budget": args.budget, "workers": args.workers,
                 "evaluator": args.evaluator, "storage": args.storage, "name": args.name, "seed": args.seed,
                 "time_limit_s": args.time_limit, "timeout_s": args.timeout, "resume": args.resume or None,
                 "progress": False if args.no_progress else None}
    for flag, attr in (("problem_option", "problem_options"), ("strategy_option", "strategy_options"),
                       ("evaluator_option", "evaluator_options")):
        if getattr(args, flag):
            overrides[attr] = {**getattr(exp, attr), **_parse_options(getattr(args, flag), flag)}
    if args.ray_address:
        overrides["evaluator_options"] = {**overrides.get("evaluator_options", exp.evaluator_options),
                                          "address": args.ray_address}
    return exp.with_overrides(**overrides)


def _parse_options(items: list[str], flag: str) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ExperimentError(f"--{flag.replace('_', '-')} {item!r} is not allowed; allowed: KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _prepare_leaving_nothing(exp: Experiment, prepare: Any) -> Any:
    """``prepare(exp)``; when it fails, a SQLite file it created on the way is removed again, so a
    run refused for bad input leaves no empty store behind."""
    from pathlib import Path

    from qd.text import missing_sqlite_file

    created = missing_sqlite_file(exp.storage)
    try:
        return prepare(exp)
    except BaseException:
        if created is not None:
            for path in (created, Path(f"{created}-wal"), Path(f"{created}-shm"), Path(f"{created}-journal")):
                path.unlink(missing_ok=True)
        raise


def cmd_run(args: argparse.Namespace) -> int:
    """``qd run``: check and prepare the experiment, run it, print its summary."""
    from qd.results import summary
    from qd.session import execute, prepare
    from qd.text import summary_text, warmup_warning

    exp = _experiment_from_args(args)
    prepared = _prepare_leaving_nothing(exp, prepare)
    warning = warmup_warning(prepared.strategy, prepared.experiment.strategy, prepared.experiment.budget)
    if warning:
        print(f"qd: warning: {warning}", file=sys.stderr)
    report = execute(prepared)
    result = summary(prepared.store, prepared.problem)
    print(f"run {result['name']!r}: {report.complete} complete, {report.failed} failed "
          f"in {report.elapsed_s:.1f} s (stopped by {report.stopped_by}; {report.requeued} re-queued)")
    print(summary_text(result, header=False))
    return 0


# --- qd show -----------------------------------------------------------------------------------
def _open(args: argparse.Namespace):
    from qd.store import Store

    return Store.open(_existing_storage(args.storage), args.name)


def cmd_show(args: argparse.Namespace) -> int:
    """``qd show``: the runs of a storage, or one run's summary (``--json``: as data)."""
    from qd.results import summary
    from qd.session import problem_of
    from qd.storage_url import mask
    from qd.text import run_rows, runs_table, summary_text

    if not args.name:
        rows = run_rows(_existing_storage(args.storage))
        _print_json(rows) if args.json else print(runs_table(rows) if rows else f"no runs in {mask(args.storage)}")
        return 0
    store = _open(args)
    result = summary(store, problem_of(store))
    if args.json:
        _print_json(result)
    else:
        print(summary_text(result, budget=store.attrs().get("budget")))
    return 0


# --- qd plot / qd compare ------------------------------------------------------------------------
def cmd_plot(args: argparse.Namespace) -> int:
    """``qd plot``: write a run's figures and print their paths."""
    from qd.plots import plot_run
    from qd.session import problem_of

    store = _open(args)
    for path in plot_run(store, problem_of(store), args.out, vmin=args.vmin, vmax=args.vmax):
        print(path)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """``qd compare``: a table of several runs and their side-by-side figures."""
    from qd.compare import compare

    comparison = compare(_existing_storage(args.storage), args.runs, args.out, vmin=args.vmin, vmax=args.vmax)
    if args.json:
        _print_json(comparison.rows)
    else:
        print(comparison.table())
        for path in comparison.figures:
            print(path)
    return 0


# --- qd dashboard / report / export --------------------------------------------------------------


def cmd_dashboard(args: argparse.Namespace) -> int:
    """``qd dashboard``: serve optuna-dashboard on the storage (read-only unless ``--allow-writes``)."""
    from qd.dashboard import serve

    try:
        serve(_existing_storage(args.storage), host=args.host, port=args.port, names=[args.name] if args.name else None,
              update=not args.no_update, allow_writes=args.allow_writes, allow_hosts=args.allow_host or ())
    except ValueError as e:  # a port in use or out of range
        raise ExperimentError(str(e)) from None
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``qd report``: write a run's report and print its path."""
    from qd.explore import load_run
    from qd.report import report

    print(report(load_run(_existing_storage(args.storage), args.name), args.out))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``qd export``: write a run's trials in the chosen format and print the paths."""
    from qd.explore import load_run
    from qd.report import export

    for path in export(load_run(_existing_storage(args.storage), args.name), args.out, args.format):
        print(path)
    return 0


def _add_user_surfaces(sub: argparse._SubParsersAction) -> None:
    """``dashboard``, ``report`` and ``export`` (qd.dashboard, qd.report; imported only when run,
    so building the parser stays cheap: the port and formats are repeated here)."""

    p = sub.add_parser("dashboard", help="start optuna-dashboard on localhost, with qd's figures and notes")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"Optuna storage URL (default {DEFAULT_STORAGE})")
    p.add_argument("--name", help="only this run (default: every run in the storage)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--no-update", action="store_true", help="do not refresh finished runs' figures first")
    p.add_argument("--allow-writes", action="store_true",
                   help="let the dashboard delete studies, write notes and tell trials, with the token it prints "
                        "(default: read-only)")
    p.add_argument("--allow-host", action="append", metavar="NAME",
                   help="also answer requests for this host name (a proxy's or a DNS name; default: this machine's)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("report", help="write a self-contained report folder (HTML, PNG, CSV)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"Optuna storage URL (default {DEFAULT_STORAGE})")
    p.add_argument("--name", required=True, help="run (study) name")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write trials, elites and the Pareto set as tables")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"Optuna storage URL (default {DEFAULT_STORAGE})")
    p.add_argument("--name", required=True, help="run (study) name")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=("csv", "parquet", "json"), default="csv", help="table format (default csv)")
    p.set_defaults(func=cmd_export)


def cmd_new_problem(args: argparse.Namespace) -> int:
    """``qd new-problem``: write a plug-in package for a new problem and say how to install it."""
    from qd.scaffold import write_plugin

    for path in write_plugin(args.name, args.dir):
        print(path)
    print(f"next: pip install -e {args.dir.rstrip('/')}/{args.name} && qd problems")
    return 0


def _add_new_problem(sub: argparse._SubParsersAction) -> None:
    """``new-problem`` (qd.scaffold): write a plug-in package for a new problem."""
    p = sub.add_parser("new-problem", help="write a plug-in package (pyproject entry point, problem class, test)")
    p.add_argument("name", help="problem name, e.g. my-problem (the package is qd_my_problem)")
    p.add_argument("--dir", default=".", help="parent folder of the package (default: here)")
    p.set_defaults(func=cmd_new_problem)


def _names_epilog() -> str:
    """``qd run --help``'s list of what can be named (names only: nothing is imported)."""
    import textwrap

    from evaluators import EVALUATORS
    from qd.registry import problem_names
    from qd.strategies import strategy_names

    lines = []
    for label, names, more in (("problems", problem_names(), "qd problems"),
                               ("strategies", strategy_names(), "qd strategies"),
                               ("evaluators", sorted(EVALUATORS), None)):
        text = f"{label}: {', '.join(names)}" + (f" (details: `{more}`)" if more else "")
        lines.append(textwrap.fill(text, 100, subsequent_indent="  "))
    return "\n".join(lines)


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run (or resume) an experiment", epilog=_names_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run an experiment file, or one given by flags; flags override the file's values.")
    p.add_argument("experiment", nargs="?", help="experiment TOML file (flags override its values)")
    p.add_argument("--problem", help="problem name (see the list below and `qd problems`)")
    p.add_argument("--strategy", help="strategy name (default random; see `qd strategies`)")
    p.add_argument("--budget", type=int, help="finished evaluations to reach (the run's total, also on --resume)")
    p.add_argument("--workers", type=int, help="evaluations in flight (default 1)")
    p.add_argument("--evaluator", help="where evaluations run: inprocess | process | ray")
    p.add_argument("--storage", help=f"Optuna storage URL (default {DEFAULT_STORAGE})")
    p.add_argument("--name", help="run (study) name (default: made from problem, strategy and seed)")
    p.add_argument("--seed", type=int, help="the run's seed (default 0)")
    p.add_argument("--time-limit", type=float, help="wall-time limit in seconds; running evaluations are re-queued")
    p.add_argument("--timeout", type=float, help="per-evaluation timeout in seconds (a timed-out one fails)")
    p.add_argument("--resume", action="store_true",
                   help="continue the named run from its storage (or start it if absent). Kept as recorded: the "
                        "problem, the strategy, their options and the seed. May change: --budget (a new total), "
                        "--workers, --evaluator and its options, --time-limit, --timeout")
    p.add_argument("--ray-address", help="join this Ray cluster (ray evaluator)")
    p.add_argument("--problem-option", "-P", action="append", metavar="KEY=VALUE",
                   help="a problem option (value as JSON, else a string); repeatable")
    p.add_argument("--strategy-option", "-S", action="append", metavar="KEY=VALUE",
                   help="a strategy option (see `qd strategies`); repeatable")
    p.add_argument("--evaluator-option", "-E", action="append", metavar="KEY=VALUE",
                   help="an evaluator option; repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.set_defaults(func=cmd_run)


def _add_show_plot_compare(sub: argparse._SubParsersAction) -> None:
    storage_help = f"Optuna storage URL (default {DEFAULT_STORAGE})"
    p = sub.add_parser("show", help="summarise a run (or list the runs as a table without --name)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=storage_help)
    p.add_argument("--name", help="run (study) name; without it, a table of every run in the storage")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("plot", help="write a run's figures as PNG")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=storage_help)
    p.add_argument("--name", required=True, help="run (study) name")
    p.add_argument("--out", default="plots", help="output folder (default plots)")
    p.add_argument("--vmin", type=float, help="the map's lower colour limit (objective units; default: its own)")
    p.add_argument("--vmax", type=float, help="the map's upper colour limit (objective units; default: its own)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("compare", help="compare runs: curves on shared axes, maps on one colour scale, a table")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run (study) names, two or more")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=storage_help)
    p.add_argument("--out", default="compare", help="output folder for the figures (default compare)")
    p.add_argument("--vmin", type=float, help="lower colour limit of the maps (default: the lowest of all runs)")
    p.add_argument("--vmax", type=float, help="upper colour limit of the maps (default: the highest of all runs)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    """The ``qd`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="qd", description="Quality-diversity and multi-objective search over "
                                     "ML configuration spaces. Every evaluation is an Optuna trial.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("problems", help="list the registered problems")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_problems)

    p = sub.add_parser("strategies", help="list the strategies with their options and defaults")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_strategies)

    _add_run(sub)
    _add_show_plot_compare(sub)
    _add_user_surfaces(sub)
    _add_new_problem(sub)
    return parser


def _tidy(message: str) -> str:
    """"strategy: strategy 'x' ..." -> "strategy 'x' ...": the context prefix says nothing new."""
    return re.sub(r"^(problem|strategy|evaluator): (?=\1\b)", "", message)


def main(argv: list[str] | None = None) -> int:
    """Run the ``qd`` command line.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, 2 for bad input (one ``qd: error:`` line, no traceback), 141 for a
        closed pipe, or 128 + the signal's number when interrupted.
    """
    from qd.stopping import exit_status, stop_signal
    from qd.storage_url import mask_text

    args = build_parser().parse_args(argv)
    urls = [getattr(args, "storage", None) or ""]
    try:
        return args.func(args)
    except ExperimentError as e:
        print(mask_text(f"qd: error: {_tidy(str(e))}", urls), file=sys.stderr)
        return 2
    except (LookupError, ValueError) as e:  # a run, problem or option that does not exist
        print(mask_text(f"qd: error: {_tidy(str(e.args[0] if e.args else e))}", urls), file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output was piped into a command that stopped reading (`| head`)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the interpreter's final flush does not fail too
        return 141
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP during a run (qd.stopping)
        how = f" ({signal.Signals(stop_signal(e)).name})"
        resume = " resume with --resume" if args.command == "run" else ""
        print(f"qd: interrupted{how};{resume}".rstrip(";"), file=sys.stderr)
        return exit_status(e)


if __name__ == "__main__":
    sys.exit(main())
