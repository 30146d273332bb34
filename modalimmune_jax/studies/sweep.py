"""Choosing settings on the VALID split: named variants × seeds on one dataset, never on test.

Each variant is a set of config overrides (dotted field -> value, e.g. ``{"method": "moddrop",
"moddrop.p": 0.5}``). Every run trains like any other (`training.trainer`, in
``OUT/runs/<variant>/seed<k>``, resumable), then evaluates its best-on-valid params on the valid
split only (``config.eval.split = "valid"``: ``eval_valid.json``, the missing conditions under both
protocols). ``OUT/sweep.json`` holds every variant's mean ± std over seeds and ``OUT/table.md``
ranks them by the mean of the two protocols' missing-modality averages. `experiments.sweep` is
the binary; the variants the defaults were chosen from are in ``experiments/configs/sweeps.py``.
"""

import os
import time
from collections.abc import Mapping

import jax
import ml_collections

import data_pipelines
from modalimmune_jax.metrics import LOWER_IS_BETTER, TABLE_METRICS
from modalimmune_jax.studies import plots
from modalimmune_jax.studies import suite as suite_lib
from modalimmune_jax.studies import tables
from modalimmune_jax.training import config as config_lib
from modalimmune_jax.training import files
from modalimmune_jax.training.errors import ConfigError
from modalimmune_jax.training.evaluator import CURVE_METRIC


def variant_config(base: ml_collections.ConfigDict, overrides: Mapping, seed: int):
    """`base` with the variant's dotted `overrides` and `seed`, evaluated on valid."""
    config = ml_collections.ConfigDict(base.to_dict())
    for field, value in overrides.items():
        try:
            config_lib.get_field(config, field)
        except (KeyError, AttributeError):
            raise ConfigError(f"variant field {field!r}: no such config field") from None
        *parents, leaf = field.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    config.seed = seed
    config.eval.split = "valid"
    config.eval.protocol = "missing"
    return config


def sweep(suite: str, out: str, *, get_config, variants: Mapping[str, Mapping], seeds: int = 2,
          fast: bool = False, num_steps: int = 0, dataset_path: str = "", workers: int = 1,
          train_job=None) -> dict:
    """Runs every variant × seed on `suite`; returns (and writes) the valid-split summaries."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    out = os.path.abspath(out)
    base = suite_lib.suite_config(suite, get_config=get_config, fast=fast,
                                  num_steps=num_steps, dataset_path=dataset_path,
                                  data_dir=os.path.join(out, "data"))
    info = data_pipelines.prepare(base.dataset, data_dir=base.dataset.data_dir)
    workdir = lambda name, k: os.path.join(out, "runs", name, f"seed{k}")
    jobs = [(name, k) for k in range(seeds) for name in variants
            if not os.path.exists(os.path.join(workdir(name, k), "eval_valid.json"))]
    configs = {(name, k): variant_config(base, variants[name], k)
               for name in variants for k in range(seeds)}
    t0 = time.time()
    cache_dir = jax.config.jax_compilation_cache_dir or None
    for _ in suite_lib.run_jobs(
            train_job or suite_lib.default_train_job,
            [(configs[job].to_dict(), workdir(*job)) for job in jobs], workers=workers,
            desc="sweep", labels=[f"{n} seed{k}" for n, k in jobs], cache_dir=cache_dir):
        pass
    evals = {name: [files.read_json(os.path.join(workdir(name, k), "eval_valid.json"))
                    for k in range(seeds)] for name in variants}
    curve = CURVE_METRIC[info.metric_family]
    results = tables.aggregate(evals, metric=curve)
    metric = TABLE_METRICS[info.metric_family][0]
    results["_meta"] = {"suite": suite, "split": "valid", "seeds": list(range(seeds)),
                        "steps": base.num_steps, "metric": metric, "variants": dict(variants),
                        "runs": list(variants), "table_metrics": [metric],
                        "modalities": list(info.modalities), "wall_time_s": time.time() - t0}
    files.write_json(os.path.join(out, "sweep.json"), results)
    files.atomic_write_text(os.path.join(out, "table.md"), sweep_table(results))
    moved = meta_trajectories({name: workdir(name, 0) for name in variants})
    if moved:
        plots.plot_meta_parameters(moved, path=os.path.join(out, "phi.png"))
    return results


def meta_trajectories(workdirs: Mapping[str, str]) -> dict:
    """``{variant: metrics records}`` of the runs whose meta-update moved φ (seed 0's run)."""
    moved = {}
    for name, folder in workdirs.items():
        path = os.path.join(folder, "metrics.jsonl")
        if not os.path.exists(path):
            continue
        records = [r for r in files.read_jsonl(path) if "strength" in r]
        if any(len({round(r[key], 6) for r in records}) > 1 for key, _, _ in plots.PHI_SERIES):
            moved[name] = records
    return moved


def _score(results, name, metric) -> float:
    """The mean over seeds of the two protocols' missing Avg (the ranking key)."""
    r = results[name]
    if not r.get("missing_avg"):
        return float(r["full"][metric]["mean"])
    return 0.5 * (r["missing_avg"][metric]["mean"] + r["missing_avg_mask"][metric]["mean"])


def sweep_table(results: Mapping) -> str:
    """table.md of a sweep: variants ranked by the two protocols' mean missing Avg, on valid."""
    meta = results["_meta"]
    metric = meta["metric"]
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    names = sorted(meta["runs"], key=lambda n: -sign * _score(results, n, metric))
    header = ["Variant", f"Full {metric}", "Avg (zero)", "worst (zero)", "Avg (mask)",
              "worst (mask)", "overrides"]
    rows = [row + [", ".join(f"{k}={v}" for k, v in meta["variants"][row[0]].items())]
            for row in tables.compact_rows(results, names=names, metric=metric)]
    text = (f"# Sweep on `{meta['suite']}`, VALID split ({meta['steps']} steps, seeds "
            f"{meta['seeds']}; mean ± std)\n\nRanked by the mean of the two protocols' missing "
            f"Avg. Test was not evaluated.\n\n" + tables.markdown(header, rows) + "\n")
    ablation = tables.ablation_table(results, metric=metric)
    if ablation:
        text += ("\n## With and without each mechanism\n\nEach `X-no_S` variant against the "
                 "variants named `X...`: the margin of the missing Avg in points (pooled std).\n\n"
                 + ablation + "\n")
    return text


def sweep_command(suite: str, out: str, **kwargs) -> str:
    """`experiments.sweep`: resolves the paths, runs the sweep, returns its table."""
    out = config_lib.absolute_path(out)
    if kwargs.get("dataset_path"):
        kwargs["dataset_path"] = config_lib.absolute_path(kwargs["dataset_path"])
    if not kwargs.get("workers"):
        kwargs["workers"] = suite_lib.default_workers()
    suite_lib.enable_compilation_cache(os.path.join(out, ".jax_cache"))
    return sweep_table(sweep(suite, out, **kwargs)) + f"\nwrote {os.path.join(out, 'sweep.json')}"
