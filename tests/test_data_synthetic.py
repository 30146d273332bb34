"""The synthetic modality-imbalance dataset: determinism, noise levels and the imbalance claim."""

import ml_collections
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge

from data_pipelines import load_split, prepare, synthetic

TINY = {"num_train": 12, "num_valid": 4, "num_test": 5, "seq_len": 4}


def _cfg(**kw):
    return ml_collections.ConfigDict({"name": "synthetic", **kw})


def test_stored_data_is_deterministic_from_the_seed(tmp_path):
    a = load_split(_cfg(**TINY), "train", data_dir=str(tmp_path / "a"))
    b = load_split(_cfg(**TINY), "train", data_dir=str(tmp_path / "b"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    c = load_split(_cfg(**TINY, data_seed=1), "train", data_dir=str(tmp_path / "a"))
    assert not np.allclose(a["text"], c["text"])
    # The stored split is exactly what the generator makes (a storage round trip).
    gen = synthetic.generate(_cfg(**TINY)).splits["train"]
    for k in ("text", "audio", "vision", "label", "lengths"):
        np.testing.assert_array_equal(a[k], gen[k])


def test_resizing_one_split_leaves_the_others(tmp_path):
    a = synthetic.generate(_cfg(**TINY)).splits
    b = synthetic.generate(_cfg(**(TINY | {"num_test": 9}))).splits
    np.testing.assert_array_equal(a["train"]["text"], b["train"]["text"])
    np.testing.assert_array_equal(a["valid"]["vision"], b["valid"]["vision"])
    assert b["test"]["text"].shape == (9, 4, 16)


def test_shapes_and_info(tmp_path):
    info = prepare(_cfg(**TINY), data_dir=str(tmp_path))
    assert info.modalities == ("text", "audio", "vision")
    assert info.feature_shapes == {"text": (4, 16), "audio": (4, 12), "vision": (4, 8)}
    assert (info.task, info.num_classes, info.metric_family) == (
        "classification",
        4,
        "classification",
    )
    info = prepare(_cfg(**TINY, task="regression"), data_dir=str(tmp_path))
    assert (info.task, info.num_classes, info.metric_family) == ("regression", 1, "regression")
    y = load_split(_cfg(**TINY, task="regression"), "test", data_dir=str(tmp_path))["label"]
    assert y.dtype == np.float32 and y.shape == (5,)


def test_noise_level_per_modality():
    # Within one example the signal is constant over time, so the spread over time is the noise.
    s = synthetic.generate(_cfg(num_train=400, num_valid=1, num_test=1, seq_len=8))
    for m, sigma in synthetic.NOISE_STD.items():
        x = s.splits["train"][m]
        within = x.var(axis=1, ddof=1).mean()
        assert within == pytest.approx(sigma**2, rel=0.05), m


def test_labels():
    s = synthetic.generate(_cfg())
    y = s.splits["train"]["label"]
    assert y.dtype == np.int32 and set(np.unique(y)) == {0, 1, 2, 3}
    assert np.bincount(y).min() > 0.15 * len(y)  # roughly balanced classes
    r = synthetic.generate(_cfg(task="regression")).splits["train"]["label"]
    assert r.dtype == np.float32 and r.min() >= -3 and r.max() <= 3
    assert r.std() == pytest.approx(1.0, abs=0.1)


def _pooled(split, modalities):
    return np.concatenate([split[m].mean(axis=1) for m in modalities], axis=-1)


def test_imbalance_text_dominates_audio_vision_jointly_sufficient():
    s = synthetic.generate(_cfg()).splits  # default sizes 2000/500/1000

    def acc(mods):
        model = LogisticRegression(max_iter=500).fit(_pooled(s["train"], mods), s["train"]["label"])
        return model.score(_pooled(s["test"], mods), s["test"]["label"])

    text, joint, audio, vision = (
        acc(["text"]),
        acc(["audio", "vision"]),
        acc(["audio"]),
        acc(["vision"]),
    )
    assert text >= 0.88
    assert 0.65 <= joint <= 0.88
    assert audio <= 0.65 and vision <= 0.65
    assert text > joint + 0.05 and joint > max(audio, vision) + 0.1


def test_imbalance_regression():
    s = synthetic.generate(_cfg(task="regression")).splits

    def r2(mods):
        model = Ridge(alpha=1e-3).fit(_pooled(s["train"], mods), s["train"]["label"])
        return model.score(_pooled(s["test"], mods), s["test"]["label"])

    text, joint, audio = r2(["text"]), r2(["audio", "vision"]), r2(["audio"])
    assert text > 0.95 and 0.6 < joint < 0.95 and audio < joint - 0.1


def test_bad_knobs():
    with pytest.raises(ValueError, match="task must be"):
        synthetic.generate(_cfg(task="ranking"))
    with pytest.raises(ValueError, match="num_train must be a positive integer"):
        synthetic.generate(_cfg(num_train=0))
    with pytest.raises(ValueError, match="latent_dim must be >= 2"):
        synthetic.generate(_cfg(latent_dim=1))
