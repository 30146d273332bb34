"""Baseline training objectives: `erm` and `moddrop` (DESIGN.md §4).

Each factory returns ``loss_fn(params, batch, rng) -> (loss, measurements)``, a pure function the
generic train step differentiates. The training forward passes get a key derived from ``rng`` for
the model's dropout (``config.model.dropout``); reference passes (the clean prediction and the
attack of `consistency`) run the deterministic model.
"""

import jax
import jax.numpy as jnp

from modalimmune_jax import losses
from modalimmune_jax.interventions import remove_for_training
from modalimmune_jax.robustness import random_missing_keep


def supervised_loss(apply_fns, params, batch, *, info, config, rng=None):
    """Task loss plus weighted reconstruction loss on one batch: ``(scalar, measurements)``.

    ``rng``: the dropout key of this forward pass (None: the deterministic model). The
    reconstruction loss is scale-free (``losses.reconstruction_loss``, DESIGN.md §3.5).
    """
    out = apply_fns.apply(params, batch, rng=rng)
    task = jnp.mean(losses.task_loss(out["preds"], batch["label"], task=info.task,
                                     regression_loss=config.loss.regression))
    rec = jnp.mean(losses.reconstruction_loss(
        out["recon"], losses.pooled_features(batch, info.modalities),
        variances=losses.reconstruction_variances(info)))
    loss = task + config.loss.reconstruction * rec
    return loss, {"task_loss": task, "rec_loss": rec}


def make_erm_loss(apply_fns, *, info, config):
    """Plain training on full modalities."""

    def loss_fn(params, batch, rng):
        return supervised_loss(apply_fns, params, batch, info=info, config=config, rng=rng)

    return loss_fn


def make_moddrop_loss(apply_fns, *, info, config):
    """ModDrop: remove each modality with probability ``config.moddrop.p``, keeping at least one.

    The removal is the shared training rule (DESIGN.md §2, ``remove_for_training``): zero-fill,
    and with probability ``config.removal.mask_prob`` per example also flag the removals absent.
    """

    def loss_fn(params, batch, rng):
        k_keep, k_flag = jax.random.split(rng)
        keep = random_missing_keep(k_keep, batch["mask"].shape[0], len(info.modalities),
                                   config.moddrop.p)  # [B, M]
        dropped = remove_for_training(batch, keep, key=k_flag,
                                      mask_prob=config.removal.mask_prob,
                                      modalities=info.modalities)
        loss, meas = supervised_loss(apply_fns, params, dropped, info=info, config=config,
                                     rng=jax.random.fold_in(rng, 1))
        meas["kept_fraction"] = jnp.mean(keep)
        return loss, meas

    return loss_fn


def prediction_divergence(preds, reference, *, task, reference_first=False, temperature=1.0):
    """Per-example divergence of `preds` from `reference` (no gradient to `reference`): ``[B]``.

    ``KL(q ‖ p)`` with q = softmax(preds / T) and p = softmax(reference / T) for classification
    (averaged over the K emotions for multilabel), times ``T²`` so that the gradient keeps its
    scale (Hinton et al., 2015); ``KL(p ‖ q)`` with ``reference_first``, i.e. the reference's
    distribution as a soft target (a cross-entropy less p's entropy). Squared error for
    regression, whatever the direction and T. ``preds``, ``reference``: ``[B, C]``
    (``[B, K, C]`` multilabel, ``[B]`` regression) logits, float32.
    """
    reference = jax.lax.stop_gradient(reference)
    if task == "regression":
        return jnp.square(preds - reference)
    log_q = jax.nn.log_softmax(preds / temperature, axis=-1)
    log_p = jax.nn.log_softmax(reference / temperature, axis=-1)
    if reference_first:
        log_q, log_p = log_p, log_q
    kl = temperature**2 * jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
    return kl.mean(axis=-1) if task == "multilabel" else kl


def make_consistency_loss(apply_fns, *, info, config):
    """Cai et al. (2505.19616): PGD-perturb one non-target modality, penalize the prediction shift.

    Each step picks one modality uniformly at random and perturbs its features with
    ``config.consistency.steps`` PGD steps of size ``alpha`` on the raw gradient, each step clipped
    to ``[-eps, eps]``, ascending the divergence from the clean prediction; the loss is the clean
    supervised loss plus ``weight * divergence(q_pert ‖ stop_grad(p_clean))`` (DESIGN.md §4).

    ``eps`` and ``alpha`` are in units of the training feature std (``info.feature_std``): the
    attack runs on ``u`` with ``x + std * u``, so its strength does not depend on a view's units
    (issue 14). On standardized features (std 1) this is the attack on the raw features; a
    constant feature (std 0) is never perturbed.
    """
    cc = config.consistency
    mods = info.modalities
    std = {m: jnp.asarray(info.feature_std[m], jnp.float32) if info.feature_std else
           jnp.ones(info.feature_shapes[m][-1], jnp.float32) for m in mods}  # [D_m]

    def loss_fn(params, batch, rng):
        sup, meas = supervised_loss(apply_fns, params, batch, info=info, config=config,
                                    rng=jax.random.fold_in(rng, 2))
        clean = jax.lax.stop_gradient(apply_fns.apply(params, batch)["preds"])
        pick = jax.random.randint(rng, (), 0, len(mods))

        def perturbed(deltas):
            # One delta per modality, used only for the picked one (a static branch-free select);
            # deltas are in std units, [D_m] broadcasts over the leading axes.
            return {**batch, **{m: batch[m] + jnp.where(pick == i, std[m] * deltas[m], 0.0)
                                for i, m in enumerate(mods)}}

        def divergence(deltas, p):
            out = apply_fns.apply(p, perturbed(deltas))["preds"]
            return jnp.mean(prediction_divergence(out, clean, task=info.task))

        # Random start in [-eps, eps] (Madry et al.): at delta = 0 the divergence is at its
        # minimum, its gradient is zero, and the attack would never move.
        k_init = jax.random.fold_in(rng, 1)
        deltas = {m: jax.random.uniform(jax.random.fold_in(k_init, i), batch[m].shape,
                                        batch[m].dtype, -cc.eps, cc.eps)
                  for i, m in enumerate(mods)}
        frozen = jax.lax.stop_gradient(params)
        for _ in range(cc.steps):  # a few static steps; the attack does not train the model
            g = jax.grad(divergence)(deltas, frozen)
            deltas = {m: jnp.clip(deltas[m] + cc.alpha * g[m], -cc.eps, cc.eps) for m in mods}
        deltas = jax.lax.stop_gradient(deltas)
        div = divergence(deltas, params)
        meas.update(consistency=div, perturbed_modality=pick)
        return sup + cc.weight * div, meas

    return loss_fn
