"""Reading records: a local `.jsonl`/`.json`/`.csv`/`.parquet` file (each record with its
file:line) or a hub dataset id; and where a data path points, as runs record it."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Record:
    """One raw example and where it came from (file:line, or the hub split and row)."""

    data: dict[str, Any]
    where: str


def looks_like_hub_id(path: str) -> bool:
    """A hub dataset id (`org/name` or `name`), not a local file."""
    p = Path(path)
    return (
        not path.startswith((".", "/", "~"))
        and p.suffix.lower() not in SUFFIXES
        and path.count("/") <= 1
        and not p.exists()
    )


def source_of(path: str) -> str:
    """Where records come from, as runs record it: a hub id as given, a file as its absolute path."""
    return path if looks_like_hub_id(path) else str(Path(path).expanduser().resolve())


def read_records(path: str, key: str, split: str = "train") -> list[Record]:
    """Read records from a local file (with file:line positions) or a hub dataset id."""
    p = Path(path).expanduser()
    if not p.exists():
        if looks_like_hub_id(path):
            return _read_hub(path, key, split)
        raise DataError(f"{key}: file not found: {path}")
    if p.is_dir():
        raise DataError(f"{key}: {path} is a folder; expected a {'/'.join(SUFFIXES)} file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(p)
        if suffix == ".json":
            return _read_json(p)
        if suffix == ".csv":
            return _read_csv(p)
        if suffix == ".parquet":
            return _read_parquet(p)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{key}: cannot read {path}: {e}") from None
    raise DataError(f"{key}: {path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")


def _read_jsonl(p: Path) -> list[Record]:
    out = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{n}: malformed JSON line ({_json_problem(e)})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{n}: expected a JSON object, got {type(obj).__name__}")
            out.append(Record(obj, f"{p}:{n}"))
    return out


def _json_problem(e: json.JSONDecodeError) -> str:
    """`Expecting ',' delimiter at column 41`: some of json's messages end in "at" already
    ("Invalid control character at"), which must not read "at at"."""
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def _read_json(p: Path) -> list[Record]:
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: malformed JSON ({e.msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{p}: expected a JSON list of records (or {{'data': [...]}})")
    out = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise DataError(f"{p}: record {i}: expected an object, got {type(item).__name__}")
        out.append(Record(item, f"{p}: record {i}"))
    return out


def _read_csv(p: Path) -> list[Record]:
    out = []
    with p.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            out.append(Record(dict(row), f"{p}:{reader.line_num}"))
    return out


def _read_parquet(p: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{p}: not a readable parquet file ({e})") from None
    return [Record(r, f"{p}: row {i}") for i, r in enumerate(rows)]


def _read_hub(name: str, key: str, split: str) -> list[Record]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown id, gated: all one message for the user
        raise DataError(
            f"{key}: {name!r} is neither a local file nor a loadable hub dataset "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    return [Record(dict(r), f"{name}[{split}] row {i}") for i, r in enumerate(ds)]
