"""optuna-dashboard for qd runs: figures and note written into the study, kept current while a run
progresses, served by ``qd dashboard`` and rendered by a real browser; the run's progress lines."""

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from optuna_dashboard import get_note

from qd.dashboard import (ARCHIVE_ID, METRICS_ID, PARETO_ID, Publisher, check_port, publish, published_figures,
                          study_url)
from qd.experiment import Experiment
from qd.explore import load_run
from qd.results import summary
from qd.run import run
from qd.session import execute, prepare, problem_of
from qd.store import Store

QD = [sys.executable, "-m", "qd.cli"]


def _experiment(url, name, problem="mixed", budget=30, **options):
    return Experiment(problem=problem, problem_options=options, strategy="random", budget=budget, storage=url,
                      name=name, evaluator="inprocess", progress=False)


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('dashboard')}/runs.db"
    execute(prepare(_experiment(url, "mixed", budget=24)), dashboard_every_s=None)  # measures, two objectives
    execute(prepare(_experiment(url, "branin", "branin-currin", 10)), dashboard_every_s=None)  # no measures
    return url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_publish_writes_heatmap_pareto_and_note(storage):
    store = Store.open(storage, "mixed")
    assert publish(store, problem_of(store), budget=24) == [ARCHIVE_ID, PARETO_ID, METRICS_ID]
    figures = published_figures(store)
    assert set(figures) == {ARCHIVE_ID, PARETO_ID, METRICS_ID}
    # The heatmap is qd.plots_archive's PNG, embedded whole.
    image = figures[ARCHIVE_ID]["data"][0]
    assert image["type"] == "image" and image["source"].startswith("data:image/png;base64,")
    png = base64.b64decode(image["source"].split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # The Pareto trace lists exactly the run's Pareto set, by trial number.
    shown = summary(store, problem_of(store))
    front = next(t for t in figures[PARETO_ID]["data"] if t["name"].startswith("Pareto set"))
    assert sorted(front["customdata"]) == sorted(p["number"] for p in shown["pareto_front"])
    note = get_note(store.study)
    run = load_run(storage, "mixed")
    coverage = run.archive.metrics()["coverage"]
    for text in ("qd run `mixed`", "`random`", "24 of 24 evaluations finished", f"{coverage:.1%}",
                 f"{shown['hypervolume']:.6g}", "MOQD score"):
        assert text in note, (text, note)


def test_publish_without_measures_has_no_heatmap(storage):
    store = Store.open(storage, "branin")
    assert publish(store, problem_of(store)) == [PARETO_ID, METRICS_ID]
    assert "coverage" not in get_note(store.study) and "10 evaluations finished" in get_note(store.study)


def test_a_running_run_updates_figures_note_and_cells(tmp_path):
    url = f"sqlite:///{tmp_path}/live.db"
    prepared = prepare(_experiment(url, "live", budget=18))
    seen = []

    def look(store, trial):  # a person refreshing the page while the run goes on
        if trial.number in (11, 17):
            seen.append((trial.number, get_note(store.study), set(published_figures(store))))

    publisher = Publisher(prepared.store, prepared.problem, budget=18, every_s=1e-6, max_share=None)  # every step
    run(prepared.problem, prepared.strategy, prepared.evaluator, prepared.store, budget=18, progress=False,
        callbacks=[look], listeners=[publisher])
    assert publisher.published >= 18
    (n1, note1, figs1), (n2, note2, figs2) = seen
    # The page shows the step before the one being looked at, and the final state after the run.
    assert "11 of 18 evaluations finished" in note1 and "17 of 18 evaluations finished" in note2
    assert "18 of 18 evaluations finished" in get_note(prepared.store.study)
    assert figs1 == figs2 == {ARCHIVE_ID, PARETO_ID, METRICS_ID}
    # Each mirrored trial carries its measures, the archive cell and bins, and whether it is an elite.
    run_view = load_run(url, "live")
    attrs = {t.user_attrs["qd_number"]: t.user_attrs for t in run_view.store.study.trials}
    assert len(attrs) == 18
    assert all(set(a["measures"]) == {"layers", "log2_width"} for a in attrs.values())
    assert [attrs[n]["cell"] for n in run_view.trials["number"]] == list(run_view.trials["cell"])
    assert all(len(a["bins"]) == 2 for a in attrs.values())
    elites = set(run_view.elites["number"])
    assert {n for n, a in attrs.items() if a["is_elite"]} <= elites | set(attrs)  # elite when copied


def test_execute_publishes_by_default(tmp_path):
    url = f"sqlite:///{tmp_path}/default.db"
    execute(prepare(_experiment(url, "d", "zdt1", 8, dim=3)))
    store = Store.open(url, "d")
    assert set(published_figures(store)) == {ARCHIVE_ID, PARETO_ID, METRICS_ID}
    assert "8 of 8 evaluations finished" in get_note(store.study)


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys):
    exp = Experiment(problem="zdt1", problem_options={"dim": 3}, strategy="random", budget=10, evaluator="inprocess",
                     storage=f"sqlite:///{tmp_path}/p.db", name="p")  # progress on; stderr is captured, not a tty
    execute(prepare(exp), dashboard_every_s=None)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("[p] ")]
    assert lines, err
    assert re.match(r"\[p\] 10/10 finished \(10 complete\) failed=0 running=0 best=\[f1:[-\d.e]+ f2:[-\d.e]+\] "
                    r"hv=[\d.e+]+ pareto=\d+ .*elapsed=\d+s$", lines[-1]), lines[-1]


def test_progress_shows_the_strategys_coverage(tmp_path, capsys):
    exp = Experiment(problem="sphere", problem_options={"dim": 3}, strategy="map-elites", budget=12,
                     evaluator="inprocess", storage=f"sqlite:///{tmp_path}/m.db", name="m")
    execute(prepare(exp), dashboard_every_s=None)
    last = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[m] ")][-1]
    assert re.match(r"\[m\] 12/12 finished .* best score=[\d.]+ coverage=[\d.e-]+ qd_score=[\d.e+]+ ", last), last


def test_port_in_use_is_refused_with_the_fix():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ValueError, match=rf"--port {port}: cannot listen on 127.0.0.1:{port} .*allowed: a free port"):
            check_port("127.0.0.1", port)
    with pytest.raises(ValueError, match="--port 70000 is not allowed; allowed: an integer in 1..65535"):
        check_port("127.0.0.1", 70000)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def dashboard(storage, tmp_path_factory):
    """``qd dashboard`` serving the storage on a free port; yields (base URL, output so far)."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("served") / "dashboard.log", "w+")
    proc = subprocess.Popen([*QD, "dashboard", "--storage", storage, "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/meta", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise AssertionError(f"qd dashboard did not start:\n{log.read()}") from None
                time.sleep(0.3)
        log.seek(0)
        yield base, log.read()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_qd_dashboard_serves_runs_with_figures(storage, dashboard):
    base, output = dashboard
    store = Store.open(storage, "mixed")
    url = study_url(store, port=int(base.rsplit(":", 1)[1]))
    assert f"run 'mixed': {url}" in output
    detail = json.load(urllib.request.urlopen(f"{base}/api/studies/{store.study._study_id}?after=0", timeout=30))
    assert {g["id"] for g in detail["plotly_graph_objects"]} == {ARCHIVE_ID, PARETO_ID, METRICS_ID}
    assert len(detail["trials"]) == 24


def test_browser_shows_the_runs_heatmap(storage, dashboard, tmp_path):
    """Headless Chromium opens the finished run's page: the heatmap is drawn in the page."""
    chromium = _chromium()
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; CI must install it (apt-get install -y chromium)")
        pytest.skip("chromium is not installed")
    base, _ = dashboard
    store = Store.open(storage, "mixed")
    page = f"{base}/dashboard/studies/{store.study._study_id}"
    shot = tmp_path / "dashboard.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--window-size=1400,2400", "--virtual-time-budget=15000"]
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *flags, f"--user-data-dir={profile}", f"--screenshot={shot}", page],
                       capture_output=True, timeout=120, check=True)
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([chromium, *flags, f"--user-data-dir={profile}", "--dump-dom", page],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    if os.environ.get("QD_SCREENSHOT_DIR"):  # keep the picture for a person to look at
        shutil.copy(shot, Path(os.environ["QD_SCREENSHOT_DIR"]) / "dashboard.png")
    assert shot.stat().st_size > 50_000
    # The page is the study's, and plotly drew our heatmap image inside the dashboard's figure card.
    assert "mixed" in dom
    card = dom.split(f'id="user-defined-plot:{ARCHIVE_ID}"', 1)
    assert len(card) == 2, "the archive figure's card is not in the page"
    assert re.search(r"<image[^>]+href=\"data:image/png;base64,", card[1].split("user-defined-plot:", 1)[0])
