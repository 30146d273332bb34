"""Per-example task losses and the reconstruction loss (DESIGN.md §3.5, §3.6).

Losses are per example (``[B]``) so that the information gain (§3.1) and the robust validation loss
(§3.4) can average them their own way.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from modalimmune_jax.model import masked_mean, reconstruction_stats, time_mask

REGRESSION_LOSSES = ("l1", "mse")


def task_loss(preds: jax.Array, labels: jax.Array, *, task: str,
              regression_loss: str = "l1") -> jax.Array:
    """Per-example task loss.

    Args:
      preds: ``[B, C]`` logits (classification), ``[B]`` (regression) or ``[B, K, 2]`` (multilabel).
      labels: ``[B]`` int32, ``[B]`` float32, or ``[B, K]`` int32 in {0, 1}.
      task: "classification" | "regression" | "multilabel".
      regression_loss: "l1" (MMSA's choice for MOSI/MOSEI) or "mse".

    Returns:
      ``[B]`` float32.
    """
    if task == "classification":
        return optax.softmax_cross_entropy_with_integer_labels(preds, labels.astype(jnp.int32))
    if task == "multilabel":
        ce = optax.softmax_cross_entropy_with_integer_labels(preds, labels.astype(jnp.int32))
        return jnp.mean(ce, axis=-1)  # [B, K] -> [B]
    if task == "regression":
        err = preds - labels.astype(preds.dtype)
        return jnp.abs(err) if regression_loss == "l1" else jnp.square(err)
    raise ValueError(f"unknown task {task!r}")


def pooled_features(batch: Mapping[str, jax.Array], modalities: Sequence[str]) -> tuple:
    """Time-pooled features per modality: the reconstruction targets, each ``[B, D_m]``."""
    out = []
    for i, m in enumerate(modalities):
        x = batch[m]
        if x.ndim == 3:
            x = masked_mean(x, time_mask(batch["lengths"][:, i], x.shape[1]))
        out.append(x)
    return tuple(out)


def reconstruction_loss(recon: Sequence[jax.Array], targets: Sequence[jax.Array], *,
                        variances: Sequence[jax.typing.ArrayLike]) -> jax.Array:
    """Scale-free ``L_rec = Σ_m mean_j (D_m(h)_j - pool(x_m)_j)² / σ²_mj`` -> ``[B]`` per example.

    σ²_mj is the train variance of pooled feature j of modality m, so each term is that feature's
    share of unexplained variance (its batch mean is ``1 - R²_j``): rescaling a modality's
    features rescales its errors and its σ² alike and leaves the loss unchanged, and no view's
    units can swamp the task loss (issue 14: a view in the tens of thousands gave a reconstruction
    loss of 1.8e5 against a task loss of 2.2). DESIGN.md §3.5.

    Args:
      recon: per modality ``[B, D_m]`` float, the decoders' outputs.
      targets: per modality ``[B, D_m]`` float, `pooled_features` (no gradient flows to them).
      variances: per modality ``[D_m]`` float > 0, from `reconstruction_variances`.

    Returns:
      ``[B]`` float32.
    """
    return sum(jnp.mean(jnp.square(r - jax.lax.stop_gradient(t)) / v, axis=-1)
               for r, t, v in zip(recon, targets, variances, strict=True))


def reconstruction_variances(info) -> tuple[jax.Array, ...]:
    """The σ²_mj of `reconstruction_loss` from a DatasetInfo: per modality ``[D_m]`` float32.

    The floored train variances of the pooled stored features (``model.reconstruction_stats``);
    unit variances for a hand-made info without statistics.
    """
    stats = reconstruction_stats(info)
    return tuple(jnp.asarray(stats[m][1], jnp.float32) for m in info.modalities)


def r2_per_modality(recon: Sequence[jax.Array], targets: Sequence[jax.Array]) -> jax.Array:
    """Coefficient of determination per modality, pooled over feature dims: ``[M]`` float32."""
    out = []
    for r, t in zip(recon, targets, strict=True):
        ss_res = jnp.sum(jnp.square(t - r))
        ss_tot = jnp.sum(jnp.square(t - jnp.mean(t, axis=0, keepdims=True)))
        out.append(1.0 - ss_res / jnp.maximum(ss_tot, 1e-12))
    return jnp.stack(out)
