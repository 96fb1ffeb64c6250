"""A run's records out of llmbench: JSON lines, CSV, Parquet, and the schema as text.

JSON keeps every field as stored (nested lists and dicts included); CSV keeps the flat ones;
Parquet keeps every field, nested ones as JSON text. `llmbench gate` reads all three back.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TextIO


def write_records(records: list[dict], fmt: str, stream: TextIO) -> None:
    """`json`: one object per trial per line; `csv`: the flat fields, one row per trial."""
    if fmt == "json":
        for r in records:
            stream.write(json.dumps(r) + "\n")
        return
    if fmt != "csv":
        raise ValueError(f"unknown export format {fmt!r}")
    from .report.frames import trials_frame

    buf = io.StringIO()
    df = trials_frame(records)
    df = df[[c for c in df.columns if not df[c].map(lambda v: isinstance(v, (dict, list, tuple))).any()]]
    df.to_csv(buf, index=False, quoting=csv.QUOTE_MINIMAL)
    stream.write(buf.getvalue())


def write_parquet(records: list[dict], path: Path) -> int:
    """Every field, one row per trial; nested fields (lists, dicts) as JSON text. Returns the rows written."""
    from .report.frames import trials_frame

    df = trials_frame(records)
    for col in df.columns:
        if df[col].map(lambda v: isinstance(v, (list, dict, tuple))).any():
            df[col] = df[col].map(json.dumps)
    df.to_parquet(path, index=False)
    return len(df)


def schema_text(fmt: str) -> str:
    """The record schema as `json` (version and fields) or `markdown` (docs/record.md)."""
    from .schema import SCHEMA_VERSION, fields, markdown

    if fmt == "markdown":
        return markdown()
    if fmt == "json":
        return json.dumps({"schema_version": SCHEMA_VERSION, "fields": fields()}, indent=1) + "\n"
    raise ValueError(f"the schema prints as json or markdown, not {fmt!r}")
