"""The information-gain controller against hand-written leave-one-out and exact policy maths."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modalimmune_jax import controller, interventions

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
    # mask_prob = 1: every removal is flagged, so "without m" is zero-fill plus mask 0.
    ig = controller.information_gain(_loss, params, batch, modalities=MODS,
                                     key=jax.random.key(0), mask_prob=1.0)
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
    g = jax.grad(lambda p: jnp.sum(controller.information_gain(
        _loss, p, batch, modalities=MODS, key=jax.random.key(0), mask_prob=0.5)))(params)
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


def test_select_two_targets_is_plackett_luce():
    # k ~ Uniform{1, 2}; the pair drawn without replacement from softmax(G): P({i, j}) =
    # p_i p_j / (1 - p_i) + p_j p_i / (1 - p_j), computed by hand from the softmax.
    g = np.array([1.0, 0.0, -1.0])
    p = np.exp(g) / np.exp(g).sum()
    state = controller.ControllerState(jnp.asarray(g, jnp.float32), jnp.int32(1))
    keys = jax.random.split(jax.random.key(2), 40000)
    picks = np.asarray(jax.vmap(lambda k: controller.select_target(
        state, k, p_clean=0.0, tau=1.0, max_targets=2))(keys))
    sizes = picks.sum(1)
    assert set(np.unique(sizes)) == {1.0, 2.0}
    assert abs(np.mean(sizes == 2) - 0.5) < 0.01
    single = picks[sizes == 1]
    np.testing.assert_allclose(single.mean(0), p, atol=0.015)
    pairs = picks[sizes == 2]
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        expected = p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j])
        assert abs(np.mean(pairs[:, i] * pairs[:, j]) - expected) < 0.015
    with pytest.raises(ValueError, match="max_targets"):
        controller.select_target(state, keys[0], max_targets=4)


def test_one_target_is_the_categorical_draw():
    state = controller.ControllerState(jnp.array([0.3, -0.2, 0.5, 0.0]), jnp.int32(1))
    for key in jax.random.split(jax.random.key(3), 20):
        _, k_target, _ = jax.random.split(key, 3)
        onehot = controller.select_target(state, key, p_clean=0.0, tau=0.7)
        assert int(jnp.argmax(onehot)) == int(jax.random.categorical(k_target,
                                                                     state.gain_ema / 0.7))


def test_small_tau_picks_the_argmax():
    state = controller.ControllerState(jnp.array([0.1, 0.3, 0.2]), jnp.int32(1))
    keys = jax.random.split(jax.random.key(1), 200)
    picks = jax.vmap(lambda k: controller.select_target(state, k, p_clean=0.0, tau=1e-4))(keys)
    np.testing.assert_array_equal(np.asarray(picks), np.tile([0.0, 1.0, 0.0], (200, 1)))


def _seq_problem(seed=1, n=32, t=5):
    """`v` is a sequence modality [B, T, D] (mean-pooled); `u` a vector; `w` pure noise."""
    rng = np.random.default_rng(seed)
    batch = {
        "u": jnp.asarray(rng.normal(size=(n, 3)), jnp.float32),
        "v": jnp.asarray(rng.normal(size=(n, t, 2)), jnp.float32),
        "w": jnp.asarray(rng.normal(size=(n, 4)), jnp.float32),
        "mask": jnp.ones((n, 3), jnp.float32),
    }
    params = {"u": jnp.array([0.5, -1.0, 2.0]), "v": jnp.array([1.5, 1.0]), "w": jnp.zeros(4),
              "bias": jnp.array([0.3, 0.7, 0.0])}  # a presence bias: the model reads the mask
    batch["label"] = batch["u"] @ params["u"] + batch["v"].mean(1) @ params["v"] + 1.0
    return params, batch


def _seq_loss(params, batch):
    pred = (batch["u"] @ params["u"] + batch["v"].mean(1) @ params["v"] + batch["w"] @ params["w"]
            + batch["mask"] @ params["bias"])
    return jnp.square(pred - batch["label"])  # [B]


@pytest.mark.parametrize("mask_prob", [0.0, 1.0])
def test_information_gain_sequence_modality_mask_and_exact_zero(mask_prob):
    params, batch = _seq_problem()
    mods = ("u", "v", "w")
    ig = controller.information_gain(_seq_loss, params, batch, modalities=mods,
                                     key=jax.random.key(0), mask_prob=mask_prob)
    chex.assert_shape(ig, (3,))
    chex.assert_type(ig, jnp.float32)
    # Hand-written leave-one-out in numpy (float64): zero-fill m and, at mask_prob 1, zero its
    # mask column (at 0 the mask stays 1). The presence bias makes the two differ.
    np_batch = {k: np.asarray(v, np.float64) for k, v in batch.items()}
    np_params = {k: np.asarray(v, np.float64) for k, v in params.items()}

    def np_loss(b):
        pred = (b["u"] @ np_params["u"] + b["v"].mean(1) @ np_params["v"]
                + b["w"] @ np_params["w"] + b["mask"] @ np_params["bias"])
        return np.mean((pred - b["label"]) ** 2)

    expected = []
    for i, m in enumerate(mods):
        b = dict(np_batch, **{m: np.zeros_like(np_batch[m])})
        b["mask"] = np_batch["mask"].copy()
        b["mask"][:, i] = 1.0 - mask_prob
        expected.append(np_loss(b) - np_loss(np_batch))
    np.testing.assert_allclose(ig, expected, rtol=1e-4, atol=1e-5)
    assert ig[0] > 0 and ig[1] > 0
    # `w` has zero weight and zero presence bias: removing it changes nothing, exactly.
    assert float(ig[2]) == 0.0


def test_information_gain_scalar_loss_and_jit():
    params, batch = _seq_problem(seed=2)
    mods = ("u", "v", "w")
    kw = {"modalities": mods, "key": jax.random.key(4), "mask_prob": 0.5}
    per_example = controller.information_gain(_seq_loss, params, batch, **kw)
    scalar = controller.information_gain(lambda p, b: jnp.mean(_seq_loss(p, b)), params, batch,
                                         **kw)
    np.testing.assert_allclose(scalar, per_example, rtol=1e-6, atol=1e-6)
    jitted = jax.jit(lambda p, b: controller.information_gain(_seq_loss, p, b, **kw))
    np.testing.assert_allclose(jitted(params, batch), per_example, rtol=1e-5, atol=1e-6)


def test_information_gain_flags_each_example_once_for_every_modality():
    """In between 0 and 1, example b's removal is flagged by one draw shared by every modality.

    The reference mixes, per example, the hand-computed loss with m's mask column at 0 (flagged)
    and at 1 (not flagged); the flags are the shared rule's (`interventions.training_mask`) for
    the same key, one column per example.
    """
    params, batch = _seq_problem(seed=3, n=256)
    mods = ("u", "v", "w")
    key = jax.random.key(7)
    ig = controller.information_gain(_seq_loss, params, batch, modalities=mods, key=key,
                                     mask_prob=0.5)
    flags = 1.0 - np.asarray(interventions.training_mask(
        jnp.ones((256, 3)), jnp.zeros(3), key=key, mask_prob=0.5))[:, 0]  # [B] in {0, 1}
    assert 0.3 < flags.mean() < 0.7
    np_batch = {k: np.asarray(v, np.float64) for k, v in batch.items()}
    np_params = {k: np.asarray(v, np.float64) for k, v in params.items()}

    def np_loss(b):  # [B]
        pred = (b["u"] @ np_params["u"] + b["v"].mean(1) @ np_params["v"]
                + b["w"] @ np_params["w"] + b["mask"] @ np_params["bias"])
        return (pred - b["label"]) ** 2

    expected = []
    for i, m in enumerate(mods):
        b = dict(np_batch, **{m: np.zeros_like(np_batch[m])})
        told = dict(b, mask=np_batch["mask"].copy())
        told["mask"][:, i] = 0.0
        mixed = np.where(flags > 0, np_loss(told), np_loss(b))
        expected.append(np.mean(mixed) - np.mean(np_loss(np_batch)))
    np.testing.assert_allclose(ig, expected, rtol=1e-4, atol=1e-5)


def test_update_controller_jit_three_steps_by_hand():
    igs = np.array([[0.5, -0.2], [1.5, 0.2], [-1.0, 0.6]], np.float32)
    update = jax.jit(lambda s, ig: controller.update_controller(s, ig, beta=0.9))
    state = controller.init_controller(2)
    chex.assert_trees_all_equal(state.gain_ema, jnp.zeros(2, jnp.float32))
    chex.assert_type(state.count, jnp.int32)
    for ig in igs:
        state = update(state, ig)
    g = igs[0]
    for ig in igs[1:]:
        g = 0.9 * g + 0.1 * ig
    np.testing.assert_allclose(state.gain_ema, g, rtol=1e-6)
    assert int(state.count) == 3 and state.count.dtype == jnp.int32


def test_select_target_extremes_determinism_and_single_trace():
    state = controller.ControllerState(jnp.array([0.2, -0.5, 0.9, 0.0]), jnp.int32(4))
    keys = jax.random.split(jax.random.key(3), 500)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def pick_all(p_clean, tau):
        select = lambda k: controller.select_target(state, k, p_clean=p_clean, tau=tau)
        return jax.vmap(select)(keys)

    clean = np.asarray(pick_all(1.0, 1.0))
    np.testing.assert_array_equal(clean, np.zeros((500, 4)))  # p_clean = 1: every step clean
    never = np.asarray(pick_all(0.0, 1.0))
    np.testing.assert_array_equal(never.sum(1), np.ones(500))  # p_clean = 0: exactly one target
    assert set(np.unique(never)) == {0.0, 1.0}
    np.testing.assert_array_equal(never, np.asarray(pick_all(0.0, 1.0)))  # same keys, same picks
    # The untargeted probability mass sums to p_clean.
    probs = controller.target_probabilities(state, p_clean=0.3, tau=2.0)
    np.testing.assert_allclose(float(jnp.sum(probs)), 0.7, rtol=1e-6)


# ------------------------------------------------------------------------- removal patterns


@pytest.mark.parametrize("num_m,expected", [
    (2, [[1, 0], [0, 1]]),
    (3, [[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]]),
])
def test_removal_patterns_by_hand(num_m, expected):
    np.testing.assert_array_equal(controller.removal_patterns(num_m), expected)


def test_removal_patterns_are_every_proper_nonempty_subset_for_four():
    keeps = controller.removal_patterns(4)
    assert keeps.shape == (14, 4)  # 2^4 - 2
    kept = {tuple(int(x) for x in row) for row in keeps}
    everything = {tuple((i >> j) & 1 for j in range(4)) for i in range(16)}
    assert kept == everything - {(0, 0, 0, 0), (1, 1, 1, 1)}
    sizes = keeps.sum(axis=1)
    assert list(sizes) == sorted(sizes, reverse=True)  # most kept first, as the test conditions
    assert controller.removal_patterns(1).shape == (0, 1)


def test_pattern_gain_is_exactly_zero_for_the_ignored_modality():
    """`b` has zero weight: removing only `b` changes no prediction, so its gain is exactly 0;
    every pattern's gain is the hand-computed loss difference."""
    batch = _batch()
    params = {"a": jnp.array([1.0, -1.0]), "b": jnp.zeros(2), "c": jnp.array([0.5, 0.5])}
    keeps = controller.removal_patterns(3)
    for mask_prob in (0.0, 1.0):
        gains = controller.pattern_information_gain(
            _loss, params, batch, keeps=keeps, modalities=MODS, key=jax.random.key(0),
            mask_prob=mask_prob)
        chex.assert_shape(gains, (6,))
        base = np.mean(_loss(params, batch))
        for s, keep in enumerate(keeps):
            b = dict(batch)
            for i, m in enumerate(MODS):
                if not keep[i]:
                    b[m] = jnp.zeros_like(batch[m])
                    b["mask"] = b["mask"].at[:, i].set(1.0 - mask_prob)
            np.testing.assert_allclose(gains[s], np.mean(_loss(params, b)) - base, rtol=1e-5,
                                       atol=1e-6)
        only_b = [s for s, keep in enumerate(keeps) if tuple(keep) == (1, 0, 1)]
        assert float(gains[only_b[0]]) == 0.0
    # The per-modality gain is the leave-one-out special case.
    per_modality = controller.information_gain(_loss, params, batch, modalities=MODS,
                                               key=jax.random.key(0), mask_prob=1.0)
    leave_one_out = controller.pattern_information_gain(
        _loss, params, batch, keeps=1.0 - np.eye(3), modalities=MODS, key=jax.random.key(0),
        mask_prob=1.0)
    np.testing.assert_array_equal(per_modality, leave_one_out)


def test_select_patterns_frequencies():
    keeps = controller.removal_patterns(3)
    state = controller.ControllerState(gain_ema=jnp.array([0.0, 0.5, 1.0, 1.5, 0.2, -0.3]),
                                       count=jnp.int32(1))
    n, tau, uniform, p_clean = 60000, 0.5, 0.2, 0.25
    target = controller.select_patterns(state, jax.random.key(3), keeps=keeps, batch_size=n,
                                        p_clean=p_clean, tau=tau, uniform=uniform)
    chex.assert_shape(target, (n, 3))
    target = np.asarray(target)
    clean = target.sum(axis=1) == 0
    assert abs(clean.mean() - p_clean) < 4 * np.sqrt(p_clean * (1 - p_clean) / n)
    g = np.asarray(state.gain_ema) / tau
    probs = (1 - uniform) * np.exp(g - g.max()) / np.exp(g - g.max()).sum() + uniform / 6
    drawn = target[~clean]
    for s, keep in enumerate(keeps):
        freq = np.mean(np.all(drawn == 1.0 - keep, axis=1))
        se = np.sqrt(probs[s] * (1 - probs[s]) / len(drawn))
        assert abs(freq - probs[s]) < 4.5 * se, (s, freq, probs[s])
