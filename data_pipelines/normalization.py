"""Per-feature standardization fitted on the train split, and the statistics the losses need.

DESIGN.md §6 ("Normalization"). Real features arrive on scales that differ by orders of magnitude
(one view in the tens of thousands, another below 1). ``config.dataset.normalize``:

- ``"none"``: the features are stored as read;
- ``"standardize"``: per feature j of modality m, ``x' = (x - mean_j) / scale_j`` with the mean
  and the population std (ddof 0, as sklearn's ``StandardScaler``) fitted on the TRAIN split only,
  then applied to every split when the dataset is built, so before any removal: a removed
  modality is zero-filled later (``interventions.drop_modalities``) and stays exactly 0.

Which entries count as values: the valid timesteps of a sequence (``t < lengths``; a vector is one
step) minus the entries the source marks absent (``SourceData.absent``: MMSA/MulT's ``-inf``
audio). Padding and absent entries are left out of the statistics and stay 0 after the transform,
so 0 keeps meaning "nothing here". A constant feature (sklearn's rule, `_is_constant`) is only
centred (``scale_j = 1``), never divided by ~0.

`statistics` describes the STORED train split for the losses and the baselines (DESIGN.md §3.5):
per-feature std of the values, and per-feature variance of the time-pooled features (the
reconstruction targets, pooled exactly as ``losses.pooled_features`` pools them).
"""

import dataclasses
from typing import Any

import numpy as np

from data_pipelines._common import SourceData

MODES = ("none", "standardize")
# Rows per chunk when reducing over a split: keeps the float64 temporaries small for MOSEI-sized
# splits ([16k, 50, 768] text would be 5 GB in float64 at once).
_CHUNK = 1024


def _time_valid(lengths: np.ndarray, num_steps: int, *, at_least_one: bool) -> np.ndarray:
    """``[N]`` lengths -> ``[N, T]`` bool, True at the valid timesteps ``t < lengths``."""
    if at_least_one:  # the model's and the losses' convention (model.time_mask)
        lengths = np.maximum(lengths, 1)
    return np.arange(num_steps)[None, :] < lengths[:, None]


def _chunks(arrays: dict[str, np.ndarray], absent: dict[str, np.ndarray], m: str, i: int):
    """Yields ``(rows, x [n, ..., D] float64, value mask [n, ..., D] bool)`` per chunk of rows."""
    x_all = arrays[m]
    for start in range(0, len(x_all), _CHUNK):
        rows = slice(start, start + _CHUNK)
        x = x_all[rows].astype(np.float64)
        valid = np.ones(x.shape, bool)
        if x.ndim == 3:
            valid &= _time_valid(arrays["lengths"][rows, i], x.shape[1], at_least_one=False)[
                ..., None
            ]
        if m in absent:
            valid &= ~absent[m][rows]
        yield rows, x, valid


def _moments(arrays, absent, m: str, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-feature count, mean and population variance over the values: three ``[D]`` float64.

    Two passes (mean, then squared deviations from it) for accuracy on features whose mean is
    large against their spread.
    """
    d = arrays[m].shape[-1]
    count, total = np.zeros(d), np.zeros(d)
    for _, x, valid in _chunks(arrays, absent, m, i):
        axes = tuple(range(x.ndim - 1))
        count += valid.sum(axis=axes)
        total += np.where(valid, x, 0.0).sum(axis=axes)
    mean = total / np.maximum(count, 1.0)
    sq = np.zeros(d)
    for _, x, valid in _chunks(arrays, absent, m, i):
        sq += np.where(valid, np.square(x - mean), 0.0).sum(axis=tuple(range(x.ndim - 1)))
    return count, mean, sq / np.maximum(count, 1.0)


def _is_constant(var: np.ndarray, mean: np.ndarray, count: np.ndarray) -> np.ndarray:
    """sklearn's test for a constant feature (``preprocessing._data._is_constant_feature``).

    A variance within the rounding error of its own computation, ``n eps var + (n mean eps)^2``,
    is indistinguishable from 0; such a feature gets scale 1. Features without any value
    (``count == 0``) count as constant too.
    """
    eps = np.finfo(np.float64).eps
    bound = count * eps * var + np.square(count * mean * eps)
    return (var <= bound) | (count == 0)


def fit(src: SourceData) -> dict[str, dict[str, np.ndarray]]:
    """Standardization statistics of the train split of `src`.

    Returns:
      Per modality ``{"mean": [D] float64, "scale": [D] float64, "constant": [D] bool}``; ``scale``
      is the population std, or 1 where the feature is constant.
    """
    train, absent = src.splits["train"], src.absent.get("train", {})
    out = {}
    for i, m in enumerate(src.modalities):
        count, mean, var = _moments(train, absent, m, i)
        constant = _is_constant(var, mean, count)
        out[m] = {"mean": mean, "scale": np.where(constant, 1.0, np.sqrt(var)),
                  "constant": constant}
    return out


def apply(src: SourceData, stats: dict[str, dict[str, np.ndarray]]) -> SourceData:
    """``(x - mean) / scale`` at every value of every split; padding and absent entries stay 0.

    Args:
      src: the data, after pad/truncate (``pipeline.fit_lengths``).
      stats: from :func:`fit`.

    Returns:
      A new SourceData; every modality float32 with its shape unchanged, other keys shared.
    """
    splits = {}
    for split, arrays in src.splits.items():
        absent = src.absent.get(split, {})
        new = dict(arrays)
        for i, m in enumerate(src.modalities):
            out = np.zeros(arrays[m].shape, np.float32)
            mean, scale = stats[m]["mean"], stats[m]["scale"]
            for rows, x, valid in _chunks(arrays, absent, m, i):
                out[rows] = np.where(valid, (x - mean) / scale, 0.0)
            new[m] = out
        splits[split] = new
    return dataclasses.replace(src, splits=splits)


def pooled(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Time-pooled features as the losses pool them: ``[N, T, D]`` -> mean over ``t < max(len, 1)``.

    Vectors ``[N, D]`` pass through. Mirrors ``modalimmune_jax.losses.pooled_features`` (absent
    entries count as the 0 stored there), so the variance below is that of the actual target.
    """
    if x.ndim == 2:
        return x.astype(np.float64)
    w = _time_valid(lengths, x.shape[1], at_least_one=True)[..., None]  # [N, T, 1]
    return (x.astype(np.float64) * w).sum(axis=1) / w.sum(axis=1)


def statistics(src: SourceData) -> dict[str, dict[str, list[float]]]:
    """What the losses and baselines need from the stored train split, as JSON-ready lists.

    Returns:
      ``{"feature_std": {m: [D_m]}, "pooled_mean": {m: [D_m]}, "pooled_variance": {m: [D_m]}}``:
      the population std of each feature over its values (valid, non-absent entries), and the
      mean and population variance over the train examples of each time-pooled feature
      (DESIGN.md §3.5's ``sigma^2_mj``). No floor is applied here; the consumers decide
      (``model.reconstruction_stats``).
    """
    train, absent = src.splits["train"], src.absent.get("train", {})
    out = {"feature_std": {}, "pooled_mean": {}, "pooled_variance": {}}
    for i, m in enumerate(src.modalities):
        _, _, var = _moments(train, absent, m, i)
        out["feature_std"][m] = np.sqrt(var).tolist()
        p = pooled(train[m], train["lengths"][:, i])  # [N, D]
        out["pooled_mean"][m] = p.mean(axis=0).tolist()
        out["pooled_variance"][m] = p.var(axis=0).tolist()
    return out


def to_json(stats: dict[str, dict[str, np.ndarray]] | None, mode: str) -> dict[str, Any]:
    """The metadata record of a build's normalization: the mode, and the fitted statistics."""
    if stats is None:
        return {"mode": mode}
    return {"mode": mode, **{
        key: {m: np.asarray(s[key]).tolist() for m, s in stats.items()}
        for key in ("mean", "scale", "constant")}}
