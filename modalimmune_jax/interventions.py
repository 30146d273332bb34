"""Removing modalities from a batch: the one primitive every protocol and intervention shares.

DESIGN.md §2: removing a modality zero-fills its features. Under the `zero` protocol the presence
mask stays 1 (the model is not told); under `mask` it is set to 0 (the model is told). Training-time
interventions (moddrop, the information-gain leave-one-out) zero-fill and set the mask to 0.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

Batch = Mapping[str, jax.Array]


def drop_modalities(
    batch: Batch,
    keep: jax.typing.ArrayLike,
    *,
    modalities: Sequence[str],
    set_mask: bool,
) -> dict[str, jax.Array]:
    """Zero-fills the modalities that `keep` marks as absent.

    Args:
      batch: dict with one array per modality, ``[B, T_m, D_m]`` or ``[B, D_m]`` float, plus
        ``"mask"`` ``[B, M] float32`` and any other keys (passed through unchanged).
      keep: ``[M]`` or ``[B, M]`` float or bool; 1 keeps modality m (for that sample), 0 removes it.
      modalities: the M modality names, in the column order of ``batch["mask"]``.
      set_mask: True for the `mask` protocol and training interventions (mask *= keep); False for the
        `zero` protocol (mask left as is).

    Returns:
      A new batch dict with the same structure, shapes and dtypes.
    """
    out = dict(batch)
    ref = batch[modalities[0]]
    keep = jnp.broadcast_to(jnp.asarray(keep, jnp.float32), (ref.shape[0], len(modalities)))
    for i, name in enumerate(modalities):
        x = batch[name]
        k = keep[:, i].reshape((-1,) + (1,) * (x.ndim - 1))  # [B] -> [B, 1, ...]
        # where, not multiply: a removed modality must be exactly zero even if it held inf/NaN.
        out[name] = jnp.where(k > 0, x, jnp.zeros((), x.dtype))
    if set_mask:
        out["mask"] = batch["mask"] * keep.astype(batch["mask"].dtype)
    return out
