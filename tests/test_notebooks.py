"""The notebooks run from top to bottom (each runs its own small benchmark), so they never rot.

Each notebook checks its own claims with ``assert`` cells; an exception anywhere fails the test.
"""

import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.parametrize("name, expect", [
    ("explore_archive.ipynb", ["elites; coverage", "smallest distance between picks", "index.html",
                               "Run('sphere-me': sphere / map-elites"]),
    ("pareto_tradeoffs.ipynb", ["Pareto-optimal of 40 trials", "hypervolume of the whole front",
                                "front members over", "of the recorded values are better"]),
])
def test_notebook_runs(name, expect, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    t0 = time.monotonic()
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    elapsed = time.monotonic() - t0
    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for snippet in expect:
        assert snippet in text, snippet
    assert "TqdmWarning" not in text and "IProgress" not in text  # no warning before any output
    assert "RunReport(" in text and not re.search(r"elapsed_s=\d+\.\d{2,}", text)  # seconds rounded
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 3, f"{name} drew {images} figures"
    assert elapsed < 120, f"{name} took {elapsed:.0f} s; keep notebooks quick"
