r"""Modality unlearning: forget one modality of a trained model, then measure what is left.

Methods (DESIGN.md §4; the objectives are in `modalimmune_jax.methods.unlearning`). Every one that
trains runs through the trainer (`training.trainer.train`), in its own workdir ``OUT/run`` (or
``OUT/retrain_run``), so it logs, checkpoints and resumes like any run:

- `retrain`: the gold standard. The trained run's own recipe from scratch on the *forget-gated*
  model (the trainer's ``wrap_apply_fns`` hook), which zero-fills ``x_m``, flags m absent and stops
  the gradient of m's reconstruction, so ``x_m`` is neither an input nor a target: the model never
  sees m. `steps` defaults to the trained run's ``num_steps``.
- `finetune`: `steps` of the retain loss from the trained params.
- `neggrad`: retain descent plus clamped ascent on the forget batch (only m present).
- `ccu`: inverse contrastive on ``z_m`` + KL retention + retain task loss + full-input task loss
  with ``z_m`` held fixed + separation margin.
- `manu`: zero the top ``fraction`` of output neurons of m's encoder, scored on real ``x_m``
  (forget) against zero-filled ``x_m`` (retain), then `steps` of retain finetuning with the pruned
  neurons held at zero.
- `modalimmune`: collapse m permanently (the forget gate: ``z_m`` is the null embedding), then
  `steps` of the retain loss so the other modalities compensate.

The unlearning runs use the trained config with ``hparams`` for the optimizer (adamw at a constant
rate), the trained run's data, and the last params (no selection on valid, which would prefer the
model that remembers).

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
  evaluation), ``method``, ``forget``, ``steps``, ``metric`` (the curve metric's name),
  ``hparams``, ``details`` (method-specific: MANU's pruned neurons, the neggrad clamp, ...).

Probe labels: classes for classification, ``y >= 0`` for regression and sentiment, the binary
code of the K emotions for IEMOCAP (`unlearning.discrete_labels`).
"""

import dataclasses
import os
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import data_pipelines
from modalimmune_jax import losses, robustness
from modalimmune_jax.evaluation import iterate_batches, predict_split
from modalimmune_jax.interventions import drop_modalities
from modalimmune_jax.methods import unlearning
from modalimmune_jax.training import config as config_lib
from modalimmune_jax.training import files, summary, trainer
from modalimmune_jax.training import mesh as mesh_lib
from modalimmune_jax.training.errors import ConfigError
from modalimmune_jax.training.evaluator import CURVE_METRIC, Evaluator

METHODS = unlearning.METHODS


def default_hparams() -> ml_collections.ConfigDict:
    """The unlearning hyperparameters (``--hparams.*`` flags, or ``unlearn(hparams=...)``)."""
    hp = ml_collections.ConfigDict()
    # Unlearning steps (retrain: the trained run's config.num_steps unless --steps is given).
    hp.steps = 300
    # 0: the trained run's config.batch_size.
    hp.batch_size = 0
    # adamw at a constant rate, after global-norm clipping (0 disables).
    hp.lr = 1e-3
    hp.weight_decay = 1e-4
    hp.grad_clip = 1.0
    hp.log_every = 50

    hp.neggrad = ml_collections.ConfigDict()
    hp.neggrad.forget_weight = 1.0
    # Per-example clamp of the ascended forget loss; <= 0 means chance_loss() of the train labels.
    hp.neggrad.max_forget_loss = 0.0

    hp.ccu = ml_collections.ConfigDict()
    # Softmax temperature of the cosine similarities.
    hp.ccu.temperature = 0.5
    hp.ccu.inverse_weight = 1.0
    hp.ccu.kl_weight = 1.0
    hp.ccu.task_weight = 1.0
    # Task loss on the full input with z_m held fixed (0: CCU's three losses only).
    hp.ccu.full_weight = 1.0
    hp.ccu.separation_weight = 1.0
    # Class prototypes of z_m pulled together (prototype_loss); 0 gives the pair-level L_inv only.
    hp.ccu.prototype_weight = 1.0
    # Minimum cosine distance (1 - cos) between a sample's forget and retain representations.
    hp.ccu.margin = 1.0

    hp.manu = ml_collections.ConfigDict()
    # Fraction of each layer's output neurons (rows) zeroed in m's encoder.
    hp.manu.fraction = 0.2
    # Weights w_f of the statistics in S = sum_f w_f (I_f^forget / (I_f^retain + 1e-5) - 1).
    hp.manu.w_abs = 1.0 / 3.0
    hp.manu.w_var = 1.0 / 3.0
    hp.manu.w_rms = 1.0 / 3.0
    # Then `steps` of retain finetuning (pruned rows kept at zero); False: prune only.
    hp.manu.finetune = True

    hp.probe = ml_collections.ConfigDict()
    # sklearn LogisticRegression's inverse regularization and iteration cap.
    hp.probe.C = 1.0
    hp.probe.max_iter = 2000
    return hp


@dataclasses.dataclass
class _Run:
    """What every method and the measurement share."""

    workdir: str
    out: str
    trained: trainer.Trained
    hp: ml_collections.ConfigDict
    index: int
    steps: int
    put: Any
    train_arrays: dict
    test_arrays: dict
    progress: bool = True

    @property
    def config(self):
        return self.trained.config

    @property
    def info(self):
        return self.trained.setup.info

    @property
    def apply_fns(self):
        return self.trained.setup.apply_fns


# --------------------------------------------------------------------------------- loading


def merge_hparams(hparams) -> ml_collections.ConfigDict:
    """`default_hparams` updated with `hparams` (a nested dict or ConfigDict), checked."""
    hp = default_hparams()
    hp.lock()
    if hparams is not None:
        try:
            hp.update(hparams.to_dict() if hasattr(hparams, "to_dict") else dict(hparams))
        except (KeyError, AttributeError) as e:
            raise ConfigError(f"hparams: {e.args[0]}") from None
    checks = [("steps", hp.steps >= 0), ("batch_size", hp.batch_size >= 0), ("lr", hp.lr > 0),
              ("log_every", hp.log_every > 0), ("ccu.temperature", hp.ccu.temperature > 0),
              ("manu.fraction", 0.0 <= hp.manu.fraction <= 1.0)]
    for name, ok in checks:
        if not ok:
            raise ConfigError(f"hparams.{name}: invalid value")
    return hp


def _gate(index):
    """The trainer hook that cuts modality `index` off (`unlearning.forget_gate`)."""
    return lambda apply_fns, info: unlearning.forget_gate(apply_fns, index=index,
                                                         modalities=info.modalities)


# --------------------------------------------------------------------------------- training


def _run_config(run: _Run) -> ml_collections.ConfigDict:
    """The trained config turned into an unlearning run: hparams' optimizer, last params."""
    hp, base = run.hp, run.config
    config = ml_collections.ConfigDict(base.to_dict())
    batch_size = hp.batch_size or base.batch_size
    if batch_size > run.info.split_sizes["train"] or batch_size % jax.device_count():
        raise ConfigError(f"hparams.batch_size={batch_size}: must divide by the device count and "
                          f"not exceed the training split ({run.info.split_sizes['train']})")
    config.batch_size = batch_size
    config.num_steps = run.steps
    config.log_every = min(hp.log_every, run.steps)
    config.eval_every = run.steps
    config.checkpoint_every = min(base.checkpoint_every, run.steps)
    config.optimizer.lr = hp.lr
    config.optimizer.warmup_steps = 0
    config.optimizer.end_lr_factor = 1.0
    config.optimizer.weight_decay = hp.weight_decay
    config.optimizer.grad_clip = hp.grad_clip
    config.eval.protocol = "full"
    config.eval.keep_best = False
    config.dataset.data_dir = run.trained.setup.data_dir  # reuse the built dataset
    return config


def _train(run: _Run, params, method, *, gated: bool):
    """Trains `method` from `params` through the trainer in ``OUT/run``; returns the last params."""
    hooks = trainer.Hooks(wrap_apply_fns=_gate(run.index) if gated else None,
                          make_method=lambda apply_fns, info, config: method(apply_fns),
                          init_params=params)
    outcome = trainer.train(_run_config(run), os.path.join(run.out, "run"),
                            progress=run.progress, hooks=hooks)
    return outcome.params


def _retain(run, apply_fns):
    return unlearning.make_retain_loss(apply_fns, info=run.info, index=run.index, hparams=run.hp,
                                       regression_loss=run.config.loss.regression,
                                       mask_prob=run.config.removal.mask_prob)


def _run_retrain(run: _Run, original):
    del original  # from scratch
    config = ml_collections.ConfigDict(run.config.to_dict())
    config.num_steps = run.steps
    config.eval.protocol = "full"
    config.dataset.data_dir = run.trained.setup.data_dir
    outcome = trainer.train(config, os.path.join(run.out, "retrain_run"), progress=run.progress,
                            hooks=trainer.Hooks(wrap_apply_fns=_gate(run.index)))
    records = [r for r in files.read_jsonl(outcome.files["metrics"]) if "elapsed_s" in r]
    details = {"retrain_workdir": outcome.workdir,
               "train_loop_s": records[-1]["elapsed_s"] if records else None}
    return outcome.params, True, details


def _run_finetune(run, original):
    method = lambda fns: unlearning.as_method(_retain(run, fns))
    return _train(run, original, method, gated=False), False, {}


def _run_modalimmune(run, original):
    method = lambda fns: unlearning.as_method(_retain(run, fns))
    return _train(run, original, method, gated=True), True, {}


def _run_neggrad(run, original):
    clamp = run.hp.neggrad.max_forget_loss
    if clamp <= 0:
        clamp = unlearning.chance_loss(run.train_arrays["label"], task=run.info.task,
                                       num_classes=run.info.num_classes,
                                       regression_loss=run.config.loss.regression)
    method = lambda fns: unlearning.as_method(unlearning.make_neggrad_loss(
        fns, info=run.info, index=run.index, hparams=run.hp, max_forget_loss=clamp,
        regression_loss=run.config.loss.regression, mask_prob=run.config.removal.mask_prob))
    return _train(run, original, method, gated=False), False, {"max_forget_loss": clamp}


def _run_ccu(run, original):
    method = lambda fns: unlearning.as_method(unlearning.make_ccu_loss(
        fns, info=run.info, index=run.index, hparams=run.hp,
        regression_loss=run.config.loss.regression, mask_prob=run.config.removal.mask_prob))
    return _train(run, original, method, gated=False), False, {}


def _run_manu(run, original):
    mods, index = run.info.modalities, run.index
    zero_m = 1.0 - jax.nn.one_hot(index, len(mods))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: run.trained.setup.build_model(
        jax.random.key(0))), nnx.Param)

    @jax.jit
    def sums_fn(params, batch, row_valid):
        # Forget inputs: x_m as it is; retain inputs: x_m zero-filled (m carries nothing).
        out = {}
        for name, b in (("forget", batch),
                        ("retain", drop_modalities(batch, zero_m, modalities=mods,
                                                   set_mask=False))):
            acts = unlearning.encoder_layer_activations(graphdef, params, b, index=index,
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
    prune = lambda tree: unlearning.prune_rows(tree, masks, index=index)
    params = jax.jit(prune)(original)
    if run.hp.manu.finetune and run.steps > 0:
        method = lambda fns: unlearning.as_method(_retain(run, fns), grad_fn=prune)
        params = _train(run, params, method, gated=False)
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


class Measure:
    """The compiled measurement functions for one model (the trained one, or its gated version).

    Built once per (workdir, forgotten modality, gated) and reused through a `MeasureCache`, so a
    comparison of several methods in one process compiles its measurement once.
    """

    def __init__(self, run: _Run, fns):
        info, index, regression = run.info, run.index, run.config.loss.regression
        self.evaluator = Evaluator(fns, info, batch_size=run.config.eval.batch_size,
                                   put_fn=run.put, seed=run.config.seed)

        def per_example_loss(params, batch, keep, told):
            b = robustness.remove_under_protocol(batch, keep, modalities=info.modalities,
                                                 told=told)
            return losses.task_loss(fns.apply(params, b)["preds"], batch["label"], task=info.task,
                                    regression_loss=regression)

        self.loss_fn = jax.jit(per_example_loss)
        self.embed_fn = jax.jit(lambda params, batch: fns.encode(params, batch)[:, index])

    def _mean_loss(self, run, params, keep, told) -> float:
        per = predict_split(self.loss_fn, params, run.test_arrays,
                            batch_size=run.config.eval.batch_size, put_fn=run.put,
                            args=(jnp.asarray(keep, jnp.float32), jnp.float32(told)))
        return float(np.mean(per))

    def __call__(self, run: _Run, params) -> dict:
        ev = self.evaluator
        metric = CURVE_METRIC[run.info.metric_family]
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


class MeasureCache:
    """Compiled `Measure`s and the trained model's own measurement, kept across `unlearn` calls.

    Pass one to several `unlearn` calls in a process (`studies.suite` does) so that they compile
    the measurement once and measure the shared starting checkpoint once.
    """

    def __init__(self):
        self.measures: dict[tuple, Measure] = {}
        self.original: dict[tuple, dict] = {}

    def measure(self, run: _Run, params, *, gated: bool) -> dict:
        key = (os.path.abspath(run.workdir), run.index, gated)
        if key not in self.measures:
            fns = (unlearning.forget_gate(run.apply_fns, index=run.index,
                                          modalities=run.info.modalities)
                   if gated else run.apply_fns)
            self.measures[key] = Measure(run, fns)
        return self.measures[key](run, params)

    def measure_original(self, run: _Run, params) -> dict:
        key = (os.path.abspath(run.workdir), run.trained.step, run.index, run.hp.probe.C,
               run.hp.probe.max_iter)
        if key not in self.original:
            self.original[key] = self.measure(run, params, gated=False)
        return self.original[key]


# ------------------------------------------------------------------------------------ main


def unlearn(workdir: str, forget: str, method: str, out: str, *, steps: int | None = None,
            hparams=None, progress: bool = True, cache: MeasureCache | None = None) -> dict:
    """Unlearns modality `forget` from `workdir`'s best params with `method`; writes unlearn.json.

    Args:
      workdir: a trained workdir (config.json and checkpoints/ from `experiments.train`).
      forget: the modality name to forget.
      method: one of `METHODS`.
      out: output folder (created); ``unlearn.json`` and the unlearning run's workdir (``run/``,
        or ``retrain_run/``) go there.
      steps: unlearning steps; None: ``hparams.steps`` (retrain: the trained ``num_steps``).
      hparams: overrides of `default_hparams()`, a nested dict or ConfigDict.
      progress: show the training progress bar.
      cache: a `MeasureCache` shared by several calls in one process (None: a fresh one).

    Returns:
      The unlearn.json body (module docstring).
    """
    if method not in METHODS:
        raise ConfigError(f"--method: unknown method {method!r}; expected one of {METHODS}")
    hp = merge_hparams(hparams)
    # The cheap checks first, before the checkpoint is read.
    info = trainer.setup(config_lib.load_config(workdir), workdir).info
    if forget not in info.modalities:
        raise ConfigError(f"--forget={forget!r}: not a modality of this dataset; expected one of "
                          f"{info.modalities}")
    if steps is not None and steps < 0:
        raise ConfigError(f"--steps={steps}: must be >= 0")
    if steps is None:
        steps = config_lib.load_config(workdir).num_steps if method == "retrain" else hp.steps
    if method == "retrain" and steps <= 0:
        raise ConfigError("--steps: retrain needs at least one training step")
    if method != "retrain" and steps <= 0 and method != "manu":
        raise ConfigError(f"--steps: {method} needs at least one unlearning step")
    trained = trainer.load_trained(workdir)
    os.makedirs(out, exist_ok=True)
    config, data_dir = trained.config, trained.setup.data_dir
    run = _Run(
        workdir=workdir, out=out, trained=trained, hp=hp, index=info.modalities.index(forget),
        steps=steps, put=mesh_lib.make_put_fn(mesh_lib.data_sharding(trained.mesh)),
        train_arrays=data_pipelines.load_split(config.dataset, "train", data_dir=data_dir),
        test_arrays=data_pipelines.load_split(config.dataset, "test", data_dir=data_dir),
        progress=progress)
    cache = cache or MeasureCache()

    t0 = time.time()
    params, gated, details = RUNNERS[method](run, trained.params)
    params = jax.block_until_ready(params)
    wall_time = time.time() - t0

    result = {
        "method": method, "forget": forget, "steps": steps, "workdir": os.path.abspath(workdir),
        "metric": CURVE_METRIC[info.metric_family], "wall_time_s": wall_time,
        "hparams": hp.to_dict(), "details": details, **cache.measure(run, params, gated=gated),
        "original": cache.measure_original(run, trained.params)}
    if jax.process_index() == 0:
        files.write_json(os.path.join(out, "unlearn.json"), result)
    return result


def unlearn_summary(result: dict, out: str) -> str:
    """The closing block of `experiments.unlearn`."""
    fq, retained = result["forget_quality"], result["retained"]
    metric = result["metric"]
    rows = [("probe acc on z_m", f"{fq['probe_acc']:.4f}   (chance {fq['chance']:.4f}; before "
                                 f"{result['original']['forget_quality']['probe_acc']:.4f})"),
            (f"{metric} with m alone", f"{fq['alone_acc']:.4f}"),
            (f"retained {metric} (without m)",
             f"{retained['without'][metric]:.4f}   (before "
             f"{result['original']['retained']['without'][metric]:.4f})"),
            (f"retained {metric} (full input)", f"{retained['full'][metric]:.4f}"),
            ("wall time", f"{result['wall_time_s']:.1f} s"),
            ("unlearn.json", os.path.join(out, "unlearn.json"))]
    return summary.block(f"unlearn finished: {result['method']} forgot {result['forget']!r}",
                         rows)


def unlearn_command(workdir: str, forget: str, method: str, out: str, *, steps=None,
                    hparams=None) -> str:
    """`experiments.unlearn`: resolves the paths, unlearns, returns the closing summary."""
    out = config_lib.absolute_path(out)
    result = unlearn(config_lib.absolute_path(workdir), forget, method, out, steps=steps,
                     hparams=hparams)
    return unlearn_summary(result, out)
