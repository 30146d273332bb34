"""Writers of tiny dataset files in the exact published layouts, for tests.

- MMSA (``aligned_50.pkl`` / ``unaligned_50.pkl``): every key of the published splits, with
  ``-inf`` in audio, str ids, lists for the unaligned lengths.
- MulT (``mosi_data.pkl``, ``mosei_senti_data.pkl``, ``iemocap_data.pkl``): bytes ids, ``labels``
  ``[N, 1, 1]`` float32 or IEMOCAP's ``[N, 4, 2]`` one-hot.
- The DESIGN.md §7 npz folder.

Each writer returns the exact object it wrote, so tests can compute expected values from the raw
data independently of the loaders. Shapes are tiny (N = 6/4/4 by default, short sequences).
"""

import json
import os
import pickle

import numpy as np

SPLITS = ("train", "valid", "test")
DEFAULT_SIZES = (6, 4, 4)
# Published per-dataset feature dims: (text, audio, vision).
MMSA_DIMS = {"mosi": (768, 5, 20), "mosei": (768, 74, 35)}
MULT_DIMS = {"mosi": (300, 5, 20), "mosei": (300, 74, 35), "iemocap": (300, 74, 35)}
MULT_FILES = {
    "mosi": "mosi_data.pkl",
    "mosei": "mosei_senti_data.pkl",
    "iemocap": "iemocap_data.pkl",
}
# (split, example, timestep, feature) positions that get -inf in the audio; one per example
# listed, so the expected replacement count per split is the number of entries for that split.
NEG_INF_AT = {"train": [(0, 0, 0), (2, 1, 3), (5, 0, 1)], "valid": [(1, 2, 0)], "test": []}


def _sizes(sizes):
    return dict(zip(SPLITS, sizes, strict=True))


def _put_neg_inf(audio: np.ndarray, split: str) -> None:
    for i, t, d in NEG_INF_AT[split]:
        if i < audio.shape[0]:
            audio[i, t, d % audio.shape[2]] = -np.inf


def neg_inf_count(sizes=DEFAULT_SIZES) -> dict[str, int]:
    """How many -inf the writers put into each split's audio."""
    return {s: sum(i < n for i, _, _ in NEG_INF_AT[s]) for s, n in _sizes(sizes).items()}


def mmsa_data(
    *,
    aligned: bool = True,
    dataset: str = "mosi",
    sizes=DEFAULT_SIZES,
    text_len: int = 8,
    audio_len: int = 12,
    vision_len: int = 10,
    seed: int = 0,
) -> dict:
    """An MMSA-layout dict; aligned data has audio/vision at the text length."""
    rng = np.random.default_rng(seed)
    d_t, d_a, d_v = MMSA_DIMS[dataset]
    t_a, t_v = (text_len, text_len) if aligned else (audio_len, vision_len)
    out = {}
    for split, n in _sizes(sizes).items():
        tok_len = rng.integers(3, text_len + 1, size=n)  # [CLS] ... [SEP], then padding
        mask = (np.arange(text_len)[None] < tok_len[:, None]).astype(np.float64)  # [N, L]
        ids = np.where(mask > 0, rng.integers(1000, 30000, size=(n, text_len)), 0)
        text_bert = np.stack([ids, mask, np.zeros_like(mask)], axis=1).astype(np.float64)
        text = (rng.normal(size=(n, text_len, d_t)) * mask[..., None]).astype(np.float32)
        audio = rng.normal(size=(n, t_a, d_a)).astype(np.float32)
        vision = rng.normal(size=(n, t_v, d_v)).astype(np.float32)
        _put_neg_inf(audio, split)
        reg = np.round(rng.uniform(-3, 3, size=n), 1).astype(np.float32)
        reg[0] = 0.0  # MOSI has exact-zero (neutral) labels
        split_data = {
            "raw_text": np.array([f"utterance {split} {i}" for i in range(n)], dtype=object),
            "audio": audio,
            "vision": vision,
            "id": np.array([f"vid{i:03d}$_${i % 3}" for i in range(n)], dtype=object),
            "text": text,
            "text_bert": text_bert,
            "annotations": np.array(
                ["Positive" if r > 0 else "Negative" if r < 0 else "Neutral" for r in reg],
                dtype=object,
            ),
            "classification_labels": np.sign(reg).astype(np.float64) + 1.0,
            "regression_labels": reg,
        }
        if not aligned:
            split_data["audio_lengths"] = [int(x) for x in rng.integers(1, t_a + 1, size=n)]
            split_data["vision_lengths"] = [int(x) for x in rng.integers(1, t_v + 1, size=n)]
        out[split] = split_data
    return out


def write_mmsa_pickle(folder: str, *, aligned: bool = True, **kwargs) -> dict:
    """Writes ``aligned_50.pkl`` or ``unaligned_50.pkl`` into `folder`; returns the dict."""
    data = mmsa_data(aligned=aligned, **kwargs)
    write_pickle(os.path.join(folder, "aligned_50.pkl" if aligned else "unaligned_50.pkl"), data)
    return data


def mult_data(
    *, dataset: str = "mosi", sizes=DEFAULT_SIZES, seq_len: int = 6, seed: int = 0
) -> dict:
    """A MulT-layout dict (IEMOCAP labels are [N, 4, 2] one-hot)."""
    rng = np.random.default_rng(seed)
    d_t, d_a, d_v = MULT_DIMS[dataset]
    out = {}
    for split, n in _sizes(sizes).items():
        audio = rng.normal(size=(n, seq_len, d_a)).astype(np.float32)
        _put_neg_inf(audio, split)
        if dataset == "iemocap":
            present = rng.integers(0, 2, size=(n, 4))
            labels = np.stack([1 - present, present], axis=-1).astype(np.float32)  # [N, 4, 2]
            ids = np.array([f"Ses0{i % 5 + 1}F_impro0{i}".encode() for i in range(n)])
        else:
            labels = np.round(rng.uniform(-3, 3, size=(n, 1, 1)), 2).astype(np.float32)
            ids = np.array([[f"vid{i}".encode(), b"0", str(i).encode()] for i in range(n)])
        out[split] = {
            "vision": rng.normal(size=(n, seq_len, d_v)).astype(np.float32),
            "labels": labels,
            "text": rng.normal(size=(n, seq_len, d_t)).astype(np.float32),
            "audio": audio,
            "id": ids,
        }
    return out


def write_mult_pickle(folder: str, *, dataset: str = "mosi", **kwargs) -> dict:
    """Writes the MulT file for `dataset` ("mosi" | "mosei" | "iemocap") into `folder`."""
    data = mult_data(dataset=dataset, **kwargs)
    write_pickle(os.path.join(folder, MULT_FILES[dataset]), data)
    return data


def write_pickle(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def npz_data(
    *, task: str = "classification", sizes=DEFAULT_SIZES, seed: int = 0, num_classes: int = 3
) -> dict:
    """npz-format splits: a sequence modality "zeta" [N, 5, 3] and a vector "alpha" [N, 4]."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in _sizes(sizes).items():
        if task == "classification":
            labels = (np.arange(n) % num_classes).astype(np.int64)
        else:
            labels = rng.normal(size=n)
        out[split] = {
            "zeta": rng.normal(size=(n, 5, 3)),
            "alpha": rng.normal(size=(n, 4)).astype(np.float32),
            "labels": labels,
        }
    return out


def write_npz_folder(
    folder: str, *, meta: dict | None = None, data: dict | None = None, **kwargs
) -> dict:
    """Writes train/valid/test.npz (and meta.json if `meta`) into `folder`; returns the arrays."""
    data = npz_data(**kwargs) if data is None else data
    os.makedirs(folder, exist_ok=True)
    for split, arrays in data.items():
        np.savez(os.path.join(folder, f"{split}.npz"), **arrays)
    if meta is not None:
        with open(os.path.join(folder, "meta.json"), "w") as f:
            json.dump(meta, f)
    return data
