r"""Trains a multimodal model with one of the methods of DESIGN.md §4, then evaluates it.

  python -m experiments.train --config=experiments/configs/default.py:digits --workdir=/tmp/mi
  python -m experiments.train --config=experiments/configs/default.py:synthetic \
      --config.method=moddrop --config.seed=1 --workdir=/tmp/mi_syn

Writes config.json, metrics.jsonl, checkpoints/ (orbax) and eval.json into --workdir. A rerun with
the same --workdir resumes from the latest checkpoint.
"""

import contextlib
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags
from tqdm import tqdm

import data_pipelines
import grain.checkpoint as grain_ckpt
from experiments import config_lib, distributed, eval_lib, io_lib
from modalimmune_jax import methods
from modalimmune_jax.model import create_model, make_apply_fns
from modalimmune_jax.spectral import spectral_collapse

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs and checkpoints go.")

# Large enough that optax.apply_if_finite never applies a non-finite update itself: the loop
# aborts first, at config.optimizer.max_consecutive_nonfinite, with the last finite params saved.
_NEVER = 2**30


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite updates."""


class CheckpointError(RuntimeError):
    """No checkpoint in the workdir can be read."""


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The method's transform, then clipping and adamw with warmup-cosine; non-finite skipped.

    ``apply_if_finite(chain(transform, clip_by_global_norm, adamw))``, where ``transform`` is the
    method's (`methods.make_transform`: ModalImmune's curvature mask, called with the ``tx_args``
    its ``grads`` returns; none for the baselines), so a skipped update leaves its state too.
    A run no longer than its warmup warms up for all but its last step: optax's cosine part needs
    at least one decay step (``num_steps <= warmup_steps`` raised a ValueError before).
    """
    opt = config.optimizer
    warmup_steps = max(0, min(opt.warmup_steps, config.num_steps - 1))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.lr, warmup_steps=warmup_steps,
        decay_steps=config.num_steps, end_value=opt.lr * opt.end_lr_factor)
    transform = methods.make_transform(config)
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
    program (and one persistent-cache entry). ``schedule`` (step -> lr) only adds ``lr`` to the
    measurements. The method's ``tx_args`` go to ``tx.update`` as keyword extras; a non-finite
    extra skips the update as a non-finite gradient does (`optax.apply_if_finite` checks the
    gradient only). The curvature mask's share of damped entries, kept in the optimizer state,
    is logged as ``mask_fraction``.
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
        mask_fraction = optax.tree.get(opt_state, "fraction_masked")
        if mask_fraction is not None:
            meas["mask_fraction"] = mask_fraction
        if schedule is not None:
            meas["lr"] = schedule(step)
        return {"step": step + 1, "params": new_params, "opt_state": opt_state,
                "extra": extra}, meas

    return train_step


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


def make_mesh():
    """A 1-D data-parallel mesh over every device of every process."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def make_put_fn(data_sharding):
    """Host batch (this process's rows) -> global jax arrays sharded on the batch axis."""

    def put(batch):
        return {k: jax.make_array_from_process_local_data(data_sharding, np.asarray(v))
                for k, v in batch.items()}

    return put


def setup(config, workdir):
    """Validates the config and builds the data, model and pure functions shared with evaluate."""
    config_lib.validate_config(config, methods=methods.METHODS)
    data_dir = config.dataset.data_dir or os.path.join(workdir, "data")
    info = data_pipelines.prepare(config.dataset, data_dir=data_dir)
    if config.batch_size > info.split_sizes["train"]:
        raise config_lib.ConfigError(
            f"config.batch_size={config.batch_size} is larger than the training split "
            f"({info.split_sizes['train']} examples)")
    n_dev, n_proc = jax.device_count(), jax.process_count()
    for name in ("batch_size", "eval.batch_size"):
        value = config_lib._get(config, name)
        if value % n_dev or value % n_proc:
            raise config_lib.ConfigError(
                f"config.{name}={value} must be divisible by the device count ({n_dev}) and "
                f"the process count ({n_proc}) for data-parallel training")

    def build(rng):
        return create_model(info, config.model, rngs=nnx.Rngs(params=rng))

    abstract_model = nnx.eval_shape(lambda: build(jax.random.key(0)))
    graphdef, _ = nnx.split(abstract_model, nnx.Param)
    apply_fns = make_apply_fns(graphdef, collapse_fn=spectral_collapse)
    return info, data_dir, build, apply_fns


def make_init_fn(build_model, tx, method):
    """``init_fn(rng_init) -> train_state``, pure, for ``jax.eval_shape`` and ``jax.jit``."""

    def init_fn(rng_init):
        params = nnx.state(build_model(rng_init), nnx.Param)
        return {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params),
                "extra": method.init(params)}

    return init_fn


def abstract_checkpoint(abstract_state, sharding):
    """The checkpointed pytree's shapes: the train state plus the best-on-valid params."""
    tree = {"train": abstract_state, "best_params": abstract_state["params"]}
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def init_checkpoint_manager(workdir, config):
    return ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                             enable_async_checkpointing=False),
        item_names=("state", "data", "meta"))


def restore_best(workdir, config, *, build_model, apply_fns, info, sharding):
    """The best-on-valid params of `workdir`'s latest checkpoint: ``(params, meta, step)``.

    Shared by `evaluate`, `reproduce` and `unlearn`; the abstract target is built exactly as in
    training, so the restore checks every shape.
    """
    tx, _ = make_optimizer(config)
    method = methods.make_method(config.method, apply_fns, info=info, config=config)
    init_fn = make_init_fn(build_model, tx, method)
    abstract = abstract_checkpoint(jax.eval_shape(init_fn, jax.random.key(0)), sharding)
    mngr = init_checkpoint_manager(workdir, config)
    step = mngr.latest_step()
    if step is None:
        raise config_lib.ConfigError(f"--workdir={workdir}: no checkpoint to restore")
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    mngr.close()
    return restored["state"]["best_params"], restored["meta"], step


def _set_aside(mngr, steps):
    """Moves unreadable checkpoints to ``checkpoints.unreadable/`` (kept for inspection).

    The resumed run saves those steps again, and orbax refuses to overwrite an existing step.
    """
    folder = os.fspath(mngr.directory)
    if jax.process_index() == 0:
        os.makedirs(folder + ".unreadable", exist_ok=True)
        for step in steps:
            os.replace(os.path.join(folder, str(step)),
                       os.path.join(folder + ".unreadable", f"{step}.{time.time_ns()}"))
            logging.warning("moved the unreadable checkpoint %d to %s.unreadable/", step, folder)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("checkpoints set aside")
    mngr.reload()


def restore_latest(mngr, abstract_state, data_iter):
    """Restores the newest readable checkpoint; falls back past corrupt ones with a warning.

    Unreadable newer checkpoints are set aside once an older one restores; with none readable
    the workdir is left as it is and `CheckpointError` says so (never a silent fresh start).
    Returns ``(state, meta)`` or ``(None, None)`` when there is no checkpoint.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    unreadable = []
    for step in steps:
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain_ckpt.CheckpointRestore(data_iter),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint gets the same fallback
            # tensorstore's messages run to kilobytes of JSON spec: the first 300 characters.
            logging.warning("checkpoint at step %d is unreadable (%s: %.300s); trying an older "
                            "one", step, type(e).__name__, _one_line(e))
            unreadable.append(step)
            continue
        if unreadable:
            _set_aside(mngr, unreadable)
        return restored["state"], restored["meta"]
    if steps:
        raise CheckpointError(f"no readable checkpoint among steps {steps} in {mngr.directory}; "
                           "move the workdir aside to start over")
    return None, None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       progress: bool = True) -> dict:
    """Runs training to ``config.num_steps`` (resuming if possible) and returns eval.json's body.

    ``progress=False`` hides the step progress bar (`reproduce` with several workers).
    """
    # 1. Workdir and logging.
    is_main = jax.process_index() == 0
    # Everything checkable is checked before the workdir is touched (README "Reliability").
    config_lib.validate_config(config, methods=methods.METHODS)
    config_lib.check_workdir(workdir)
    config_path = os.path.join(workdir, "config.json")
    config_lib.check_workdir_compatible(config_path, config)
    os.makedirs(workdir, exist_ok=True)

    # 2. Mesh: batch sharded on `data`, params replicated.
    mesh = make_mesh()
    data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    put = make_put_fn(data_sharding)

    # 3. Input pipeline.
    info, data_dir, build_model, apply_fns = setup(config, workdir)
    if is_main:
        io_lib.atomic_write_json(config_path, config.to_dict())
    train_loader = data_pipelines.make_loader(
        config.dataset, "train", data_dir=data_dir,
        batch_size=config.batch_size // jax.process_count(), seed=config.seed, shuffle=True,
        num_epochs=None, drop_remainder=True, shard_index=jax.process_index(),
        shard_count=jax.process_count())
    train_iter = iter(train_loader)
    valid_arrays = data_pipelines.load_split(config.dataset, "valid", data_dir=data_dir)
    test_arrays = data_pipelines.load_split(config.dataset, "test", data_dir=data_dir)

    # 4. Model and optimizer, as abstract shapes first.
    rng = jax.random.key(config.seed)
    rng_init, rng_loop = jax.random.split(rng)
    del rng
    tx, schedule = make_optimizer(config)
    method = methods.make_method(config.method, apply_fns, info=info, config=config)

    init_fn = make_init_fn(build_model, tx, method)
    abstract_state = jax.eval_shape(init_fn, rng_init)

    # 5. Initialise directly into the replicated layout.
    train_state = jax.jit(init_fn, out_shardings=replicated)(rng_init)
    # A copy: train_state is donated to the step, which would delete buffers shared with it.
    best_params = jax.tree.map(jnp.copy, train_state["params"])

    # 6. The update step, jitted over global arrays (batch sharded on `data`, params replicated).
    train_step = jax.jit(make_train_step(method, tx, schedule), donate_argnums=(0,),
                         # rng_loop: a host-local key (the same on every process), replicated.
                         in_shardings=(replicated, data_sharding, data_sharding, None),
                         out_shardings=(replicated, replicated))
    meta_batch = make_meta_batch(valid_arrays, config.batch_size, put)

    # 7. Restore: the workdir's own latest checkpoint, else from scratch.
    mngr = init_checkpoint_manager(workdir, config)
    abstract_ckpt = abstract_checkpoint(abstract_state, replicated)
    restored, meta = restore_latest(mngr, abstract_ckpt, train_iter)
    meta = meta or {"best_value": None, "best_step": None}
    if restored is not None:
        train_state, best_params = restored["train"], restored["best_params"]
        print(f"resumed from step {int(train_state['step'])} ({workdir})", file=sys.stderr)
    start_step = int(train_state["step"])
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if is_main:
        io_lib.truncate_jsonl(metrics_path, max_step=start_step)

    # 8. Evaluators.
    train_arrays = data_pipelines.load_split(config.dataset, "train", data_dir=data_dir)
    evaluator = eval_lib.Evaluator(
        apply_fns, info, batch_size=config.eval.batch_size,
        put_fn=distributed.make_eval_put_fn(mesh, data_sharding), seed=config.seed,
        feature_std=eval_lib.feature_stds(train_arrays, info.modalities))
    del train_arrays

    def save(step):
        mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"train": train_state, "best_params": best_params}),
            data=grain_ckpt.CheckpointSave(train_iter),
            meta=ocp.args.JsonSave(meta)), force=True)

    # 9. The loop.
    log_file = open(metrics_path, "a") if is_main else None  # noqa: SIM115
    t0 = time.time()
    try:
        for step in tqdm(range(start_step, config.num_steps), initial=start_step,
                         total=config.num_steps, disable=not (is_main and progress), desc="train",
                         dynamic_ncols=True):
            batch = put(next(train_iter))
            train_state, meas = train_step(train_state, batch, meta_batch, rng_loop)
            done = step + 1
            if done % config.log_every == 0 or done == config.num_steps:
                record = {k: float(v) for k, v in jax.device_get(meas).items()}
                record.update(step=done, elapsed_s=time.time() - t0)
                if is_main:
                    log_file.write(io_lib.json_line(record))
                    log_file.flush()
                if record["consecutive_skips"] >= config.optimizer.max_consecutive_nonfinite:
                    save(done)
                    raise TrainingDiverged(
                        f"{int(record['consecutive_skips'])} consecutive non-finite updates at "
                        f"step {done}; the last finite params are checkpointed in {workdir}. "
                        "Lower config.optimizer.lr or check the data for NaN/inf.")
            if done % config.eval_every == 0 or done == config.num_steps:
                valid = evaluator.full(train_state["params"], valid_arrays)
                value = evaluator.primary(valid)
                improved = evaluator.is_better(value, meta["best_value"])
                if improved:
                    meta = {"best_value": value, "best_step": done}
                    best_params = jax.tree.map(jnp.copy, train_state["params"])
                if is_main:
                    log_file.write(io_lib.json_line(
                        {"step": done, **{f"valid/{k}": v for k, v in valid.items()},
                         "valid/best": meta["best_value"]}))
                    log_file.flush()
            if done % config.checkpoint_every == 0 or done == config.num_steps:
                save(done)
    finally:
        if log_file is not None:
            log_file.close()
        mngr.wait_until_finished()

    # Final evaluation of the best-on-valid params on test.
    results = eval_lib.final_evaluation(evaluator, best_params, test_arrays)
    results["best_step"] = meta["best_step"]
    results["valid_best"] = meta["best_value"]
    if is_main:
        io_lib.atomic_write_json(os.path.join(workdir, "eval.json"), results)
    return results


def quiet_libraries():
    """orbax logs every checkpoint file at INFO; keep stderr readable unless --verbosity is set."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def _one_line(message) -> str:
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def _exit_with_error(message) -> None:
    print(f"error: {_one_line(message)}", file=sys.stderr)
    sys.exit(2)


def run_cli(fn):
    """Runs `fn`, turning bad input into a one-line error and exit code 2 (no traceback).

    OSError covers an unreadable or unwritable path (a file where a folder should be, no
    permission, a missing config file); its message names the path. Set MODALIMMUNE_DEBUG=1 to
    see the traceback instead.
    """
    try:
        return fn()
    except (ValueError, OSError, TrainingDiverged, CheckpointError) as e:
        if os.environ.get("MODALIMMUNE_DEBUG"):
            raise
        _exit_with_error(e)


@contextlib.contextmanager
def flag_errors(argv):
    """Turns a bad command-line flag into ``error: ...`` naming the flag, and exit code 2.

    absl prints a bad flag as a usage block; ml_collections turns a config file's ValueError into
    a traceback inside the message, and raises a bare AttributeError for an unknown
    ``--config.<field>`` (while parsing ``--config``, or at definition time for a config-dict
    flag such as unlearn's ``--hparams``).
    """
    try:
        yield
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        _exit_with_error(lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}")
    except (AttributeError, KeyError) as e:
        inner = e.args[0] if e.args else e
        while isinstance(inner, BaseException) and inner.args:  # AttributeError(KeyError(msg))
            inner = inner.args[0]
        text = _one_line(inner)
        field = (re.findall(r"'([^']+)'", text) or [""])[0]
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--") and "." in a]
        named = [a for a in overrides if a.split(".")[-1] == field] or overrides or ["a flag"]
        hint = text[text.index("Did you mean"):] if "Did you mean" in text else ""
        _exit_with_error(f"{named[0]}: no such config field {field!r}. {hint}".strip())


def parse_flags(argv):
    """absl's flag parsing with :func:`flag_errors`: ``app.run(main, flags_parser=parse_flags)``."""
    with flag_errors(argv):
        return flags.FLAGS(argv)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_libraries()
    run_cli(distributed.initialize)  # before anything touches a JAX backend
    run_cli(lambda: train_and_evaluate(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)
