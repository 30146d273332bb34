"""Training methods, selected by ``config.method`` (DESIGN.md §4).

A method is a pair of pure functions over pytrees:
``init(params) -> extra`` (method state: controller, curvature EMA, meta-parameters; ``{}`` for the
baselines) and ``grads(params, extra, batch, rng, *, step, meta_batch) -> (grads, extra,
measurements)``. The trainer applies ``grads`` with its optimizer, so every method shares the same
optimizer, clipping, non-finite guard, sharding and checkpointing.
"""

from typing import Any, NamedTuple

import jax

from modalimmune_jax.methods.baselines import (make_consistency_loss, make_erm_loss,
                                               make_moddrop_loss)


class Method(NamedTuple):
    """A training method: its state initializer and its gradient function."""

    init: Any
    grads: Any


def loss_method(loss_fn) -> Method:
    """A stateless method from ``loss_fn(params, batch, rng) -> (loss, measurements)``."""

    def grads(params, extra, batch, rng, *, step, meta_batch):
        del step, meta_batch
        (loss, meas), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
        return g, extra, {**meas, "loss": loss}

    return Method(init=lambda params: {}, grads=grads)


def _modalimmune(apply_fns, *, info, config):
    from modalimmune_jax.methods.modalimmune import make_modalimmune  # noqa: PLC0415

    return make_modalimmune(apply_fns, info=info, config=config)


def _ogm_ge(apply_fns, *, info, config):
    from modalimmune_jax.methods.ogm_ge import make_ogm_ge  # noqa: PLC0415

    return make_ogm_ge(apply_fns, info=info, config=config)


FACTORIES = {
    "erm": lambda fns, **kw: loss_method(make_erm_loss(fns, **kw)),
    "moddrop": lambda fns, **kw: loss_method(make_moddrop_loss(fns, **kw)),
    "consistency": lambda fns, **kw: loss_method(make_consistency_loss(fns, **kw)),
    "ogm_ge": _ogm_ge,
    "modalimmune": _modalimmune,
}
METHODS = tuple(FACTORIES)
# Methods that remove or rebalance modalities: meaningless with a single one.
MULTIMODAL_ONLY = ("moddrop", "ogm_ge", "modalimmune")


def make_method(name, apply_fns, *, info, config) -> Method:
    """The :class:`Method` for ``config.method`` = `name`."""
    if name not in FACTORIES:
        raise ValueError(f"config.method: unknown method {name!r}; expected one of {METHODS}")
    return FACTORIES[name](apply_fns, info=info, config=config)
