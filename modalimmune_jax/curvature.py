"""Curvature of the training loss: HVPs, diagonal estimates, extreme eigenvalues, gradient masking.

DESIGN.md §3.3. Everything works on plain params pytrees and uses the TRUE Hessian through
forward-over-reverse HVPs (never a Fisher/GGN matrix), so negative curvature shows. Loops are
`lax.scan`/`fori_loop`, so compile time does not grow with the number of probes or iterations.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

PyTree = Any
LossFn = Callable[[PyTree], jax.Array]
HvpFn = Callable[[PyTree], PyTree]

_HIGHEST = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Hessian-vector products.


def hvp(f: LossFn, params: PyTree, v: PyTree) -> PyTree:
    """Hessian-vector product of a scalar loss, forward-over-reverse.

    ``H v = d/dt ∇f(params + t v) |_{t=0}``, one `jax.jvp` of `jax.grad(f)`. DESIGN.md §3.3 targets
    at most 2x a gradient; `experiments/bench_hvp.py` measures ~2.2-2.4x on CPU for a tanh MLP, and
    ~1.5-1.8x for products from `linearized_hvp`.

    Args:
      f: scalar loss ``f(params) -> [] float``, closing over the batch.
      params: any pytree of float arrays.
      v: a pytree with the structure, shapes and dtypes of ``params``.

    Returns:
      ``H v``, a pytree like ``params``.
    """
    return jax.jvp(jax.grad(f), (params,), (v,))[1]


def linearized_hvp(f: LossFn, params: PyTree) -> HvpFn:
    """Returns ``v -> H v`` at fixed ``params``, linearising ``∇f`` once.

    `jax.linearize` runs the forward and backward pass of ``∇f`` once and keeps its residuals, so
    each later product only pays for the tangent (jvp) part. Use it when many HVPs share one point
    (Hutchinson probes, Lanczos, Neumann terms); it holds the residuals in memory meanwhile.

    Args:
      f: scalar loss ``f(params) -> [] float``.
      params: any pytree of float arrays.

    Returns:
      A linear function mapping a pytree like ``params`` to ``H v``, a pytree like ``params``.
    """
    _, hvp_fn = jax.linearize(jax.grad(f), params)
    return hvp_fn




def hutchinson_diagonal(f: LossFn, params: PyTree, rng: jax.Array, num_samples: int) -> PyTree:
    """Hutchinson estimate of the Hessian diagonal with Rademacher probes.

    ``diag(H) ≈ (1/n) Σ_k v_k ⊙ H v_k`` with ``v_k ∈ {-1, +1}^P``. It is unbiased, with per-entry
    variance ``Σ_{j≠i} H_ij² / n``, and exact for any ``n`` when ``H`` is diagonal. The probes run
    in a `lax.scan` over one linearisation of ``∇f``.

    Args:
      f: scalar loss ``f(params) -> [] float``.
      params: any pytree of float arrays (P entries in all).
      rng: a PRNG key.
      num_samples: ``n``, the number of probes (static int >= 1).

    Returns:
      The estimated diagonal, a pytree like ``params`` (same shapes and dtypes).

    Reference: DESIGN.md §3.3; Hutchinson (1990); Bekas, Kokiopoulou & Saad (2007).
    """
    hvp_fn = linearized_hvp(f, params)
    flat, unravel = ravel_pytree(params)

    def probe_step(acc, key):
        # One draw over the raveled params, not one per leaf: RNG kernels are slow to compile.
        v = unravel(jax.random.rademacher(key, flat.shape, flat.dtype))
        return optax.tree.add(acc, optax.tree.mul(v, hvp_fn(v))), None

    keys = jax.random.split(rng, num_samples)
    total, _ = lax.scan(probe_step, optax.tree.zeros_like(params), keys)
    return optax.tree.scale(1.0 / num_samples, total)


# ----------------------------------------------------------------------------------------------
# Extreme eigenvalues (Lanczos with full reorthogonalisation).


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
    restriction of ``A`` (block tridiagonal).

    Args:
      matvec: ``x -> A x`` for a symmetric ``A``, ``[n] -> [n]``.
      v0: ``[n]`` float, the start vector (any nonzero vector).
      num_iters: number of iterations, static; clipped to ``n`` (after ``n`` the basis is complete).

    Returns:
      ``(alphas, betas)``: ``[m]`` diagonal and ``[m - 1]`` off-diagonal of ``T``, ``m =
      min(num_iters, n)``, in the dtype of ``v0`` promoted to at least float32.
    """
    v0 = jnp.asarray(v0)
    dtype = jnp.promote_types(v0.dtype, jnp.float32)
    n = v0.shape[0]
    m = max(1, min(int(num_iters), n))
    eps = jnp.finfo(dtype).eps

    def orthogonalize(basis, w, passes):
        # Rows of `basis` not yet filled are zero and contribute nothing. HIGHEST: no TF32 on GPUs.
        for _ in range(passes):
            coeffs = jnp.matmul(basis, w, precision=_HIGHEST)
            w = w - jnp.matmul(basis.T, coeffs, precision=_HIGHEST)
        return w

    def lanczos_step(i, carry):
        basis, alphas, betas, v, v_prev, beta_prev = carry
        basis = basis.at[i].set(v)
        av = matvec(v).astype(dtype)
        alpha = jnp.vdot(v, av, precision=_HIGHEST)
        # The recurrence removes the large components, so one pass over V (the memory-bound part,
        # m·n per pass) restores orthogonality to working precision.
        w = orthogonalize(basis, av - alpha * v - beta_prev * v_prev, passes=1)
        beta = jnp.linalg.norm(w)
        # Exact (or round-off level) invariance: w / beta would be 0/0 or pure noise.
        breakdown = beta <= 10 * eps * jnp.linalg.norm(av)

        def restart(_):
            # The coordinate axis least inside span(V): Σ_j ‖P_V e_j‖² = dim V < n, so it keeps
            # a component of squared norm >= 1/n outside. Deterministic and RNG-free (RNG kernels
            # are slow to compile inside loops).
            e = jax.nn.one_hot(jnp.argmin(jnp.sum(basis**2, axis=0)), n, dtype=dtype)
            r = orthogonalize(basis, e, passes=2)  # twice is enough (Giraud et al. 2005)
            return r / jnp.maximum(jnp.linalg.norm(r), jnp.finfo(dtype).tiny)

        v_next = lax.cond(breakdown, restart, lambda _: w / beta, None)
        beta = jnp.where(breakdown, jnp.zeros_like(beta), beta)
        return basis, alphas.at[i].set(alpha), betas.at[i].set(beta), v_next, v, beta

    v = v0.astype(dtype) / jnp.linalg.norm(v0.astype(dtype))
    zeros = jnp.zeros((m,), dtype)
    init = (jnp.zeros((m, n), dtype), zeros, zeros, v, jnp.zeros_like(v), jnp.zeros([], dtype))
    _, alphas, betas, *_ = lax.fori_loop(0, m, lanczos_step, init)
    return alphas, betas[:-1]


def extreme_eigenvalues_from_hvp(
    hvp_fn: HvpFn, example: PyTree, *, key: jax.Array, iters: int
) -> tuple[jax.Array, jax.Array]:
    """Largest and smallest eigenvalue of a symmetric operator given as a pytree matvec.

    Lanczos (`lanczos_tridiagonal`) on the raveled operator ``x -> ravel(hvp_fn(unravel(x)))``,
    then ``eigvalsh`` of the ``iters x iters`` tridiagonal matrix. The estimates lie inside the
    true spectrum (``lam_max <= λ_max``, ``lam_min >= λ_min``) and are exact once ``iters`` reaches
    the dimension; for well-separated extremes a few tens of iterations suffice. The spectral
    radius is ``max(|lam_max|, |lam_min|)``.

    Args:
      hvp_fn: ``v -> H v``, pytree to pytree, linear and symmetric.
      example: a pytree with the structure, shapes and dtypes of the operator's input (its values
        are not used).
      key: PRNG key for the random start vector.
      iters: number of Lanczos iterations (static; clipped to the dimension). Costs ``iters``
        HVPs plus ``O(iters² · P)`` for reorthogonalisation, and ``iters · P`` floats of memory.

    Returns:
      ``(lam_max, lam_min)``: algebraic largest and smallest eigenvalue estimates, ``[]`` float
      (at least float32).

    Reference: DESIGN.md §3.3; Golub & Van Loan, Matrix Computations, §10.1.
    """
    flat, unravel = ravel_pytree(example)

    def flat_matvec(x):
        return ravel_pytree(hvp_fn(unravel(x.astype(flat.dtype))))[0]

    v0 = jax.random.normal(key, flat.shape, jnp.promote_types(flat.dtype, jnp.float32))
    alphas, betas = lanczos_tridiagonal(flat_matvec, v0, num_iters=iters)
    tridiag = jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
    ritz = jnp.linalg.eigvalsh(tridiag)
    return ritz[-1], ritz[0]


def extreme_eigenvalues(
    f: LossFn, params: PyTree, rng: jax.Array, iters: int
) -> tuple[jax.Array, jax.Array]:
    """Largest and smallest eigenvalue of the Hessian of a scalar loss (true Hessian, via HVPs).

    `extreme_eigenvalues_from_hvp` over one linearisation of ``∇f`` at ``params``. ``lam_max`` is
    the algebraic largest eigenvalue (the Neumann step is ``α = 1/lam_max``, DESIGN.md §3.4);
    ``lam_min`` is negative wherever the loss has negative curvature.

    Args:
      f: scalar loss ``f(params) -> [] float``.
      params: any pytree of float arrays.
      rng: PRNG key.
      iters: number of Lanczos iterations (static).

    Returns:
      ``(lam_max, lam_min)``, ``[]`` float each.
    """
    return extreme_eigenvalues_from_hvp(linearized_hvp(f, params), params, key=rng, iters=iters)


# ----------------------------------------------------------------------------------------------
# Curvature EMA and gradient splitting (the pure pieces the trainer composes).


class CurvatureEMA(NamedTuple):
    """EMA of the Hessian diagonal: ``diag`` like params, ``count`` [] int32 updates so far."""

    diag: PyTree
    count: jax.Array


def init_curvature_ema(params: PyTree) -> CurvatureEMA:
    """Zero curvature EMA shaped like ``params`` (``count`` = 0).

    Args:
      params: any pytree of float arrays.

    Returns:
      `CurvatureEMA` with ``diag`` zeros like ``params`` and ``count`` ``[] int32``.
    """
    return CurvatureEMA(optax.tree.zeros_like(params), jnp.zeros([], jnp.int32))


def update_curvature_ema(ema: CurvatureEMA, new_diag: PyTree, *, decay: float) -> CurvatureEMA:
    """One EMA update of the (signed) Hessian-diagonal estimate.

    ``diag <- new_diag`` on the first update (``count == 0``), so there is no zero-initialisation
    bias, then ``diag <- decay · diag + (1 - decay) · new_diag``. The signed diagonal is averaged
    (Hutchinson is unbiased, so noise cancels); `curvature_mask` takes ``|·|`` of it. Refreshing
    every ``curv_every`` steps under `lax.cond` is the trainer's job (DESIGN.md §3.3).

    Args:
      ema: the current `CurvatureEMA`.
      new_diag: a fresh estimate, pytree like ``ema.diag``.
      decay: EMA decay in [0, 1).

    Returns:
      The updated `CurvatureEMA` (same structure, shapes and dtypes).
    """
    first = ema.count == 0
    diag = jax.tree.map(
        lambda old, new: jnp.where(first, new, decay * old + (1.0 - decay) * new).astype(old.dtype),
        ema.diag,
        new_diag,
    )
    return CurvatureEMA(diag, optax.safe_int32_increment(ema.count))


def split_gradients_joint(
    losses_fn: Callable[[PyTree], Any], params: PyTree, *, has_aux: bool = False
) -> tuple:
    """Gradients of a total and a destructive loss from one forward pass and one `jax.vjp`.

    ``losses_fn(params) -> (total, destructive)`` (or ``((total, destructive), aux)`` with
    ``has_aux``) shares its forward pass. The vjp of ``params -> [total, destructive]`` is applied
    to the cotangents ``[1, 0]`` and ``[0, 1]`` under `jax.vmap`, so both gradients come from one
    backward structure (DESIGN.md §3.3), not two backward passes.

    Args:
      losses_fn: ``params -> (total [] float, destructive [] float)`` (plus aux if ``has_aux``).
      params: any pytree of float arrays.
      has_aux: whether ``losses_fn`` also returns auxiliary data.

    Returns:
      ``(total, destructive, g_total, g_destructive)`` (plus ``aux`` if ``has_aux``): the two
      ``[]`` losses and their gradients, pytrees like ``params``.
    """

    def stacked(p):
        out = losses_fn(p)
        (total, destructive), aux = out if has_aux else (out, None)
        return jnp.stack([total, destructive]), aux

    values, vjp_fn, aux = jax.vjp(stacked, params, has_aux=True)
    (grads,) = jax.vmap(vjp_fn)(jnp.eye(2, dtype=values.dtype))  # leaves [2, *param_shape]
    g_total = jax.tree.map(lambda g: g[0], grads)
    g_destructive = jax.tree.map(lambda g: g[1], grads)
    result = (values[0], values[1], g_total, g_destructive)
    return (*result, aux) if has_aux else result


def split_gradients(
    total_loss_fn: LossFn, destructive_loss_fn: LossFn, params: PyTree
) -> tuple[jax.Array, jax.Array, PyTree, PyTree]:
    """Total and destructive gradients from one `jax.vjp` with two cotangents.

    See `split_gradients_joint`, which also lets the two losses share a forward pass.

    Args:
      total_loss_fn: ``params -> [] float``, the full training loss.
      destructive_loss_fn: ``params -> [] float``, its destructive part (collapse and regularizer
        terms, DESIGN.md §3.3).
      params: any pytree of float arrays.

    Returns:
      ``(total_loss, destructive_loss, g_total, g_destructive)``.
    """
    return split_gradients_joint(lambda p: (total_loss_fn(p), destructive_loss_fn(p)), params)


# ----------------------------------------------------------------------------------------------
# The masking transform.


class CurvatureMaskState(NamedTuple):
    """`curvature_mask` state: ``count`` [] int32, ``fraction_masked`` [] float32 (for logging)."""

    count: jax.Array
    fraction_masked: jax.Array


def _abs_leaves(tree: PyTree) -> list[jax.Array]:
    leaves = jax.tree.leaves(tree)
    return [jnp.abs(x).astype(jnp.promote_types(x.dtype, jnp.float32)) for x in leaves]


def _scales(abs_h, *, quantile, mode, beta):
    """Per-entry scale of the destructive part, and whether the entry is damped (same shapes)."""
    flat = jnp.concatenate([h.ravel() for h in abs_h])
    if quantile is None:
        damped = [jnp.ones(h.shape, bool) for h in abs_h]
    else:
        # Strictly above: an all-zero curvature (a fresh EMA) damps nothing.
        threshold = jnp.quantile(flat, quantile)
        damped = [h > threshold for h in abs_h]
    if mode == "hard":
        return [jnp.where(d, 0.0, 1.0) for d in damped], damped
    # A zero median (mostly flat directions) would divide by zero; any curvature is then "large".
    median = jnp.maximum(jnp.median(flat), jnp.finfo(jnp.float32).tiny)
    scales = [jnp.where(d, 1.0 / (1.0 + beta * h / median), 1.0) for d, h in zip(damped, abs_h)]
    return scales, damped


def curvature_mask(
    *,
    quantile: float | None = 0.9,
    mode: str = "hard",
    beta: float = 1.0,
    per_leaf: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Damps the destructive part of the update where the loss curvature ``|diag H|`` is high.

    With ``u`` the total gradient, ``d`` its destructive part and ``h`` the curvature (both extras):
    ``u' = u - d + s ⊙ d``. The damped set ``S`` is ``{|h| > q}``, ``q`` the ``quantile`` of
    ``|h|`` over ALL parameters of the pytree (or over each leaf with ``per_leaf``), or every entry
    when ``quantile`` is None. Outside ``S``, ``s = 1``. Inside ``S``:
      - ``mode="hard"``: ``s = 0`` (the destructive part is removed);
      - ``mode="soft"``: ``s = 1 / (1 + beta · |h| / median|h|)``, the median over the same
        population as the quantile.
    High-curvature weights are the ones the task depends on, so the collapse gradient is kept away
    from them (DESIGN.md §3.3). The global quantile sorts all P entries (fine for our model sizes).

    Args:
      quantile: in [0, 1], or None to damp every entry (soft mode over all entries).
      mode: ``"hard"`` or ``"soft"``.
      beta: softness strength (soft mode only), >= 0.
      per_leaf: take the quantile and median per leaf instead of over the whole pytree.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose ``update(updates, state, params=None, *,
      curvature, destructive)`` requires ``curvature`` (pytree like params, e.g. a
      `CurvatureEMA`'s ``diag``) and ``destructive`` (pytree like updates); state is
      `CurvatureMaskState`. Chain it before the optimizer:
      ``optax.chain(curvature_mask(...), optax.adamw(lr))``.
    """
    if mode not in ("hard", "soft"):
        raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")
    if quantile is not None and not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1] or None, got {quantile}")

    def init_fn(params):
        del params
        return CurvatureMaskState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32))

    def update_fn(updates, state, params=None, *, curvature, destructive, **extra_args):
        del params, extra_args
        if curvature is None or destructive is None:
            raise TypeError("curvature_mask.update needs curvature=<pytree>, destructive=<pytree>")
        abs_h = _abs_leaves(curvature)
        if per_leaf:
            per = [_scales([h], quantile=quantile, mode=mode, beta=beta) for h in abs_h]
            scales, damped = [s[0] for s, _ in per], [d[0] for _, d in per]
        else:
            scales, damped = _scales(abs_h, quantile=quantile, mode=mode, beta=beta)
        scales = jax.tree.unflatten(jax.tree.structure(updates), scales)
        # u - (1 - s) d: exactly u wherever s == 1 or d == 0.
        new_updates = jax.tree.map(
            lambda u, d, s: (u - (1.0 - s) * d).astype(u.dtype), updates, destructive, scales
        )
        num_damped = sum(jnp.sum(d) for d in damped)
        fraction = (num_damped / sum(d.size for d in damped)).astype(jnp.float32)
        return new_updates, CurvatureMaskState(optax.safe_int32_increment(state.count), fraction)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
