"""The information-gain controller against hand-written leave-one-out and exact policy maths."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modalimmune_jax import controller

MODS = ("a", "b", "c")


def _loss(params, batch):
    # A linear model per modality, masked by presence; squared error per example.
    pred = sum(batch["mask"][:, i] * (batch[m] @ params[m]) for i, m in enumerate(MODS))
    return jnp.square(pred - batch["label"])


def _batch(seed=0, n=64):
    rng = np.random.default_rng(seed)
    xa, xb, xc = (rng.normal(size=(n, 2)).astype(np.float32) for _ in range(3))
    y = xa @ np.array([1.0, -1.0], np.float32)  # only `a` carries the label
    return {"a": jnp.asarray(xa), "b": jnp.asarray(xb), "c": jnp.asarray(xc),
            "mask": jnp.ones((n, 3)), "label": jnp.asarray(y)}


def test_information_gain_signs_and_hand_loop():
    batch = _batch()
    # `a` is needed, `b` is ignored (zero weight), `c` only adds noise (removing it helps).
    params = {"a": jnp.array([1.0, -1.0]), "b": jnp.zeros(2), "c": jnp.array([0.5, 0.5])}
    ig = controller.information_gain(_loss, params, batch, modalities=MODS)
    base = np.mean(_loss(params, batch))
    expected = []
    for i, m in enumerate(MODS):
        b = dict(batch, **{m: jnp.zeros_like(batch[m])})
        b["mask"] = batch["mask"].at[:, i].set(0.0)
        expected.append(np.mean(_loss(params, b)) - base)
    np.testing.assert_allclose(ig, expected, rtol=1e-5, atol=1e-6)
    assert ig[0] > 0.5 and abs(float(ig[1])) < 1e-6 and ig[2] < 0


def test_information_gain_has_no_gradient():
    batch = _batch()
    params = {"a": jnp.array([1.0, -1.0]), "b": jnp.ones(2), "c": jnp.ones(2)}
    g = jax.grad(lambda p: jnp.sum(controller.information_gain(_loss, p, batch,
                                                               modalities=MODS)))(params)
    chex.assert_trees_all_close(g, jax.tree.map(jnp.zeros_like, params))


def test_ema_by_hand():
    s = controller.init_controller(3)
    s = controller.update_controller(s, jnp.array([1.0, 2.0, 3.0]), beta=0.5)
    np.testing.assert_allclose(s.gain_ema, [1.0, 2.0, 3.0])  # first refresh: G = IG
    s = controller.update_controller(s, jnp.array([3.0, 0.0, -1.0]), beta=0.5)
    np.testing.assert_allclose(s.gain_ema, [2.0, 1.0, 1.0])
    assert int(s.count) == 2


@pytest.mark.parametrize("p_clean,tau", [(0.2, 1.0), (0.5, 0.5)])
def test_select_target_frequencies(p_clean, tau):
    state = controller.ControllerState(jnp.array([1.0, 0.0, -1.0]), jnp.int32(1))
    keys = jax.random.split(jax.random.key(0), 20000)
    picks = jax.vmap(lambda k: controller.select_target(state, k, p_clean=p_clean, tau=tau))(keys)
    assert set(np.unique(np.asarray(picks.sum(1)))) <= {0.0, 1.0}
    freq_clean = float(np.mean(np.asarray(picks.sum(1)) == 0))
    expected = (1 - p_clean) * np.exp(np.array([1.0, 0.0, -1.0]) / tau)
    expected /= np.exp(np.array([1.0, 0.0, -1.0]) / tau).sum()
    assert abs(freq_clean - p_clean) < 0.015
    np.testing.assert_allclose(np.asarray(picks.mean(0)), expected, atol=0.015)
    np.testing.assert_allclose(controller.target_probabilities(state, p_clean=p_clean, tau=tau),
                               expected, rtol=1e-5)


def test_small_tau_picks_the_argmax():
    state = controller.ControllerState(jnp.array([0.1, 0.3, 0.2]), jnp.int32(1))
    keys = jax.random.split(jax.random.key(1), 200)
    picks = jax.vmap(lambda k: controller.select_target(state, k, p_clean=0.0, tau=1e-4))(keys)
    np.testing.assert_array_equal(np.asarray(picks), np.tile([0.0, 1.0, 0.0], (200, 1)))
