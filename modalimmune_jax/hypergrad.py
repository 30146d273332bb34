"""Certified Neumann-truncated inverse HVPs and implicit (IFT) hypergradients.

DESIGN.md §3.4. ``(H + μI)^{-1} v`` is approximated by the truncated Neumann series, run as a
fixed-length `lax.scan` of HVPs (compile time and jaxpr size do not depend on the number of terms),
and returned with a certificate: an a-priori bound from the estimated spectrum and an a-posteriori
bound from the exact residual.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from modalimmune_jax.hvp import linearized_hvp
from modalimmune_jax.lanczos import extreme_eigenvalues_from_hvp

PyTree = Any
HvpFn = Callable[[PyTree], PyTree]


def _cast_like(tree: PyTree, like: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: a.astype(jnp.result_type(b)), tree, like)


def _a_priori_bound(num_terms, *, alpha, rho, v_norm, valid):
    """``α ρ^{K+1} / (1 - ρ) ‖v‖`` for K = ``num_terms`` (any shape), inf where not ``valid``."""
    bound = alpha * rho ** (num_terms + 1) / (1.0 - rho) * v_norm
    return jnp.where(valid, bound, jnp.inf)


def neumann_inverse_hvp(
    hvp_fn: HvpFn,
    v: PyTree,
    *,
    alpha: jax.typing.ArrayLike | None = None,
    num_terms: int,
    damping: jax.typing.ArrayLike = 0.0,
    tol: jax.typing.ArrayLike | None = None,
    key: jax.Array | None = None,
    power_iters: int = 20,
    spectrum: tuple[jax.typing.ArrayLike, jax.typing.ArrayLike] | None = None,
    floor_curvature: bool = False,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """Truncated Neumann series for ``(H + μI)^{-1} v``, with an error certificate.

    With ``A = H + μI`` (``μ`` = ``damping``) and ``K`` = ``num_terms``:
    ``x_K = α Σ_{k=0..K} (I - αA)^k v``, computed as the Richardson recursion
    ``x_0 = αv, x_{j+1} = x_j + α (v - A x_j)`` in a `lax.scan` of length K (K HVPs).
    ``lambda_max``/``lambda_min`` are eigenvalue estimates OF ``A`` (so ``lambda_min`` is DESIGN's
    ``λ_min + μ``), from Lanczos through ``hvp_fn`` (``power_iters`` HVPs) unless ``spectrum`` is
    given; ``alpha=None`` uses ``α = 1/lambda_max``. Certificate, with ``ρ = max(|1 - α
    lambda_min|, |1 - α lambda_max|)``:
      - ``valid``: ``lambda_min > 0`` and ``ρ < 1`` (i.e. ``0 < α < 2/lambda_max``); the series
        diverges along any direction where it fails (e.g. negative curvature beyond ``μ``);
      - ``bound``: a-priori ``‖x_K - A^{-1}v‖ <= α ρ^{K+1}/(1 - ρ) ‖v‖``, inf when not valid;
      - ``residual_norm``: ``‖v - A x_K‖``, exact (one more HVP);
      - ``posterior_bound``: ``residual_norm / lambda_min`` (since ``x_K - A^{-1}v = -A^{-1}r``),
        inf when ``lambda_min <= 0``.
    Caveat: both bounds use the estimated extremes. Lanczos estimates lie inside the true spectrum,
    so they can understate ``ρ`` (and overstate ``lambda_min``) until they converge; they are exact
    once ``power_iters`` reaches the dimension and near exact for well-separated extremes. Pass a
    known ``spectrum`` or more ``power_iters`` where the bound must be rigorous.

    With ``tol``, K is the smallest ``K <= num_terms`` whose a-priori bound is ``<= tol`` (else
    ``num_terms``); the scan keeps length ``num_terms`` and skips the steps beyond K, so it stays
    jit-able with a traced ``tol``.

    Args:
      hvp_fn: ``u -> H u``, pytree to pytree, symmetric (e.g. `curvature.linearized_hvp`).
      v: right-hand side, a pytree of float arrays.
      alpha: step ``α`` (``[]`` float), or None for ``1 / lambda_max``.
      num_terms: K, the highest power of the series (static int >= 0); K + 1 terms, K HVPs.
      damping: ``μ >= 0``, ``[]`` float.
      tol: optional ``[]`` float tolerance on the a-priori bound (early stop, masked).
      key: PRNG key for the Lanczos start vector; None uses ``PRNGKey(0)``.
      power_iters: Lanczos iterations for the spectrum estimate (static).
      spectrum: optional known ``(lambda_min, lambda_max)`` of ``A``; skips the Lanczos HVPs.
      floor_curvature: raise ``μ`` by the negative curvature (above); static bool.

    Returns:
      ``(x, certificate)``: ``x`` a pytree like ``v``; ``certificate`` a dict of ``[]`` arrays
      ``bound``, ``residual_norm``, ``posterior_bound``, ``valid`` (bool), ``num_terms_used``
      (int32), ``lambda_max``, ``lambda_min``, ``alpha``, ``rho``, ``damping`` (the ``μ`` used).

    Reference: DESIGN.md §3.4; Lorraine, Vicol & Duvenaud (2020), "Optimizing millions of
    hyperparameters by implicit differentiation".
    """

    damping = jnp.asarray(damping)

    def damped(mu):
        return lambda u: optax.tree.add_scale(hvp_fn(u), mu, u)

    if spectrum is None:
        key = jax.random.PRNGKey(0) if key is None else key
        lam_max, lam_min = extreme_eigenvalues_from_hvp(damped(damping), v, key=key,
                                                        iters=power_iters)
    else:
        lam_min, lam_max = (jnp.asarray(s) for s in spectrum)
    if floor_curvature:
        # lam_min - damping is λ_min(H): shift the whole spectrum up by its negative part.
        shift = jnp.maximum(0.0, damping - lam_min)
        damping, lam_min, lam_max = damping + shift, lam_min + shift, lam_max + shift
    matvec = damped(damping)
    alpha = 1.0 / lam_max if alpha is None else jnp.asarray(alpha)
    rho = jnp.maximum(jnp.abs(1.0 - alpha * lam_min), jnp.abs(1.0 - alpha * lam_max))
    valid = (lam_min > 0) & (rho < 1)
    v_norm = optax.tree.norm(v)
    bound_at = lambda k: _a_priori_bound(k, alpha=alpha, rho=rho, v_norm=v_norm, valid=valid)

    if tol is None:
        k_used = jnp.asarray(num_terms, jnp.int32)
    else:
        # Evaluating the formula at every K avoids log/ceil round-off at the boundary.
        ok = bound_at(jnp.arange(num_terms + 1)) <= tol
        k_used = jnp.where(jnp.any(ok), jnp.argmax(ok), num_terms).astype(jnp.int32)

    # The carry keeps v's dtypes: the HVP's tangents must match the params' dtypes.
    alpha_v = _cast_like(optax.tree.scale(alpha, v), v)

    def richardson(x):
        return _cast_like(optax.tree.add_scale(x, alpha, optax.tree.sub(v, matvec(x))), v)

    def neumann_step(x, k):
        if tol is None:
            return richardson(x), None
        # cond, not where: the skipped steps cost no HVP outside vmap.
        return lax.cond(k < k_used, richardson, lambda x: x, x), None

    x, _ = lax.scan(neumann_step, alpha_v, jnp.arange(num_terms))
    residual_norm = optax.tree.norm(optax.tree.sub(v, matvec(x)))
    certificate = {
        "bound": bound_at(k_used),
        "residual_norm": residual_norm,
        "posterior_bound": jnp.where(lam_min > 0, residual_norm / lam_min, jnp.inf),
        "valid": valid,
        "num_terms_used": k_used,
        "lambda_max": lam_max,
        "lambda_min": lam_min,
        "alpha": alpha,
        "rho": rho,
        "damping": damping,
    }
    return x, certificate


def implicit_hypergradient(
    inner_loss: Callable[[PyTree, PyTree], jax.Array],
    outer_loss: Callable[[PyTree], jax.Array],
    params: PyTree,
    meta: PyTree,
    *,
    alpha: jax.typing.ArrayLike | None = None,
    num_terms: int = 20,
    damping: jax.typing.ArrayLike = 0.0,
    tol: jax.typing.ArrayLike | None = None,
    key: jax.Array | None = None,
    power_iters: int = 20,
    spectrum: tuple[jax.typing.ArrayLike, jax.typing.ArrayLike] | None = None,
    floor_curvature: bool = False,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """IFT hypergradient ``dL_out/dφ = -(∂²L_in/∂φ∂θ) (H + μI)^{-1} ∇θ L_out``.

    ``H = ∇²_θ L_in(θ, φ)`` through HVPs of one linearisation of ``∇θ L_in`` at ``params``;
    ``x ≈ (H + μI)^{-1} ∇θ L_out`` by `neumann_inverse_hvp`; the mixed term is ONE `jax.grad`
    over ``φ`` of ``<∇θ L_in(θ, φ), stop_gradient(x)>``. Exact at an inner optimum (``∇θ L_in =
    0``) as ``K -> ∞`` and ``μ -> 0``; the trainer uses it at the current iterate.

    Args:
      inner_loss: ``(params, meta) -> [] float``, the training loss ``L_in(θ, φ)``.
      outer_loss: ``params -> [] float``, the validation loss ``L_out(θ)``.
      params: ``θ``, a pytree of float arrays.
      meta: ``φ``, a pytree of float arrays (continuous meta-parameters).
      alpha, num_terms, damping, tol, key, power_iters, spectrum, floor_curvature: as in
        `neumann_inverse_hvp`.

    Returns:
      ``(hypergrad, certificate)``: ``hypergrad`` a pytree like ``meta``; ``certificate`` the
      `neumann_inverse_hvp` certificate for ``x``.

    Reference: DESIGN.md §3.4; Lorraine, Vicol & Duvenaud (2020).
    """
    outer_grad = jax.grad(outer_loss)(params)
    hvp_fn = linearized_hvp(lambda p: inner_loss(p, meta), params)
    x, certificate = neumann_inverse_hvp(
        hvp_fn,
        outer_grad,
        alpha=alpha,
        num_terms=num_terms,
        damping=damping,
        tol=tol,
        key=key,
        power_iters=power_iters,
        spectrum=spectrum,
        floor_curvature=floor_curvature,
    )
    x = lax.stop_gradient(x)

    def mixed(m):
        return optax.tree.vdot(jax.grad(inner_loss)(params, m), x)

    hypergrad = optax.tree.scale(-1.0, jax.grad(mixed)(meta))
    return hypergrad, certificate
