"""The trainer: one loop for every method, with resume, evaluation and the run's files.

`train(config, workdir)` runs in labelled sections (big_vision's ``train.py``):

1. workdir and logging; 2. mesh; 3. input pipeline; 4. model and optimizer as abstract shapes;
5. ``jit(init, out_shardings=...)``; 6. the update step, jitted with the state donated;
7. restore (the workdir's own checkpoint, else the configured init, else from scratch);
8. evaluators; 9. the loop; 10. the final evaluation.

Callers that must vary what the trainer does pass `Hooks` (a model of their own, the forget gate
of unlearning, a method that is not in the registry, a stand-in batch for a test) instead of
swapping module attributes. Writes into the workdir: ``config.json``, ``metrics.jsonl``,
``checkpoints/``, ``eval.json`` and, with ``config.profile_steps``, ``profile/``.
"""

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

import data_pipelines
from modalimmune_jax import methods
from modalimmune_jax.interventions import gate_modalities
from modalimmune_jax.model import create_model, make_apply_fns
from modalimmune_jax.training import checkpoint, files, summary
from modalimmune_jax.training import config as config_lib
from modalimmune_jax.training import mesh as mesh_lib
from modalimmune_jax.training.errors import CheckpointError, ConfigError, TrainingDiverged
from modalimmune_jax.training.evaluator import Evaluator
from modalimmune_jax.training.step import (
    jit_flat_step,
    make_init_fn,
    make_meta_batch,
    make_optimizer,
    make_train_step,
)


class Hooks(NamedTuple):
    """What a caller may vary in a run, each optional.

    Attributes:
      build_model: ``(info, model_cfg, rngs) -> nnx.Module`` instead of `model.create_model`:
        a model of your own, with ``encode``, ``fuse``, ``predict`` and ``reconstruct`` (the
        contract of `model.make_apply_fns`; README "Your own model").
      wrap_apply_fns: ``(apply_fns, info) -> apply_fns``, e.g. the forget gate of unlearning
        (retrain-without-m), applied in training and evaluation alike.
      make_method: ``(apply_fns, info, config) -> Method`` instead of the registry's
        ``config.method`` (the unlearning objectives).
      init_params: a params pytree to start from when the workdir has no checkpoint (unlearning
        starts from a trained model).
      map_batch: ``(step, host_batch) -> host_batch`` before the device put (a test's stand-in
        batch, e.g. one with NaN).
      make_loader: the training loader's factory, with the signature of
        `data_pipelines.make_loader` (a test reads the global batch as N hosts would).
    """

    build_model: Callable | None = None
    wrap_apply_fns: Callable | None = None
    make_method: Callable | None = None
    init_params: Any = None
    map_batch: Callable | None = None
    make_loader: Callable | None = None


NO_HOOKS = Hooks()


@dataclasses.dataclass
class Setup:
    """What a run, `evaluate` and the studies share: the data, the model and its pure functions."""

    info: Any  # data_pipelines.DatasetInfo
    data_dir: str
    build_model: Callable  # rng -> nnx.Module
    apply_fns: Any  # model.ApplyFns


@dataclasses.dataclass
class Outcome:
    """A finished run: eval.json's body and what the closing summary reports."""

    results: dict
    workdir: str
    family: str  # the dataset's metric family (metrics.FAMILIES)
    resumed_from: int | None
    files: dict[str, str]
    params: Any = None  # the evaluated params: best on valid, or the last (config.eval.keep_best)


def setup(config: ml_collections.ConfigDict, workdir: str, hooks: Hooks = NO_HOOKS) -> Setup:
    """Validates the config and builds the data, model and pure functions (no workdir writes).

    The dataset is built into ``config.dataset.data_dir`` (default ``<workdir>/data``) on first
    use. Raises `ConfigError` naming the field for a bad config.
    """
    config_lib.validate_config(config, methods=methods.METHODS)
    data_dir = config.dataset.data_dir or os.path.join(workdir, "data")
    info = data_pipelines.prepare(config.dataset, data_dir=data_dir)
    if config.method in methods.MULTIMODAL_ONLY and len(info.modalities) < 2:
        raise ConfigError(f"config.method={config.method!r} needs at least 2 modalities (it "
                          f"removes or rebalances them); this dataset has one, "
                          f"{info.modalities[0]!r}. Use config.method='erm'.")
    if config.batch_size > info.split_sizes["train"]:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is larger than the training split "
            f"({info.split_sizes['train']} examples)")
    n_dev, n_proc = jax.device_count(), jax.process_count()
    for name in ("batch_size", "eval.batch_size"):
        value = config_lib.get_field(config, name)
        if value % n_dev or value % n_proc:
            raise ConfigError(
                f"config.{name}={value} must be divisible by the device count ({n_dev}) and "
                f"the process count ({n_proc}) for data-parallel training")
    make = hooks.build_model or create_model

    def build_model(rng):
        return make(info, config.model, rngs=nnx.Rngs(params=rng))

    abstract_model = nnx.eval_shape(lambda: build_model(jax.random.key(0)))
    graphdef, _ = nnx.split(abstract_model, nnx.Param)
    apply_fns = make_apply_fns(graphdef)
    keep = used_modalities(config, info)
    if not all(keep):  # a specialist: the other modalities are cut off at the input, for good
        apply_fns = gate_modalities(apply_fns, keep, modalities=info.modalities)
    if hooks.wrap_apply_fns is not None:
        apply_fns = hooks.wrap_apply_fns(apply_fns, info)
    return Setup(info, data_dir, build_model, apply_fns)


def used_modalities(config, info) -> list[float]:
    """``[M]`` 1/0: the modalities ``config.use_modalities`` keeps ("" or "all": every one)."""
    names = [m.strip() for m in config.use_modalities.split(",") if m.strip()]
    if not names or names == ["all"]:
        return [1.0] * len(info.modalities)
    unknown = [m for m in names if m not in info.modalities]
    if unknown:
        raise ConfigError(f"config.use_modalities: unknown modality {unknown[0]!r}; expected "
                          f"some of {info.modalities}")
    return [float(m in names) for m in info.modalities]


def _method(config, built: Setup, hooks: Hooks):
    if hooks.make_method is not None:
        return hooks.make_method(built.apply_fns, built.info, config)
    return methods.make_method(config.method, built.apply_fns, info=built.info, config=config)


def make_evaluator(config, built: Setup, mesh) -> Evaluator:
    """The run's evaluator; the corruption noise is scaled by the train split's feature std.

    The std is the build's (`DatasetInfo.feature_std`: over valid timesteps of the stored, i.e.
    standardized, features; MMSA's -inf left out), floored at 1e-6 so a constant feature still
    gets a little noise.
    """
    info = built.info
    feature_std = {m: np.maximum(np.asarray(info.feature_std[m], np.float32), 1e-6)
                   for m in info.modalities}
    return Evaluator(built.apply_fns, info, batch_size=config.eval.batch_size,
                     put_fn=mesh_lib.make_eval_put_fn(mesh), seed=config.seed,
                     feature_std=feature_std)


def _measurements(meas) -> dict:
    return {k: float(v) for k, v in jax.device_get(meas).items()}


class _Profile:
    """A `jax.profiler` trace of steps ``[start, start + n)`` into ``workdir/profile``."""

    def __init__(self, workdir, start, num_steps):
        self.folder = os.path.join(workdir, "profile")
        self.start, self.stop = start, start + num_steps
        self.active = False

    def before(self, step):
        if self.stop > self.start and step == self.start:
            jax.profiler.start_trace(self.folder)
            self.active = True

    def after(self, step, out):
        if self.active and step + 1 == self.stop:
            jax.block_until_ready(out)
            jax.profiler.stop_trace()
            self.active = False

    def close(self):
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def train(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
          hooks: Hooks = NO_HOOKS) -> Outcome:
    """Trains to ``config.num_steps`` (resuming if possible), evaluates, writes the run's files.

    Args:
      config: the run's config (`experiments/configs/`), paths already absolute
        (`config.resolve_config`, done by the binaries).
      workdir: the run's folder; a rerun with the same folder resumes.
      progress: show the step progress bar.
      hooks: see `Hooks`.

    Returns:
      An `Outcome`; ``results`` is eval.json's body.
    """
    # 1. Workdir and logging. Everything checkable is checked before the workdir is touched.
    is_main = jax.process_index() == 0
    config_lib.validate_config(config, methods=methods.METHODS)
    config_lib.check_workdir(workdir)
    config_path = os.path.join(workdir, "config.json")
    config_lib.check_workdir_compatible(config_path, config)

    # 2. Mesh: batch sharded on `data`, params replicated.
    mesh = mesh_lib.make_mesh()
    data_sharding, replicated = mesh_lib.data_sharding(mesh), mesh_lib.replicated(mesh)
    put = mesh_lib.make_put_fn(data_sharding)

    # 3. Input pipeline.
    built = setup(config, workdir, hooks)
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        files.write_json(config_path, config.to_dict())
    make_loader = hooks.make_loader or data_pipelines.make_loader
    train_iter = iter(make_loader(
        config.dataset, "train", data_dir=built.data_dir,
        batch_size=config.batch_size // jax.process_count(), seed=config.seed, shuffle=True,
        num_epochs=None, drop_remainder=True, shard_index=jax.process_index(),
        shard_count=jax.process_count()))
    valid_arrays = data_pipelines.load_split(config.dataset, "valid", data_dir=built.data_dir)
    # Training batches travel packed in one array (`mesh.BatchPacking`); valid has their shapes.
    packing = mesh_lib.BatchPacking.of(valid_arrays)
    final_arrays = (valid_arrays if config.eval.split == "valid" else
                    data_pipelines.load_split(config.dataset, "test", data_dir=built.data_dir))

    # 4. Model and optimizer, as abstract shapes first.
    rng = jax.random.key(config.seed)
    rng_init, rng_loop = jax.random.split(rng)
    del rng
    method = _method(config, built, hooks)
    tx, schedule = make_optimizer(config, transform=method.transform)
    init_fn = make_init_fn(built.build_model, tx, method)
    abstract_state = jax.eval_shape(init_fn, rng_init, hooks.init_params)

    # 5. Initialise directly into the replicated layout.
    train_state = jax.jit(init_fn, out_shardings=replicated)(rng_init, hooks.init_params)
    # A copy: train_state is donated to the step, which would delete buffers shared with it.
    best_params = jax.tree.map(jnp.copy, train_state["params"])

    # 6. The update step, jitted over global arrays (batch sharded on `data`, params replicated).
    # Over the state's leaves (`step.FlatStep`): rng_loop is a host-local key, the same on every
    # process.
    flat_step = jit_flat_step(make_train_step(method, tx, schedule), abstract_state,
                              replicated=replicated, data_sharding=data_sharding,
                              periodic=method.periodic, unpack=packing.unpack)
    meta_batch = make_meta_batch(valid_arrays, config.batch_size, put)

    # 7. Restore: the workdir's own latest checkpoint, else the configured init or scratch.
    mngr = checkpoint.manager(workdir, keep=config.keep_checkpoints)
    abstract_ckpt = checkpoint.abstract_checkpoint(abstract_state, replicated)
    restored, meta = checkpoint.restore_latest(mngr, abstract_ckpt, train_iter)
    meta = meta or {"best_value": None, "best_step": None}
    resumed_from = None
    if restored is not None:
        train_state, best_params = restored["train"], restored["best_params"]
        resumed_from = int(train_state["step"])
        print(f"resumed from step {resumed_from} ({workdir})", file=sys.stderr)
    start_step = int(train_state["step"])
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if is_main:
        files.truncate_jsonl(metrics_path, max_step=start_step)

    # 8. Evaluators.
    evaluator = make_evaluator(config, built, mesh)
    data_state = train_iter.get_state  # the state after the last batch consumed, when called

    leaves = flat_step.leaves(train_state)
    del train_state  # from here on the loop holds its leaves (donated at every step)

    def save(step):
        checkpoint.save(mngr, step, state={"train": flat_step.state(leaves),
                                           "best_params": best_params},
                        data_state=data_state(), meta=meta)

    # 9. The loop. Each batch is read and put on the devices while the previous step computes
    # (dispatch is asynchronous), or by a thread with config.prefetch_batches > 0.
    def host_batches():
        for step in range(start_step, config.num_steps):
            batch = next(train_iter)
            yield batch if hooks.map_batch is None else hooks.map_batch(step, batch)

    class _Batches:  # the prefetcher's view: batches plus the iterator state after each
        def __init__(self):
            self._it = host_batches()

        def __next__(self):
            return next(self._it)

        def get_state(self):
            return train_iter.get_state()

    profile = _Profile(workdir, start_step + 1, config.profile_steps)
    batches = mesh_lib.prefetch(_Batches(), mesh_lib.make_put_fn(data_sharding, packing),
                                size=config.prefetch_batches)
    log_file = open(metrics_path, "a") if is_main else None  # noqa: SIM115
    t0 = time.time()
    try:
        for step in tqdm(range(start_step, config.num_steps), initial=start_step,
                         total=config.num_steps, disable=not (is_main and progress), desc="train",
                         dynamic_ncols=True):
            data_state, batch = next(batches)
            profile.before(step)
            leaves, meas = flat_step.run(leaves, batch, meta_batch, rng_loop, step=step)
            profile.after(step, leaves)
            done = step + 1
            if done % config.log_every == 0 or done == config.num_steps:
                record = _measurements(meas)
                record.update(step=done, elapsed_s=time.time() - t0)
                if is_main:
                    log_file.write(files.json_line(record))
                    log_file.flush()
                if record["consecutive_skips"] >= config.optimizer.max_consecutive_nonfinite:
                    save(done)
                    raise TrainingDiverged(
                        f"{int(record['consecutive_skips'])} consecutive non-finite updates at "
                        f"step {done}; the last finite params are checkpointed in {workdir}. "
                        "Lower config.optimizer.lr or check the data for NaN/inf.")
            if done % config.eval_every == 0 or done == config.num_steps:
                params = flat_step.state(leaves)["params"]
                valid = evaluator.full(params, valid_arrays)
                value = evaluator.primary(valid)
                if evaluator.is_better(value, meta["best_value"]) or not config.eval.keep_best:
                    meta = {"best_value": value, "best_step": done}
                    best_params = jax.tree.map(jnp.copy, params)
                if is_main:
                    log_file.write(files.json_line(
                        {"step": done, **{f"valid/{k}": v for k, v in valid.items()},
                         "valid/best": meta["best_value"]}))
                    log_file.flush()
            if done % config.checkpoint_every == 0 or done == config.num_steps:
                save(done)
    finally:
        batches.close()
        profile.close()
        if log_file is not None:
            log_file.close()
        mngr.wait_until_finished()
        mngr.close()

    # 10. Final evaluation of the selected params (best on valid, or the last) on test (or, to
    # choose settings, on valid).
    results = evaluator.protocol(best_params, final_arrays, kind=config.eval.protocol)
    results["best_step"] = meta["best_step"]
    results["valid_best"] = meta["best_value"]
    eval_name = "eval.json" if config.eval.split == "test" else "eval_valid.json"
    written = {"eval": os.path.join(workdir, eval_name), "metrics": metrics_path,
               "checkpoints": os.path.join(workdir, "checkpoints"), "config": config_path}
    if config.profile_steps:
        written["profile"] = profile.folder
    if is_main:
        files.write_json(written["eval"], results)
    return Outcome(results, workdir, built.info.metric_family, resumed_from, written, best_params)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       progress: bool = True, hooks: Hooks = NO_HOOKS) -> dict:
    """`train`, returning eval.json's body."""
    return train(config, workdir, progress=progress, hooks=hooks).results


# ------------------------------------------------------------------------------ a finished run


@dataclasses.dataclass
class Trained:
    """A finished run, restored: its config, data, model and best-on-valid params."""

    config: ml_collections.ConfigDict
    setup: Setup
    params: Any
    meta: dict
    step: int
    mesh: Any


def restore_target(config, built: Setup, mesh, hooks: Hooks = NO_HOOKS):
    """A checkpoint's abstract pytree, built as in training (same optimizer and method state),
    replicated on `mesh`: the restore checks every shape against it."""
    method = _method(config, built, hooks)
    tx, _ = make_optimizer(config, transform=method.transform)
    init_fn = make_init_fn(built.build_model, tx, method)
    return checkpoint.abstract_checkpoint(jax.eval_shape(init_fn, jax.random.key(0)),
                                          mesh_lib.replicated(mesh))


def load_trained(workdir: str, hooks: Hooks = NO_HOOKS) -> Trained:
    """Restores the best-on-valid params of `workdir`'s latest checkpoint, shapes checked.

    The abstract target is built exactly as in training (same optimizer and method state), so
    the restore checks every shape. Shared by `evaluate_workdir`, the studies and unlearning.
    """
    config = config_lib.load_config(workdir)
    mesh = mesh_lib.make_mesh()
    built = setup(config, workdir, hooks)
    abstract = restore_target(config, built, mesh, hooks)
    mngr = checkpoint.manager(workdir, keep=config.keep_checkpoints)
    try:
        if mngr.latest_step() is None:
            raise ConfigError(f"--workdir={workdir}: no checkpoint to restore")
        state, meta, step = checkpoint.restore_state(mngr, abstract)
    except (KeyError, ValueError, FileNotFoundError) as e:
        if isinstance(e, ConfigError):
            raise
        raise CheckpointError(f"--workdir={workdir}: the latest checkpoint cannot be read "
                              f"({type(e).__name__}: {str(e)[:200]})") from e
    finally:
        mngr.close()
    return Trained(config, built, state["best_params"], meta, step, mesh)


def evaluate_workdir(workdir: str, split: str = "test") -> Outcome:
    """Re-evaluates the best-on-valid params of `workdir` on `split`; writes eval[_valid].json.

    ``test`` rewrites ``eval.json``; ``valid`` writes ``eval_valid.json`` (for choosing
    hyperparameters without touching test).
    """
    if split not in ("test", "valid"):
        raise ConfigError(f"--split={split!r}: expected 'test' or 'valid'")
    run = load_trained(workdir)
    evaluator = make_evaluator(run.config, run.setup, run.mesh)
    arrays = data_pipelines.load_split(run.config.dataset, split, data_dir=run.setup.data_dir)
    results = evaluator.protocol(run.params, arrays, kind=run.config.eval.protocol)
    results["best_step"] = run.meta["best_step"]
    results["valid_best"] = run.meta["best_value"]
    path = os.path.join(workdir, "eval.json" if split == "test" else f"eval_{split}.json")
    if jax.process_index() == 0:
        files.write_json(path, results)
    return Outcome(results, workdir, run.setup.info.metric_family, None, {"eval": path},
                   run.params)


# ---------------------------------------------------------------------- the binaries' one call


def train_command(config: ml_collections.ConfigDict, workdir: str, *,
                  hooks: Hooks = NO_HOOKS) -> str:
    """`experiments.train`: resolves the paths, trains, returns the closing summary."""
    outcome = train(config_lib.resolve_config(config), config_lib.absolute_path(workdir),
                    hooks=hooks)
    return summary.run_summary(outcome, family=outcome.family, title="train finished")


def evaluate_command(workdir: str, split: str) -> str:
    """`experiments.evaluate`: re-evaluates a workdir's checkpoint, returns the summary."""
    outcome = evaluate_workdir(config_lib.absolute_path(workdir), split)
    return summary.run_summary(outcome, family=outcome.family,
                               title=f"evaluate finished ({split} split)")
