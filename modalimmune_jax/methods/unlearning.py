"""Modality unlearning: forget one modality of a trained model (DESIGN.md §4, second table).

The pure pieces `experiments/unlearn.py` assembles into the six methods. Every loss factory returns
``loss_fn(params, frozen, batch, rng) -> (loss, measurements)``, where ``frozen`` is the trained
model's params (a constant of the unlearning run; only CCU reads it).

Vocabulary. ``m`` is the forgotten modality, ``index`` its column in ``batch["mask"]``.

- **Retain batch**: ``x`` with m removed by the shared training rule
  (``interventions.remove_for_training``, DESIGN.md §2): zero-filled, and flagged absent (mask 0)
  with probability ``mask_prob`` per example. ``mask_prob`` is the trained run's
  ``config.removal.mask_prob``, so unlearning trains both protocols in the same proportion as the
  model it starts from (retained utility is reported under both, DESIGN.md §5).
- **Forget batch**: ``x`` with only m kept, the others removed the same way (one flag per
  example for all its removals).
- **Forget gate** (:func:`forget_gate`): a model that never sees m. Its encoder input ``x_m`` is
  zero-filled and m's length set to 1 (a sequence's length is information about ``x_m`` too), so
  ``z_m`` is the *null embedding* ``E_m(0)``, one row for every sample: what ModalImmune's full
  collapse (``spectral_collapse`` at strength 1, re-centred on the null anchor) lands on, without
  an SVD. m is also flagged absent, so the `zero` and `mask` protocols coincide, and m's
  reconstruction carries no gradient, so ``x_m`` is never a training target either. `retrain` and
  `modalimmune` deploy the gated model.

Losses (retain terms use the task loss only: the reconstruction term's target includes ``x_m``):

- `finetune`, `modalimmune`, MANU's finetune: ``L = mean_b l(f(x_retain), y)``.
- `neggrad`: ``L = mean_b l(f(x_retain), y) - w_f mean_b min(l(f(x_forget), y), c)``, where the
  clamp ``c`` defaults to the loss of the best input-independent predictor (:func:`chance_loss`):
  past it, ascending only makes the forget predictions confidently wrong, which is information too.
- `ccu` (2509.23895, our reading; the paper gives no equations):
  ``L = w_inv L_inv + w_proto L_proto + w_kl L_kl + w_task L_task + w_full L_full
  + w_sep L_sep`` with
  ``L_inv`` :func:`inverse_contrastive_loss` plus ``w_proto`` :func:`prototype_loss` on m's
  embeddings ``z_m`` of the full batch (selective unlearning; the pair-level loss alone left a
  linear probe at 0.66-0.73 on digits, chance 0.10),
  ``L_kl = mean_b KL(q_theta(x_retain) || p_frozen(x))`` (cross-modal knowledge retention: the
  student without m distils the trained model's full-input predictions; MSE for regression;
  `baselines.prediction_divergence`), ``L_task`` the retain task loss, ``L_full`` the task loss
  on the full input with ``z_m`` held fixed (no gradient), so the rest of the model learns to
  live with the forgotten embedding while only ``L_inv`` and ``L_proto`` move m's encoder
  (``w_full = w_proto = 0`` gives CCU's three losses alone; without ``L_full`` the full-input
  accuracy fell to 0.12 on digits), and ``L_sep`` :func:`separation_loss` between the joint
  representations of the forget and retain batches (dual-set separation).
- `manu` (2502.15910): :func:`activation_sums`, :func:`activation_statistics`, :func:`manu_scores`
  and :func:`prune_rows` score the output neurons of m's encoder layers and zero the top fraction.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from modalimmune_jax import losses
from modalimmune_jax.interventions import gate_modalities, remove_for_training
from modalimmune_jax.methods.base import Method
from modalimmune_jax.methods.baselines import prediction_divergence
from modalimmune_jax.model import ApplyFns, time_mask

METHODS = ("retrain", "finetune", "neggrad", "ccu", "manu", "modalimmune")
STATISTICS = ("abs", "var", "rms")
# MANU's stabilizer in I^forget / (I^retain + eps) (2502.15910).
MANU_EPS = 1e-5


# ------------------------------------------------------------------------------------ batches


def forget_gate(apply_fns: ApplyFns, *, index: int, modalities: Sequence[str]) -> ApplyFns:
    """The model with modality `index` cut off at the input (module docstring, "Forget gate").

    `interventions.gate_modalities` with every modality but `index` kept: ``encode`` gives
    ``z_m = E_m(0)`` for every sample, ``head`` ignores m, ``reconstruct`` stops m's gradient.
    """
    keep = [0.0 if i == index else 1.0 for i in range(len(modalities))]
    return gate_modalities(apply_fns, keep, modalities=modalities)


def discrete_labels(labels: np.ndarray, *, task: str) -> np.ndarray:
    """Integer classes for probes and contrastive positives: ``[N]`` int64.

    classification: the label; multilabel ``[N, K]``: the binary code ``sum_k y_k 2^k``;
    regression: ``y >= 0`` (MMSA's Has0 split of sentiment scores).
    """
    y = np.asarray(labels)
    if task == "classification":
        return y.reshape(-1).astype(np.int64)
    if task == "multilabel":
        return (y.astype(np.int64) << np.arange(y.shape[-1])).sum(axis=-1)
    if task == "regression":
        return (y.reshape(-1) >= 0).astype(np.int64)
    raise ValueError(f"unknown task {task!r}")


def num_discrete_classes(info) -> int:
    """How many values :func:`discrete_labels` takes for `info`'s task (a one-hot width)."""
    if info.task == "classification":
        return int(info.num_classes)
    if info.task == "multilabel":
        return 2 ** int(info.num_classes)
    return 2


def _discrete_labels_jax(labels, task):
    if task == "classification":
        return labels.astype(jnp.int32)
    if task == "multilabel":
        return jnp.sum(labels.astype(jnp.int32) << jnp.arange(labels.shape[-1]), axis=-1)
    return (labels >= 0).astype(jnp.int32)


def chance_loss(labels: np.ndarray, *, task: str, num_classes: int,
                regression_loss: str = "l1") -> float:
    """Task loss of the best input-independent predictor on `labels` (a train split).

    classification: the prior's entropy ``-sum_c pi_c log pi_c``; multilabel: the mean binary
    entropy over the K targets; regression: ``mean |y - median y|`` (l1) or ``var y`` (mse).
    """
    y = np.asarray(labels)
    if task == "classification":
        pi = np.bincount(y.reshape(-1).astype(np.int64), minlength=num_classes) / y.size
    elif task == "multilabel":
        p = y.astype(np.float64).mean(axis=0)  # [K]
        pi = np.stack([p, 1.0 - p], axis=-1)
    elif task == "regression":
        y = y.astype(np.float64).reshape(-1)
        return float(np.mean(np.abs(y - np.median(y))) if regression_loss == "l1" else np.var(y))
    else:
        raise ValueError(f"unknown task {task!r}")
    ent = -np.sum(np.where(pi > 0, pi * np.log(np.where(pi > 0, pi, 1.0)), 0.0), axis=-1)
    return float(np.mean(ent))


# ------------------------------------------------------------------------------------- losses


def _task(preds, labels, info, regression_loss):
    return losses.task_loss(preds, labels, task=info.task, regression_loss=regression_loss)


def make_retain_loss(apply_fns, *, info, index, hparams, mask_prob, regression_loss="l1"):
    """``L = mean_b l(f(x_retain), y)``: `finetune`, `modalimmune` and MANU's finetune.

    Args (shared by every factory here):
      apply_fns: the model's pure functions (gated or not).
      info: the dataset's ``DatasetInfo`` (modalities, task).
      index: the forgotten modality's column.
      hparams: `studies.unlearn.default_hparams()` (the method's block).
      mask_prob: the trained run's ``config.removal.mask_prob``: the probability that an
        example's removals are also flagged absent (DESIGN.md §2's shared rule).
      regression_loss: ``config.loss.regression``.

    Returns:
      ``loss_fn(params, frozen, batch, rng) -> (scalar float32, {name: scalar})``.
    """
    keep = 1.0 - jax.nn.one_hot(index, len(info.modalities))

    def loss_fn(params, frozen, batch, rng):
        del frozen
        retain = remove_for_training(batch, keep, key=rng, mask_prob=mask_prob,
                                     modalities=info.modalities)
        loss = jnp.mean(_task(apply_fns.apply(params, retain)["preds"], batch["label"], info,
                              regression_loss))
        return loss, {"retain_loss": loss}

    return loss_fn


def make_neggrad_loss(apply_fns, *, info, index, hparams, mask_prob, max_forget_loss,
                      regression_loss="l1"):
    """``L = L_retain - w_f mean_b min(l(f(x_forget), y), max_forget_loss)`` (module docstring).

    `max_forget_loss` is the per-example clamp (a float; :func:`chance_loss` by default).
    """
    mods = info.modalities
    only = jax.nn.one_hot(index, len(mods))

    def loss_fn(params, frozen, batch, rng):
        del frozen
        k_r, k_f = jax.random.split(rng)
        retain = remove_for_training(batch, 1.0 - only, key=k_r, mask_prob=mask_prob,
                                     modalities=mods)
        forget = remove_for_training(batch, only, key=k_f, mask_prob=mask_prob, modalities=mods)
        l_r = jnp.mean(_task(apply_fns.apply(params, retain)["preds"], batch["label"], info,
                             regression_loss))
        l_f = _task(apply_fns.apply(params, forget)["preds"], batch["label"], info,
                    regression_loss)  # [B]
        # Per example: a forget sample stops pushing once it reaches the chance-level loss.
        ascended = jnp.mean(jnp.minimum(l_f, max_forget_loss))
        loss = l_r - hparams.neggrad.forget_weight * ascended
        return loss, {"retain_loss": l_r, "forget_loss": jnp.mean(l_f),
                      "clamped_fraction": jnp.mean((l_f >= max_forget_loss).astype(jnp.float32))}

    return loss_fn


def _normalize(x, eps=1e-12):
    # x / ||x||, with a finite gradient at x = 0 (a collapsed row).
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps))


def inverse_contrastive_loss(z: jax.typing.ArrayLike, classes: jax.typing.ArrayLike, *,
                             temperature: float) -> jax.Array:
    """CCU's selective unlearning: no sample may find its class-mates more similar than chance.

    With ``u_i = normalize(z_i - mean_b z)``, ``p_ij = softmax_{j != i}(u_i . u_j / tau)``, the
    positives ``P(i) = {j != i : c_j = c_i}`` and the anchors ``A = {i : |P(i)| > 0}``::

        L_inv = 1/|A| sum_{i in A} max(0, log( (B - 1)/|P(i)| * sum_{j in P(i)} p_ij )).

    Supervised contrastive learning turned around and stopped at chance: each anchor's positive
    softmax mass is pushed down to its share under a uniform ``p_i``, ``|P(i)|/(B - 1)``, and no
    further (beyond it, anti-similarity would separate the classes again). It removes class
    structure only part of the way: on digits (forgetting `left`, 300 steps) a linear probe on
    ``z_m`` went from 0.82 to 0.73 accuracy (chance 0.10); squared-Euclidean similarities, a
    batch-level clamp, no clamp, or 10x the weight did no better (0.78-0.82).

    Args:
      z: ``[B, d]`` float embeddings of the forgotten modality.
      classes: ``[B]`` int classes (:func:`discrete_labels`).
      temperature: softmax temperature ``tau > 0``.

    Returns:
      Scalar float32 ``>= 0``.

    Reference: 2509.23895 (CCU), "selective visual unlearning"; Khosla et al., SupCon (2020).
    """
    z = jnp.asarray(z, jnp.float32)
    classes = jnp.asarray(classes)
    b = z.shape[0]
    u = _normalize(z - jnp.mean(z, axis=0, keepdims=True))
    eye = jnp.eye(b, dtype=bool)
    # A finite large negative, not -inf: the excluded entries must not put NaN in the gradient.
    logits = jnp.where(eye, -1e9, u @ u.T / temperature)
    logp = jax.nn.log_softmax(logits, axis=-1)  # [B, B]
    pos = (classes[:, None] == classes[None, :]) & ~eye
    n_pos = jnp.sum(pos, axis=-1)
    log_mass = jax.nn.logsumexp(jnp.where(pos, logp, -1e9), axis=-1)
    excess = log_mass + jnp.log(b - 1.0) - jnp.log(jnp.maximum(n_pos, 1).astype(jnp.float32))
    anchor = n_pos > 0
    per = jnp.where(anchor, jax.nn.relu(excess), 0.0)
    return jnp.sum(per) / jnp.maximum(jnp.sum(anchor), 1)


def prototype_loss(z: jax.typing.ArrayLike, classes: jax.typing.ArrayLike, *,
                   num_classes: int, eps: float = 1e-12) -> jax.Array:
    """CCU's inverse contrast at the class level: class prototypes of ``z_m`` pulled together.

    With each feature standardized over the batch, ``u_bj = (z_bj - mean_b z_j) / std_b z_j``
    (the probe's own standardization), the class prototypes ``mu_cj = mean_{b: c_b = c} u_bj``
    and the class shares ``p_c = n_c / B``::

        L_proto = 1/d sum_j sum_c p_c mu_cj^2,

    the mean over features of the correlation ratio ``eta_j^2`` (between-class over total
    variance, in [0, 1]). :func:`inverse_contrastive_loss` acts through cosine similarities, which
    the high-variance directions dominate; a linear probe on standardized features reads the
    low-variance ones as well. ``L_proto = 0`` means no feature's class means differ. That is not
    enough for a multi-class probe: its argmax over linear scores still reads a class that sits on
    both sides of the common mean along a direction of its own. Measured on digits (CCU at batch
    512, lr 1e-2, 300 steps, forgetting `left`): eta^2 0.005 on the whole train split, probe 0.65.

    Args:
      z: ``[B, d]`` float embeddings of the forgotten modality.
      classes: ``[B]`` int classes in ``[0, num_classes)`` (:func:`discrete_labels`).
      num_classes: static number of classes (the one-hot width).
      eps: variance floor for a constant feature.

    Returns:
      Scalar float32 in ``[0, 1]``.
    """
    z = jnp.asarray(z, jnp.float32)
    centred = z - jnp.mean(z, axis=0, keepdims=True)
    u = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=0, keepdims=True) + eps)
    onehot = jax.nn.one_hot(classes, num_classes, dtype=jnp.float32)  # [B, C]
    counts = jnp.sum(onehot, axis=0)  # [C]
    protos = (onehot.T @ u) / jnp.maximum(counts, 1.0)[:, None]  # [C, d]
    shares = counts / z.shape[0]
    return jnp.sum(shares[:, None] * jnp.square(protos)) / z.shape[1]


def separation_loss(h_forget: jax.typing.ArrayLike, h_retain: jax.typing.ArrayLike, *,
                    margin: float) -> jax.Array:
    """CCU's dual-set separation: a sample's forget and retain representations stay apart.

    With ``c = mean_b h_retain`` and ``cos_i = cos(h_forget_i - c, h_retain_i - c)`` (the retain
    side without gradient)::

        L_sep = mean_b max(0, margin - (1 - cos_i)),

    a hinge on the cosine distance: the joint representation that m alone produces for a sample
    must not point where the other modalities put it (what m alone would need to reproduce the
    sample's semantics), while the retain representations stay put.

    Args:
      h_forget: ``[B, d_h]`` joint representation of the forget batch (only m present).
      h_retain: ``[B, d_h]`` joint representation of the retain batch (m removed), same samples.
      margin: required cosine distance in ``[0, 2]``.

    Returns:
      Scalar float32 ``>= 0``.
    """
    h_retain = jax.lax.stop_gradient(jnp.asarray(h_retain, jnp.float32))
    c = jnp.mean(h_retain, axis=0, keepdims=True)
    cos = jnp.sum(_normalize(jnp.asarray(h_forget, jnp.float32) - c) * _normalize(h_retain - c),
                  axis=-1)
    return jnp.mean(jax.nn.relu(margin - (1.0 - cos)))


def make_ccu_loss(apply_fns, *, info, index, hparams, mask_prob, regression_loss="l1"):
    """CCU: ``w_inv L_inv + w_proto L_proto + w_kl L_kl + w_task L_task + w_full L_full
    + w_sep L_sep`` (module docstring)."""
    mods = info.modalities
    only = jax.nn.one_hot(index, len(mods))
    cc = hparams.ccu
    num_classes = num_discrete_classes(info)

    def loss_fn(params, frozen, batch, rng):
        k_r, k_f = jax.random.split(rng)
        retain = remove_for_training(batch, 1.0 - only, key=k_r, mask_prob=mask_prob,
                                     modalities=mods)
        forget = remove_for_training(batch, only, key=k_f, mask_prob=mask_prob, modalities=mods)
        z = apply_fns.encode(params, batch)  # [B, M, d]
        classes = _discrete_labels_jax(batch["label"], info.task)
        l_inv = inverse_contrastive_loss(z[:, index], classes, temperature=cc.temperature)
        l_proto = prototype_loss(z[:, index], classes, num_classes=num_classes)
        out_r = apply_fns.apply(params, retain)
        # The trained model's knowledge is its full-input prediction; its prediction with m
        # removed is what forgetting must improve on (0.53 accuracy on digits without `left`,
        # retrain 0.94), so the retain student distils the full-input teacher.
        ref = apply_fns.apply(jax.lax.stop_gradient(frozen), batch)["preds"]
        l_kl = jnp.mean(prediction_divergence(out_r["preds"], ref, task=info.task))
        l_task = jnp.mean(_task(out_r["preds"], batch["label"], info, regression_loss))
        # The full input with z_m taken as it is (no gradient): the rest of the model learns to
        # live with the forgotten embedding, while only L_inv moves m's encoder.
        z_fixed = z.at[:, index].set(jax.lax.stop_gradient(z[:, index]))
        _, preds_full = apply_fns.head(params, z_fixed, batch["mask"])
        l_full = jnp.mean(_task(preds_full, batch["label"], info, regression_loss))
        h_f, _ = apply_fns.head(params, apply_fns.encode(params, forget), forget["mask"])
        l_sep = separation_loss(h_f, out_r["h"], margin=cc.margin)
        loss = (cc.inverse_weight * l_inv + cc.prototype_weight * l_proto
                + cc.kl_weight * l_kl + cc.task_weight * l_task
                + cc.full_weight * l_full + cc.separation_weight * l_sep)
        return loss, {"inverse_contrastive": l_inv, "prototype": l_proto, "kl_retention": l_kl,
                      "retain_loss": l_task,
                      "full_task_loss": l_full, "separation": l_sep}

    return loss_fn


# --------------------------------------------------------------------------------------- MANU


def _names(path) -> tuple:
    # (DictKey('encoders'), DictKey(0), ..., GetAttrKey('value')) -> ('encoders', 0, ...)
    return tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))


def encoder_layer_activations(
    graphdef: nnx.GraphDef, params, batch: Mapping[str, jax.Array], *, index: int, modality: str
) -> dict[tuple, tuple[jax.Array, jax.Array]]:
    """Outputs of every Linear/Conv layer of encoder `index`, with their validity weights.

    Args:
      graphdef: the FusionModel's graphdef (``nnx.split(model, nnx.Param)``).
      params: its params pytree.
      batch: DESIGN.md §2 batch.
      index: the encoder's modality column; `modality` its name.

    Returns:
      ``{layer path inside the encoder: (acts, weights)}`` with acts ``[B, T, n]`` or ``[B, n]``
      float32 and weights ``[B, T]`` or ``[B]``: 1 on valid timesteps (padding is not an
      activation).
    """
    enc = nnx.merge(graphdef, params).encoders[index]
    lengths = batch["lengths"][:, index]
    _, inter = nnx.capture(enc, nnx.Intermediate, method_outputs=nnx.Intermediate)(
        batch[modality], lengths)
    out = {}
    for path, mod in nnx.iter_modules(enc):
        if path and isinstance(mod, (nnx.Linear, nnx.Conv)):
            node = inter
            for p in path:
                node = node[p]
            acts = node["__call__"].get_value()[0]
            weights = (time_mask(lengths, acts.shape[1]) if acts.ndim == 3
                       else jnp.ones(acts.shape[:1], jnp.float32))
            out[tuple(path)] = (acts.astype(jnp.float32), weights)
    return out


def activation_sums(acts: jax.typing.ArrayLike, weights: jax.typing.ArrayLike) -> dict:
    """Weighted sums per output neuron, to accumulate over batches.

    Args:
      acts: ``[..., n]`` float activations; weights: ``acts.shape[:-1]`` float (0 = ignore).

    Returns:
      ``{"count": [] , "sum": [n], "sum_sq": [n], "sum_abs": [n]}`` float32.
    """
    acts = jnp.asarray(acts, jnp.float32)
    w = jnp.asarray(weights, jnp.float32)[..., None]
    axes = tuple(range(acts.ndim - 1))
    return {"count": jnp.sum(w), "sum": jnp.sum(w * acts, axis=axes),
            "sum_sq": jnp.sum(w * acts * acts, axis=axes),
            "sum_abs": jnp.sum(w * jnp.abs(acts), axis=axes)}


def activation_statistics(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """MANU's per-neuron statistics from :func:`activation_sums` (accumulated), in float64.

    ``abs = mean |a|``, ``var = mean a^2 - (mean a)^2`` (population variance),
    ``rms = sqrt(mean a^2)``, each ``[n]``.
    """
    n = np.float64(sums["count"])
    mean = np.asarray(sums["sum"], np.float64) / n
    mean_sq = np.asarray(sums["sum_sq"], np.float64) / n
    return {"abs": np.asarray(sums["sum_abs"], np.float64) / n,
            "var": np.maximum(mean_sq - mean * mean, 0.0), "rms": np.sqrt(mean_sq)}


def manu_scores(forget: Mapping[str, np.ndarray], retain: Mapping[str, np.ndarray],
                weights: Mapping[str, float]) -> np.ndarray:
    """``S = sum_f w_f (I_f^forget / (I_f^retain + 1e-5) - 1)`` per neuron, ``f`` in abs/var/rms.

    Args:
      forget, retain: :func:`activation_statistics` of one layer on forget and retain inputs.
      weights: ``{"abs": w, "var": w, "rms": w}``.

    Returns:
      ``[n]`` float64; a high score marks a neuron that fires for the forget data only.

    Reference: 2502.15910 (MANU), DESIGN.md §4.
    """
    return sum(weights[f] * (np.asarray(forget[f]) / (np.asarray(retain[f]) + MANU_EPS) - 1.0)
               for f in STATISTICS)


def top_fraction(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean ``[n]``: the ``round(fraction * n)`` highest scores (ties broken by lower index)."""
    scores = np.asarray(scores)
    k = int(round(fraction * scores.size))
    order = np.argsort(-scores, kind="stable")
    pruned = np.zeros(scores.size, bool)
    pruned[order[:k]] = True
    return pruned


def prune_rows(params, masks: Mapping[tuple, np.ndarray], *, index: int):
    """Zeroes the output neurons ``masks[layer] == True`` of encoder `index`'s layers.

    An output neuron (a "row" of the layer's output) is a column of the kernel, whose last axis is
    the output, and an entry of the bias. Pure and jit-able, so the finetune step can re-apply it.

    Args:
      params: the model's params pytree.
      masks: ``{layer path inside the encoder: [n] bool}`` (True = pruned).
      index: the encoder.

    Returns:
      The params pytree with those columns and biases set to 0.
    """
    keep = {path: jnp.asarray(~np.asarray(m), jnp.float32) for path, m in masks.items()}

    def one(path, x):
        names = _names(path)
        if names[:2] == ("encoders", index) and names[2:-1] in keep:
            return x * keep[names[2:-1]].astype(x.dtype)  # broadcasts over the last (output) axis
        return x

    return jax.tree_util.tree_map_with_path(one, params)


# ------------------------------------------------------------------ the trainer's view of them


class UnlearningState(NamedTuple):
    """The trained model's params: a constant of an unlearning run (CCU's KL teacher)."""

    frozen: Any


def as_method(loss_fn, *, grad_fn=None):
    """A `methods.Method` from ``loss_fn(params, frozen, batch, rng) -> (loss, measurements)``.

    The trainer starts the run from the trained params (its ``init_params`` hook); ``init`` keeps
    a copy of them as ``frozen``. ``grad_fn`` (``grads -> grads``) post-processes the gradient,
    e.g. MANU's `prune_rows`, which keeps pruned neurons at exactly zero (with their gradient
    zero and their value zero, neither adam nor the weight decay moves them).
    """
    def init(params):
        return UnlearningState(frozen=params)

    def grads(params, state, batch, rng, *, step, meta_batch):
        del step, meta_batch
        (loss, meas), g = jax.value_and_grad(loss_fn, has_aux=True)(params, state.frozen, batch,
                                                                    rng)
        if grad_fn is not None:
            g = grad_fn(g)
        return g, state, {**meas, "loss": loss}, {}

    return Method(init=init, grads=grads)
