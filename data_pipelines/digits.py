"""`digits`: scikit-learn's bundled 8x8 handwritten digits as three real views (DESIGN.md §6).

The 1797 images (pixel values 0..16, scaled to [0, 1]) become three modalities with image rows as
timesteps:

- ``left``: columns 0-3, ``[8, 4]``;
- ``right``: columns 4-7, ``[8, 4]``;
- ``down``: the 2x2 average-pooled image, ``[4, 4]``.

The split is stratified by class, 70/15/15 (1257/270/270), with sklearn's ``train_test_split`` at a
fixed seed: first 30% is held out, then that part is halved into valid and test. No files are
needed and nothing depends on the config, so every run sees the same split.
"""

from typing import Any

import numpy as np

from data_pipelines._common import SourceData

MODALITIES = ("left", "right", "down")
SPLIT_SEED = 0


def identity(dataset_cfg) -> dict[str, Any]:
    """Everything that changes the stored data, for the build cache."""
    del dataset_cfg  # the data is fixed
    return {"tag": "default", "split_seed": SPLIT_SEED, "split": [0.70, 0.15, 0.15]}


def views(images: np.ndarray) -> dict[str, np.ndarray]:
    """The three views of ``[N, 8, 8]`` images in [0, 1].

    Returns:
      ``left`` ``[N, 8, 4]``, ``right`` ``[N, 8, 4]``, ``down`` ``[N, 4, 4]``, all float32.
    """
    images = np.asarray(images, np.float32)
    n = images.shape[0]
    down = images.reshape(n, 4, 2, 4, 2).mean(axis=(2, 4))  # [N, 8, 8] -> [N, 4, 4]
    return {"left": images[:, :, :4], "right": images[:, :, 4:], "down": down}


def load(dataset_cfg) -> SourceData:
    """Loads the digits and splits them.

    Returns:
      SourceData with modalities ("left", "right", "down") as in the module docstring,
      ``lengths`` ``[N, 3] int32`` = (8, 8, 4), ``label`` ``[N] int32`` in [0, 10).
    """
    del dataset_cfg
    # Imported here: sklearn takes ~2 s to import and only this source needs it.
    from sklearn import datasets, model_selection  # noqa: PLC0415

    bunch = datasets.load_digits()
    images = bunch.images / 16.0  # [1797, 8, 8], pixel values 0..16
    labels = bunch.target.astype(np.int32)
    idx = np.arange(len(labels))
    train_idx, rest_idx = model_selection.train_test_split(
        idx, test_size=0.30, stratify=labels, random_state=SPLIT_SEED
    )
    valid_idx, test_idx = model_selection.train_test_split(
        rest_idx, test_size=0.50, stratify=labels[rest_idx], random_state=SPLIT_SEED
    )
    splits = {}
    for split, sel in (("train", train_idx), ("valid", valid_idx), ("test", test_idx)):
        arrays = views(images[sel])
        arrays["lengths"] = np.tile(np.array([8, 8, 4], np.int32), (len(sel), 1))
        arrays["label"] = labels[sel]
        splits[split] = arrays
    return SourceData(
        modalities=MODALITIES,
        splits=splits,
        task="classification",
        num_classes=10,
        metric_family="classification",
    )
