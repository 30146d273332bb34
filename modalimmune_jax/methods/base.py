"""What every training method is to the trainer: a `Method`, and `loss_method` for the simple ones.

A method is a pair of pure functions over pytrees and an optional optimizer transform:

- ``init(params) -> state``: the method's state (a NamedTuple for ModalImmune: controller,
  curvature EMA, meta-parameters; ``{}`` for the baselines);
- ``grads(params, state, batch, rng, *, step, meta_batch) -> (grads, state, measurements,
  tx_args)``: the gradient, the new state, the scalars to log, and ``tx_args``, a dict of the
  keyword extras for ``tx.update`` (``{}`` for the baselines; ModalImmune's ``curvature=`` and
  ``destructive=``);
- ``transform``: an `optax.GradientTransformationExtraArgs` that the trainer puts FIRST in its
  chain, before clipping and adamw, all inside `optax.apply_if_finite` (ModalImmune's curvature
  mask), or None.

The trainer applies ``grads`` with its optimizer, so every method shares the same optimizer,
clipping, non-finite guard, sharding and checkpointing.
"""

from typing import Any, NamedTuple

import jax


def check_number(name: str, value, lo=None, hi=None, *, lo_open=False, hi_open=False) -> None:
    """Raises ValueError unless `value` is a real number in the interval; the message names
    ``config.<name>``. Config validation and the methods' own config blocks share it."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and (
        (lo is None or (value > lo if lo_open else value >= lo))
        and (hi is None or (value < hi if hi_open else value <= hi)))
    if not ok:
        interval = (f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, "
                    f"{'inf' if hi is None else hi}{')' if hi_open or hi is None else ']'}")
        raise ValueError(f"config.{name} must be a number in {interval}, got {value!r}")


class Method(NamedTuple):
    """A training method: its state initializer, its gradient function, its optimizer transform."""

    init: Any
    grads: Any
    transform: Any = None


def loss_method(loss_fn, *, grad_fn=None) -> Method:
    """A stateless method from ``loss_fn(params, batch, rng) -> (loss, measurements)``.

    ``grad_fn`` (``(grads, step) -> grads``) post-processes the gradient (OGM-GE's modulation).
    """

    def grads(params, state, batch, rng, *, step, meta_batch):
        del meta_batch
        (loss, meas), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
        if grad_fn is not None:
            g = grad_fn(g, step)
        return g, state, {**meas, "loss": loss}, {}

    return Method(init=lambda params: {}, grads=grads)
