"""experiments/diagnose_tutorial.py: its strategy variants still fit qd's internals, and its summary counts.

The variants replace private parts of the ``botorch`` strategy, so they run in a child process
(nothing leaks into the other tests) and one batch each: enough to fit, acquire and tell.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "diagnose_tutorial.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("variant", ["warp,parego,refpad,botorch-posterior", "matern,winsorize"])
def test_variants_run_one_batch_and_record_themselves(tmp_path, variant):
    out = tmp_path / "rows.jsonl"
    done = _run("--loop", "qd", "--noise", "known", "--seed", "0", "--batches", "1", "--variant", variant,
                "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(out.read_text())
    assert row["variant"] == variant and row["noise"] == "known"
    assert math.isfinite(row["hypervolume"]) and row["hypervolume"] >= 0
    (batch,) = row["per_batch"]
    assert len(batch["batch_x"]) == 4 and batch["gps"] and all(g["ls"] for g in batch["gps"])
    # the model the variant asks for is the one that was fitted (one GP per objective)
    expected = {"warp,parego,refpad,botorch-posterior": ("RBFKernel", "Warp"),
                "matern,winsorize": ("ScaleKernel(MaternKernel)", "NoneType")}[variant]
    assert [(g["kernel"], g["input_transform"]) for g in batch["gps"]] == [expected, expected]


def test_an_unknown_variant_is_refused_naming_the_allowed_ones():
    done = _run("--variant", "warp,bogus")
    assert done.returncode == 2
    assert "'bogus'" in done.stderr and "warp, matern, parego" in done.stderr


def test_summarise_counts_per_loop_and_variant(tmp_path):
    rows = [{"loop": "qd", "variant": "", "hypervolume": h} for h in (57.5, 56.5, 55.0)]
    rows += [{"loop": "qd", "variant": "warp", "hypervolume": 58.0}, {"loop": "reference", "hypervolume": 57.1}]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = _run("--summarise", str(path))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = {line.split("seeds")[0].split(": ", 1)[1].strip(): line for line in done.stdout.splitlines()}
    assert set(lines) == {"qd defaults", "qd warp", "botorch reference"}
    assert "seeds  3" in lines["qd defaults"] and "min 55.000" in lines["qd defaults"]
    assert "below 57.0:  2  below 56.0:  1" in lines["qd defaults"]
    assert "below 57.0:  0" in lines["botorch reference"]
