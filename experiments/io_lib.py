"""Atomic file output: a reader (or a killed run) never sees a half-written file."""

import json
import os
import tempfile


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


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def json_line(record: dict) -> str:
    """One JSON-lines record (sorted keys, newline-terminated)."""
    return json.dumps(record, sort_keys=True) + "\n"


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
