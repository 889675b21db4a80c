"""The qd command end to end, in subprocesses, on a real SQLite file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

QD = [sys.executable, "-m", "qd.cli"]


def qd(*args, cwd, check=True):
    proc = subprocess.run([*QD, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"qd {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_run_show_plot_on_zdt1(tmp_path):
    url = f"sqlite:///{tmp_path}/r.db"
    out = qd("run", "--problem", "zdt1", "--strategy", "tpe", "--budget", "60", "--workers", "2",
             "--storage", url, "--name", "a", "--no-progress", cwd=tmp_path)
    assert "hypervolume:" in out.stdout and "Pareto set" in out.stdout
    shown = json.loads(qd("show", "--storage", url, "--name", "a", "--json", cwd=tmp_path).stdout)
    assert shown["name"] == "a" and shown["problem"] == "zdt1" and shown["strategy"] == "tpe"
    assert (shown["n_complete"], shown["n_failed"], shown["n_running"]) == (60, 0, 0)
    assert shown["pareto_front"] and all({"params", "values"} <= set(p) for p in shown["pareto_front"])
    assert shown["hypervolume"] > 0 and shown["hypervolume_reference"]["source"] == "problem"
    files = qd("plot", "--storage", url, "--name", "a", "--out", str(tmp_path / "plots"), cwd=tmp_path).stdout.split()
    names = {Path(f).name for f in files}
    assert {"pareto_front.png", "hypervolume.png"} <= names
    assert all(Path(f).stat().st_size > 10_000 for f in files)
    listed = json.loads(qd("show", "--storage", url, "--json", cwd=tmp_path).stdout)
    assert [(r["name"], r["problem"], r["strategy"], r["trials"]) for r in listed] == [("a", "zdt1", "tpe", 60)]


def test_experiment_file_with_flag_overrides(tmp_path):
    (tmp_path / "e.toml").write_text(
        '[run]\nname = "e"\nstorage = "sqlite:///e.db"\nbudget = 50\nevaluator = "inprocess"\n'
        '[problem]\nname = "zdt2"\n[problem.options]\ndim = 3\n[strategy]\nname = "random"\n')
    qd("run", "e.toml", "--budget", "7", "--no-progress", cwd=tmp_path)
    shown = json.loads(qd("show", "--storage", "sqlite:///e.db", "--name", "e", "--json", cwd=tmp_path).stdout)
    assert shown["n_complete"] == 7 and shown["problem_options"] == {"dim": 3}


@pytest.mark.parametrize("args, message", [
    (["--problem", "zdt1", "--budget", "0"], "budget = 0 is not allowed; allowed: an integer >= 1"),
    (["--problem", "nope"], "problem 'nope' is not registered; registered problems: ["),
    (["--problem", "zdt1", "--strategy", "annealing"], "strategy 'annealing' is not registered; registered strategies: ["),
    (["--problem", "zdt1", "-S", "n_startup=3", "--strategy", "tpe"], "unknown option(s) ['n_startup']"),
    (["--problem", "zdt1", "-P", "dims=3"], "unknown option(s) ['dims']; allowed options:"),
    (["--problem", "zdt1", "--evaluator", "gpu"], "evaluator 'gpu' is not registered; registered evaluators:"),
    (["--problem", "zdt1", "--storage", "r.db"], "storage = 'r.db' is not allowed; allowed: an Optuna storage URL"),
    (["bad.toml"], "[run] has unknown key(s) ['budgte']; allowed keys:"),
    (["badtype.toml"], "[run].workers = 'two' is not allowed; allowed: an integer"),
])
def test_bad_input_fails_before_any_evaluation(tmp_path, args, message):
    (tmp_path / "bad.toml").write_text('[run]\nbudgte = 5\n[problem]\nname = "zdt1"\n')
    (tmp_path / "badtype.toml").write_text('[run]\nworkers = "two"\n[problem]\nname = "zdt1"\n')
    proc = qd("run", *args, "--storage" if "--storage" not in args else "--name",
              f"sqlite:///{tmp_path}/x.db" if "--storage" not in args else "x", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "x.db").exists() or "qd.db" not in proc.stderr


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    url = f"sqlite:///{tmp_path}/r.db"
    qd("run", "--problem", "zdt1", "--budget", "3", "--storage", url, "--name", "a", "--evaluator", "inprocess",
       "--no-progress", cwd=tmp_path)
    proc = qd("run", "--problem", "zdt1", "--budget", "3", "--storage", url, "--name", "a", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "--resume" in proc.stderr
    more = qd("run", "--resume", "--budget", "5", "--storage", url, "--name", "a", "--evaluator", "inprocess",
              "--no-progress", cwd=tmp_path)
    assert "5 complete" in more.stdout


def test_problems_lists_the_benchmarks():
    listed = {p["name"]: p for p in json.loads(qd("problems", "--json", cwd=".").stdout)}
    assert {"zdt1", "zdt2", "zdt3", "dtlz2", "branin-currin"} <= set(listed)
    assert listed["zdt1"]["objectives"][0] == {"name": "f1", "direction": "minimize", "cheap": False}
