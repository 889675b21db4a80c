"""``qd report`` and ``qd export`` on finished runs, through the command and the Python API."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from qd.experiment import Experiment
from qd.explore import load_run
from qd.report import export, report
from qd.session import execute, prepare

@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('report')}/runs.db"
    # mixed: ints, strings, a bool and floats in the parameters; measures; two objectives.
    for name, problem, budget, options in (("mixed", "mixed", 30, {}), ("branin", "branin-currin", 10, {}),
                                           ("sphere", "sphere", 20, {"dim": 4})):
        exp = Experiment(problem=problem, problem_options=options, strategy="random", budget=budget, storage=url,
                         name=name, evaluator="inprocess", progress=False)
        execute(prepare(exp), dashboard_every_s=None)
    return url


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_export_round_trips_every_table(storage, tmp_path, fmt):
    run = load_run(storage, "mixed")
    paths = export(run, tmp_path, fmt)
    assert sorted(p.name for p in paths) == sorted([f"trials.{fmt}", f"elites.{fmt}", f"pareto.{fmt}", "run.json"])
    read = {"csv": pd.read_csv, "parquet": pd.read_parquet, "json": lambda p: pd.read_json(p, orient="records")}[fmt]
    for name in ("trials", "elites", "pareto"):
        back = read(tmp_path / f"{name}.{fmt}")
        expected = getattr(run, name)
        assert len(back) == len(expected) > 0, name
        assert list(back["number"]) == list(expected["number"])
        assert back["values.error"].tolist() == pytest.approx(expected["values.error"].tolist())
        assert back["params.activation"].tolist() == expected["params.activation"].tolist()
    assert json.loads((tmp_path / "run.json").read_text())["n_complete"] == 30


def test_report_folder_is_self_contained(storage, tmp_path):
    run = load_run(storage, "mixed")
    index = report(run, tmp_path / "rep")
    text = index.read_text()
    # Every image and link is relative and exists in the folder.
    refs = re.findall(r"(?:src|href)='([^']+)'", text)
    assert refs and all(not r.startswith(("/", "http")) and (index.parent / r).is_file() for r in refs)
    names = {Path(r).name for r in refs}
    assert {"pareto_front.png", "hypervolume.png", "moqd_heatmap.png", "qd_metrics.png"} <= names
    assert all((index.parent / n).stat().st_size > 5_000 for n in names if n.endswith(".png"))
    # The tables list the Pareto set's trials, with their values.
    for number, error in zip(run.pareto["number"], run.pareto["values.error"]):
        assert f"<td>{number}</td>" in text and f"{error:.5g}" in text
    assert "A spread-out subset of the Pareto set" in text and "Elites (" in text
    assert (index.parent / "data" / "trials.csv").is_file()


def test_report_for_one_objective_and_for_no_measures(storage, tmp_path):
    sphere = report(load_run(storage, "sphere"), tmp_path / "s").read_text()
    assert "best_so_far.png" in sphere and "archive_heatmap.png" in sphere and "pareto_front.png" not in sphere
    branin = report(load_run(storage, "branin"), tmp_path / "b").read_text()
    assert "pareto_front.png" in branin and "heatmap" not in branin and "Elites" not in branin


def test_report_and_export_commands(storage, tmp_path, capsys):
    from qd.cli import main  # the command's own code path (argparse and all), in this process

    assert main(["report", "--storage", storage, "--name", "mixed", "--out", str(tmp_path / "r")]) == 0
    index = Path(capsys.readouterr().out.strip())
    assert index.name == "index.html" and index.is_file() and (index.parent / "pareto_front.png").is_file()
    assert main(["export", "--storage", storage, "--name", "mixed", "--out", str(tmp_path / "e"),
                 "--format", "parquet"]) == 0
    written = capsys.readouterr().out.split()
    assert {Path(p).name for p in written} == {"trials.parquet", "elites.parquet", "pareto.parquet", "run.json"}
    assert all(Path(p).stat().st_size > 0 for p in written)


@pytest.mark.parametrize("args, message", [
    (["export", "--name", "mixed", "--format", "xml"], "--format: invalid choice: 'xml'"),
    (["report", "--name", "nope"], "no run named 'nope'"),
])
def test_bad_flags_fail_with_the_allowed_values(storage, tmp_path, capsys, args, message):
    from qd.cli import main

    try:
        code = main([*args, "--storage", storage, "--out", str(tmp_path / "x")])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert ("parquet" in err) if "format" in message else ("'mixed'" in err)  # what is allowed
    assert not (tmp_path / "x").exists()
