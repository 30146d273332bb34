"""The optimizer and the pure train step every method shares (DESIGN.md §3.6 for ModalImmune's).

``train_state`` is a dict ``{"step", "params", "opt_state", "extra"}`` of plain pytrees, where
``extra`` is the method's own state (controller, curvature EMA, meta-parameters; ``{}`` for the
baselines). The step is jitted once over global arrays (batch sharded on ``data``, state
replicated) with the state donated.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

# Large enough that optax.apply_if_finite never applies a non-finite update itself: the loop
# aborts first, at config.optimizer.max_consecutive_nonfinite, with the last finite params saved.
_NEVER = 2**30


def make_optimizer(config: ml_collections.ConfigDict, *, transform=None):
    """``(tx, schedule)``: the method's transform, clipping, adamw with warmup-cosine.

    ``apply_if_finite(chain(transform, clip_by_global_norm, adamw))``, where ``transform`` is the
    method's (`methods.Method.transform`: ModalImmune's curvature mask, called with the
    ``tx_args`` its ``grads`` returns; None for the baselines), so a skipped update leaves its
    state too. A run no longer than its warmup warms up for all but its last step: optax's cosine
    part needs at least one decay step (``num_steps <= warmup_steps`` raised a ValueError before).
    """
    opt = config.optimizer
    warmup_steps = max(0, min(opt.warmup_steps, config.num_steps - 1))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.lr, warmup_steps=warmup_steps,
        decay_steps=config.num_steps, end_value=opt.lr * opt.end_lr_factor)
    tx = optax.chain(
        *([] if transform is None else [transform]),
        optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, weight_decay=opt.weight_decay))
    return optax.apply_if_finite(tx, max_consecutive_errors=_NEVER), schedule


def make_train_step(method, tx, schedule=None):
    """``train_step(train_state, batch, meta_batch, rng_loop) -> (train_state, measurements)``.

    Pure, for one ``jax.jit`` over global arrays (batch sharded on `data`, params replicated):
    every batch statistic inside it (the controller's IG, the collapse and regularizer spectra,
    the HVPs of Hutchinson, Lanczos and Neumann) is computed on the GLOBAL batch, with GSPMD
    inserting the cross-device reductions (tests/test_distributed.py: 8 devices == 1 device).
    ``rng_loop`` is an argument, not a closure constant, so that every seed shares one compiled
    program (and one persistent-cache entry); each step's key is ``fold_in(rng_loop, step)``, so a
    resumed run draws exactly what an uninterrupted one would. ``schedule`` (step -> lr) only adds
    ``lr`` to the measurements. The method's ``tx_args`` go to ``tx.update`` as keyword extras; a
    non-finite extra skips the update as a non-finite gradient does (`optax.apply_if_finite`
    checks the gradient only). The curvature mask's share of damped entries, kept in the
    optimizer state, is logged as ``mask_fraction``.
    """

    def train_step(train_state, batch, meta_batch, rng_loop):
        step = train_state["step"]
        rng_step = jax.random.fold_in(rng_loop, step)
        params = train_state["params"]
        grads, extra, meas, tx_args = method.grads(params, train_state["extra"], batch,
                                                   rng_step, step=step, meta_batch=meta_batch)
        if tx_args:
            finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                                        for x in jax.tree.leaves(tx_args)]))
            grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.nan), grads)
        updates, opt_state = tx.update(grads, train_state["opt_state"], params, **tx_args)
        new_params = optax.apply_updates(params, updates)
        # A skipped update skips the method's state too: one NaN batch must not leave a NaN
        # gain EMA or curvature EMA behind for the rest of the run (README "Reliability").
        extra = jax.tree.map(lambda new, old: jnp.where(opt_state.last_finite, new, old), extra,
                             train_state["extra"])
        meas.update(
            grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params),
            skipped=1 - opt_state.last_finite.astype(jnp.int32),
            consecutive_skips=opt_state.notfinite_count,
            total_skips=opt_state.total_notfinite)
        mask_fraction = optax.tree.get(opt_state, "fraction_masked", None)
        if mask_fraction is not None:
            meas["mask_fraction"] = mask_fraction
        if schedule is not None:
            meas["lr"] = schedule(step)
        return {"step": step + 1, "params": new_params, "opt_state": opt_state,
                "extra": extra}, meas

    return train_step


def make_periodic_step(periodic):
    """``(compute, merge)`` over the train state for a method's `methods.Periodic` update.

    ``compute(train_state, batch, meta_batch, rng_loop) -> pending`` runs before the step, from
    the pre-step state and the step's own key (``fold_in(rng_loop, step)``);
    ``merge(train_state, measurements, pending) -> (train_state, measurements)`` runs after it and
    keeps the step's state where the step's update was skipped (``skipped``), as the step itself
    keeps the method's old state then.
    """

    def compute(train_state, batch, meta_batch, rng_loop):
        step = train_state["step"]
        return periodic.compute(train_state["params"], train_state["extra"], batch,
                                jax.random.fold_in(rng_loop, step), step=step,
                                meta_batch=meta_batch)

    def merge(train_state, meas, pending):
        old = train_state["extra"]
        extra, changed = periodic.apply(old, pending)
        finite = meas["skipped"] == 0
        extra = jax.tree.map(lambda new, o: jnp.where(finite, new, o), extra, old)
        return {**train_state, "extra": extra}, {**meas, **changed}

    return compute, merge


class FlatStep(NamedTuple):
    """A jitted train step over the train state's *leaves* (a flat list), and the state's treedef.

    The params are an ``nnx.State`` of ``nnx.Variable``s: a jitted call that takes and returns
    it builds 105 (erm) to 197 (modalimmune) Variables per step on the host, 1.4 to 3.3 ms of
    dispatch on the digits model (issue 15) -- as long as erm's whole step. The loop keeps the
    leaves between steps and rebuilds the state only where it is read (evaluation, checkpoint).
    With a `methods.Periodic` update, `run` dispatches its two programs around the step on the
    steps where it is due (``compute`` and ``merge``, jitted; `make_periodic_step`).
    """

    step: Callable  # (leaves, batch, meta_batch, rng_loop) -> (leaves, measurements)
    treedef: Any
    due: Callable[[int], bool] = lambda step: False
    compute: Callable | None = None  # (leaves, batch, meta_batch, rng_loop) -> pending
    merge: Callable | None = None  # (leaves, measurements, pending) -> (leaves, measurements)

    def run(self, leaves, batch, meta_batch, rng_loop, *, step: int):
        """One training step at ``step`` (the state's own counter, as a host int)."""
        if self.compute is None or not self.due(step):
            return self.step(leaves, batch, meta_batch, rng_loop)
        pending = self.compute(leaves, batch, meta_batch, rng_loop)
        leaves, meas = self.step(leaves, batch, meta_batch, rng_loop)
        return self.merge(leaves, meas, pending)

    def leaves(self, train_state) -> list:
        return jax.tree.leaves(train_state)

    def state(self, leaves):
        return jax.tree.unflatten(self.treedef, leaves)


def jit_flat_step(train_step, abstract_state, *, replicated, data_sharding,
                  periodic=None, unpack=None) -> FlatStep:
    """`FlatStep` for ``train_step`` (`make_train_step`): the state donated and replicated, the
    batch and meta batch sharded like ``data_sharding``, ``rng_loop`` host-local; with the
    method's ``periodic`` update (`methods.Periodic`, or None) jitted the same way. With
    ``unpack`` (`mesh.BatchPacking.unpack`), the step takes the batch packed in one array and
    unpacks it inside the program; the meta batch stays a dict."""
    treedef = jax.tree.structure(abstract_state)
    unflat = lambda leaves: jax.tree.unflatten(treedef, leaves)
    unpack = unpack or (lambda batch: batch)

    @functools.wraps(train_step)  # compiles as jit(train_step), as the logs and tests name it
    def flat(leaves, batch, meta_batch, rng_loop):
        new_state, meas = train_step(unflat(leaves), unpack(batch), meta_batch, rng_loop)
        return jax.tree.leaves(new_state), meas

    inputs = (replicated, data_sharding, data_sharding, None)
    step = jax.jit(flat, donate_argnums=(0,), in_shardings=inputs,
                   out_shardings=(replicated, replicated))
    if periodic is None:
        return FlatStep(step, treedef)
    compute, merge = make_periodic_step(periodic)

    def flat_compute(leaves, batch, meta_batch, rng_loop):
        return compute(unflat(leaves), unpack(batch), meta_batch, rng_loop)

    def flat_merge(leaves, meas, pending):
        new_state, meas = merge(unflat(leaves), meas, pending)
        return jax.tree.leaves(new_state), meas

    return FlatStep(
        step, treedef, due=periodic.due,
        compute=jax.jit(flat_compute, in_shardings=inputs, out_shardings=replicated),
        merge=jax.jit(flat_merge, donate_argnums=(0,), out_shardings=(replicated, replicated)))


def make_init_fn(build_model, tx, method):
    """``init_fn(rng_init, params=None) -> train_state``, pure, for `jax.eval_shape` and `jax.jit`.

    Args:
      build_model: ``rng -> nnx.Module`` (the model of `trainer.setup`).
      tx: the optimizer.
      method: the training `Method`.

    ``params``, when given, is the pytree to start from instead of the model's random init (the
    "configured init" of a run: unlearning starts from a trained model's params); it is an
    argument rather than a closure constant so that jit does not bake it into the program.
    """

    def init_fn(rng_init, params=None):
        if params is None:
            params = nnx.state(build_model(rng_init), nnx.Param)
        return {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params),
                "extra": method.init(params)}

    return init_fn


def make_meta_batch(valid_arrays, batch_size, put):
    """The fixed held-out batch of the hypergradient's robust validation loss (DESIGN.md §3.4).

    The first ``n_meta = min(batch_size, len(valid))`` rows of valid, rounded down to the device
    count, as global arrays; each process puts its own slice (not the same first rows twice).
    """
    n_meta = min(batch_size, len(valid_arrays["label"]))
    n_meta -= n_meta % jax.device_count()
    rows = n_meta // jax.process_count()
    lo = jax.process_index() * rows
    return put({k: v[lo:lo + rows] for k, v in valid_arrays.items()})
