"""`cmu_mosi`, `cmu_mosei` and `iemocap` from the published feature pickles (DESIGN.md §6).

Two layouts are read, each a dict ``{"train", "valid", "test"}`` of dicts of arrays:

- **MMSA** (``aligned_50.pkl`` / ``unaligned_50.pkl``, MOSI and MOSEI): ``text`` ``[N, L, 768]``
  (BERT features), ``text_bert`` ``[N, 3, L]`` (token ids, attention mask, segment ids), ``audio``
  ``[N, T_a, D_a]``, ``vision`` ``[N, T_v, D_v]``, ``regression_labels`` ``[N]`` in [-3, 3], plus
  ``raw_text``, ``id``, ``annotations``, ``classification_labels`` (not used); the unaligned file
  also has ``audio_lengths`` and ``vision_lengths`` ``[N]``.
- **MulT** (``mosi_data.pkl``, ``mosei_senti_data.pkl``, ``iemocap_data.pkl``): ``text``
  ``[N, T, 300]``, ``audio``, ``vision``, ``labels`` (``[N, 1, 1]`` sentiment in [-3, 3], or
  ``[N, 4, 2]`` one-hot for IEMOCAP) and ``id`` (not used).

Loader quirks reproduced from MMSA's ``data_loader.py`` and MulT's ``dataset.py``: features are cast
to float32 and ``audio[audio == -inf] = 0`` (how many were replaced is logged and kept in the built
dataset's metadata). Any other non-finite value is an error. Where the ``-inf`` were is kept in
``SourceData.absent``, so that ``dataset.normalize`` leaves them out of its statistics and keeps
them at 0 (they are "no value", not a value of 0).

Lengths: MMSA text length is the sum of the attention-mask row of ``text_bert``. In the aligned
file audio and vision are word-aligned to the text tokens, so they share the text length (capped
at their T); the unaligned file gives their lengths. MulT pickles are padded to a fixed T and carry
no lengths, so every length is T.

Labels: sentiment (MOSI/MOSEI) is the float32 regression score; IEMOCAP is the argmax of each
emotion's 2-way one-hot, int32 ``[4]`` in {0, 1} (1 = emotion present), in MulT's order
Neutral, Happy, Sad, Angry.
"""

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from data_pipelines._common import (
    SPLITS,
    SourceData,
    check_finite,
    check_has_features,
    check_num_examples,
    check_same_dims,
    file_fingerprint,
    get_splits,
    input_error,
    load_pickle,
    numeric_array,
    require_keys,
)

MODALITIES = ("text", "audio", "vision")
IEMOCAP_LABELS = ("Neutral", "Happy", "Sad", "Angry")
LAYOUTS = ("auto", "mmsa_aligned", "mmsa_unaligned", "mult")
MMSA_FILES = {"mmsa_aligned": "aligned_50.pkl", "mmsa_unaligned": "unaligned_50.pkl"}
MULT_FILES = {
    "cmu_mosi": "mosi_data.pkl",
    "cmu_mosei": "mosei_senti_data.pkl",
    "iemocap": "iemocap_data.pkl",
}
NAMES = tuple(MULT_FILES)


def _candidates(name: str, layout: str) -> list[tuple[str, str]]:
    """(file name, layout) pairs to look for; auto order: MMSA aligned, unaligned, then MulT."""
    mmsa = [] if name == "iemocap" else [(f, lay) for lay, f in MMSA_FILES.items()]
    mult = [(MULT_FILES[name], "mult")]
    if layout == "auto":
        return mmsa + mult
    if layout == "mult":
        return mult
    return [(MMSA_FILES[layout], layout)]


def resolve(dataset_cfg, name: str) -> tuple[str, str]:
    """Finds the pickle: returns (file path, layout), layout "auto" only for a direct file path."""
    path = dataset_cfg.get("path", "") or ""
    layout = dataset_cfg.get("layout", "auto") or "auto"
    if layout not in LAYOUTS:
        raise ValueError(
            f"config.dataset.layout for {name!r} must be one of {list(LAYOUTS)}, got {layout!r}"
        )
    if name == "iemocap" and layout.startswith("mmsa"):
        raise ValueError(
            f"config.dataset.layout {layout!r}: iemocap only exists in the MulT layout "
            f"({MULT_FILES['iemocap']}); use 'mult' or 'auto'"
        )
    files = [f for f, _ in _candidates(name, layout)]
    if not path:
        raise ValueError(
            f"config.dataset.path is empty: {name!r} needs the folder holding "
            f"{' or '.join(files)} (the published pickles; see README)"
        )
    if os.path.isfile(path):
        return path, layout
    if not os.path.isdir(path):
        raise input_error(
            path,
            None,
            None,
            f"no such file or folder (dataset {name!r} looks for {' or '.join(files)})",
        )
    for f, lay in _candidates(name, layout):
        if os.path.isfile(os.path.join(path, f)):
            return os.path.join(path, f), lay
    raise input_error(
        path,
        None,
        None,
        f"file not found: none of {files} is in this folder (dataset {name!r}, layout {layout!r})",
    )


def identity(dataset_cfg, name: str) -> dict[str, Any]:
    """Everything that changes the stored data, for the build cache."""
    file, layout = resolve(dataset_cfg, name)
    return {"tag": layout, "layout": layout, "file": file_fingerprint(file)}


def _detect_layout(splits: Mapping[str, Mapping[str, Any]]) -> str:
    train = splits["train"]
    if "regression_labels" in train:
        return "mmsa_unaligned" if "audio_lengths" in train else "mmsa_aligned"
    return "mult"


def load(dataset_cfg, name: str) -> SourceData:
    """Reads, checks and converts one of the affect pickles.

    Args:
      dataset_cfg: ConfigDict/dict with ``path`` (folder or file) and ``layout``.
      name: "cmu_mosi" | "cmu_mosei" | "iemocap".

    Returns:
      SourceData with modalities ("text", "audio", "vision"), each ``[N, T_m, D_m] float32``;
      ``lengths`` ``[N, 3] int32``; ``label`` ``[N] float32`` in [-3, 3] (sentiment) or
      ``[N, 4] int32`` in {0, 1} (IEMOCAP).
    """
    file, layout = resolve(dataset_cfg, name)
    raw = get_splits(load_pickle(file), file)
    if layout == "auto":
        layout = _detect_layout(raw)
    iemocap = name == "iemocap"
    if iemocap and layout != "mult":
        raise input_error(
            file,
            None,
            None,
            f"looks like an MMSA {layout} file, but iemocap only exists in the MulT layout",
        )
    splits, replaced, absent = {}, {}, {}
    for split in SPLITS:
        if layout == "mult":
            arrays, neg_inf = _read_mult_split(raw[split], file=file, split=split, iemocap=iemocap)
        else:
            arrays, neg_inf = _read_mmsa_split(
                raw[split], file=file, split=split, aligned=layout == "mmsa_aligned"
            )
        splits[split] = arrays
        replaced[split] = int(neg_inf.sum())
        absent[split] = {"audio": neg_inf}
    for m in MODALITIES:
        check_same_dims(
            {s: splits[s][m].shape for s in SPLITS}, files=dict.fromkeys(SPLITS, file), key=m
        )
    logging.info(
        "%s: replaced %d -inf audio values with 0 (train %d, valid %d, test %d), as the "
        "MMSA/MulT loaders do",
        file,
        sum(replaced.values()),
        replaced["train"],
        replaced["valid"],
        replaced["test"],
    )
    return SourceData(
        modalities=MODALITIES,
        splits=splits,
        task="multilabel" if iemocap else "regression",
        num_classes=len(IEMOCAP_LABELS) if iemocap else 1,
        metric_family="iemocap" if iemocap else "sentiment",
        label_names=IEMOCAP_LABELS if iemocap else (),
        notes={"layout": layout, "file": file, "audio_neg_inf_replaced": replaced},
        absent=absent,
    )


def _features(
    d: Mapping[str, Any], *, file: str, split: str
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """text/audio/vision as float32 ``[N, T, D]``, audio -inf -> 0.

    Returns:
      The features, and the ``[N, T_a, D_a]`` bool mask of the audio entries that were -inf.
    """
    out = {}
    for m in MODALITIES:
        x = numeric_array(d[m], ranks=(3,), file=file, split=split, key=m).astype(np.float32)
        check_has_features(x, file=file, split=split, key=m)
        out[m] = x
    neg_inf = np.isneginf(out["audio"])
    out["audio"][neg_inf] = 0.0  # MMSA / MulT: audio[audio == -np.inf] = 0
    for m in MODALITIES:
        check_finite(out[m], file=file, split=split, key=m)
    return out, neg_inf


def _sentiment(value: Any, *, file: str, split: str, key: str) -> np.ndarray:
    """Per-example sentiment ``[N]`` float32 in [-3, 3] (MMSA has ``[N]``, MulT ``[N, 1, 1]``)."""
    y = numeric_array(
        value, ranks=(1, 2, 3), file=file, split=split, key=key, what="[N], [N, 1] or [N, 1, 1]"
    )
    if y.shape[1:] not in ((), (1,), (1, 1)):
        raise input_error(
            file, split, key, f"expected [N], [N, 1] or [N, 1, 1], got shape {y.shape}"
        )
    y = y.reshape(len(y)).astype(np.float32)
    check_finite(y, file=file, split=split, key=key)
    if len(y) and (np.abs(y) > 3.0).any():
        i = int(np.argmax(np.abs(y)))
        raise input_error(
            file, split, key, f"sentiment label {float(y[i])} at index {i} is outside [-3, 3]"
        )
    return y


def _lengths(value: Any, n: int, t: int, *, file: str, split: str, key: str) -> np.ndarray:
    """Per-example lengths ``[N]`` int32 in [0, t] (MMSA stores them as lists)."""
    x = numeric_array(value, ranks=(1,), file=file, split=split, key=key)
    if len(x) != n:
        raise input_error(file, split, key, f"has {len(x)} examples but 'audio' has {n}")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x) & (x == np.round(x))):
        raise input_error(file, split, key, "lengths must be whole numbers")
    if len(x) and (x.min() < 0 or x.max() > t):
        raise input_error(
            file,
            split,
            key,
            f"lengths must lie in [0, {t}] (the padded length), got min {x.min()} max {x.max()}",
        )
    return x.astype(np.int32)


def _read_mmsa_split(d, *, file: str, split: str, aligned: bool):
    keys = ["text", "text_bert", "audio", "vision", "regression_labels"]
    if not aligned:
        keys += ["audio_lengths", "vision_lengths"]
    require_keys(d, keys, file=file, split=split)
    feats, neg_inf = _features(d, file=file, split=split)
    text_bert = numeric_array(
        d["text_bert"],
        ranks=(3,),
        file=file,
        split=split,
        key="text_bert",
        what="rank 3 [N, 3, L] (ids, attention mask, segment ids)",
    )
    label = _sentiment(d["regression_labels"], file=file, split=split, key="regression_labels")
    n = check_num_examples(
        {m: len(feats[m]) for m in MODALITIES}
        | {"text_bert": len(text_bert), "regression_labels": len(label)},
        file=file,
        split=split,
    )
    length_t = feats["text"].shape[1]
    if text_bert.shape[1:] != (3, length_t):
        raise input_error(
            file,
            split,
            "text_bert",
            f"expected [N, 3, L] with L = {length_t} (the "
            f"text length), got shape {text_bert.shape}",
        )
    text_len = np.rint(text_bert[:, 1, :].sum(axis=-1)).astype(np.int32)  # attention-mask row sum
    t_a, t_v = feats["audio"].shape[1], feats["vision"].shape[1]
    if aligned:
        audio_len, vision_len = np.minimum(text_len, t_a), np.minimum(text_len, t_v)
    else:
        audio_len = _lengths(
            d["audio_lengths"], n, t_a, file=file, split=split, key="audio_lengths"
        )
        vision_len = _lengths(
            d["vision_lengths"], n, t_v, file=file, split=split, key="vision_lengths"
        )
    feats["lengths"] = np.stack([text_len, audio_len, vision_len], axis=1).astype(np.int32)
    feats["label"] = label
    return feats, neg_inf


def _read_mult_split(d, *, file: str, split: str, iemocap: bool):
    require_keys(d, [*MODALITIES, "labels"], file=file, split=split)
    feats, neg_inf = _features(d, file=file, split=split)
    if iemocap:
        feats["label"] = _iemocap_labels(d["labels"], file=file, split=split)
    else:
        feats["label"] = _sentiment(d["labels"], file=file, split=split, key="labels")
    n = check_num_examples(
        {m: len(feats[m]) for m in MODALITIES} | {"labels": len(feats["label"])},
        file=file,
        split=split,
    )
    feats["lengths"] = np.tile(np.array([feats[m].shape[1] for m in MODALITIES], np.int32), (n, 1))
    return feats, neg_inf


def _iemocap_labels(value: Any, *, file: str, split: str) -> np.ndarray:
    """MulT's ``[N, 4, 2]`` one-hot -> ``[N, 4] int32``, 1 where the emotion is present."""
    y = numeric_array(
        value, ranks=(3,), file=file, split=split, key="labels", what="[N, 4, 2] one-hot"
    )
    if y.shape[1:] != (len(IEMOCAP_LABELS), 2):
        raise input_error(file, split, "labels", f"expected [N, 4, 2] one-hot, got shape {y.shape}")
    not_binary = ~((y == 0) | (y == 1))
    if not_binary.any():
        first = tuple(int(i) for i in np.argwhere(not_binary)[0])
        raise input_error(
            file, split, "labels", f"one-hot labels must be 0 or 1, got {y[first]} at index {first}"
        )
    sums = y.sum(axis=-1)
    if (sums != 1).any():
        first = tuple(int(i) for i in np.argwhere(sums != 1)[0])
        raise input_error(
            file,
            split,
            "labels",
            f"each emotion's 2-way label must be one-hot, but index {first} sums to {sums[first]}",
        )
    return np.argmax(y, axis=-1).astype(np.int32)
