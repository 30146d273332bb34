"""Extreme eigenvalues of a symmetric operator by Lanczos with full reorthogonalisation.

DESIGN.md §3.3 and §3.4: the Neumann step ``α = 1/λ_max`` and the certificate's validity
``λ_min + μ > 0`` come from here. The operator is any pytree matvec (an HVP), raveled to flat
vectors; the iterations are one `lax.fori_loop`, so compile time does not grow with their number.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from modalimmune_jax.hvp import linearized_hvp

PyTree = Any
LossFn = Callable[[PyTree], jax.Array]
HvpFn = Callable[[PyTree], PyTree]

_HIGHEST = lax.Precision.HIGHEST


class LanczosState(NamedTuple):
    """Lanczos on flat vectors after some iterations (`lanczos_init`, `lanczos_update`).

    ``basis`` ``[m, n]`` (rows filled so far; the rest zero), ``alphas`` and ``betas`` ``[m]``
    (the tridiagonal's diagonal and couplings so far), ``v`` ``[n]`` the next vector to multiply,
    ``v_prev`` ``[n]``, ``beta_prev`` ``[]``; all in the start vector's dtype promoted to at
    least float32.
    """

    basis: jax.Array
    alphas: jax.Array
    betas: jax.Array
    v: jax.Array
    v_prev: jax.Array
    beta_prev: jax.Array


def _orthogonalize(basis, w, passes):
    # Rows of `basis` not yet filled are zero and contribute nothing. HIGHEST: no TF32 on GPUs.
    for _ in range(passes):
        coeffs = jnp.matmul(basis, w, precision=_HIGHEST)
        w = w - jnp.matmul(basis.T, coeffs, precision=_HIGHEST)
    return w


def lanczos_init(v0: jax.typing.ArrayLike, *, num_iters: int) -> LanczosState:
    """The state before the first iteration: ``v`` = ``v0`` normalised, ``m = min(num_iters, n)``.

    Args:
      v0: ``[n]`` float, the start vector (any nonzero vector).
      num_iters: number of iterations to make room for, static; clipped to ``[1, n]``.

    Returns:
      `LanczosState` with ``basis`` ``[m, n]`` zeros.
    """
    v0 = jnp.asarray(v0)
    dtype = jnp.promote_types(v0.dtype, jnp.float32)
    n = v0.shape[0]
    m = max(1, min(int(num_iters), n))
    v = v0.astype(dtype) / jnp.linalg.norm(v0.astype(dtype))
    zeros = jnp.zeros((m,), dtype)
    return LanczosState(jnp.zeros((m, n), dtype), zeros, zeros, v, jnp.zeros_like(v),
                        jnp.zeros([], dtype))


def lanczos_update(state: LanczosState, i: jax.typing.ArrayLike, av: jax.Array) -> LanczosState:
    """Iteration ``i`` given ``av = A state.v`` (``[n]``): the recurrence, one reorthogonalisation
    pass, and a restart on breakdown (`lanczos_tridiagonal`). The caller makes the product, so a
    loop that makes other products too can share one call site of ``A``."""
    basis, alphas, betas, v, v_prev, beta_prev = state
    dtype, n = v.dtype, v.shape[0]
    eps = jnp.finfo(dtype).eps
    basis = basis.at[i].set(v)
    av = av.astype(dtype)
    alpha = jnp.vdot(v, av, precision=_HIGHEST)
    # The recurrence removes the large components, so one pass over V (the memory-bound part,
    # m·n per pass) restores orthogonality to working precision.
    w = _orthogonalize(basis, av - alpha * v - beta_prev * v_prev, passes=1)
    beta = jnp.linalg.norm(w)
    # Exact (or round-off level) invariance: w / beta would be 0/0 or pure noise.
    breakdown = beta <= 10 * eps * jnp.linalg.norm(av)

    def restart(_):
        # The coordinate axis least inside span(V): Σ_j ‖P_V e_j‖² = dim V < n, so it keeps
        # a component of squared norm >= 1/n outside. Deterministic and RNG-free (RNG kernels
        # are slow to compile inside loops).
        e = jax.nn.one_hot(jnp.argmin(jnp.sum(basis**2, axis=0)), n, dtype=dtype)
        r = _orthogonalize(basis, e, passes=2)  # twice is enough (Giraud et al. 2005)
        return r / jnp.maximum(jnp.linalg.norm(r), jnp.finfo(dtype).tiny)

    v_next = lax.cond(breakdown, restart, lambda _: w / beta, None)
    beta = jnp.where(breakdown, jnp.zeros_like(beta), beta)
    return LanczosState(basis, alphas.at[i].set(alpha), betas.at[i].set(beta), v_next, v, beta)


def ritz_extremes(state: LanczosState) -> tuple[jax.Array, jax.Array]:
    """``(lam_max, lam_min)``: the extreme eigenvalues of the ``m x m`` tridiagonal ``T``.

    Meaningful once all ``m`` iterations are done (unfilled rows would add zero eigenvalues).
    """
    alphas, betas = state.alphas, state.betas[:-1]
    ritz = jnp.linalg.eigvalsh(jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1))
    return ritz[-1], ritz[0]


def lanczos_tridiagonal(
    matvec: Callable[[jax.Array], jax.Array],
    v0: jax.typing.ArrayLike,
    *,
    num_iters: int,
) -> tuple[jax.Array, jax.Array]:
    """Lanczos tridiagonalisation of a symmetric operator on flat vectors.

    Builds an orthonormal Krylov basis ``V = [v_0 .. v_{m-1}]`` and ``T = Vᵀ A V`` tridiagonal, with
    full reorthogonalisation (the three-term recurrence, then one Gram-Schmidt pass against all of
    ``V``), so that ``eigvalsh(T)`` (the Ritz values) are free of the spurious copies that plain
    Lanczos produces in finite precision. The extreme
    Ritz values converge to the extreme eigenvalues of ``A`` from the inside, much faster than power
    iteration. On breakdown (the Krylov space is invariant) it restarts from the coordinate axis
    least represented in ``V``, orthogonalised, with a zero coupling, so ``T`` stays a valid
    restriction of ``A`` (block tridiagonal). A `lax.fori_loop` of `lanczos_update`.

    Args:
      matvec: ``x -> A x`` for a symmetric ``A``, ``[n] -> [n]``.
      v0: ``[n]`` float, the start vector (any nonzero vector).
      num_iters: number of iterations, static; clipped to ``n`` (after ``n`` the basis is complete).

    Returns:
      ``(alphas, betas)``: ``[m]`` diagonal and ``[m - 1]`` off-diagonal of ``T``, ``m =
      min(num_iters, n)``, in the dtype of ``v0`` promoted to at least float32.
    """
    state = lanczos_init(v0, num_iters=num_iters)

    def lanczos_step(i, state):
        return lanczos_update(state, i, matvec(state.v))

    state = lax.fori_loop(0, state.alphas.shape[0], lanczos_step, state)
    return state.alphas, state.betas[:-1]


def extreme_eigenvalues_from_hvp(
    hvp_fn: HvpFn, example: PyTree, *, key: jax.Array, num_iters: int
) -> tuple[jax.Array, jax.Array]:
    """Largest and smallest eigenvalue of a symmetric operator given as a pytree matvec.

    Lanczos (`lanczos_tridiagonal`) on the raveled operator ``x -> ravel(hvp_fn(unravel(x)))``,
    then ``eigvalsh`` of the ``num_iters x num_iters`` tridiagonal matrix. The estimates lie
    inside the true spectrum (``lam_max <= λ_max``, ``lam_min >= λ_min``) and are exact once
    ``num_iters`` reaches the dimension; for well-separated extremes a few tens of iterations
    suffice. The spectral radius is ``max(|lam_max|, |lam_min|)``.

    Args:
      hvp_fn: ``v -> H v``, pytree to pytree, linear and symmetric.
      example: a pytree with the structure, shapes and dtypes of the operator's input (its values
        are not used).
      key: PRNG key for the random start vector.
      num_iters: number of Lanczos iterations (static; clipped to the dimension). Costs
        ``num_iters`` HVPs plus ``O(num_iters² · P)`` for reorthogonalisation, and
        ``num_iters · P`` floats of memory.

    Returns:
      ``(lam_max, lam_min)``: algebraic largest and smallest eigenvalue estimates, ``[]`` float
      (at least float32).

    Reference: DESIGN.md §3.3; Golub & Van Loan, Matrix Computations, §10.1.
    """
    flat, unravel = ravel_pytree(example)

    def flat_matvec(x):
        return ravel_pytree(hvp_fn(unravel(x.astype(flat.dtype))))[0]

    v0 = jax.random.normal(key, flat.shape, jnp.promote_types(flat.dtype, jnp.float32))
    alphas, betas = lanczos_tridiagonal(flat_matvec, v0, num_iters=num_iters)
    tridiag = jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
    ritz = jnp.linalg.eigvalsh(tridiag)
    return ritz[-1], ritz[0]


def extreme_eigenvalues(
    f: LossFn, params: PyTree, key: jax.Array, num_iters: int
) -> tuple[jax.Array, jax.Array]:
    """Largest and smallest eigenvalue of the Hessian of a scalar loss (true Hessian, via HVPs).

    `extreme_eigenvalues_from_hvp` over one linearisation of ``∇f`` at ``params``. ``lam_max`` is
    the algebraic largest eigenvalue (the Neumann step is ``α = 1/lam_max``, DESIGN.md §3.4);
    ``lam_min`` is negative wherever the loss has negative curvature.

    Args:
      f: scalar loss ``f(params) -> [] float``.
      params: any pytree of float arrays.
      key: PRNG key.
      num_iters: number of Lanczos iterations (static).

    Returns:
      ``(lam_max, lam_min)``, ``[]`` float each.
    """
    return extreme_eigenvalues_from_hvp(linearized_hvp(f, params), params, key=key,
                                        num_iters=num_iters)
