"""`npz`: a user's own dataset in the DESIGN.md §7 folder format.

The folder holds ``train.npz``, ``valid.npz``, ``test.npz`` and optionally ``meta.json``
(``{"task": "classification" | "regression", "modalities": [...]}``). Each ``.npz`` holds one
array per modality, ``[N, T, D]`` (a sequence) or ``[N, D]`` (a vector), and ``labels`` ``[N]``.

- Modality order: meta.json's list, else the train file's array names, sorted, minus ``labels``.
- Task: meta.json's, else inferred from the train labels' dtype (integer -> classification,
  float -> regression), and logged.
- Classification labels must be integers in [0, C) with C = max + 1 over train; valid and test
  labels must lie within it. Regression labels are cast to float32.
- Lengths are the stored T (1 for vectors): the format has no per-example lengths.
- Arrays are loaded with ``allow_pickle=False``, so an ``.npz`` cannot run code.
"""

import json
import os
import zipfile
from typing import Any

import numpy as np
from absl import logging

from data_pipelines._common import (
    SPLITS,
    SourceData,
    check_finite,
    check_has_features,
    check_modality_name,
    check_num_examples,
    check_same_dims,
    file_fingerprint,
    input_error,
    numeric_array,
)

LABEL_KEY = "labels"
TASKS = ("classification", "regression")


def _paths(dataset_cfg) -> tuple[str, dict[str, str], str]:
    folder = dataset_cfg.get("path", "") or ""
    if not folder:
        raise ValueError(
            "config.dataset.path is empty: the npz dataset needs a folder holding "
            "train.npz, valid.npz and test.npz"
        )
    if not os.path.isdir(folder):
        raise input_error(
            folder,
            None,
            None,
            "no such folder (the npz dataset needs train.npz, valid.npz, test.npz)",
        )
    files = {split: os.path.join(folder, f"{split}.npz") for split in SPLITS}
    for split, f in files.items():
        if not os.path.isfile(f):
            raise input_error(f, split, None, "file not found")
    return folder, files, os.path.join(folder, "meta.json")


def identity(dataset_cfg) -> dict[str, Any]:
    """Everything that changes the stored data, for the build cache: the files' fingerprints."""
    folder, files, meta = _paths(dataset_cfg)
    out = {split: file_fingerprint(f) for split, f in files.items()}
    out["meta"] = file_fingerprint(meta) if os.path.isfile(meta) else None
    tag = "".join(c if c.isalnum() else "_" for c in os.path.basename(os.path.abspath(folder)))
    return {"tag": tag.lower()[:40] or "npz", **out}


def _read_meta(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise input_error(path, None, None, f"not readable JSON ({e})") from e
    if not isinstance(meta, dict):
        raise input_error(path, None, None, f"expected a JSON object, got {type(meta).__name__}")
    if "task" in meta and meta["task"] not in TASKS:
        raise input_error(path, None, "task", f"must be one of {list(TASKS)}, got {meta['task']!r}")
    if "modalities" in meta:
        mods = meta["modalities"]
        if not isinstance(mods, list) or not mods or not all(isinstance(m, str) for m in mods):
            raise input_error(
                path, None, "modalities", f"expected a non-empty list of names, got {mods!r}"
            )
        if len(set(mods)) != len(mods):
            raise input_error(path, None, "modalities", f"names repeat: {mods}")
        for m in mods:
            check_modality_name(m, file=path)
    return meta


def _read_npz(path: str, split: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise input_error(path, split, None, f"not a readable .npz ({e!r})") from e


def load(dataset_cfg) -> SourceData:
    """Reads and checks the three splits.

    Returns:
      SourceData with the modalities in the order above, each ``[N, T, D]`` or ``[N, D]`` float32;
      ``lengths`` ``[N, M] int32``; ``label`` ``[N] int32`` (classification) or ``float32``.
    """
    _, files, meta_path = _paths(dataset_cfg)
    meta = _read_meta(meta_path)
    raw = {split: _read_npz(files[split], split) for split in SPLITS}
    if "modalities" in meta:
        modalities = tuple(meta["modalities"])
        if not modalities:
            raise input_error(meta_path, None, "modalities", "empty list: name at least one")
    else:
        modalities = tuple(sorted(k for k in raw["train"] if k != LABEL_KEY))
        if not modalities:
            raise input_error(files["train"], "train", None, "no modality arrays besides 'labels'")
        for m in modalities:
            check_modality_name(m, file=files["train"])

    splits, labels = {}, {}
    for split in SPLITS:
        f, d = files[split], raw[split]
        for key in (*modalities, LABEL_KEY):
            if key not in d:
                raise input_error(f, split, key, f"missing key; the file has {sorted(d)}")
        arrays = {}
        for m in modalities:
            x = numeric_array(
                d[m],
                ranks=(2, 3),
                file=f,
                split=split,
                key=m,
                what="rank 3 [N, T, D] or rank 2 [N, D]",
            )
            x = x.astype(np.float32)
            check_has_features(x, file=f, split=split, key=m)
            check_finite(x, file=f, split=split, key=m)
            arrays[m] = x
        labels[split] = numeric_array(d[LABEL_KEY], ranks=(1,), file=f, split=split, key=LABEL_KEY)
        n = check_num_examples(
            {LABEL_KEY: len(labels[split]), **{m: len(arrays[m]) for m in modalities}},
            file=f,
            split=split,
        )
        arrays["lengths"] = np.tile(
            np.array(
                [x.shape[1] if x.ndim == 3 else 1 for x in (arrays[m] for m in modalities)],
                np.int32,
            ),
            (n, 1),
        )
        splits[split] = arrays
    for m in modalities:
        check_same_dims({s: splits[s][m].shape for s in SPLITS}, files=files, key=m)

    task = meta.get("task")
    if task is None:
        task = "classification" if labels["train"].dtype.kind in "iu" else "regression"
        logging.info(
            "%s: no task in meta.json; labels dtype %s -> %s",
            files["train"],
            labels["train"].dtype,
            task,
        )
    if task == "classification":
        num_classes = _check_class_labels(labels, files)
        for split in SPLITS:
            splits[split]["label"] = labels[split].astype(np.int32)
    else:
        num_classes = 1
        for split in SPLITS:
            y = labels[split].astype(np.float32)
            check_finite(y, file=files[split], split=split, key=LABEL_KEY)
            splits[split]["label"] = y
    return SourceData(
        modalities=modalities,
        splits=splits,
        task=task,
        num_classes=num_classes,
        metric_family=task,
        notes={"source_files": files},
    )


def _check_class_labels(labels: dict[str, np.ndarray], files: dict[str, str]) -> int:
    """Integer labels in [0, C), C = max + 1 over train; returns C."""
    for split in SPLITS:
        y, f = labels[split], files[split]
        if y.dtype.kind not in "iu":
            raise input_error(
                f,
                split,
                LABEL_KEY,
                f"classification labels must be integers, got dtype {y.dtype} "
                '(for real-valued targets set "task": "regression" in meta.json)',
            )
        if (y < 0).any():
            raise input_error(f, split, LABEL_KEY, f"negative class label {int(y.min())}")
    classes = np.unique(labels["train"])
    if classes.size < 2:
        raise input_error(
            files["train"], "train", LABEL_KEY,
            f"one class only (every label is {int(classes[0])}): a classifier needs at least "
            'two (for real-valued targets set "task": "regression" in meta.json)')
    num_classes = int(labels["train"].max()) + 1
    for split in ("valid", "test"):
        y = labels[split]
        if (y >= num_classes).any():
            raise input_error(
                files[split],
                split,
                LABEL_KEY,
                f"label {int(y.max())} >= C = {num_classes} (C = max train label + 1)",
            )
    return num_classes
