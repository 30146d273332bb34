"""Information-gain guided controller: which modality to collapse next.

DESIGN.md §3.1. The controller measures how much the model currently depends on each modality (a
signed leave-one-out information gain), keeps an EMA of it, and samples the collapse target from a
softmax over that EMA, leaving a fraction ``p_clean`` of steps clean. Everything is a pure
function of arrays: state in, state out, RNG passed in. The amortized refresh (every ``ig_every``
steps, under ``lax.cond``) is the train step's business.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from modalimmune_jax.interventions import remove_for_training
from modalimmune_jax.robustness import missing_conditions


def information_gain(
    loss_fn: Callable[[object, Mapping[str, jax.Array]], jax.Array],
    params: object,
    batch: Mapping[str, jax.Array],
    *,
    modalities: Sequence[str],
    key: jax.Array,
    mask_prob: jax.typing.ArrayLike,
) -> jax.Array:
    """Signed leave-one-out information gain of every modality on one batch.

    ``IG_m = mean_b[loss(x without m)_b] - mean_b[loss(x)_b]``, where "without m" is the shared
    training-time removal (``interventions.remove_for_training``, DESIGN.md §2): modality m is
    zero-filled and, for each example with probability ``mask_prob``, also flagged absent (mask
    column 0). Every leave-one-out pass uses the same `key`, so the same examples are flagged
    whichever modality is left out: the M gains differ only in the modality removed, not in the
    flag draw. Positive: the model needs m; zero: it ignores m; negative: removing m helps (e.g.
    m carries noise the model has fitted). No squaring, no clipping. Computed under
    ``stop_gradient``, with M + 1 forward passes run as one batched (``vmap``-ed) pass: this is
    `pattern_information_gain` over the M leave-one-out patterns.

    Args:
        loss_fn: ``loss_fn(params, batch)`` returning the per-example loss ``[B]`` (or any shape;
            its mean is the batch loss, so a scalar mean loss also works). Deterministic: close
            over any RNG (e.g. dropout off) so that the M + 1 passes differ only in the input.
        params: pytree of model parameters.
        batch: dict with one array per modality (``[B, T_m, D_m]`` or ``[B, D_m]``), ``"mask"``
            ``[B, M] float32``, the label and any other keys.
        modalities: the M modality names, in the column order of ``batch["mask"]``.
        key: PRNG key for the per-example mask flags of the removal rule.
        mask_prob: scalar in ``[0, 1]``, ``config.removal.mask_prob``: 0 leaves the mask at 1
            (the `zero` protocol), 1 flags every removal (the `mask` protocol).

    Returns:
        ``[M] float32``, the gain of each modality, in the order of ``modalities``.

    Reference: DESIGN.md §3.1 and §2 (the one removal rule); ModalImmune (arXiv 2602.16197),
    signed rather than squared.
    """
    leave_one_out = 1.0 - jnp.eye(len(modalities))  # [M, M]: row m removes modality m
    return pattern_information_gain(loss_fn, params, batch, keeps=leave_one_out,
                                    modalities=modalities, key=key, mask_prob=mask_prob)


def removal_patterns(num_modalities: int) -> np.ndarray:
    """Every missing-modality pattern: the ``2^M - 2`` proper non-empty subsets that are KEPT.

    In the order of `robustness.missing_conditions` (most kept first, then lexicographic), so
    pattern ``s`` is the test protocol's condition ``s``.

    Args:
      num_modalities: M >= 1 (M = 1 has no pattern: an empty ``[0, 1]`` array).

    Returns:
      ``[2^M - 2, M] float32`` keep vectors (1 kept, 0 removed).
    """
    names = [str(m) for m in range(num_modalities)]
    keeps = [keep for _, keep in missing_conditions(names)]
    return np.stack(keeps) if keeps else np.zeros((0, num_modalities), np.float32)


def pattern_information_gain(
    loss_fn: Callable[[object, Mapping[str, jax.Array]], jax.Array],
    params: object,
    batch: Mapping[str, jax.Array],
    *,
    keeps: jax.typing.ArrayLike,
    modalities: Sequence[str],
    key: jax.Array,
    mask_prob: jax.typing.ArrayLike,
) -> jax.Array:
    """Signed information gain of every removal pattern: ``IG_S = loss(x without S) - loss(x)``.

    The per-pattern form of `information_gain` (which is its special case ``keeps = 1 - I``):
    each row of `keeps` names what an example keeps; the rest is removed with the shared rule
    (`interventions.remove_for_training`, one `key` for every pattern, so the patterns differ
    only in what they remove). The P + 1 forward passes run as one ``vmap``-ed (batched) pass
    under ``stop_gradient``. A pattern that only removes modalities the model ignores has a gain
    of exactly 0 (tests/test_controller.py).

    Args:
      loss_fn: ``loss_fn(params, batch) -> [B]`` per-example loss, deterministic.
      params: pytree of model parameters.
      batch: dict with one array per modality, ``"mask"`` ``[B, M] float32`` and the label.
      keeps: ``[P, M]`` float, 1 keeps the modality (`removal_patterns`).
      modalities: the M modality names, in the column order of ``batch["mask"]``.
      key: PRNG key for the per-example mask flags of the removal rule.
      mask_prob: scalar in ``[0, 1]``, ``config.removal.mask_prob``.

    Returns:
      ``[P] float32``, the gain of each pattern.

    Reference: DESIGN.md §3.1 (the gain per removal pattern).
    """
    params, batch = jax.lax.stop_gradient((params, dict(batch)))
    keeps = jnp.asarray(keeps, jnp.float32)
    # Row 0 keeps everything (the clean loss; nothing removed, so no flag applies).
    rows = jnp.concatenate([jnp.ones((1, len(modalities))), keeps], axis=0)  # [P + 1, M]

    def batch_loss(keep):
        removed = remove_for_training(batch, keep, key=key, mask_prob=mask_prob,
                                      modalities=modalities)
        return jnp.mean(loss_fn(params, removed)).astype(jnp.float32)

    losses = jax.vmap(batch_loss)(rows)  # [P + 1]
    return jax.lax.stop_gradient(losses[1:] - losses[0])


def select_patterns(
    state: "ControllerState",
    key: jax.Array,
    *,
    keeps: jax.typing.ArrayLike,
    batch_size: int,
    p_clean: jax.typing.ArrayLike = 0.0,
    tau: jax.typing.ArrayLike = 1.0,
    uniform: jax.typing.ArrayLike = 0.0,
) -> jax.Array:
    """Draws each example's removal pattern: ``(1 - uniform) softmax(G_S / tau) + uniform / P``.

    Exponentiated weights over the patterns' gain EMA, in the sense of Group DRO: the pattern the
    model currently does worst on is drawn most. ``uniform`` mixes in the uniform distribution so
    that no pattern is ever starved (its gain would go stale). With probability ``p_clean`` an
    example is left clean (an all-zero row).

    Args:
      state: `ControllerState` whose ``gain_ema`` is ``[P]`` (one entry per pattern).
      key: a PRNG key.
      keeps: ``[P, M]`` keep vectors (`removal_patterns`).
      batch_size: B (static).
      p_clean: scalar probability that an example is left clean.
      tau: softmax temperature > 0.
      uniform: scalar in [0, 1], the share of the uniform distribution.

    Returns:
      ``[B, M] float32``: 1 where the example's pattern removes the modality (the targets).
    """
    keeps = jnp.asarray(keeps, jnp.float32)
    num_patterns = keeps.shape[0]
    probs = ((1.0 - uniform) * jax.nn.softmax(state.gain_ema / tau)
             + uniform / num_patterns)  # [P]
    k_pattern, k_clean = jax.random.split(key)
    pattern = jax.random.categorical(k_pattern, jnp.log(probs), shape=(batch_size,))  # [B]
    clean = jax.random.bernoulli(k_clean, p_clean, (batch_size,))
    return jnp.where(clean[:, None], 0.0, 1.0 - keeps[pattern])


class ControllerState(NamedTuple):
    """EMA of the per-modality information gain and the number of IG refreshes folded in."""

    gain_ema: jax.Array  # [M] float32
    count: jax.Array  # [] int32


def init_controller(num_modalities: int) -> ControllerState:
    """An empty controller: zero gains (a uniform policy) and no refreshes yet.

    Args:
        num_modalities: M.

    Returns:
        ``ControllerState`` with ``gain_ema`` ``[M] float32`` zeros and ``count`` ``[] int32`` 0.
    """
    return ControllerState(
        gain_ema=jnp.zeros((num_modalities,), jnp.float32), count=jnp.zeros([], jnp.int32)
    )


def update_controller(
    state: ControllerState, ig: jax.typing.ArrayLike, *, beta: float = 0.9
) -> ControllerState:
    """Folds a fresh information gain into the EMA.

    ``G <- IG`` on the first refresh (``count == 0``), then ``G <- beta G + (1 - beta) IG``.
    Starting from the first measurement rather than from zeros removes the EMA's bias towards 0
    without Adam-style ``1 / (1 - beta^t)`` corrections at read time, so ``gain_ema`` is always the
    estimate itself.

    Args:
        state: the current ``ControllerState``.
        ig: ``[M]`` float, from ``information_gain``.
        beta: EMA decay in ``[0, 1)``.

    Returns:
        The new ``ControllerState`` (``count`` incremented).

    Reference: DESIGN.md §3.1.
    """
    ig = jnp.asarray(ig, jnp.float32)
    blended = beta * state.gain_ema + (1.0 - beta) * ig
    gain_ema = jnp.where(state.count == 0, ig, blended)
    return ControllerState(gain_ema=gain_ema, count=state.count + 1)


def target_probabilities(
    state: ControllerState,
    *,
    p_clean: jax.typing.ArrayLike = 0.2,
    tau: jax.typing.ArrayLike = 1.0,
) -> jax.Array:
    """Probability that each modality is the collapse target: ``(1 - p_clean) softmax(G / tau)``.

    The remaining ``p_clean`` is the probability of a clean step (no target).

    Args:
        state: ``ControllerState`` with ``gain_ema`` ``[M]``.
        p_clean: scalar in ``[0, 1]``.
        tau: scalar temperature ``> 0``; small tau goes after the argmax of G.

    Returns:
        ``[M] float32``, summing to ``1 - p_clean``.
    """
    return (1.0 - jnp.asarray(p_clean, jnp.float32)) * jax.nn.softmax(state.gain_ema / tau)


def select_target(
    state: ControllerState,
    key: jax.Array,
    *,
    p_clean: jax.typing.ArrayLike = 0.2,
    tau: jax.typing.ArrayLike = 1.0,
    max_targets: int = 1,
) -> jax.Array:
    """Samples this step's collapse targets as a multi-hot vector (all zeros for a clean step).

    With probability ``p_clean`` the step is clean. Otherwise ``k ~ Uniform{1..max_targets}``
    targets are drawn without replacement from ``softmax(G / tau)`` (Gumbel top-k, i.e.
    Plackett-Luce), so the controller goes after the modality the model currently depends on most
    and, with ``k > 1``, after the next ones too: losing two of three modalities is also trained.
    ``max_targets=1`` is exactly ``m* ~ softmax(G / tau)`` (the same draw as
    ``jax.random.categorical`` with the same key).

    Args:
        state: ``ControllerState`` with ``gain_ema`` ``[M]``.
        key: a PRNG key.
        p_clean: scalar probability of a clean step.
        tau: scalar softmax temperature ``> 0``.
        max_targets: static int in ``[1, M]``; most modalities collapsed in one step.

    Returns:
        ``[M] float32``: multi-hot of the targets, or zeros on a clean step.

    Reference: DESIGN.md §3.1 (the multi-target draw is our extension, README "Formulation
    changes").
    """
    num_m = state.gain_ema.shape[-1]
    if not 1 <= max_targets <= num_m:
        raise ValueError(f"max_targets must be in [1, {num_m}], got {max_targets}")
    k_clean, k_target, k_count = jax.random.split(key, 3)
    clean = jax.random.bernoulli(k_clean, p_clean)
    scores = state.gain_ema / tau + jax.random.gumbel(k_target, state.gain_ema.shape)
    k = jax.random.randint(k_count, (), 1, max_targets + 1)
    # rank[i] = how many modalities score above i; the k best have rank < k.
    rank = jnp.sum(scores[None, :] > scores[:, None], axis=1)
    targets = (rank < k).astype(jnp.float32)
    return jnp.where(clean, jnp.zeros_like(targets), targets)
