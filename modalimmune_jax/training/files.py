"""Every file a run writes: strict JSON through one writer, written atomically.

A reader (or a killed run) never sees a half-written file: text goes to a temp file in the same
folder, is fsynced, then renamed over the target. Every JSON document and JSON-lines record goes
through `to_json`, which writes strict JSON (``allow_nan=False``): a non-finite number (an
undefined figure, such as an invalid certificate's bound) is written as ``null``, never as the
``NaN`` / ``Infinity`` tokens that strict JSON parsers reject.
"""

import json
import math
import os
import tempfile
from collections.abc import Mapping

import numpy as np


def _strict(obj):
    """`obj` with numpy scalars/arrays as Python values and non-finite floats as None."""
    if isinstance(obj, Mapping):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _strict(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def to_json(obj, *, indent: int | None = None) -> str:
    """Strict JSON text of `obj` (sorted keys; non-finite numbers become null)."""
    return json.dumps(_strict(obj), indent=indent, sort_keys=True, allow_nan=False)


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` to a temp file in the same folder, fsyncs, then renames over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj) -> None:
    """Writes `obj` as strict, indented JSON, atomically."""
    atomic_write_text(path, to_json(obj, indent=2) + "\n")


def json_line(record: Mapping) -> str:
    """One strict JSON-lines record (sorted keys, newline-terminated)."""
    return to_json(record) + "\n"


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file; a torn last line (a killed writer) is dropped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def truncate_jsonl(path: str, *, max_step: int) -> None:
    """Keeps only records with ``step <= max_step`` (a resumed run re-logs the rest)."""
    if not os.path.exists(path):
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= max_step]
    atomic_write_text(path, "".join(json_line(r) for r in kept))
