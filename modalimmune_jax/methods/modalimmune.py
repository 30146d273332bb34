"""The ModalImmune training step (DESIGN.md §3.6): every component switchable under ``config.mi``.

One call of ``grads`` runs three named sub-steps inside one jitted step, and the meta-update
runs beside it on its steps:

1. **Controller** (§3.1, `controller_step`): every ``ig_every`` steps (``lax.cond``) the signed
   leave-one-out gain ``IG`` refreshes the EMA ``G``. Each example (``mi.per_example``; else the
   whole batch) is clean with probability ``p_clean``, else loses ``k ~ Uniform{1..max_targets}``
   targets drawn without replacement from ``softmax(G / tau)`` (README "Formulation changes").
   Off: a flat ``G``, i.e. uniform targets.
2. **Collapse and objective** (§3.2, `removal`, `objective`): each target's embedding goes through
   ``spectral_collapse`` (a batch statistic) with the meta strength, and replaces the embedding of
   the examples that drew it. Our change, in DESIGN.md's spirit (README "Formulation changes"):
   the collapsed embedding's centre also moves from the batch mean towards the *null embedding*
   (the encoder's output for a zero-filled input) by the same strength, so a full collapse lands
   exactly where a missing modality lands at test time. The presence mask of the collapsed branch
   follows the shared removal rule (`interventions.training_mask`, ``config.removal.mask_prob``).
   Off: the target is removed by `interventions.remove_for_training` (a targeted ModDrop).
   The loss is ``L = L_task(clean) + w_col L_task(collapsed) + λ_c R + λ_r L_rec``: the clean task
   term keeps full-modality accuracy, ``R`` is the collapse regularizer between the clean and the
   collapsed joint representation (clean side stop-gradient), and ``L_rec`` reconstructs every
   modality from the collapsed ``h``. The *destructive* part is ``w_col L_task(collapsed) + λ_c R``
   (+ ``w_d KL(collapsed ‖ clean)``, or the form ``mi.distill_kl`` names, at temperature
   ``mi.distill_temperature``, with ``mi.distill_weight`` > 0; off by default,
   docs/formulation.md).
3. **Curvature** (§3.3, `curvature_step`): both gradients come from one vjp with two cotangents;
   the Hessian diagonal of the clean task loss (Hutchinson, refreshed every ``curv_every`` steps
   into an EMA) goes with the destructive gradient to the method's ``transform``,
   `curvature_mask.curvature_mask`, first in the trainer's optimizer chain (``tx_args``).
4. **Meta-parameters** (§3.4, `meta_update`): every ``meta_every`` steps the certified Neumann
   hypergradient of the robust validation loss (the mean task loss over every missing-modality
   pattern of a held-out batch) updates ``φ = (logit strength, log λ_c, log λ_r)`` with its own
   adam; a step whose certificate is invalid is skipped and counted. It is the method's
   `base.Periodic` update, a program of its own that the trainer runs before the step on those
   steps (from the pre-step params and this step's removal), not a branch of every step.

Cost (issue 15): at the default ``gamma = 0`` the collapse is its closed form (no SVD); the null
embedding is computed once per possible sequence length, not per example; the effective-rank
diagnostic runs only on logged steps; with the curvature mask off there is one cotangent; the
meta-update is not compiled into the step.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from modalimmune_jax import controller as ctrl_lib
from modalimmune_jax import curvature, hypergrad, losses, robustness, spectral
from modalimmune_jax.curvature_mask import curvature_mask, split_gradients_joint
from modalimmune_jax.interventions import drop_modalities, training_mask
from modalimmune_jax.methods.base import Method, Periodic
from modalimmune_jax.methods.baselines import prediction_divergence
from modalimmune_jax.model import collapse_target


class MetaParams(NamedTuple):
    """φ, the continuous meta-parameters (DESIGN.md §3.4), each ``[] float32``."""

    logit_strength: jax.Array
    log_reg_weight: jax.Array
    log_rec_weight: jax.Array


# ``config.mi.meta_params`` names -> the `MetaParams` field each one moves.
META_PARAMS = {"strength": "logit_strength", "reg_weight": "log_reg_weight",
               "rec_weight": "log_rec_weight"}


def parse_meta_params(value: str) -> tuple[str, ...]:
    """``mi.meta_params`` (comma-separated names of `META_PARAMS`) -> the names; ValueError else."""
    names = tuple(v.strip() for v in str(value).split(",") if v.strip())
    unknown = [n for n in names if n not in META_PARAMS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"config.mi.meta_params must be a comma-separated, non-empty subset of "
                         f"{sorted(META_PARAMS)} without repeats, got {value!r}")
    return names


def check_config(config) -> None:
    """The ``mi`` block's checks that need this module (ValueError naming the field)."""
    parse_meta_params(config.mi.meta_params)


class Certificate(NamedTuple):
    """The last meta-update's certificate (`hypergrad.neumann_inverse_hvp`), ``[] float32`` each."""

    valid: jax.Array
    bound: jax.Array
    residual_norm: jax.Array
    lambda_min: jax.Array
    lambda_max: jax.Array
    num_terms_used: jax.Array
    damping: jax.Array


class ModalImmuneState(NamedTuple):
    """The method's state between steps (the trainer's ``train_state["extra"]``).

    ``controller`` the IG EMA; ``last_ig`` ``[M] float32`` the last measured IG; ``curvature``
    the Hessian-diagonal EMA (params-shaped ``diag``); ``phi`` and ``meta_opt`` the
    meta-parameters and their adam state; ``cert`` the last certificate; ``meta_skips`` ``[]
    int32`` meta-updates skipped for an invalid certificate; ``effective_rank`` ``[] float32``
    the most-hit target embedding's effective rank at the last logged step.
    """

    controller: ctrl_lib.ControllerState
    last_ig: jax.Array
    curvature: curvature.CurvatureEMA
    phi: MetaParams
    meta_opt: optax.OptState
    cert: Certificate
    meta_skips: jax.Array
    effective_rank: jax.Array


class MetaUpdate(NamedTuple):
    """A meta-update's result: the `ModalImmuneState` fields it replaces."""

    phi: MetaParams
    meta_opt: optax.OptState
    cert: Certificate
    meta_skips: jax.Array


class Removal(NamedTuple):
    """This step's removals, as K collapsed branches beside the clean one.

    ``target`` ``[K, B, M] float32`` multi-hot (all-zero rows are clean) and ``mask`` ``[K, B, M]
    float32`` each branch's presence mask (the shared rule, DESIGN.md §2); ``weights`` ``[K]``
    float32 the branches' weights in the loss (no gradient); ``spread`` ``[B] float32`` in [0, 1],
    each example's share of the collapse strength (``1 - mi.strength_spread * u``,
    ``u ~ U[0, 1]``; all ones without a spread). K = 1 with per-example targets drawn by the
    controller; K = 2^M - 2 with ``mi.every_pattern`` (every removal pattern, every step)."""

    target: jax.Array
    mask: jax.Array
    weights: jax.Array
    spread: jax.Array


def null_embeddings(encode, params, batch, *, modalities) -> jax.Array:
    """The encoder's output for an all-zero input with each example's lengths: ``[B, M, d]``.

    The encoder is row-wise and reads an example's features and ``lengths`` only, so a zero
    input's embedding depends on its lengths alone, clipped to ``[1, T_m]`` as the model's time
    mask clips them. With ``T = max_m T_m < B`` the zero input is encoded once per length
    (``T`` rows, row ``j`` of length ``min(j + 1, T_m)``) and each example gathers its row; else
    the whole zero-filled batch is encoded. Equal to the full pass (tests/test_methods.py).

    Args:
      encode: ``(params, batch) -> [B, M, d]`` (`model.ApplyFns.encode`).
      params: the model's params pytree.
      batch: dict with one array per modality (``[B, T_m, D_m]`` or ``[B, D_m]``), ``lengths``
        ``[B, M] int32`` and any other keys.
      modalities: the M modality names, in the column order of ``lengths``.

    Returns:
      ``[B, M, d]``, the dtype of ``encode``'s output.
    """
    num_m = len(modalities)
    batch_size = batch["lengths"].shape[0]
    steps = np.array([batch[m].shape[1] if batch[m].ndim == 3 else 1 for m in modalities])
    num_rows = int(steps.max())
    if num_rows >= batch_size:
        return encode(params, drop_modalities(batch, jnp.zeros(num_m), modalities=modalities,
                                              set_mask=False))
    table_batch = {k: v[:num_rows] for k, v in batch.items()}
    for m in modalities:
        table_batch[m] = jnp.zeros_like(table_batch[m])
    rows = np.minimum(np.arange(1, num_rows + 1)[:, None], steps[None, :])  # [T, M]
    table_batch["lengths"] = jnp.asarray(rows, batch["lengths"].dtype)
    table = encode(params, table_batch)  # [T, M, d]
    index = jnp.clip(batch["lengths"], 1, jnp.asarray(steps)) - 1  # [B, M]
    return table[index, jnp.arange(num_m)[None, :]]


def make_transform(config) -> optax.GradientTransformationExtraArgs | None:
    """The transform ModalImmune puts first in the trainer's chain: the curvature mask, or None."""
    mi = config.mi
    if not mi.curvature:
        return None
    return curvature_mask(quantile=mi.quantile, mode=mi.mask_mode, beta=mi.mask_beta)


def make_modalimmune(apply_fns, *, info, config) -> Method:
    """The ModalImmune :class:`Method` (module docstring)."""
    mi = config.mi
    mods = info.modalities
    num_m = len(mods)
    mask_prob = config.removal.mask_prob
    rec_variances = losses.reconstruction_variances(info)
    meta_tx = optax.adam(mi.meta_lr)
    meta_fields = {META_PARAMS[name] for name in parse_meta_params(mi.meta_params)}
    # Collapsing every modality at once leaves nothing to learn from: at most M - 1 targets.
    max_targets = max(1, min(mi.max_targets, num_m - 1))
    # The controller's arms: the M modalities, or the 2^M - 2 removal patterns.
    by_pattern = mi.controller_mode == "pattern" or mi.every_pattern
    pattern_keeps = ctrl_lib.removal_patterns(num_m)  # [P, M]
    arms = ([f"without={'+'.join(m for m, k in zip(mods, keep, strict=True) if not k)}"
             for keep in pattern_keeps] if by_pattern else list(mods))
    # Every missing pattern with at least one modality kept, the full set included.
    patterns = jnp.asarray(np.stack([np.ones(num_m, np.float32)] + [
        keep for _, keep in robustness.missing_conditions(mods)]))

    def task_losses(preds, batch):
        return losses.task_loss(preds, batch["label"], task=info.task,
                                regression_loss=config.loss.regression)

    def per_example_task(params, batch):
        return task_losses(apply_fns.apply(params, batch)["preds"], batch)

    def clean_task(params, batch):
        return jnp.mean(per_example_task(params, batch))

    def robust_val_loss(params, batch):
        def one(keep):
            return clean_task(params, drop_modalities(batch, keep, modalities=mods,
                                                      set_mask=False))
        return jnp.mean(jax.vmap(one)(patterns))

    # 1. Controller.
    def controller_step(state, params, batch, key, step):
        """``(controller, last_ig, target [K, B, M], weights [K])``: the IG refresh, the draw.

        With ``mi.every_pattern`` every pattern is a branch (K = P) weighted by
        ``(1 - uniform) softmax(G_S / tau) + uniform / P`` (uniform without the controller), and
        the gains are measured on the training pass itself (`gains_from_branches`); otherwise one
        branch (K = 1) with per-example targets.
        """
        k_ig, k_draw = jax.random.fold_in(key, 1), key
        controller, last_ig = state.controller, state.last_ig
        batch_size = batch["mask"].shape[0]
        if mi.every_pattern:
            flat = jnp.full([len(arms)], 1.0 / len(arms))
            weights = ((1.0 - mi.uniform) * jax.nn.softmax(controller.gain_ema / mi.tau)
                       + mi.uniform * flat) if mi.controller else flat
            target = jnp.broadcast_to((1.0 - pattern_keeps)[:, None, :],
                                      (len(arms), batch_size, num_m))
            return controller, last_ig, target, weights
        if mi.controller:
            def refresh(c):
                if by_pattern:
                    ig = ctrl_lib.pattern_information_gain(
                        per_example_task, params, batch, keeps=pattern_keeps, modalities=mods,
                        key=k_ig, mask_prob=mask_prob)
                else:
                    ig = ctrl_lib.information_gain(per_example_task, params, batch,
                                                   modalities=mods, key=k_ig,
                                                   mask_prob=mask_prob)
                return ctrl_lib.update_controller(c, ig, beta=mi.ema_beta), ig
            controller, last_ig = jax.lax.cond(step % mi.ig_every == 0, refresh,
                                               lambda c: (c, last_ig), controller)
        # Off: the same draw from a flat gain, i.e. uniform targets (patterns).
        policy = controller if mi.controller else ctrl_lib.init_controller(len(arms))
        if by_pattern:
            # Group-DRO style: each example's whole pattern from softmax(G_S / tau), mixed with
            # the uniform distribution so that no pattern's gain goes stale.
            draw = lambda k, n: ctrl_lib.select_patterns(
                policy, k, keeps=pattern_keeps, batch_size=n, p_clean=mi.p_clean, tau=mi.tau,
                uniform=mi.uniform)
            target = (draw(k_draw, batch_size) if mi.per_example else
                      jnp.broadcast_to(draw(k_draw, 1), (batch_size, num_m)))
            return controller, last_ig, target[None], jnp.ones([1])
        draw = lambda k: ctrl_lib.select_target(policy, k, p_clean=mi.p_clean, tau=mi.tau,
                                                max_targets=max_targets)
        if mi.per_example:
            # Each example gets its own targets from the same policy: the collapse operator is a
            # batch statistic, but which rows it replaces varies, as ModDrop's patterns do.
            target = jax.vmap(draw)(jax.random.split(k_draw, batch_size))
        else:
            target = jnp.broadcast_to(draw(k_draw), (batch_size, num_m))
        return controller, last_ig, target[None], jnp.ones([1])

    def gains_from_branches(controller, last_ig, aux, step):
        """``mi.every_pattern``: each pattern's gain, ``L_S - L_clean``, from the training pass
        (no extra forward), folded into the EMA every ``ig_every`` steps."""
        if not (mi.every_pattern and mi.controller):
            return controller, last_ig
        ig = aux["branch_task_loss"] - jax.lax.stop_gradient(aux["task_loss"])

        def refresh(c):
            return ctrl_lib.update_controller(c, ig, beta=mi.ema_beta), ig
        return jax.lax.cond(step % mi.ig_every == 0, refresh, lambda c: (c, last_ig), controller)

    # 2. Collapse and objective.
    def removal(batch, target, weights, key) -> Removal:
        """The shared removal rule (DESIGN.md §2) on this step's targets ``[K, B, M]``."""
        batch_size = target.shape[1]
        spread = 1.0 - mi.strength_spread * jax.random.uniform(jax.random.fold_in(key, 1),
                                                               (batch_size,))
        keys = jax.random.split(key, target.shape[0])
        mask = jax.vmap(lambda t, k: training_mask(batch["mask"], 1.0 - t, key=k,
                                                   mask_prob=mask_prob))(target, keys)
        return Removal(target, mask, jax.lax.stop_gradient(weights), spread)

    def objective(params, batch, phi, hit: Removal, key):
        """``((total, destructive), (aux, z))`` for one batch (module docstring, item 2).

        The encoders run once: every branch's collapsed embedding comes from the same ``z`` (a
        removed modality's rows replaced by their collapse, or by the zero-filled input's
        embedding in the zero-fill variant), so a branch costs a fusion and a head only.
        ``key``: the model's dropout (a fixed key makes the objective a deterministic function
        of the params, as the meta-update's HVPs need).
        """
        k_enc, k_clean, k_col = jax.random.split(key, 3)
        strength = jax.nn.sigmoid(phi.logit_strength)
        z = apply_fns.encode(params, batch, rng=k_enc)  # [B, M, d]
        h_clean, preds_clean = apply_fns.head(params, z, batch["mask"], rng=k_clean)
        if mi.collapse:
            z_null = (null_embeddings(apply_fns.encode, params, batch, modalities=mods)
                      if mi.anchor == "null" else None)
            # A spread gives each example its own strength in [s (1 - spread), s]: partial
            # destruction (corruption) as well as the complete one (a missing modality).
            z_col = collapse_target(z, jnp.ones(num_m),
                                    strength * hit.spread if mi.strength_spread else strength,
                                    mi.gamma, collapse_fn=spectral.spectral_collapse, null=z_null)
        else:
            # Zero-fill: the encoders on the zero-filled input, with the same dropout.
            z_col = apply_fns.encode(params, drop_modalities(
                batch, jnp.zeros(num_m), modalities=mods, set_mask=False), rng=k_enc)

        def branch(target, mask, k):
            z_hit = z + target[..., None] * (z_col - z)  # [B, M, d]
            h_col, preds_col = apply_fns.head(params, z_hit, mask, rng=k)
            # Each branch averages over the examples that lost something (the others would only
            # repeat the clean term).
            rows = jnp.max(target, axis=1)  # [B]
            hit_mean = lambda v: jnp.sum(rows * v) / jnp.maximum(jnp.sum(rows), 1.0)
            task = hit_mean(task_losses(preds_col, batch))
            # "collapsed_uniform": KL to the uniform prediction (zero logits), a confidence
            # penalty on the collapsed branch (Pereyra et al., 2017) without a teacher.
            reference = (jnp.zeros_like(preds_col) if mi.distill_kl == "collapsed_uniform"
                         else preds_clean)
            distill = (hit_mean(prediction_divergence(
                preds_col, reference, task=info.task,
                reference_first=mi.distill_kl == "clean_collapsed",
                temperature=mi.distill_temperature))
                       if mi.distill_weight else jnp.zeros([]))
            rec = jnp.mean(losses.reconstruction_loss(apply_fns.reconstruct(params, h_col),
                                                      losses.pooled_features(batch, mods),
                                                      variances=rec_variances))
            return h_col, task, distill, rec

        num_branches = hit.target.shape[0]
        h_col, task_k, distill_k, rec_k = jax.vmap(branch)(
            hit.target, hit.mask, jax.random.split(k_col, num_branches))
        if mi.regularizer:
            # One SVD at a time: a batched LAPACK SVD deadlocked XLA:CPU (model.collapse_target).
            reg_k = jax.lax.map(lambda h: spectral.collapse_regularizer(
                jax.lax.stop_gradient(h_clean), h), h_col)
        else:
            reg_k = jnp.zeros([num_branches])
        weigh = lambda v: jnp.sum(hit.weights * v)
        task_clean = jnp.mean(task_losses(preds_clean, batch))
        task_col, reg, distill, rec = weigh(task_k), weigh(reg_k), weigh(distill_k), weigh(rec_k)
        lam_c, lam_r = jnp.exp(phi.log_reg_weight), jnp.exp(phi.log_rec_weight)
        # 0 on an all-clean batch: the collapsed branch then equals the clean one.
        any_hit = jnp.max(hit.target)
        destructive = any_hit * (mi.collapse_weight * task_col + lam_c * reg
                                 + mi.distill_weight * distill)
        total = task_clean + destructive + lam_r * rec
        aux = {"task_loss": task_clean, "collapsed_task_loss": task_col, "regularizer": reg,
               "rec_loss": rec, "strength": strength, "distill": distill,
               "branch_task_loss": jax.lax.stop_gradient(task_k)}
        return (total, destructive), (aux, z)

    # 3. Curvature.
    def curvature_step(ema, params, batch, key, step):
        """The Hessian-diagonal EMA, refreshed by Hutchinson every ``curv_every`` steps."""
        def refresh(e):
            diag = curvature.hutchinson_diagonal(lambda p: clean_task(p, batch), params, key,
                                                 mi.curv_probes)
            return curvature.update_curvature_ema(e, diag, decay=mi.curv_decay)
        return jax.lax.cond(step % mi.curv_every == 0, refresh, lambda e: e, ema)

    # 4. Meta-parameters: a `Periodic` update, its own program (methods/base.py says why).
    def meta_update(state, params, batch, meta_batch, hit, key, k_dropout) -> MetaUpdate:
        """The certified meta-update of ``(phi, meta_opt, cert, meta_skips)`` at ``params``."""
        hg, c = hypergrad.implicit_hypergradient(
            lambda p, f: objective(p, batch, f, hit, k_dropout)[0][0],
            lambda p: robust_val_loss(p, meta_batch), params, state.phi,
            num_terms=mi.neumann_terms, damping=mi.damping, key=key,
            num_lanczos_iters=mi.num_lanczos_iters, floor_curvature=mi.floor_curvature)
        # Only the chosen components move (mi.meta_params); the others keep their values.
        hg = MetaParams(*[g if name in meta_fields else jnp.zeros_like(g)
                          for name, g in zip(MetaParams._fields, hg, strict=True)])
        ok = c["valid"] & jnp.all(jnp.array([jnp.all(jnp.isfinite(x))
                                             for x in jax.tree.leaves(hg)]))
        upd, new_opt = meta_tx.update(hg, state.meta_opt, state.phi)
        new_phi = optax.apply_updates(state.phi, upd)
        pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(ok, x, y), a, b)
        cert = Certificate(**{k: jnp.asarray(c[k], jnp.float32) for k in Certificate._fields})
        return MetaUpdate(pick(new_phi, state.phi), pick(new_opt, state.meta_opt), cert,
                          state.meta_skips + (1 - ok.astype(jnp.int32)))

    def meta_compute(params, state, batch, rng, *, step, meta_batch) -> MetaUpdate:
        """`Periodic.compute`: this step's removal drawn as ``grads`` draws it, then the update."""
        k_target, k_absent, _, k_meta, k_dropout = step_keys(rng)
        hit = draw_removal(state, params, batch, k_target, k_absent, step)[-1]
        return meta_update(state, params, batch, meta_batch, hit, k_meta, k_dropout)

    def meta_apply(state: ModalImmuneState, pending: MetaUpdate):
        """`Periodic.apply`: the update into the state, and the measurements it changes."""
        state = state._replace(**pending._asdict())
        return state, meta_measurements(state)

    def meta_measurements(state: ModalImmuneState) -> dict:
        return {"meta_skips": state.meta_skips,
                "reg_weight": jnp.exp(state.phi.log_reg_weight),
                "rec_weight": jnp.exp(state.phi.log_rec_weight),
                **{f"cert/{k}": v for k, v in state.cert._asdict().items()}}

    def diagnostics_step(state, z, target, step):
        """The most-hit target's effective rank, on logged steps only (an SVD of ``[B, d]``)."""
        done = step + 1
        logged = (done % config.log_every == 0) | (done == config.num_steps)
        most_hit = jnp.argmax(jnp.sum(target, axis=(0, 1)))
        return jax.lax.cond(logged, lambda: spectral.effective_rank(z[:, most_hit]),
                            lambda: state.effective_rank)

    def init(params) -> ModalImmuneState:
        phi = MetaParams(
            logit_strength=jnp.asarray(np.log(mi.strength / (1 - mi.strength)), jnp.float32),
            log_reg_weight=jnp.log(jnp.float32(mi.reg_weight)),
            log_rec_weight=jnp.log(jnp.float32(config.loss.reconstruction)))
        zero = jnp.zeros([], jnp.float32)
        return ModalImmuneState(
            controller=ctrl_lib.init_controller(len(arms)),
            last_ig=jnp.zeros([len(arms)], jnp.float32),
            curvature=curvature.init_curvature_ema(params), phi=phi, meta_opt=meta_tx.init(phi),
            cert=Certificate(*[zero] * len(Certificate._fields)),
            meta_skips=jnp.zeros([], jnp.int32), effective_rank=zero)

    def step_keys(rng):
        """``(k_target, k_absent, k_curv, k_meta, k_dropout)``, the same in ``grads`` and the
        meta-update, so both see this step's removal."""
        k_target, k_absent, k_curv, k_meta = jax.random.split(rng, 4)
        return k_target, k_absent, k_curv, k_meta, jax.random.fold_in(rng, 5)

    def draw_removal(state, params, batch, k_target, k_absent, step):
        """``(controller, last_ig, target, hit)``: the controller's sub-step and its `Removal`."""
        controller, last_ig, target, weights = controller_step(state, params, batch, k_target,
                                                               step)
        return controller, last_ig, target, removal(batch, target, weights, k_absent)

    def grads(params, state: ModalImmuneState, batch, rng, *, step, meta_batch):
        del meta_batch  # the meta-update's (`Periodic`), not the step's
        k_target, k_absent, k_curv, _, k_dropout = step_keys(rng)
        controller, last_ig, target, hit = draw_removal(state, params, batch, k_target,
                                                        k_absent, step)
        loss_fn = lambda p: objective(p, batch, state.phi, hit, k_dropout)
        tx_args = {}
        curv = state.curvature
        if mi.curvature:
            total, destructive, g, g_destr, (aux, z) = split_gradients_joint(loss_fn, params,
                                                                             has_aux=True)
            curv = curvature_step(curv, params, batch, k_curv, step)
            tx_args = {"curvature": curv, "destructive": g_destr}
        else:
            # Nothing reads the destructive gradient: one cotangent, not two.
            def total_fn(p):
                (total, destructive), aux = loss_fn(p)
                return total, (destructive, aux)
            (total, (destructive, (aux, z))), g = jax.value_and_grad(total_fn, has_aux=True)(
                params)
        controller, last_ig = gains_from_branches(controller, last_ig, aux, step)
        new_state = state._replace(
            controller=controller, last_ig=last_ig, curvature=curv,
            effective_rank=diagnostics_step(state, z, target, step))
        aux = {k: v for k, v in aux.items() if k != "branch_task_loss"}
        meas = {**aux, "loss": total, "destructive_loss": destructive,
                "effective_rank_target": new_state.effective_rank,
                # How often each modality was collapsed in this batch, and how many per example.
                **{f"target_rate/{m}": jnp.mean(target[..., i]) for i, m in enumerate(mods)},
                "num_targets": jnp.mean(jnp.sum(target, axis=-1)),
                **meta_measurements(new_state),
                **{f"ig/{m}": last_ig[i] for i, m in enumerate(arms)},
                **{f"gain_ema/{m}": controller.gain_ema[i] for i, m in enumerate(arms)}}
        return g, new_state, meas, tx_args

    periodic = (Periodic(due=lambda step: step > 0 and step % mi.meta_every == 0,
                         compute=meta_compute, apply=meta_apply) if mi.meta else None)
    return Method(init=init, grads=grads, transform=make_transform(config), periodic=periodic)
