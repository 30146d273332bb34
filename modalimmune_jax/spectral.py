"""Spectrum-adaptive collapse of a modality embedding, its regularizer, and spectral diagnostics.

DESIGN.md §3.2. The collapse operator shrinks the singular values of a centred embedding by their
energy, so that ``gamma > 0`` destroys the dominant directions first and ``strength = 1, gamma = 0``
sends every sample to the batch mean (modality dropout as a special case).

Differentiating through an SVD. ``jnp.linalg.svd``'s JVP (``jax/_src/lax/linalg.py``,
``_svd_jvp_rule``) is ill-conditioned in two places:

* ``F_ij = 1 / (s_j^2 - s_i^2)``: infinite for repeated singular values, huge for close ones;
* ``1 / s`` in the complement term of a non-square matrix. A centred ``[B, d]`` batch has rank at
  most ``B - 1``, so with ``B <= d`` there is *always* a (round-off sized) zero singular value: the
  plain JVP is NaN for an exactly constant batch and inaccurate otherwise.

Three measures keep every derivative finite and, at generic points, exact:

1. Centring is done by projecting onto an orthonormal basis of the complement of the ones vector
   (``Q^T Z``, ``[B - 1, d]``, Helmert contrasts) instead of subtracting the mean: same nonzero
   singular values, but the structural zero singular value is gone.
2. The collapse has its own JVP (divided differences of the spectral map), whose coefficients have
   finite limits at repeated and zero singular values.
3. Every SVD goes through ``_svd``, JAX's rule with the two divisions broadened to
   ``x / (x^2 + delta^2)`` at round-off level, so second derivatives (the HVPs of §3.3 and §3.4 go
   through the collapse and the regularizer) are finite too.

Cost (issue 15). With a static ``gamma = 0`` the collapse is the closed form
``mu + (1 - strength)(Z - mu)``: no SVD at all, in the value or any derivative. Singular values
that are not differentiated (the regularizer's clean side, the diagnostics) come from
``svd(compute_uv=False)``, ~2.5x cheaper on CPU than the thin SVD with vectors; their JVP, when
one is taken, goes through the guarded ``_svd``.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import entr


def _helmert_basis(n, dtype):
    """``[n, n - 1]`` orthonormal columns orthogonal to the ones vector (Helmert contrasts)."""
    i = np.arange(n)[:, None]
    k = np.arange(1, n)[None, :]
    q = np.where(i < k, 1.0, np.where(i == k, -k, 0.0)) / np.sqrt(k * (k + 1.0))
    return jnp.asarray(q, dtype)


def _as_float_matrix(x):
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a [B, d] matrix, got shape {x.shape}; vmap for more axes.")
    # No half-precision SVD on any backend: compute in float32 at least.
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def is_static_zero(x) -> bool:
    """Whether ``x`` is a Python or NumPy number equal to 0 (a JAX array, even concrete, is not)."""
    return isinstance(x, int | float | np.number | np.ndarray) and np.ndim(x) == 0 and x == 0



def _safe_pow(x, e):
    """``x ** e`` for ``x >= 0``, with ``0 ** e = [e == 0]`` and zero (not NaN) gradients at 0."""
    pos = x > 0
    # Double `where`: the untaken branch must not see log(0), or its NaN cotangent leaks through.
    return jnp.where(pos, jnp.where(pos, x, 1.0) ** e, jnp.where(e == 0, 1.0, 0.0).astype(x.dtype))


def _safe_inverse(x, delta2):
    """``1 / x`` broadened to ``x / (x^2 + delta2)``: exact for ``|x| >> sqrt(delta2)``, 0 at 0."""
    return x / (x * x + delta2)


@jax.custom_jvp
def _svd(x):
    """Thin SVD ``(U [m, k], s [k], Vt [k, n])`` whose JVP stays finite (see module docstring)."""
    u, s, vt = jnp.linalg.svd(x, full_matrices=False)
    return u, s, vt  # a plain tuple: the JVP rule must return the same pytree structure


@_svd.defjvp
def _svd_jvp(primals, tangents):
    # JAX's _svd_jvp_rule for real matrices with its two divisions broadened at the round-off level
    # of the spectrum. It calls _svd itself, so derivatives of every order use the guarded formula.
    (x,), (dx,) = primals, tangents
    u, s, vt = _svd(x)
    v = vt.T
    finfo = jnp.finfo(x.dtype)
    s_max = jnp.max(s, initial=0.0)
    delta = finfo.eps * s_max
    ds = u.T @ dx @ v  # [k, k]
    s2 = s * s
    # The diagonal is zeroed explicitly: under jit, fused (FMA) tangents of s_i^2 - s_i^2 need not
    # cancel exactly, and the broadened inverse has slope 1 / delta^2 there.
    off_diagonal = ~np.eye(s.shape[0], dtype=bool)
    diff = s2[None, :] - s2[:, None]
    f = jnp.where(off_diagonal, _safe_inverse(diff, (delta * s_max) ** 2 + finfo.tiny), 0.0)
    s_inv = _safe_inverse(s, delta**2 + finfo.tiny)
    dss, sds = ds * s[None, :], s[:, None] * ds
    du = u @ (f * (dss + dss.T))
    dv = v @ (f * (sds + sds.T))
    m, n = x.shape
    if m > n:
        dxv = dx @ v
        du = du + (dxv - u @ (u.T @ dxv)) * s_inv[None, :]
    if n > m:
        dxu = dx.T @ u
        dv = dv + (dxu - v @ (v.T @ dxu)) * s_inv[None, :]
    return (u, s, vt), (du, jnp.diagonal(ds), dv.T)


@jax.custom_jvp
def _singular_values(x):
    """Singular values ``[k]``, descending: no singular vectors unless a derivative is taken."""
    return jnp.linalg.svd(x, compute_uv=False)


@_singular_values.defjvp
def _singular_values_jvp(primals, tangents):
    # d s_i = u_i^T dX v_i, through the guarded SVD, so that second derivatives stay finite.
    (x,), (dx,) = primals, tangents
    u, s, vt = _svd(x)
    return s, jnp.sum(u * (dx @ vt.T), axis=0)


def _relative_weights(s):
    """``r_i = s_i / max_j s_j`` in ``[0, 1]`` (0 for an all-zero spectrum) and the argmax."""
    top = jnp.argmax(s)
    c = s[top]
    r = jnp.where(c > 0, s / jnp.where(c > 0, c, 1.0), 0.0)
    return r, top


def _power_divided_difference(r, p):
    """``[k, k]`` divided differences ``(r_i^p - r_j^p) / (r_i - r_j)``, ``p r_i^(p-1)`` on ties.

    ``r`` lies in [0, 1]. Written as ``a^(p-1) phi(log q)``, ``phi(L) = expm1(p L) / expm1(L)``,
    with ``a = max`` and ``q = min / max``: no cancellation when ``r_i`` and ``r_j`` are close (the
    naive quotient loses every digit there). Near ``L = 0`` phi is its Taylor series, so that its
    own derivative (second-order AD) is accurate too.
    """
    a = jnp.maximum(r[:, None], r[None, :])
    b = jnp.minimum(r[:, None], r[None, :])
    pos = a > 0
    q = jnp.where(pos, b / jnp.where(pos, a, 1.0), 1.0)
    log_q = jnp.log(jnp.where(q > 0, q, 1.0))
    small = jnp.abs(log_q) < jnp.finfo(r.dtype).eps ** (1.0 / 3.0)  # Taylor error ~ eps
    far = jnp.where(small | (q == 0), -1.0, log_q)
    taylor = p * (1.0 + (p - 1.0) * log_q / 2.0 + (p - 1.0) * (2.0 * p - 1.0) * log_q**2 / 12.0)
    # q = 0 (one of the pair is zero): phi = (1 - 0) / (1 - 0) = 1.
    phi = jnp.where(q == 0, 1.0, jnp.where(small, taylor, jnp.expm1(p * far) / jnp.expm1(far)))
    return _safe_pow(a, p - 1.0) * phi


@jax.custom_jvp
def _dominant_part(x, strength, gamma):
    """``U diag(strength * s * w) Vt``: what the collapse removes from the centred ``x``."""
    u, s, vt = _svd(x)
    r, _ = _relative_weights(s)
    return (u * (strength * s * _safe_pow(r, 2.0 * gamma))[None, :]) @ vt


@_dominant_part.defjvp
def _dominant_part_jvp(primals, tangents):
    # Y = U diag(t) Vt with t_i = strength * s_i * (s_i / c)^(2 gamma), c = max s. In the basis of
    # singular vectors its derivative is (Lewis & Sendov's rectangular spectral functions)
    #   sym(dS) (t_i - t_j)/(s_i - s_j) + skew(dS) (t_i + t_j)/(s_i + s_j) + diag(dt via c, params)
    # plus complement terms with h = t/s; every coefficient has a finite limit at ties and zeros.
    x, strength, gamma = primals
    dx, dstrength, dgamma = tangents
    u, s, vt = _svd(x)
    r, top = _relative_weights(s)
    w = _safe_pow(r, 2.0 * gamma)  # (e_i / max e)^gamma = (s_i / c)^(2 gamma)
    h = strength * w
    y = (u * (s * h)[None, :]) @ vt
    ds = u.T @ dx @ vt.T  # [k, k]
    rw = r * w  # r^(2 gamma + 1)
    # (t_i + t_j) / (s_i + s_j) / strength is a weighted mean of w_i and w_j; both zero -> w(0).
    num, den = rw[:, None] + rw[None, :], r[:, None] + r[None, :]
    mean_w = 0.5 * (w[:, None] + w[None, :])
    skew_coef = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), mean_w)
    sym_coef = _power_divided_difference(r, 2.0 * gamma + 1.0)
    core = strength * (sym_coef * 0.5 * (ds + ds.T) + skew_coef * 0.5 * (ds - ds.T))
    log_r = jnp.log(jnp.where(r > 0, r, 1.0))
    dt = (
        -2.0 * gamma * strength * rw * ds[top, top]  # through c = max s; dc = ds[top, top]
        + s * w * dstrength
        + 2.0 * strength * s * w * log_r * dgamma
    )
    dy = u @ (core + jnp.diag(dt)) @ vt
    m, n = x.shape
    if m > n:
        dy = dy + ((dx - u @ (u.T @ dx)) @ (vt.T * h[None, :])) @ vt
    if n > m:
        udx = u.T @ dx
        dy = dy + (u * h[None, :]) @ (udx - (udx @ vt.T) @ vt)
    return y, dy


def spectral_collapse(
    Z: jax.typing.ArrayLike, strength: jax.typing.ArrayLike, gamma: jax.typing.ArrayLike
) -> jax.Array:
    """Shrinks the singular values of a centred embedding by their energy.

    With ``mu`` the batch mean and ``U, s, Vt = svd(Z - mu)``::

        e_i = s_i^2 / sum_j s_j^2,   w_i = (e_i / max_j e_j)^gamma,   s_i' = s_i (1 - strength w_i),
        C(Z) = mu + U diag(s') Vt = Z - U diag(strength s w) Vt.

    ``e_i / max_j e_j = (s_i / max_j s_j)^2`` (the sum cancels), which is how it is computed. The
    subtractive form makes ``strength = 0`` exactly the identity; ``strength = 1, gamma = 0`` sends
    every row to ``mu`` (up to SVD round-off); ``gamma > 0`` removes the dominant directions first.
    Use ``strength`` in ``[0, 1]`` (beyond 1 singular values flip sign) and ``gamma >= 0``. A batch
    of one sample is its own mean and is returned unchanged.

    A static ``gamma`` of 0 (a Python or NumPy number, not a JAX array) takes the closed form
    ``Z - strength (Z - mu)`` with no SVD (equal to the SVD path to round-off, values and
    derivatives); pass ``gamma`` as a JAX array for the SVD path or a derivative in ``gamma``.

    Differentiable in ``Z``, ``strength`` and ``gamma`` with an exact JVP that is finite at repeated
    and zero singular values, and finite second derivatives (module docstring). At a tied *largest*
    singular value, or at ``Z - mu = 0``, the operator is not differentiable; the JVP returns a
    finite one-sided value. Works under ``jit``; for several modalities ``[M, B, d]`` use ``vmap``.

    Args:
        Z: ``[B, d]`` float embedding of the target modality. bfloat16/float16 are computed in
            float32 (no half-precision SVD) and cast back.
        strength: scalar float, ``0`` leaves ``Z`` unchanged, ``1`` removes the dominant direction.
        gamma: scalar float ``>= 0``, how much the shrinkage concentrates on dominant directions.

    Returns:
        ``[B, d]`` collapsed embedding, dtype of ``Z``.

    Reference: DESIGN.md §3.2; derivative after Lewis & Sendov, "Twice differentiable spectral
    functions" (2005), and Townsend, "Differentiating the singular value decomposition" (2016).
    """
    Z = jnp.asarray(Z)
    z = _as_float_matrix(Z)
    if z.shape[0] < 2:
        return Z
    if is_static_zero(gamma):
        # Every weight is 1, so U diag(strength s) Vt = strength (Z - mu): no SVD needed.
        strength = jnp.asarray(strength, z.dtype)
        return (z - strength * (z - jnp.mean(z, axis=0, keepdims=True))).astype(Z.dtype)
    q = _helmert_basis(z.shape[0], z.dtype)  # Q^T (Z - mu) = Q^T Z: [B - 1, d]
    strength = jnp.asarray(strength, z.dtype)
    gamma = jnp.asarray(gamma, z.dtype)
    return (z - q @ _dominant_part(q.T @ z, strength, gamma)).astype(Z.dtype)


def _centred_singular_values(x, center):
    """Singular values ``[min(B - 1, d)]`` (centred) or ``[min(B, d)]``; guarded derivatives."""
    x = _as_float_matrix(x)
    if center:
        if x.shape[0] < 2:
            return jnp.zeros((0,), x.dtype)
        x = _helmert_basis(x.shape[0], x.dtype).T @ x
    return _singular_values(x)


def collapse_regularizer(
    H_clean: jax.typing.ArrayLike, H_collapsed: jax.typing.ArrayLike
) -> jax.Array:
    """Energy-weighted squared change of the joint representation's spectrum under a collapse.

    ``R = sum_i a_i (sigma_i(H_clean) - sigma_i(H_collapsed))^2 / sum_i sigma_i(H_clean)^2`` with
    ``a_i = sigma_i(H_clean)^2 / sum_j sigma_j(H_clean)^2``, singular values paired by rank (both
    sorted descending). Both matrices are centred at their own batch means first: the spectrum of
    the representation's spread, not of its offset, which would otherwise dominate ``sigma_1``.
    ``R`` is invariant to a common rescaling of both inputs, 0 when the spectra agree (and for a
    constant ``H_clean``), > 0 otherwise. Gradients flow to both inputs (weights included).

    Singular values come from an SVD rather than ``eigvalsh`` of the Gram matrix: ``sqrt`` of a zero
    eigenvalue has an infinite derivative, and a centred batch with ``B <= d_h`` always has one.
    ``d sigma_i = u_i^T dH v_i`` is finite; second derivatives use the guarded SVD JVP.

    Args:
        H_clean: ``[B, d_h]`` float joint representation of the clean batch.
        H_collapsed: ``[B, d_h]`` float joint representation with the target modality collapsed.

    Returns:
        Scalar float32 (float64 for float64 inputs).

    Reference: DESIGN.md §3.2.
    """
    s_clean = _centred_singular_values(H_clean, True)
    s_coll = _centred_singular_values(H_collapsed, True)
    if s_clean.shape != s_coll.shape:
        raise ValueError(f"shape mismatch: {jnp.shape(H_clean)} vs {jnp.shape(H_collapsed)}")
    energy = jnp.sum(s_clean**2)
    # A constant H_clean has no spectrum to keep: R = 0. Double `where`, so that its gradient is 0
    # rather than 0 * inf from dividing by a clamped denominator.
    nonzero = energy > 0
    denom = jnp.where(nonzero, energy, 1.0)
    return jnp.where(nonzero, jnp.sum(s_clean**2 * (s_clean - s_coll) ** 2) / denom**2, 0.0)


def singular_value_spectrum(Z: jax.typing.ArrayLike, *, center: bool = True) -> jax.Array:
    """Normalized energy shares ``s_i^2 / sum_j s_j^2`` of ``Z`` (centred by default), for plots.

    Args:
        Z: ``[B, d]`` float matrix.
        center: subtract the batch (row) mean first.

    Returns:
        ``[min(B - 1, d)]`` (centred) or ``[min(B, d)]`` float32, descending, summing to 1 (all
        zeros for a zero matrix).
    """
    e = _centred_singular_values(Z, center) ** 2
    return e / jnp.maximum(jnp.sum(e), jnp.finfo(e.dtype).tiny)


def effective_rank(Z: jax.typing.ArrayLike, *, center: bool = True) -> jax.Array:
    """Effective rank ``exp(-sum_i p_i log p_i)`` with ``p_i = s_i / sum_j s_j``.

    Lies in ``[1, rank]`` for a nonzero matrix; 0 for a zero matrix (a fully collapsed batch).
    Centred by default, so it measures the spread of the batch, not its mean. It is scale
    invariant: a uniform shrink (``spectral_collapse`` with ``gamma = 0``, ``strength < 1``) leaves
    it unchanged, and ``gamma > 0``, which flattens the spectrum, can raise it.

    Args:
        Z: ``[B, d]`` float matrix.
        center: subtract the batch (row) mean first.

    Returns:
        Scalar float32.

    Reference: Roy & Vetterli, "The effective rank: a measure of effective dimensionality" (2007).
    """
    s = _centred_singular_values(Z, center)
    total = jnp.sum(s)
    p = s / jnp.maximum(total, jnp.finfo(s.dtype).tiny)
    return jnp.where(total > 0, jnp.exp(jnp.sum(entr(p))), 0.0)


def stable_rank(Z: jax.typing.ArrayLike, *, center: bool = True) -> jax.Array:
    """Stable rank ``||Z||_F^2 / ||Z||_2^2 = sum_i s_i^2 / max_i s_i^2``.

    Args:
        Z: ``[B, d]`` float matrix.
        center: subtract the batch (row) mean first (as for ``effective_rank``).

    Returns:
        Scalar float32 in ``[1, rank]``; 0 for a zero matrix.
    """
    s = _centred_singular_values(Z, center)
    top = jnp.max(s, initial=0.0) ** 2
    return jnp.where(top > 0, jnp.sum(s**2) / jnp.maximum(top, jnp.finfo(s.dtype).tiny), 0.0)
