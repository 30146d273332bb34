"""dataset.normalize: train-only per-feature statistics, padding and -inf left out, keyed builds.

Expected values come from numpy (and sklearn's StandardScaler) on the raw arrays the fixtures
wrote, never from the pipeline's own output.
"""

import json
import os

import data_fixtures as fx
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler

from data_pipelines import hetero, load_split, pipeline, prepare
from experiments.configs import default
from modalimmune_jax import methods
from modalimmune_jax.interventions import drop_modalities
from modalimmune_jax.training import config as config_lib


def _npz_cfg(path, **kw):
    return ml_collections.ConfigDict({"name": "npz", "path": str(path), "max_len": 0, **kw})


def _shifted_npz(folder):
    """npz splits whose valid and test are shifted and rescaled copies of other draws."""
    data = fx.npz_data(sizes=(40, 12, 12), seed=1)
    data["train"]["alpha"] = data["train"]["alpha"] * 1000.0 + 5000.0
    data["valid"]["alpha"] = data["valid"]["alpha"] * 1000.0 + 9000.0  # shifted
    data["test"]["alpha"] = data["test"]["alpha"] * 3000.0 - 2000.0  # shifted and wider
    data["valid"]["zeta"] = data["valid"]["zeta"] * 0.001 + 50.0
    return fx.write_npz_folder(str(folder), data=data, meta={"task": "classification"})


def test_statistics_come_from_train_only(tmp_path):
    raw = _shifted_npz(tmp_path / "src")
    cfg = _npz_cfg(tmp_path / "src")  # npz standardizes by default
    info = prepare(cfg, data_dir=str(tmp_path / "tfds"))
    assert info.normalize == "standardize"
    # Reference: sklearn's StandardScaler fitted on the train rows only (a sequence's every
    # timestep is a row: the npz format has no lengths).
    rows = {"alpha": lambda x: x, "zeta": lambda x: x.reshape(-1, x.shape[-1])}
    scalers = {m: StandardScaler().fit(rows[m](raw["train"][m].astype(np.float32)))
               for m in ("alpha", "zeta")}
    for split in fx.SPLITS:
        got = load_split(cfg, split, data_dir=str(tmp_path / "tfds"))
        for m, scaler in scalers.items():
            x = raw[split][m].astype(np.float32)
            expected = scaler.transform(rows[m](x)).reshape(x.shape)
            np.testing.assert_allclose(got[m], expected, rtol=1e-5, atol=1e-5, err_msg=split)
    for m, scaler in scalers.items():
        np.testing.assert_allclose(info.normalization[m]["mean"], scaler.mean_, rtol=1e-12)
        np.testing.assert_allclose(info.normalization[m]["scale"], scaler.scale_, rtol=1e-12)
    # The shifted valid split is off-centre: the statistics were not refitted on it.
    valid = load_split(cfg, "valid", data_dir=str(tmp_path / "tfds"))
    assert valid["alpha"].mean() > 2.0
    # The same statistics are in the build's metadata.json.
    meta = json.load(open(os.path.join(_build_dir(tmp_path / "tfds", "npz"), "metadata.json")))
    np.testing.assert_allclose(meta["normalization"]["mean"]["alpha"], scalers["alpha"].mean_)


def _build_dir(data_dir, name):
    (config,) = os.listdir(os.path.join(data_dir, name))
    return os.path.join(data_dir, name, config, "1.0.0")


def test_removed_modality_is_exactly_zero_after_standardization(tmp_path):
    _shifted_npz(tmp_path / "src")
    cfg = _npz_cfg(tmp_path / "src")
    info = prepare(cfg, data_dir=str(tmp_path / "tfds"))
    batch = {k: jnp.asarray(v) for k, v in load_split(cfg, "test", data_dir=str(tmp_path / "tfds"))
             .items()}
    for set_mask in (False, True):
        out = drop_modalities(batch, jnp.array([0.0, 1.0]), modalities=info.modalities,
                              set_mask=set_mask)
        removed, kept = info.modalities  # ("alpha", "zeta"): sorted names
        np.testing.assert_array_equal(np.asarray(out[removed]), 0.0)
        np.testing.assert_array_equal(np.asarray(out[kept]), np.asarray(batch[kept]))
        assert np.abs(np.asarray(batch[removed])).min() > 0  # standardized values are not 0


def test_padding_and_neg_inf_are_left_out_and_stay_zero(tmp_path):
    raw = fx.write_mmsa_pickle(str(tmp_path / "src"), aligned=False, sizes=(9, 5, 5))
    cfg = ml_collections.ConfigDict({"name": "cmu_mosi", "path": str(tmp_path / "src"),
                                     "normalize": "standardize"})
    info = prepare(cfg, data_dir=str(tmp_path / "tfds"))
    assert info.normalize == "standardize"

    def values(split, m):
        """The raw [N, T, D] features, and the mask of the entries that are values."""
        d = raw[split]
        x = np.asarray(d[m], np.float32)
        lengths = {"text": np.asarray(d["text_bert"])[:, 1].sum(-1).round().astype(int),
                   "audio": np.asarray(d["audio_lengths"]),
                   "vision": np.asarray(d["vision_lengths"])}[m]
        valid = np.arange(x.shape[1])[None, :, None] < lengths[:, None, None]
        return x, valid & np.isfinite(x)

    for m in ("text", "audio", "vision"):
        x, ok = values("train", m)
        x64 = np.where(ok, x, 0.0).astype(np.float64)
        count = ok.sum(axis=(0, 1))
        mean = x64.sum(axis=(0, 1)) / count
        std = np.sqrt((np.where(ok, x64 - mean, 0.0) ** 2).sum(axis=(0, 1)) / count)
        np.testing.assert_allclose(info.normalization[m]["mean"], mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(info.normalization[m]["scale"], std, rtol=1e-9)
        for split in fx.SPLITS:
            got = load_split(cfg, split, data_dir=str(tmp_path / "tfds"))[m]
            x, ok = values(split, m)
            expected = np.where(ok, (x.astype(np.float64) - mean) / std, 0.0)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=split)
            # Padding and -inf: exactly 0, not "(0 - mean) / std".
            np.testing.assert_array_equal(got[~ok], 0.0)
    assert (~np.isfinite(raw["train"]["audio"])).sum() == fx.neg_inf_count((9, 5, 5))["train"]


def test_constant_features_are_centred_not_divided(tmp_path):
    data = fx.npz_data(sizes=(10, 4, 4))
    for split in fx.SPLITS:
        data[split]["alpha"][:, 0] = 7.0  # constant
        data[split]["alpha"][:, 1] = 0.0  # constant zero
    fx.write_npz_folder(str(tmp_path / "src"), data=data)
    cfg = _npz_cfg(tmp_path / "src")
    info = prepare(cfg, data_dir=str(tmp_path / "tfds"))
    assert info.normalization["alpha"]["scale"][:2] == (1.0, 1.0)
    got = load_split(cfg, "test", data_dir=str(tmp_path / "tfds"))
    assert np.isfinite(got["alpha"]).all() and np.isfinite(got["zeta"]).all()
    np.testing.assert_array_equal(got["alpha"][:, :2], 0.0)
    expected = StandardScaler().fit(data["train"]["alpha"]).transform(data["test"]["alpha"])
    np.testing.assert_allclose(got["alpha"], expected, rtol=1e-5, atol=1e-6)
    # The losses' statistics stay finite too.
    assert all(np.isfinite(v).all() for v in info.pooled_variance.values())


def test_changing_normalize_rebuilds(tmp_path):
    raw = _shifted_npz(tmp_path / "src")
    data_dir = str(tmp_path / "tfds")
    none = _npz_cfg(tmp_path / "src", normalize="none")
    std = _npz_cfg(tmp_path / "src", normalize="standardize")
    assert pipeline.identity(none)[0] != pipeline.identity(std)[0]
    assert prepare(none, data_dir=data_dir).normalize == "none"
    assert prepare(std, data_dir=data_dir).normalize == "standardize"
    assert len(os.listdir(os.path.join(data_dir, "npz"))) == 2  # two builds side by side
    np.testing.assert_array_equal(load_split(none, "train", data_dir=data_dir)["alpha"],
                                  raw["train"]["alpha"])
    assert abs(load_split(std, "train", data_dir=data_dir)["alpha"].mean()) < 1e-5
    # Unset means the dataset's default (standardize for npz): the same build as `std`.
    assert pipeline.identity(_npz_cfg(tmp_path / "src"))[0] == pipeline.identity(std)[0]
    with pytest.raises(ValueError, match="config.dataset.normalize"):
        pipeline.identity(_npz_cfg(tmp_path / "src", normalize="minmax"))


def test_config_defaults_match_the_pipeline_and_are_validated():
    for preset in default.PRESETS:
        config = default.get_config(preset)
        assert config.dataset.normalize == pipeline.DEFAULT_NORMALIZE[config.dataset.name], preset
    config = default.get_config("digits")
    with config.unlocked():
        config.dataset.normalize = "zscore"
    with pytest.raises(config_lib.ConfigError, match="config.dataset.normalize"):
        config_lib.validate_config(config, methods=methods.METHODS)


# --- The heterogeneous-scale npz dataset ------------------------------------------------------


def test_hetero_small_is_deterministic_and_heterogeneous(tmp_path):
    a = hetero.write(str(tmp_path / "a"), seed=3, small=True)
    b = hetero.make(seed=3, small=True)
    c = hetero.make(seed=4, small=True)
    for split in fx.SPLITS:
        for key in a[split]:
            np.testing.assert_array_equal(a[split][key], b[split][key])
    assert not np.array_equal(a["train"]["weak"], c["train"]["weak"])
    assert {s: len(a[s]["labels"]) for s in fx.SPLITS} == hetero.SMALL_SIZES
    std = {m: a["train"][m].std(axis=0) for m in hetero.MODALITIES}
    assert std["weak"].min() / std["strong"].max() >= 1000.0
    assert a["train"]["weak"].min() > 1e4  # tens of thousands
    # It is a DESIGN.md §7 folder the npz pipeline reads, standardized by default.
    cfg = _npz_cfg(tmp_path / "a")
    info = prepare(cfg, data_dir=str(tmp_path / "tfds"))
    assert info.modalities == hetero.MODALITIES and info.num_classes == 10
    train = load_split(cfg, "train", data_dir=str(tmp_path / "tfds"))
    for m in hetero.MODALITIES:
        np.testing.assert_allclose(train[m].std(axis=0), 1.0, rtol=1e-3)
