"""Baseline training objectives: `erm` and `moddrop` (DESIGN.md §4).

Each factory returns ``loss_fn(params, batch, rng) -> (loss, measurements)``, a pure function the
generic train step differentiates.
"""

import jax
import jax.numpy as jnp

from modalimmune_jax import losses
from modalimmune_jax.interventions import drop_modalities
from modalimmune_jax.robustness import random_missing_keep


def supervised_loss(apply_fns, params, batch, *, info, config):
    """Task loss plus weighted reconstruction loss on one batch: ``(scalar, measurements)``."""
    out = apply_fns.apply(params, batch)
    task = jnp.mean(losses.task_loss(out["preds"], batch["label"], task=info.task,
                                     regression_loss=config.loss.regression))
    rec = jnp.mean(losses.reconstruction_loss(out["recon"],
                                              losses.pooled_features(batch, info.modalities)))
    loss = task + config.loss.reconstruction * rec
    return loss, {"task_loss": task, "rec_loss": rec}


def make_erm_loss(apply_fns, *, info, config):
    """Plain training on full modalities."""

    def loss_fn(params, batch, rng):
        del rng
        return supervised_loss(apply_fns, params, batch, info=info, config=config)

    return loss_fn


def make_moddrop_loss(apply_fns, *, info, config):
    """ModDrop: zero-fill (mask 0) each modality with probability p, keeping at least one."""

    def loss_fn(params, batch, rng):
        keep = random_missing_keep(rng, batch["mask"].shape[0], len(info.modalities),
                                   config.moddrop.p)  # [B, M]
        dropped = drop_modalities(batch, keep, modalities=info.modalities, set_mask=True)
        loss, meas = supervised_loss(apply_fns, params, dropped, info=info, config=config)
        meas["kept_fraction"] = jnp.mean(keep)
        return loss, meas

    return loss_fn
