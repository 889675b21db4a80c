"""``qd new-problem NAME``: write a plug-in package that registers one problem with qd.

The package holds a ``pyproject.toml`` whose ``qd.problems`` entry point names the problem class, the
class itself (a space, objectives, measures and ``evaluate``: a small real computation to replace
with yours), a test, and a README. After ``pip install -e NAME`` the problem is listed by
``qd problems`` and runs with ``qd run --problem NAME``.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path

NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")

_PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "qd-{name}"
version = "0.1.0"
description = "The {name} problem for qd"
requires-python = ">=3.11"
dependencies = ["qd", "numpy"]

[project.optional-dependencies]
test = ["pytest>=8"]

[project.entry-points."qd.problems"]
{name} = "{module}.problem:{cls}"

[tool.setuptools.packages.find]
include = ["{module}*"]
'''

_PROBLEM = '''"""The {name} problem: replace ``evaluate`` with your own training or simulation."""

from __future__ import annotations

import math
import time

import numpy as np

from qd import Categorical, Evaluation, Float, Int, Measure, Objective, Problem, Space
from qd.checks import check_int, check_number


class {cls}(Problem):
    """{name}: a ridge regression on synthetic data (replace with your own model): error vs features used."""

    def __init__(self, n_samples: int = 200, noise: float = 0.1, data_seed: int = 0):
        """Options (``-P key=value`` or ``[problem.options]``); check them here, before any evaluation.

        - ``n_samples``: rows of the synthetic data set.
        - ``noise``: standard deviation of the label noise.
        - ``data_seed``: fixes the data set (the evaluation seed drives the train/validation shuffle).
        """
        # qd's own checks: the error names the option, the value and what is allowed.
        check_int(n_samples, "n_samples", "{name}", low=20)
        check_number(noise, "noise", "{name}", low=0)
        self.n_samples, self.noise, self.data_seed = n_samples, float(noise), data_seed
        self.space = Space([
            Float("l2", 1e-6, 1e2, log=True),
            Int("features", 1, 16),
            Categorical("scaling", ("none", "standard")),
        ])
        self.objectives = (Objective("val_mse", "minimize"), Objective("features_used", "minimize", cheap=True))
        self.measures = (Measure("log10_l2", -6.0, 2.0), Measure("features", 0.5, 16.5))

    def cheap_values(self, config):
        return {{"features_used": float(self.space.validate(config)["features"])}}

    def evaluate(self, config, seed: int) -> Evaluation:
        config = self.space.validate(config)
        rng = np.random.default_rng(self.data_seed)
        x = rng.normal(size=(self.n_samples, 16)) * np.linspace(1.0, 4.0, 16)
        y = x @ (1.0 / np.arange(1, 17)) + self.noise * rng.normal(size=self.n_samples)
        order = np.random.default_rng(seed).permutation(self.n_samples)
        train, val = order[: self.n_samples * 3 // 4], order[self.n_samples * 3 // 4 :]
        x = x[:, : config["features"]]
        if config["scaling"] == "standard":
            x = (x - x[train].mean(axis=0)) / x[train].std(axis=0)
        started = time.perf_counter()
        gram = x[train].T @ x[train] + config["l2"] * np.eye(x.shape[1])
        weights = np.linalg.solve(gram, x[train].T @ y[train])
        mse = float(np.mean((x[val] @ weights - y[val]) ** 2))
        return Evaluation(values={{"val_mse": mse, "features_used": float(config["features"])}},
                          measures=[math.log10(config["l2"]), float(config["features"])],
                          metadata={{"fit_s": time.perf_counter() - started}})
'''

_TEST = '''"""Checks for the {name} problem: its space, an evaluation, bad options, and a short qd run."""

import pytest

from {module}.problem import {cls}


def test_evaluates_the_default_and_more_features_fit_better():
    problem = {cls}()
    few = problem.evaluate({{"l2": 1e-3, "features": 1, "scaling": "none"}}, seed=0)
    many = problem.evaluate({{"l2": 1e-3, "features": 16, "scaling": "none"}}, seed=0)
    assert many.values["val_mse"] < few.values["val_mse"]
    assert problem.cheap_values({{"l2": 1e-3, "features": 4, "scaling": "none"}}) == {{"features_used": 4.0}}


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="n_samples"):
        {cls}(n_samples=3)


def test_runs_under_qd_once_installed(tmp_path):
    """After `pip install -e .` the entry point makes the problem known to qd by its name."""
    from qd.experiment import Experiment
    from qd.session import execute, prepare

    experiment = Experiment(problem="{name}", strategy="random", budget=6, evaluator="inprocess",
                            storage=f"sqlite:///{{tmp_path}}/r.db", progress=False)
    report = execute(prepare(experiment), dashboard_every_s=None)
    assert report.complete == 6
'''

_README = '''# qd-{name}

A problem plug-in for qd. Install it next to qd and it shows up in `qd problems`:

```bash
pip install -e {name}
qd problems
qd run --problem {name} --strategy map-elites --budget 50
python -m pytest {name}/tests
```

Edit `{module}/problem.py`: the space (what the search may change), the objectives (what it trades
off; `cheap=True` for those computed from the configuration alone), the measures (the axes of the
map) and `evaluate(config, seed)`.
'''


def module_name(name: str) -> tuple[str, str]:
    """(package module, class name) for a problem name such as ``my-problem``: ``qd_my_problem``, ``MyProblem``."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"new-problem NAME={name!r} is not allowed; allowed: lower-case letters and digits in words "
                         f"joined by '-', starting with a letter (e.g. 'my-problem')")
    words = name.split("-")
    cls = "".join(w.capitalize() for w in words) + ("" if words[-1] == "problem" else "Problem")
    module = "qd_" + "_".join(words)
    if keyword.iskeyword(module):  # cannot happen with the prefix; kept for the invariant
        raise ValueError(f"new-problem NAME={name!r} makes the module name {module!r}, a Python keyword")
    return module, cls


def write_plugin(name: str, parent: str | Path = ".") -> list[Path]:
    """Write the plug-in package ``parent/name``; returns the files written.

    Raises:
        ValueError: a bad name, or a folder that exists and is not empty.
    """
    module, cls = module_name(name)
    root = Path(parent) / name
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"new-problem: folder {str(root)!r} exists and is not empty; allowed: a new or empty folder "
                         f"(choose another NAME or --dir)")
    files = {
        root / "pyproject.toml": _PYPROJECT.format(name=name, module=module, cls=cls),
        root / module / "__init__.py": f'"""The {name} problem for qd."""\n\nfrom {module}.problem import {cls}\n\n__all__ = ["{cls}"]\n',
        root / module / "problem.py": _PROBLEM.format(name=name, cls=cls),
        root / "tests" / f"test_{module}.py": _TEST.format(name=name, module=module, cls=cls),
        root / "README.md": _README.format(name=name, module=module),
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)
