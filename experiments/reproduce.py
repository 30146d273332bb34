r"""Runs methods × seeds of one suite; writes results.json, table.md and plots (DESIGN.md §5, §7).

  python -m experiments.reproduce --suite=synthetic --out=/tmp/repro_syn --fast
  python -m experiments.reproduce --suite=digits --out=/tmp/repro_digits --seeds=3
  python -m experiments.reproduce --suite=cmu_mosi --dataset_path=/data/MOSI --out=/tmp/repro_mosi
  # The smallest form (what tests/test_reproduce.py runs):
  python -m experiments.reproduce --suite=synthetic --tiny --num_steps=20 --seeds=1 \
      --methods=erm --no_ablation --no_unlearning --out=/tmp/repro_tiny

Layout of --out:
- ``data/``: the dataset, built once and shared by every run;
- ``runs/<name>/seed<k>/``: one `experiments.train` workdir per run; ``<name>`` is a method, or
  ``modalimmune-no_<component>`` for the ablation (that ``config.mi`` switch off);
- ``unlearn/<method>/``: the unlearning comparison on the erm seed-0 run (if `experiments.unlearn`
  exists);
- ``results.json``: per run name, every eval.json number as ``{"mean", "std"}`` over seeds
  (`robustness.summarize_seeds`), with effective robustness against the erm run of the same seed;
  plus ``"_meta"`` and, when run, ``"unlearning"``;
- ``table.md``: the missing-modality table(s) and the robustness table, mean ± std;
- ``plots/*.png``: random missing, corruption, embedding spectra, controller IG.

A rerun with the same --out skips every finished run (its eval.json exists), resumes unfinished
ones from their checkpoints, and rewrites the summaries.
"""

import concurrent.futures
import json
import multiprocessing
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import data_pipelines
from experiments import eval_lib, io_lib, plots, train
from experiments.config_lib import ConfigError
from experiments.configs import default
from modalimmune_jax import methods as methods_lib
from modalimmune_jax import robustness
from modalimmune_jax.evaluation import iterate_batches
from modalimmune_jax.spectral import effective_rank, singular_value_spectrum

SUITES = ("synthetic", "digits", "npz", "cmu_mosi", "cmu_mosei", "iemocap")
BASELINES = ("erm", "moddrop", "consistency", "modalimmune")
# The config.mi switches of DESIGN.md §3, each turned off in turn for the ablation.
ABLATION_COMPONENTS = ("controller", "collapse", "regularizer", "curvature", "meta")
UNLEARNING_METHODS = ("retrain", "finetune", "neggrad", "ccu", "manu", "modalimmune")
# --fast: steps per run, chosen so the whole synthetic suite fits in ~10 minutes on 2 CPU cores.
FAST_STEPS = {"synthetic": 600, "digits": 500, "npz": 1000, "cmu_mosi": 1000, "cmu_mosei": 1000,
              "iemocap": 1000}
# eval.json blocks carried into results.json (robustness is recomputed against erm).
SUMMARY_KEYS = ("full", "missing", "missing_avg", "missing_mask", "missing_avg_mask",
                "random_missing", "corruption", "reconstruction")
# The columns of the field's missing-modality tables (MMSA / MulT / classification papers).
TABLE_METRICS = {"classification": ("acc",), "sentiment": ("Non0_acc_2", "MAE"),
                 "iemocap": ("avg_acc",), "regression": ("MAE",)}
LOWER_IS_BETTER = ("MAE",)
KIND_TITLES = {"gaussian": "Gaussian", "timestep_drop": "Timestep drop"}

_SUITE = flags.DEFINE_enum("suite", None, SUITES, "Which dataset suite to run.")
_OUT = flags.DEFINE_string("out", None, "Output folder (runs, results.json, table.md, plots).")
_FAST = flags.DEFINE_bool("fast", False, "Fewer steps per run (FAST_STEPS) for a quick look.")
_TINY = flags.DEFINE_bool("tiny", False, "The config's `tiny` modifier (smoke tests).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 0, "Steps per run; 0 keeps the preset/--fast value.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds 0..N-1 per method.")
_DATASET_PATH = flags.DEFINE_string("dataset_path", "", "config.dataset.path (npz / real data).")
_METHODS = flags.DEFINE_list("methods", list(BASELINES), "Methods to compare.")
# Named as the negations so that `--no_ablation` / `--no_unlearning` read as written.
_NO_ABLATION = flags.DEFINE_bool("no_ablation", False, "Skip the ModalImmune ablation runs.")
_ABLATION_SEEDS = flags.DEFINE_integer(
    "ablation_seeds", 0, "Seeds per ablation run; 0 means --seeds, or 1 under --fast.")
_NO_UNLEARNING = flags.DEFINE_bool("no_unlearning", False,
                                   "Skip the modality-unlearning comparison.")
_WORKERS = flags.DEFINE_integer(
    "workers", 0, "Runs at once, each in a process of its own; 0: one per CPU core (at most 4) "
    "when JAX's backend is the CPU, else 1 (each process would claim the accelerator's memory).")
_CACHE = flags.DEFINE_bool("compilation_cache", True,
                           "Persist XLA compilations in OUT/.jax_cache: every run shares the model "
                           "and evaluation, so later runs skip most compile time.")


class Run(NamedTuple):
    """One row of the tables: a training method, possibly with one ModalImmune component off."""

    name: str
    method: str
    disabled: str | None = None


# ------------------------------------------------------------------------------------- configs


def suite_config(suite: str, *, fast: bool = False, tiny: bool = False, num_steps: int = 0,
                 dataset_path: str = "", data_dir: str = "") -> ml_collections.ConfigDict:
    """The base config shared by every run of `suite` (method and seed are set per run)."""
    if suite not in SUITES:
        raise ConfigError(f"--suite: unknown suite {suite!r}; expected one of {SUITES}")
    config = default.get_config(suite + (",tiny" if tiny else ""))
    if fast and not tiny:
        config.num_steps = FAST_STEPS[suite]
    if num_steps:
        config.num_steps = num_steps
    if fast or tiny or num_steps:
        # A few validation/checkpoint points per run are enough for model selection and resume.
        interval = max(config.num_steps // 3, 1)
        config.eval_every = min(config.eval_every, interval)
        config.checkpoint_every = min(config.checkpoint_every, interval)
        config.log_every = min(config.log_every, max(config.num_steps // 10, 1))
    config.dataset.path = dataset_path
    config.dataset.data_dir = data_dir
    return config


def make_runs(method_names: Sequence[str], *, ablation: bool) -> list[Run]:
    """The table rows: each method, then (if modalimmune is among them) its ablations."""
    for name in method_names:
        if name not in methods_lib.METHODS:
            raise ConfigError(f"--methods: unknown method {name!r}; expected some of "
                              f"{methods_lib.METHODS}")
    runs = [Run(name, name) for name in method_names]
    if ablation and "modalimmune" in method_names:
        runs += [Run(f"modalimmune-no_{c}", "modalimmune", c) for c in ABLATION_COMPONENTS]
    return runs


def run_config(base: ml_collections.ConfigDict, run: Run, seed: int) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(base.to_dict())
    config.method = run.method
    config.seed = seed
    if run.disabled is not None:
        config.mi[run.disabled] = False
    return config


# --------------------------------------------------------------------------------- aggregation


def _drop_strings(tree):
    # robustness_summary tags each curve with its metric name; summarize_seeds needs numbers only.
    return {k: _drop_strings(v) if isinstance(v, Mapping) else v
            for k, v in tree.items() if not isinstance(v, str)}


def seed_robustness(eval_result: Mapping, metric: str, reference: Mapping | None = None) -> dict:
    """One run's robustness summaries, plus each corruption kind averaged over modalities.

    Args:
      eval_result: a run's eval.json body.
      metric: the curve metric (``eval_lib.CURVE_METRIC[family]``).
      reference: the erm eval.json of the same seed, for effective robustness; None for relative
        robustness only.

    Returns:
      ``{"random_missing": {"relative"[, "effective"]}, "corruption": {modality: {kind: {...}}},
      "corruption_avg": {kind: {...}}}`` of Python floats.
    """
    rob = _drop_strings(eval_lib.robustness_summary(eval_result, metric, reference=reference))
    kinds = sorted({k for per_mod in rob["corruption"].values() for k in per_mod})
    rob["corruption_avg"] = {}
    for kind in kinds:
        curves = [per_mod[kind] for per_mod in rob["corruption"].values() if kind in per_mod]
        rob["corruption_avg"][kind] = {stat: float(np.mean([c[stat] for c in curves]))
                                       for stat in curves[0]}
    return rob


def aggregate(evals: Mapping[str, Sequence[Mapping]], *, metric: str,
              reference: Sequence[Mapping] | None = None) -> dict:
    """Per run name, every eval.json number as ``{"mean", "std"}`` over seeds.

    Args:
      evals: ``{name: [eval.json body of seed 0, seed 1, ...]}``.
      metric: the curve metric for the robustness summaries.
      reference: the erm eval.json per seed, aligned with each name's list; None skips effective
        robustness.

    Returns:
      ``{name: {key: summary}}`` for the eval.json keys in ``SUMMARY_KEYS`` that the runs hold, and
      ``robustness`` (see `seed_robustness`), each leaf ``{"mean": float, "std": float}`` with
      the population std (``robustness.summarize_seeds``).
    """
    out = {}
    for name, per_seed in evals.items():
        # A run may have fewer seeds than erm (the ablation under --fast): seeds 0..n-1 align.
        if reference is not None and len(reference) < len(per_seed):
            raise ValueError(f"{name}: {len(per_seed)} seeds but {len(reference)} reference runs")
        rows = []
        for k, ev in enumerate(per_seed):
            row = {key: ev[key] for key in SUMMARY_KEYS if key in ev}
            row["robustness"] = seed_robustness(
                ev, metric, reference=None if reference is None else reference[k])
            rows.append(row)
        out[name] = robustness.summarize_seeds(rows)
    return out


def compare_to_baselines(results: Mapping, *, metric: str, higher_is_better: bool,
                         method: str = "modalimmune",
                         baselines: Sequence[str] = ("erm", "moddrop", "consistency")) -> dict:
    """The acceptance check of the suite: does `method` beat every baseline on ``missing_avg``?

    ``margin`` is ``method - best baseline`` (sign flipped for lower-is-better metrics, so > 0 is
    better); ``pooled_std = sqrt((std_method^2 + std_best^2) / 2)``; ``holds`` is
    ``margin > pooled_std``. ``full_gap_to_erm`` is ``method - erm`` on the full-modality metric
    (same sign convention).
    """
    present = [b for b in baselines if b in results]
    if method not in results or not present:
        return {}
    sign = 1.0 if higher_is_better else -1.0
    avg = lambda name: results[name]["missing_avg"][metric]
    best = max(present, key=lambda b: sign * avg(b)["mean"])
    margin = sign * (avg(method)["mean"] - avg(best)["mean"])
    pooled = float(np.sqrt((avg(method)["std"] ** 2 + avg(best)["std"] ** 2) / 2))
    out = {"metric": metric, "best_baseline": best, "margin": float(margin),
           "pooled_std": pooled, "holds": bool(margin > pooled)}
    if "erm" in results:
        full = lambda name: results[name]["full"][metric]["mean"]
        out["full_gap_to_erm"] = float(sign * (full(method) - full("erm")))
    return out


# -------------------------------------------------------------------------------------- tables


def is_percent(metric: str) -> bool:
    """Accuracies and F1 scores print as percentages; MAE, Corr and the like as raw numbers."""
    lowered = metric.lower()
    return "acc" in lowered or "f1" in lowered


def format_stat(stat: Mapping[str, float], metric: str, *, signed: bool = False) -> str:
    """``{"mean", "std"}`` -> ``"97.3 ± 0.4"`` (percent, 1 decimal) or ``"0.712 ± 0.010"``."""
    scale, digits = (100.0, 1) if is_percent(metric) else (1.0, 3)
    sign = "+" if signed else ""
    # Rounding first, then adding +0.0, turns a float-noise "-0.0" (erm's ER against itself) into 0.
    mean = round(stat["mean"] * scale, digits) + 0.0
    return f"{mean:{sign}.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def missing_table(results: Mapping, *, names: Sequence[str], modalities: Sequence[str],
                  metric: str) -> tuple[list[str], list[list[str]]]:
    """Rows = run names; columns = Full, each missing condition (kept modalities), Avg."""
    conditions = [c for c, _ in robustness.missing_conditions(modalities)]
    header = ["Method", "Full", *conditions, "Avg"]
    rows = [[name, format_stat(results[name]["full"][metric], metric),
             *(format_stat(results[name]["missing"][c][metric], metric) for c in conditions),
             format_stat(results[name]["missing_avg"][metric], metric)] for name in names]
    return header, rows


def robustness_table(results: Mapping, *, names: Sequence[str],
                     metric: str) -> tuple[list[str], list[list[str]]]:
    """Rows = run names; RR and ER under random missing and each corruption kind (modality avg)."""
    kinds = sorted({k for name in names for k in results[name]["robustness"]["corruption_avg"]})
    blocks = [("Random missing", lambda r: r["random_missing"])]
    blocks += [(KIND_TITLES.get(k, k), lambda r, k=k: r["corruption_avg"][k]) for k in kinds]
    header = ["Method"]
    for title, _ in blocks:
        header += [f"{title} RR", f"{title} ER"]
    rows = []
    for name in names:
        row = [name]
        for _, get in blocks:
            stats = get(results[name]["robustness"])
            row.append(format_stat(stats["relative"], metric))
            row.append(format_stat(stats["effective"], metric, signed=True)
                       if "effective" in stats else "—")
        rows.append(row)
    return header, rows


def _flat_scalars(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def unlearning_table(unlearning: Mapping[str, Mapping], *,
                     metric: str) -> tuple[list[str], list[list[str]]]:
    """Rows = unlearning methods; forget quality, retained `metric` and wall time (one seed)."""
    flat = {name: _flat_scalars(r) for name, r in unlearning.items()}
    keys = sorted({k for f in flat.values() for k in f
                   if k.startswith("forget_quality/") or k == "wall_time_s"
                   or (k.startswith("retained/") and k.rsplit("/", 1)[-1] == metric)})
    rows = [[name, *(f"{f[k]:.3f}" if k in f else "—" for k in keys)] for name, f in flat.items()]
    return ["Method", *keys], rows


def render_tables(results: Mapping, *, names: Sequence[str], modalities: Sequence[str],
                  family: str, num_seeds: int, title: str = "Results") -> str:
    """table.md: the missing-modality table per main metric, the robustness table, unlearning.

    Rows run on fewer seeds than ``num_seeds`` (``_meta.seeds_per_run``) are marked with their
    count; ``_meta.comparison`` (`compare_to_baselines`) is stated under the first table.
    """
    seeds = f"mean ± std over {num_seeds} seed{'s' if num_seeds != 1 else ''}"
    per_run = results.get("_meta", {}).get("seeds_per_run", {})

    def table(header_rows):
        header, rows = header_rows
        for row in rows:
            n = per_run.get(row[0], num_seeds)
            if n != num_seeds:
                row[0] = f"{row[0]} ({n} seed{'s' if n != 1 else ''})"
        return _markdown(header, rows) + "\n"

    curve = eval_lib.CURVE_METRIC[family]
    n_cond = len(robustness.missing_conditions(modalities))
    parts = [f"# {title}\n"]
    number = 0
    for metric in TABLE_METRICS[family]:
        number += 1
        unit = " (%)" if is_percent(metric) else ""
        parts.append(
            f"**Table {number}.** Test-split `{metric}`{unit} with modalities missing; {seeds} "
            f"(population std). Full: every modality present. Each further column keeps only the "
            f"named modalities; the others are zero-filled with the presence mask left at 1 "
            f"(`zero` protocol, DESIGN.md §5). Avg: the mean over the {n_cond} missing "
            f"conditions.\n")
        parts.append(table(missing_table(results, names=names, modalities=modalities,
                                         metric=metric)))
        cmp = results.get("_meta", {}).get("comparison", {})
        if number == 1 and cmp:
            verdict = "more" if cmp["holds"] else "not more"
            # Without an erm run there is no gap to state (0.0 would read as a measurement).
            gap = ("" if "full_gap_to_erm" not in cmp else
                   f" Full-modality gap to erm: {cmp['full_gap_to_erm']:+.4f} (positive is better).")
            parts.append(
                f"modalimmune's Avg against the best baseline ({cmp['best_baseline']}): margin "
                f"{cmp['margin']:+.4f}, pooled std {cmp['pooled_std']:.4f}, so {verdict} than the "
                f"pooled std.{gap}\n")
    number += 1
    unit = " (%)" if is_percent(curve) else ""
    parts.append(
        f"**Table {number}.** Robustness on the test split, from the `{curve}`{unit} curves; "
        f"{seeds}. RR (relative robustness, MultiBench): the area under the metric-vs-level curve "
        f"divided by the level range (random missing: rates 0.0-0.7 per sample and modality, at "
        f"least one kept, `zero` protocol; corruption: levels 0.0-0.9 of one modality at a time, "
        f"averaged over the {len(modalities)} modalities). ER (effective robustness): the same "
        f"area for the gap to the erm curve of the same seed shifted to match at level 0, so erm "
        f"scores 0 and positive is more robust than erm.\n")
    parts.append(table(robustness_table(results, names=names, metric=curve)))
    if results.get("unlearning"):
        metric = TABLE_METRICS[family][0]
        number += 1
        parts.append(
            f"**Table {number}.** Modality unlearning on the erm seed-0 run, one seed, test split: "
            f"forget quality (probe and alone accuracy on the forgotten modality, its information "
            f"gain), retained `{metric}` and wall time (s). See `experiments/unlearn.py`.\n")
        parts.append(_markdown(*unlearning_table(results["unlearning"], metric=metric)) + "\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------- model restoring


def restore_best_params(workdir: str):
    """A finished run's ``(config, info, data_dir, apply_fns, best_params)``, as `evaluate` does."""
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    replicated = NamedSharding(train.make_mesh(), P())
    info, data_dir, build_model, apply_fns = train.setup(config, workdir)
    params, _, _ = train.restore_best(workdir, config, build_model=build_model,
                                      apply_fns=apply_fns, info=info, sharding=replicated)
    return config, info, data_dir, apply_fns, params


def embedding_spectra(workdir: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Normalized singular-value spectrum and effective rank of each modality's test embedding.

    Returns:
      ``({modality: [min(N, d)] float32}, {modality: float})`` from ``z_m`` ``[N, d]`` of the
      run's best params on the whole test split (DESIGN.md §3.2 diagnostics).
    """
    config, info, data_dir, apply_fns, params = restore_best_params(workdir)
    test = data_pipelines.load_split(config.dataset, "test", data_dir=data_dir)
    put = train.make_put_fn(NamedSharding(train.make_mesh(), P("data")))
    encode = jax.jit(apply_fns.encode)
    zs = [np.asarray(jax.device_get(encode(params, put(batch))))[:n_valid]
          for batch, n_valid in iterate_batches(test, config.eval.batch_size)]
    z = np.concatenate(zs)  # [N, M, d]
    # One compilation shared by every modality (same [N, d]) instead of a dozen eager ops each.
    stats_fn = jax.jit(lambda z_m: (singular_value_spectrum(z_m), effective_rank(z_m)))
    spectra, eranks = {}, {}
    for i, m in enumerate(info.modalities):
        spectrum, erank = jax.device_get(stats_fn(z[:, i]))
        spectra[m], eranks[m] = np.asarray(spectrum), float(erank)
    return spectra, eranks


# ---------------------------------------------------------------------------------- the suite


def _load_json(path):
    with open(path) as f:
        return json.load(f)


def _run_unlearning(out: str, erm_workdir: str, forget: str, steps: int | None, *,
                    workers: int = 1, cache_dir: str | None = None) -> dict:
    results, todo = {}, []
    for name in UNLEARNING_METHODS:
        method_out = os.path.join(out, "unlearn", name)
        done = os.path.join(method_out, "unlearn.json")
        if os.path.exists(done):
            results[name] = _load_json(done)
        else:
            todo.append(name)
    for i, result in _run_all(_unlearn_job,
                              [(erm_workdir, forget, name, os.path.join(out, "unlearn", name),
                                steps) for name in todo],
                              workers=workers, desc="unlearn", labels=todo, cache_dir=cache_dir):
        results[todo[i]] = result
    return {name: results[name] for name in UNLEARNING_METHODS}


def _make_plots(out: str, results: Mapping, runs: Sequence[Run], *, info, curve: str) -> list:
    plot_dir = os.path.join(out, "plots")
    main = [r.name for r in runs if r.disabled is None]
    paths = [
        plots.plot_random_missing(results, metric=curve, methods=main,
                                  path=os.path.join(plot_dir, "random_missing.png")),
        plots.plot_corruption(results, metric=curve, modalities=info.modalities, methods=main,
                              path=os.path.join(plot_dir, "corruption.png")),
    ]
    spectra, eranks = {}, {}
    for name in ("erm", "modalimmune"):
        if name in main:
            spectra[name], eranks[name] = embedding_spectra(
                os.path.join(out, "runs", name, "seed0"))
    if spectra:
        paths.append(plots.plot_spectra(spectra, effective_ranks=eranks,
                                        path=os.path.join(plot_dir, "spectra.png")))
    if "modalimmune" in main:
        records = io_lib.read_jsonl(os.path.join(out, "runs", "modalimmune", "seed0",
                                                 "metrics.jsonl"))
        if any(k.startswith("ig/") for r in records for k in r):
            paths.append(plots.plot_information_gain(
                records, modalities=info.modalities,
                path=os.path.join(plot_dir, "information_gain.png")))
        else:
            tqdm.write("note: no ig/<modality> series in modalimmune's metrics.jsonl; no IG plot")
    return paths


def default_workers() -> int:
    """``--workers=0``: one process per core (at most 4) on the CPU backend, else 1."""
    if jax.default_backend() != "cpu":
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def _init_worker(cache_dir: str | None) -> None:
    # A spawned process starts from a fresh JAX: it gets the parent's persistent cache settings.
    train.quiet_libraries()
    if cache_dir:
        enable_compilation_cache(cache_dir)


def _train_job(config_dict: dict, workdir: str, progress: bool) -> float:
    t0 = time.time()
    train.train_and_evaluate(ml_collections.ConfigDict(config_dict), workdir, progress=progress)
    return time.time() - t0


def _unlearn_job(workdir: str, forget: str, method: str, out: str, steps: int | None,
                 progress: bool) -> dict:
    # Looked up at call time: the tests put a stand-in module in sys.modules.
    from experiments.unlearn import unlearn  # noqa: PLC0415

    kwargs = {} if steps is None else {"steps": steps}
    return unlearn(workdir=workdir, forget=forget, method=method, out=out, progress=progress,
                   **kwargs)


def _run_all(fn, jobs: Sequence[tuple], *, workers: int, desc: str, labels: Sequence[str],
             cache_dir: str | None):
    """Yields ``(index, fn(*jobs[index]))`` as each job finishes, under one tqdm bar.

    ``workers == 1`` runs the jobs here, in order, with their own progress bars. More run in
    spawned processes (a forked JAX runtime is unsafe), which a single bar summarizes; each
    worker keeps its JAX alive between jobs, so later runs of a compiled program reuse it in
    memory as well as through the persistent cache. The first failure cancels what has not
    started and is raised here.
    """
    bar = tqdm(total=len(jobs), desc=desc, dynamic_ncols=True)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                bar.set_postfix_str(labels[i], refresh=False)
                yield i, fn(*job, True)
                bar.update()
            return
        with concurrent.futures.ProcessPoolExecutor(
                max_workers=min(workers, len(jobs)),
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(cache_dir,)) as pool:
            futures = {pool.submit(fn, *job, False): i for i, job in enumerate(jobs)}
            try:
                for future in concurrent.futures.as_completed(futures):
                    i = futures[future]
                    result = future.result()
                    bar.set_postfix_str(f"done: {labels[i]}", refresh=False)
                    bar.update()
                    yield i, result
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    finally:
        bar.close()


def enable_compilation_cache(cache_dir: str) -> None:
    """Persists XLA compilations in `cache_dir`, every one of them (see `main`)."""
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # The evaluation compiles dozens of small programs; on a busy CPU each costs about 1 s,
    # under the default 1 s threshold, so cache them all.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def reproduce(suite: str, out: str, *, seeds: int = 3, fast: bool = False, tiny: bool = False,
              num_steps: int = 0, dataset_path: str = "", method_names: Sequence[str] = BASELINES,
              ablation: bool = True, unlearning: bool = True,
              ablation_seeds: int = 0, workers: int = 1) -> dict[str, Any]:
    """Runs the suite into `out` (see the module docstring) and returns results.json's body."""
    # 1. Output folder, shared data and the base config.
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    out = os.path.abspath(out)
    base = suite_config(suite, fast=fast, tiny=tiny, num_steps=num_steps,
                        dataset_path=dataset_path, data_dir=os.path.join(out, "data"))
    runs = make_runs(method_names, ablation=ablation)
    info = data_pipelines.prepare(base.dataset, data_dir=base.dataset.data_dir)
    curve = eval_lib.CURVE_METRIC[info.metric_family]
    wall_path = os.path.join(out, "wall_times.json")
    wall = _load_json(wall_path) if os.path.exists(wall_path) else {}
    t_suite = time.time()

    # 2. Every run × seed; finished runs are read back, unfinished ones resume. Seed 0 of every
    # run goes first, so that with several workers the later seeds find each program compiled,
    # and within each group the ModalImmune runs (the longest) go first.
    evals: dict[str, list] = {r.name: [] for r in runs}
    # The ablation rows are one seed under --fast unless asked otherwise: they explain the main
    # comparison, and each costs a ModalImmune compile.
    ablation_seeds = min(seeds, ablation_seeds or (1 if fast else seeds))
    seeds_of = {r.name: ablation_seeds if r.disabled else seeds for r in runs}
    workdir_of = lambda run, seed: os.path.join(out, "runs", run.name, f"seed{seed}")
    todo = sorted(((r, k) for r in runs for k in range(seeds_of[r.name])
                   if not os.path.exists(os.path.join(workdir_of(r, k), "eval.json"))),
                  key=lambda job: (job[1] > 0, job[0].method != "modalimmune"))
    cache_dir = jax.config.jax_compilation_cache_dir or None
    for i, seconds in _run_all(
            _train_job, [(run_config(base, r, k).to_dict(), workdir_of(r, k)) for r, k in todo],
            workers=workers, desc="runs", labels=[f"{r.name} seed{k}" for r, k in todo],
            cache_dir=cache_dir):
        run, seed = todo[i]
        wall[f"{run.name}/seed{seed}"] = seconds
        io_lib.atomic_write_json(wall_path, wall)
    for run in runs:
        for seed in range(seeds_of[run.name]):
            evals[run.name].append(_load_json(os.path.join(workdir_of(run, seed), "eval.json")))

    # 3. Summaries over seeds, with effective robustness against erm of the same seed.
    results = aggregate(evals, metric=curve, reference=evals.get("erm"))
    results["_meta"] = {
        "suite": suite, "seeds": list(range(seeds)), "fast": fast, "tiny": tiny,
        "steps": base.num_steps, "runs": [r.name for r in runs],
        "modalities": list(info.modalities), "metric_family": info.metric_family,
        "curve_metric": curve, "table_metrics": list(TABLE_METRICS[info.metric_family]),
        "seeds_per_run": seeds_of,
        "wall_time_s": {r.name: float(sum(wall.get(f"{r.name}/seed{k}", 0.0)
                                          for k in range(seeds_of[r.name]))) for r in runs},
    }
    table_metric = TABLE_METRICS[info.metric_family][0]
    results["_meta"]["comparison"] = compare_to_baselines(
        results, metric=table_metric,
        higher_is_better=table_metric not in LOWER_IS_BETTER)

    def write_summaries():
        results["_meta"]["suite_wall_time_s"] = time.time() - t_suite
        io_lib.atomic_write_json(os.path.join(out, "results.json"), results)
        title = f"{suite} suite ({base.num_steps} steps per run{', fast' if fast else ''})"
        io_lib.atomic_write_text(os.path.join(out, "table.md"), render_tables(
            results, names=[r.name for r in runs], modalities=info.modalities,
            family=info.metric_family, num_seeds=seeds, title=title))

    # 4. results.json, table.md and plots, written before the unlearning step so that a failure
    # there cannot cost the training runs' summaries.
    write_summaries()
    _make_plots(out, results, runs, info=info, curve=curve)

    # 5. Unlearning comparison on the erm seed-0 run, forgetting the first modality.
    if unlearning:
        if "erm" in evals:
            steps = max(base.num_steps // 2, 1) if (fast or tiny or num_steps) else None
            results["unlearning"] = _run_unlearning(
                out, os.path.join(out, "runs", "erm", "seed0"), info.modalities[0], steps,
                workers=workers, cache_dir=cache_dir)
            write_summaries()
        else:
            tqdm.write("note: unlearning comparison skipped (it starts from the erm run)")
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    train.quiet_libraries()
    if _CACHE.value:
        # Every run shares the model and the evaluation: later runs skip most compile time.
        enable_compilation_cache(os.path.join(os.path.abspath(_OUT.value), ".jax_cache"))
    train.run_cli(lambda: reproduce(
        _SUITE.value, _OUT.value, seeds=_SEEDS.value, fast=_FAST.value, tiny=_TINY.value,
        num_steps=_NUM_STEPS.value, dataset_path=_DATASET_PATH.value,
        method_names=tuple(_METHODS.value), ablation=not _NO_ABLATION.value,
        ablation_seeds=_ABLATION_SEEDS.value,
        unlearning=not _NO_UNLEARNING.value, workers=_WORKERS.value or default_workers()))


if __name__ == "__main__":
    flags.mark_flags_as_required(["suite", "out"])
    app.run(main)
