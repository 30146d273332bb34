"""The curvature estimate of the training loss: Hutchinson's Hessian diagonal and its EMA.

DESIGN.md §3.3. The estimate uses the TRUE Hessian through forward-over-reverse HVPs (never a
Fisher/GGN matrix), so negative curvature shows; the probes run in one `lax.scan`, so compile time
does not grow with their number. The trainer refreshes it every ``curv_every`` steps into an EMA,
which `curvature_mask.curvature_mask` reads. The HVPs live in `hvp`, the extreme eigenvalues in
`lanczos`; both are re-exported here for older imports.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from modalimmune_jax.hvp import hvp, linearized_hvp
from modalimmune_jax.lanczos import (
    extreme_eigenvalues,
    extreme_eigenvalues_from_hvp,
    lanczos_tridiagonal,
)

__all__ = [
    "CurvatureEMA",
    "extreme_eigenvalues",
    "extreme_eigenvalues_from_hvp",
    "hutchinson_diagonal",
    "hvp",
    "init_curvature_ema",
    "lanczos_tridiagonal",
    "linearized_hvp",
    "update_curvature_ema",
]

PyTree = Any
LossFn = Callable[[PyTree], jax.Array]


def hutchinson_diagonal(f: LossFn, params: PyTree, key: jax.Array, num_samples: int) -> PyTree:
    """Hutchinson estimate of the Hessian diagonal with Rademacher probes.

    ``diag(H) ≈ (1/n) Σ_k v_k ⊙ H v_k`` with ``v_k ∈ {-1, +1}^P``. It is unbiased, with per-entry
    variance ``Σ_{j≠i} H_ij² / n``, and exact for any ``n`` when ``H`` is diagonal. The probes run
    in a `lax.scan` over one linearisation of ``∇f``.

    Args:
      f: scalar loss ``f(params) -> [] float``.
      params: any pytree of float arrays (P entries in all).
      key: a PRNG key.
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

    keys = jax.random.split(key, num_samples)
    total, _ = lax.scan(probe_step, optax.tree.zeros_like(params), keys)
    return optax.tree.scale(1.0 / num_samples, total)


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
