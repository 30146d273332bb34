"""`synthetic`: the modality-imbalance benchmark, generated deterministically from a seed.

DESIGN.md §6. A latent ``z ~ N(0, I_k)`` (k = ``latent_dim``, default 8) drives the label:

- classification: ``y = argmax_c (W z)_c`` with a fixed Gaussian ``W`` ``[C, k]`` whose rows are
  scaled to unit norm so that the classes are roughly balanced (default C = 4);
- regression: ``y = clip(w . z, -3, 3)`` with a fixed unit vector ``w``, so ``y ~ N(0, 1)`` and the
  sentiment-style range [-3, 3] holds (about 0.3% of samples are clipped).

Each modality m observes a slice ``P_m z`` of the latent through a fixed random projection
``A_m`` ``[D_m, k_m]`` (entries ``N(0, 1/k_m)``, so each feature has unit signal variance), repeated
over ``seq_len`` timesteps with independent noise per timestep:
``x_m[t] = A_m P_m z + sigma_m * eps_t``.

=========  =====  ====================  =======  ===================================
modality   D_m    observes              sigma_m  role
=========  =====  ====================  =======  ===================================
text       16     all of z              0.20     dominant: nearly determines the label
audio      12     z[: k // 2]           1.75     weak alone
vision     8      z[k // 2 :]           1.75     weak alone; with audio, sufficient
=========  =====  ====================  =======  ===================================

Audio and vision see disjoint halves of z, so either alone cannot resolve the label, but together
they see all of it at a lower SNR. Measured with sklearn's LogisticRegression on time-pooled
features at the defaults (2000/500/1000 examples, seq_len 8, data_seed 0-2), test accuracy is
0.92-0.94 for text alone, 0.73-0.81 for audio+vision and 0.44-0.59 for audio or vision alone
(chance 0.25); for regression, ridge R^2 is 0.98-0.99 (text), 0.80-0.87 (audio+vision) and
0.20-0.60 (one of them). This is the imbalance where `erm` leans on text and losing text hurts
most.

Randomness: the fixed maps come from ``default_rng([data_seed, 0])`` (the projections first, then
``W`` and ``w``, so changing ``num_classes`` leaves the projections alone); split s in
(train, valid, test) uses ``default_rng([data_seed, 1 + s])``, so resizing one split leaves the
others unchanged.
"""

from typing import Any

import numpy as np

from data_pipelines._common import SPLITS, SourceData

MODALITIES = ("text", "audio", "vision")
FEATURE_DIMS = {"text": 16, "audio": 12, "vision": 8}
NOISE_STD = {"text": 0.2, "audio": 1.75, "vision": 1.75}
DEFAULTS = {
    "task": "classification",
    "num_train": 2000,
    "num_valid": 500,
    "num_test": 1000,
    "num_classes": 4,
    "seq_len": 8,
    "latent_dim": 8,
    "data_seed": 0,
}


def knobs(dataset_cfg) -> dict[str, Any]:
    """The generation knobs with defaults filled in; these fully determine the data."""
    out = {k: dataset_cfg.get(k, v) for k, v in DEFAULTS.items()}
    # Configs may hold None for "unset" (ConfigDict placeholders); treat it as the default.
    out = {k: DEFAULTS[k] if v is None else v for k, v in out.items()}
    where = "config.dataset (synthetic)"
    if out["task"] not in ("classification", "regression"):
        raise ValueError(
            f"{where}: task must be 'classification' or 'regression', got {out['task']!r}"
        )
    for k in DEFAULTS:
        if k == "task":
            continue
        if int(out[k]) != out[k] or out[k] < (0 if k == "data_seed" else 1):
            raise ValueError(f"{where}: {k} must be a positive integer, got {out[k]!r}")
        out[k] = int(out[k])
    if out["latent_dim"] < 2:
        raise ValueError(
            f"{where}: latent_dim must be >= 2 (audio and vision see halves), got "
            f"{out['latent_dim']}"
        )
    if out["task"] == "classification" and out["num_classes"] < 2:
        raise ValueError(f"{where}: num_classes must be >= 2, got {out['num_classes']}")
    return out


def identity(dataset_cfg) -> dict[str, Any]:
    """Everything that changes the stored data, for the build cache."""
    k = knobs(dataset_cfg)
    return {"tag": k["task"], **k}


def _latent_slices(latent_dim: int) -> dict[str, slice]:
    half = latent_dim // 2
    return {
        "text": slice(0, latent_dim),
        "audio": slice(0, half),
        "vision": slice(half, latent_dim),
    }


def generate(dataset_cfg) -> SourceData:
    """Generates all three splits.

    Args:
      dataset_cfg: ConfigDict/dict with the optional knobs ``task``, ``num_train``, ``num_valid``,
        ``num_test``, ``num_classes``, ``seq_len``, ``latent_dim``, ``data_seed`` (see DEFAULTS).

    Returns:
      SourceData with modalities ("text", "audio", "vision"), each ``[N, seq_len, D_m] float32``
      (D = 16, 12, 8); ``lengths`` ``[N, 3] int32`` all ``seq_len``; ``label`` ``[N] int32`` in
      [0, C) or ``[N] float32`` in [-3, 3].
    """
    k = knobs(dataset_cfg)
    latent_dim, seq_len = k["latent_dim"], k["seq_len"]
    slices = _latent_slices(latent_dim)
    rng = np.random.default_rng([k["data_seed"], 0])
    proj = {}
    for m in MODALITIES:
        k_m = len(range(latent_dim)[slices[m]])
        proj[m] = rng.normal(size=(FEATURE_DIMS[m], k_m)) / np.sqrt(k_m)  # [D_m, k_m]
    w_cls = rng.normal(size=(k["num_classes"], latent_dim))  # [C, k]
    # Unit rows: a longer row would win the argmax more often and skew the class balance.
    w_cls /= np.linalg.norm(w_cls, axis=1, keepdims=True)
    w_reg = rng.normal(size=(latent_dim,))
    w_reg /= np.linalg.norm(w_reg)

    sizes = {"train": k["num_train"], "valid": k["num_valid"], "test": k["num_test"]}
    splits = {}
    for s, split in enumerate(SPLITS):
        r = np.random.default_rng([k["data_seed"], 1 + s])
        n = sizes[split]
        z = r.normal(size=(n, latent_dim))  # [N, k]
        arrays = {}
        for m in MODALITIES:
            signal = z[:, slices[m]] @ proj[m].T  # [N, D_m]
            noise = NOISE_STD[m] * r.normal(size=(n, seq_len, FEATURE_DIMS[m]))
            arrays[m] = (signal[:, None, :] + noise).astype(np.float32)  # [N, T, D_m]
        if k["task"] == "classification":
            arrays["label"] = np.argmax(z @ w_cls.T, axis=-1).astype(np.int32)
        else:
            arrays["label"] = np.clip(z @ w_reg, -3.0, 3.0).astype(np.float32)
        arrays["lengths"] = np.full((n, len(MODALITIES)), seq_len, np.int32)
        splits[split] = arrays
    classification = k["task"] == "classification"
    return SourceData(
        modalities=MODALITIES,
        splits=splits,
        task=k["task"],
        num_classes=k["num_classes"] if classification else 1,
        metric_family=k["task"],
    )


load = generate
