"""Size of a run's optuna-dashboard study page (the JSON the page loads), for a run of N evaluations.

    python experiments/dashboard_page.py --budget 100000

Runs map-elites on sphere-20D (vectorised, in-process), publishes the dashboard figures, note and
mirrored trials as ``qd run`` does, then asks optuna-dashboard's own WSGI app for the study's
detail (``/api/studies/<id>?after=0``) and the page's figures, and prints their sizes.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _get(app, path: str) -> bytes:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path.split("?")[0], "QUERY_STRING": path.partition("?")[2],
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "HTTP_HOST": "127.0.0.1:8080",
               "wsgi.input": io.BytesIO(), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr}
    status = []
    body = b"".join(app(environ, lambda s, h, *a: status.append(s)))
    assert status and status[0].startswith("200"), (path, status)
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=int, default=100_000)
    args = parser.parse_args()
    from optuna_dashboard import wsgi

    from qd.cli import main as qd

    with tempfile.TemporaryDirectory() as d:
        url = f"sqlite:///{d}/page.db"
        assert qd(["run", "--problem", "sphere", "--strategy", "map-elites", "--budget", str(args.budget),
                   "--evaluator", "inprocess", "--storage", url, "--name", "page", "--no-progress"]) == 0
        from qd.dashboard import refresh
        from qd.store import Store

        # What `qd dashboard` serves: it first mirrors what the run's own (time-bounded) publishing left.
        t0 = time.perf_counter()
        refresh(url, ["page"], out=io.StringIO())
        refreshed = time.perf_counter() - t0
        store = Store.open(url, "page")
        app = wsgi(url)
        t0 = time.perf_counter()
        detail = _get(app, f"/api/studies/{store.study._study_id}?after=0")
        seconds = time.perf_counter() - t0
        print(f"\n{args.budget:,} evaluations: study detail {len(detail) / 2**20:.2f} MB "
              f"({len(store.study.trials)} trials shown of {len(store.columns())}), served in {seconds:.1f} s "
              f"(target at most 2 MB); `qd dashboard`'s refresh before serving took {refreshed:.0f} s")


if __name__ == "__main__":
    main()
