"""The robustness evaluation protocol of DESIGN.md §5, as pure functions.

- Missing modalities: every non-empty proper subset (`missing_conditions`), random missing at a rate
  with at least one modality kept (`random_missing_keep`), applied under the `zero` or `mask`
  protocol (`apply_missing`, a thin wrapper over `interventions.drop_modalities`).
- Corruption of one modality: Gaussian noise scaled by the training feature std (`gaussian_noise`),
  and MultiBench's timestep drop (`timestep_drop`). Both are jit-able and touch only valid
  timesteps.
- Summaries: MultiBench's relative and effective robustness (areas under score-vs-level curves), and
  mean ± std over seeds (`summarize_seeds`).

Padding convention for sequences: if the batch holds ``"lengths"`` ``[B, M]`` int, modality m of
sample b has ``lengths[b, m]`` valid timesteps at the *front* (``t < lengths[b, m]``) and padding
after them, as in MMSA's unaligned pickles; without ``"lengths"`` every timestep counts as valid.
"""

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from modalimmune_jax.interventions import drop_modalities

Batch = Mapping[str, jax.Array]
PROTOCOLS = ("zero", "mask")


# ----------------------------------------------------------------------------- missing modalities


def missing_conditions(modalities: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    """Every non-empty proper subset of the modalities, as a named keep vector.

    Order: by number of kept modalities, descending, then lexicographic in the given modality order
    (``itertools.combinations`` order). For ``("text", "audio", "vision")``: ``text+audio``,
    ``text+vision``, ``audio+vision``, ``text``, ``audio``, ``vision``.

    Args:
      modalities: the M modality names, in the column order of ``batch["mask"]``.

    Returns:
      list of ``2^M - 2`` pairs ``(name, keep)``: name joins the kept modalities with ``"+"`` in
      modality order; keep is ``[M] float32`` with 1 for kept, 0 for removed.

    Reference: DESIGN.md §5 (missing modality) and §7 (the ``eval.json`` ``missing`` keys).
    """
    modalities = list(modalities)
    m = len(modalities)
    out = []
    for size in range(m - 1, 0, -1):
        for kept in itertools.combinations(range(m), size):
            keep = np.zeros([m], np.float32)
            keep[list(kept)] = 1.0
            out.append(("+".join(modalities[i] for i in kept), keep))
    return out


def random_missing_keep(
    key: jax.Array, batch_size: int, num_modalities: int, rate: jax.typing.ArrayLike
) -> jax.Array:
    """Random missing pattern: each (sample, modality) dropped independently with prob. `rate`.

    A sample that loses every modality gets one back, chosen uniformly at random, so at least one
    modality is always kept. That rescue lowers the realised drop fraction slightly:
    ``E[dropped / M] = rate - rate^M / M`` (e.g. 0.586 at rate 0.7 with M = 3).

    Args:
      key: PRNG key.
      batch_size: B (static).
      num_modalities: M (static).
      rate: scalar float in [0, 1]; may be traced. 0 keeps everything.

    Returns:
      ``[B, M] float32`` keep matrix with entries in {0, 1} and every row sum >= 1.

    Reference: DESIGN.md §5 (random missing at rate r, at least one modality kept).
    """
    key_drop, key_pick = jax.random.split(key)
    keep = jax.random.uniform(key_drop, (batch_size, num_modalities)) >= rate
    none_kept = ~jnp.any(keep, axis=1)
    pick = jax.random.randint(key_pick, (batch_size,), 0, num_modalities)
    rescue = jax.nn.one_hot(pick, num_modalities, dtype=jnp.bool_)
    keep = jnp.where(none_kept[:, None], rescue, keep)
    return keep.astype(jnp.float32)


def apply_missing(
    batch: Batch,
    keep: jax.typing.ArrayLike,
    *,
    modalities: Sequence[str],
    protocol: str,
) -> dict[str, jax.Array]:
    """Removes modalities under an evaluation protocol: zero-fill, and tell the model or not.

    ``"zero"``: removed modalities are zero-filled and the mask stays as is (the model is not told);
    ``"mask"``: they are zero-filled and ``mask *= keep`` (the model is told).

    Args:
      batch: batch dict (DESIGN.md §2), modalities ``[B, T_m, D_m]`` or ``[B, D_m]``,
        ``"mask"`` ``[B, M] float32``.
      keep: ``[M]`` or ``[B, M]`` float, 1 keeps, 0 removes.
      modalities: the M modality names, in the column order of ``batch["mask"]``.
      protocol: ``"zero"`` or ``"mask"``.

    Returns:
      A new batch dict, same structure, shapes and dtypes.

    Raises:
      ValueError: on an unknown protocol.

    Reference: DESIGN.md §2 and §5.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown missing-modality protocol {protocol!r}; expected {PROTOCOLS}")
    return remove_under_protocol(batch, keep, modalities=modalities, told=protocol == "mask")


def remove_under_protocol(
    batch: Batch,
    keep: jax.typing.ArrayLike,
    *,
    modalities: Sequence[str],
    told: jax.typing.ArrayLike,
) -> dict[str, jax.Array]:
    """`apply_missing` with the protocol as an array: ``told`` > 0 is `mask`, else `zero`.

    A traced ``told`` lets one compiled prediction serve both protocols (the evaluator, the
    unlearning measures).

    Args:
      batch, keep, modalities: as in `apply_missing`.
      told: scalar float or bool; 1 sets ``mask *= keep`` (`mask`), 0 leaves the mask (`zero`).

    Returns:
      A new batch dict, same structure, shapes and dtypes.
    """
    zero = drop_modalities(batch, keep, modalities=modalities, set_mask=False)
    flagged = drop_modalities(batch, keep, modalities=modalities, set_mask=True)["mask"]
    return {**zero, "mask": jnp.where(jnp.asarray(told) > 0, flagged, zero["mask"])}


# ---------------------------------------------------------------------------------- corruption


def _valid_steps(
    batch: Batch, modality: str, modalities: Sequence[str] | None
) -> jax.Array | None:
    """``[B, T] bool`` valid-timestep mask of a sequence modality, or None if all are valid."""
    x = batch[modality]
    if x.ndim < 3 or "lengths" not in batch:
        return None
    if modalities is None:
        # Without the column order we cannot read lengths[:, m]; corrupting padding silently would
        # change what "level" means, so fail loudly.
        raise ValueError("batch has 'lengths': pass modalities= to locate the modality's column")
    lengths = jnp.asarray(batch["lengths"])[:, list(modalities).index(modality)]
    return jnp.arange(x.shape[1])[None, :] < lengths[:, None]


def gaussian_noise(
    batch: Batch,
    modality: str,
    level: jax.typing.ArrayLike,
    *,
    key: jax.Array,
    feature_std: jax.typing.ArrayLike,
    modalities: Sequence[str] | None = None,
) -> dict[str, jax.Array]:
    """Adds Gaussian noise to one modality, scaled by the training-split feature std.

    ``x' = x + level * feature_std * eps``, ``eps ~ N(0, I)``, on valid timesteps only (padding and
    every other key are returned unchanged).

    Args:
      batch: batch dict (DESIGN.md §2); ``batch[modality]`` is ``[B, T, D]`` or ``[B, D]`` float.
      modality: name of the modality to corrupt (static).
      level: scalar float >= 0, the noise std in units of the feature std; may be traced.
      key: PRNG key.
      feature_std: ``[D]`` float, per-feature std of this modality on the training split.
      modalities: the M modality names in ``"lengths"`` column order; required only when the batch
        holds ``"lengths"`` ``[B, M]`` (see the module docstring for the padding convention).

    Returns:
      A new batch dict, same structure, shapes and dtypes.

    Reference: DESIGN.md §5 (corruption: Gaussian noise of std = level x feature std).
    """
    x = batch[modality]
    scale = (jnp.asarray(level) * jnp.asarray(feature_std)).astype(x.dtype)  # [D]
    noisy = x + jax.random.normal(key, x.shape, x.dtype) * scale
    valid = _valid_steps(batch, modality, modalities)
    out = dict(batch)
    out[modality] = noisy if valid is None else jnp.where(valid[..., None], noisy, x)
    return out


def timestep_drop(
    batch: Batch,
    modality: str,
    level: jax.typing.ArrayLike,
    *,
    key: jax.Array,
    modalities: Sequence[str] | None = None,
) -> dict[str, jax.Array]:
    """Zeroes whole timesteps of one modality, each valid one independently with prob. `level`.

    This is MultiBench's timeseries ``random_drop``: a dropped timestep has all D features set to 0.
    A vector modality ``[B, D]`` counts as one timestep, so the whole vector is dropped with
    probability `level`. Padding and every other key are returned unchanged.

    Args:
      batch: batch dict (DESIGN.md §2); ``batch[modality]`` is ``[B, T, D]`` or ``[B, D]`` float.
      modality: name of the modality to corrupt (static).
      level: scalar float in [0, 1], the drop probability; may be traced.
      key: PRNG key.
      modalities: the M modality names in ``"lengths"`` column order; required only when the batch
        holds ``"lengths"`` ``[B, M]``.

    Returns:
      A new batch dict, same structure, shapes and dtypes.

    Reference: DESIGN.md §5; MultiBench ``robustness/timeseries_robust.py``.
    """
    x = batch[modality]
    steps = x.shape[:2] if x.ndim >= 3 else x.shape[:1]  # [B, T] or [B]
    drop = jax.random.bernoulli(key, jnp.asarray(level, jnp.float32), steps)
    valid = _valid_steps(batch, modality, modalities)
    if valid is not None:
        drop = drop & valid
    drop = drop.reshape(drop.shape + (1,) * (x.ndim - drop.ndim))
    out = dict(batch)
    # where, not multiply: a dropped step must be exactly zero even if it held inf/NaN.
    out[modality] = jnp.where(drop, jnp.zeros((), x.dtype), x)
    return out


# ----------------------------------------------------------------------------------- summaries


def _curve(levels: Any, *curves: Any) -> tuple[np.ndarray, ...]:
    levels = np.asarray(levels, np.float64)
    if levels.ndim != 1 or levels.size < 2 or np.any(np.diff(levels) <= 0):
        raise ValueError(f"levels must be 1-D, strictly increasing, length >= 2; got {levels}")
    out = [np.asarray(c, np.float64) for c in curves]
    for c in out:
        if c.shape != levels.shape:
            raise ValueError(f"scores of shape {c.shape} do not match levels {levels.shape}")
    return (levels, *out)


def relative_robustness(levels: jax.typing.ArrayLike, scores: jax.typing.ArrayLike) -> float:
    """MultiBench's relative robustness: normalized trapezoid area under the score-vs-level curve.

    ``RR = (1 / (l_K - l_0)) * sum_k (l_{k+1} - l_k) (s_k + s_{k+1}) / 2``.

    The normalization by the level range makes a flat curve at s give exactly s, so RR is in the
    units of the score and comparable across level grids. MultiBench's helper sums
    ``0.1 * (s_k + s_{k+1}) / 2`` over an 11-point grid 0, 0.1, ..., 1.0; there the level range is 1
    and the two agree exactly. On a 0.0-0.9 grid MultiBench's number is 0.9 x ours.

    Args:
      levels: ``[K]`` float, strictly increasing corruption levels (or missing rates).
      scores: ``[K]`` float, the metric at each level.

    Returns:
      Python float. For a lower-is-better metric (MAE) a smaller RR is better.

    Reference: DESIGN.md §5; MultiBench ``eval_scripts/robustness.py`` (Liang et al. 2021).
    """
    levels, scores = _curve(levels, scores)
    return float(np.trapezoid(scores, levels) / (levels[-1] - levels[0]))


def effective_robustness(
    levels: jax.typing.ArrayLike, scores: jax.typing.ArrayLike, ref_scores: jax.typing.ArrayLike
) -> float:
    """Effective robustness: the area between the curve and a reference curve matched at level 0.

    The reference (the ``erm`` curve) is shifted to start where this curve starts,
    ``b_k = r_k - r_0 + s_0``, so a method gets no credit for its clean score, only for degrading
    more slowly. ``ER`` is the normalized trapezoid area of ``s_k - b_k`` (same normalization as
    `relative_robustness`): a curve that loses d less than the reference at every level > 0 gets
    about d; ER of the reference against itself is 0.

    MultiBench's ``effective_robustness_helper`` (against late fusion) uses the same shifted
    baseline but returns the plain sum ``sum_k (s_k - b_k)`` over the grid, i.e. it is not
    normalized; we use the area so RR and ER share units and do not depend on the grid size.

    Args:
      levels: ``[K]`` float, strictly increasing levels.
      scores: ``[K]`` float, this method's metric at each level.
      ref_scores: ``[K]`` float, the reference method's metric at the same levels.

    Returns:
      Python float; positive means more robust than the reference for a higher-is-better metric.

    Reference: DESIGN.md §5; MultiBench ``eval_scripts/robustness.py``; Taori et al. 2020.
    """
    levels, scores, ref = _curve(levels, scores, ref_scores)
    gap = scores - (ref - ref[0] + scores[0])
    return float(np.trapezoid(gap, levels) / (levels[-1] - levels[0]))


def summarize_seeds(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of each metric, for the tables (DESIGN.md §5: mean ± std over seeds).

    ``std`` is the population std (``ddof=0``), so a single seed gives std 0.0 rather than NaN.
    Nested dicts (``eval.json``'s ``missing``, ``corruption``, ...) are summarized leaf by leaf
    with the same nesting. Every seed must hold the same keys.

    Args:
      results: one metrics dict per seed, leaves Python or numpy scalars.

    Returns:
      ``{metric: {"mean": float, "std": float}}`` (nested like the inputs).

    Raises:
      ValueError: if results is empty or the seeds' keys differ.
    """
    if not results:
        raise ValueError("summarize_seeds needs at least one result")
    keys = list(results[0].keys())
    for r in results[1:]:
        if set(r.keys()) != set(keys):
            raise ValueError(f"seeds disagree on metric names: {sorted(keys)} vs {sorted(r)}")
    out: dict[str, Any] = {}
    for k in keys:
        vals = [r[k] for r in results]
        if isinstance(vals[0], Mapping):
            out[k] = summarize_seeds(vals)
        elif any(v is None for v in vals):  # an undefined figure (JSON null) stays undefined
            out[k] = {"mean": None, "std": None}
        else:
            arr = np.asarray(vals, np.float64)
            out[k] = {"mean": float(np.mean(arr)), "std": float(np.std(arr, ddof=0))}
    return out
