"""The fusion model: shapes per encoder/fusion/task, length and presence masking, the collapse hook."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from modalimmune_jax import losses
from modalimmune_jax.interventions import drop_modalities
from modalimmune_jax.model import collapse_target, create_model, make_apply_fns


class _Info:
    modalities = ("text", "audio", "vec")
    feature_shapes = {"text": (6, 5), "audio": (4, 3), "vec": (7,)}


def _build(task="classification", encoder="mlp", fusion="concat", num_classes=3):
    info = _Info()
    info.task, info.num_classes = task, num_classes
    cfg = ml_collections.ConfigDict(dict(encoder=encoder, fusion=fusion, d=8, d_h=12,
                                         num_heads=2))
    model = create_model(info, cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    return make_apply_fns(graphdef), params


def _batch(b=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "text": jnp.asarray(rng.normal(size=(b, 6, 5)), jnp.float32),
        "audio": jnp.asarray(rng.normal(size=(b, 4, 3)), jnp.float32),
        "vec": jnp.asarray(rng.normal(size=(b, 7)), jnp.float32),
        "lengths": jnp.asarray([[6, 4, 1], [3, 2, 1], [1, 4, 1], [6, 1, 1]][:b], jnp.int32),
        "mask": jnp.ones((b, 3), jnp.float32),
        "label": jnp.zeros((b,), jnp.int32),
    }


@pytest.mark.parametrize("encoder", ["mlp", "conv", "transformer"])
@pytest.mark.parametrize("fusion", ["concat", "attention"])
def test_shapes(encoder, fusion):
    fns, params = _build(encoder=encoder, fusion=fusion)
    out = jax.jit(fns.apply)(params, _batch())
    chex.assert_shape(out["z"], (4, 3, 8))
    chex.assert_shape(out["h"], (4, 12))
    chex.assert_shape(out["preds"], (4, 3))
    chex.assert_shape(out["recon"], [(4, 5), (4, 3), (4, 7)])
    chex.assert_tree_all_finite(out)


@pytest.mark.parametrize("task,shape", [("regression", (4,)), ("multilabel", (4, 4, 2))])
def test_heads(task, shape):
    fns, params = _build(task=task, num_classes=4)
    chex.assert_shape(fns.apply(params, _batch())["preds"], shape)


@pytest.mark.parametrize("encoder", ["mlp", "conv", "transformer"])
def test_padding_beyond_length_is_ignored(encoder):
    fns, params = _build(encoder=encoder)
    batch = _batch()
    # Row 1 has text length 3: garbage after step 3 must not change anything.
    poisoned = dict(batch, text=batch["text"].at[1, 3:].set(1e3))
    chex.assert_trees_all_close(fns.apply(params, batch)["preds"],
                                fns.apply(params, poisoned)["preds"], atol=1e-5)


@pytest.mark.parametrize("fusion", ["concat", "attention"])
def test_mask_protocol_removes_the_modality(fusion):
    fns, params = _build(fusion=fusion)
    batch = _batch()
    keep = jnp.array([1.0, 0.0, 1.0])
    told = drop_modalities(batch, keep, modalities=_Info.modalities, set_mask=True)
    other = dict(told, audio=jnp.full_like(told["audio"], 7.0))  # the removed features differ
    chex.assert_trees_all_close(fns.apply(params, told)["preds"],
                                fns.apply(params, other)["preds"], atol=1e-5)
    # Under `zero` the mask stays 1 and zero-filled features still reach the fusion.
    assert not np.allclose(fns.apply(params, batch)["preds"], fns.apply(params, told)["preds"])


def test_collapse_target_replaces_only_the_target():
    z = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    out = collapse_target(z, jnp.array([0.0, 1.0, 0.0]), 1.0, 0.0,
                          collapse_fn=lambda zm, s, g: -zm)
    np.testing.assert_array_equal(out[:, 1], -z[:, 1])
    np.testing.assert_array_equal(out[:, [0, 2]], z[:, [0, 2]])
    np.testing.assert_array_equal(
        collapse_target(z, jnp.zeros(3), 1.0, 0.0, collapse_fn=lambda zm, s, g: -zm), z)
    two = collapse_target(z, jnp.array([1.0, 0.0, 1.0]), 1.0, 0.0,
                          collapse_fn=lambda zm, s, g: -zm)
    np.testing.assert_array_equal(two[:, [0, 2]], -z[:, [0, 2]])
    np.testing.assert_array_equal(two[:, 1], z[:, 1])


def test_collapse_target_null_anchor_by_hand():
    # A full collapse (strength 1, gamma 0) maps the target to its batch mean; the null anchor
    # then moves that centre onto the null embedding: the target becomes exactly `null`.
    from modalimmune_jax.spectral import spectral_collapse
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(6, 3, 4)), jnp.float32)
    null = jnp.asarray(rng.normal(size=(6, 3, 4)), jnp.float32)
    out = collapse_target(z, jnp.array([0.0, 1.0, 0.0]), 1.0, 0.0,
                          collapse_fn=spectral_collapse, null=null)
    np.testing.assert_allclose(out[:, 1], null[:, 1], atol=1e-5)
    np.testing.assert_array_equal(out[:, [0, 2]], z[:, [0, 2]])
    # Half strength: halfway between the (gamma=0) shrunk spread and the moved centre.
    half = collapse_target(z, jnp.array([0.0, 1.0, 0.0]), 0.5, 0.0,
                           collapse_fn=spectral_collapse, null=null)
    zt = np.asarray(z[:, 1])
    mu = zt.mean(0, keepdims=True)
    expected = mu + 0.5 * (zt - mu) + 0.5 * (np.asarray(null[:, 1]) - mu)
    np.testing.assert_allclose(half[:, 1], expected, atol=1e-5)


def test_losses_by_hand():
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    labels = jnp.array([0, 0])
    expected = -np.log(np.exp([2.0, 0.0]) / (np.exp([2.0, 0.0]) + np.exp([0.0, 1.0])))
    np.testing.assert_allclose(losses.task_loss(logits, labels, task="classification"),
                               expected, rtol=1e-6)
    np.testing.assert_allclose(
        losses.task_loss(jnp.array([1.0, -2.0]), jnp.array([0.5, 0.0]), task="regression"),
        [0.5, 2.0])
    np.testing.assert_allclose(
        losses.task_loss(jnp.array([1.0, -2.0]), jnp.array([0.5, 0.0]), task="regression",
                         regression_loss="mse"), [0.25, 4.0])
    # Pooled targets respect lengths: row 1 of text averages its first 3 steps only.
    batch = _batch()
    pooled = losses.pooled_features(batch, _Info.modalities)
    np.testing.assert_allclose(pooled[0][1], np.asarray(batch["text"][1, :3]).mean(0), rtol=1e-6)
    np.testing.assert_allclose(pooled[2], batch["vec"])


# --- Issue 14: dropout, input LayerNorm, scale-free reconstruction ------------------------------


def _build_cfg(info=None, **model_kw):
    info = info or _Info()
    info.task, info.num_classes = "classification", 3
    cfg = ml_collections.ConfigDict(
        {**dict(encoder="mlp", fusion="concat", d=8, d_h=12, num_heads=2), **model_kw})
    model = create_model(info, cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    return make_apply_fns(graphdef), params


@pytest.mark.parametrize("fusion", ["concat", "attention"])
def test_dropout_only_with_an_rng(fusion):
    fns, params = _build_cfg(dropout=0.5, fusion=fusion)
    plain, _ = _build_cfg(dropout=0.0, fusion=fusion)  # same init: dropout adds no parameters
    batch = _batch()
    out = fns.apply(params, batch)["preds"]
    # Without a key: deterministic, and exactly the model without dropout.
    np.testing.assert_array_equal(out, fns.apply(params, batch)["preds"])
    np.testing.assert_array_equal(out, plain.apply(params, batch)["preds"])
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a, b = fns.apply(params, batch, rng=k1), fns.apply(params, batch, rng=k2)
    assert not np.allclose(a["preds"], out) and not np.allclose(a["preds"], b["preds"])
    # The same key gives the same output (also through jit).
    again = jax.jit(lambda p, x, k: fns.apply(p, x, rng=k))(params, batch, k1)
    np.testing.assert_allclose(again["preds"], a["preds"], rtol=1e-6, atol=1e-6)
    # Dropout zeroes whole entries of z and h and scales the rest by 1 / (1 - rate).
    z_clean, z_drop = np.asarray(fns.encode(params, batch)), np.asarray(a["z"])
    dropped = z_drop == 0.0
    assert 0.3 < dropped.mean() < 0.7
    np.testing.assert_allclose(z_drop[~dropped], 2.0 * z_clean[~dropped], rtol=1e-5)


def test_dropout_function_by_hand():
    from modalimmune_jax.model import dropout
    x = jnp.arange(1.0, 2001.0).reshape(40, 50)
    y = np.asarray(dropout(x, 0.25, jax.random.key(0)))
    kept = y != 0
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
    assert abs(kept.mean() - 0.75) < 0.03
    np.testing.assert_array_equal(dropout(x, 0.25, None), x)
    np.testing.assert_array_equal(dropout(x, 0.0, jax.random.key(0)), x)


def test_input_norm_is_scale_free_and_maps_a_removed_modality_to_one_embedding():
    fns, params = _build_cfg(input_norm=True)
    assert "in_norm" in params["encoders"][0] and "in_norm" in params["encoders"][2]
    batch = _batch()
    # LayerNorm per timestep: multiplying each example's text by its own factor changes nothing
    # (down to features of variance ~1e-4, where LayerNorm's epsilon of 1e-6 starts to count).
    factor = jnp.asarray([1e-1, 1.0, 1e3, 1e4])[:, None, None]
    scaled = dict(batch, text=batch["text"] * factor)
    np.testing.assert_allclose(fns.encode(params, scaled)[:, 0], fns.encode(params, batch)[:, 0],
                               rtol=1e-3, atol=1e-4)
    # A zero-filled modality: LayerNorm(0) = its bias (no NaN), so every example with the same
    # lengths gets the same embedding.
    same_len = dict(batch, lengths=jnp.full((4, 3), jnp.asarray([6, 4, 1])))
    told = drop_modalities(same_len, jnp.array([1.0, 0.0, 1.0]), modalities=_Info.modalities,
                           set_mask=False)
    z = np.asarray(fns.encode(params, told))
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z[:, 1], np.broadcast_to(z[:1, 1], z[:, 1].shape), atol=1e-6)


def test_reconstruction_loss_by_hand_and_invariant_to_a_views_units():
    rng = np.random.default_rng(0)
    recon = [rng.normal(size=(5, 3)), rng.normal(size=(5, 2))]
    targets = [rng.normal(size=(5, 3)), rng.normal(size=(5, 2))]
    variances = [np.array([0.5, 2.0, 4.0]), np.array([1e-2, 3.0])]
    expected = sum(np.mean((r - t) ** 2 / v, axis=-1)
                   for r, t, v in zip(recon, targets, variances, strict=True))
    got = losses.reconstruction_loss([jnp.asarray(x, jnp.float32) for x in recon],
                                     [jnp.asarray(x, jnp.float32) for x in targets],
                                     variances=[jnp.asarray(v, jnp.float32) for v in variances])
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # A view in other units (x 1e4): its errors and its variances scale alike.
    c = 1e4
    scaled = losses.reconstruction_loss(
        [jnp.asarray(recon[0], jnp.float32), jnp.asarray(recon[1] * c, jnp.float32)],
        [jnp.asarray(targets[0], jnp.float32), jnp.asarray(targets[1] * c, jnp.float32)],
        variances=[jnp.asarray(variances[0], jnp.float32),
                   jnp.asarray(variances[1] * c**2, jnp.float32)])
    np.testing.assert_allclose(scaled, expected, rtol=1e-4)


class _InfoWithStats(_Info):
    pooled_mean = {"text": (1.0, -2.0, 0.0, 3.0, 5.0), "audio": (1e4, 2e4, 0.0),
                   "vec": (0.0,) * 7}
    pooled_variance = {"text": (4.0, 1.0, 0.0, 9.0, 1.0), "audio": (1e8, 4e8, 1e8),
                       "vec": (0.0,) * 7}


def test_reconstruction_stats_floor_and_decoder_units():
    from modalimmune_jax.model import VARIANCE_FLOOR, reconstruction_stats
    stats = reconstruction_stats(_InfoWithStats())
    np.testing.assert_array_equal(stats["text"][1],
                                  [4.0, 1.0, VARIANCE_FLOOR * 3.0, 9.0, 1.0])  # mean var = 3
    np.testing.assert_array_equal(stats["vec"][1], np.ones(7))  # all constant: unit variances
    np.testing.assert_array_equal(stats["vec"][0], np.zeros(7))
    # Without statistics: 0 and 1, the raw squared error.
    np.testing.assert_array_equal(losses.reconstruction_variances(_Info())[1], np.ones(3))
    # The decoders answer in feature units: mean + std * (W h + b).
    fns, params = _build_cfg(info=_InfoWithStats())
    h = jax.random.normal(jax.random.key(3), (4, 12))
    for i, m in enumerate(_Info.modalities):
        dec = params["decoders"][i]
        linear = np.asarray(h) @ np.asarray(dec["kernel"].value) + np.asarray(dec["bias"].value)
        mean, var = stats[m]
        np.testing.assert_allclose(fns.reconstruct(params, h)[i], mean + np.sqrt(var) * linear,
                                   rtol=1e-5, atol=1e-3 if m == "audio" else 1e-5)


def test_model_config_fields_are_validated():
    from experiments.configs import default
    from modalimmune_jax import methods
    from modalimmune_jax.training import config as config_lib
    for field, value in (("dropout", 1.0), ("dropout", -0.1), ("input_norm", "yes")):
        as_dict = default.get_config("digits").to_dict()
        as_dict["model"][field] = value  # via a dict: ConfigDict would refuse a str for a bool
        config = ml_collections.ConfigDict(as_dict)
        with pytest.raises(config_lib.ConfigError, match=f"config.model.{field}"):
            config_lib.validate_config(config, methods=methods.METHODS)


def test_collapse_target_closed_form_matches_the_svd_path():
    # A static gamma = 0 vmaps spectral_collapse's closed form over the modalities; a gamma given
    # as an array takes the lax.map of SVDs. Per-example targets, null anchor: same values.
    from modalimmune_jax.spectral import spectral_collapse
    rng = np.random.default_rng(1)
    z, null = (jnp.asarray(rng.normal(size=(16, 3, 8)), jnp.float32) for _ in range(2))
    target = jnp.asarray(rng.random((16, 3)) < 0.4, jnp.float32)
    run = jax.jit(lambda z, t, s, null, g: collapse_target(z, t, s, g, null=null,
                                                           collapse_fn=spectral_collapse))
    closed = jax.jit(lambda z, t, s, null: collapse_target(z, t, s, 0.0, null=null,
                                                           collapse_fn=spectral_collapse))
    for strength in (0.3, 0.99):
        np.testing.assert_allclose(closed(z, target, strength, null),
                                   run(z, target, strength, null, jnp.float32(0.0)), atol=1e-5)
        # With the null anchor the target is (1 - s) z + s null, by hand.
        expected = np.where(np.asarray(target)[..., None] > 0,
                            (1 - strength) * np.asarray(z) + strength * np.asarray(null), z)
        np.testing.assert_allclose(closed(z, target, strength, null), expected, atol=1e-6)


def test_collapse_target_per_example_strength_is_each_rows_own_collapse():
    """A [B] strength: row b is row b of the collapse at strength s_b (closed form and SVD)."""
    from modalimmune_jax.spectral import spectral_collapse
    rng = np.random.default_rng(2)
    z, null = (jnp.asarray(rng.normal(size=(8, 2, 5)), jnp.float32) for _ in range(2))
    target = jnp.asarray(rng.random((8, 2)) < 0.6, jnp.float32)
    strengths = jnp.asarray(rng.uniform(0.1, 0.99, size=8), jnp.float32)
    for gamma in (0.0, jnp.float32(1.0)):
        rows = collapse_target(z, target, strengths, gamma, null=null,
                               collapse_fn=spectral_collapse)
        for b in range(8):
            one = collapse_target(z, target, float(strengths[b]), gamma, null=null,
                                  collapse_fn=spectral_collapse)
            np.testing.assert_allclose(rows[b], one[b], atol=2e-5)


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_temporal_conv_equals_flax_conv(steps):
    # The matmul form (issue 15: no XLA:CPU cliff inside HVP loops) against lax.conv itself.
    from modalimmune_jax.model import TemporalConv, temporal_conv
    conv = nnx.Conv(5, 4, kernel_size=(3,), padding="SAME", rngs=nnx.Rngs(0))
    conv.bias.value = jnp.arange(4.0)
    x = jax.random.normal(jax.random.key(1), (2, steps, 5))
    chex.assert_trees_all_close(temporal_conv(x, conv.kernel.value, conv.bias.value), conv(x),
                                atol=1e-5)
    ours = TemporalConv(5, 4, kernel_size=(3,), padding="SAME", rngs=nnx.Rngs(0))
    ours.bias.value = jnp.arange(4.0)
    chex.assert_trees_all_close(ours(x), conv(x), atol=1e-5)  # same init, same params
    with pytest.raises(ValueError, match="padding='SAME'"):
        TemporalConv(5, 4, kernel_size=(3,), padding="VALID", rngs=nnx.Rngs(0))
    kernel = jax.random.normal(jax.random.key(2), (3, 5, 4))
    grad = lambda f: jax.grad(lambda k: jnp.sum(jnp.sin(f(k))))(kernel)
    reference = lambda k: jax.lax.conv_general_dilated(
        x, k, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
    chex.assert_trees_all_close(grad(lambda k: temporal_conv(x, k, None)), grad(reference),
                                atol=1e-4)
