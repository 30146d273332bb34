"""Tests for the curvature modules (hvp, lanczos, curvature, curvature_mask) against dense
references: explicit Hessians, numpy sorts and quantiles."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from modalimmune_jax.curvature import (
    CurvatureEMA,
    hutchinson_diagonal,
    init_curvature_ema,
    update_curvature_ema,
)
from modalimmune_jax.curvature_mask import (
    CurvatureMaskState,
    curvature_mask,
    split_gradients,
    split_gradients_joint,
)
from modalimmune_jax.hvp import hvp
from modalimmune_jax.lanczos import extreme_eigenvalues, extreme_eigenvalues_from_hvp


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


# Problems and their dense Hessians are cached: the same function objects hit the jit caches, so
# the tests share compiles. Only the x64 tests use them.
@functools.cache
def _mlp_problem(seed=0, d_in=3, d_hidden=4, batch=6):
    """A tiny tanh MLP regression loss over dict params, float64."""
    rng = np.random.default_rng(seed)
    params = {
        "W1": jnp.asarray(rng.normal(size=(d_in, d_hidden))),
        "b1": jnp.asarray(rng.normal(size=(d_hidden,)) * 0.1),
        "W2": jnp.asarray(rng.normal(size=(d_hidden, 1))),
        "b2": jnp.asarray(rng.normal(size=(1,)) * 0.1),
    }
    x = jnp.asarray(rng.normal(size=(batch, d_in)))
    y = jnp.asarray(rng.normal(size=(batch, 1)))

    def loss(p):
        h = jnp.tanh(x @ p["W1"] + p["b1"])
        return 0.5 * jnp.mean((h @ p["W2"] + p["b2"] - y) ** 2)

    return loss, params


@functools.cache
def _dense_hessian(problem):
    f, params = problem()
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.jit(jax.hessian(lambda z: f(unravel(z))))(flat)), flat, unravel


def _random_spectrum_matrix(eigs, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigs), len(eigs))))
    return q @ np.diag(eigs) @ q.T


def test_hvp_matches_dense_hessian(x64):
    loss, params = _mlp_problem()
    hess, flat, unravel = _dense_hessian(_mlp_problem)
    v = unravel(jnp.asarray(np.random.default_rng(1).normal(size=flat.shape)))
    out = jax.jit(lambda p, v: hvp(loss, p, v))(params, v)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, params)
    expected = hess @ ravel_pytree(v)[0]
    np.testing.assert_allclose(ravel_pytree(out)[0], expected, rtol=1e-10, atol=1e-12)


def test_hutchinson_exact_for_diagonal_hessian(x64):
    # Separable f: H is diagonal, so v ⊙ Hv = diag(H) for every Rademacher probe.
    c = {"a": jnp.arange(1.0, 7.0).reshape(2, 3), "b": jnp.asarray([-2.0, 0.5])}
    x0 = {"a": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.asarray([0.3, -0.7])}
    f = lambda p: sum(jax.tree.leaves(jax.tree.map(lambda ci, pi: jnp.sum(ci * jnp.sin(pi)), c, p)))
    est = jax.jit(lambda p: hutchinson_diagonal(f, p, jax.random.PRNGKey(3), 2))(x0)
    expected = jax.tree.map(lambda ci, pi: -ci * np.sin(pi), c, x0)
    chex.assert_trees_all_close(est, expected, rtol=1e-12, atol=1e-12)


def test_hutchinson_error_falls_with_probes(x64):
    loss, params = _mlp_problem()
    hess, _, _ = _dense_hessian(_mlp_problem)
    exact = np.diag(hess)

    estimate = jax.jit(hutchinson_diagonal, static_argnums=(0, 3))

    def mean_error(n):
        errs = []
        for seed in range(4):
            est = estimate(loss, params, jax.random.PRNGKey(seed), n)
            chex.assert_trees_all_equal_shapes_and_dtypes(est, params)
            errs.append(np.linalg.norm(ravel_pytree(est)[0] - exact))
        return np.mean(errs)

    # Standard error scales as 1/sqrt(n): 64x more probes -> ~8x smaller error.
    err_few, err_many = mean_error(4), mean_error(256)
    assert err_many < 0.3 * err_few, (err_few, err_many)


@functools.cache
def _indefinite_problem():
    # Hessian = A + diag(c * tanh''(x)): indefinite, with well separated extremes.
    eigs = np.concatenate([[-3.0], np.linspace(-1.0, 2.0, 15), [5.0]])
    a = jnp.asarray(_random_spectrum_matrix(eigs, seed=4))
    c = jnp.asarray(np.random.default_rng(5).normal(size=17) * 0.2)
    params = {"u": jnp.asarray(np.linspace(-1, 1, 12).reshape(4, 3)), "w": jnp.full((5,), 0.4)}

    def f(p):
        z = ravel_pytree(p)[0]
        return 0.5 * z @ a @ z + jnp.sum(c * jnp.tanh(z))

    return f, params


@pytest.mark.parametrize("iters, rtol", [(17, 1e-9), (12, 1e-2)])
def test_extreme_eigenvalues_indefinite(x64, iters, rtol):
    f, params = _indefinite_problem()
    hess, _, _ = _dense_hessian(_indefinite_problem)
    eig = np.linalg.eigvalsh(hess)
    lam_max, lam_min = jax.jit(extreme_eigenvalues, static_argnums=(0, 3))(
        f, params, jax.random.PRNGKey(0), iters
    )
    assert lam_min < 0
    np.testing.assert_allclose([lam_max, lam_min], [eig[-1], eig[0]], rtol=rtol)


def test_extreme_eigenvalues_from_hvp_breakdown(x64):
    # Krylov space of dimension 2 (two distinct eigenvalues): Lanczos must restart, not NaN.
    a = jnp.asarray(_random_spectrum_matrix(np.array([2.0] * 4 + [-1.0] * 4), seed=6))
    lam_max, lam_min = extreme_eigenvalues_from_hvp(
        lambda v: {"x": a @ v["x"]}, {"x": jnp.zeros(8)}, key=jax.random.PRNGKey(1), num_iters=20
    )
    np.testing.assert_allclose([lam_max, lam_min], [2.0, -1.0], rtol=1e-10)


def test_split_gradients_equals_two_grads(x64):
    loss, params = _mlp_problem()
    destructive = lambda p: jnp.sum(jnp.sin(p["W1"]) ** 2) + 0.3 * jnp.sum(p["b2"] ** 3)
    total = lambda p: loss(p) + destructive(p)
    t, d, g_t, g_d = jax.jit(lambda p: split_gradients(total, destructive, p))(params)
    (ref_t, ref_g_t), (ref_d, ref_g_d) = jax.jit(
        lambda p: (jax.value_and_grad(total)(p), jax.value_and_grad(destructive)(p))
    )(params)
    np.testing.assert_allclose([t, d], [ref_t, ref_d], rtol=1e-12)
    chex.assert_trees_all_close(g_t, ref_g_t, rtol=1e-12, atol=1e-14)
    chex.assert_trees_all_close(g_d, ref_g_d, rtol=1e-12, atol=1e-14)

    joint = lambda p: ((total(p), destructive(p)), {"aux": loss(p)})
    *_, g_d2, aux = jax.jit(lambda p: split_gradients_joint(joint, p, has_aux=True))(params)
    chex.assert_trees_all_close(g_d2, ref_g_d, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(aux["aux"], ref_t - ref_d, rtol=1e-12)


def test_curvature_ema():
    ema = init_curvature_ema({"a": jnp.ones((2, 2)), "b": jnp.ones(3)})
    chex.assert_trees_all_equal(ema.diag, {"a": jnp.zeros((2, 2)), "b": jnp.zeros(3)})
    d1 = {"a": jnp.full((2, 2), 4.0), "b": jnp.asarray([1.0, -2.0, 3.0])}
    d2 = {"a": jnp.full((2, 2), 2.0), "b": jnp.asarray([3.0, 2.0, -1.0])}
    update = jax.jit(update_curvature_ema, static_argnames="decay")
    ema = update(ema, d1, decay=0.75)
    chex.assert_trees_all_close(ema.diag, d1)  # first update: no zero-init bias
    ema = update(ema, d2, decay=0.75)
    # 0.75 * d1 + 0.25 * d2, by hand.
    expected = {"a": jnp.full((2, 2), 3.5), "b": jnp.asarray([1.5, -1.0, 2.0])}
    chex.assert_trees_all_close(ema.diag, expected)
    assert int(ema.count) == 2


def _mask_inputs(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"w": (6, 5), "b": (7,)}
    make = lambda: {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    return make(), make(), make()  # updates, destructive, curvature


@pytest.mark.parametrize("per_leaf", [False, True])
def test_curvature_mask_hard(per_leaf):
    u, d, h = _mask_inputs()
    tx = curvature_mask(quantile=0.75, mode="hard", per_leaf=per_leaf)
    state = tx.init(u)
    out, state = jax.jit(tx.update)(u, state, None, curvature=h, destructive=d)

    abs_h = {k: np.abs(np.asarray(x)) for k, x in h.items()}
    if per_leaf:
        thr = {k: np.quantile(x, 0.75) for k, x in abs_h.items()}
    else:
        glob = np.quantile(np.concatenate([x.ravel() for x in abs_h.values()]), 0.75)
        thr = {k: glob for k in abs_h}
    damped = {k: abs_h[k] > thr[k] for k in abs_h}
    expected = {k: np.asarray(u[k]) - np.where(damped[k], np.asarray(d[k]), 0.0) for k in u}
    chex.assert_trees_all_close(out, expected, rtol=1e-6, atol=1e-6)
    # Undamped entries are untouched, bit for bit.
    for k in u:
        np.testing.assert_array_equal(np.asarray(out[k])[~damped[k]], np.asarray(u[k])[~damped[k]])
    assert isinstance(state, CurvatureMaskState) and int(state.count) == 1
    frac = sum(x.sum() for x in damped.values()) / 37
    np.testing.assert_allclose(state.fraction_masked, frac, rtol=1e-6)
    if not per_leaf:
        # 37 entries: the 0.75 quantile is the 28th smallest, so exactly 9 lie strictly above it.
        assert sum(x.sum() for x in damped.values()) == 9


@pytest.mark.parametrize("quantile", [0.5, None])
def test_curvature_mask_soft(quantile):
    u, d, h = _mask_inputs(seed=1)
    beta = 2.0
    tx = curvature_mask(quantile=quantile, mode="soft", beta=beta)
    out, state = jax.jit(tx.update)(u, tx.init(u), curvature=h, destructive=d)
    flat = np.concatenate([np.abs(np.asarray(x)).ravel() for x in h.values()])
    median = np.median(flat)
    thr = -np.inf if quantile is None else np.quantile(flat, quantile)
    expected = {}
    for k in u:
        ah = np.abs(np.asarray(h[k], np.float64))
        scale = np.where(ah > thr, 1.0 / (1.0 + beta * ah / median), 1.0)
        expected[k] = np.asarray(u[k]) - np.asarray(d[k]) + scale * np.asarray(d[k])
    chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.fraction_masked, np.mean(flat > thr), rtol=1e-6)


def test_curvature_mask_zero_destructive_equals_plain_adamw():
    u0, _, h = _mask_inputs(seed=2)
    params = jax.tree.map(jnp.ones_like, u0)
    zeros = jax.tree.map(jnp.zeros_like, u0)
    chained = optax.chain(curvature_mask(quantile=0.5), optax.adamw(1e-2))
    plain = optax.adamw(1e-2)
    p_c, p_p = params, params
    s_c, s_p = chained.init(params), plain.init(params)
    # Eager on purpose: two separately jitted graphs may fuse differently and differ in the last
    # bit, while the claim here is exact equality.
    update_c, update_p = chained.update, plain.update
    for step in range(4):
        grads = jax.tree.map(lambda x: jnp.sin(x * (step + 1)), u0)
        up_c, s_c = update_c(grads, s_c, p_c, curvature=h, destructive=zeros)
        up_p, s_p = update_p(grads, s_p, p_p)
        p_c, p_p = optax.apply_updates(p_c, up_c), optax.apply_updates(p_p, up_p)
        chex.assert_trees_all_equal(p_c, p_p)
    assert int(s_c[0].count) == 4


def test_curvature_mask_under_jit_in_chain():
    u, d, h = _mask_inputs(seed=3)
    chained = optax.chain(curvature_mask(quantile=0.9, mode="soft"), optax.sgd(1.0))
    step = jax.jit(lambda g, s: chained.update(g, s, None, curvature=h, destructive=d))
    out, _ = step(u, chained.init(u))
    tx = curvature_mask(quantile=0.9, mode="soft")
    direct, _ = jax.jit(tx.update)(u, tx.init(u), curvature=h, destructive=d)
    chex.assert_trees_all_close(out, jax.tree.map(lambda x: -x, direct), rtol=1e-6)


def test_curvature_mask_missing_extras_raise():
    u, d, h = _mask_inputs()
    tx = curvature_mask()
    state = tx.init(u)
    with pytest.raises(TypeError):
        tx.update(u, state, curvature=h)
    with pytest.raises(TypeError):
        tx.update(u, state, destructive=d)
    with pytest.raises(TypeError):
        tx.update(u, state, curvature=None, destructive=d)
    chained = optax.chain(curvature_mask(), optax.adamw(1e-3))
    with pytest.raises(TypeError):
        chained.update(u, chained.init(u), u)
    with pytest.raises(ValueError):
        curvature_mask(mode="medium")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 37, 1000, 1001])
def test_quantile_without_sort_equals_jnp_quantile_and_median(dtype, n):
    # curvature_mask's bisection on bit patterns against jnp's sort-based quantile and median: the
    # order statistics are exact, the interpolation may round differently (a fused multiply-add),
    # so 2 ulp; ties, zeros and an inf included.
    from modalimmune_jax.curvature_mask import _quantile
    with jax.enable_x64(dtype == np.float64):
        rng = np.random.default_rng(n)
        x = np.abs(rng.standard_cauchy(n)).astype(dtype)
        x[: n // 4] = 0.0
        x[n // 4: n // 3] = x[n - 1]  # ties
        if n > 10:
            x[5] = np.inf
        x, eps = jnp.asarray(x), np.finfo(dtype).eps
        for q in (0.0, 0.25, 0.5, 0.75, 0.9, 0.999, 1.0):
            ours = jax.jit(lambda v, q=q: _quantile(v, q))(x)
            assert ours.dtype == x.dtype
            np.testing.assert_allclose(ours, jnp.quantile(x, q), rtol=2 * eps, atol=0)
        np.testing.assert_allclose(jax.jit(lambda v: _quantile(v, 0.5, midpoint=True))(x),
                                   jnp.median(x), rtol=2 * eps, atol=0)
        assert np.isnan(_quantile(x.at[0].set(jnp.nan), 0.9))


def test_curvature_mask_recomputes_its_scale_only_when_the_ema_moves():
    # Given a CurvatureEMA the scale is a function of its count: same count, same scale (even if
    # the diagonal were different); a new count recomputes it. Equal to the plain-pytree call.
    u, d, h = _mask_inputs(seed=4)
    tx = curvature_mask(quantile=0.5, mode="soft", beta=2.0)
    update = jax.jit(tx.update)
    ema = update_curvature_ema(init_curvature_ema(h), h, decay=0.9)  # count 1
    out_ema, state = update(u, tx.init(u), curvature=ema, destructive=d)
    out_plain, plain_state = update(u, tx.init(u), curvature=h, destructive=d)
    chex.assert_trees_all_close(out_ema, out_plain, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(state.scale, plain_state.scale)
    assert int(state.curvature_count) == 1 and int(plain_state.curvature_count) == -1
    np.testing.assert_allclose(state.fraction_masked, plain_state.fraction_masked)
    other = jax.tree.map(lambda x: x[::-1] * 3.0, h)
    same_count = CurvatureEMA(other, ema.count)
    out_again, state_again = update(u, state, curvature=same_count, destructive=d)
    chex.assert_trees_all_equal(out_again, out_ema)
    chex.assert_trees_all_equal(state_again.scale, state.scale)
    assert int(state_again.count) == 2
    moved = update_curvature_ema(ema, other, decay=0.0)  # count 2, diag = other
    out_moved, state_moved = update(u, state_again, curvature=moved, destructive=d)
    expected, _ = update(u, tx.init(u), curvature=other, destructive=d)
    chex.assert_trees_all_close(out_moved, expected, rtol=1e-6, atol=1e-7)
    assert int(state_moved.curvature_count) == 2


def test_curvature_mask_inside_apply_if_finite_is_the_trainers_chain():
    # The trainer's chain: the mask first, then clipping and adam, all in apply_if_finite; the
    # extras pass through, and a missing one still fails loudly.
    u, d, h = _mask_inputs(seed=5)
    ema = update_curvature_ema(init_curvature_ema(h), h, decay=0.9)
    tx = optax.apply_if_finite(optax.chain(curvature_mask(quantile=0.5), optax.clip_by_global_norm(
        1.0), optax.adam(1e-2)), max_consecutive_errors=5)
    ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    mask = curvature_mask(quantile=0.5)
    masked, _ = mask.update(u, mask.init(u), curvature=h, destructive=d)
    out, state = jax.jit(tx.update)(u, tx.init(u), u, curvature=ema, destructive=d)
    expected, _ = ref.update(masked, ref.init(u), u)
    chex.assert_trees_all_close(out, expected, rtol=1e-6, atol=1e-7)
    assert float(optax.tree.get(state, "fraction_masked")) > 0
    with pytest.raises(TypeError):
        tx.update(u, tx.init(u), u)
