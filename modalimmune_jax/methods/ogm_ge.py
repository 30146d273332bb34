"""OGM-GE: on-the-fly gradient modulation with generalization enhancement (DESIGN.md §4).

Peng et al., "Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022. We
follow the official code (GeWu-Lab/OGM-GE_CVPR2022, ``main.py``, ``train_epoch``) and its
M-modality form (GeWu-Lab/BalanceBenchmark, ``balancemm/trainer/OGM_trainer.py``). One step:

1. **Gradient** of the `erm` objective on the full batch (task loss plus the reconstruction term
   every method here trains), ``baselines.supervised_loss``.
2. **Scores.** Each modality's own prediction is the model's output with only that modality
   present, the others removed by the shared training rule (``remove_for_training``, DESIGN.md
   §2), without gradient. ``s_m = sum_b score_b`` (:func:`example_scores`): the softmax
   probability of the true class, as in the official ``score_v = sum([softmax(out_v)[i][label[i]]
   ...])``.
3. **Coefficients** (:func:`modulation_coefficients`): ``ratio_m = s_m / (min_j s_j + 1e-5)``
   (BalanceBenchmark's M-modality ratio; with M = 2 it is the official ``score_v / score_a`` for
   the modality ahead), ``k_m = 1 - tanh(alpha * relu(ratio_m))`` if ``ratio_m > 1``, else 1.
4. **Modulation** (:func:`modulate_encoder_grads`), while ``step`` is inside the window: each
   *weight* leaf of encoder m becomes ``k_m g + N(0, (std(g) + 1e-8)^2)`` (GE; ``std`` of the
   unmodulated leaf, Bessel-corrected like torch's). Biases and LayerNorm scales keep their
   gradient; every other parameter (fusion, head, decoders) is untouched.

Our reading of the official code, line by line:

- ``coeff_v = 1 - tanh(args.alpha * relu(ratio_v))`` under ``if ratio_v > 1``: nothing is
  subtracted inside the relu, so the coefficient jumps from 1 to ``1 - tanh(alpha)`` as the ratio
  crosses 1 (the relu is a no-op there). BalanceBenchmark keeps it and clips at 0
  (``max(1 - tanh(self.alpha * relu(ratios[modality])), 0)``, a no-op since tanh < 1).
- Which parameters: ``if 'audio' in layer and len(parms.grad.size()) == 4`` (the encoders'
  conv kernels; their BatchNorm weights and biases are 1-D and skipped), and BalanceBenchmark's
  ``len(parms.grad.size()) != 1  ##Don't change the grad of bias for layer``. The coefficient
  and the noise go to the same leaves. Our encoders have no 4-D kernels and their attention
  biases are 2-D, so we select by role rather than rank: every leaf of ``encoders[m]`` except
  those named ``bias`` or ``scale``.
- The noise, ``torch.zeros_like(parms.grad).normal_(0, parms.grad.std().item() + 1e-8)``, is
  added to *every* modality's encoder weights, the modality behind (``k = 1``) included, and
  only inside ``modulation_starts <= epoch <= modulation_ends`` (official default 0 to 50 of 100
  epochs); ``--modulation OGM`` drops it. Our window is in fractions of ``config.num_steps``.
  Outside the window the coefficients are still computed (and logged) but not applied.

Scores for other tasks (not in the paper, which is classification only):

- multilabel (IEMOCAP, preds ``[B, K, 2]``): the mean over the K binary heads of the true
  class's probability;
- regression: ``exp(-l(pred, y))`` with ``l`` the task loss (``|e|`` for l1, ``e^2`` for mse).
  The true-class probability is ``exp(-cross-entropy)``, so this is the same quantity for the
  loss the model trains on: in ``(0, 1]``, 1 for a perfect prediction. A negative MAE would not
  do: the ratio of two negative numbers reverses the ordering, and a zero MAE divides by zero.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from modalimmune_jax import losses
from modalimmune_jax.interventions import remove_for_training
from modalimmune_jax.methods.base import Method, check_number
from modalimmune_jax.methods.baselines import supervised_loss

# The official code's guards: in the ratio's denominator (BalanceBenchmark's "prevent OOM") and
# added to the noise's std.
RATIO_EPS = 1e-5
STD_EPS = 1e-8
# Leaves that keep their gradient: torch's 1-D parameters (biases and norm weights).
UNMODULATED = ("bias", "scale")


def example_scores(preds: jax.Array, labels: jax.Array, *, task: str,
                   regression_loss: str = "l1") -> jax.Array:
    """How well one modality alone predicts each example: ``[B] float32`` in ``(0, 1]``.

    Args:
      preds: ``[B, C]`` logits, ``[B]`` regression outputs, or ``[B, K, 2]`` multilabel logits.
      labels: ``[B]`` int32, ``[B]`` float32, or ``[B, K]`` int32 in {0, 1}.
      task: "classification" | "regression" | "multilabel".
      regression_loss: "l1" or "mse" (``config.loss.regression``).

    Returns:
      The true class's softmax probability (classification), its mean over the K heads
      (multilabel), or ``exp(-loss)`` (regression); module docstring.
    """
    if task == "classification":
        probs = jax.nn.softmax(preds.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(probs, labels.astype(jnp.int32)[:, None], axis=-1)[:, 0]
    if task == "multilabel":
        probs = jax.nn.softmax(preds.astype(jnp.float32), axis=-1)  # [B, K, 2]
        true = jnp.take_along_axis(probs, labels.astype(jnp.int32)[..., None], axis=-1)[..., 0]
        return jnp.mean(true, axis=-1)  # [B, K] -> [B]
    if task == "regression":
        return jnp.exp(-losses.task_loss(preds.astype(jnp.float32), labels, task=task,
                                         regression_loss=regression_loss))
    raise ValueError(f"unknown task {task!r}")


def modulation_coefficients(scores: jax.typing.ArrayLike, *,
                            alpha: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
    """OGM's discrepancy ratios and gradient coefficients.

    ``ratio_m = s_m / (min_j s_j + 1e-5)``; ``k_m = 1 - tanh(alpha * relu(ratio_m))`` where
    ``ratio_m > 1``, else 1 (official ``main.py``, no 1 subtracted; module docstring).

    Args:
      scores: ``[M] float32``, each modality's summed score over the batch.
      alpha: scalar ``>= 0``.

    Returns:
      ``(ratio, coeff)``, each ``[M] float32``; ``coeff`` in ``(0, 1]``.
    """
    scores = jnp.asarray(scores, jnp.float32)
    ratio = scores / (jnp.min(scores) + RATIO_EPS)
    coeff = jnp.where(ratio > 1.0, 1.0 - jnp.tanh(alpha * jax.nn.relu(ratio)), 1.0)
    return ratio, coeff


def _keys(path) -> tuple:
    # ('encoders', 0, 'proj', 'kernel') from a State path (DictKeys, then GetAttrKey('value')) or
    # a plain dict/list path (DictKeys, SequenceKeys).
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(k.idx)
    return tuple(out)


def modulate_encoder_grads(grads, coeff: jax.typing.ArrayLike, *, key: jax.Array,
                           noise: bool, active: jax.typing.ArrayLike):
    """Scales encoder m's weight gradients by ``coeff[m]`` and adds GE noise (module docstring).

    Args:
      grads: gradient pytree shaped like the params; encoder m's leaves under
        ``["encoders"][m]`` (``FusionModel.encoders[m]``).
      coeff: ``[M] float32`` coefficients.
      key: PRNG key for the noise (one fold per leaf).
      noise: static; True for OGM-GE, False for OGM alone.
      active: scalar bool, whether the step is inside the modulation window.

    Returns:
      The gradient pytree: each weight leaf ``g`` of encoder m becomes
      ``k_m g + N(0, (std(g) + 1e-8)^2)`` (``std`` with ``ddof=1``) where ``active``; biases,
      LayerNorm scales and everything outside the encoders are returned as they are.
    """
    coeff = jnp.asarray(coeff, jnp.float32)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(grads)
    out = []
    for i, (path, g) in enumerate(leaves):
        names = _keys(path)
        if len(names) < 3 or names[0] != "encoders" or names[-1] in UNMODULATED:
            out.append(g)
            continue
        new = coeff[names[1]].astype(g.dtype) * g
        if noise:
            std = jnp.std(g, ddof=1) if g.size > 1 else jnp.zeros([], g.dtype)
            new = new + (std + STD_EPS) * jax.random.normal(jax.random.fold_in(key, i), g.shape,
                                                           g.dtype)
        out.append(jnp.where(active, new, g))
    return jax.tree_util.tree_unflatten(treedef, out)


def unimodal_scores(apply_fns, params, batch, *, key: jax.Array, mask_prob, task: str,
                    regression_loss: str, modalities: Sequence[str]) -> jax.Array:
    """Each modality's summed :func:`example_scores` with only it present: ``[M] float32``.

    The others are removed by ``remove_for_training`` (zero-fill, flagged absent with probability
    `mask_prob` per example); every pass uses the same `key`, so the same examples are flagged
    for every modality and the ratio compares modalities, not flag draws. No gradient; the M
    passes run as one ``lax.map``.
    """
    params, batch = jax.lax.stop_gradient((params, dict(batch)))
    only = jnp.eye(len(modalities))  # [M, M]: row m keeps m alone

    def one(keep):
        alone = remove_for_training(batch, keep, key=key, mask_prob=mask_prob,
                                    modalities=modalities)
        preds = apply_fns.apply(params, alone)["preds"]
        return jnp.sum(example_scores(preds, batch["label"], task=task,
                                      regression_loss=regression_loss))

    return jax.lax.map(one, only)


def check_config(config) -> None:
    """Raises ValueError naming the first invalid ``config.ogm_ge`` field."""
    block = config.ogm_ge
    check_number("ogm_ge.alpha", block.alpha, 0)
    check_number("ogm_ge.modulation_starts", block.modulation_starts, 0, 1)
    check_number("ogm_ge.modulation_ends", block.modulation_ends, block.modulation_starts, 1)
    if not isinstance(block.noise, bool):
        raise ValueError(f"config.ogm_ge.noise must be True or False, got {block.noise!r}")


def make_ogm_ge(apply_fns, *, info, config) -> Method:
    """The OGM-GE :class:`Method` (module docstring); stateless, ``init`` returns ``{}``.

    ``grads`` adds ``ogm/score/<m>`` (the mean per-example score), ``ogm/ratio/<m>``,
    ``ogm/coeff/<m>`` and ``ogm/modulating`` (1 inside the window) to the measurements.
    """
    og = config.ogm_ge
    mods = info.modalities
    # The window in steps, inclusive at both ends like the official epoch test.
    first, last = og.modulation_starts * config.num_steps, og.modulation_ends * config.num_steps

    def loss_fn(params, batch, key):
        # The model's dropout, as erm's (the unimodal scores below are deterministic).
        return supervised_loss(apply_fns, params, batch, info=info, config=config, rng=key)

    def grads(params, extra, batch, rng, *, step, meta_batch):
        del meta_batch
        k_remove, k_noise = jax.random.split(rng)
        (loss, meas), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch,
                                                                    jax.random.fold_in(rng, 1))
        scores = unimodal_scores(apply_fns, params, batch, key=k_remove,
                                 mask_prob=config.removal.mask_prob, task=info.task,
                                 regression_loss=config.loss.regression, modalities=mods)
        ratio, coeff = modulation_coefficients(scores, alpha=og.alpha)
        active = (step >= first) & (step <= last)
        g = modulate_encoder_grads(g, coeff, key=k_noise, noise=og.noise, active=active)
        num_examples = batch["mask"].shape[0]
        meas = {**meas, "loss": loss, "ogm/modulating": active.astype(jnp.float32),
                **{f"ogm/score/{m}": scores[i] / num_examples for i, m in enumerate(mods)},
                **{f"ogm/ratio/{m}": ratio[i] for i, m in enumerate(mods)},
                **{f"ogm/coeff/{m}": coeff[i] for i, m in enumerate(mods)}}
        return g, extra, meas, {}

    return Method(init=lambda params: {}, grads=grads)
