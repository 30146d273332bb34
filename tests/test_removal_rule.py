"""Every training-time removal path follows the one shared rule (DESIGN.md §2).

A removed modality is zero-filled and, with probability ``config.removal.mask_prob`` drawn once
per example, flagged absent in the mask. Each path runs on an instrumented model whose ``head``
records, for every call, which modalities reached it zero-filled and the mask it was given:

- a modality flagged absent is always one that was removed (no kept modality loses its mask);
- at ``mask_prob = 0`` the mask never changes; at 1 every removal is flagged;
- in between, an example's removals are flagged all together or not at all, and the flagged
  fraction of examples matches ``mask_prob`` within binomial sampling error.

A new path is one more entry in ``PATHS``: a function that runs it once on the instrumented
model.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import default
from modalimmune_jax import controller, losses
from modalimmune_jax.methods import make_method, unlearning
from modalimmune_jax.model import ApplyFns, FusionModel, make_apply_fns
from modalimmune_jax.studies import unlearn

MODS = ("text", "audio", "vision")
BATCH = 2048
FEATURES = {"text": (3, 2), "audio": (4,), "vision": (2, 3)}
INFO = types.SimpleNamespace(modalities=MODS, task="classification", num_classes=3,
                             feature_shapes=FEATURES)


def _instrumented(records):
    """A tiny FusionModel's :class:`ApplyFns`, with a head that records what reaches it.

    The encoder output of a zero-filled modality is set to exactly 0 (a real encoder maps 0 to
    its bias), so the head can see which inputs were zero-filled; every other value is the real
    model's. ``apply`` is composed from these ``encode`` and ``head``, so a path that calls
    ``apply`` and one that calls ``encode``/``head`` itself are observed alike.
    """
    model = FusionModel(modalities=MODS, feature_shapes=FEATURES,
                        task="classification", num_classes=3, d=4, d_h=8, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    real = make_apply_fns(graphdef)

    def record(present, mask):
        records.append((np.asarray(present), np.asarray(mask)))

    def encode(p, batch, **kwargs):
        z = real.encode(p, batch, **kwargs)  # [B, M, d]
        present = jnp.stack([jnp.any(batch[m].reshape(batch[m].shape[0], -1) != 0, axis=1)
                             for m in MODS], axis=1)  # [B, M]
        return z * present[..., None]

    def head(p, z, mask, **kwargs):
        jax.debug.callback(record, jnp.any(z != 0, axis=-1), mask)
        return real.head(p, z, mask, **kwargs)

    def apply(p, batch, *, rng=None):
        z = encode(p, batch, rng=rng)
        h, preds = head(p, z, batch["mask"], rng=rng)
        return {"z": z, "h": h, "preds": preds, "recon": real.reconstruct(p, h)}

    return params, ApplyFns(encode=encode, head=head, reconstruct=real.reconstruct, apply=apply)


def _batch():
    rng = np.random.default_rng(0)
    return {"text": jnp.asarray(rng.normal(size=(BATCH, 3, 2)), jnp.float32),
            "audio": jnp.asarray(rng.normal(size=(BATCH, 4)), jnp.float32),
            "vision": jnp.asarray(rng.normal(size=(BATCH, 2, 3)), jnp.float32),
            "lengths": jnp.tile(jnp.array([[3, 1, 2]], jnp.int32), (BATCH, 1)),
            "mask": jnp.ones((BATCH, 3), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 3, BATCH), jnp.int32)}


def _method(name):
    def run(fns, params, batch, config, key):
        method = make_method(name, fns, info=INFO, config=config)
        return method.grads(params, method.init(params), batch, key, step=jnp.int32(0),
                            meta_batch=batch)
    return run


def _information_gain(fns, params, batch, config, key):
    def per_example(p, b):
        return losses.task_loss(fns.apply(p, b)["preds"], b["label"], task=INFO.task)
    return controller.information_gain(per_example, params, batch, modalities=MODS, key=key,
                                       mask_prob=config.removal.mask_prob)


def _unlearning(factory, **kw):
    def run(fns, params, batch, config, key):
        loss_fn = factory(fns, info=INFO, index=0, hparams=unlearn.default_hparams(),
                          mask_prob=config.removal.mask_prob, **kw)
        return jax.grad(lambda p: loss_fn(p, params, batch, key)[0])(params)
    return run


PATHS = {
    "moddrop": _method("moddrop"),
    "ogm_ge": _method("ogm_ge"),
    "information_gain": _information_gain,
    "unlearning_retain": _unlearning(unlearning.make_retain_loss),
    "unlearning_neggrad": _unlearning(unlearning.make_neggrad_loss, max_forget_loss=1.0),
    "unlearning_ccu": _unlearning(unlearning.make_ccu_loss),
}


@pytest.mark.parametrize("mask_prob", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_removal_path_follows_the_shared_rule(path, mask_prob):
    records = []
    params, fns = _instrumented(records)
    config = default.get_config("synthetic,tiny")
    with config.unlocked():
        config.removal.mask_prob = mask_prob
    run = jax.jit(lambda p, b, k: PATHS[path](fns, p, b, config, k))
    jax.block_until_ready(run(params, _batch(), jax.random.key(1)))
    jax.effects_barrier()
    assert records, "the head was never called"
    examples_with_removals = 0
    for present, mask in records:
        removed, flagged = ~present, mask == 0
        # Only a removed (zero-filled) modality is ever flagged; a kept one keeps mask 1.
        assert not np.any(flagged & present)
        hit = removed.any(axis=1)  # [B] examples that lost something in this call
        examples_with_removals += int(hit.sum())
        if mask_prob == 0.0:
            assert not flagged.any()
        elif mask_prob == 1.0:
            np.testing.assert_array_equal(flagged, removed)
        elif hit.any():
            # One flag per example: all of its removals, or none.
            all_flagged = np.all(flagged == removed, axis=1)
            none_flagged = ~flagged.any(axis=1)
            assert np.all(all_flagged | none_flagged)
            n = int(hit.sum())
            rate = float(np.mean(flagged.any(axis=1)[hit]))
            tol = 4.5 * np.sqrt(mask_prob * (1.0 - mask_prob) / n)
            assert abs(rate - mask_prob) <= tol, (rate, n)
    assert examples_with_removals > BATCH // 2, "the path removed (zero-filled) almost nothing"
