"""Training methods, selected by ``config.method`` (DESIGN.md §4).

Each is a `base.Method` (``init``, ``grads``, an optional optimizer ``transform``); the trainer
applies its gradient with one shared optimizer, non-finite guard, sharding and checkpointing. A
new method is a module here, an entry in `FACTORIES`, a config block and a test
(docs/architecture.md).
"""

from modalimmune_jax.methods.base import Method, loss_method
from modalimmune_jax.methods.baselines import (
    make_consistency_loss,
    make_erm_loss,
    make_moddrop_loss,
)
from modalimmune_jax.methods.modalimmune import make_modalimmune
from modalimmune_jax.methods.ogm_ge import make_ogm_ge

FACTORIES = {
    "erm": lambda fns, **kw: loss_method(make_erm_loss(fns, **kw)),
    "moddrop": lambda fns, **kw: loss_method(make_moddrop_loss(fns, **kw)),
    "consistency": lambda fns, **kw: loss_method(make_consistency_loss(fns, **kw)),
    "ogm_ge": make_ogm_ge,
    "modalimmune": make_modalimmune,
}
METHODS = tuple(FACTORIES)
# Methods that remove or rebalance modalities: meaningless with a single one.
MULTIMODAL_ONLY = ("moddrop", "ogm_ge", "modalimmune")


def make_method(name, apply_fns, *, info, config) -> Method:
    """The :class:`Method` for ``config.method`` = `name`."""
    if name not in FACTORIES:
        raise ValueError(f"config.method: unknown method {name!r}; expected one of {METHODS}")
    return FACTORIES[name](apply_fns, info=info, config=config)


__all__ = ["FACTORIES", "METHODS", "MULTIMODAL_ONLY", "Method", "loss_method", "make_method"]
