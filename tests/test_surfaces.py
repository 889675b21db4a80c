"""What a person reads: one-objective runs say "best", ``qd show``'s text and run table, the CLI's
help and errors, integer and categorical map bins, the plotly archive map, ``qd compare``,
``qd strategies``, the progress line, notebook helpers and the report's layout.

Runs are real (SQLite, in-process evaluations); each test asserts what a reader would see."""

import io
import json
import re
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from qd import Categorical, Evaluation, Float, Measure, Objective, Problem, Space
from qd.archive import EliteArchive, default_bins, elite_spec, parse_bins
from qd.cli import build_parser, main
from qd.experiment import Experiment
from qd.explore import load_run
from qd.figures import archive_heatmap, is_elite, measure_bins, shared_limits, trial_cells
from qd.plots import plot_run
from qd.results import summary
from qd.session import execute, prepare, problem_of
from qd.store import Store
from qd.text import summary_text


def _exp(url, name, problem, strategy, budget, problem_options=None, **strategy_options):
    return Experiment(problem=problem, problem_options=problem_options or {}, strategy=strategy,
                      strategy_options=strategy_options, budget=budget, storage=url, name=name,
                      evaluator="inprocess", progress=False)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('surfaces')}/runs.db"
    for exp in (_exp(url, "me", "sphere", "map-elites", 40, {"dim": 4}, initial_population=10, bins=8),
                _exp(url, "cma", "sphere", "cma-me", 40, {"dim": 4}, bins=8),
                _exp(url, "z-random", "zdt1", "random", 20, {"dim": 3}),
                _exp(url, "z-tpe", "zdt1", "tpe", 20, {"dim": 3}, n_startup_trials=5)):
        execute(prepare(exp), dashboard_every_s=1e9)  # one publish at the end (it records the budget)
    return url


def _cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# --- one objective --------------------------------------------------------------------------------
def test_one_objective_surfaces_say_best(url, tmp_path, capsys):
    store = Store.open(url, "me")
    result = summary(store, problem_of(store))
    best = max((t for t in store.trials() if t.feasible), key=lambda t: t.values[0])
    assert result["best"]["number"] == best.number and result["best"]["value"] == best.values[0]
    assert result["hypervolume"] is None and result["hypervolume_reference"] is None
    names = {p.name for p in plot_run(store, problem_of(store), tmp_path)}
    assert names == {"best_so_far.png", "archive_heatmap.png", "qd_metrics.png"}
    code, out, _ = _cli(capsys, "show", "--storage", url, "--name", "me")
    assert code == 0
    assert f"best score (max): {best.values[0]:.4g} (trial #{best.number})" in out
    assert "Pareto set" not in out and "hypervolume" not in out


# --- qd show ---------------------------------------------------------------------------------------
def test_show_formats_numbers_keeps_settings_apart_and_explains_hypervolumes(url, capsys):
    code, out, _ = _cli(capsys, "show", "--storage", url, "--name", "z-tpe")
    assert code == 0
    lines = out.splitlines()
    assert lines[1] == "  strategy settings: n_startup_trials=5"  # apart from the results
    rows = [line for line in lines if line.startswith("    #")]
    numbers = [n for row in rows for n in re.findall(r"\d[\d.]*", row.split(maxsplit=1)[1])]
    assert rows and all(len(n.replace(".", "").lstrip("0")) <= 4 for n in numbers), rows  # never 16 digits
    assert all(len(line) <= 100 for line in lines if line.startswith("    #"))  # rows cut to the width
    run = load_run(url, "z-tpe")
    m = run.archive.metrics()
    assert f"coverage {100 * m['coverage']:.1f}%" in out
    assert "(of the Pareto set of all feasible trials; reference point (11, 11), declared by the problem)" in out
    assert "global hypervolume" in out and "it can be below the run's hypervolume above" in out


def test_show_without_a_name_lists_runs_as_a_table(url, capsys):
    code, out, _ = _cli(capsys, "show", "--storage", url)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["name", "problem", "strategy", "finished", "state", "best"]
    me = next(r for r in rows if r.startswith("me "))
    best = summary(Store.open(url, "me"))["best"]
    assert me.split()[:5] == ["me", "sphere", "map-elites", "40/40", "finished"]
    assert f"score={best['value']:.4g} (#{best['number']})" in me
    assert "Pareto set of" in next(r for r in rows if r.startswith("z-tpe"))
    code, out, _ = _cli(capsys, "show", "--storage", url, "--json")
    listed = {r["name"]: r for r in json.loads(out)}
    assert set(listed) == {"me", "cma", "z-random", "z-tpe"} and listed["cma"]["trials"] == 40


# --- CLI ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--problem", "zdt1", "--strategy", "botorh"], "strategy 'botorh' is not registered; registered strategies: ["),
    (["--problem", "zdt", "--strategy", "random"], "problem 'zdt' is not registered"),
    (["--problem", "zdt1", "--strategy", "nsga2", "-S", "population=4"], "unknown option(s) ['population']"),
    (["--problem", "zdt1", "--evaluator", "proces"], "evaluator 'proces' is not registered"),
])
def test_a_typo_gets_did_you_mean(tmp_path, capsys, args, message):
    code, _, err = _cli(capsys, "run", *args, "--storage", f"sqlite:///{tmp_path}/x.db", "--budget", "3")
    assert code == 2 and message in err, err
    suggestion = {"botorh": "'botorch'", "zdt": "'zdt", "population=4": "'population_size'", "proces": "'process'"}
    assert any(f"did you mean {s}" in err for k, s in suggestion.items() if k in args), err
    assert not re.search(r"(strategy|problem|evaluator): \1 ", err)
    assert not (tmp_path / "x.db").exists()


def test_run_help_lists_names_and_every_flag_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"qd {name} {action.option_strings or action.dest} has no help"
    text = subparsers.choices["run"].format_help()
    for expected in ("problems: ", "zdt1", "strategies: ", "botorch", "map-elites", "evaluators: ", "ray",
                     "Kept as recorded: the problem, the strategy, their options and the seed",
                     "May change: --budget"):
        assert expected in re.sub(r"\s+", " ", text), expected


def test_refused_runs_and_readers_leave_no_database(tmp_path, capsys):
    db = tmp_path / "none.db"
    url = f"sqlite:///{db}"
    for args in (["run", "--problem", "zdt1", "--budget", "0", "--storage", url],
                 ["run", "--problem", "zdt1", "-P", "dims=3", "--storage", url],
                 ["run", "--resume", "--name", "nothing", "--storage", url],
                 ["show", "--storage", url], ["show", "--storage", url, "--name", "a"],
                 ["plot", "--storage", url, "--name", "a"], ["report", "--storage", url, "--name", "a", "--out", "r"],
                 ["export", "--storage", url, "--name", "a", "--out", "e"], ["compare", "a", "b", "--storage", url]):
        code, _, err = _cli(capsys, *args)
        assert code == 2, (args, err)
        assert not db.exists(), f"qd {' '.join(args)} left {db}"
    assert f"the database file {str(db)!r} does not exist (nothing was created)" in err


# --- integer and categorical measures ---------------------------------------------------------
class _Discrete(Problem):
    """A problem with an integer, a categorical and a continuous measure."""

    def __init__(self):
        self.space = Space([Float("x", 0.0, 1.0), Categorical("opt", ("adam", "sgd", "rmsprop"))])
        self.objectives = (Objective("loss"),)
        self.measures = (Measure("depth", 1, 4, integer=True), Measure.categorical("optimizer", ("adam", "sgd", "rmsprop")),
                         Measure("x", 0.0, 1.0))

    def evaluate(self, config, seed):
        return Evaluation(values=[config["x"]], measures=[1 + int(config["x"] * 3.999),
                                                          ("adam", "sgd", "rmsprop").index(config["opt"]), config["x"]])


def test_integer_and_categorical_measures_get_one_bin_per_value():
    problem = _Discrete()
    assert default_bins(3, problem.measures) == (4, 3, 20)  # 4 depths, 3 optimisers; the rest as before
    assert default_bins(2) == (20, 20)
    assert parse_bins(None, problem, "test") == (4, 3, 20) and parse_bins(5, problem, "test") == (5, 5, 5)
    assert problem.measures[0].map_range == (0.5, 4.5) and problem.measures[1].map_range == (-0.5, 2.5)
    archive = EliteArchive(problem, elite_spec(problem))
    bins = measure_bins(archive, np.array([[1, 0, 0.0], [4, 2, 0.99], [3, 1, 0.5]]))
    assert bins.tolist() == [[0, 0, 0], [3, 2, 19], [2, 1, 10]]  # each value in its own bin
    from problems.arch import ArchProblem

    arch = ArchProblem()
    assert parse_bins(None, arch, "arch") == (20, 4)  # depth 1..4: no bin that can never fill


def test_integer_measure_maps_have_integer_ticks(tmp_path):
    problem = _Discrete()
    problem.measures = problem.measures[:2]
    archive = EliteArchive(problem, elite_spec(problem))
    from qd.store import Trial

    trials = [Trial(number=i, params={"x": x, "opt": o}, state="complete", values=[x],
                    measures=[1 + int(x * 3.999), ("adam", "sgd", "rmsprop").index(o)])
              for i, (x, o) in enumerate([(0.1, "adam"), (0.6, "sgd"), (0.9, "rmsprop"), (0.3, "sgd")])]
    archive.add_trials(trials)
    fig = archive_heatmap(archive, trials=trials)
    layout = fig.layout
    assert list(layout.xaxis.tickvals) == [1, 2, 3, 4] and list(layout.yaxis.ticktext) == ["adam", "sgd", "rmsprop"]
    from qd.plots_archive import elite_heatmap_figure

    mpl = elite_heatmap_figure(archive, problem)
    ax = mpl.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3", "4"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["adam", "sgd", "rmsprop"]


# --- the plotly archive map and per-trial cells -----------------------------------------------
def test_archive_heatmap_hover_names_bins_value_and_trial(url):
    run = load_run(url, "me")
    trials = run.store.trials()
    fig = archive_heatmap(run.archive, trials=trials, trial_url=lambda n: f"/t?numbers={n}", vmin=0, vmax=100)
    heat = fig.data[0]
    assert heat.type == "heatmap" and (heat.zmin, heat.zmax) == (0, 100)
    filled = {(j, i) for j, row in enumerate(heat.z) for i, v in enumerate(row) if v is not None and v == v}
    assert len(filled) == len(run.elites)
    elites = run.elites.set_index("number")
    for j, i in filled:
        x_bin, y_bin, trial = heat.customdata[j][i]
        number = int(trial.lstrip("#"))
        assert heat.z[j][i] == pytest.approx(elites.loc[number, "values.score"])
        lo, hi = (float(v) for v in x_bin.strip("[)").split(","))
        assert lo - 1e-9 <= elites.loc[number, "measures.sum_first_half"] <= hi + 1e-9
        assert heat.text[j][i] == f'<a href="/t?numbers={number}" target="_top">#{number}</a>'
    cells = trial_cells(run.archive, trials, run.measures)
    elite = is_elite(run.archive, trials)
    assert {t.number for t, e in zip(trials, elite) if e} == set(run.elites["number"])
    assert all(cells[n]["is_elite"] for n in run.elites["number"])
    assert set(cells[0]["bins"]) == {"sum_first_half", "sum_second_half"}
    lo, hi = shared_limits([run.archive, load_run(url, "cma").archive])
    assert lo == min(run.elites["values.score"].min(), load_run(url, "cma").elites["values.score"].min())


def test_archive_heatmap_draws_cvt_and_bare_pyribs_archives():
    from ribs.archives import GridArchive

    grid = GridArchive(solution_dim=2, dims=(5, 4), ranges=[(0, 1), (0, 1)])
    grid.add(solution=np.zeros((3, 2)), objective=np.array([1.0, 2.0, 3.0]),
             measures=np.array([[0.1, 0.1], [0.5, 0.5], [0.9, 0.9]]))
    fig = archive_heatmap(grid, measure_names=["a", "b"])
    assert fig.data[0].type == "heatmap" and sum(v is not None and v == v for r in fig.data[0].z for v in r) == 3
    assert fig.layout.xaxis.title.text == "a"
    problem = _Discrete()
    problem.measures = (Measure("x", 0.0, 1.0), Measure("y", 0.0, 1.0))
    cvt = EliteArchive(problem, elite_spec(problem, archive="cvt", cells=30))
    cvt.result.add(solution=np.zeros((2, 2)), objective=np.array([-0.5, -0.2]), measures=np.array([[0.2, 0.2], [0.8, 0.7]]))
    fig = archive_heatmap(cvt)
    assert fig.data[0].type == "scatter" and sorted(fig.data[0].marker.color) == [0.2, 0.5]


# --- shared colour limits and qd compare -------------------------------------------------------
def test_plot_shares_colour_limits(url, tmp_path):
    from qd.plots_archive import elite_heatmap_figure

    run = load_run(url, "me")
    fig = elite_heatmap_figure(run.archive, run.problem, vmin=0.0, vmax=100.0)
    mesh = next(c for c in fig.axes[0].collections if hasattr(c, "get_clim"))
    assert mesh.get_clim() == (0.0, 100.0)


def test_compare_draws_shared_axes_and_prints_final_figures(url, tmp_path, capsys):
    code, out, _ = _cli(capsys, "compare", "me", "cma", "--storage", url, "--out", str(tmp_path / "c"))
    assert code == 0
    me, cma = load_run(url, "me"), load_run(url, "cma")
    lo = min(me.elites["values.score"].min(), cma.elites["values.score"].min())
    hi = max(me.elites["values.score"].max(), cma.elites["values.score"].max())
    assert f"maps share the colour limits {lo:.4g} .. {hi:.4g}" in out
    rows = {line.split()[0]: line for line in out.splitlines()[1:3]}
    assert f"{100 * me.archive.metrics()['coverage']:.1f}%" in rows["me"]
    assert f"{100 * cma.archive.metrics()['coverage']:.1f}%" in rows["cma"]
    files = {Path(p).name for p in out.split() if p.endswith(".png")}
    assert files == {"curves.png", "qd_metrics.png", "map_me.png", "map_cma.png"}
    code, out, _ = _cli(capsys, "compare", "z-random", "z-tpe", "--storage", url, "--out", str(tmp_path / "z"),
                        "--json")
    rows = json.loads(out)
    for row in rows:
        assert row["hypervolume"] == pytest.approx(summary(Store.open(url, row["name"]),
                                                           problem_of(Store.open(url, row["name"])))["hypervolume"])
    code, _, err = _cli(capsys, "compare", "me", "z-tpe", "--storage", url, "--out", str(tmp_path / "x"))
    assert code == 2 and "different objectives" in err


# --- qd strategies and the small-budget warning ------------------------------------------------
def test_strategies_lists_options_defaults_and_descriptions(capsys):
    code, out, _ = _cli(capsys, "strategies", "--json")
    listed = {s["name"]: s for s in json.loads(out)}
    assert {"random", "tpe", "nsga2", "botorch", "map-elites", "cma-mae", "mome", "sail"} <= set(listed)
    assert all(s["description"] and "Helper class" not in s["description"] for s in listed.values())
    me = {o["name"]: o["default"] for o in listed["map-elites"]["options"]}
    assert me["initial_population"] == 32 and me["sigma"] == 0.1
    tpe = {o["name"]: o["default"] for o in listed["tpe"]["options"]}
    assert tpe["n_startup_trials"] == 10 and tpe["multivariate"] is True and tpe["constant_liar"] is True  # qd's
    code, out, _ = _cli(capsys, "strategies")
    assert re.search(r"^map-elites +MAP-Elites", out, re.M) and "initial_population=32" in out


def test_a_budget_eaten_by_the_warm_up_is_warned_about(tmp_path, capsys):
    base = ["run", "--problem", "sphere", "-P", "dim=3", "--strategy", "map-elites", "--evaluator", "inprocess",
            "--storage", f"sqlite:///{tmp_path}/w.db", "--no-progress"]
    code, _, err = _cli(capsys, *base, "--name", "small", "--budget", "6", "-S", "initial_population=4")
    assert code == 0
    assert ("budget 6 leaves 2 evaluation(s) after the 4 initial ones of strategy map-elites "
            "(initial_population=4)") in err
    code, _, err = _cli(capsys, *base, "--name", "enough", "--budget", "8", "-S", "initial_population=4")
    assert code == 0 and "warning" not in err


# --- the progress line --------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _progress_frames(monkeypatch, exp, columns=80, reference=True):
    monkeypatch.setenv("COLUMNS", str(columns))
    prepared = prepare(exp)
    if not reference:
        prepared.problem.reference_point = None
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    execute(prepared, dashboard_every_s=None)
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    return [f.rstrip() for f in re.split(r"[\r\n]", stream.getvalue()) if f.strip()]  # tqdm pads redraws


def test_progress_fits_the_terminal_with_key_figures_first(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/p.db"
    exp = Experiment(problem="sphere", problem_options={"dim": 3}, strategy="map-elites", budget=12,
                     evaluator="inprocess", storage=url, name="a-rather-long-run-name")
    frames = _progress_frames(monkeypatch, exp)
    assert max(len(f) for f in frames) <= 80
    last = frames[-1]
    assert re.search(r" 12/12 \|#{12}\| ", last), last  # the bar keeps its width
    assert re.search(r"\d, best score=[\d.]+(, |$)", last), last  # the key figure comes first
    assert not re.search(r"=\S*$", last) or re.search(r"=[\w.%/]+$", last)  # never cut mid-figure
    wide = _progress_frames(monkeypatch, Experiment(**{**exp.__dict__, "name": "w"}), columns=200)
    assert re.search(r"best score=[\d.]+, coverage=[\d.]+%, qd_score=[\d.e+]+, running=0$", wide[-1]), wide[-1]


def test_progress_hypervolume_only_against_a_declared_reference(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/h.db"
    exp = Experiment(problem="mixed", strategy="random", budget=10, evaluator="inprocess", storage=url, name="m")
    declared = _progress_frames(monkeypatch, exp, columns=200)[-1]
    assert re.search(r"pareto=\d+, hv/max=[\d.]+%", declared), declared
    exp = Experiment(problem="mixed", strategy="random", budget=10, evaluator="inprocess", storage=url, name="d")
    derived = _progress_frames(monkeypatch, exp, columns=200, reference=False)[-1]
    assert "pareto=" in derived and "hv" not in derived and "best" not in derived


# --- notebooks ----------------------------------------------------------------------------------
def test_notebook_helpers_keep_the_backend_and_print_short(url, tmp_path):
    from qd.report import report

    run = load_run(url, "me")
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        report(run, tmp_path / "rep")
        assert matplotlib.get_backend() == "svg"  # report() does not switch the user's backend
    finally:
        matplotlib.use(before)
    text = repr(run)
    assert len(text.splitlines()) <= 6 and "values." not in text and "params." not in text
    assert f"{len(run.trials)} trials" in text and f"{len(run.elites)} elites" in text
    picked = run.query("score > 50 and x0 < 1")  # no backticks, no prefixes
    expected = run.trials[(run.trials["values.score"] > 50) & (run.trials["params.x0"] < 1)]
    assert list(picked["number"]) == list(expected["number"])
    report_repr = repr(execute(prepare(_exp(f"sqlite:///{tmp_path}/n.db", "n", "zdt1", "random", 3)),
                               dashboard_every_s=None))
    assert re.search(r"elapsed_s=\d+\.\d,", report_repr), report_repr


def test_importing_qd_installs_the_tqdm_filter_before_optuna():
    """Optuna imports tqdm.auto, which warns in a notebook without ipywidgets (the notebooks test
    checks the real kernel); qd's filter must be in place before that import."""
    import subprocess

    script = ("import sys, warnings; import qd; from tqdm import TqdmWarning; "
              "print(any(f[0] == 'ignore' and f[2] is TqdmWarning and f[1].match('IProgress not found') "
              "for f in warnings.filters))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


# --- the report ---------------------------------------------------------------------------------
def test_report_lays_figures_one_per_row_and_names_things_in_words(url, tmp_path):
    from qd.report import report

    page = report(load_run(url, "z-tpe"), tmp_path / "rep").read_text()
    assert ".figures img { display: block; max-width: 100%;" in page and "overflow-x" not in page
    assert page.count("<figure>") == 4 and "<figcaption>" in page
    assert "archive norm_qd_score" not in page and "QD score per cell" in page
    assert "coverage (share of cells filled)</th><td>" in page and re.search(r"filled\)</th><td>\d+\.\d%", page)
    assert "hypervolume (of the Pareto set of all feasible trials)" in page
    header = re.search(r"<h2>Pareto set.*?<thead>(.*?)</thead>", page, re.S).group(1)
    assert re.findall(r"<th>([^<]*)</th>", header) == ["trial", "cell", "f1", "f2", "mean_x_first_half",
                                                       "mean_x_second_half", "parameters"]
    assert "<td class='params'>x0=" in page


# --- the README's plug-in example ---------------------------------------------------------------
def test_readme_problem_example_runs(tmp_path):
    """The complete example under "Adding a problem" works as written."""
    import pickle
    import types

    from evaluators import make_evaluator
    from qd.run import run as run_loop
    from qd.store import RunInfo
    from qd.strategies import get_strategy

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Adding a problem", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    module = types.ModuleType("readme_small_net")
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, "README.md", "exec"), module.__dict__)
        problem = module.SmallNet(split="test")
        problem.name, problem.options = "small-net", {"split": "test"}
        with pytest.raises(ValueError, match="option split='train' is not allowed; allowed: 'validation', 'test'"):
            module.SmallNet(split="train")
        assert parse_bins(None, problem, "small-net") == (20, 4)
        problem._data = object()
        assert pickle.loads(pickle.dumps(problem))._data is None  # loaded data stays out of the pickle
        info = RunInfo(name="ex", problem="small-net", problem_options={"split": "test"}, strategy="random",
                       strategy_options={}, seed=0)
        store = Store.create(f"sqlite:///{tmp_path}/ex.db", info, problem)
        run_loop(problem, get_strategy("random", problem), make_evaluator("inprocess"), store, budget=12,
                 progress=False)
    finally:
        del sys.modules[module.__name__]
    trials = store.trials()
    assert len(trials) == 12 and all(t.state == "complete" for t in trials)
    assert all(("momentum" in t.params) == (t.params["optimizer"] == "sgd") for t in trials)
    assert all(t.values[1] == problem.cheap_values(t.params)["params"] for t in trials)
    assert summary(store, problem)["hypervolume_reference"] == {
        "point": [0.0, 1e6, 60.0], "source": "problem",
        "scaling": {"accuracy": {"scale": "linear", "bounds": [0.0, 1.0]}, "params": {"scale": "log"},
                    "seconds": {"scale": "log"}}}
