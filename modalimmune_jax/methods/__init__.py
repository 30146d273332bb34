"""Training methods, selected by ``config.method`` (DESIGN.md §4).

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
clipping, non-finite guard, sharding and checkpointing. `make_transform` gives the transform from
the config alone, so that the trainer can build its optimizer before the method.
"""

from typing import Any, NamedTuple

import jax

from modalimmune_jax.methods.baselines import (
    make_consistency_loss,
    make_erm_loss,
    make_moddrop_loss,
)


class Method(NamedTuple):
    """A training method: its state initializer, its gradient function, its optimizer transform."""

    init: Any
    grads: Any
    transform: Any = None


def loss_method(loss_fn) -> Method:
    """A stateless method from ``loss_fn(params, batch, rng) -> (loss, measurements)``."""

    def grads(params, extra, batch, rng, *, step, meta_batch):
        del step, meta_batch
        (loss, meas), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
        return g, extra, {**meas, "loss": loss}, {}

    return Method(init=lambda params: {}, grads=grads)


def _modalimmune(apply_fns, *, info, config):
    from modalimmune_jax.methods.modalimmune import make_modalimmune  # noqa: PLC0415

    return make_modalimmune(apply_fns, info=info, config=config)


def _modalimmune_transform(config):
    from modalimmune_jax.methods.modalimmune import make_transform  # noqa: PLC0415

    return make_transform(config)


FACTORIES = {
    "erm": lambda fns, **kw: loss_method(make_erm_loss(fns, **kw)),
    "moddrop": lambda fns, **kw: loss_method(make_moddrop_loss(fns, **kw)),
    "consistency": lambda fns, **kw: loss_method(make_consistency_loss(fns, **kw)),
    "modalimmune": _modalimmune,
}
METHODS = tuple(FACTORIES)
# config -> the method's transform; a method without an entry has none.
TRANSFORMS = {"modalimmune": _modalimmune_transform}


def make_method(name, apply_fns, *, info, config) -> Method:
    """The :class:`Method` for ``config.method`` = `name`."""
    if name not in FACTORIES:
        raise ValueError(f"config.method: unknown method {name!r}; expected one of {METHODS}")
    return FACTORIES[name](apply_fns, info=info, config=config)


def make_transform(config):
    """``make_method(config.method, ...).transform``, from the config alone (or None)."""
    if config.method not in FACTORIES:
        raise ValueError(f"config.method: unknown method {config.method!r}; expected one of "
                         f"{METHODS}")
    build = TRANSFORMS.get(config.method)
    return None if build is None else build(config)
