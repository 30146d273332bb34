"""The ModalImmune training step (DESIGN.md §3.6): every component switchable under ``config.mi``.

One call of ``grads`` does, inside one jitted step:

1. **Controller** (§3.1): every ``ig_every`` steps (``lax.cond``) the signed leave-one-out gain
   ``IG`` refreshes the EMA ``G``. Each example (``mi.per_example``; else the whole batch) is clean
   with probability ``p_clean``, else loses ``k ~ Uniform{1..max_targets}`` targets drawn without
   replacement from ``softmax(G / tau)`` (README "Formulation changes"). Off: a flat ``G``, i.e.
   uniform targets.
2. **Collapse** (§3.2): each target's embedding goes through ``spectral_collapse`` (a batch
   statistic) with the meta strength, and replaces the embedding of the examples that drew it.
   Our change, in DESIGN.md's spirit (README "Formulation changes"): the collapsed
   embedding's centre also moves from the batch mean towards the *null embedding* (the encoder's
   output for a zero-filled input) by the same strength, so a full collapse lands exactly where a
   missing modality lands at test time; and with probability ``mask_prob`` the target is also
   flagged absent in the presence mask, so the `mask` protocol is trained too. Off: the target is
   zero-filled with mask 0 (a targeted ModDrop).
3. **Loss**: ``L = L_task(clean) + w_col L_task(collapsed) + λ_c R + λ_r L_rec``, where the clean task
   term keeps full-modality accuracy, ``R`` is the collapse regularizer between the clean and the
   collapsed joint representation (clean side stop-gradient), and ``L_rec`` reconstructs every
   modality from the collapsed ``h``. The *destructive* part is ``w_col L_task(collapsed) + λ_c R``.
4. **Curvature mask** (§3.3): both gradients come from one vjp with two cotangents; the Hessian
   diagonal of the clean task loss (Hutchinson, refreshed every ``curv_every`` steps into an EMA)
   damps the destructive gradient where curvature is high.
5. **Meta-parameters** (§3.4): every ``meta_every`` steps the certified Neumann hypergradient of the
   robust validation loss (the mean task loss over every missing-modality pattern of a held-out
   batch) updates ``φ = (logit strength, log λ_c, log λ_r)`` with its own adam; a step whose
   certificate is invalid is skipped and counted.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from modalimmune_jax import controller as ctrl_lib
from modalimmune_jax import curvature, hypergrad, losses, robustness, spectral
from modalimmune_jax.interventions import drop_modalities
from modalimmune_jax.methods import Method
from modalimmune_jax.model import collapse_target

CERT_KEYS = ("valid", "bound", "residual_norm", "lambda_min", "lambda_max", "num_terms_used",
             "damping")


def _cert_zeros():
    return {k: jnp.zeros([], jnp.float32) for k in CERT_KEYS}


def make_modalimmune(apply_fns, *, info, config) -> Method:
    """The ModalImmune :class:`Method` (module docstring)."""
    mi = config.mi
    mods = info.modalities
    num_m = len(mods)
    mask_tx = curvature.curvature_mask(quantile=mi.quantile, mode=mi.mask_mode, beta=mi.mask_beta)
    meta_tx = optax.adam(mi.meta_lr)
    # Collapsing every modality at once leaves nothing to learn from: at most M - 1 targets.
    max_targets = max(1, min(mi.max_targets, num_m - 1))
    # Every missing pattern with at least one modality kept, the full set included.
    patterns = jnp.asarray(np.stack([np.ones(num_m, np.float32)] + [
        keep for _, keep in robustness.missing_conditions(mods)]))

    def per_example_task(params, batch):
        out = apply_fns.apply(params, batch)
        return losses.task_loss(out["preds"], batch["label"], task=info.task,
                                regression_loss=config.loss.regression)

    def clean_task(params, batch):
        return jnp.mean(per_example_task(params, batch))

    def robust_val_loss(params, batch):
        def one(keep):
            return clean_task(params, drop_modalities(batch, keep, modalities=mods,
                                                      set_mask=False))
        return jnp.mean(jax.vmap(one)(patterns))

    def objective(params, batch, phi, target, flag_absent):
        """``((total, destructive), aux)`` for one batch (module docstring, item 3).

        ``target`` is ``[B, M]`` float multi-hot (the rows are equal unless ``mi.per_example``),
        ``flag_absent`` ``[B]`` float: 1 where the targets are also marked absent in the mask.
        """
        strength = jax.nn.sigmoid(phi["logit_strength"])
        z = apply_fns.encode(params, batch)  # [B, M, d]
        mask = batch["mask"]
        h_clean, preds_clean = apply_fns.head(params, z, mask)
        if mi.collapse:
            z_null = None
            if mi.anchor == "null":
                z_null = apply_fns.encode(params, drop_modalities(
                    batch, jnp.zeros(num_m), modalities=mods, set_mask=False))
            z_hit = collapse_target(z, target, strength, mi.gamma,
                                    collapse_fn=spectral.spectral_collapse, null=z_null)
        else:
            zero_batch = drop_modalities(batch, 1.0 - target, modalities=mods, set_mask=False)
            z_hit = apply_fns.encode(params, zero_batch)
        mask_hit = mask * (1.0 - flag_absent[:, None] * target)
        h_col, preds_col = apply_fns.head(params, z_hit, mask_hit)
        task_clean = jnp.mean(losses.task_loss(preds_clean, batch["label"], task=info.task,
                                               regression_loss=config.loss.regression))
        # The collapsed task loss averages over the examples that lost something (the others
        # would only repeat the clean term).
        hit = jnp.max(target, axis=1)  # [B]
        task_col = jnp.sum(hit * losses.task_loss(preds_col, batch["label"], task=info.task,
                                                  regression_loss=config.loss.regression))
        task_col = task_col / jnp.maximum(jnp.sum(hit), 1.0)
        reg = (spectral.collapse_regularizer(jax.lax.stop_gradient(h_clean), h_col)
               if mi.regularizer else jnp.zeros([]))
        rec = jnp.mean(losses.reconstruction_loss(apply_fns.reconstruct(params, h_col),
                                                  losses.pooled_features(batch, mods),
                                                  variances=losses.reconstruction_variances(info)))
        lam_c, lam_r = jnp.exp(phi["log_reg_weight"]), jnp.exp(phi["log_rec_weight"])
        # 0 on an all-clean batch: the collapsed branch then equals the clean one.
        destructive = jnp.max(hit) * (mi.collapse_weight * task_col + lam_c * reg)
        total = task_clean + destructive + lam_r * rec
        most_hit = jnp.argmax(jnp.sum(target, axis=0))
        aux = {"task_loss": task_clean, "collapsed_task_loss": task_col, "regularizer": reg,
               "rec_loss": rec, "strength": strength,
               "effective_rank_target": spectral.effective_rank(z[:, most_hit])}
        return (total, destructive), aux

    def init(params):
        phi = {"logit_strength": jnp.asarray(np.log(mi.strength / (1 - mi.strength)), jnp.float32),
               "log_reg_weight": jnp.log(jnp.float32(mi.reg_weight)),
               "log_rec_weight": jnp.log(jnp.float32(config.loss.reconstruction))}
        return {"controller": ctrl_lib.init_controller(num_m),
                "last_ig": jnp.zeros([num_m], jnp.float32),
                "curvature": curvature.init_curvature_ema(params),
                "mask_state": mask_tx.init(params),
                "phi": phi, "meta_opt": meta_tx.init(phi),
                "cert": _cert_zeros(), "meta_skips": jnp.zeros([], jnp.int32)}

    def grads(params, extra, batch, rng, *, step, meta_batch):
        k_target, k_absent, k_curv, k_meta, k_ig = jax.random.split(rng, 5)
        controller, last_ig = extra["controller"], extra["last_ig"]

        # 1. Controller: amortized IG refresh, then the target.
        if mi.controller:
            def refresh(c):
                ig = ctrl_lib.information_gain(per_example_task, params, batch, modalities=mods,
                                               key=k_ig, mask_prob=config.removal.mask_prob)
                return ctrl_lib.update_controller(c, ig, beta=mi.ema_beta), ig
            controller, last_ig = jax.lax.cond(step % mi.ig_every == 0, refresh,
                                               lambda c: (c, last_ig), controller)
        # Off: the same draw from a flat gain, i.e. uniform targets.
        policy = controller if mi.controller else ctrl_lib.init_controller(num_m)
        draw = lambda k: ctrl_lib.select_target(policy, k, p_clean=mi.p_clean, tau=mi.tau,
                                                max_targets=max_targets)
        batch_size = batch["mask"].shape[0]
        if mi.per_example:
            # Each example gets its own targets from the same policy: the collapse operator is a
            # batch statistic, but which rows it replaces varies, as ModDrop's patterns do.
            target = jax.vmap(draw)(jax.random.split(k_target, batch_size))
            flag_absent = jax.random.bernoulli(k_absent, config.removal.mask_prob, (batch_size,))
        else:
            target = jnp.broadcast_to(draw(k_target), (batch_size, num_m))
            flag_absent = jnp.broadcast_to(jax.random.bernoulli(k_absent, config.removal.mask_prob),
                                           (batch_size,))
        flag_absent = flag_absent.astype(jnp.float32)

        # 2-3. Both gradients from one vjp.
        total, destructive, g_total, g_destr, aux = curvature.split_gradients_joint(
            lambda p: objective(p, batch, extra["phi"], target, flag_absent), params,
            has_aux=True)

        # 4. Curvature mask on the destructive part.
        curv = extra["curvature"]
        if mi.curvature:
            curv = jax.lax.cond(
                step % mi.curv_every == 0,
                lambda e: curvature.update_curvature_ema(
                    e, curvature.hutchinson_diagonal(lambda p: clean_task(p, batch), params,
                                                     k_curv, mi.curv_probes),
                    decay=mi.curv_decay),
                lambda e: e, curv)
            g, mask_state = mask_tx.update(g_total, extra["mask_state"], params,
                                           curvature=curv.diag, destructive=g_destr)
        else:
            g, mask_state = g_total, extra["mask_state"]

        # 5. Certified meta-update of φ.
        phi, meta_opt, cert, meta_skips = (extra["phi"], extra["meta_opt"], extra["cert"],
                                           extra["meta_skips"])
        if mi.meta:
            def meta_update(args):
                phi, meta_opt, _, skips = args
                hg, c = hypergrad.implicit_hypergradient(
                    lambda p, f: objective(p, batch, f, target, flag_absent)[0][0],
                    lambda p: robust_val_loss(p, meta_batch), params, phi,
                    num_terms=mi.neumann_terms, damping=mi.damping, key=k_meta,
                    power_iters=mi.power_iters, floor_curvature=mi.floor_curvature)
                ok = c["valid"] & jnp.all(jnp.array([jnp.all(jnp.isfinite(x))
                                                     for x in jax.tree.leaves(hg)]))
                upd, new_opt = meta_tx.update(hg, meta_opt, phi)
                new_phi = optax.apply_updates(phi, upd)
                pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(ok, x, y), a, b)
                summary = {k: jnp.asarray(c[k], jnp.float32) for k in CERT_KEYS}
                return (pick(new_phi, phi), pick(new_opt, meta_opt), summary,
                        skips + (1 - ok.astype(jnp.int32)))
            phi, meta_opt, cert, meta_skips = jax.lax.cond(
                (step % mi.meta_every == 0) & (step > 0), meta_update, lambda a: a,
                (phi, meta_opt, cert, meta_skips))

        new_extra = {"controller": controller, "last_ig": last_ig, "curvature": curv,
                     "mask_state": mask_state, "phi": phi, "meta_opt": meta_opt, "cert": cert,
                     "meta_skips": meta_skips}
        meas = {**aux, "loss": total, "destructive_loss": destructive,
                # How often each modality was collapsed in this batch, and how many per example.
                **{f"target_rate/{m}": jnp.mean(target[:, i]) for i, m in enumerate(mods)},
                "num_targets": jnp.mean(jnp.sum(target, axis=1)),
                "mask_fraction": getattr(mask_state, "fraction_masked", jnp.zeros([])),
                "meta_skips": meta_skips,
                "reg_weight": jnp.exp(phi["log_reg_weight"]),
                "rec_weight": jnp.exp(phi["log_rec_weight"]),
                **{f"ig/{m}": last_ig[i] for i, m in enumerate(mods)},
                **{f"gain_ema/{m}": controller.gain_ema[i] for i, m in enumerate(mods)},
                **{f"cert/{k}": v for k, v in cert.items()}}
        return g, new_extra, meas

    return Method(init=init, grads=grads)
