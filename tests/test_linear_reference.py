"""The linear reference: against scikit-learn fitted directly on hand-pooled features."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score
from sklearn.preprocessing import StandardScaler

from modalimmune_jax import metrics
from modalimmune_jax.linear_reference import (
    design_matrix,
    linear_reference,
    linear_reference_conditions,
)
from modalimmune_jax.robustness import missing_conditions

MODS = ("seq", "vec", "big")


def _split(n, seed, task="classification"):
    """A sequence with padding (lengths), a vector, and a view on a scale of 1e4."""
    rng = np.random.default_rng(seed)
    y_latent = rng.normal(size=(n, 2))
    seq = rng.normal(size=(n, 5, 3)) + y_latent[:, None, :1]
    lengths = rng.integers(1, 6, size=n)
    seq[np.arange(5)[None, :] >= lengths[:, None]] = 99.0  # padding must not leak into the pool
    vec = rng.normal(size=(n, 4)) + y_latent[:, 1:]
    big = 1e4 * (rng.normal(size=(n, 2)) + y_latent) + 3e4
    if task == "classification":
        label = (y_latent[:, 0] > 0).astype(np.int32) + 2 * (y_latent[:, 1] > 0)
    elif task == "regression":
        label = (y_latent.sum(1) + 0.1 * rng.normal(size=n)).astype(np.float32)
    else:
        y0, y1 = y_latent.T  # four labels, as IEMOCAP's four emotions: [N, 4]
        label = (np.stack([y0, y1, y0 + y1, y0 - y1], 1) > 0).astype(np.int32)
    return {"seq": seq.astype(np.float32), "vec": vec.astype(np.float32),
            "big": big.astype(np.float32),
            "lengths": np.stack([lengths, np.ones(n), np.ones(n)], 1).astype(np.int32),
            "label": label}


def _pooled(arrays, names):
    cols = []
    for m in names:
        x = arrays[m].astype(np.float64)
        if m == "seq":  # mean over the valid steps, by hand
            n = arrays["lengths"][:, 0]
            x = np.stack([x[i, :n[i]].mean(0) for i in range(len(x))])
        cols.append(x)
    return np.concatenate(cols, 1)


@pytest.mark.parametrize("keep,names", [(None, MODS), (["vec", "seq"], ("seq", "vec")),
                                        (np.array([0.0, 0.0, 1.0]), ("big",))])
def test_classification_matches_sklearn(keep, names):
    train, test = _split(300, 0), _split(120, 1)
    got = linear_reference(train, test, modalities=MODS, task="classification",
                           metric_family="classification", keep=keep)
    scaler = StandardScaler().fit(_pooled(train, names))
    lr = LogisticRegression(max_iter=2000).fit(scaler.transform(_pooled(train, names)),
                                               train["label"])
    pred = lr.predict(scaler.transform(_pooled(test, names)))
    assert got["acc"] == accuracy_score(test["label"], pred)
    assert got == metrics.classification_metrics(pred, test["label"])
    assert got["acc"] > 0.4  # four classes; the data carry the label


def test_regression_uses_ridge():
    train, test = _split(200, 2, "regression"), _split(80, 3, "regression")
    got = linear_reference(train, test, modalities=MODS, task="regression",
                           metric_family="regression")
    scaler = StandardScaler().fit(_pooled(train, MODS))
    pred = Ridge(alpha=1.0).fit(scaler.transform(_pooled(train, MODS)), train["label"]).predict(
        scaler.transform(_pooled(test, MODS)))
    expected = metrics.regression_metrics(pred, test["label"])
    for k, v in expected.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-9, err_msg=k)
    assert got["R2"] > 0.5  # the features carry the target


def test_multilabel_fits_one_binary_model_per_label():
    train, test = _split(200, 4, "multilabel"), _split(80, 5, "multilabel")
    got = linear_reference(train, test, modalities=MODS, task="multilabel",
                           metric_family="iemocap")
    scaler = StandardScaler().fit(_pooled(train, MODS))
    x_train, x_test = scaler.transform(_pooled(train, MODS)), scaler.transform(_pooled(test, MODS))
    for k in range(4):
        pred = LogisticRegression(max_iter=2000).fit(x_train, train["label"][:, k]).predict(x_test)
        name = metrics.IEMOCAP_EMOTIONS[k]
        assert got[f"{name}_acc"] == accuracy_score(test["label"][:, k], pred)


def test_conditions_are_the_specialists():
    train, test = _split(150, 6), _split(60, 7)
    kw = dict(modalities=MODS, task="classification", metric_family="classification")
    got = linear_reference_conditions(train, test, **kw)
    assert got["full"] == linear_reference(train, test, **kw)
    assert list(got["missing"]) == [name for name, _ in missing_conditions(MODS)]
    for name, keep in missing_conditions(MODS):
        assert got["missing"][name] == linear_reference(train, test, keep=keep, **kw)
    np.testing.assert_allclose(got["missing_avg"]["acc"],
                               np.mean([v["acc"] for v in got["missing"].values()]))


def test_flatten_pooling_and_bad_keep():
    train = _split(10, 8)
    flat = design_matrix(train, modalities=MODS, keep=["seq"], pooling="flatten")
    np.testing.assert_array_equal(flat, train["seq"].reshape(10, 15))
    with pytest.raises(ValueError, match="unknown modalities"):
        design_matrix(train, modalities=MODS, keep=["sound"])
    with pytest.raises(ValueError, match="no modality kept"):
        design_matrix(train, modalities=MODS, keep=np.zeros(3))
