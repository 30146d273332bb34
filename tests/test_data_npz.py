"""npz: the DESIGN.md §7 folder format, its defaults, and every kind of bad input."""

import os

import data_fixtures as fx
import ml_collections
import numpy as np
import pytest

from data_pipelines import load_split, prepare


def _cfg(path, **kw):
    # normalize="none": these tests check the stored values against the files (the default,
    # standardize, has its own tests in test_data_normalization.py).
    return ml_collections.ConfigDict(
        {"name": "npz", "path": str(path), "max_len": 0, "normalize": "none", **kw}
    )


def test_classification_with_meta(tmp_path):
    raw = fx.write_npz_folder(
        str(tmp_path / "src"), meta={"task": "classification", "modalities": ["zeta", "alpha"]}
    )
    cfg = _cfg(tmp_path / "src")
    info = prepare(cfg, data_dir=str(tmp_path / "tfds"))
    assert info.modalities == ("zeta", "alpha")  # meta.json order, not sorted
    assert info.feature_shapes == {"zeta": (5, 3), "alpha": (4,)}
    assert (info.task, info.num_classes, info.metric_family) == (
        "classification",
        3,
        "classification",
    )
    got = load_split(cfg, "valid", data_dir=str(tmp_path / "tfds"))
    np.testing.assert_array_equal(got["zeta"], raw["valid"]["zeta"].astype(np.float32))
    np.testing.assert_array_equal(got["alpha"], raw["valid"]["alpha"])
    np.testing.assert_array_equal(got["label"], raw["valid"]["labels"])
    assert got["label"].dtype == np.int32 and got["zeta"].dtype == np.float32
    np.testing.assert_array_equal(got["lengths"], np.tile([5, 1], (4, 1)))
    np.testing.assert_array_equal(got["mask"], np.ones((4, 2), np.float32))


def test_regression_without_meta_and_max_len(tmp_path):
    raw = fx.write_npz_folder(str(tmp_path / "src"), task="regression")
    cfg = _cfg(tmp_path / "src", max_len=7)
    info = prepare(cfg, data_dir=str(tmp_path / "tfds"))
    assert info.modalities == ("alpha", "zeta")  # sorted names minus labels
    assert (info.task, info.num_classes, info.metric_family) == ("regression", 1, "regression")
    assert info.feature_shapes == {"alpha": (4,), "zeta": (7, 3)}  # vectors are not padded
    got = load_split(cfg, "train", data_dir=str(tmp_path / "tfds"))
    np.testing.assert_array_equal(got["label"], raw["train"]["labels"].astype(np.float32))
    assert got["label"].dtype == np.float32
    expected = np.zeros((6, 7, 3), np.float32)
    expected[:, :5] = raw["train"]["zeta"]
    np.testing.assert_array_equal(got["zeta"], expected)
    np.testing.assert_array_equal(got["lengths"], np.tile([1, 5], (6, 1)))


def test_integer_labels_without_meta_mean_classification(tmp_path):
    fx.write_npz_folder(str(tmp_path / "src"), num_classes=2)
    info = prepare(_cfg(tmp_path / "src", max_len=2), data_dir=str(tmp_path / "tfds"))
    assert info.task == "classification" and info.num_classes == 2
    assert info.feature_shapes["zeta"] == (2, 3)


def test_splits_with_different_lengths_are_padded_to_the_longest(tmp_path):
    data = fx.npz_data()
    data["valid"]["zeta"] = np.ones((4, 7, 3))  # train and test have T = 5
    fx.write_npz_folder(str(tmp_path / "src"), data=data)
    cfg = _cfg(tmp_path / "src")
    assert prepare(cfg, data_dir=str(tmp_path / "tfds")).feature_shapes["zeta"] == (7, 3)
    train = load_split(cfg, "train", data_dir=str(tmp_path / "tfds"))
    np.testing.assert_array_equal(train["zeta"][:, 5:], 0.0)
    np.testing.assert_array_equal(train["lengths"][:, 1], 5)
    valid = load_split(cfg, "valid", data_dir=str(tmp_path / "tfds"))
    np.testing.assert_array_equal(valid["lengths"][:, 1], 7)


# --- Bad input ------------------------------------------------------------------------------------


def _mut(split, key, fn):
    def f(data, meta):
        data[split][key] = fn(data[split][key])
        return data, meta

    return f


def _meta(m):
    return lambda data, meta: (data, m)


def _inf_regression_label(data, meta):
    del meta
    data["train"]["labels"] = np.r_[np.inf, data["train"]["labels"][1:]]
    return data, {"task": "regression"}


CORRUPTIONS = [
    (
        "labels_float_for_classification",
        _mut("train", "labels", lambda y: y + 0.5),
        "train.npz",
        "split 'train' key 'labels'",
        "must be integers, got dtype float64",
    ),
    (
        "negative_label",
        _mut("valid", "labels", lambda y: y - 1),
        "valid.npz",
        "split 'valid' key 'labels'",
        "negative class label -1",
    ),
    (
        "label_beyond_train_classes",
        _mut("test", "labels", lambda y: y + 3),
        "test.npz",
        "split 'test' key 'labels'",
        "label 5 >= C = 3",
    ),
    (
        "labels_rank_2",
        _mut("train", "labels", lambda y: y[:, None]),
        "train.npz",
        "split 'train' key 'labels'",
        "expected rank 1 [N], got shape (6, 1)",
    ),
    (
        "rank_4_modality",
        _mut("valid", "zeta", lambda x: x[..., None]),
        "valid.npz",
        "split 'valid' key 'zeta'",
        "got shape (4, 5, 3, 1)",
    ),
    (
        "rank_changes_between_splits",
        _mut("test", "zeta", lambda x: x[:, 0]),
        "test.npz",
        "split 'test' key 'zeta'",
        "feature dims must agree",
    ),
    (
        "dims_differ_between_splits",
        _mut("valid", "alpha", lambda x: x[:, :3]),
        "valid.npz",
        "split 'valid' key 'alpha'",
        "(3,) per example differs from split 'train'",
    ),
    (
        "n_mismatch",
        _mut("train", "alpha", lambda x: x[:5]),
        "train.npz",
        "split 'train' key",
        "has 5 examples but 'labels' has 6",
    ),
    (
        "nan_feature",
        _mut("test", "zeta", lambda x: np.where(np.arange(5)[:, None] == 2, np.nan, x)),
        "test.npz",
        "split 'test' key 'zeta'",
        "NaN",
    ),
    (
        "inf_regression_label",
        _inf_regression_label,
        "train.npz",
        "split 'train' key 'labels'",
        "0 NaN and 1 inf",
    ),
    (
        "empty_split",
        lambda d, m: ({**d, "valid": {k: v[:0] for k, v in d["valid"].items()}}, m),
        "valid.npz",
        "split 'valid'",
        "empty split",
    ),
    (
        "missing_modality",
        _meta({"modalities": ["zeta", "beta"]}),
        "train.npz",
        "split 'train' key 'beta'",
        "missing key",
    ),
    (
        "missing_labels",
        lambda d, m: ({**d, "test": {"zeta": d["test"]["zeta"], "alpha": d["test"]["alpha"]}}, m),
        "test.npz",
        "split 'test' key 'labels'",
        "missing key",
    ),
    ("bad_task", _meta({"task": "ranking"}), "meta.json", "key 'task'", "must be one of"),
    (
        "bad_modalities",
        _meta({"modalities": "zeta"}),
        "meta.json",
        "key 'modalities'",
        "expected a non-empty list",
    ),
    (
        "reserved_name",
        _meta({"modalities": ["zeta", "mask"]}),
        "meta.json",
        "key 'mask'",
        "cannot be a modality name",
    ),
    (
        "non_numeric",
        _mut("train", "alpha", lambda x: x.astype(str)),
        "train.npz",
        "split 'train' key 'alpha'",
        "expected a numeric array",
    ),
]


@pytest.mark.parametrize("case", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupted_npz_raise_named_value_errors(tmp_path, case):
    _, mutate, file, where, problem = case
    meta = {"task": "classification"}
    data, meta = mutate(fx.npz_data(), meta)
    fx.write_npz_folder(str(tmp_path / "src"), meta=meta, data=data)
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(ValueError) as err:
        prepare(_cfg(tmp_path / "src"), data_dir=data_dir)
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "src" / file) + ":"), msg
    assert where in msg and problem in msg, msg
    assert not os.path.exists(data_dir) or os.listdir(data_dir) == []


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="path is empty"):
        prepare(_cfg(""), data_dir=str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match="nowhere: no such folder"):
        prepare(_cfg(tmp_path / "nowhere"), data_dir=str(tmp_path / "tfds"))
    fx.write_npz_folder(str(tmp_path / "src"))
    os.remove(tmp_path / "src" / "valid.npz")
    with pytest.raises(ValueError, match="valid.npz: split 'valid': file not found"):
        prepare(_cfg(tmp_path / "src"), data_dir=str(tmp_path / "tfds"))
    (tmp_path / "src" / "valid.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="valid.npz: split 'valid': not a readable .npz"):
        prepare(_cfg(tmp_path / "src"), data_dir=str(tmp_path / "tfds"))
    fx.write_npz_folder(str(tmp_path / "src"))
    (tmp_path / "src" / "meta.json").write_text("{task: classification")
    with pytest.raises(ValueError, match="meta.json: not readable JSON"):
        prepare(_cfg(tmp_path / "src"), data_dir=str(tmp_path / "tfds"))
    np.savez(
        tmp_path / "src" / "train.npz",
        labels=np.arange(6),
        text=np.array([object()] * 6, dtype=object),
    )
    os.remove(tmp_path / "src" / "meta.json")
    with pytest.raises(ValueError, match="train.npz: split 'train': not a readable .npz"):
        prepare(_cfg(tmp_path / "src"), data_dir=str(tmp_path / "tfds"))
    assert not os.path.exists(tmp_path / "tfds")
