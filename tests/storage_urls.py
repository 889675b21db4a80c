"""Storage URLs for tests that run against SQLite and, when one is configured, PostgreSQL.

PostgreSQL comes from ``QD_TEST_POSTGRES_URL`` (``.ci/start-postgres.sh`` starts a server and
exports it). Without it those tests are skipped, except under ``CI=true``, where a missing server
is a failure: CI must not pass by skipping them.
"""

from __future__ import annotations

import os
import uuid

import optuna
import pytest

from qd.store import resolve_storage

STORAGES = ("sqlite", "postgresql")


def postgres_url() -> str:
    url = os.environ.get("QD_TEST_POSTGRES_URL")
    if url:
        return url
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but QD_TEST_POSTGRES_URL is unset: .ci/start-postgres.sh must run (and be sourced) "
                    "before the tests")
    pytest.skip("QD_TEST_POSTGRES_URL is unset (source .ci/start-postgres.sh to run the PostgreSQL tests)")


def storage_url(kind: str, tmp_path) -> str:
    """A fresh SQLite file under ``tmp_path``, or the shared PostgreSQL database."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/runs.db"
    if kind == "postgresql":
        return postgres_url()
    raise ValueError(f"storage kind {kind!r} is not allowed; allowed: {list(STORAGES)}")


def unique_name(prefix: str) -> str:
    """A run name no earlier test session used: the PostgreSQL database outlives a test session."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def delete_runs(storage: str, names: list[str]) -> None:
    for name in names:
        try:
            optuna.delete_study(study_name=name, storage=resolve_storage(storage))
        except KeyError:
            pass
