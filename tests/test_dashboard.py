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

import numpy as np
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


def test_heatmap_links_lead_to_the_dashboard_page_of_the_same_trial(tmp_path):
    """Beyond the copied prefix the study's trial numbers are not qd's: a link must name the study's
    number of that very trial, and an elite that was not copied gets no link."""
    from qd.archive import archive_for_run
    from qd.dashboard import archive_figure, featured_numbers
    from qd.mirror import Mirror

    url = f"sqlite:///{tmp_path}/runs.db"
    execute(prepare(_experiment(url, "big", budget=60)), dashboard_every_s=None)
    store = Store.open(url, "big")
    problem, cols = problem_of(store), store.columns()
    archive = archive_for_run(store, problem, cols)
    featured, elites = featured_numbers(cols, archive, list(store.directions))
    late = [n for n in featured if n >= 30]  # copied after the first 5: their study numbers are not qd's
    mirror = Mirror(store, problem, all_up_to=5, cap=5 + len(late))
    mirror.sync(cols, late, elites)
    pages = mirror.pages()
    by_page = {t.number: t.user_attrs["qd_number"] for t in store.study.get_trials(deepcopy=False)}
    assert any(page != n for n, page in pages.items())
    heat = archive_figure(store, problem, archive, cols, pages=pages).data[0]
    linked = unlinked = 0
    for row in heat.text:
        for text in row:
            if not text:
                continue
            shown = int(re.search(r"#(\d+)", text).group(1))
            page = re.search(r"numbers=(\d+)", text)
            if page:
                assert by_page[int(page.group(1))] == shown
                linked += 1
            else:
                assert shown not in pages
                unlinked += 1
    assert linked and unlinked


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_publish_writes_heatmap_pareto_and_note(storage):
    store = Store.open(storage, "mixed")
    assert publish(store, problem_of(store), budget=24) == [ARCHIVE_ID, PARETO_ID, METRICS_ID]
    figures = published_figures(store)
    assert set(figures) == {ARCHIVE_ID, PARETO_ID, METRICS_ID}
    # The heatmap is a native plotly heatmap: every filled cell has its trial number on hover and a link.
    heat = figures[ARCHIVE_ID]["data"][0]
    assert heat["type"] == "heatmap" and "trial %{customdata[2]}" in heat["hovertemplate"]
    run = load_run(storage, "mixed")
    filled = [(j, i) for j, row in enumerate(heat["z"]) for i, v in enumerate(row) if v is not None]
    assert len(filled) == len(run.archive.fronts) > 0
    numbers = {int(n) for j, i in filled for n in re.findall(r"#(\d+)", heat["customdata"][j][i][2])}
    assert numbers == {int(n) for n in run.elites["number"]}
    assert all(f"/dashboard/studies/{store.study._study_id}/trials?numbers=" in heat["text"][j][i] for j, i in filled)
    # ``layers`` is an integer measure: one bin per value (1..8), integer ticks.
    assert len(heat["x"]) == 8 and figures[ARCHIVE_ID]["layout"]["xaxis"]["tickvals"] == list(range(1, 9))
    # The Pareto trace lists exactly the run's Pareto set, by trial number.
    shown = summary(store, problem_of(store))
    front = next(t for t in figures[PARETO_ID]["data"] if t["name"].startswith("Pareto set"))
    assert sorted(front["customdata"]) == sorted(p["number"] for p in shown["pareto_front"])
    note = get_note(store.study)
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
    # Key figures first; "failed" only when something failed; the hypervolume against zdt1's declared point.
    assert re.match(r"\[p\] 10/10 finished \(10 complete\) pareto=\d+ hv/max=[\d.]+% running=0 elapsed=\d+s$",
                    lines[-1]), lines[-1]


def test_progress_shows_the_strategys_coverage(tmp_path, capsys):
    exp = Experiment(problem="sphere", problem_options={"dim": 3}, strategy="map-elites", budget=12,
                     evaluator="inprocess", storage=f"sqlite:///{tmp_path}/m.db", name="m")
    execute(prepare(exp), dashboard_every_s=None)
    last = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[m] ")][-1]
    assert re.match(r"\[m\] 12/12 finished \(12 complete\) best score=[\d.]+ coverage=[\d.]+% qd_score=[\d.e+]+ "
                    r"running=0 ", last), last


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


_HOVER_POINT_JS = """(() => {
  const card = document.querySelector('[id="user-defined-plot:%s"]');
  const gd = card && (card.classList.contains("js-plotly-plot") ? card : card.querySelector(".js-plotly-plot"));
  if (!gd || !gd._fullLayout || !gd._fullData) return null;
  gd.scrollIntoView({block: "center"});
  const t = gd._fullData[0], xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
  for (let j = 0; j < t.z.length; j++) for (let i = 0; i < t.z[j].length; i++) if (t.z[j][i] !== null)
    // off the cell's centre, where its trial link is written: the link takes the pointer's events
    return JSON.stringify({x: r.left + xa._offset + xa.c2p(t.x[i]) + 0.35 * xa._length / t.z[0].length,
                           y: r.top + ya._offset + ya.c2p(t.y[j]) + 0.35 * ya._length / t.z.length,
                           trial: t.customdata[j][i][2]});
  return null;
})()"""


async def _hover_and_shoot(chromium: str, page: str, shot: Path, profile: str) -> dict:
    """Open ``page`` in headless Chromium (DevTools protocol), hover the archive heatmap's first filled
    cell, screenshot the page with the hover label shown; returns what the page showed."""
    import asyncio

    import aiohttp

    port = _free_port()
    proc = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             "--window-size=1400,1800", f"--remote-debugging-port={port}",
                             f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                        targets = [t for t in await r.json() if t["type"] == "page"]
                    if targets:
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            async with http.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ids = iter(range(1, 10**6))

                async def call(method: str, **params) -> dict:
                    i = next(ids)
                    await ws.send_json({"id": i, "method": method, "params": params})
                    while True:
                        msg = await ws.receive_json(timeout=60)
                        if msg.get("id") == i:
                            return msg.get("result", {})

                async def evaluate(expr: str):
                    return (await call("Runtime.evaluate", expression=expr, returnByValue=True))["result"].get("value")

                await call("Page.navigate", url=page)
                point = None
                for _ in range(300):
                    point = await evaluate(_HOVER_POINT_JS % ARCHIVE_ID)
                    if point:
                        break
                    await asyncio.sleep(0.1)
                assert point, "the archive heatmap was not drawn in the page"
                point = json.loads(point)
                await asyncio.sleep(0.5)  # scrolled: take the point again
                point = json.loads(await evaluate(_HOVER_POINT_JS % ARCHIVE_ID))
                for step in range(10, -1, -1):  # glide onto the cell as a pointer would
                    await call("Input.dispatchMouseEvent", type="mouseMoved", x=point["x"] + 3 * step,
                               y=point["y"] - 2 * step, button="none")
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)
                card = f'document.querySelector(\'[id="user-defined-plot:{ARCHIVE_ID}"]\')'
                hover = await evaluate(f"{card}.querySelector('.hoverlayer').textContent")
                links = await evaluate(f"Array.from({card}.querySelectorAll('a'))"
                                       f".map(a => a.getAttribute('href') || a.getAttribute('xlink:href'))")
                png = await call("Page.captureScreenshot", format="png")
                shot.write_bytes(base64.b64decode(png["data"]))
                return {"hover": hover, "links": links, "trial": point["trial"],
                        "title": await evaluate("document.body.innerText")}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_browser_shows_the_runs_heatmap_with_a_hover_label(storage, dashboard, tmp_path):
    """Headless Chromium opens the finished run's page, hovers the archive heatmap: the hover label
    names the cell's bins, value and trial, and each filled cell links to its trial."""
    import asyncio

    chromium = _chromium()
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; CI must install it (apt-get install -y chromium)")
        pytest.skip("chromium is not installed")
    base, _ = dashboard
    store = Store.open(storage, "mixed")
    page = f"{base}/dashboard/studies/{store.study._study_id}"
    shot = tmp_path / "dashboard.png"
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:  # Chromium may still write there
        seen = asyncio.run(_hover_and_shoot(chromium, page, shot, profile))
    if os.environ.get("QD_SCREENSHOT_DIR"):  # keep the picture for a person to look at
        shutil.copy(shot, Path(os.environ["QD_SCREENSHOT_DIR"]) / "dashboard.png")
    assert shot.stat().st_size > 50_000
    assert "mixed" in seen["title"]
    # The hover label: both measures' bins, the cell's hypervolume and its trial number(s).
    for text in ("layers: ", "log2_width: [", "hypervolume of the cell's front: ", f"trial {seen['trial']}"):
        assert text in (seen["hover"] or ""), (text, seen["hover"])
    trial_links = sorted(h for h in seen["links"] if h and "/trials?numbers=" in h)
    firsts = [front.numbers[0] for front in load_run(storage, "mixed").archive.fronts.values()]
    assert trial_links == sorted(f"/dashboard/studies/{store.study._study_id}/trials?numbers={n}" for n in firsts)


@pytest.mark.parametrize("problem_name", ["sphere", "mixed"])
def test_the_mirrors_page_estimate_matches_optuna_dashboards_own_serialiser(tmp_path, problem_name):
    """``qd.mirror.page_bytes`` sizes a trial as optuna-dashboard serialises it (without importing
    it into a run): within 15% of the dashboard's own serialiser."""
    from optuna_dashboard._serializer import serialize_frozen_trial

    from qd.mirror import Mirror, page_bytes

    url = f"sqlite:///{tmp_path}/page.db"
    prepared = prepare(_experiment(url, "page", problem_name, budget=5))
    execute(prepared, dashboard_every_s=None)
    store, problem = prepared.store, prepared.problem
    cols = store.columns()
    trial = Mirror(store, problem)._frozen(cols, 0, set(), {})
    theirs = len(json.dumps(serialize_frozen_trial(0, trial, {}), default=str))
    assert abs(page_bytes(trial) - theirs) <= 0.15 * theirs, (page_bytes(trial), theirs)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "journal"])
def test_bulk_mirror_writes_what_optunas_add_trials_writes(tmp_path, kind):
    """``qd.mirror.add_trials`` (bulk inserts on RDB storages) leaves the same trials as
    ``Study.add_trials``: numbers after the existing ones, values (infinite ones too), parameters
    and distributions, attributes, times; and, as Optuna's RDB storage does, refuses a distribution
    the study contradicts, writing nothing."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from storage_urls import delete_runs, storage_url, unique_name

    from qd.mirror import add_trials
    from qd.store import optuna_storage

    rng = np.random.default_rng(0)

    def trial(k):
        params = {"x": float(rng.random()), "n": int(rng.integers(1, 9)), "c": str(rng.choice(["a", "b"]))}
        dists = {"x": FloatDistribution(0, 1), "n": IntDistribution(1, 8), "c": CategoricalDistribution(["a", "b"])}
        values = [float(rng.random()), float("inf") if k % 3 == 0 else float(rng.random())]
        state = optuna.trial.TrialState.COMPLETE if k % 4 else optuna.trial.TrialState.FAIL
        return optuna.trial.create_trial(state=state, values=values if state.name == "COMPLETE" else None,
                                         params=params, distributions=dists,
                                         user_attrs={"qd_number": k, "measures": {"m": k / 2}},
                                         system_attrs={"constraints": [0.5 - k]})

    trials = [trial(k) for k in range(30)]
    if kind == "journal":
        url = f"journal:///{tmp_path}/runs.log"
    else:
        url = storage_url(kind, tmp_path)
    names = [unique_name("bulk-ours"), unique_name("bulk-optuna")]
    try:
        ours, theirs = (optuna.create_study(storage=optuna_storage(url), study_name=n,
                                            directions=["minimize", "maximize"]) for n in names)
        theirs.add_trials(trials[:1])
        add_trials(ours, trials[:1])  # a study that already holds a trial
        theirs.add_trials(trials[1:])
        add_trials(ours, trials[1:])

        def seen(study):
            return [(t.number, t.state, t.values, t.params, t.distributions, t.user_attrs, t.system_attrs,
                     t.datetime_start, t.datetime_complete) for t in optuna.load_study(
                         study_name=study.study_name, storage=optuna_storage(url)).get_trials(deepcopy=False)]

        assert seen(ours) == seen(theirs)
        assert [t[0] for t in seen(ours)] == list(range(30))
        if kind != "journal":  # Optuna's journal storage does not check distributions on add_trials
            bad = optuna.trial.create_trial(values=[0.0, 1.0], params={"c": "a"},
                                            distributions={"c": CategoricalDistribution(["a", "z"])})
            with pytest.raises(ValueError, match="dynamic value space"):
                add_trials(ours, [bad])
            assert len(seen(ours)) == 30
    finally:
        if kind == "postgresql":
            delete_runs(url, names)
