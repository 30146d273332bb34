"""OGM-GE: scores, ratios and coefficients by hand (numpy), the encoder gradient scaling against
erm's gradient, and a short run on synthetic where the dominant modality gets modulated."""

import json
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import default
from modalimmune_jax import methods
from modalimmune_jax.methods import ogm_ge
from modalimmune_jax.methods.baselines import supervised_loss
from modalimmune_jax.model import FusionModel, make_apply_fns
from modalimmune_jax.training import config as config_lib
from modalimmune_jax.training import trainer

MODS = ("a", "b")


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_example_scores_by_hand():
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], np.float32)
    labels = np.array([0, 1])
    expected = _np_softmax(logits.astype(np.float64))[[0, 1], labels]
    np.testing.assert_allclose(ogm_ge.example_scores(jnp.asarray(logits), jnp.asarray(labels),
                                                     task="classification"), expected, rtol=1e-6)
    # Multilabel [B, K, 2]: the mean over the K heads of the true class's probability.
    ml = np.array([[[1.0, -1.0], [0.0, 2.0]], [[0.3, 0.1], [-2.0, 1.0]]], np.float32)
    ml_labels = np.array([[0, 1], [1, 0]])
    p = _np_softmax(ml.astype(np.float64))
    expected = [(p[0, 0, 0] + p[0, 1, 1]) / 2, (p[1, 0, 1] + p[1, 1, 0]) / 2]
    np.testing.assert_allclose(ogm_ge.example_scores(jnp.asarray(ml), jnp.asarray(ml_labels),
                                                     task="multilabel"), expected, rtol=1e-6)
    # Regression: exp(-|e|) for l1, exp(-e^2) for mse.
    pred, y = jnp.array([0.5, -1.0, 2.0]), jnp.array([0.0, 1.0, 2.0])
    np.testing.assert_allclose(ogm_ge.example_scores(pred, y, task="regression"),
                               np.exp([-0.5, -2.0, 0.0]), rtol=1e-6)
    np.testing.assert_allclose(ogm_ge.example_scores(pred, y, task="regression",
                                                     regression_loss="mse"),
                               np.exp([-0.25, -4.0, 0.0]), rtol=1e-6)


def _official_two_modality(score_a, score_v, alpha):
    """GeWu-Lab/OGM-GE_CVPR2022 main.py, train_epoch, transcribed."""
    ratio_v = score_v / score_a
    ratio_a = 1 / ratio_v
    relu = lambda x: max(x, 0.0)
    if ratio_v > 1:
        return 1.0, 1 - math.tanh(alpha * relu(ratio_v))
    return 1 - math.tanh(alpha * relu(ratio_a)), 1.0


def test_modulation_coefficients_by_hand():
    ratio, coeff = ogm_ge.modulation_coefficients(jnp.array([30.0, 20.0, 10.0]), alpha=0.5)
    np.testing.assert_allclose(ratio, np.array([30.0, 20.0, 10.0]) / (10.0 + 1e-5), rtol=1e-6)
    # No 1 subtracted inside the relu: just above ratio 1 the coefficient is 1 - tanh(alpha).
    np.testing.assert_allclose(coeff, [1 - np.tanh(0.5 * 3.0), 1 - np.tanh(0.5 * 2.0), 1.0],
                               rtol=1e-5)
    # Two modalities: the official formula.
    for score_a, score_v in ((12.0, 20.0), (40.0, 7.5)):
        _, coeff = ogm_ge.modulation_coefficients(jnp.array([score_a, score_v]), alpha=0.3)
        np.testing.assert_allclose(coeff, _official_two_modality(score_a, score_v, 0.3),
                                   rtol=1e-5)
    # A tie modulates nobody.
    _, coeff = ogm_ge.modulation_coefficients(jnp.array([5.0, 5.0]), alpha=1.0)
    np.testing.assert_array_equal(coeff, [1.0, 1.0])


def _setup(task, *, d=4, mask_prob=0.0, noise=False, alpha=0.5, n=16):
    num_classes = {"classification": 3, "regression": 1, "multilabel": 2}[task]
    model = FusionModel(modalities=MODS, feature_shapes={"a": (3, 2), "b": (4,)}, task=task,
                        num_classes=num_classes, encoder="conv", d=d, d_h=6, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    fns = make_apply_fns(graphdef)
    info = types.SimpleNamespace(modalities=MODS, task=task, num_classes=num_classes,
                                 feature_shapes={"a": (3, 2), "b": (4,)})
    config = default.get_config("synthetic,tiny")
    with config.unlocked():
        config.method = "ogm_ge"
        config.num_steps = 100
        config.removal.mask_prob = mask_prob
        config.ogm_ge.alpha = alpha
        config.ogm_ge.noise = noise
    rng = np.random.default_rng(1)
    label = {"classification": rng.integers(0, 3, n),
             "regression": rng.normal(size=n).astype(np.float32),
             "multilabel": rng.integers(0, 2, (n, 2))}[task]
    batch = {"a": jnp.asarray(rng.normal(size=(n, 3, 2)), jnp.float32),
             "b": jnp.asarray(3.0 * rng.normal(size=(n, 4)), jnp.float32),
             "lengths": jnp.tile(jnp.array([[3, 1]], jnp.int32), (n, 1)),
             "mask": jnp.ones((n, 2), jnp.float32), "label": jnp.asarray(label)}
    method = methods.make_method("ogm_ge", fns, info=info, config=config)
    return params, fns, info, config, batch, method


def _np_scores(preds, labels, task):
    preds, labels = np.asarray(preds, np.float64), np.asarray(labels)
    if task == "classification":
        return _np_softmax(preds)[np.arange(len(labels)), labels]
    if task == "multilabel":
        p = _np_softmax(preds)
        return np.mean(np.take_along_axis(p, labels[..., None], -1)[..., 0], axis=1)
    return np.exp(-np.abs(preds - labels))


def _names(path):
    return tuple(getattr(k, "key", None) for k in path)


@pytest.mark.parametrize("mask_prob", [0.0, 1.0])
@pytest.mark.parametrize("task", ["classification", "regression", "multilabel"])
def test_two_modality_step_by_hand(task, mask_prob):
    params, fns, info, config, batch, method = _setup(task, mask_prob=mask_prob)
    g, _, meas, _ = jax.jit(lambda p, b: method.grads(p, {}, b, jax.random.key(0),
                                                   step=jnp.int32(3), meta_batch=b))(params,
                                                                                     batch)
    # Each modality's own prediction: the other zero-filled, its mask column 1 - mask_prob
    # (the rule's two ends are deterministic).
    scores = []
    for i in range(2):
        other = MODS[1 - i]
        alone = {**batch, other: jnp.zeros_like(batch[other]),
                 "mask": batch["mask"].at[:, 1 - i].set(1.0 - mask_prob)}
        scores.append(np.sum(_np_scores(fns.apply(params, alone)["preds"], batch["label"], task)))
    scores = np.array(scores)
    ratio = scores / (scores.min() + 1e-5)
    coeff = np.where(ratio > 1, 1 - np.tanh(0.5 * np.maximum(ratio, 0)), 1.0)
    assert coeff.min() < 1.0
    for i, m in enumerate(MODS):
        np.testing.assert_allclose(meas[f"ogm/score/{m}"], scores[i] / 16, rtol=1e-5)
        np.testing.assert_allclose(meas[f"ogm/ratio/{m}"], ratio[i], rtol=1e-5)
        np.testing.assert_allclose(meas[f"ogm/coeff/{m}"], coeff[i], rtol=1e-5)
    assert float(meas["ogm/modulating"]) == 1.0
    # The gradient: erm's on the full batch, with encoder m's weights (not its biases) times k_m.
    erm = jax.grad(lambda p: supervised_loss(fns, p, batch, info=info, config=config)[0])(params)
    scaled = 0
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(erm),
                                 strict=True):
        names = _names(path)
        if names[0] == "encoders" and names[-2] not in ("bias", "scale"):
            np.testing.assert_allclose(got, coeff[names[1]] * want, rtol=1e-5, atol=1e-8)
            scaled += 1
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    # Per encoder: proj kernel, pos, conv kernel, out kernel.
    assert scaled == 8


def test_generalization_enhancement_noise_and_window():
    params, fns, info, config, batch, method = _setup("classification", d=64, noise=True)
    erm = jax.grad(lambda p: supervised_loss(fns, p, batch, info=info, config=config)[0])(params)
    grads = jax.jit(lambda p, b, s: method.grads(p, {}, b, jax.random.key(0), step=s,
                                                 meta_batch=b))
    g, _, meas, _ = grads(params, batch, jnp.int32(50))  # the window's last step: 0.5 * 100
    assert float(meas["ogm/modulating"]) == 1.0
    for i in range(2):
        k = float(meas[f"ogm/coeff/{MODS[i]}"])
        # Every modality's weights get noise, the one behind (k = 1) included, with the std of
        # the unmodulated gradient (Bessel-corrected, as torch's std).
        for name in ("conv", "out"):
            want = np.asarray(erm["encoders"][i][name]["kernel"][...], np.float64)
            noise = np.asarray(g["encoders"][i][name]["kernel"][...], np.float64) - k * want
            assert noise.size >= 4096
            np.testing.assert_allclose(noise.std(), want.std(ddof=1) + 1e-8, rtol=0.05)
            assert abs(noise.mean()) < 0.1 * want.std(ddof=1)
            # Biases are neither scaled nor noised.
            np.testing.assert_allclose(g["encoders"][i][name]["bias"][...],
                                       erm["encoders"][i][name]["bias"][...], rtol=1e-5,
                                       atol=1e-8)
    np.testing.assert_allclose(g["head"]["kernel"][...], erm["head"]["kernel"][...], rtol=1e-5,
                               atol=1e-8)
    # Past the window: erm's gradient, untouched, while the coefficients are still logged.
    g, _, meas, _ = grads(params, batch, jnp.int32(51))
    assert float(meas["ogm/modulating"]) == 0.0 and min(
        float(meas[f"ogm/coeff/{m}"]) for m in MODS) < 1.0
    for got, want in zip(jax.tree.leaves(g), jax.tree.leaves(erm), strict=True):
        # jit against eager float32 sums over 64-wide layers: a few ulps, not a scaling.
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("field,value", [
    ("ogm_ge.alpha", -0.1), ("ogm_ge.modulation_starts", 1.5),
    ("ogm_ge.modulation_ends", 0.2), ("ogm_ge.noise", None), ("removal.mask_prob", 1.5),
])
def test_validate_config_names_the_field(field, value):
    config = default.get_config("synthetic")
    with config.unlocked():
        config.method = "ogm_ge"
        config.ogm_ge.modulation_starts = 0.3 if field == "ogm_ge.modulation_ends" else 0.0
        section, leaf = field.split(".")
        config[section][leaf] = value
    with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
        config_lib.validate_config(config, methods=methods.METHODS)


def test_dominant_modality_is_modulated_on_synthetic(tmp_path):
    """synthetic's `text` nearly determines the label, so it leads the unimodal scores and its
    encoder's coefficient drops below 1 (200 steps of the tiny preset: about 30 s on CPU)."""
    config = default.get_config("synthetic,tiny")
    with config.unlocked():
        config.method = "ogm_ge"
        config.num_steps = 200
        config.log_every = 10
        config.eval_every = 200
        config.checkpoint_every = 200
        config.eval.protocol = "full"  # the coefficients are under test, not the evaluation
    workdir = str(tmp_path / "ogm")
    trainer.train_and_evaluate(config, workdir, progress=False)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "loss" in r]
    assert len(records) == 20
    text = np.array([r["ogm/coeff/text"] for r in records])
    assert np.mean(text < 1.0) > 0.5, text
    # In the second half text has the highest unimodal score, hence the lowest coefficient.
    late = records[10:]
    assert np.mean([r["ogm/score/text"] >= max(r["ogm/score/audio"], r["ogm/score/vision"])
                    for r in late]) > 0.5
    assert all(np.isfinite(r["loss"]) for r in records)
