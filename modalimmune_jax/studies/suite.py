r"""A suite: methods × seeds on one dataset; writes results.json, table.md, plots (DESIGN §5, §7).

`experiments.reproduce` is its binary. Every run is a `training.trainer` run in a workdir of its
own; the unlearning comparison is `studies.unlearn`; the tables are `studies.tables`.

Layout of --out:
- ``data/``: the dataset, built once and shared by every run;
- ``runs/<name>/seed<k>/``: one `experiments.train` workdir per run; ``<name>`` is a method, or
  for the ablation ``modalimmune-no_<component>`` (a ``config.mi`` switch that is on by default,
  off) or ``modalimmune-with_<component>`` (one that is off by default, on);
- ``unlearn/<method>/``: the unlearning comparison on the erm seed-0 run;
- ``results.json``: per run name, every eval.json number as ``{"mean", "std"}`` over seeds
  (`robustness.summarize_seeds`), with effective robustness against the erm run of the same seed;
  plus ``"_meta"`` and, when run, ``"unlearning"``;
- ``table.md``: the missing-modality table(s) and the robustness table, mean ± std;
- ``plots/*.png``: random missing, corruption, embedding spectra, controller IG.

A rerun with the same --out skips every finished run (its eval.json exists), resumes unfinished
ones from their checkpoints, and rewrites the summaries.
"""

import concurrent.futures
import multiprocessing
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

import data_pipelines
from modalimmune_jax import methods as methods_lib
from modalimmune_jax import robustness
from modalimmune_jax.evaluation import iterate_batches
from modalimmune_jax.metrics import LOWER_IS_BETTER, TABLE_METRICS
from modalimmune_jax.spectral import effective_rank, singular_value_spectrum
from modalimmune_jax.studies import plots, tables
from modalimmune_jax.studies import unlearn as unlearn_lib
from modalimmune_jax.studies.tables import aggregate, compare_to_baselines, render_tables
from modalimmune_jax.training import cli, files, trainer
from modalimmune_jax.training import config as config_lib
from modalimmune_jax.training import mesh as mesh_lib
from modalimmune_jax.training.errors import ConfigError
from modalimmune_jax.training.evaluator import CURVE_METRIC

SUITES = data_pipelines.DATASETS
UNLEARNING_METHODS = unlearn_lib.METHODS
# The linear reference flattens the time axis (rather than pooling it) up to this many features.
LINEAR_FLATTEN_MAX = 4096
# Run names of the oracle's specialists: "oracle:<condition>".
ORACLE_PREFIX = "oracle:"
BASELINES = ("erm", "moddrop", "consistency", "ogm_ge", "modalimmune")
# The config.mi switches of DESIGN.md §3, each flipped in turn for the ablation.
ABLATION_COMPONENTS = ("controller", "collapse", "regularizer", "curvature", "meta")
# --quick: the first command of the README, ModalImmune against erm and moddrop in minutes.
QUICK_METHODS = ("erm", "moddrop", "modalimmune")
FAST_STEPS = {"synthetic": 600, "digits": 500, "npz": 1000, "cmu_mosi": 1000, "cmu_mosei": 1000,
              "iemocap": 1000}
# eval.json blocks carried into results.json (robustness is recomputed against erm).
class Run(NamedTuple):
    """One row of the tables: a method, ModalImmune with components off, or a specialist.

    ``disabled``: the ``config.mi`` switches turned off (``modalimmune-no_<c>`` has one,
    ``modalimmune-none`` all of them: uniform targets, zero-fill instead of collapse, no
    regularizer, no curvature mask, no meta-update, the two-branch floor); ``enabled``: those
    turned on (``modalimmune-with_<c>``, a component that is off by default). ``keep``: a
    specialist's kept modalities (``config.use_modalities``) for the oracle row.
    """

    name: str
    method: str
    disabled: tuple[str, ...] = ()
    keep: str = ""
    enabled: tuple[str, ...] = ()

    @property
    def is_ablation(self) -> bool:
        """One component flipped: explains the main comparison, run with the ablation seeds."""
        return len(self.disabled) + len(self.enabled) == 1


def suite_config(suite: str, *, get_config, fast: bool = False, tiny: bool = False,
                 num_steps: int = 0, dataset_path: str = "",
                 data_dir: str = "") -> ml_collections.ConfigDict:
    """The base config shared by every run of `suite` (method and seed are set per run)."""
    if suite not in SUITES:
        raise ConfigError(f"--suite: unknown suite {suite!r}; expected one of {SUITES}")
    config = get_config(suite + (",tiny" if tiny else ""))
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


def switches_on(mi: ml_collections.ConfigDict) -> list[str]:
    """The `ABLATION_COMPONENTS` a ``config.mi`` block has on (`make_runs`'s ``default_on``)."""
    return [c for c in ABLATION_COMPONENTS if mi[c]]


def make_runs(method_names: Sequence[str], *, ablation: bool, oracle: bool = False,
              modalities: Sequence[str] = (), floor: bool = True,
              default_on: Sequence[str] = ABLATION_COMPONENTS) -> list[Run]:
    """The table rows: each method; with modalimmune, its floor ``modalimmune-none`` (unless not
    `floor`) and (with `ablation`) one row per component flipped: ``-no_<c>`` for the components
    in `default_on` (the base config's ``config.mi`` switches that are on), ``-with_<c>`` for the
    others; with `oracle`, one erm specialist per condition."""
    for name in method_names:
        if name not in methods_lib.METHODS:
            raise ConfigError(f"--methods: unknown method {name!r}; expected some of "
                              f"{methods_lib.METHODS}")
    runs = [Run(name, name) for name in method_names]
    if "modalimmune" in method_names:
        if floor:
            runs.append(Run("modalimmune-none", "modalimmune", ABLATION_COMPONENTS))
        if ablation:
            runs += [Run(f"modalimmune-no_{c}", "modalimmune", (c,)) if c in default_on
                     else Run(f"modalimmune-with_{c}", "modalimmune", enabled=(c,))
                     for c in ABLATION_COMPONENTS]
    if oracle:
        runs += [Run(f"{ORACLE_PREFIX}{cond}", "erm", keep=cond.replace("+", ","))
                 for cond, _ in robustness.missing_conditions(modalities)]
    return runs


def run_config(base: ml_collections.ConfigDict, run: Run, seed: int) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(base.to_dict())
    config.method = run.method
    config.seed = seed
    for component in run.disabled:
        config.mi[component] = False
    for component in run.enabled:
        config.mi[component] = True
    if run.keep:
        config.use_modalities = run.keep
        # The specialist is scored on its own condition: its full-modality metrics.
        config.eval.protocol = "full"
    return config


def embedding_spectra(workdir: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Normalized singular-value spectrum and effective rank of each modality's test embedding.

    Returns:
      ``({modality: [min(N, d)] float32}, {modality: float})`` from ``z_m`` ``[N, d]`` of the
      run's best params on the whole test split (DESIGN.md §3.2 diagnostics).
    """
    run = trainer.load_trained(workdir)
    config, info = run.config, run.setup.info
    test = data_pipelines.load_split(config.dataset, "test", data_dir=run.setup.data_dir)
    put = mesh_lib.make_eval_put_fn(run.mesh)
    encode = jax.jit(run.setup.apply_fns.encode)
    zs = [np.asarray(jax.device_get(encode(run.params, put(batch))))[:n_valid]
          for batch, n_valid in iterate_batches(test, config.eval.batch_size)]
    z = np.concatenate(zs)  # [N, M, d]
    # One compilation shared by every modality (same [N, d]) instead of a dozen eager ops each.
    stats_fn = jax.jit(lambda z_m: (singular_value_spectrum(z_m), effective_rank(z_m)))
    spectra, eranks = {}, {}
    for i, m in enumerate(info.modalities):
        spectrum, erank = jax.device_get(stats_fn(z[:, i]))
        spectra[m], eranks[m] = np.asarray(spectrum), float(erank)
    return spectra, eranks


def _run_unlearning(out: str, erm_workdir: str, forget: str, steps: int | None, *,
                    workers: int = 1, cache_dir: str | None = None, unlearn_job=None) -> dict:
    results, todo = {}, []
    for name in UNLEARNING_METHODS:
        method_out = os.path.join(out, "unlearn", name)
        done = os.path.join(method_out, "unlearn.json")
        if os.path.exists(done):
            results[name] = files.read_json(done)
        else:
            todo.append(name)
    # In one process the jobs share one MeasureCache (one compile of the measurement).
    cache = unlearn_lib.MeasureCache() if workers <= 1 else None
    for i, result in run_jobs(unlearn_job or _unlearn_job,
                              [(erm_workdir, forget, name, os.path.join(out, "unlearn", name),
                                steps, cache) for name in todo],
                              workers=workers, desc="unlearn", labels=todo, cache_dir=cache_dir):
        results[todo[i]] = result
    return {name: results[name] for name in UNLEARNING_METHODS}


def _make_plots(out: str, results: Mapping, runs: Sequence[Run], *, info, curve: str) -> list:
    plot_dir = os.path.join(out, "plots")
    main = [r.name for r in runs if not (r.disabled or r.enabled or r.keep)]
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
        records = files.read_jsonl(os.path.join(out, "runs", "modalimmune", "seed0",
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
    cli.quiet_libraries()
    if cache_dir:
        enable_compilation_cache(cache_dir)
    exit_with_parent(os.getppid())


def exit_with_parent(parent: int, poll_s: float = 0.5) -> threading.Thread:
    """Ends this process when `parent` is gone (this process is re-parented), from a thread.

    A killed `experiments.reproduce` otherwise leaves its spawned workers training on, into a
    folder the user may already have deleted or restarted in. A run stopped this way resumes
    from its last (atomic) checkpoint on the next invocation.
    """
    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def default_train_job(config_dict: dict, workdir: str, progress: bool) -> float:
    t0 = time.time()
    trainer.train_and_evaluate(ml_collections.ConfigDict(config_dict), workdir,
                               progress=progress)
    return time.time() - t0


def _unlearn_job(workdir: str, forget: str, method: str, out: str, steps: int | None,
                 cache, progress: bool) -> dict:
    return unlearn_lib.unlearn(workdir=workdir, forget=forget, method=method, out=out,
                               steps=steps, progress=progress, cache=cache)


def run_jobs(fn, jobs: Sequence[tuple], *, workers: int, desc: str, labels: Sequence[str],
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


def reproduce(suite: str, out: str, *, get_config, seeds: int = 3, fast: bool = False,
              tiny: bool = False, num_steps: int = 0, dataset_path: str = "",
              method_names: Sequence[str] = BASELINES, ablation: bool = True,
              unlearning: bool = True, ablation_seeds: int = 0, workers: int = 1,
              oracle: bool | None = None, linear: bool = True, quick: bool = False,
              train_job=None, unlearn_job=None) -> dict[str, Any]:
    """Runs the suite into `out` (see the module docstring) and returns results.json's body.

    Args:
      suite: a dataset name (`SUITES`).
      out: the output folder; a rerun with the same folder resumes.
      get_config: ``preset -> ConfigDict``, the configs' ``get_config`` (experiments/configs).
      seeds, fast, tiny, num_steps, dataset_path, method_names, ablation, unlearning,
        ablation_seeds, workers: the `experiments.reproduce` flags of the same names.
      oracle: train the per-condition specialists (the oracle row); None: by default on the
        digits suite, unless `fast`.
      linear: add the linear reference (scikit-learn, seconds).
      quick: the README's first command: `fast` steps, one seed, `QUICK_METHODS`, no floor,
        ablation, oracle or unlearning.
      train_job, unlearn_job: stand-ins for `default_train_job` and `_unlearn_job` (tests: a run
        that must not happen, a fake unlearning); module-level functions when ``workers > 1``.
    """
    # 1. Output folder, shared data and the base config.
    if quick:
        fast, seeds, method_names, ablation, unlearning, oracle = (
            True, 1, QUICK_METHODS, False, False, False)
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    out = os.path.abspath(out)
    base = suite_config(suite, get_config=get_config, fast=fast, tiny=tiny, num_steps=num_steps,
                        dataset_path=dataset_path, data_dir=os.path.join(out, "data"))
    info = data_pipelines.prepare(base.dataset, data_dir=base.dataset.data_dir)
    if oracle is None:
        oracle = suite == "digits" and not fast
    runs = make_runs(method_names, ablation=ablation, oracle=oracle, modalities=info.modalities,
                     floor=not quick, default_on=switches_on(base.mi))
    curve = CURVE_METRIC[info.metric_family]
    wall_path = os.path.join(out, "wall_times.json")
    wall = files.read_json(wall_path) if os.path.exists(wall_path) else {}
    t_suite = time.time()

    # 2. Every run × seed; finished runs are read back, unfinished ones resume. Seed 0 of every
    # run goes first, so that with several workers the later seeds find each program compiled,
    # and within each group the ModalImmune runs (the longest) go first.
    evals: dict[str, list] = {r.name: [] for r in runs}
    # The one-component ablation rows are one seed under --fast unless asked otherwise: they
    # explain the main comparison, and each costs a ModalImmune compile. modalimmune-none is a
    # baseline of the comparison: every seed.
    ablation_seeds = min(seeds, ablation_seeds or (1 if fast else seeds))
    seeds_of = {r.name: ablation_seeds if r.is_ablation else seeds for r in runs}
    workdir_of = lambda run, seed: os.path.join(out, "runs", run.name, f"seed{seed}")
    todo = sorted(((r, k) for r in runs for k in range(seeds_of[r.name])
                   if not os.path.exists(os.path.join(workdir_of(r, k), "eval.json"))),
                  key=lambda job: (job[1] > 0, job[0].method != "modalimmune"))
    cache_dir = jax.config.jax_compilation_cache_dir or None
    for i, seconds in run_jobs(
            train_job or default_train_job,
            [(run_config(base, r, k).to_dict(), workdir_of(r, k)) for r, k in todo],
            workers=workers, desc="runs", labels=[f"{r.name} seed{k}" for r, k in todo],
            cache_dir=cache_dir):
        run, seed = todo[i]
        wall[f"{run.name}/seed{seed}"] = seconds
        files.write_json(wall_path, wall)
    for run in runs:
        for seed in range(seeds_of[run.name]):
            evals[run.name].append(files.read_json(os.path.join(workdir_of(run, seed),
                                                                "eval.json")))

    # 3. Summaries over seeds, with effective robustness against erm of the same seed; the
    # specialists make one oracle row.
    specialists = {r.name[len(ORACLE_PREFIX):]: evals.pop(r.name) for r in runs if r.keep}
    if specialists:
        evals[tables.ORACLE] = [tables.oracle_eval({c: per[k] for c, per in specialists.items()})
                                for k in range(seeds)]
    results = aggregate(evals, metric=curve, reference=evals.get("erm"))
    results["_meta"] = {
        "suite": suite, "seeds": list(range(seeds)), "fast": fast, "tiny": tiny, "quick": quick,
        "steps": base.num_steps, "runs": [r.name for r in runs],
        "modalities": list(info.modalities), "metric_family": info.metric_family,
        "curve_metric": curve, "table_metrics": list(TABLE_METRICS[info.metric_family]),
        "seeds_per_run": seeds_of,
        "wall_time_s": {r.name: float(sum(wall.get(f"{r.name}/seed{k}", 0.0)
                                          for k in range(seeds_of[r.name]))) for r in runs},
    }
    table_metric = TABLE_METRICS[info.metric_family][0]
    results["_meta"]["comparison"] = {
        protocol: compare_to_baselines(results, metric=table_metric, protocol=protocol,
                                       higher_is_better=table_metric not in LOWER_IS_BETTER)
        for protocol, _ in tables.PROTOCOLS}
    if linear:
        results["linear"] = linear_reference(base, info)

    def write_summaries():
        results["_meta"]["suite_wall_time_s"] = time.time() - t_suite
        files.write_json(os.path.join(out, "results.json"), results)
        title = f"{suite} suite ({base.num_steps} steps per run{', fast' if fast else ''})"
        files.atomic_write_text(os.path.join(out, "table.md"), render_tables(
            results, names=[r.name for r in runs if not r.keep], modalities=info.modalities,
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
                workers=workers, cache_dir=cache_dir, unlearn_job=unlearn_job)
            write_summaries()
        else:
            tqdm.write("note: unlearning comparison skipped (it starts from the erm run)")
    return results


def linear_reference(config, info) -> dict:
    """The linear reference row: full, and one linear specialist per missing condition."""
    from modalimmune_jax import linear_reference as linear_lib  # noqa: PLC0415

    load = lambda split: data_pipelines.load_split(config.dataset, split,
                                                   data_dir=config.dataset.data_dir)
    # DESIGN §4 pools over time; where every view is small (digits: 8 rows of 4-8 pixels) the
    # rows side by side keep their position, which pooling throws away (digits: 0.97 against
    # 0.60), and that is the reference a user would fit. Which one ran is recorded.
    width = sum(int(np.prod(info.feature_shapes[m])) for m in info.modalities)
    pooling = "flatten" if width <= LINEAR_FLATTEN_MAX else "mean"
    out = linear_lib.linear_reference_conditions(
        load("train"), load("test"), modalities=info.modalities, task=info.task,
        metric_family=info.metric_family, pooling=pooling)
    return {**out, "pooling": pooling}


def reproduce_command(suite: str, out: str, *, cache: bool = True, **kwargs) -> str:
    """`experiments.reproduce`: resolves the paths, runs the suite, returns the summary."""
    out = config_lib.absolute_path(out)
    if kwargs.get("dataset_path"):
        kwargs["dataset_path"] = config_lib.absolute_path(kwargs["dataset_path"])
    if cache:
        # Every run shares the model and the evaluation: later runs skip most compile time.
        enable_compilation_cache(os.path.join(out, ".jax_cache"))
    if not kwargs.get("workers"):
        kwargs["workers"] = default_workers()
    results = reproduce(suite, out, **kwargs)
    return tables.suite_summary(results, out=out)
