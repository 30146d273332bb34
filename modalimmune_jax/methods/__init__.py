"""Training methods, selected by ``config.method`` (DESIGN.md §4)."""

from modalimmune_jax.methods.baselines import make_erm_loss, make_moddrop_loss

LOSS_FACTORIES = {
    "erm": make_erm_loss,
    "moddrop": make_moddrop_loss,
}
METHODS = tuple(LOSS_FACTORIES)


def make_loss_fn(name, apply_fns, *, info, config):
    """``loss_fn(params, batch, rng) -> (loss, measurements)`` for method `name`."""
    if name not in LOSS_FACTORIES:
        raise ValueError(f"config.method: unknown method {name!r}; expected one of {METHODS}")
    return LOSS_FACTORIES[name](apply_fns, info=info, config=config)
