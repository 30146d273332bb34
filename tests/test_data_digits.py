"""digits: the three views rebuild sklearn's images, and the split is a stratified 70/15/15."""

import ml_collections
import numpy as np
import pytest
from sklearn.datasets import load_digits

from data_pipelines import load_split, prepare


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    # normalize="none": the views are checked against the raw images.
    cfg = ml_collections.ConfigDict(
        {"name": "digits", "path": "", "max_len": 0, "normalize": "none"}
    )
    info = prepare(cfg, data_dir=data_dir)
    return info, {s: load_split(cfg, s, data_dir=data_dir) for s in ("train", "valid", "test")}


def test_info(built):
    info, _ = built
    assert info.modalities == ("left", "right", "down")
    assert info.feature_shapes == {"left": (8, 4), "right": (8, 4), "down": (4, 4)}
    assert info.split_sizes == {"train": 1257, "valid": 270, "test": 270}
    assert (info.task, info.num_classes, info.metric_family) == (
        "classification",
        10,
        "classification",
    )


def test_views_rebuild_the_images_and_cover_the_dataset_once(built):
    _, splits = built
    ref = load_digits()
    ref_images = (ref.images / 16.0).astype(np.float32)
    rebuilt, labels = [], []
    for arrays in splits.values():
        images = np.concatenate([arrays["left"], arrays["right"]], axis=2)  # [N, 8, 8]
        assert images.min() >= 0 and images.max() <= 1
        # 2x2 average pooling written out by hand.
        down = np.zeros((len(images), 4, 4), np.float32)
        for r in range(4):
            for c in range(4):
                down[:, r, c] = images[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean(axis=(1, 2))
        np.testing.assert_allclose(arrays["down"], down, atol=1e-6)
        np.testing.assert_array_equal(arrays["lengths"], np.tile([8, 8, 4], (len(images), 1)))
        rebuilt.append(images)
        labels.append(arrays["label"])
    rebuilt, labels = np.concatenate(rebuilt), np.concatenate(labels)
    # The union of the splits is the dataset, each (image, label) exactly once.
    key = lambda imgs, ys: sorted(im.tobytes() + bytes([y]) for im, y in zip(imgs, ys, strict=True))
    assert key(rebuilt, labels) == key(ref_images, ref.target)


def test_split_is_stratified(built):
    _, splits = built
    total = np.bincount(load_digits().target, minlength=10)
    for split, frac in (("train", 0.70), ("valid", 0.15), ("test", 0.15)):
        counts = np.bincount(splits[split]["label"], minlength=10)
        assert splits[split]["label"].dtype == np.int32
        np.testing.assert_allclose(counts, frac * total, atol=1.5, err_msg=split)


def test_split_is_fixed(built, tmp_path):
    _, splits = built
    cfg = ml_collections.ConfigDict({"name": "digits", "normalize": "none"})
    again = load_split(cfg, "test", data_dir=str(tmp_path))
    np.testing.assert_array_equal(again["left"], splits["test"]["left"])
    np.testing.assert_array_equal(again["label"], splits["test"]["label"])


def test_building_from_scratch_prints_one_truthful_line(tmp_path):
    """No TFDS download banner, no "custom data configuration" warning, no progress bars: one
    line of ours on the first build, nothing on the second."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "data_pipelines.build", "--dataset=digits",
           f"--data_dir={tmp_path / 'd'}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    first = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    lines = [x for x in first.stderr.replace("\r", "\n").splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("preparing digits → "), lines
    assert lines[0].endswith("(first run only)")
    for noise in ("Downloading", "custom data configuration", "Shuffling", "Generating"):
        assert noise not in first.stdout + first.stderr, noise
    again = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stderr.strip() == "", again.stderr[-2000:]
