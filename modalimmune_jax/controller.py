"""The information-gain guided controller (DESIGN.md §3.1).

``IG_m = mean_b[loss(f(x without m), y) - loss(f(x), y)]`` is the signed leave-one-out gain of each
modality; an EMA ``G`` carries it between amortized refreshes; the policy leaves a step clean with
probability ``p_clean`` and otherwise targets ``m* ~ softmax(G / tau)``: the modality the model
currently depends on most is the one most likely to be collapsed.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from modalimmune_jax.interventions import drop_modalities


class ControllerState(NamedTuple):
    """EMA of the gains ``gain_ema`` [M] float32 and ``count`` [] int32 refreshes so far."""

    gain_ema: jax.Array
    count: jax.Array


def information_gain(
    loss_fn: Callable, params, batch: Mapping[str, jax.Array], *, modalities: Sequence[str]
) -> jax.Array:
    """Signed leave-one-out information gain of every modality, with no gradient.

    ``IG_m = mean_b[ℓ(x without m) - ℓ(x)]``; "without m" zero-fills m and sets its mask to 0.
    Positive: the model needs m; about 0: it ignores m; negative: m hurts (the sign is kept).

    Args:
      loss_fn: ``(params, batch) -> [B]`` per-example loss (a scalar is taken as the mean).
      params: the model's params pytree.
      batch: batch dict (DESIGN.md §2).
      modalities: the M modality names, in mask column order (static).

    Returns:
      ``[M] float32``. M + 1 forward passes.
    """
    params = jax.lax.stop_gradient(params)
    batch = jax.lax.stop_gradient(batch)
    base = jnp.mean(loss_fn(params, batch))
    gains = []
    for i in range(len(modalities)):  # M is small and static
        keep = jnp.ones(len(modalities)).at[i].set(0.0)
        without = drop_modalities(batch, keep, modalities=modalities, set_mask=True)
        gains.append(jnp.mean(loss_fn(params, without)) - base)
    return jnp.stack(gains).astype(jnp.float32)


def init_controller(num_modalities: int) -> ControllerState:
    """Zero gains, zero refreshes."""
    return ControllerState(jnp.zeros([num_modalities], jnp.float32), jnp.zeros([], jnp.int32))


def update_controller(state: ControllerState, ig: jax.typing.ArrayLike, *,
                      beta: float = 0.9) -> ControllerState:
    """``G <- beta G + (1 - beta) IG``; the first refresh sets ``G = IG`` (no zero-start bias)."""
    ig = jnp.asarray(ig, jnp.float32)
    ema = jnp.where(state.count == 0, ig, beta * state.gain_ema + (1.0 - beta) * ig)
    return ControllerState(ema, state.count + 1)


def target_probabilities(state: ControllerState, *, p_clean: float = 0.2,
                         tau: float = 1.0) -> jax.Array:
    """Per-modality probability of being the step's target: ``(1 - p_clean) softmax(G / tau)``."""
    return (1.0 - p_clean) * jax.nn.softmax(state.gain_ema / tau)


def select_target(state: ControllerState, rng: jax.Array, *, p_clean: float = 0.2,
                  tau: float = 1.0) -> jax.Array:
    """One-hot ``[M] float32`` target, or all zeros for a clean step (probability p_clean)."""
    k_clean, k_pick = jax.random.split(rng)
    pick = jax.random.categorical(k_pick, state.gain_ema / tau)
    onehot = jax.nn.one_hot(pick, state.gain_ema.shape[0], dtype=jnp.float32)
    return jnp.where(jax.random.uniform(k_clean) < p_clean, jnp.zeros_like(onehot), onehot)
