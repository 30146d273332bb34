"""Per-example task losses and the reconstruction loss (DESIGN.md §3.5, §3.6).

Losses are per example (``[B]``) so that the information gain (§3.1) and the robust validation loss
(§3.4) can average them their own way.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from modalimmune_jax.model import _time_mask, masked_mean

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
            x = masked_mean(x, _time_mask(batch["lengths"][:, i], x.shape[1]))
        out.append(x)
    return tuple(out)


def reconstruction_loss(recon: Sequence[jax.Array], targets: Sequence[jax.Array]) -> jax.Array:
    """``L_rec = Σ_m mean_b ||D_m(h) - pool(x_m)||² / D_m`` -> ``[B]`` per example.

    Dividing by ``D_m`` keeps modalities with wide features from dominating the sum.
    """
    return sum(jnp.mean(jnp.square(r - jax.lax.stop_gradient(t)), axis=-1)
               for r, t in zip(recon, targets))


def r2_per_modality(recon: Sequence[jax.Array], targets: Sequence[jax.Array]) -> jax.Array:
    """Coefficient of determination per modality, pooled over feature dims: ``[M]`` float32."""
    out = []
    for r, t in zip(recon, targets):
        ss_res = jnp.sum(jnp.square(t - r))
        ss_tot = jnp.sum(jnp.square(t - jnp.mean(t, axis=0, keepdims=True)))
        out.append(1.0 - ss_res / jnp.maximum(ss_tot, 1e-12))
    return jnp.stack(out)
