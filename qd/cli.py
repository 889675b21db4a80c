"""The ``qd`` command: ``problems``, ``run``, ``show``, ``plot``, ``dashboard``, ``report``, ``export``, ``new-problem``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

from qd.experiment import DEFAULT_STORAGE, Experiment, ExperimentError, load


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_problems(args: argparse.Namespace) -> int:
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


def cmd_run(args: argparse.Namespace) -> int:
    from qd.results import summary
    from qd.session import execute, prepare

    exp = _experiment_from_args(args)
    prepared = prepare(exp)
    report = execute(prepared)
    result = summary(prepared.store, prepared.problem)
    print(f"run {result['name']!r}: {report.complete} complete, {report.failed} failed "
          f"in {report.elapsed_s:.1f} s (stopped by {report.stopped_by}; {report.requeued} re-queued)")
    _print_summary(result)
    return 0


def _print_summary(result: dict[str, Any]) -> None:
    names = [o["name"] for o in result["objectives"]]
    print(f"Pareto set ({len(result['pareto_front'])} of {result['n_complete']} complete):")
    for row in sorted(result["pareto_front"], key=lambda r: r["values"])[:20]:
        vals = ", ".join(f"{n}={v:.4g}" for n, v in zip(names, row["values"]))
        print(f"  #{row['number']:<5} {vals}   {row['params']}")
    if len(result["pareto_front"]) > 20:
        print(f"  ... {len(result['pareto_front']) - 20} more (qd show --json lists all)")
    if result["hypervolume"] is not None:
        ref = result["hypervolume_reference"]
        print(f"hypervolume: {result['hypervolume']:.6g} (reference point {ref['point']}, from the {ref['source']})")
    for key, value in result.get("archive", {}).items():
        print(f"archive {key}: {value}")


def _open(args: argparse.Namespace):
    from qd.store import Store

    return Store.open(args.storage, args.name)


def cmd_show(args: argparse.Namespace) -> int:
    from qd.results import summary
    from qd.session import problem_of
    from qd.storage_url import mask
    from qd.store import Store

    if not args.name:
        names = Store.run_names(args.storage)
        _print_json(names) if args.json else print("\n".join(names) or f"no runs in {mask(args.storage)}")
        return 0
    store = _open(args)
    result = summary(store, problem_of(store))
    if args.json:
        _print_json(result)
    else:
        print(f"run {result['name']!r}: problem {result['problem']} {result['problem_options']}, "
              f"strategy {result['strategy']}, seed {result['seed']}")
        print(f"{result['n_complete']} complete, {result['n_failed']} failed, {result['n_running']} running, "
              f"{result['n_stale']} stale")
        _print_summary(result)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from qd.plots import plot_run
    from qd.session import problem_of

    store = _open(args)
    for path in plot_run(store, problem_of(store), args.out):
        print(path)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from qd.dashboard import serve

    try:
        serve(args.storage, host=args.host, port=args.port, names=[args.name] if args.name else None,
              update=not args.no_update, allow_writes=args.allow_writes, allow_hosts=args.allow_host or ())
    except ValueError as e:  # a port in use or out of range
        raise ExperimentError(str(e)) from None
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from qd.explore import load_run
    from qd.report import report

    print(report(load_run(args.storage, args.name), args.out))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from qd.explore import load_run
    from qd.report import export

    for path in export(load_run(args.storage, args.name), args.out, args.format):
        print(path)
    return 0


def _add_user_surfaces(sub: argparse._SubParsersAction) -> None:
    """``dashboard``, ``report`` and ``export`` (qd.dashboard, qd.report; imported only when run,
    so building the parser stays cheap: the port and formats are repeated here)."""

    p = sub.add_parser("dashboard", help="start optuna-dashboard on localhost, with qd's figures and notes")
    p.add_argument("--storage", default=DEFAULT_STORAGE)
    p.add_argument("--name", help="only this run (default: every run in the storage)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--no-update", action="store_true", help="do not refresh finished runs' figures first")
    p.add_argument("--allow-writes", action="store_true",
                   help="let the dashboard delete studies, write notes and tell trials, with the token it prints "
                        "(default: read-only)")
    p.add_argument("--allow-host", action="append", metavar="NAME",
                   help="also answer requests for this host name (a proxy's or a DNS name; default: this machine's)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("report", help="write a self-contained report folder (HTML, PNG, CSV)")
    p.add_argument("--storage", default=DEFAULT_STORAGE)
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write trials, elites and the Pareto set as tables")
    p.add_argument("--storage", default=DEFAULT_STORAGE)
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=("csv", "parquet", "json"), default="csv")
    p.set_defaults(func=cmd_export)


def cmd_new_problem(args: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qd", description="Quality-diversity and multi-objective search over "
                                     "ML configuration spaces. Every evaluation is an Optuna trial.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("problems", help="list the registered problems")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_problems)

    p = sub.add_parser("run", help="run (or resume) an experiment")
    p.add_argument("experiment", nargs="?", help="experiment TOML file (flags override its values)")
    p.add_argument("--problem")
    p.add_argument("--strategy")
    p.add_argument("--budget", type=int, help="finished evaluations to reach")
    p.add_argument("--workers", type=int, help="evaluations in flight")
    p.add_argument("--evaluator", help="inprocess | process | ray")
    p.add_argument("--storage", help=f"Optuna storage URL (default {DEFAULT_STORAGE})")
    p.add_argument("--name", help="run (study) name")
    p.add_argument("--seed", type=int)
    p.add_argument("--time-limit", type=float, help="wall-time limit in seconds")
    p.add_argument("--timeout", type=float, help="per-evaluation timeout in seconds")
    p.add_argument("--resume", action="store_true", help="continue the named run from its storage")
    p.add_argument("--ray-address", help="join this Ray cluster (ray evaluator)")
    p.add_argument("--problem-option", "-P", action="append", metavar="KEY=VALUE")
    p.add_argument("--strategy-option", "-S", action="append", metavar="KEY=VALUE")
    p.add_argument("--evaluator-option", "-E", action="append", metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_run)

    for name, func, help_text in (("show", cmd_show, "summarise a run (or list runs without --name)"),
                                  ("plot", cmd_plot, "write a run's figures as PNG")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--storage", default=DEFAULT_STORAGE)
        p.add_argument("--name", required=(name == "plot"))
        if name == "show":
            p.add_argument("--json", action="store_true")
        else:
            p.add_argument("--out", default="plots", help="output folder")
        p.set_defaults(func=func)
    _add_user_surfaces(sub)
    _add_new_problem(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from qd.stopping import exit_status, stop_signal
    from qd.storage_url import mask_text

    args = build_parser().parse_args(argv)
    urls = [getattr(args, "storage", None) or ""]
    try:
        return args.func(args)
    except ExperimentError as e:
        print(mask_text(f"qd: error: {e}", urls), file=sys.stderr)
        return 2
    except (LookupError, ValueError) as e:  # a run, problem or option that does not exist
        print(mask_text(f"qd: error: {e.args[0] if e.args else e}", urls), file=sys.stderr)
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
