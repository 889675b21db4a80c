"""Storage URLs: checked before any work starts, and shown without their passwords.

``check_storage`` is called by the store before it opens or creates anything, so a wrong URL
fails at once with an error that names it (its password masked) and says what is allowed:

- SQLite: a file, ``sqlite:///run.db`` (relative) or ``sqlite:////abs/path/run.db``. An in-memory
  database (``sqlite://``, ``sqlite:///:memory:``) is refused: the run would lose every result
  when it ends. ``sqlite://run.db`` (two slashes: ``run.db`` is read as a host) is refused with
  the fix. To create a run the file's directory must exist; to read one (``qd show``, ``plot``,
  ``dashboard``) the file must exist, and is never created.
- PostgreSQL: ``postgresql://user:password@host[:port]/database``. The server is connected to once
  (``connect_timeout`` 10 s) so that an unreachable server, a wrong password or a missing database
  is one clear error. Optuna's tables are created under a PostgreSQL advisory lock, so two
  drivers using an empty database for the first time at the same moment do not collide.
- Any other scheme (``mysql://``, ...) is refused: SQLite and PostgreSQL are the storages qd
  supports and tests.

``mask`` hides a URL's password (``postgresql://qd:***@host/db``); ``mask_text`` does so for every
URL in a message. ``check_run_name`` bounds a run name by what Optuna's ``study_name`` column holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from qd.checks import QdError

#: Optuna's ``studies.study_name`` column holds 512 characters.
MAX_RUN_NAME = 512
SUPPORTED = ("sqlite:///PATH (a file), postgresql://USER:PASSWORD@HOST[:PORT]/DATABASE or journal:///PATH "
             "(an Optuna journal file)")
CONNECT_TIMEOUT_S = 10
# Any number held by both drivers: pg_advisory_lock(key) serialises the first creation of the tables.
_TABLES_LOCK_KEY = 0x71645F74  # "qd_t"
_CHECKED: set[tuple[str, bool]] = set()  # (PostgreSQL URL, create) this process already checked
_PLACEHOLDERS = ("***", "PASSWORD")  # in messages that say what is allowed
_URL_WITH_PASSWORD = re.compile(r"(?P<pre>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s'\"]*):(?P<pw>[^@\s'\"]*)@")


class StorageError(QdError, ValueError):
    """A storage URL that is not allowed, or a storage that cannot be reached."""


class RunNotFound(QdError, LookupError):
    """No such run in the storage."""


class DatabaseMissing(StorageError, RunNotFound):
    """A run was to be read from a database that does not exist (nothing was created)."""


def mask(url: str) -> str:
    """``url`` with its password replaced by ``***`` (unchanged when it has none)."""
    if not isinstance(url, str) or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    authority = rest.split("?", 1)[0]
    if "@" not in authority:
        return url
    at = authority.rindex("@")
    credentials = rest[:at]
    if ":" not in credentials:
        return url
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{rest[at + 1:]}"


def mask_text(text: str, urls: Iterable[str] = ()) -> str:
    """``text`` with the password of every URL in it masked (``urls``: ones known to occur, masked exactly)."""
    for url in urls:
        if isinstance(url, str) and url:
            text = text.replace(url, mask(url))
    return _URL_WITH_PASSWORD.sub(lambda m: m.group(0) if m.group("pw") in _PLACEHOLDERS else f"{m.group('pre')}:***@",
                                  text)


def check_run_name(name: object) -> None:
    """Raise ``StorageError`` unless ``name`` is a non-empty string Optuna can store."""
    if not isinstance(name, str) or not name.strip():
        raise StorageError(f"run name {name!r} is not allowed; allowed: a non-empty string")
    if len(name) > MAX_RUN_NAME:
        raise StorageError(f"run name {name[:40]!r}... has {len(name)} characters; allowed: at most {MAX_RUN_NAME}")


def check_storage(url: object, *, create: bool) -> None:
    """Check a storage URL before anything is opened; raises ``StorageError`` saying what is allowed.

    Args:
        url: the storage URL.
        create: True to create a run there (a SQLite file may be created; PostgreSQL tables are
            made); False to read one (a missing SQLite file raises ``DatabaseMissing``).
    """
    if not isinstance(url, str) or "://" not in url:
        raise StorageError(f"storage {url!r} is not allowed; allowed: {SUPPORTED}")
    if url.startswith("journal:"):
        _check_journal(url, create)
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as e:
        raise StorageError(f"storage {mask(url)!r} is not a valid URL ({e}); allowed: {SUPPORTED}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        _check_sqlite(url, parsed.host, parsed.database, create)
    elif backend == "postgresql":
        _check_postgresql(url, create)
    else:
        raise StorageError(f"storage {mask(url)!r}: {backend!r} is not supported; allowed: {SUPPORTED}")


def _check_journal(url: str, create: bool) -> None:
    if not url.startswith("journal:///"):
        raise StorageError(f"storage {url!r}: a journal file takes three slashes: 'journal:///run.log' (relative) or "
                           f"'journal:////abs/path/run.log'")
    path = Path(url[len("journal:///"):])
    _check_file(url, path, create, "journal")
    # The record beside the journal is a SQLite file: the same first-use lock applies.
    _sqlite_tables(f"sqlite:///{path}.qd.db", Path(f"{path}.qd.db"), create=True) if create else None


def _check_sqlite(url: str, host: str | None, database: str | None, create: bool) -> None:
    if host:
        raise StorageError(f"storage {url!r} reads {host!r} as a host name; a SQLite file takes three slashes: "
                           f"'sqlite:///{host}' (relative to the working directory) or 'sqlite:////abs/path/{host}'")
    if not database or database == ":memory:" or database.startswith("file::memory:") or "mode=memory" in url:
        raise StorageError(f"storage {url!r} is an in-memory SQLite database: every result would be lost when the "
                           f"run ends; allowed: a file, e.g. 'sqlite:///qd.db'")
    path = Path(database)
    _check_file(url, path, create, "database")
    _sqlite_tables(url, path, create)


def _check_file(url: str, path: Path, create: bool, what: str) -> None:
    """A storage that is one file (``what``: database, journal): never a directory; to read it, it
    must exist; to create it, its directory must."""
    if path.is_dir() or not path.name:
        raise StorageError(f"storage {url!r}: {str(path)!r} is a directory; allowed: a {what} file path")
    if not path.exists():
        if not create:
            raise DatabaseMissing(f"storage {url!r}: the {what} file {str(path)!r} does not exist (nothing was "
                                  f"created); check the path, or start a run there with `qd run`")
        if not path.parent.is_dir():
            raise StorageError(f"storage {url!r}: the directory {str(path.parent)!r} does not exist; create it first "
                               f"(mkdir -p {path.parent})")


def _sqlite_tables(url: str, path: Path, create: bool) -> None:
    """Make Optuna's tables (``create``) or check that they exist (read) under a lock, so that two
    processes never make them at once ("table already exists", "database disk image is malformed")
    and a reader never makes them at all.

    The lock is a file of its own in the temporary directory: the database file itself must never
    be opened and closed outside SQLite in a process that may hold SQLite connections to it, as
    closing any descriptor of a file drops every POSIX lock the process holds on it (SQLite's
    locks among them), which lets two writers corrupt it.
    """
    import fcntl
    import hashlib
    import sqlite3
    import tempfile

    key = (url, True)
    if key in _CHECKED:
        return
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"qd-sqlite-{digest}.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if create else fcntl.LOCK_SH)
        try:
            if path.exists():
                try:
                    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
                    try:
                        found = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='studies'").fetchone()
                    finally:
                        db.close()
                except sqlite3.DatabaseError as e:
                    if "not a database" in str(e) or "malformed" in str(e):
                        raise StorageError(f"storage {url!r}: {str(path)!r} is not a SQLite database ({e})") from None
                    raise StorageError(f"storage {url!r}: cannot read {str(path)!r} ({e})") from None
            else:
                found = None
            if not found:
                if not create:
                    raise DatabaseMissing(f"storage {url!r}: {str(path)!r} holds no runs (nothing was created)")
                from qd.store import optuna_storage

                storage = optuna_storage(url)  # makes the file and the tables, and sets WAL mode
                if hasattr(storage, "engine"):
                    storage.engine.dispose()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _CHECKED.add(key)


def _check_postgresql(url: str, create: bool) -> None:
    if (url, create) in _CHECKED or (url, True) in _CHECKED:
        return
    import sqlalchemy as sa

    from qd.store import resolve_storage

    resolved = resolve_storage(url)
    try:
        engine = sa.create_engine(resolved, connect_args={"connect_timeout": CONNECT_TIMEOUT_S}, poolclass=sa.NullPool)
    except (ImportError, sa.exc.ArgumentError) as e:
        raise StorageError(f"storage {mask(url)!r}: {e}; install the PostgreSQL driver (pip install psycopg2-binary)") \
            from None
    try:
        with engine.connect() as conn:
            if create:
                _create_tables(conn, resolved)
    except sa.exc.DBAPIError as e:
        reason = str(getattr(e, "orig", e) or e).strip().splitlines()
        raise StorageError(f"cannot use storage {mask(url)!r}: {mask_text(reason[0] if reason else str(e), [url])}") \
            from None
    finally:
        engine.dispose()
    _CHECKED.add((url, create))


def _create_tables(conn: object, url: str) -> None:
    """Create Optuna's tables (if missing) while holding an advisory lock, so that two drivers using an
    empty database for the first time do not both run ``CREATE TABLE`` (one would fail with UniqueViolation)."""
    import optuna
    import sqlalchemy as sa

    conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": _TABLES_LOCK_KEY})
    try:
        optuna.storages.RDBStorage(url).engine.dispose()  # creates the tables and the version row if missing
    finally:
        conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": _TABLES_LOCK_KEY})


__all__ = ["check_storage", "check_run_name", "mask", "mask_text", "StorageError", "DatabaseMissing", "RunNotFound",
           "MAX_RUN_NAME"]
