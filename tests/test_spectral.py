"""Tests for modalimmune_jax.spectral: numpy SVD references, closed forms, finite differences."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from modalimmune_jax.spectral import (
    collapse_regularizer,
    effective_rank,
    singular_value_spectrum,
    spectral_collapse,
    stable_rank,
)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _numpy_collapse(Z, strength, gamma):
    """The DESIGN §3.2 formula, written literally in numpy (float64)."""
    Z = np.asarray(Z, np.float64)
    mu = Z.mean(0, keepdims=True)
    U, s, Vt = np.linalg.svd(Z - mu, full_matrices=False)
    e = s**2 / np.sum(s**2)
    w = (e / e.max()) ** gamma
    return mu + U @ np.diag(s * (1 - strength * w)) @ Vt


def _centred_basis(rng, B, k):
    """[B, k] orthonormal columns, all orthogonal to the ones vector (so centring is a no-op)."""
    A = np.concatenate([np.ones((B, 1)), rng.normal(size=(B, k))], axis=1)
    return np.linalg.qr(A)[0][:, 1:]


def _with_spectrum(rng, B, d, s):
    """A centred [B, d] matrix whose singular values are exactly `s` (len(s) <= min(B - 1, d))."""
    Q = _centred_basis(rng, B, len(s))
    W = np.linalg.qr(rng.normal(size=(d, d)))[0][:, : len(s)]
    return Q @ np.diag(s) @ W.T


# ---------------------------------------------------------------------------------------------
# spectral_collapse: values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 5), (4, 6)])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_strength_zero_is_exact_identity(shape, gamma):
    Z = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    chex.assert_trees_all_equal(spectral_collapse(Z, 0.0, gamma), Z)


@pytest.mark.parametrize("shape", [(8, 5), (4, 6)])
def test_full_strength_gamma_zero_sends_every_row_to_batch_mean(shape):
    Z = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    out = spectral_collapse(jnp.asarray(Z), 1.0, 0.0)
    expected = np.broadcast_to(Z.astype(np.float64).mean(0), shape)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-6)


@pytest.mark.parametrize("shape", [(9, 4), (5, 7)])
@pytest.mark.parametrize("strength,gamma", [(0.3, 0.0), (0.9, 0.5), (0.5, 1.0), (1.0, 2.0)])
def test_matches_numpy_formula(x64, shape, strength, gamma):
    Z = np.random.default_rng(2).normal(size=shape)
    out = spectral_collapse(jnp.asarray(Z), strength, gamma)
    np.testing.assert_allclose(np.asarray(out), _numpy_collapse(Z, strength, gamma), atol=1e-12)


def test_gamma_shrinks_top_singular_value_more_than_bottom(x64):
    rng = np.random.default_rng(3)
    s = np.array([4.0, 2.0, 1.0, 0.5])
    Z = _with_spectrum(rng, 10, 6, s) + rng.normal(size=(1, 6))  # any mean
    for gamma in [0.0, 1.0, 2.0]:
        out = np.asarray(spectral_collapse(jnp.asarray(Z), 0.5, gamma))
        s_out = np.linalg.svd(out - out.mean(0), compute_uv=False)[: len(s)]
        ratio = s_out / s
        # closed form: s_i' / s_i = 1 - strength (s_i / s_max)^(2 gamma)
        np.testing.assert_allclose(ratio, 1 - 0.5 * (s / s.max()) ** (2 * gamma), atol=1e-12)
        if gamma == 0.0:
            np.testing.assert_allclose(ratio, 0.5, atol=1e-12)
        else:
            assert ratio[0] < ratio[-1]
            assert np.all(np.diff(ratio) > 0)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_energy_along_every_direction_falls_monotonically_with_strength(x64, gamma):
    rng = np.random.default_rng(4)
    Z = rng.normal(size=(12, 5)) * np.array([3.0, 2.0, 1.5, 1.0, 0.3])
    _, _, Vt = np.linalg.svd(Z - Z.mean(0), full_matrices=False)
    collapse = jax.jit(spectral_collapse)
    energies = []
    for a in np.linspace(0.0, 1.0, 11):
        out = np.asarray(collapse(jnp.asarray(Z), a, gamma))
        energies.append(np.linalg.norm((out - out.mean(0)) @ Vt.T, axis=0))  # [k] per direction
    energies = np.stack(energies)  # [strengths, k]
    assert np.all(np.diff(energies, axis=0) <= 1e-12)
    assert np.all(np.diff(energies.sum(1)) < 0)


def test_effective_rank_versus_strength(x64):
    """Effective rank is scale invariant, so it does NOT simply fall with strength.

    gamma = 0 shrinks every direction alike: the effective rank is constant for strength < 1. With
    gamma > 0 and strength < 1 / (2 gamma + 1) the ordering of singular values is kept and every
    ratio s_j / s_i (s_j < s_i) grows, so the normalized spectrum flattens (majorization) and the
    effective rank can only rise.
    """
    rng = np.random.default_rng(5)
    Z = jnp.asarray(_with_spectrum(rng, 16, 8, np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.2])))
    rank_after = jax.jit(lambda a, g: effective_rank(spectral_collapse(Z, a, g)))
    base = float(effective_rank(Z))
    for a in np.linspace(0.0, 0.95, 6):
        np.testing.assert_allclose(float(rank_after(a, 0.0)), base, 1e-9)
    for gamma in [1.0, 2.0]:
        grid = np.linspace(0.0, 0.99 / (2 * gamma + 1), 6)
        ranks = [float(rank_after(a, gamma)) for a in grid]
        assert np.all(np.diff(ranks) > 0), ranks


# ---------------------------------------------------------------------------------------------
# spectral_collapse: derivatives
# ---------------------------------------------------------------------------------------------


# The wide case (B <= d: a zero singular value after centring) is the common one and runs always;
# the tall variants are marked slow.
WIDE_AND_TALL = [(4, 7), pytest.param((7, 4), marks=pytest.mark.slow)]


@pytest.mark.parametrize(
    "shape,gamma", [((4, 7), 0.5), pytest.param((7, 4), 2.0, marks=pytest.mark.slow)]
)
def test_check_grads_all_arguments(x64, shape, gamma):
    Z = jnp.asarray(np.random.default_rng(6).normal(size=shape))
    check_grads(spectral_collapse, (Z, 0.7, gamma), order=1, modes=("fwd", "rev"))


def test_check_grads_at_repeated_singular_values(x64):
    # jnp.linalg.svd's JVP divides by s_i^2 - s_j^2 here; the collapse's own JVP does not.
    Z = jnp.asarray(_with_spectrum(np.random.default_rng(8), 6, 4, np.array([3.0, 2.0, 2.0, 1.0])))
    for gamma in [0.0, 1.5]:
        check_grads(lambda z, g=gamma: spectral_collapse(z, 0.6, g), (Z,), order=1, modes=("rev",))


def _hvp_and_finite_difference(loss, primals, tangents, eps=1e-5):
    """Forward-over-reverse HVP (as in curvature.py) and central differences of the gradient."""
    grad = jax.jit(jax.grad(loss))
    hvp = jax.jit(lambda p, t: jax.jvp(jax.grad(loss), (p,), (t,))[1])
    shift = lambda sign: jax.tree.map(lambda p, t: p + sign * eps * t, primals, tangents)
    fd = jax.tree.map(lambda a, b: (a - b) / (2 * eps), grad(shift(1.0)), grad(shift(-1.0)))
    return hvp(primals, tangents), fd


@pytest.mark.parametrize("shape", WIDE_AND_TALL)
def test_second_derivatives_match_finite_differences(x64, shape):
    # HVPs of the training loss (DESIGN §3.3) and the mixed theta/phi derivative of the
    # hypergradient (§3.4) differentiate the collapse twice, in Z and in strength.
    rng = np.random.default_rng(7)
    Z, V, W = (jnp.asarray(rng.normal(size=shape)) for _ in range(3))

    def loss(p):
        z, a = p
        return jnp.sum(W * jnp.sin(spectral_collapse(z, a, 1.5)))

    hvp, fd = _hvp_and_finite_difference(loss, (Z, jnp.asarray(0.6)), (V, jnp.asarray(0.7)))
    chex.assert_trees_all_close(hvp, fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gamma", [0.0, np.float64(0.0), jnp.asarray(0.0)],
                         ids=["static", "numpy", "array_svd_path"])
def test_gamma_zero_jacobian_is_exact_linear_map_even_when_degenerate(x64, gamma):
    # gamma = 0: C(Z) = Z - strength (Z - mu) is linear, so the Jacobian is known in closed form,
    # including at Z - mu = 0 (all rows equal), where every singular value is zero. A static zero
    # takes the closed form; a JAX array goes through the SVD and its guarded JVP.
    B, d, a = 5, 3, 0.4
    P = (1 - a) * np.eye(B) + a * np.ones((B, B)) / B  # acts on rows
    expected = np.einsum("ij,kl->ikjl", P, np.eye(d))  # [B, d, B, d]
    rng = np.random.default_rng(9)
    for jac in [jax.jacfwd, jax.jacrev]:
        jac_fn = jax.jit(jac(lambda z: spectral_collapse(z, a, gamma)))
        for Z in [rng.normal(size=(B, d)), np.ones((B, 1)) * rng.normal(size=(1, d))]:
            np.testing.assert_allclose(np.asarray(jac_fn(jnp.asarray(Z))), expected, atol=1e-12)


@pytest.mark.parametrize("shape", [(64, 64), (16, 40), (40, 16)])
def test_static_gamma_zero_closed_form_matches_the_svd_path(shape):
    # Issue 15: gamma = 0 skips the SVD. Values (float32, 1e-5), and in float64 gradients in Z
    # and strength and an HVP (the meta-update's second derivatives), agree with the SVD path
    # (gamma as an array). In float32 the SVD path's own round-off on a 63 x 64 centred batch
    # is ~1e-5 absolute in the gradient, so the derivatives are compared in float64.
    rng = np.random.default_rng(19)
    Z, W, V = (rng.normal(size=shape) for _ in range(3))
    closed = jax.jit(lambda z, s: spectral_collapse(z, s, 0.0))
    svd = jax.jit(lambda z, s, g: spectral_collapse(z, s, g))
    z32, a32 = jnp.asarray(Z, jnp.float32), jnp.float32(0.7)
    np.testing.assert_allclose(closed(z32, a32), svd(z32, a32, jnp.float32(0.0)), atol=1e-5)
    with jax.enable_x64(True):
        Z, W, V, a = jnp.asarray(Z), jnp.asarray(W), jnp.asarray(V), jnp.float64(0.7)

        def loss(z, s, gamma):
            return jnp.sum(W * jnp.sin(spectral_collapse(z, s, gamma)))

        zero = jnp.float64(0.0)
        np.testing.assert_allclose(closed(Z, a), svd(Z, a, zero), atol=1e-12)
        g_closed = jax.jit(jax.grad(lambda z, s: loss(z, s, 0.0), argnums=(0, 1)))(Z, a)
        g_svd = jax.jit(jax.grad(loss, argnums=(0, 1)))(Z, a, zero)
        chex.assert_trees_all_close(g_closed, g_svd, atol=1e-10, rtol=1e-10)
        hvp = lambda f: jax.jit(lambda z, s: jax.jvp(jax.grad(f, argnums=(0, 1)), (z, s),
                                                     (V, jnp.float64(0.3)))[1])
        h_closed = hvp(lambda z, s: loss(z, s, 0.0))(Z, a)
        h_svd = hvp(lambda z, s: loss(z, s, zero))(Z, a)
        chex.assert_trees_all_close(h_closed, h_svd, atol=1e-10, rtol=1e-10)
        # The closed form has no SVD anywhere in its program.
        assert "svd" not in str(jax.make_jaxpr(jax.grad(lambda z: loss(z, a, 0.0)))(Z))


def test_degenerate_inputs_give_finite_values_and_derivatives():
    rng = np.random.default_rng(10)
    row = rng.normal(size=(1, 6)).astype(np.float32)
    same_rows = jnp.asarray(np.repeat(row, 4, axis=0))  # Z - mu = 0
    rank_one = jnp.asarray(rng.normal(size=(4, 1)) @ row)  # many zero singular values
    tangent = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)

    def loss(z, a, gamma):
        return jnp.sum(jnp.sin(spectral_collapse(z, a, gamma)))

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    hvp_fn = jax.jit(lambda z, a, g: jax.jvp(lambda x: jax.grad(loss)(x, a, g), (z,), (tangent,)))
    for gamma in [0.0, 1.0, 2.0]:
        for Z in [same_rows, rank_one]:
            assert np.all(np.isfinite(spectral_collapse(Z, 0.8, gamma)))
            for g in grad_fn(Z, 0.8, gamma) + hvp_fn(Z, 0.8, gamma):
                assert np.all(np.isfinite(g))
        np.testing.assert_allclose(spectral_collapse(same_rows, 0.8, gamma), same_rows, atol=1e-6)


def test_jit_and_vmap_match_a_loop():
    rng = np.random.default_rng(11)
    Z = jnp.asarray(rng.normal(size=(3, 8, 5)), jnp.float32)  # [M, B, d]
    strengths = jnp.asarray([0.0, 0.5, 1.0], jnp.float32)

    def loss(z, a):
        return jnp.sum(spectral_collapse(z, a, 1.5) ** 2)

    value_and_grad = jax.value_and_grad(loss)
    loop = [jax.jit(value_and_grad)(Z[m], strengths[m]) for m in range(3)]  # one modality at a time
    vmapped = jax.jit(jax.vmap(value_and_grad))(Z, strengths)
    chex.assert_trees_all_close(vmapped, jax.tree.map(lambda *x: jnp.stack(x), *loop), atol=1e-4)
    out = jax.vmap(spectral_collapse, in_axes=(0, 0, None))(Z, strengths, 1.5)  # no jit
    loop_out = jnp.stack([spectral_collapse(Z[m], strengths[m], 1.5) for m in range(3)])
    np.testing.assert_allclose(out, loop_out, atol=1e-5)


def test_dtype_shape_and_batch_of_one():
    Z = jnp.asarray(np.random.default_rng(12).normal(size=(6, 4)), jnp.bfloat16)
    out = spectral_collapse(Z, 0.5, 1.0)
    assert out.dtype == jnp.bfloat16 and out.shape == (6, 4)
    one = jnp.ones((1, 4))
    chex.assert_trees_all_equal(spectral_collapse(one, 1.0, 0.0), one)
    with pytest.raises(ValueError):
        spectral_collapse(jnp.zeros((2, 6, 4)), 0.5, 1.0)


# ---------------------------------------------------------------------------------------------
# collapse_regularizer
# ---------------------------------------------------------------------------------------------


def _numpy_regularizer(Hc, Hx):
    sc = np.linalg.svd(Hc - Hc.mean(0), compute_uv=False)
    sx = np.linalg.svd(Hx - Hx.mean(0), compute_uv=False)
    a = sc**2 / np.sum(sc**2)
    return np.sum(a * (sc - sx) ** 2) / np.sum(sc**2)


@pytest.mark.parametrize("shape", [(10, 4), (4, 10)])
def test_regularizer_matches_numpy_and_is_zero_only_for_identical(x64, shape):
    rng = np.random.default_rng(13)
    Hc = rng.normal(size=shape)
    Hx = Hc + 0.3 * rng.normal(size=shape)
    R = collapse_regularizer(jnp.asarray(Hc), jnp.asarray(Hx))
    chex.assert_shape(R, ())
    np.testing.assert_allclose(float(R), _numpy_regularizer(Hc, Hx), rtol=1e-10)
    assert float(R) > 0
    assert float(collapse_regularizer(jnp.asarray(Hc), jnp.asarray(Hc))) == 0.0
    # invariant to a common rescaling, and to each input's own mean
    R2 = collapse_regularizer(jnp.asarray(5 * Hc + 1.0), jnp.asarray(5 * Hx - 2.0))
    np.testing.assert_allclose(float(R2), float(R), rtol=1e-10)


def test_regularizer_float32_scalar():
    rng = np.random.default_rng(14)
    Hc, Hx = (jnp.asarray(rng.normal(size=(8, 6)), jnp.float32) for _ in range(2))
    R = jax.jit(collapse_regularizer)(Hc, Hx)
    chex.assert_shape(R, ())
    chex.assert_type(R, jnp.float32)
    np.testing.assert_allclose(float(R), _numpy_regularizer(np.asarray(Hc), np.asarray(Hx)), 1e-4)


@pytest.mark.parametrize("shape", WIDE_AND_TALL)
def test_regularizer_derivatives(x64, shape):
    rng = np.random.default_rng(15)
    Hc, Hx, Vc, Vx = (jnp.asarray(rng.normal(size=shape)) for _ in range(4))
    check_grads(collapse_regularizer, (Hc, Hx), order=1, modes=("fwd", "rev"))
    loss = lambda p: collapse_regularizer(*p)
    hvp, fd = _hvp_and_finite_difference(loss, (Hc, Hx), (Vc, Vx))
    chex.assert_trees_all_close(hvp, fd, rtol=1e-6, atol=1e-8)


def test_regularizer_degenerate_inputs_are_finite():
    rng = np.random.default_rng(16)
    H = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    const = jnp.ones((4, 6), jnp.float32)
    tangents = (H, -H)
    grad_fn = jax.jit(jax.grad(collapse_regularizer, argnums=(0, 1)))
    grad_r = jax.grad(lambda q: collapse_regularizer(*q))
    hvp_fn = jax.jit(lambda p: jax.jvp(grad_r, (p,), (tangents,)))
    for a, b in [(H, const), (const, H), (const, const)]:
        assert np.isfinite(float(collapse_regularizer(a, b)))
        for g in grad_fn(a, b) + hvp_fn((a, b))[1]:
            assert np.all(np.isfinite(g))
    assert float(collapse_regularizer(const, H)) == 0.0


# ---------------------------------------------------------------------------------------------
# diagnostics
# ---------------------------------------------------------------------------------------------


def test_ranks_and_spectrum_on_known_spectra(x64):
    rng = np.random.default_rng(17)
    s = np.array([3.0, 2.0, 1.0])
    p = s / s.sum()
    Z = _with_spectrum(rng, 9, 5, s)
    np.testing.assert_allclose(float(effective_rank(Z)), np.exp(-np.sum(p * np.log(p))), 1e-10)
    np.testing.assert_allclose(float(stable_rank(Z)), 14.0 / 9.0, 1e-10)
    np.testing.assert_allclose(singular_value_spectrum(Z)[:3], np.array([9, 4, 1]) / 14, atol=1e-12)
    # an orthonormal basis scaled uniformly: effective and stable rank equal its size
    flat = _with_spectrum(rng, 9, 5, np.full(4, 0.7))
    np.testing.assert_allclose(float(effective_rank(flat)), 4.0, 1e-10)
    np.testing.assert_allclose(float(stable_rank(flat)), 4.0, 1e-10)


def test_center_flag_and_zero_matrix():
    rng = np.random.default_rng(18)
    Q = np.linalg.qr(rng.normal(size=(6, 6)))[0][:, :3]  # not orthogonal to ones
    Z = Q @ np.diag([2.0, 2.0, 2.0]) @ np.linalg.qr(rng.normal(size=(4, 4)))[0][:3]
    np.testing.assert_allclose(float(effective_rank(Z, center=False)), 3.0, 1e-5)
    np.testing.assert_allclose(float(stable_rank(Z, center=False)), 3.0, 1e-5)
    const = jnp.ones((5, 3))  # centred: the zero matrix
    assert float(effective_rank(const)) == 0.0 and float(stable_rank(const)) == 0.0
    np.testing.assert_array_equal(singular_value_spectrum(const), np.zeros(3))
    np.testing.assert_allclose(float(effective_rank(const, center=False)), 1.0, 1e-6)
