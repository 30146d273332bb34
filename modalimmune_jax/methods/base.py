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
  mask), or None;
- ``periodic``: a `Periodic` update that fires on a few steps only (ModalImmune's meta-update),
  or None. It is its own program rather than a ``lax.cond`` branch of the step: on XLA:CPU the
  untaken branch of a large ``cond`` cost every step ~1.8 ms (issue 15), and the step's first
  call compiles without it (~10 against 21 s on digits; the update's program compiles apart, at
  its first due step).

The trainer applies ``grads`` with its optimizer, so every method shares the same optimizer,
clipping, non-finite guard, sharding and checkpointing.
"""

from collections.abc import Callable
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


class Periodic(NamedTuple):
    """An update of the method's state, computed before the train step on some steps.

    - ``due(step: int) -> bool``: on the host, whether it fires at this step;
    - ``compute(params, state, batch, rng, *, step, meta_batch) -> pending``: pure, from the same
      arguments as ``grads`` (the state and params BEFORE the step);
    - ``apply(state, pending) -> (state, measurements)``: pure, puts ``pending`` into the state
      the step returned and overrides the step's measurements it changes.

    The trainer runs ``compute``, then the step, then ``apply``, and keeps the step's old state
    where the step's update was skipped (`training.step.make_periodic_step`): the same result as
    a ``lax.cond`` inside ``grads`` that updated the state from the pre-step values.
    """

    due: Callable[[int], bool]
    compute: Callable
    apply: Callable


class Method(NamedTuple):
    """A training method: its state initializer, its gradient function, its optimizer transform,
    its periodic update."""

    init: Any
    grads: Any
    transform: Any = None
    periodic: Periodic | None = None


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
