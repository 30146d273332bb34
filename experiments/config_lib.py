"""Config validation and workdir compatibility: bad input fails early, with the field named."""

import json
import os

import ml_collections

from modalimmune_jax.model import ENCODERS, FUSIONS

DATASETS = ("synthetic", "digits", "npz", "cmu_mosi", "cmu_mosei", "iemocap")
# Fields a rerun may change without invalidating the checkpoints in a workdir.
RESUMABLE_FIELDS = ("num_steps", "log_every", "eval_every", "checkpoint_every",
                    "keep_checkpoints", "dataset.data_dir", "dataset.worker_count",
                    "eval.batch_size", "preset")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field."""


def _positive_int(config, name):
    value = _get(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"config.{name} must be a positive integer, got {value!r}")


def _in_range(config, name, lo, hi, *, lo_open=False, hi_open=False):
    value = _get(config, name)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and (
        (lo is None or (value > lo if lo_open else value >= lo))
        and (hi is None or (value < hi if hi_open else value <= hi)))
    if not ok:
        interval = (f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, "
                    f"{'inf' if hi is None else hi}{')' if hi_open or hi is None else ']'}")
        raise ConfigError(f"config.{name} must be a number in {interval}, got {value!r}")


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def validate_config(config: ml_collections.ConfigDict, *, methods) -> None:
    """Raises :class:`ConfigError` naming the first invalid field."""
    if config.method not in methods:
        raise ConfigError(f"config.method: unknown method {config.method!r}; expected one of "
                          f"{tuple(methods)}")
    if config.dataset.name not in DATASETS:
        raise ConfigError(f"config.dataset.name: unknown dataset {config.dataset.name!r}; "
                          f"expected one of {DATASETS}")
    if config.model.encoder not in ENCODERS:
        raise ConfigError(f"config.model.encoder: unknown encoder {config.model.encoder!r}; "
                          f"expected one of {ENCODERS}")
    if config.model.fusion not in FUSIONS:
        raise ConfigError(f"config.model.fusion: unknown fusion {config.model.fusion!r}; "
                          f"expected one of {FUSIONS}")
    if config.loss.regression not in ("l1", "mse"):
        raise ConfigError(f"config.loss.regression must be 'l1' or 'mse', got "
                          f"{config.loss.regression!r}")
    for name in ("num_steps", "batch_size", "log_every", "eval_every", "checkpoint_every",
                 "keep_checkpoints", "eval.batch_size", "model.d", "model.d_h",
                 "model.num_heads", "optimizer.max_consecutive_nonfinite"):
        _positive_int(config, name)
    if not config.optimizer.lr > 0:
        raise ConfigError(f"config.optimizer.lr must be > 0, got {config.optimizer.lr!r}")
    if not 0.0 <= config.moddrop.p < 1.0:
        raise ConfigError(f"config.moddrop.p must be in [0, 1), got {config.moddrop.p!r}")
    # Fields that would otherwise fail deep inside the first jitted step, or silently give NaN
    # (a strength of 1 has an infinite logit; a negative damping certifies nothing).
    for name, lo, hi, lo_open, hi_open in (
            ("optimizer.warmup_steps", 0, None, False, False),
            ("optimizer.end_lr_factor", 0, None, False, False),
            ("optimizer.weight_decay", 0, None, False, False),
            ("optimizer.grad_clip", 0, None, False, False),
            ("mi.strength", 0, 1, True, True), ("mi.p_clean", 0, 1, False, False),
            ("removal.mask_prob", 0, 1, False, False), ("mi.ema_beta", 0, 1, False, True),
            ("mi.curv_decay", 0, 1, False, True),
            ("mi.tau", 0, None, True, False), ("mi.reg_weight", 0, None, True, False),
            ("mi.damping", 0, None, False, False), ("mi.meta_lr", 0, None, False, False),
            ("loss.reconstruction", 0, None, True, False)):
        _in_range(config, name, lo, hi, lo_open=lo_open, hi_open=hi_open)
    if config.mi.quantile is not None:  # None damps every entry (curvature.curvature_mask)
        _in_range(config, "mi.quantile", 0, 1)
    for name in ("mi.ig_every", "mi.curv_every", "mi.curv_probes", "mi.meta_every",
                 "mi.power_iters"):
        _positive_int(config, name)
    if config.mi.anchor not in ("null", "mean"):
        raise ConfigError(f"config.mi.anchor must be 'null' or 'mean', got {config.mi.anchor!r}")
    if config.mi.mask_mode not in ("hard", "soft"):
        raise ConfigError(f"config.mi.mask_mode must be 'hard' or 'soft', got "
                          f"{config.mi.mask_mode!r}")
    for name in ("mi.neumann_terms", "dataset.max_len"):
        value = _get(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"config.{name} must be an integer >= 0, got {value!r}")
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
    diffs = [k for k in sorted(set(old) | set(new))
             if k not in RESUMABLE_FIELDS and old.get(k) != new.get(k)]
    if diffs:
        k = diffs[0]
        raise ConfigError(
            f"--workdir holds a run with a different config: config.{k} was {old.get(k)!r}, "
            f"now {new.get(k)!r} ({len(diffs)} field(s) differ; see {config_path}). "
            "Use a fresh --workdir.")
