"""Removing modalities from a batch: the one primitive every protocol and intervention shares.

DESIGN.md §2: removing a modality zero-fills its features. Under the `zero` protocol the presence
mask stays 1 (the model is not told); under `mask` it is set to 0 (the model is told). Every
training-time removal goes through `remove_for_training`: zero-fill, and with one shared
probability (``config.removal.mask_prob``) also flag the modality absent.
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
      set_mask: True for the `mask` protocol (mask *= keep); False for the `zero` protocol (mask
        left as is). Training-time removals go through `remove_for_training` instead.

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


def training_mask(
    mask: jax.typing.ArrayLike,
    keep: jax.typing.ArrayLike,
    *,
    key: jax.Array,
    mask_prob: jax.typing.ArrayLike,
) -> jax.Array:
    """The presence mask after a training-time removal: the flag half of `remove_for_training`.

    Every removed entry (``keep == 0``) of an example is set to 0 with probability ``mask_prob``,
    one draw per example; kept entries and unflagged examples keep their mask. Paths that remove a
    modality by other means than zero-filling its input (ModalImmune's collapse of its embedding)
    call this directly, so their mask follows the same rule.

    Args:
      mask: ``[B, M]`` float presence mask.
      keep: ``[M]`` or ``[B, M]`` float or bool; 0 marks a removed modality.
      key: PRNG key for the per-example flags.
      mask_prob: scalar in ``[0, 1]``; may be traced.

    Returns:
      ``[B, M]`` mask, dtype of ``mask``.
    """
    mask = jnp.asarray(mask)
    keep = jnp.broadcast_to(jnp.asarray(keep, jnp.float32), mask.shape)
    flag = jax.random.bernoulli(key, mask_prob, (mask.shape[0], 1)).astype(jnp.float32)  # [B, 1]
    return mask * (1.0 - flag * (1.0 - keep)).astype(mask.dtype)


def remove_for_training(
    batch: Batch,
    keep: jax.typing.ArrayLike,
    *,
    key: jax.Array,
    mask_prob: jax.typing.ArrayLike,
    modalities: Sequence[str],
) -> dict[str, jax.Array]:
    """The one training-time removal rule every method shares (DESIGN.md §2).

    A removed modality is zero-filled; with probability ``mask_prob`` it is also flagged absent in
    the presence mask. The flag is drawn once per example and applies to every modality that
    example loses, so each training example looks exactly like one of the two test protocols:
    `mask` (all its removals flagged) or `zero` (none flagged). ``mask_prob = 0`` never changes the
    mask, ``1`` flags every removal. moddrop, every ModalImmune path, the information-gain
    leave-one-out, the unlearning retain/forget batches and every new baseline call this, so no
    method trains under a private rule and none is judged on a protocol it never saw.

    Args:
      batch: dict with one array per modality, ``[B, T_m, D_m]`` or ``[B, D_m]`` float, plus
        ``"mask"`` ``[B, M] float32`` and any other keys (passed through).
      keep: ``[M]`` or ``[B, M]`` float or bool; 0 removes modality m (for that example).
      key: PRNG key for the per-example flags.
      mask_prob: scalar in ``[0, 1]``, ``config.removal.mask_prob``; may be traced.
      modalities: the M modality names, in the column order of ``batch["mask"]``.

    Returns:
      A new batch dict with the same structure, shapes and dtypes.
    """
    num_examples = batch["mask"].shape[0]
    keep = jnp.broadcast_to(jnp.asarray(keep, jnp.float32), (num_examples, len(modalities)))
    out = drop_modalities(batch, keep, modalities=modalities, set_mask=False)
    out["mask"] = training_mask(batch["mask"], keep, key=key, mask_prob=mask_prob)
    return out


def gate_modalities(apply_fns, keep: Sequence[float], *, modalities: Sequence[str]):
    """The model with the modalities where ``keep == 0`` cut off at the input, for good.

    A gated modality is zero-filled, its length set to 1 (a sequence's length is information about
    it too) and flagged absent, whatever the batch holds, so its embedding is the *null
    embedding* ``E_m(0)`` for every example and the fusion ignores it; its reconstruction carries
    no gradient, so it is not a training target either. This is the specialist of the oracle row
    (``config.use_modalities``: a model that only ever sees the kept modalities) and the forget
    gate of modality unlearning.

    Args:
      apply_fns: the model's pure functions (`model.make_apply_fns`), an `ApplyFns`.
      keep: ``[M]`` static 0/1 values, 1 keeps the modality.
      modalities: the M names, in mask column order.

    Returns:
      An `ApplyFns` with the same signatures (keyword arguments are passed through).
    """
    from modalimmune_jax.model import ApplyFns  # noqa: PLC0415 -- model imports nothing here

    keep = jnp.asarray(keep, jnp.float32)  # [M]
    gated = [i for i in range(len(modalities)) if float(keep[i]) == 0.0]

    def gate(batch):
        out = drop_modalities(batch, keep, modalities=modalities, set_mask=True)
        if "lengths" in batch and gated:
            out["lengths"] = batch["lengths"].at[:, jnp.asarray(gated)].set(1)
        return out

    def stop(recon):
        return tuple(jax.lax.stop_gradient(r) if i in gated else r for i, r in enumerate(recon))

    def encode(params, batch, **kwargs):
        return apply_fns.encode(params, gate(batch), **kwargs)

    def head(params, z, mask, **kwargs):
        return apply_fns.head(params, z, mask * keep[None, :], **kwargs)

    def reconstruct(params, h, **kwargs):
        return stop(apply_fns.reconstruct(params, h, **kwargs))

    def apply(params, batch, **kwargs):
        out = apply_fns.apply(params, gate(batch), **kwargs)
        return {**out, "recon": stop(out["recon"])}

    return ApplyFns(encode=encode, head=head, reconstruct=reconstruct, apply=apply)
