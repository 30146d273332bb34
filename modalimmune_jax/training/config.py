"""Run configs: validation, path resolution, deprecated names, and workdir compatibility.

Bad input fails here, before anything is written, with the field named (README "Reliability").
"""

import json
import os
import warnings

import ml_collections

from data_pipelines import DATASETS
from modalimmune_jax import methods as methods_lib
from modalimmune_jax.model import ENCODERS, FUSIONS
from modalimmune_jax.training.errors import ConfigError

# Fields a rerun may change without invalidating the checkpoints in a workdir.
RESUMABLE_FIELDS = ("num_steps", "log_every", "eval_every", "checkpoint_every",
                    "keep_checkpoints", "dataset.data_dir", "dataset.worker_count",
                    "eval.batch_size", "eval.protocol", "eval.split", "preset", "profile_steps",
                    "prefetch_batches")
# Fields added after runs were already written -> the value that reproduces those runs. A saved
# config without the field resumes if the field has that value now.
ADDED_FIELDS = {"mi.distill_kl": "collapsed_clean", "mi.distill_temperature": 1.0}
# Config fields that name a file or folder: resolved to absolute paths at the CLI boundary.
PATH_FIELDS = ("dataset.path", "dataset.data_dir")
# Old name -> new name. The old name keeps working for one release, with a warning.
DEPRECATED_FIELDS = {"mi.mask_prob": "removal.mask_prob", "mi.power_iters": "mi.num_lanczos_iters"}
MAX_SEED = 2**32 - 1


def get_field(config, dotted: str):
    """``config["a"]["b"]`` for ``"a.b"``."""
    for part in dotted.split("."):
        config = config[part]
    return config


def _set_field(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def _has_field(config, dotted: str) -> bool:
    try:
        get_field(config, dotted)
    except (KeyError, AttributeError):
        return False
    return True


def absolute_path(path: str) -> str:
    """A user-given path as the absolute path it names now (``~`` expanded); "" stays ""."""
    return os.path.abspath(os.path.expanduser(path)) if path else path


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with its paths absolute and deprecated fields moved to their new names.

    Called once, at the CLI boundary, so that ``config.json`` records what the run used and a run
    resumed from another working directory finds the same data.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    for field in PATH_FIELDS:
        if _has_field(config, field) and isinstance(get_field(config, field), str):
            _set_field(config, field, absolute_path(get_field(config, field)))
    for old, new in DEPRECATED_FIELDS.items():
        if _has_field(config, old) and get_field(config, old) is not None:
            warnings.warn(f"config.{old} is deprecated and will be removed in the next release; "
                          f"use config.{new} (set to {get_field(config, old)!r} for this run)",
                          DeprecationWarning, stacklevel=2)
            _set_field(config, new, get_field(config, old))
            _set_field(config, old, None)
    return config


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run saved in `workdir` (``config.json``)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--workdir={workdir}: no config.json; is it a training workdir?")
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the saved config ({e})") from None


def _positive_int(config, name):
    value = get_field(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"config.{name} must be a positive integer, got {value!r}")


def _as_config_error(check, *args, **kwargs):
    """Runs a methods-layer check; its ValueError (which names the field) becomes a ConfigError."""
    try:
        check(*args, **kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _in_range(config, name, lo, hi, *, lo_open=False, hi_open=False):
    _as_config_error(methods_lib.check_number, name, get_field(config, name), lo, hi,
                     lo_open=lo_open, hi_open=hi_open)


def _one_of(config, name, choices):
    value = get_field(config, name)
    if value not in choices:
        raise ConfigError(f"config.{name}: unknown value {value!r}; expected one of "
                          f"{tuple(choices)}")


def validate_config(config: ml_collections.ConfigDict, *, methods) -> None:
    """Raises :class:`ConfigError` naming the first invalid field."""
    _one_of(config, "method", methods)
    _one_of(config, "dataset.name", DATASETS)
    _one_of(config, "model.encoder", ENCODERS)
    _one_of(config, "model.fusion", FUSIONS)
    _one_of(config, "loss.regression", ("l1", "mse"))
    seed = config.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"config.seed must be an integer in [0, 2**32 - 1], got {seed!r}")
    for name in ("num_steps", "batch_size", "log_every", "eval_every", "checkpoint_every",
                 "keep_checkpoints", "eval.batch_size", "model.d", "model.d_h",
                 "model.num_heads", "optimizer.max_consecutive_nonfinite"):
        _positive_int(config, name)
    if not config.optimizer.lr > 0:
        raise ConfigError(f"config.optimizer.lr must be > 0, got {config.optimizer.lr!r}")
    if config.dataset.get("normalize", None) not in (None, "", "none", "standardize"):
        raise ConfigError(f"config.dataset.normalize must be 'none' or 'standardize', got "
                          f"{config.dataset.normalize!r}")
    if "dropout" in config.model:
        _in_range(config, "model.dropout", 0, 1, hi_open=True)
    if not isinstance(config.model.get("input_norm", False), bool):
        raise ConfigError(f"config.model.input_norm must be True or False, got "
                          f"{config.model.input_norm!r}")
    if not 0.0 <= config.moddrop.p < 1.0:
        raise ConfigError(f"config.moddrop.p must be in [0, 1), got {config.moddrop.p!r}")
    # Fields that would otherwise fail deep inside the first jitted step, or silently give NaN
    # (a strength of 1 has an infinite logit; a negative damping certifies nothing).
    for name, lo, hi, lo_open, hi_open in (
            ("optimizer.warmup_steps", 0, None, False, False),
            ("optimizer.end_lr_factor", 0, None, False, False),
            ("optimizer.weight_decay", 0, None, False, False),
            ("optimizer.grad_clip", 0, None, False, False),
            ("removal.mask_prob", 0, 1, False, False),
            ("mi.strength", 0, 1, True, True), ("mi.p_clean", 0, 1, False, False),
            ("mi.ema_beta", 0, 1, False, True),
            ("mi.curv_decay", 0, 1, False, True), ("mi.uniform", 0, 1, False, False),
            ("mi.distill_weight", 0, None, False, False),
            ("mi.strength_spread", 0, 1, False, False),
            ("mi.tau", 0, None, True, False), ("mi.reg_weight", 0, None, True, False),
            ("mi.damping", 0, None, False, False), ("mi.meta_lr", 0, None, False, False),
            ("mi.distill_temperature", 0, None, True, False),
            ("loss.reconstruction", 0, None, True, False)):
        _in_range(config, name, lo, hi, lo_open=lo_open, hi_open=hi_open)
    _as_config_error(methods_lib.check_config, config)  # each method's block (CONFIG_CHECKS)
    if config.mi.quantile is not None:  # None damps every entry (curvature_mask.curvature_mask)
        _in_range(config, "mi.quantile", 0, 1)
    for name in ("mi.ig_every", "mi.curv_every", "mi.curv_probes", "mi.meta_every",
                 "mi.num_lanczos_iters"):
        _positive_int(config, name)
    _one_of(config, "mi.anchor", ("null", "mean"))
    _one_of(config, "mi.controller_mode", ("modality", "pattern"))
    _one_of(config, "mi.distill_kl", ("collapsed_clean", "clean_collapsed", "collapsed_uniform"))
    _one_of(config, "mi.mask_mode", ("hard", "soft"))
    for name in ("mi.neumann_terms", "dataset.max_len", "profile_steps", "prefetch_batches"):
        value = get_field(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"config.{name} must be an integer >= 0, got {value!r}")
    _one_of(config, "eval.protocol", ("robustness", "missing", "full"))
    _one_of(config, "eval.split", ("test", "valid"))
    if config.dataset.name in ("npz", "cmu_mosi", "cmu_mosei", "iemocap"):
        path = config.dataset.path
        if not path:
            raise ConfigError(f"config.dataset.path is required for dataset "
                              f"{config.dataset.name!r} (the folder holding its files)")
        if not os.path.isdir(path):
            raise ConfigError(f"config.dataset.path: {path!r} is not a directory")


def check_workdir(workdir: str) -> None:
    """Raises :class:`ConfigError` unless `workdir` is a folder or a path one can be made at."""
    if not workdir:
        raise ConfigError("--workdir is empty; give the folder for outputs and checkpoints")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir} exists and is not a directory")


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_workdir_compatible(config_path: str, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a workdir whose saved config differs in a field that matters."""
    if not os.path.exists(config_path):
        return
    try:
        with open(config_path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{config_path}: cannot read the saved config ({e}); "
                          "use a fresh --workdir") from None
    old, new = _flatten(saved), _flatten(json.loads(config.to_json()))
    old = {**ADDED_FIELDS, **old}
    diffs = [k for k in sorted(set(old) | set(new))
             if k not in RESUMABLE_FIELDS and old.get(k) != new.get(k)]
    if diffs:
        k = diffs[0]
        raise ConfigError(
            f"--workdir holds a run with a different config: config.{k} was {old.get(k)!r}, "
            f"now {new.get(k)!r} ({len(diffs)} field(s) differ; see {config_path}). "
            "Use a fresh --workdir.")
