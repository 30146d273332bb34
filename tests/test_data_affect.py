"""cmu_mosi / cmu_mosei / iemocap from tiny pickles in the published MMSA and MulT layouts.

Expected values are computed here from the raw dicts the fixtures wrote (cast, -inf -> 0, slicing,
attention-mask sums), never from the loaders' own output.
"""

import logging
import os
import pickle
import re

import data_fixtures as fx
import ml_collections
import numpy as np
import pytest

from data_pipelines import load_split, make_loader, pipeline, prepare, storage


def _cfg(name, path, **kw):
    return ml_collections.ConfigDict(
        {"name": name, "path": path, "layout": "auto", "max_len": 0, **kw}
    )


def _leftovers(data_dir):
    """Everything under data_dir (files and folders), relative paths."""
    if not os.path.exists(data_dir):
        return []
    return sorted(
        os.path.relpath(os.path.join(r, n), data_dir)
        for r, ds, fs in os.walk(data_dir)
        for n in ds + fs
    )


def _fit(x, t):
    """Reference pad/truncate of [N, T, D] to t steps."""
    out = np.zeros((x.shape[0], t, x.shape[2]), np.float32)
    k = min(t, x.shape[1])
    out[:, :k] = x[:, :k]
    return out


@pytest.mark.parametrize("dataset,name", [("mosi", "cmu_mosi"), ("mosei", "cmu_mosei")])
def test_mmsa_aligned_loads_with_published_shapes(tmp_path, dataset, name):
    raw = fx.write_mmsa_pickle(str(tmp_path / "src"), aligned=True, dataset=dataset)
    info = prepare(_cfg(name, str(tmp_path / "src")), data_dir=str(tmp_path / "tfds"))
    d_t, d_a, d_v = fx.MMSA_DIMS[dataset]
    assert info.modalities == ("text", "audio", "vision")
    assert info.feature_shapes == {"text": (8, d_t), "audio": (8, d_a), "vision": (8, d_v)}
    assert (info.task, info.num_classes, info.metric_family) == ("regression", 1, "sentiment")
    assert info.split_sizes == {"train": 6, "valid": 4, "test": 4}
    for split in fx.SPLITS:
        r = raw[split]
        got = load_split(_cfg(name, str(tmp_path / "src")), split, data_dir=str(tmp_path / "tfds"))
        assert got["label"].dtype == np.float32 and got["label"].shape == (len(r["text"]),)
        np.testing.assert_array_equal(got["label"], r["regression_labels"])
        np.testing.assert_array_equal(got["text"], r["text"])
        np.testing.assert_array_equal(got["vision"], r["vision"])
        audio = np.where(np.isneginf(r["audio"]), 0.0, r["audio"]).astype(np.float32)
        np.testing.assert_array_equal(got["audio"], audio)
        text_len = r["text_bert"][:, 1, :].sum(axis=1).astype(np.int32)
        np.testing.assert_array_equal(got["lengths"], np.stack([text_len] * 3, axis=1))
        np.testing.assert_array_equal(got["mask"], np.ones((len(text_len), 3), np.float32))
        assert got["lengths"].dtype == np.int32 and got["mask"].dtype == np.float32
        assert all(got[m].dtype == np.float32 for m in info.modalities)


def test_mmsa_unaligned_uses_stored_lengths(tmp_path):
    raw = fx.write_mmsa_pickle(str(tmp_path), aligned=False, audio_len=12, vision_len=10)
    cfg = _cfg("cmu_mosi", str(tmp_path))
    info = prepare(cfg, data_dir=str(tmp_path / "tfds"))
    assert info.feature_shapes == {"text": (8, 768), "audio": (12, 5), "vision": (10, 20)}
    got = load_split(cfg, "train", data_dir=str(tmp_path / "tfds"))
    r = raw["train"]
    expected = np.stack([r["text_bert"][:, 1].sum(1), r["audio_lengths"], r["vision_lengths"]], 1)
    np.testing.assert_array_equal(got["lengths"], expected.astype(np.int32))


def test_auto_layout_prefers_aligned_then_unaligned_then_mult(tmp_path):
    src, data_dir = str(tmp_path / "src"), str(tmp_path / "tfds")
    fx.write_mult_pickle(src, dataset="mosi", seq_len=5)
    assert prepare(_cfg("cmu_mosi", src), data_dir=data_dir).feature_shapes["text"] == (5, 300)
    fx.write_mmsa_pickle(src, aligned=False, text_len=7)
    assert prepare(_cfg("cmu_mosi", src), data_dir=data_dir).feature_shapes["audio"] == (12, 5)
    fx.write_mmsa_pickle(src, aligned=True, text_len=7)
    assert prepare(_cfg("cmu_mosi", src), data_dir=data_dir).feature_shapes["audio"] == (7, 5)
    # An explicit layout picks its own file even when others are present.
    info = prepare(_cfg("cmu_mosi", src, layout="mult"), data_dir=data_dir)
    assert info.feature_shapes["text"] == (5, 300)
    # A direct file path works too; its layout is read from the keys.
    info = prepare(_cfg("cmu_mosi", os.path.join(src, "unaligned_50.pkl")), data_dir=data_dir)
    assert info.feature_shapes["vision"] == (10, 20)


@pytest.mark.parametrize("dataset,name", [("mosi", "cmu_mosi"), ("mosei", "cmu_mosei")])
def test_mult_sentiment(tmp_path, dataset, name):
    raw = fx.write_mult_pickle(str(tmp_path), dataset=dataset, seq_len=6)
    cfg = _cfg(name, str(tmp_path))
    info = prepare(cfg, data_dir=str(tmp_path / "tfds"))
    d_t, d_a, d_v = fx.MULT_DIMS[dataset]
    assert info.feature_shapes == {"text": (6, d_t), "audio": (6, d_a), "vision": (6, d_v)}
    assert info.metric_family == "sentiment" and info.task == "regression"
    got = load_split(cfg, "valid", data_dir=str(tmp_path / "tfds"))
    r = raw["valid"]
    np.testing.assert_array_equal(got["label"], r["labels"][:, 0, 0])
    np.testing.assert_array_equal(got["audio"], np.where(np.isneginf(r["audio"]), 0, r["audio"]))
    np.testing.assert_array_equal(got["lengths"], np.full((4, 3), 6, np.int32))


def test_iemocap_labels_are_argmax_of_one_hot(tmp_path):
    raw = fx.write_mult_pickle(str(tmp_path), dataset="iemocap", seq_len=5)
    cfg = _cfg("iemocap", str(tmp_path))
    info = prepare(cfg, data_dir=str(tmp_path / "tfds"))
    assert (info.task, info.num_classes, info.metric_family) == ("multilabel", 4, "iemocap")
    assert info.label_names == ("Neutral", "Happy", "Sad", "Angry")
    assert info.feature_shapes == {"text": (5, 300), "audio": (5, 74), "vision": (5, 35)}
    got = load_split(cfg, "train", data_dir=str(tmp_path / "tfds"))
    # Index 1 of each emotion's one-hot means "present".
    np.testing.assert_array_equal(got["label"], raw["train"]["labels"][:, :, 1].astype(np.int32))
    assert got["label"].dtype == np.int32 and got["label"].shape == (6, 4)
    batch = next(
        iter(
            make_loader(
                cfg,
                "train",
                data_dir=str(tmp_path / "tfds"),
                batch_size=4,
                seed=0,
                shuffle=False,
                num_epochs=1,
                drop_remainder=True,
            )
        )
    )
    assert batch["label"].shape == (4, 4) and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["label"], raw["train"]["labels"][:4, :, 1])


@pytest.mark.parametrize("writer", ["mmsa", "mult"])
def test_neg_inf_replaced_counted_and_logged(tmp_path, caplog, writer):
    if writer == "mmsa":
        raw, name = fx.write_mmsa_pickle(str(tmp_path), aligned=True), "cmu_mosi"
    else:
        raw, name = fx.write_mult_pickle(str(tmp_path), dataset="mosei"), "cmu_mosei"
    expected = {s: int(np.isneginf(raw[s]["audio"]).sum()) for s in fx.SPLITS}
    assert expected == fx.neg_inf_count() and sum(expected.values()) == 4
    cfg = _cfg(name, str(tmp_path))
    caplog.set_level(logging.INFO, logger="absl")
    prepare(cfg, data_dir=str(tmp_path / "tfds"))
    assert "replaced 4 -inf audio values with 0 (train 3, valid 1, test 0)" in caplog.text
    config_name, _ = pipeline.identity(cfg)
    meta = storage.open_built(
        storage.build_path(str(tmp_path / "tfds"), name, config_name)
    ).info.metadata
    assert meta["notes"]["audio_neg_inf_replaced"] == expected
    got = load_split(cfg, "train", data_dir=str(tmp_path / "tfds"))
    assert np.isfinite(got["audio"]).all()
    for i, t, d in fx.NEG_INF_AT["train"]:
        assert got["audio"][i, t, d % got["audio"].shape[2]] == 0.0


@pytest.mark.parametrize("max_len", [5, 11])
def test_pad_truncate_and_lengths(tmp_path, max_len):
    raw = fx.write_mmsa_pickle(
        str(tmp_path), aligned=False, text_len=8, audio_len=12, vision_len=10
    )
    cfg = _cfg("cmu_mosi", str(tmp_path), max_len=max_len)
    info = prepare(cfg, data_dir=str(tmp_path / "tfds"))
    assert info.feature_shapes == {
        "text": (max_len, 768),
        "audio": (max_len, 5),
        "vision": (max_len, 20),
    }
    got = load_split(cfg, "train", data_dir=str(tmp_path / "tfds"))
    r = raw["train"]
    audio = np.where(np.isneginf(r["audio"]), 0.0, r["audio"]).astype(np.float32)
    np.testing.assert_array_equal(got["text"], _fit(r["text"], max_len))
    np.testing.assert_array_equal(got["audio"], _fit(audio, max_len))
    np.testing.assert_array_equal(got["vision"], _fit(r["vision"], max_len))
    lengths = np.stack([r["text_bert"][:, 1].sum(1), r["audio_lengths"], r["vision_lengths"]], 1)
    np.testing.assert_array_equal(got["lengths"], np.minimum(lengths, max_len))


def test_builds_are_cached_and_keyed_by_everything_that_changes_the_data(tmp_path, monkeypatch):
    src, data_dir = str(tmp_path / "src"), str(tmp_path / "tfds")
    fx.write_mmsa_pickle(src, aligned=True, seed=0)
    cfg = _cfg("cmu_mosi", src)
    prepare(cfg, data_dir=data_dir)
    prepare(_cfg("cmu_mosi", src, max_len=4), data_dir=data_dir)
    assert len(os.listdir(os.path.join(data_dir, "cmu_mosi"))) == 2  # no collision
    assert not [p for p in os.listdir(data_dir) if p.startswith(".tmp")]

    def boom(*args, **kwargs):
        raise AssertionError("source re-read although the build exists")

    real = pipeline.SOURCES["cmu_mosi"]
    monkeypatch.setitem(pipeline.SOURCES, "cmu_mosi", pipeline._Source(real.identity, boom))
    assert prepare(cfg, data_dir=data_dir).split_sizes["train"] == 6
    monkeypatch.setitem(pipeline.SOURCES, "cmu_mosi", real)

    # Replacing the file (new content, new mtime) must not reuse the stale build.
    new = fx.write_mmsa_pickle(src, aligned=True, seed=1)
    path = os.path.join(src, "aligned_50.pkl")
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    got = load_split(cfg, "test", data_dir=data_dir)
    np.testing.assert_array_equal(got["label"], new["test"]["regression_labels"])


def test_failure_during_build_leaves_nothing(tmp_path, monkeypatch):
    fx.write_mmsa_pickle(str(tmp_path / "src"), aligned=True)
    data_dir = str(tmp_path / "tfds")

    def failing(self, split):
        arrays = self.builder_config.source.splits[split]
        yield 0, {k: arrays[k][0] for k in self.info.features.keys()}
        raise RuntimeError("disk full")

    monkeypatch.setattr(storage._ArrayBuilder, "_generate_examples", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(_cfg("cmu_mosi", str(tmp_path / "src")), data_dir=data_dir)
    assert _leftovers(data_dir) == []


# --- Bad input: each corruption raises a ValueError naming file, split and key. -----------------


def _drop(split, key):
    def f(d):
        del d[split][key]

    return f


def _set(split, key, fn):
    def f(d):
        d[split][key] = fn(d[split][key])

    return f


def _poke(split, key, index, value):
    def f(d):
        d[split][key][index] = value

    return f


# (id, writer, mutate(raw dict) or replace(path), expected message fragments)
MMSA = "mmsa"
MMSA_U = "mmsa_unaligned"
MULT = "mult"
IEMO = "iemocap"
CORRUPTIONS = [
    (
        "missing_split",
        MMSA,
        lambda d: d.pop("valid"),
        ["aligned_50.pkl", "split 'valid'", "missing split"],
    ),
    (
        "split_not_dict",
        MULT,
        lambda d: d.update(test=[1, 2]),
        ["mosi_data.pkl", "split 'test'", "expected a dict"],
    ),
    (
        "missing_key_audio",
        MMSA,
        _drop("train", "audio"),
        ["split 'train' key 'audio'", "missing key"],
    ),
    (
        "missing_key_labels",
        MMSA,
        _drop("test", "regression_labels"),
        ["split 'test' key 'regression_labels'", "missing key"],
    ),
    (
        "missing_key_lengths",
        MMSA_U,
        _drop("valid", "vision_lengths"),
        ["unaligned_50.pkl", "split 'valid' key 'vision_lengths'", "missing key"],
    ),
    ("missing_key_mult", MULT, _drop("train", "labels"), ["split 'train' key 'labels'"]),
    (
        "wrong_rank",
        MMSA,
        _set("train", "audio", lambda x: x[:, :, 0]),
        ["split 'train' key 'audio'", "expected rank 3 [N, T, D], got shape (6, 8)"],
    ),
    (
        "wrong_rank_mult",
        MULT,
        _set("valid", "vision", lambda x: x[0]),
        ["split 'valid' key 'vision'", "expected rank 3 [N, T, D], got shape (6, 20)"],
    ),
    (
        "not_numeric",
        MMSA,
        _set("train", "vision", lambda x: x.astype(str)),
        ["split 'train' key 'vision'", "expected a numeric array"],
    ),
    (
        "n_mismatch_modality",
        MMSA,
        _set("valid", "vision", lambda x: x[:3]),
        ["split 'valid' key 'vision'", "has 3 examples but 'text' has 4"],
    ),
    (
        "n_mismatch_labels",
        MMSA,
        _set("test", "regression_labels", lambda x: x[:2]),
        ["split 'test' key 'regression_labels'", "has 2 examples but 'text' has 4"],
    ),
    (
        "n_mismatch_mult_labels",
        MULT,
        _set("train", "labels", lambda x: x[:5]),
        ["split 'train' key 'labels'", "has 5 examples but 'text' has 6"],
    ),
    (
        "nan_text",
        MMSA,
        _poke("train", "text", (1, 2, 3), np.nan),
        ["split 'train' key 'text'", "1 NaN", "(1, 2, 3)"],
    ),
    (
        "posinf_vision",
        MULT,
        _poke("valid", "vision", (0, 1, 2), np.inf),
        ["split 'valid' key 'vision'", "0 NaN and 1 inf"],
    ),
    (
        "neginf_text",
        MULT,
        _poke("test", "text", (2, 0, 0), -np.inf),
        ["split 'test' key 'text'", "1 inf"],
    ),
    (
        "nan_audio",
        MMSA,
        _poke("test", "audio", (3, 1, 1), np.nan),
        ["split 'test' key 'audio'", "1 NaN"],
    ),
    (
        "sentiment_range",
        MMSA,
        _poke("train", "regression_labels", 4, 3.5),
        ["split 'train' key 'regression_labels'", "3.5 at index 4 is outside [-3, 3]"],
    ),
    (
        "sentiment_range_mult",
        MULT,
        _poke("valid", "labels", (2, 0, 0), -4.0),
        ["split 'valid' key 'labels'", "-4.0 at index 2 is outside [-3, 3]"],
    ),
    (
        "sentiment_nan_label",
        MULT,
        _poke("valid", "labels", (1, 0, 0), np.nan),
        ["split 'valid' key 'labels'", "1 NaN"],
    ),
    (
        "sentiment_label_shape",
        MULT,
        _set("train", "labels", lambda x: np.repeat(x, 2, axis=1)),
        ["split 'train' key 'labels'", "got shape (6, 2, 1)"],
    ),
    (
        "iemocap_not_binary",
        IEMO,
        _poke("train", "labels", (1, 2, 0), 0.5),
        ["iemocap_data.pkl", "split 'train' key 'labels'", "must be 0 or 1", "(1, 2, 0)"],
    ),
    (
        "iemocap_not_one_hot",
        IEMO,
        _poke("valid", "labels", (3, 1), [1.0, 1.0]),
        ["split 'valid' key 'labels'", "must be one-hot", "index (3, 1) sums to 2"],
    ),
    (
        "iemocap_wrong_shape",
        IEMO,
        _set("test", "labels", lambda x: x[:, :, 1]),
        ["split 'test' key 'labels'", "expected [N, 4, 2] one-hot, got shape (4, 4)"],
    ),
    (
        "iemocap_wrong_classes",
        IEMO,
        _set("test", "labels", lambda x: x[:, :3]),
        ["split 'test' key 'labels'", "got shape (4, 3, 2)"],
    ),
    (
        "empty_split",
        MMSA,
        lambda d: d.update(
            test={k: (v[:0] if hasattr(v, "shape") else v[:0]) for k, v in d["test"].items()}
        ),
        ["split 'test'", "empty split"],
    ),
    (
        "dims_differ_between_splits",
        MMSA,
        _set("valid", "audio", lambda x: x[:, :, :4]),
        ["split 'valid' key 'audio'", "(8, 4)", "differs from split 'train'", "(8, 5)"],
    ),
    (
        "dims_differ_mult",
        MULT,
        _set("test", "text", lambda x: x[:, :, :299]),
        ["split 'test' key 'text'", "feature dims must agree"],
    ),
    (
        "lengths_too_long",
        MMSA_U,
        _set("train", "audio_lengths", lambda x: [99] + x[1:]),
        ["split 'train' key 'audio_lengths'", "[0, 12]", "max 99"],
    ),
    (
        "lengths_wrong_count",
        MMSA_U,
        _set("valid", "audio_lengths", lambda x: x[:2]),
        ["split 'valid' key 'audio_lengths'", "has 2 examples"],
    ),
    (
        "text_bert_wrong_shape",
        MMSA,
        _set("train", "text_bert", lambda x: x[:, :2]),
        ["split 'train' key 'text_bert'", "got shape (6, 2, 8)"],
    ),
]


def _write(kind, folder):
    if kind == MMSA:
        return fx.mmsa_data(aligned=True), os.path.join(folder, "aligned_50.pkl"), "cmu_mosi"
    if kind == MMSA_U:
        return fx.mmsa_data(aligned=False), os.path.join(folder, "unaligned_50.pkl"), "cmu_mosei"
    if kind == MULT:
        return fx.mult_data(dataset="mosi"), os.path.join(folder, "mosi_data.pkl"), "cmu_mosi"
    return fx.mult_data(dataset="iemocap"), os.path.join(folder, "iemocap_data.pkl"), "iemocap"


@pytest.mark.parametrize("case", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupted_pickles_raise_named_value_errors(tmp_path, case):
    _, kind, mutate, fragments = case
    raw, path, name = _write(kind, str(tmp_path / "src"))
    mutate(raw)
    fx.write_pickle(path, raw)
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(ValueError) as err:
        prepare(_cfg(name, str(tmp_path / "src")), data_dir=data_dir)
    msg = str(err.value)
    assert msg.startswith(path + ":"), msg
    for frag in fragments:
        assert frag in msg, msg
    assert _leftovers(data_dir) == []


@pytest.mark.parametrize(
    "content,fragment",
    [
        (b"this is not a pickle", "not a readable pickle"),
        (b"", "not a readable pickle"),
        (pickle.dumps([1, 2, 3]), "expected a dict with keys ['train', 'valid', 'test'], got list"),
    ],
)
def test_unreadable_files(tmp_path, content, fragment):
    path = tmp_path / "aligned_50.pkl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a readable pickle|expected a dict") as err:
        prepare(_cfg("cmu_mosi", str(tmp_path)), data_dir=str(tmp_path / "tfds"))
    assert str(err.value).startswith(f"{path}:") and fragment in str(err.value)
    assert _leftovers(str(tmp_path / "tfds")) == []


def test_missing_path_and_files(tmp_path):
    with pytest.raises(ValueError, match="config.dataset.path is empty.*aligned_50.pkl"):
        prepare(_cfg("cmu_mosi", ""), data_dir=str(tmp_path / "tfds"))
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=re.escape(f"{missing}: no such file or folder")):
        prepare(_cfg("cmu_mosei", missing), data_dir=str(tmp_path / "tfds"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: file not found.*mosei_senti_data.pkl"):
        prepare(_cfg("cmu_mosei", str(tmp_path / "empty")), data_dir=str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match="iemocap_data.pkl"):
        prepare(
            _cfg("iemocap", str(tmp_path / "empty"), layout="mult"), data_dir=str(tmp_path / "tfds")
        )
    with pytest.raises(ValueError, match="iemocap only exists in the MulT layout"):
        prepare(
            _cfg("iemocap", str(tmp_path / "empty"), layout="mmsa_aligned"),
            data_dir=str(tmp_path / "tfds"),
        )
    with pytest.raises(ValueError, match="layout.*must be one of"):
        prepare(
            _cfg("cmu_mosi", str(tmp_path / "empty"), layout="mmsa"),
            data_dir=str(tmp_path / "tfds"),
        )
    assert _leftovers(str(tmp_path / "tfds")) == []
