"""Tests for modalimmune_jax.hypergrad against closed forms (SPD solves, ridge regression)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modalimmune_jax.hypergrad import implicit_hypergradient, neumann_inverse_hvp


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _spd(eigs, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigs), len(eigs))))
    return q @ np.diag(eigs) @ q.T


N = 20
EIGS = np.linspace(0.1, 10.0, N)  # condition number 100: rho = 0.99 with alpha = 1/10


@functools.partial(jax.jit, static_argnames="num_terms")
def _dense_neumann(a, v, alpha, damping, tol, *, num_terms):
    # Shared by the tests below to keep compiles few (alpha=None is covered by the pytree and ridge
    # tests). tol < 0 is never met, so all terms run: the same iterates as tol=None, which
    # test_neumann_tol_picks_smallest_k checks.
    return neumann_inverse_hvp(
        lambda u: a @ u,
        v,
        alpha=alpha,
        num_terms=num_terms,
        damping=damping,
        tol=tol,
        num_lanczos_iters=N,
    )


def _neumann(a, v, *, num_terms, alpha, damping=0.0, tol=-1.0):
    scalars = tuple(jnp.asarray(float(t)) for t in (alpha, damping, tol))
    args = (jnp.asarray(a), jnp.asarray(v)) + scalars
    x, cert = _dense_neumann(*args, num_terms=num_terms)
    return np.asarray(x), {k: np.asarray(c) for k, c in cert.items()}


@pytest.mark.parametrize("num_terms", [5, 40, 400])
def test_neumann_error_within_bounds(x64, num_terms):
    a = _spd(EIGS)
    v = np.random.default_rng(1).normal(size=N)
    x, cert = _neumann(a, v, num_terms=num_terms, alpha=0.1)
    err = np.linalg.norm(x - np.linalg.solve(a, v))
    assert cert["valid"]
    assert int(cert["num_terms_used"]) == num_terms
    np.testing.assert_allclose([cert["lambda_min"], cert["lambda_max"]], [0.1, 10.0], rtol=1e-9)
    np.testing.assert_allclose(cert["alpha"], 0.1, rtol=1e-9)
    np.testing.assert_allclose(cert["rho"], 0.99, rtol=1e-9)
    # The certificate's bound is the documented formula with the exact spectrum of A.
    expected_bound = 0.1 * 0.99 ** (num_terms + 1) / 0.01 * np.linalg.norm(v)
    np.testing.assert_allclose(cert["bound"], expected_bound, rtol=1e-7)
    assert err <= cert["bound"] * (1 + 1e-9)
    residual = np.linalg.norm(v - a @ x)
    np.testing.assert_allclose(cert["residual_norm"], residual, rtol=1e-9, atol=1e-13)
    assert err <= cert["posterior_bound"] * (1 + 1e-9)
    # Closed form of the truncated series: x_K = A^{-1} (I - (I - αA)^{K+1}) v.
    m = np.eye(N) - 0.1 * a
    series = np.linalg.solve(a, v - np.linalg.matrix_power(m, num_terms + 1) @ v)
    np.testing.assert_allclose(x, series, rtol=1e-8, atol=1e-10)


def test_neumann_damping_and_pytree(x64):
    # A pytree right-hand side, and (H + μI)^{-1} with a damping that makes it well conditioned.
    h = _spd(np.linspace(0.0, 4.0, 8), seed=2)
    mu = 1.0
    v = {"a": jnp.arange(1.0, 5.0), "b": jnp.asarray([[0.5, -1.0], [2.0, 0.0]])}

    def hvp_fn(u):
        flat = jnp.concatenate([u["a"], u["b"].ravel()])
        out = jnp.asarray(h) @ flat
        return {"a": out[:4], "b": out[4:].reshape(2, 2)}

    solve = jax.jit(
        lambda v: neumann_inverse_hvp(hvp_fn, v, num_terms=60, damping=mu, num_lanczos_iters=8)
    )
    x, cert = solve(v)
    flat_v = np.concatenate([np.asarray(v["a"]), np.asarray(v["b"]).ravel()])
    exact = np.linalg.solve(h + mu * np.eye(8), flat_v)
    flat_x = np.concatenate([np.asarray(x["a"]), np.asarray(x["b"]).ravel()])
    np.testing.assert_allclose([cert["lambda_min"], cert["lambda_max"]], [1.0, 5.0], rtol=1e-9)
    assert cert["valid"]
    np.testing.assert_allclose([cert["alpha"], cert["rho"]], [0.2, 0.8], rtol=1e-9)  # alpha=None
    err = np.linalg.norm(flat_x - exact)
    assert err <= cert["bound"] and err <= cert["posterior_bound"] * (1 + 1e-9)
    assert err < 1e-4  # rho = 0.8: 0.2 * 0.8^61 / 0.2 * |v| ~ 4e-6 * 3.9
    assert x["b"].shape == (2, 2) and x["a"].dtype == jnp.float64


def test_neumann_invalid_certificates(x64):
    a = _spd(EIGS)
    v = np.random.default_rng(3).normal(size=N)
    # alpha > 2/lambda_max: the series diverges along the top eigenvector.
    _, cert = _neumann(a, v, num_terms=5, alpha=0.25)
    assert not cert["valid"] and np.isinf(cert["bound"])
    np.testing.assert_allclose(cert["rho"], 1.5, rtol=1e-9)
    assert np.isfinite(cert["posterior_bound"])  # the a-posteriori bound holds for any x
    # Indefinite H: a negative eigenvalue -1 that damping 0.1 cannot fix.
    h = _spd(np.concatenate([[-1.0], np.linspace(0.5, 3.0, N - 1)]), seed=4)
    _, cert = _neumann(h, v, num_terms=5, alpha=1 / 3.1, damping=0.1)
    assert not cert["valid"] and np.isinf(cert["bound"]) and np.isinf(cert["posterior_bound"])
    np.testing.assert_allclose([cert["lambda_min"], cert["lambda_max"]], [-0.9, 3.1], rtol=1e-9)


def test_neumann_curvature_floor_solves_the_shifted_system(x64):
    # The indefinite H above: the floor raises μ = 0.1 by λ_min(H) = -1 to μ' = 1.1, so the series
    # solves (H + 1.1 I) x = v, whose spectrum is [0.1, 4.1].
    h = _spd(np.concatenate([[-1.0], np.linspace(0.5, 3.0, N - 1)]), seed=4)
    v = np.random.default_rng(3).normal(size=N)
    x, cert = jax.jit(lambda v: neumann_inverse_hvp(
        lambda u: jnp.asarray(h) @ u, v, num_terms=400, damping=0.1, num_lanczos_iters=N,
        floor_curvature=True))(jnp.asarray(v))
    assert cert["valid"]
    np.testing.assert_allclose(cert["damping"], 1.1, rtol=1e-9)
    np.testing.assert_allclose([cert["lambda_min"], cert["lambda_max"]], [0.1, 4.1], rtol=1e-9)
    err = np.linalg.norm(np.asarray(x) - np.linalg.solve(h + 1.1 * np.eye(N), v))
    assert err <= cert["bound"] * (1 + 1e-9) and cert["bound"] < 1e-2
    # Positive definite already: the floor leaves μ alone.
    _, cert = neumann_inverse_hvp(lambda u: jnp.asarray(_spd(EIGS)) @ u, jnp.asarray(v),
                                  num_terms=3, damping=0.5, num_lanczos_iters=N, floor_curvature=True)
    np.testing.assert_allclose(cert["damping"], 0.5, rtol=1e-12)


def test_neumann_tol_picks_smallest_k(x64):
    a = _spd(EIGS)
    v = np.random.default_rng(5).normal(size=N)
    # The a-priori bound, computed directly; tol halfway (geometrically) between K=39 and K=40.
    bound = lambda k: 0.1 * 0.99 ** (k + 1) / 0.01 * np.linalg.norm(v)
    tol = np.sqrt(bound(39) * bound(40))
    x_tol, cert = _neumann(a, v, num_terms=400, alpha=0.1, tol=tol)
    assert int(cert["num_terms_used"]) == 40
    assert cert["bound"] <= tol
    np.testing.assert_allclose(cert["bound"], bound(40), rtol=1e-7)
    x_40, cert_40 = _neumann(a, v, num_terms=40, alpha=0.1)
    assert int(cert_40["num_terms_used"]) == 40
    np.testing.assert_allclose(x_tol, x_40, rtol=1e-13, atol=1e-15)
    # tol=None (a separate code path without the masked steps) gives the same iterates.
    x_none, _ = neumann_inverse_hvp(
        lambda u: jnp.asarray(a) @ u, jnp.asarray(v), alpha=0.1, num_terms=40, spectrum=(0.1, 10.0)
    )
    np.testing.assert_allclose(x_none, x_40, rtol=1e-12, atol=1e-14)
    # An unreachable tolerance uses every term.
    _, cert = _neumann(a, v, num_terms=5, alpha=0.1, tol=1e-30)
    assert int(cert["num_terms_used"]) == 5


def _count_eqns(jaxpr):
    count = 0
    for eqn in jaxpr.eqns:
        count += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _count_eqns(inner)
    return count


@pytest.mark.parametrize("tol", [None, 1e-3])
def test_neumann_jaxpr_size_independent_of_k(tol):
    a = jnp.asarray(_spd(EIGS), jnp.float32)
    v = jnp.ones(N, jnp.float32)

    def size(k):
        fn = lambda v: neumann_inverse_hvp(lambda u: a @ u, v, num_terms=k, tol=tol)
        return _count_eqns(jax.make_jaxpr(fn)(v).jaxpr)

    assert size(5) == size(400)


def _ridge_problem(seed=0, n=30, n_val=20, d=5):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, d)), rng.normal(size=n)
    x_val = rng.normal(size=(n_val, d))
    y_val = x_val @ rng.normal(size=d) + 0.1 * rng.normal(size=n_val)
    return x, y, x_val, y_val


def _ridge_solution(x, y, phi):
    return np.linalg.solve(x.T @ x + np.exp(phi) * np.eye(x.shape[1]), x.T @ y)


def test_implicit_hypergradient_ridge(x64):
    x, y, x_val, y_val = _ridge_problem()
    phi = 1.3
    outer = lambda w: 0.5 * np.sum((x_val @ w - y_val) ** 2)
    w_star = _ridge_solution(x, y, phi)
    hess = x.T @ x + np.exp(phi) * np.eye(x.shape[1])
    # Differentiate H(φ) w*(φ) = Xᵀy: dw*/dφ = -H⁻¹ e^φ w*, so dL/dφ = -e^φ w*ᵀ H⁻¹ ∇L_out(w*).
    exact = -np.exp(phi) * w_star @ np.linalg.solve(hess, x_val.T @ (x_val @ w_star - y_val))
    eps = 1e-5
    finite_diff = (
        outer(_ridge_solution(x, y, phi + eps)) - outer(_ridge_solution(x, y, phi - eps))
    ) / (2 * eps)
    np.testing.assert_allclose(exact, finite_diff, rtol=1e-6)

    xj, yj, xvj, yvj = (jnp.asarray(t) for t in (x, y, x_val, y_val))
    inner_loss = lambda p, m: 0.5 * jnp.sum((xj @ p["w"] - yj) ** 2) + 0.5 * jnp.exp(
        m["log_penalty"]
    ) * jnp.sum(p["w"] ** 2)
    outer_loss = lambda p: 0.5 * jnp.sum((xvj @ p["w"] - yvj) ** 2)
    params, meta = {"w": jnp.asarray(w_star)}, {"log_penalty": jnp.asarray(phi)}
    x_exact = np.linalg.solve(hess, x_val.T @ (x_val @ w_star - y_val))
    for num_terms in (100, 3):
        hypergrad, cert = jax.jit(
            lambda p, m, k=num_terms: implicit_hypergradient(
                inner_loss, outer_loss, p, m, num_terms=k, num_lanczos_iters=5, key=jax.random.PRNGKey(0)
            )
        )(params, meta)
        assert set(hypergrad) == {"log_penalty"} and hypergrad["log_penalty"].shape == ()
        assert cert["valid"]
        if num_terms == 100:
            np.testing.assert_allclose(hypergrad["log_penalty"], exact, rtol=1e-3)
        np.testing.assert_allclose(
            [cert["lambda_min"], cert["lambda_max"]], np.linalg.eigvalsh(hess)[[0, -1]], rtol=1e-9
        )
        # The hypergradient error is -e^φ w*ᵀ (x - H⁻¹∇L_out), so the inverse-HVP error is at least
        # |error| / (e^φ ‖w*‖); the certificate must cover it (up to float64 round-off).
        hg_err = abs(float(hypergrad["log_penalty"]) - exact)
        x_err_lower = hg_err / (np.exp(phi) * np.linalg.norm(w_star))
        assert x_err_lower <= float(cert["bound"]) + 1e-12
        assert x_err_lower <= float(cert["posterior_bound"]) + 1e-12
    # Only the long series is accurate; the short one is not (so the bound check above has teeth).
    assert x_err_lower > 1e-3 * np.linalg.norm(x_exact)
