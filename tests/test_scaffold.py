"""`qd new-problem NAME`: the package it writes installs, registers its entry point, and is listed by
`qd problems`; its own tests pass once installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qd.scaffold import module_name, write_plugin

ROOT = Path(__file__).resolve().parent.parent


def test_names_map_to_a_module_and_a_class_and_bad_names_are_refused(tmp_path):
    assert module_name("intent-oos") == ("qd_intent_oos", "IntentOosProblem")
    assert module_name("my-problem") == ("qd_my_problem", "MyProblem")
    for bad in ("My_Problem", "1st", "a--b", "", "-x"):
        with pytest.raises(ValueError, match="new-problem NAME"):
            module_name(bad)
    write_plugin("taken", tmp_path)
    with pytest.raises(ValueError, match="exists and is not empty"):
        write_plugin("taken", tmp_path)


def test_scaffold_installs_and_qd_problems_lists_it(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    made = subprocess.run([sys.executable, "-m", "qd.cli", "new-problem", "intent-oos", "--dir", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    package = tmp_path / "intent-oos"
    assert "pip install -e" in made.stdout and (package / "pyproject.toml").is_file()

    # Install it (with its entry-point metadata) into a separate target folder: the environment's
    # own packages stay untouched.
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                                "--no-index", "--target", str(site), str(package)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    points = next(site.glob("qd_intent_oos-*.dist-info")) / "entry_points.txt"
    assert "[qd.problems]" in points.read_text() and "intent-oos = qd_intent_oos.problem:IntentOosProblem" in points.read_text()

    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    listed = subprocess.run([sys.executable, "-m", "qd.cli", "problems", "--json"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    described = {p["name"]: p for p in json.loads(listed.stdout)}
    assert "error" not in described["intent-oos"], described["intent-oos"]
    assert [o["name"] for o in described["intent-oos"]["objectives"]] == ["val_mse", "features_used"]

    tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert tested.returncode == 0, tested.stdout[-3000:]
    assert "3 passed" in tested.stdout
