r"""`hetero`: a DESIGN.md §7 npz folder whose three views differ in scale by ~10^7 and in strength.

Usage::

  python -m data_pipelines.hetero --out=/data/hetero            # full form (1078/359/360)
  python -m data_pipelines.hetero --out=/tmp/hetero_small --small --seed=1
  python -m experiments.train --config=experiments/configs/default.py:npz \
      --config.dataset.path=/data/hetero --workdir=/tmp/mi_hetero

It reproduces what broke on a user's real data (issue 14): views on wildly different scales, which
nothing normalized. Built from scikit-learn's BUNDLED 8x8 digits (no download), pixels in [0, 1]:

=========  ==========================================  =====  =================================
view       features                                    D      raw scale
=========  ==========================================  =====  =================================
strong     the four centre columns (2-5), flattened    32     x 1e-3 (values below 0.002)
medium     the 8 row sums (a horizontal profile)        8      x 1, offsets 5 to 10
weak       the 2x2 grid of 4x4-block means              4      x 1e4, offsets 2e4 to 4e4
=========  ==========================================  =====  =================================

Each feature j of a view gets its own factor ``scale_view * exp(U(-ln 2, ln 2))`` and offset
(``offset_view * U(1, 2)``), so the features inside a view differ by up to 4x too, as real
measurements in different units do. The strongest view is the smallest and the weakest the largest:
an unnormalized model sees the weak view first. Single-view test accuracy of a standardized
logistic regression on the full form, seed 0: strong 0.964, medium 0.819, weak 0.547; all three
0.964 (chance 0.1; `main` prints these for any seed).

Split: stratified by class, 60/20/20 (1078/359/360) by ``train_test_split`` at ``seed``. The small
form (``--small``, for tests) keeps a stratified 150/60/60 of those. Everything is a function of
``seed``: the split and the per-feature factors and offsets (``default_rng([seed, 0])``).
"""

import json
import os

import numpy as np
from absl import flags

MODALITIES = ("strong", "medium", "weak")
# Per view: (typical factor, offset scale); the features' spreads then span ~1e-4 to ~1e3.
SCALES = {"strong": (1e-3, 0.0), "medium": (1.0, 5.0), "weak": (1e4, 2e4)}
SMALL_SIZES = {"train": 150, "valid": 60, "test": 60}


def views(images: np.ndarray) -> dict[str, np.ndarray]:
    """The three unscaled views of ``[N, 8, 8]`` images in [0, 1], each ``[N, D]`` float64."""
    n = len(images)
    return {
        "strong": images[:, :, 2:6].reshape(n, 32),
        "medium": images.sum(axis=2),  # [N, 8, 8] -> [N, 8]
        "weak": images.reshape(n, 2, 4, 2, 4).mean(axis=(2, 4)).reshape(n, 4),
    }


def make(*, seed: int = 0, small: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """The three splits in the npz format.

    Returns:
      ``{"train"|"valid"|"test": {"strong": [N, 32], "medium": [N, 8], "weak": [N, 4] float32,
      "labels": [N] int64 in [0, 10)}}``.
    """
    # Imported here: sklearn takes ~2 s to import and only building needs it.
    from sklearn import datasets, model_selection  # noqa: PLC0415

    bunch = datasets.load_digits()
    images, labels = bunch.images / 16.0, bunch.target.astype(np.int64)
    idx = np.arange(len(labels))
    train, rest = model_selection.train_test_split(
        idx, test_size=0.4, stratify=labels, random_state=seed)
    valid, test = model_selection.train_test_split(
        rest, test_size=0.5, stratify=labels[rest], random_state=seed)
    parts = {"train": train, "valid": valid, "test": test}
    if small:
        parts = {s: model_selection.train_test_split(
            rows, train_size=SMALL_SIZES[s], stratify=labels[rows], random_state=seed)[0]
            for s, rows in parts.items()}
    rng = np.random.default_rng([seed, 0])
    raw = views(images)
    affine = {}
    for m in MODALITIES:
        factor, offset = SCALES[m]
        d = raw[m].shape[1]
        affine[m] = (factor * np.exp(rng.uniform(-np.log(2), np.log(2), d)),
                     offset * rng.uniform(1, 2, d))
    out = {}
    for split, rows in parts.items():
        rows = np.sort(rows)
        out[split] = {m: (raw[m][rows] * affine[m][0] + affine[m][1]).astype(np.float32)
                      for m in MODALITIES}
        out[split]["labels"] = labels[rows]
    return out


def write(folder: str, *, seed: int = 0, small: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Writes train/valid/test.npz and meta.json into `folder`; returns the arrays written."""
    data = make(seed=seed, small=small)
    os.makedirs(folder, exist_ok=True)
    for split, arrays in data.items():
        np.savez(os.path.join(folder, f"{split}.npz"), **arrays)
    meta = {"task": "classification", "modalities": list(MODALITIES),
            "source": "sklearn.datasets.load_digits via data_pipelines.hetero",
            "seed": seed, "small": small}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return data


_OUT = flags.DEFINE_string("out", None, "Folder to write the npz dataset into.")
_SMALL = flags.DEFINE_bool("small", False, "The small form (150/60/60), for tests.")
_SEED = flags.DEFINE_integer("seed", 0, "Split and per-feature scales.")


def report(out: str, *, seed: int, small: bool) -> str:
    """Writes the dataset to `out`; returns its sizes and each view's linear accuracy (JSON)."""
    # Imported here: the library (jax) is needed only for the report, not to build the data.
    from modalimmune_jax import linear_reference  # noqa: PLC0415

    data = write(out, seed=seed, small=small)
    arrays = {s: {**{m: d[m] for m in MODALITIES}, "label": d["labels"],
                  "lengths": np.ones((len(d["labels"]), len(MODALITIES)), np.int32)}
              for s, d in data.items()}
    result = {"out": out, "sizes": {s: len(d["labels"]) for s, d in data.items()},
              "feature_std": {m: [float(data["train"][m].std(0).min()),
                                  float(data["train"][m].std(0).max())] for m in MODALITIES}}
    for name, keep in [("all", None)] + [(m, [m]) for m in MODALITIES]:
        result[f"logreg_test_acc/{name}"] = linear_reference.linear_reference(
            arrays["train"], arrays["test"], modalities=MODALITIES, task="classification",
            metric_family="classification", keep=keep)["acc"]
    return json.dumps(result, indent=2)


def main(argv):
    from modalimmune_jax.training import cli, config  # noqa: PLC0415 -- an entry point's own

    cli.main(argv, lambda: report(config.absolute_path(_OUT.value), seed=_SEED.value,
                                  small=_SMALL.value))


if __name__ == "__main__":
    from modalimmune_jax.training import cli  # noqa: PLC0415

    flags.mark_flags_as_required(["out"])
    cli.run(main)
