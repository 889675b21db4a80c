"""The "Tune your own model" experiment files, run as a new user would: `qd run FILE` on data the
project does not vendor (../shared/data beside the checkout), at small sizes, with the strategies the
README names (map-elites and, from the same file, botorch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def shared_data() -> Path | None:
    """../shared/data beside the checkout (as CI lays it out), else $QD_SHARED_DATA."""
    for candidate in (ROOT.parent / "shared" / "data", Path(os.environ.get("QD_SHARED_DATA", "/nonexistent"))):
        if (candidate / "sms_spam" / "SMSSpamCollection").is_file():
            return candidate
    return None


SHARED = shared_data()
needs_shared = pytest.mark.skipif(SHARED is None, reason="the shared data folder (../shared/data beside the checkout) is absent")


def qd(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, QD_TORCH_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "qd.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


SMALL_PEFT = ["-P", "train_size=48", "-P", "val_size=32", "-P", "test_size=32", "-P", "max_length=16", "-P", "batch_size=8",
              "-P", "min_steps=1", "-P", "max_steps=4"]


@needs_shared
@pytest.mark.parametrize("strategy, extra", [("map-elites", ["-S", "initial_population=2", "-S", "batch_size=2"]),
                                             # Real fine-tuning twice is CI's heaviest minute: botorch's variant is slow.
                                             pytest.param("botorch", ["--strategy", "botorch", "-S", "n_init=2", "-S",
                                                                      "raw_samples=32", "-S", "num_restarts=2"],
                                                          marks=pytest.mark.slow)])
def test_own_peft_file_runs_with_map_elites_and_with_botorch(tmp_path, strategy, extra):
    storage = f"sqlite:///{tmp_path}/own.db"
    data = [] if (ROOT.parent / "shared").is_dir() else ["-P", f"dataset={SHARED}/sms_spam/SMSSpamCollection"]
    done = qd("run", "experiments/own_peft.toml", "--storage", storage, "--budget", "3", "--workers", "1",
              "--evaluator", "inprocess", "--no-progress", *SMALL_PEFT, *data, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 complete, 0 failed" in done.stdout
    shown = qd("show", "--storage", storage, "--name", "own-peft", "--json")
    result = json.loads(shown.stdout)
    assert result["strategy"] == strategy and result["n_complete"] == 3
    assert result["problem_options"]["dataset"].endswith("sms_spam/SMSSpamCollection")
    assert [o["name"] for o in result["objectives"]] == ["macro_f1", "trainable_params", "train_time_s"]
    for row in result["pareto_front"]:
        assert 0.0 <= row["values"][0] <= 1.0


@needs_shared
def test_own_rag_file_runs_over_a_corpus_folder_and_a_questions_file(tmp_path):
    corpus, questions = tmp_path / "docs", tmp_path / "questions.jsonl"
    made = subprocess.run([sys.executable, "experiments/make_rag_corpus.py", "--xquad", f"{SHARED}/xquad_en/xquad.en.json",
                           "--corpus", str(corpus), "--questions", str(questions), "--articles", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    storage = f"sqlite:///{tmp_path}/rag.db"
    done = qd("run", "experiments/own_rag.toml", "--storage", storage, "--budget", "4", "--workers", "1",
              "--evaluator", "inprocess", "--no-progress", "-P", f"corpus={corpus}", "-P", f"questions={questions}",
              "-P", f"cache_dir={tmp_path}/cache", "-S", "initial_population=2", "-S", "batch_size=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 complete, 0 failed" in done.stdout
    assert any((tmp_path / "cache").rglob("*.npy"))  # embeddings cached on disk for re-runs and other workers


def test_bad_path_in_an_experiment_fails_before_any_evaluation(tmp_path):
    storage = f"sqlite:///{tmp_path}/bad.db"
    done = qd("run", "experiments/own_peft.toml", "--storage", storage, "--budget", "1", "--evaluator", "inprocess",
              "-P", "dataset=no/such/messages.tsv", timeout=300)
    assert done.returncode == 2
    assert "dataset='no/such/messages.tsv'" in done.stderr and "no such file" in done.stderr
    assert not (tmp_path / "bad.db").exists() or "complete" not in done.stdout
