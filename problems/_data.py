"""Reading a user's data by path, with errors that name the option, the value and what was expected.

Three kinds of input:

- labelled tables (``read_table``): CSV, TSV, JSON Lines, Parquet, or a folder written by
  ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with pyarrow, so the
  ``datasets`` library is not needed). A file without a known suffix is sniffed: a tab in its first
  line makes it TSV, a ``{`` JSON Lines, anything else CSV.
- documents (``read_documents``): a folder of ``.txt`` / ``.md`` files (the id is the path inside
  the folder) or a JSON Lines file of ``{"id": ..., "text": ...}`` objects.
- questions (``read_questions``): a JSON Lines file of ``{"question": ..., "answer": ...}`` and/or
  ``"doc_id"`` objects.

All checks run when a problem is built, so bad input fails before any evaluation.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qd.checks import OptionError, is_number

TABLE_FORMATS = ("auto", "csv", "tsv", "jsonl", "parquet", "arrow")
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
             ".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow"}
DOCUMENT_SUFFIXES = (".txt", ".md")


class DataError(OptionError):
    """A data option that cannot be used; the message names the option, the value and what was expected."""


def _where(owner: str, option: str, value: Any) -> str:
    return f"{owner} option {option}={str(value)!r}"


def existing_path(owner: str, option: str, value: Any, expected: str) -> Path:
    """``value`` as a Path that exists, else a DataError naming ``option`` and what it should be."""
    if not isinstance(value, (str, Path)) or not str(value):
        raise DataError(f"{_where(owner, option, value)} is not allowed; expected a path to {expected}")
    path = Path(value).expanduser()
    if not path.exists():
        raise DataError(f"{_where(owner, option, value)}: no such file or folder "
                        f"(relative paths start at {Path.cwd()}); expected a path to {expected}")
    return path


def absolute(value: Any) -> Any:
    """An existing path option as an absolute path (workers, e.g. Ray's, may start in another folder);
    anything else unchanged. Call it after the option has been checked, so errors show the value given."""
    if isinstance(value, (str, Path)) and str(value) and Path(value).expanduser().exists():
        return str(Path(value).expanduser().absolute())
    return value


# --- tables -------------------------------------------------------------------------------
def table_format(path: Path, fmt: str, owner: str, option: str) -> str:
    """The format of the table at ``path``: ``fmt`` itself, or for ``"auto"`` one told from the path
    (a folder: ``"arrow"``; else its suffix, else its first line).

    Raises:
        DataError: ``fmt`` is not one of ``TABLE_FORMATS``.
    """
    if fmt not in TABLE_FORMATS:
        raise DataError(f"{owner} option dataset_format={fmt!r} is not allowed; allowed: {list(TABLE_FORMATS)}")
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "arrow"
    if path.suffix.lower() in _SUFFIXES:
        return _SUFFIXES[path.suffix.lower()]
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    if "\t" in first:
        return "tsv"
    return "jsonl" if first.lstrip().startswith("{") else "csv"


def read_table(value: Any, owner: str = "peft", option: str = "dataset", fmt: str = "auto") -> dict[str, pd.DataFrame]:
    """The table(s) at ``value``: ``{"all": frame}`` for one file or one saved Dataset, or one frame per
    split (``train``, ``validation``, ``test``, ...) for a saved DatasetDict. Every column is kept as read."""
    path = existing_path(owner, option, value, "a CSV, TSV, JSON Lines or Parquet file, or a save_to_disk folder")
    kind = table_format(path, fmt, owner, option)
    try:
        if kind == "arrow":
            return _read_saved_dataset(path, owner, option, value)
        if path.is_dir():
            raise DataError(f"{_where(owner, option, value)} is a folder but dataset_format={kind!r}; "
                            f"expected a {kind} file, or dataset_format='arrow' for a save_to_disk folder")
        if kind == "csv":
            frame = pd.read_csv(path, keep_default_na=False)
        elif kind == "tsv":  # TSV has no quoting: a quote is part of the text (as in the SMS Spam Collection)
            frame = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)
        elif kind == "jsonl":
            frame = pd.read_json(path, lines=path.suffix.lower() != ".json" or _is_json_lines(path))
        else:
            frame = pd.read_parquet(path)
    except DataError:
        raise
    except Exception as e:  # a parser's own message says where the file is malformed
        raise DataError(f"{_where(owner, option, value)} could not be read as {kind}: {type(e).__name__}: {e}") from None
    if len(frame) == 0:
        raise DataError(f"{_where(owner, option, value)} holds no rows; expected a table with one example per row")
    return {"all": frame}


def _is_json_lines(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        return not f.read(64).lstrip().startswith("[")


def _read_saved_dataset(path: Path, owner: str, option: str, value: Any) -> dict[str, pd.DataFrame]:
    import pyarrow as pa

    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        return {name: _read_saved_dataset(path / name, owner, option, f"{value}/{name}")["all"] for name in splits}
    files = sorted(path.glob("data-*.arrow")) or sorted(path.glob("*.arrow"))
    if not files:
        raise DataError(f"{_where(owner, option, value)} is a folder without .arrow files; expected a folder "
                        f"written by datasets' save_to_disk (data-*.arrow, dataset_info.json)")
    tables = []
    for file in files:
        with pa.memory_map(str(file)) as source:
            try:
                tables.append(pa.ipc.open_stream(source).read_all())
            except pa.ArrowInvalid:
                tables.append(pa.ipc.open_file(source).read_all())
    return {"all": pa.concat_tables(tables).to_pandas()}


def require_column(frame: pd.DataFrame, owner: str, option: str, column: Any, dataset: Any) -> None:
    """Raise ``DataError`` naming the option and the dataset's columns when ``column`` is not one."""
    if column not in frame.columns:
        raise DataError(f"{owner} option {option}={column!r} is not a column of dataset {str(dataset)!r}; "
                        f"expected one of its columns: {[str(c) for c in frame.columns]}")


@dataclass
class Labelled:
    """Texts (or feature rows) with integer labels indexing ``classes``."""

    texts: list[str]
    labels: np.ndarray  # (n,) int64
    classes: list[str]


def class_index(values: Sequence[Any], owner: str, option: str, column: str, dataset: Any) -> list[str]:
    """The sorted distinct labels, as strings; at least two, or a DataError."""
    classes = sorted({str(v) for v in values})
    if len(classes) < 2:
        raise DataError(f"{owner} option {option}={column!r} of dataset {str(dataset)!r} holds "
                        f"{len(classes)} class{'' if len(classes) == 1 else 'es'} ({classes}); expected at least 2")
    return classes


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A permutation of the examples whose every prefix keeps the class proportions.

    Each example's key is its (shuffled) rank within its class divided by the class size, so taking
    the first n rows samples every class in proportion, even when n is below the number of classes.
    """
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keys[rng.permutation(members)] = (np.arange(len(members)) + rng.random(len(members))) / len(members)
    return np.argsort(keys, kind="stable")


def split_size(owner: str, option: str, value: Any, available: int) -> int:
    """``value`` as a number of rows: an integer >= 1, or a fraction in (0, 1) of ``available``."""
    bad = DataError(f"{owner} option {option}={value!r} is not allowed; expected an integer >= 1 or a fraction in (0, 1)")
    if not is_number(value):
        raise bad
    if isinstance(value, float) and 0 < value < 1:
        return max(1, round(value * available))
    if value < 1 or not float(value).is_integer():
        raise bad
    return int(value)


# --- documents and questions --------------------------------------------------------------
@dataclass(frozen=True)
class Document:
    """A corpus document: its id and its text."""

    id: str
    text: str


@dataclass(frozen=True)
class UserQuestion:
    """A question with its gold answer text, its gold document id, or both."""

    text: str
    answer: str | None
    doc_id: str | None


def read_documents(value: Any, owner: str = "rag", option: str = "corpus") -> list[Document]:
    """Documents of a folder of .txt/.md files (recursively, sorted by path) or of a JSON Lines file."""
    expected = "a folder of .txt/.md files or a JSON Lines file of {\"id\", \"text\"} objects"
    path = existing_path(owner, option, value, expected)
    docs: list[Document] = []
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES):
            text = file.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                docs.append(Document(file.relative_to(path).as_posix(), text))
    else:
        for number, row in _json_lines(path, owner, option, value):
            if not isinstance(row.get("text"), str):
                raise DataError(f"{_where(owner, option, value)} line {number}: no string field 'text'; expected "
                                f"one {{\"id\": ..., \"text\": ...}} object per line")
            if row["text"].strip():
                docs.append(Document(str(row.get("id", number)), row["text"]))
    if not docs:
        raise DataError(f"{_where(owner, option, value)} holds no documents (no non-empty .txt/.md file or JSON "
                        f"line); expected {expected}")
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{_where(owner, option, value)}: document id {duplicate!r} appears more than once; expected unique ids")
    return docs


def read_questions(value: Any, doc_ids: set[str], owner: str = "rag", option: str = "questions") -> list[UserQuestion]:
    """Questions of a JSON Lines file; each needs ``question`` and at least one of ``answer`` and ``doc_id``
    (a ``doc_id`` must name a corpus document)."""
    path = existing_path(owner, option, value, 'a JSON Lines file of {"question", "answer" and/or "doc_id"} objects')
    out = []
    for number, row in _json_lines(path, owner, option, value):
        question, answer, doc_id = row.get("question"), row.get("answer"), row.get("doc_id")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{_where(owner, option, value)} line {number}: no string field 'question'")
        if answer is None and doc_id is None:
            raise DataError(f"{_where(owner, option, value)} line {number}: neither 'answer' nor 'doc_id'; expected "
                            f"the gold answer text, the gold document id, or both")
        if doc_id is not None and str(doc_id) not in doc_ids:
            raise DataError(f"{_where(owner, option, value)} line {number}: doc_id={doc_id!r} is not a document of the "
                            f"corpus; expected one of its ids (e.g. {sorted(doc_ids)[:3]})")
        out.append(UserQuestion(question, None if answer is None else str(answer), None if doc_id is None else str(doc_id)))
    if not out:
        raise DataError(f"{_where(owner, option, value)} holds no questions")
    return out


def _json_lines(path: Path, owner: str, option: str, value: Any):
    if path.is_dir():
        raise DataError(f"{_where(owner, option, value)} is a folder; expected a JSON Lines file")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{_where(owner, option, value)} line {number} is not JSON ({e}); expected one object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{_where(owner, option, value)} line {number} is not a JSON object")
            yield number, row
