"""Certified Neumann-truncated inverse HVPs and implicit (IFT) hypergradients.

DESIGN.md §3.4. ``(H + μI)^{-1} v`` is approximated by the truncated Neumann series, run as a
fixed-length `lax.scan` of HVPs (compile time and jaxpr size do not depend on the number of terms),
and returned with a certificate: an a-priori bound from the estimated spectrum and an a-posteriori
bound from the exact residual.

Compile time (issue 15): the Lanczos iterations, the Neumann terms and the residual are the steps
of ONE scan with ONE call of the HVP, so its (large) linearised graph is compiled once, not three
times; and the hypergradient's mixed term comes out of that same call (the HVP of the joint
gradient in ``(θ, φ)``), not from a separate second-order graph.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from modalimmune_jax.lanczos import lanczos_init, lanczos_update, ritz_extremes

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
    num_lanczos_iters: int = 20,
    spectrum: tuple[jax.typing.ArrayLike, jax.typing.ArrayLike] | None = None,
    floor_curvature: bool = False,
    has_aux: bool = False,
) -> tuple:
    """Truncated Neumann series for ``(H + μI)^{-1} v``, with an error certificate.

    With ``A = H + μI`` (``μ`` = ``damping``) and ``K`` = ``num_terms``:
    ``x_K = α Σ_{k=0..K} (I - αA)^k v``, computed as the Richardson recursion
    ``x_0 = αv, x_{j+1} = x_j + α (v - A x_j)`` in a `lax.scan` of length K (K HVPs).
    ``lambda_max``/``lambda_min`` are eigenvalue estimates OF ``A`` (so ``lambda_min`` is DESIGN's
    ``λ_min + μ``), from Lanczos through ``hvp_fn`` (``num_lanczos_iters`` HVPs) unless
    ``spectrum`` is given; ``alpha=None`` uses ``α = 1/lambda_max``. Certificate, with
    ``ρ = max(|1 - α lambda_min|, |1 - α lambda_max|)``:
      - ``valid``: ``lambda_min > 0`` and ``ρ < 1`` (i.e. ``0 < α < 2/lambda_max``); the series
        diverges along any direction where it fails (e.g. negative curvature beyond ``μ``);
      - ``bound``: a-priori ``‖x_K - A^{-1}v‖ <= α ρ^{K+1}/(1 - ρ) ‖v‖``, inf when not valid;
      - ``residual_norm``: ``‖v - A x_K‖``, exact (one more HVP);
      - ``posterior_bound``: ``residual_norm / lambda_min`` (since ``x_K - A^{-1}v = -A^{-1}r``),
        inf when ``lambda_min <= 0``.
    Caveat: both bounds use the estimated extremes. Lanczos estimates lie inside the true spectrum,
    so they can understate ``ρ`` (and overstate ``lambda_min``) until they converge; they are exact
    once ``num_lanczos_iters`` reaches the dimension and near exact for well-separated extremes.
    Pass a known ``spectrum`` or more ``num_lanczos_iters`` where the bound must be rigorous.

    With ``tol``, K is the smallest ``K <= num_terms`` whose a-priori bound is ``<= tol`` (else
    ``num_terms``); the scan keeps its length and skips the steps beyond K, so it stays jit-able
    with a traced ``tol``.

    One `lax.scan` of ``num_lanczos_iters + num_terms + 1`` steps makes every product (Lanczos, the
    Richardson terms, the residual) through ONE call of ``hvp_fn``, so its graph is compiled once.

    Args:
      hvp_fn: ``u -> H u``, pytree to pytree, symmetric (e.g. `curvature.linearized_hvp`).
      v: right-hand side, a pytree of float arrays.
      alpha: step ``α`` (``[]`` float), or None for ``1 / lambda_max``.
      num_terms: K, the highest power of the series (static int >= 0); K + 1 terms, K HVPs.
      damping: ``μ >= 0``, ``[]`` float.
      tol: optional ``[]`` float tolerance on the a-priori bound (early stop, masked).
      key: PRNG key for the Lanczos start vector; None uses ``PRNGKey(0)``.
      num_lanczos_iters: Lanczos iterations for the spectrum estimate (static).
      spectrum: optional known ``(lambda_min, lambda_max)`` of ``A``; skips the Lanczos HVPs.
      floor_curvature: raise ``μ`` by the negative curvature (above); static bool.
      has_aux: ``hvp_fn`` returns ``(H u, aux)``; the ``aux`` of the residual's product (at the
        returned ``x``) is returned too.

    Returns:
      ``(x, certificate)``, or ``(x, certificate, aux)`` with ``has_aux``: ``x`` a pytree like
      ``v``; ``certificate`` a dict of ``[]`` arrays ``bound``, ``residual_norm``,
      ``posterior_bound``, ``valid`` (bool), ``num_terms_used`` (int32), ``lambda_max``,
      ``lambda_min``, ``alpha``, ``rho``, ``damping`` (the ``μ`` used).

    Reference: DESIGN.md §3.4; Lorraine, Vicol & Duvenaud (2020), "Optimizing millions of
    hyperparameters by implicit differentiation".
    """

    damping = jnp.asarray(damping)
    flat_v, unravel = ravel_pytree(v)
    # The carry keeps v's dtypes: the HVP's tangents must match the params' dtypes.
    cast = lambda tree: _cast_like(tree, v)

    def product(u):
        out = hvp_fn(u)
        return out if has_aux else (out, None)

    if spectrum is None:
        key = jax.random.PRNGKey(0) if key is None else key
        v0 = jax.random.normal(key, flat_v.shape, jnp.promote_types(flat_v.dtype, jnp.float32))
        lanczos = lanczos_init(v0, num_iters=num_lanczos_iters)
        num_lanczos = lanczos.alphas.shape[0]
        spec = _spectrum(*ritz_extremes(lanczos), damping=damping, alpha=alpha, v=v, tol=tol,
                         num_terms=num_terms, floor_curvature=floor_curvature)
    else:
        lanczos, num_lanczos = None, 0
        lam_min, lam_max = (jnp.asarray(s) for s in spectrum)
        spec = _spectrum(lam_max, lam_min, damping=damping, alpha=alpha, v=v, tol=tol,
                         num_terms=num_terms, floor_curvature=floor_curvature)

    def lanczos_phase(i, lanczos, hu):
        av = ravel_pytree(hu)[0] + damping * lanczos.v
        lanczos = lanczos_update(lanczos, i, av)
        # Only the last iteration's spectrum is used: the Neumann steps all come after it.
        return lanczos, _spectrum(*ritz_extremes(lanczos), damping=damping, alpha=alpha, v=v,
                                  tol=tol, num_terms=num_terms, floor_curvature=floor_curvature)

    def neumann_phase(j, x, hu, spec):
        # Richardson: x <- x + α (v - A x) for the first k_used terms; the step after them only
        # measures the residual, with the same product.
        r = optax.tree.sub(v, optax.tree.add_scale(hu, spec.damping, x))
        x_next = cast(optax.tree.add_scale(x, spec.alpha, r))
        x = jax.tree.map(lambda a, b: jnp.where(j < spec.k_used, a, b), x_next, x)
        return x, optax.tree.norm(r)

    def solver_step(carry, i):
        """Step ``i`` of ``num_lanczos + num_terms + 1``: one product, then the phase's update."""
        def run(carry):
            lanczos, spec, x, residual_norm, aux = carry
            if lanczos is None:
                hu, aux = product(x)
                x, residual_norm = neumann_phase(i, x, hu, spec)
                return lanczos, spec, x, residual_norm, aux
            in_lanczos = i < num_lanczos
            # x_0 = α v, with the α that the finished Lanczos phase gave.
            x = jax.tree.map(lambda a, b: jnp.where(i == num_lanczos, a, b),
                             cast(optax.tree.scale(spec.alpha, v)), x)
            u = jax.tree.map(lambda a, b: jnp.where(in_lanczos, a, b),
                             cast(unravel(lanczos.v.astype(flat_v.dtype))), x)
            hu, aux = product(u)
            lanczos, spec = lax.cond(in_lanczos, lambda: lanczos_phase(i, lanczos, hu),
                                     lambda: (lanczos, spec))
            x, residual_norm = lax.cond(
                in_lanczos, lambda: (x, residual_norm),
                lambda: neumann_phase(i - num_lanczos, x, hu, spec))
            return lanczos, spec, x, residual_norm, aux
        if tol is None:
            return run(carry), None
        # cond, not where: the skipped steps cost no HVP outside vmap.
        active = (i < num_lanczos) | (i - num_lanczos <= carry[1].k_used)
        return lax.cond(active, run, lambda c: c, carry), None

    aux0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(product, v)[1])
    init = (lanczos, spec, cast(optax.tree.scale(spec.alpha, v)),
            jnp.zeros([], spec.rho.dtype), aux0)
    (_, spec, x, residual_norm, aux), _ = lax.scan(
        solver_step, init, jnp.arange(num_lanczos + num_terms + 1))
    certificate = {
        "bound": spec.bound,
        "residual_norm": residual_norm,
        "posterior_bound": jnp.where(spec.lam_min > 0, residual_norm / spec.lam_min, jnp.inf),
        "valid": spec.valid,
        "num_terms_used": spec.k_used,
        "lambda_max": spec.lam_max,
        "lambda_min": spec.lam_min,
        "alpha": spec.alpha,
        "rho": spec.rho,
        "damping": spec.damping,
    }
    return (x, certificate, aux) if has_aux else (x, certificate)


class _Spectrum(NamedTuple):
    """The Neumann solve's constants, from the spectrum estimate of ``A = H + μI``."""

    lam_max: jax.Array
    lam_min: jax.Array
    damping: jax.Array
    alpha: jax.Array
    rho: jax.Array
    valid: jax.Array
    k_used: jax.Array
    bound: jax.Array


def _spectrum(lam_max, lam_min, *, damping, alpha, v, tol, num_terms, floor_curvature):
    """`_Spectrum` from the extreme eigenvalue estimates of ``A = H + μI`` (``μ`` = damping)."""
    if floor_curvature:
        # lam_min - damping is λ_min(H): shift the whole spectrum up by its negative part.
        shift = jnp.maximum(0.0, damping - lam_min)
        damping, lam_min, lam_max = damping + shift, lam_min + shift, lam_max + shift
    alpha = 1.0 / lam_max if alpha is None else jnp.asarray(alpha)
    rho = jnp.maximum(jnp.abs(1.0 - alpha * lam_min), jnp.abs(1.0 - alpha * lam_max))
    valid = (lam_min > 0) & (rho < 1)
    bound_at = lambda k: _a_priori_bound(k, alpha=alpha, rho=rho, v_norm=optax.tree.norm(v),
                                         valid=valid)
    if tol is None:
        k_used = jnp.asarray(num_terms, jnp.int32)
    else:
        # Evaluating the formula at every K avoids log/ceil round-off at the boundary.
        ok = bound_at(jnp.arange(num_terms + 1)) <= tol
        k_used = jnp.where(jnp.any(ok), jnp.argmax(ok), num_terms).astype(jnp.int32)
    dtype = jnp.result_type(lam_max, lam_min, alpha)
    return _Spectrum(*(jnp.asarray(a, dtype) for a in (lam_max, lam_min, damping, alpha, rho)),
                     valid, k_used, jnp.asarray(bound_at(k_used), dtype))


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
    num_lanczos_iters: int = 20,
    spectrum: tuple[jax.typing.ArrayLike, jax.typing.ArrayLike] | None = None,
    floor_curvature: bool = False,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """IFT hypergradient ``dL_out/dφ = -(∂²L_in/∂φ∂θ) (H + μI)^{-1} ∇θ L_out``.

    ``H = ∇²_θ L_in(θ, φ)`` through HVPs of one linearisation of the joint gradient
    ``∇_(θ,φ) L_in`` at ``(params, meta)``; ``x ≈ (H + μI)^{-1} ∇θ L_out`` by
    `neumann_inverse_hvp`; the mixed term ``(∂²L_in/∂φ∂θ) x`` is the φ part of the product that
    measures the residual at ``x`` (no second-order graph of its own). Exact at an inner optimum
    (``∇θ L_in = 0``) as ``K -> ∞`` and ``μ -> 0``; the trainer uses it at the current iterate.

    Args:
      inner_loss: ``(params, meta) -> [] float``, the training loss ``L_in(θ, φ)``.
      outer_loss: ``params -> [] float``, the validation loss ``L_out(θ)``.
      params: ``θ``, a pytree of float arrays.
      meta: ``φ``, a pytree of float arrays (continuous meta-parameters).
      alpha, num_terms, damping, tol, key, num_lanczos_iters, spectrum, floor_curvature: as in
        `neumann_inverse_hvp`.

    Returns:
      ``(hypergrad, certificate)``: ``hypergrad`` a pytree like ``meta``; ``certificate`` the
      `neumann_inverse_hvp` certificate for ``x``.

    Reference: DESIGN.md §3.4; Lorraine, Vicol & Duvenaud (2020).
    """
    outer_grad = jax.grad(outer_loss)(params)
    # One linearisation of the joint gradient in (θ, φ): its product with (u, 0) is
    # (H u, ∂²L/∂φ∂θ u), so the residual's product at x also gives the mixed term.
    _, joint_hvp = jax.linearize(jax.grad(inner_loss, argnums=(0, 1)), params, meta)
    no_meta = optax.tree.zeros_like(meta)
    x, certificate, mixed = neumann_inverse_hvp(
        lambda u: joint_hvp(u, no_meta),
        outer_grad,
        alpha=alpha,
        num_terms=num_terms,
        damping=damping,
        tol=tol,
        key=key,
        num_lanczos_iters=num_lanczos_iters,
        spectrum=spectrum,
        floor_curvature=floor_curvature,
        has_aux=True,
    )
    hypergrad = optax.tree.scale(-1.0, jax.lax.stop_gradient(mixed))
    return hypergrad, certificate
