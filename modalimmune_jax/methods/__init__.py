"""Training methods, selected by ``config.method`` (DESIGN.md §4).

Each is a `base.Method` (``init``, ``grads``, an optional optimizer ``transform``, an optional
`base.Periodic` update); the trainer applies its gradient with one shared optimizer, non-finite
guard, sharding and checkpointing. A new method is a module here, an entry in `FACTORIES` (and
in `CONFIG_CHECKS` if its config block has rules), a config block and a test
(docs/architecture.md).
"""

from modalimmune_jax.methods import modalimmune, ogm_ge
from modalimmune_jax.methods.base import Method, Periodic, check_number, loss_method
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
# Each method's check of its own config block (raises ValueError naming the field). Every block
# is checked whatever config.method is, so a bad value never waits for the run that uses it.
CONFIG_CHECKS = {"ogm_ge": ogm_ge.check_config, "modalimmune": modalimmune.check_config}
# Methods that remove or rebalance modalities: meaningless with a single one.
MULTIMODAL_ONLY = ("moddrop", "ogm_ge", "modalimmune")


def check_config(config) -> None:
    """Runs every method's `CONFIG_CHECKS` entry on `config`."""
    for check in CONFIG_CHECKS.values():
        check(config)


def make_method(name, apply_fns, *, info, config) -> Method:
    """The :class:`Method` for ``config.method`` = `name`."""
    if name not in FACTORIES:
        raise ValueError(f"config.method: unknown method {name!r}; expected one of {METHODS}")
    return FACTORIES[name](apply_fns, info=info, config=config)


__all__ = ["CONFIG_CHECKS", "FACTORIES", "METHODS", "MULTIMODAL_ONLY", "Method", "Periodic",
           "check_config", "check_number", "loss_method", "make_method"]
