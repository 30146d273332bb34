r"""Forgets one modality of a trained model, then measures forget quality and retained utility.

  python -m experiments.unlearn --workdir=/tmp/mi --forget=left --method=ccu --out=/tmp/unl_ccu
  python -m experiments.unlearn --workdir=/tmp/mi --forget=left --method=retrain \
      --out=/tmp/unl_retrain
  python -m experiments.unlearn --workdir=/tmp/mi --forget=left --method=manu --steps=100 \
      --hparams.manu.fraction=0.3 --out=/tmp/unl_manu

Methods (DESIGN.md §4; the losses are in `modalimmune_jax/methods/unlearning.py`):

- `retrain`: the gold standard. `train.train_and_evaluate` reruns the trained run's own recipe from
  scratch in ``OUT/retrain_run`` (resumable) on the *forget-gated* model, which zero-fills ``x_m``,
  flags m absent and stops the gradient of m's reconstruction, so ``x_m`` is neither an input nor a
  target: the model never sees m. `--steps` defaults to the trained run's ``num_steps``.
- `finetune`: `steps` of the retain loss from the trained params.
- `neggrad`: retain descent plus clamped ascent on the forget batch (only m present).
- `ccu`: inverse contrastive on ``z_m`` + KL retention + retain task loss + full-input task loss
  with ``z_m`` held fixed + separation margin.
- `manu`: zero the top ``fraction`` of output neurons of m's encoder, scored on real ``x_m``
  (forget) against zero-filled ``x_m`` (retain), then `steps` of retain finetuning.
- `modalimmune`: collapse m permanently (the forget gate: ``z_m`` is the null embedding), then
  `steps` of the retain loss so the other modalities compensate.

``OUT/unlearn.json`` (written atomically):

- ``forget_quality`` (scalars): ``probe_acc`` (sklearn logistic regression on standardized
  ``z_m`` of the deployed model, fit on train, scored on test), ``chance`` (test accuracy of the
  train split's majority class: what a probe that learns nothing scores), ``alone_acc`` /
  ``alone_acc_mask`` (the task's curve metric with only m present, `zero` / `mask` protocol),
  ``ig`` (DESIGN.md §3.1's leave-one-out gain of m on test, ``mean_b[l(f(x without m)) -
  l(f(x))]`` with m zero-filled and mask 0) and ``forget_loss`` (the task loss with only m
  present, `zero` protocol);
- ``alone``: the full metric dicts with only m present, ``zero`` and ``mask``;
- ``retained``: ``without`` / ``without_mask`` (m removed, `zero` / `mask` protocol) and ``full``;
- ``original``: the same three blocks for the trained model before unlearning;
- ``wall_time_s`` (the method itself: scoring, pruning, training, compilation included; not our
  evaluation, though for `retrain` it includes the trainer's own final evaluation, and
  ``details.train_loop_s`` is its training loop alone), ``method``, ``forget``, ``steps``, ``metric`` (the curve metric's name),
  ``hparams``, ``details`` (method-specific: MANU's pruned neurons, the neggrad clamp, ...).

Probe labels: classes for classification, ``y >= 0`` for regression and sentiment, the binary
code of the K emotions for IEMOCAP (`unlearning.discrete_labels`).
"""

import contextlib
import dataclasses
import json
import os
import sys
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

import data_pipelines
from experiments import eval_lib, io_lib, train
from experiments.config_lib import ConfigError
from modalimmune_jax import losses
from modalimmune_jax.evaluation import iterate_batches, predict_split
from modalimmune_jax.interventions import drop_modalities
from modalimmune_jax.methods import unlearning


def _define_flags():
    """The CLI's flags; defined at run time only, so importing `unlearn` defines none."""
    if "workdir" not in flags.FLAGS:  # experiments.train, imported above, defines it
        flags.DEFINE_string("workdir", None, "A trained workdir (experiments.train).")
    flags.DEFINE_string("forget", None, "The modality to forget.")
    flags.DEFINE_enum("method", None, unlearning.METHODS, "The unlearning method.")
    flags.DEFINE_string("out", None, "Output folder for unlearn.json.")
    flags.DEFINE_integer("steps", None, "Unlearning steps (retrain: training steps).")
    config_flags.DEFINE_config_dict("hparams", unlearning.default_hparams(),
                                    "Unlearning hyperparameters.")
    flags.mark_flags_as_required(["workdir", "forget", "method", "out"])


@dataclasses.dataclass
class _Run:
    """What every method and the evaluation share."""

    workdir: str
    out: str
    config: ml_collections.ConfigDict
    hp: ml_collections.ConfigDict
    info: Any
    data_dir: str
    build_model: Any
    apply_fns: Any
    graphdef: Any
    index: int
    steps: int
    put: Any
    replicated: Any
    train_arrays: dict
    test_arrays: dict
    progress: bool = True


# --------------------------------------------------------------------------------- loading


def _merge_hparams(hparams) -> ml_collections.ConfigDict:
    hp = unlearning.default_hparams()
    hp.lock()
    if hparams is not None:
        try:
            hp.update(hparams.to_dict() if hasattr(hparams, "to_dict") else dict(hparams))
        except KeyError as e:
            raise ConfigError(f"hparams: {e.args[0]}") from None
    checks = [("steps", hp.steps >= 0), ("batch_size", hp.batch_size >= 0), ("lr", hp.lr > 0),
              ("log_every", hp.log_every > 0),
              ("ccu.temperature", hp.ccu.temperature > 0),
              ("manu.fraction", 0.0 <= hp.manu.fraction <= 1.0)]
    for name, ok in checks:
        if not ok:
            raise ConfigError(f"hparams.{name}: invalid value")
    return hp


def _load_config(workdir: str) -> ml_collections.ConfigDict:
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise ConfigError(f"--workdir={workdir}: no config.json; is it a training workdir?")
    with open(config_path) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_best_params(workdir, config, build_model, apply_fns, info, replicated):
    """``(best-on-valid params, step)`` of `workdir`'s latest checkpoint."""
    params, _, step = train.restore_best(workdir, config, build_model=build_model,
                                         apply_fns=apply_fns, info=info, sharding=replicated)
    return params, step


@contextlib.contextmanager
def _forget_gated_trainer(index):
    """Makes `train.train_and_evaluate` build the forget-gated model (for `retrain`).

    The trainer has no hook for wrapping its apply functions, so `train.setup` is swapped for the
    duration of the call; everything else (data, recipe, checkpoints, evaluation) is unchanged.
    """
    setup = train.setup

    def gated_setup(config, workdir):
        info, data_dir, build_model, apply_fns = setup(config, workdir)
        fns = unlearning.forget_gate(apply_fns, index=index, modalities=info.modalities)
        return info, data_dir, build_model, fns

    train.setup = gated_setup
    try:
        yield
    finally:
        train.setup = setup


# --------------------------------------------------------------------------------- training


def _fit(run: _Run, params, loss_fn, *, frozen, project_fn=None):
    """`run.steps` jitted adamw steps on ``loss_fn(params, frozen, batch, rng)``; returns params.

    Logs every ``hparams.log_every`` steps to ``OUT/metrics.jsonl`` and raises
    `train.TrainingDiverged` on a non-finite loss.
    """
    hp, config = run.hp, run.config
    tx = optax.chain(
        optax.clip_by_global_norm(hp.grad_clip) if hp.grad_clip > 0 else optax.identity(),
        optax.adamw(hp.lr, weight_decay=hp.weight_decay))
    batch_size = hp.batch_size or config.batch_size
    if batch_size > run.info.split_sizes["train"] or batch_size % jax.device_count():
        raise ConfigError(f"hparams.batch_size={batch_size}: must divide by the device count and "
                          f"not exceed the training split ({run.info.split_sizes['train']})")
    loader = data_pipelines.make_loader(
        config.dataset, "train", data_dir=run.data_dir,
        batch_size=batch_size // jax.process_count(), seed=config.seed, shuffle=True,
        num_epochs=None, drop_remainder=True, shard_index=jax.process_index(),
        shard_count=jax.process_count())
    # A stream of its own, apart from the training run's (which folds the step into key(seed)).
    rng_loop = jax.random.fold_in(jax.random.key(config.seed), 0x0F6E7)

    # The optimizer sees one flat vector: per-leaf elementwise updates made XLA's compile of the
    # step 1.5x slower on the test model, and compilation dominates a short unlearning run.
    _, unravel = ravel_pytree(params)

    def step_fn(flat, opt_state, frozen, batch, step):
        def flat_loss(f):
            return loss_fn(unravel(f), frozen, batch, jax.random.fold_in(rng_loop, step))

        (loss, meas), grads = jax.value_and_grad(flat_loss, has_aux=True)(flat)
        updates, opt_state = tx.update(grads, opt_state, flat)
        flat = optax.apply_updates(flat, updates)
        if project_fn is not None:
            flat = ravel_pytree(project_fn(unravel(flat)))[0]
        return flat, opt_state, {**meas, "loss": loss, "grad_norm": optax.global_norm(grads)}

    step_fn = jax.jit(step_fn, donate_argnums=(0, 1))

    def init(params):
        flat = ravel_pytree(params)[0]
        return flat, tx.init(flat)

    flat, opt_state = jax.jit(init, out_shardings=run.replicated)(params)
    log_path = os.path.join(run.out, "metrics.jsonl")
    io_lib.atomic_write_text(log_path, "")
    t0 = time.time()
    with open(log_path, "a") as log_file:
        for step, batch in zip(range(run.steps), iter(loader)):
            flat, opt_state, meas = step_fn(flat, opt_state, frozen, run.put(batch),
                                            jnp.int32(step))
            done = step + 1
            if done % hp.log_every == 0 or done == run.steps:
                record = {k: float(v) for k, v in jax.device_get(meas).items()}
                record.update(step=done, elapsed_s=time.time() - t0)
                if jax.process_index() == 0:
                    log_file.write(io_lib.json_line(record))
                    log_file.flush()
                if not np.isfinite(record["loss"]):
                    raise train.TrainingDiverged(
                        f"non-finite unlearning loss at step {done}; lower hparams.lr")
    return jax.jit(unravel)(flat)


def _retain_loss(run, apply_fns):
    return unlearning.make_retain_loss(apply_fns, info=run.info, index=run.index, hparams=run.hp,
                                       mask_prob=run.config.removal.mask_prob,
                                       regression_loss=run.config.loss.regression)


def _run_retrain(run: _Run, original):
    del original  # from scratch
    rconfig = ml_collections.ConfigDict(run.config.to_dict())
    rconfig.num_steps = run.steps
    # train.make_optimizer's cosine decay needs num_steps > warmup_steps (a very short retrain).
    rconfig.optimizer.warmup_steps = min(rconfig.optimizer.warmup_steps, run.steps - 1)
    rconfig.dataset.data_dir = os.path.abspath(run.data_dir)  # reuse the built dataset
    retrain_dir = os.path.join(run.out, "retrain_run")
    with _forget_gated_trainer(run.index):
        train.train_and_evaluate(rconfig, retrain_dir, progress=run.progress)
    params, _ = restore_best_params(retrain_dir, rconfig, run.build_model, run.apply_fns,
                                    run.info, run.replicated)
    records = [r for r in io_lib.read_jsonl(os.path.join(retrain_dir, "metrics.jsonl"))
               if "elapsed_s" in r]
    details = {"retrain_workdir": retrain_dir,
               "train_loop_s": records[-1]["elapsed_s"] if records else None}
    return params, True, details


def _gated(run):
    return unlearning.forget_gate(run.apply_fns, index=run.index, modalities=run.info.modalities)


def _run_finetune(run, original):
    return _fit(run, original, _retain_loss(run, run.apply_fns), frozen=original), False, {}


def _run_modalimmune(run, original):
    return _fit(run, original, _retain_loss(run, _gated(run)), frozen=original), True, {}


def _run_neggrad(run, original):
    clamp = run.hp.neggrad.max_forget_loss
    if clamp <= 0:
        clamp = unlearning.chance_loss(run.train_arrays["label"], task=run.info.task,
                                       num_classes=run.info.num_classes,
                                       regression_loss=run.config.loss.regression)
    loss_fn = unlearning.make_neggrad_loss(
        run.apply_fns, info=run.info, index=run.index, hparams=run.hp,
        mask_prob=run.config.removal.mask_prob, max_forget_loss=clamp,
        regression_loss=run.config.loss.regression)
    return _fit(run, original, loss_fn, frozen=original), False, {"max_forget_loss": clamp}


def _run_ccu(run, original):
    loss_fn = unlearning.make_ccu_loss(run.apply_fns, info=run.info, index=run.index,
                                       hparams=run.hp, mask_prob=run.config.removal.mask_prob,
                                       regression_loss=run.config.loss.regression)
    return _fit(run, original, loss_fn, frozen=original), False, {}


def _run_manu(run, original):
    mods, index = run.info.modalities, run.index
    zero_m = 1.0 - jax.nn.one_hot(index, len(mods))

    @jax.jit
    def sums_fn(params, batch, row_valid):
        # Forget inputs: x_m as it is; retain inputs: x_m zero-filled (m carries nothing).
        out = {}
        for name, b in (("forget", batch),
                        ("retain", drop_modalities(batch, zero_m, modalities=mods,
                                                   set_mask=False))):
            acts = unlearning.encoder_layer_activations(run.graphdef, params, b, index=index,
                                                        modality=mods[index])
            out[name] = {path: unlearning.activation_sums(
                a, w * row_valid.reshape((-1,) + (1,) * (w.ndim - 1)))
                for path, (a, w) in acts.items()}
        return out

    total = None
    batch_size = run.config.eval.batch_size
    for batch, n_valid in iterate_batches(run.train_arrays, batch_size):
        sums = jax.device_get(sums_fn(original, run.put(batch),
                                      jnp.arange(batch_size) < n_valid))
        total = sums if total is None else jax.tree.map(np.add, total, sums)
    weights = {"abs": run.hp.manu.w_abs, "var": run.hp.manu.w_var, "rms": run.hp.manu.w_rms}
    masks, details = {}, {"layers": {}}
    for path in total["forget"]:
        scores = unlearning.manu_scores(unlearning.activation_statistics(total["forget"][path]),
                                        unlearning.activation_statistics(total["retain"][path]),
                                        weights)
        masks[path] = unlearning.top_fraction(scores, run.hp.manu.fraction)
        details["layers"]["/".join(map(str, path))] = {
            "pruned": int(masks[path].sum()), "neurons": int(masks[path].size),
            "top_scores": [float(s) for s in np.sort(scores)[::-1][:5]]}
    project = jax.jit(lambda p: unlearning.prune_rows(p, masks, index=index))
    params = project(original)
    if run.hp.manu.finetune and run.steps > 0:
        params = _fit(run, params, _retain_loss(run, run.apply_fns), frozen=original,
                      project_fn=lambda p: unlearning.prune_rows(p, masks, index=index))
    return params, False, details


# runner(run, original params) -> (params, gated: deploy the forget-gated model?, details dict).
RUNNERS = {"retrain": _run_retrain, "finetune": _run_finetune, "neggrad": _run_neggrad,
           "ccu": _run_ccu, "manu": _run_manu, "modalimmune": _run_modalimmune}


# ------------------------------------------------------------------------------- evaluation


def linear_probe(train_x, train_y, test_x, test_y, *, c=1.0, max_iter=2000) -> tuple[float, float]:
    """Test accuracy of a logistic-regression probe on standardized features, and chance.

    Args:
      train_x, test_x: ``[N, d]`` float features; train_y, test_y: ``[N]`` int classes.
      c, max_iter: sklearn's ``C`` and ``max_iter``.

    Returns:
      ``(probe_acc, chance)``; chance is the test accuracy of always predicting the train split's
      majority class (lowest index on ties), which is what a probe on constant features scores.
    """
    from sklearn.exceptions import ConvergenceWarning  # noqa: PLC0415
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    chance = float(np.mean(test_y == np.argmax(np.bincount(train_y))))
    if np.unique(train_y).size < 2:
        return chance, chance
    scaler = StandardScaler().fit(train_x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(C=c, max_iter=max_iter).fit(scaler.transform(train_x), train_y)
    return float(np.mean(clf.predict(scaler.transform(test_x)) == test_y)), chance


class _Measure:
    """The compiled evaluation functions for one model (the trained one, or its gated version).

    Built once per process for each (workdir, forgotten modality, gated) and reused, so a
    comparison of several methods compiles its evaluation once.
    """

    def __init__(self, run: _Run, fns):
        info, index, regression = run.info, run.index, run.config.loss.regression
        self.evaluator = eval_lib.Evaluator(fns, info, batch_size=run.config.eval.batch_size,
                                            put_fn=run.put, seed=run.config.seed)

        def per_example_loss(params, batch, keep, set_mask):
            zero = drop_modalities(batch, keep, modalities=info.modalities, set_mask=False)
            told = drop_modalities(batch, keep, modalities=info.modalities, set_mask=True)
            b = {**zero, "mask": jnp.where(set_mask > 0, told["mask"], zero["mask"])}
            return losses.task_loss(fns.apply(params, b)["preds"], batch["label"], task=info.task,
                                    regression_loss=regression)

        self.loss_fn = jax.jit(per_example_loss)
        self.embed_fn = jax.jit(lambda params, batch: fns.encode(params, batch)[:, index])

    def _mean_loss(self, run, params, keep, set_mask) -> float:
        per = predict_split(self.loss_fn, params, run.test_arrays,
                            batch_size=run.config.eval.batch_size, put_fn=run.put,
                            args=(jnp.asarray(keep, jnp.float32), jnp.float32(set_mask)))
        return float(np.mean(per))

    def __call__(self, run: _Run, params) -> dict:
        ev = self.evaluator
        metric = eval_lib.CURVE_METRIC[run.info.metric_family]
        num_m = len(run.info.modalities)
        only = np.eye(num_m, dtype=np.float32)[run.index]
        test = run.test_arrays
        retained = {"full": ev.full(params, test),
                    "without": ev.missing(params, test, 1.0 - only, protocol="zero"),
                    "without_mask": ev.missing(params, test, 1.0 - only, protocol="mask")}
        alone = ev.missing(params, test, only, protocol="zero")
        alone_mask = ev.missing(params, test, only, protocol="mask")
        embed = {split: predict_split(self.embed_fn, params, arrays,
                                      batch_size=run.config.eval.batch_size, put_fn=run.put)
                 for split, arrays in (("train", run.train_arrays), ("test", test))}
        task = run.info.task
        probe_acc, chance = linear_probe(
            embed["train"], unlearning.discrete_labels(run.train_arrays["label"], task=task),
            embed["test"], unlearning.discrete_labels(test["label"], task=task),
            c=run.hp.probe.C, max_iter=run.hp.probe.max_iter)
        full_loss = self._mean_loss(run, params, np.ones(num_m), 0.0)
        forget_quality = {
            "probe_acc": probe_acc, "chance": chance,
            "alone_acc": alone[metric], "alone_acc_mask": alone_mask[metric],
            "ig": self._mean_loss(run, params, 1.0 - only, 1.0) - full_loss,
            "forget_loss": self._mean_loss(run, params, only, 0.0)}
        return {"forget_quality": forget_quality, "retained": retained,
                "alone": {"zero": alone, "mask": alone_mask}}


_MEASURES: dict[tuple, _Measure] = {}
_ORIGINAL: dict[tuple, dict] = {}


def _measure(run: _Run, params, *, gated: bool) -> dict:
    key = (os.path.abspath(run.workdir), run.index, gated)
    if key not in _MEASURES:
        _MEASURES[key] = _Measure(run, _gated(run) if gated else run.apply_fns)
    return _MEASURES[key](run, params)


# ------------------------------------------------------------------------------------ main



def unlearn(workdir: str, forget: str, method: str, out: str, *, steps: int | None = None,
            hparams=None, progress: bool = True) -> dict:
    """Unlearns modality `forget` from `workdir`'s best params with `method`; writes unlearn.json.

    Args:
      workdir: a trained workdir (config.json and checkpoints/ from `experiments.train`).
      forget: the modality name to forget.
      method: one of `unlearning.METHODS`.
      out: output folder (created); ``unlearn.json``, ``metrics.jsonl`` and, for `retrain`,
        ``retrain_run/`` go there.
      steps: unlearning steps; None: ``hparams.steps`` (retrain: the trained ``num_steps``).
      hparams: overrides of `unlearning.default_hparams()`, a nested dict or ConfigDict.
      progress: show `retrain`'s training progress bar.

    Returns:
      The unlearn.json body (module docstring).
    """
    if method not in unlearning.METHODS:
        raise ConfigError(f"--method: unknown method {method!r}; expected one of "
                          f"{unlearning.METHODS}")
    hp = _merge_hparams(hparams)
    config = _load_config(workdir)
    mesh = train.make_mesh()
    replicated = NamedSharding(mesh, P())
    put = train.make_put_fn(NamedSharding(mesh, P("data")))
    info, data_dir, build_model, apply_fns = train.setup(config, workdir)
    if forget not in info.modalities:
        raise ConfigError(f"--forget={forget!r}: not a modality of this dataset; expected one of "
                          f"{info.modalities}")
    if steps is not None and steps < 0:
        raise ConfigError(f"--steps={steps}: must be >= 0")
    if steps is None:
        steps = config.num_steps if method == "retrain" else hp.steps
    if method == "retrain" and steps <= 0:
        raise ConfigError("--steps: retrain needs at least one training step")
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(jax.random.key(0))), nnx.Param)
    os.makedirs(out, exist_ok=True)
    run = _Run(
        workdir=workdir, out=out, config=config, hp=hp, info=info, data_dir=data_dir,
        build_model=build_model, apply_fns=apply_fns, graphdef=graphdef,
        index=info.modalities.index(forget), steps=steps, put=put, replicated=replicated,
        train_arrays=data_pipelines.load_split(config.dataset, "train", data_dir=data_dir),
        test_arrays=data_pipelines.load_split(config.dataset, "test", data_dir=data_dir),
        progress=progress)
    original, step = restore_best_params(workdir, config, build_model, apply_fns, info,
                                         replicated)

    t0 = time.time()
    params, gated, details = RUNNERS[method](run, original)
    params = jax.block_until_ready(params)
    wall_time = time.time() - t0

    after = _measure(run, params, gated=gated)
    # Every method of a comparison starts from the same checkpoint: measure it once per process.
    key = (os.path.abspath(workdir), step, forget, hp.probe.C, hp.probe.max_iter)
    if key not in _ORIGINAL:
        _ORIGINAL[key] = _measure(run, original, gated=False)
    result = {
        "method": method, "forget": forget, "steps": steps, "workdir": os.path.abspath(workdir),
        "metric": eval_lib.CURVE_METRIC[info.metric_family], "wall_time_s": wall_time,
        "hparams": hp.to_dict(), "details": details, **after,
        "original": _ORIGINAL[key]}
    if jax.process_index() == 0:
        io_lib.atomic_write_json(os.path.join(out, "unlearn.json"), result)
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    train.quiet_libraries()
    f = flags.FLAGS
    train.run_cli(lambda: unlearn(f.workdir, f.forget, f.method, f.out, steps=f.steps,
                                  hparams=f.hparams))


if __name__ == "__main__":
    # ml_collections resolves the --hparams.<field> overrides when the flag is defined, so a typo
    # there is a bare AttributeError before app.run: one line instead, like every bad flag.
    with train.flag_errors(sys.argv):
        _define_flags()
    app.run(main, flags_parser=train.parse_flags)
