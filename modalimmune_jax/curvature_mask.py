"""Curvature-aware masking of the destructive gradient, and the split that produces it.

DESIGN.md §3.3. The destructive gradient (of the collapse and regularizer terms) and the total
gradient come from one `jax.vjp` with two cotangents (`split_gradients_joint`); `curvature_mask`
is an `optax.GradientTransformationExtraArgs` that damps the destructive part where the loss
curvature ``|diag H|`` is high, first in the trainer's chain:
``optax.chain(curvature_mask(...), optax.clip_by_global_norm(...), optax.adamw(...))``.

The damped set and the soft scale hang on a quantile and a median of ``|diag H|`` over every
parameter. Both change only when the curvature estimate is refreshed, so given a `CurvatureEMA`
the transform recomputes the per-entry scale only when the EMA's ``count`` moves and keeps it in
its state. The order statistics are found by bisection on the floats' bit patterns (a few dozen
fused counting passes) rather than by sorting: XLA:CPU's sort of 59k floats took ~18 ms, longer
than the rest of the ModalImmune step together (issue 15).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from modalimmune_jax.curvature import CurvatureEMA

PyTree = Any


# ----------------------------------------------------------------------------------------------
# Two gradients from one backward structure.


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
    total_loss_fn: Callable[[PyTree], jax.Array],
    destructive_loss_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
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
# Exact order statistics without a sort.


def _order_statistic(x: jax.Array, k: int) -> jax.Array:
    """The ``k``-th smallest (0-based) entry of ``x`` ``[n]`` (non-negative floats), exactly.

    For non-negative IEEE floats the order of the values is the order of their bit patterns read
    as integers, so bisection over the integers finds the smallest pattern ``t`` with
    ``#{x <= t} > k`` in as many steps as the float has bits (each one fused compare-and-count
    over ``x``). ``+inf`` is the top pattern; NaNs (above it) are handled by the caller.
    """
    itype = {4: jnp.int32, 8: jnp.int64}[x.dtype.itemsize]
    bits = lax.bitcast_convert_type(x, itype)
    top = lax.bitcast_convert_type(jnp.asarray(jnp.inf, x.dtype), itype)

    def bisect(_, bounds):
        lo, hi = bounds  # #{bits <= lo} <= k < #{bits <= hi}
        mid = lo + (hi - lo) // 2
        above = jnp.sum(bits <= mid, dtype=jnp.int32) > k
        return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

    _, hi = lax.fori_loop(0, 8 * x.dtype.itemsize, bisect, (jnp.asarray(-1, itype), top))
    return lax.bitcast_convert_type(hi, x.dtype)


def _next_order_statistic(x: jax.Array, value: jax.Array, k: int) -> jax.Array:
    """The ``(k + 1)``-th smallest entry given the ``k``-th, ``value``: one pass, no bisection."""
    tied = jnp.sum(x <= value, dtype=jnp.int32) > k + 1
    return jnp.where(tied, value, jnp.min(jnp.where(x > value, x, jnp.inf)))


def _quantile(x: jax.Array, q: float, *, midpoint: bool = False) -> jax.Array:
    """``jnp.quantile(x, q)`` (linear interpolation; ``midpoint`` for ``jnp.median``), no sort.

    The order statistics are exact and the interpolation repeats jnp's arithmetic (the position
    ``q (n - 1)`` in x's dtype, then ``lo (1 - w) + hi w``), so the value is jnp's up to the
    rounding of that last step (a fused multiply-add may differ by an ulp). NaN if any entry is.
    """
    n = x.shape[0]
    pos = np.asarray(q, x.dtype) * np.asarray(n - 1, x.dtype)
    low, high = int(np.floor(pos)), int(np.ceil(pos))
    lo_value = _order_statistic(x, low)
    hi_value = lo_value if high == low else _next_order_statistic(x, lo_value, low)
    if midpoint:
        value = (lo_value + hi_value) * np.asarray(0.5, x.dtype)
    else:
        w = pos - np.floor(pos)
        value = lo_value * (np.asarray(1, x.dtype) - w) + hi_value * w
    return jnp.where(jnp.any(jnp.isnan(x)), jnp.nan, value).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# The masking transform.


class CurvatureMaskState(NamedTuple):
    """`curvature_mask` state.

    ``count`` ``[] int32`` updates so far; ``fraction_masked`` ``[] float32`` share of damped
    entries (for logging); ``scale`` the per-entry scale of the destructive part, a pytree like
    params (float32 at least); ``curvature_count`` ``[] int32``, the ``count`` of the
    `CurvatureEMA` that ``scale`` was computed from (-1: none yet).
    """

    count: jax.Array
    fraction_masked: jax.Array
    scale: PyTree
    curvature_count: jax.Array


def _float_abs(x):
    return jnp.abs(x).astype(jnp.promote_types(x.dtype, jnp.float32))


def _scales(abs_h, *, quantile, mode, beta):
    """Per-entry scale of the destructive part, and whether the entry is damped (same shapes)."""
    flat = jnp.concatenate([h.ravel() for h in abs_h])
    if quantile is None:
        damped = [jnp.ones(h.shape, bool) for h in abs_h]
    else:
        # Strictly above: an all-zero curvature (a fresh EMA) damps nothing.
        threshold = _quantile(flat, quantile)
        damped = [h > threshold for h in abs_h]
    if mode == "hard":
        scales = [jnp.where(d, 0.0, 1.0).astype(h.dtype)
                  for d, h in zip(damped, abs_h, strict=True)]
        return scales, damped
    # A zero median (mostly flat directions) would divide by zero; any curvature is then "large".
    median = jnp.maximum(_quantile(flat, 0.5, midpoint=True), jnp.finfo(jnp.float32).tiny)
    scales = [jnp.where(d, 1.0 / (1.0 + beta * h / median), 1.0)
              for d, h in zip(damped, abs_h, strict=True)]
    return scales, damped


def _scale_tree(curvature, *, quantile, mode, beta, per_leaf):
    """``(scale, fraction_masked)`` for a curvature pytree: scale like it, fraction ``[]`` f32."""
    leaves, treedef = jax.tree.flatten(curvature)
    abs_h = [_float_abs(x) for x in leaves]
    if per_leaf:
        per = [_scales([h], quantile=quantile, mode=mode, beta=beta) for h in abs_h]
        scales, damped = [s[0] for s, _ in per], [d[0] for _, d in per]
    else:
        scales, damped = _scales(abs_h, quantile=quantile, mode=mode, beta=beta)
    num_damped = sum(jnp.sum(d) for d in damped)
    fraction = (num_damped / sum(d.size for d in damped)).astype(jnp.float32)
    return jax.tree.unflatten(treedef, scales), fraction


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
    from them (DESIGN.md §3.3). Given a `CurvatureEMA`, ``s`` is recomputed only when its ``count``
    differs from the one the state's ``scale`` came from (a `lax.cond`; the trainer refreshes the
    EMA every ``curv_every`` steps); given a plain pytree, on every call.

    Args:
      quantile: in [0, 1], or None to damp every entry (soft mode over all entries).
      mode: ``"hard"`` or ``"soft"``.
      beta: softness strength (soft mode only), >= 0.
      per_leaf: take the quantile and median per leaf instead of over the whole pytree.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose ``update(updates, state, params=None, *,
      curvature, destructive)`` requires ``curvature`` (a `CurvatureEMA`, or a pytree like params
      such as its ``diag``) and ``destructive`` (pytree like updates); state is
      `CurvatureMaskState`. Chain it first: ``optax.chain(curvature_mask(...), optax.adamw(lr))``.
    """
    if mode not in ("hard", "soft"):
        raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")
    if quantile is not None and not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1] or None, got {quantile}")
    scale_tree = lambda h: _scale_tree(h, quantile=quantile, mode=mode, beta=beta,
                                       per_leaf=per_leaf)

    def init_fn(params):
        scale = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
                             params)
        return CurvatureMaskState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32), scale,
                                  jnp.full([], -1, jnp.int32))

    def update_fn(updates, state, params=None, *, curvature, destructive, **extra_args):
        del params, extra_args
        if curvature is None or destructive is None:
            raise TypeError("curvature_mask.update needs curvature=<pytree>, destructive=<pytree>")
        if isinstance(curvature, CurvatureEMA):
            scale, fraction = lax.cond(
                curvature.count != state.curvature_count,
                lambda: scale_tree(curvature.diag),
                lambda: (state.scale, state.fraction_masked))
            curvature_count = curvature.count.astype(jnp.int32)
        else:
            (scale, fraction), curvature_count = scale_tree(curvature), state.curvature_count
        # u - (1 - s) d: exactly u wherever s == 1 or d == 0.
        new_updates = jax.tree.map(
            lambda u, d, s: (u - (1.0 - s) * d).astype(u.dtype), updates, destructive, scale
        )
        return new_updates, CurvatureMaskState(optax.safe_int32_increment(state.count), fraction,
                                               scale, curvature_count)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
