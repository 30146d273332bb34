r"""Prices every part of a training step, as medians over repeated runs in one process (DESIGN §8).

`experiments.benchmark` is its binary. It writes (and prints) one JSON object; every time is a
median, in seconds, after a warm-up run:

- ``step_s``: one amortized train step of erm, moddrop, consistency, ogm_ge, modalimmune-none
  (ModalImmune with every component off: its floor), modalimmune and modalimmune-all (every
  component on, the regularizer and the curvature mask included, which are off by default),
  each at the config's settings: the mean over a window of ``lcm(ig_every, curv_every,
  meta_every)`` steps, so every amortized refresh (IG, Hutchinson, meta-update) falls in it as
  often as in training;
  ``first_call_s``: each method's first call at step 0 (trace and compile, then one step);
  ``periodic_first_call_s``: the first call at its first due step of a method with a periodic
  update (ModalImmune's meta-update: its own program; compile, then the update and one step);
- ``loop_step_s``: one step of the real trainer loop (`training.trainer.train`: input pipeline,
  device put, logging) for erm and modalimmune, from its metrics.jsonl: the median over the
  intervals between its log records from the second on, whole windows apart (`time_loop`);
  ``loop_over_step_throughput`` is ``step_s / loop_step_s`` (1: never input-bound);
- ``modalimmune_step_s``: the modalimmune step at a step with no refresh (``plain``) and at steps
  where exactly one refresh fires; ``components_s``: what each refresh adds to its step
  (``controller_refresh``, ``hutchinson_refresh``, ``meta_update``), and ``collapse_regularizer``:
  the spectral collapse of one modality plus the collapse regularizer, forward and backward, alone;
- ``curvature_s``: gradient, forward-over-reverse HVP, HVP from a reused linearisation, one Neumann
  term (the slope of a Neumann solve's time in K, so the fixed costs cancel), of the clean task
  loss of the real model on a real batch;
- ``hypergrad_compile_s``: compile time of the implicit hypergradient for K in {5, 20, 80};
- ``pipeline``: input-pipeline samples/s (the trainer's loader, with and without the device put)
  against training samples/s;
- ``memory``: peak host RSS, and the device's peak bytes where the backend reports them;
- ``ratios`` and ``targets`` (issue 15: ModalImmune at most 2x erm and 1.25x its floor, its
  compile at most 12 s -- the first call, and the first call plus the meta-update's program --,
  the loop at least 0.9 of the step): reported, never asserted.

The step is the trainer's (`train.make_optimizer`, the method's ``grads``, the same shardings and
donation), run on pre-placed batches, so step times exclude the input pipeline, measured apart.
"""

import itertools
import math
import os
import resource
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

import data_pipelines
from modalimmune_jax import curvature, hypergrad, losses, methods, spectral
from modalimmune_jax.model import collapse_target
from modalimmune_jax.studies.suite import ABLATION_COMPONENTS
from modalimmune_jax.training import config as config_lib
from modalimmune_jax.training import files, trainer
from modalimmune_jax.training import mesh as mesh_lib
from modalimmune_jax.training import step as step_lib
from modalimmune_jax.training.errors import ConfigError

STEP_METHODS = ("erm", "moddrop", "consistency", "ogm_ge", "modalimmune-none", "modalimmune",
                "modalimmune-all")
LOOP_METHODS = ("erm", "modalimmune")
# ModalImmune with every component off (studies.suite's modalimmune-none); -all: every one on.
NONE_SWITCHES = ABLATION_COMPONENTS
HYPERGRAD_TERMS = (5, 20, 80)
# The per-term cost is the slope between these; far apart, so the slope stands above timing noise.
NEUMANN_TERMS = (2, 42)
# The targets (issue 15; DESIGN §8): (ratio, bound, "le" | "ge").
TARGETS = {"modalimmune_over_erm_step": (2.0, "le"), "modalimmune_over_none_step": (1.25, "le"),
           "modalimmune_first_call_s": (12.0, "le"),
           "modalimmune_compile_total_s": (12.0, "le"),
           "loop_over_step_throughput/erm": (0.9, "ge"),
           "loop_over_step_throughput/modalimmune": (0.9, "ge"),
           "hvp_over_grad": (1.8, "le"), "hypergrad_compile_kmax_over_kmin": (1.5, "le"),
           "pipeline_over_step": (10.0, "ge")}


def _median(fn, repeats):
    """Median seconds of ``fn()`` (which must block until its result is ready)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _median_call(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # warm-up: compile and first run
    return _median(lambda: jax.block_until_ready(fn(*args)), repeats)


class _Bench:
    """The data, model and shardings shared by every measurement."""

    def __init__(self, config, data_dir):
        self.config = config
        self.data_dir = data_dir
        self.mesh = mesh_lib.make_mesh()
        self.replicated = mesh_lib.replicated(self.mesh)
        self.put = mesh_lib.make_put_fn(mesh_lib.data_sharding(self.mesh))
        built = trainer.setup(config, data_dir)
        self.info, self.build_model, self.apply_fns = built.info, built.build_model, built.apply_fns
        loader = data_pipelines.make_loader(
            config.dataset, "train", data_dir=data_dir, batch_size=config.batch_size,
            seed=config.seed, shuffle=True, num_epochs=None, drop_remainder=True)
        it = iter(loader)
        valid = data_pipelines.load_split(config.dataset, "valid", data_dir=data_dir)
        # The trainer's put: one packed array per batch, unpacked inside the step.
        self.packing = mesh_lib.BatchPacking.of(valid)
        self.put_packed = mesh_lib.make_put_fn(mesh_lib.data_sharding(self.mesh), self.packing)
        # A few distinct batches, placed once: step times exclude the input pipeline. ``batches``
        # for the parts timed alone, ``packed`` for the trainer's step.
        host = [next(it) for _ in range(4)]
        self.batches = [self.put(b) for b in host]
        self.packed = [self.put_packed(b) for b in host]
        self.meta_batch = step_lib.make_meta_batch(valid, config.batch_size, self.put)
        self.params = nnx.state(self.build_model(jax.random.key(config.seed)), nnx.Param)

    def method_config(self, method):
        """The config for a method name of `STEP_METHODS` (``modalimmune-none``: all off,
        ``modalimmune-all``: all on)."""
        config = self.config.copy_and_resolve_references()
        with config.unlocked():
            config.method = "modalimmune" if method.startswith("modalimmune") else method
            if method in ("modalimmune-none", "modalimmune-all"):
                for switch in NONE_SWITCHES:
                    config.mi[switch] = method == "modalimmune-all"
        return config

    def step_fn(self, method_name) -> "_TimedStep":
        """The trainer's jitted step for `method_name` (over the state's leaves, donated)."""
        config = self.method_config(method_name)
        method = methods.make_method(config.method, self.apply_fns, info=self.info,
                                     config=config)
        tx, _ = step_lib.make_optimizer(config, transform=method.transform)
        init_fn = step_lib.make_init_fn(self.build_model, tx, method)
        state = jax.jit(init_fn, out_shardings=self.replicated)(jax.random.key(config.seed))
        flat = step_lib.jit_flat_step(step_lib.make_train_step(method, tx), state,
                                      replicated=self.replicated,
                                      data_sharding=mesh_lib.data_sharding(self.mesh),
                                      periodic=method.periodic, unpack=self.packing.unpack)
        return _TimedStep(flat, flat.leaves(state), jax.random.key(1), self.replicated)

    def clean_task(self, params, batch):
        out = self.apply_fns.apply(params, batch)
        return jnp.mean(losses.task_loss(out["preds"], batch["label"], task=self.info.task,
                                         regression_loss=self.config.loss.regression))


def refresh_period(mi) -> int:
    """Steps after which every amortized refresh has fired as often as in training."""
    periods = [p for on, p in ((mi.controller, mi.ig_every), (mi.curvature, mi.curv_every),
                               (mi.meta, mi.meta_every)) if on]
    return math.lcm(*periods) if periods else 1


def _refreshes(mi, step) -> frozenset:
    """The amortized refreshes that fire at `step` (the conditions of ``make_modalimmune``)."""
    fired = set()
    if mi.controller and step % mi.ig_every == 0:
        fired.add("controller_refresh")
    if mi.curvature and step % mi.curv_every == 0:
        fired.add("hutchinson_refresh")
    if mi.meta and step % mi.meta_every == 0 and step > 0:
        fired.add("meta_update")
    return frozenset(fired)


class _TimedStep:
    """One method's compiled step and its current state's leaves, stepped on fixed batches."""

    def __init__(self, flat, leaves, rng_loop, replicated):
        self.flat, self.leaves, self.rng_loop, self.replicated = flat, leaves, rng_loop, replicated
        self.step = 0

    def at_step(self, step):
        """Sets the state's step counter (outside the timed spans: it rebuilds the state)."""
        state = self.flat.state(self.leaves)
        self.leaves = self.flat.leaves({**state, "step": jax.device_put(jnp.int32(step),
                                                                        self.replicated)})
        self.step = step

    def run(self, batches, meta_batch, num_steps):
        """Seconds per step over `num_steps` steps, dispatched as the trainer does (async, the
        periodic update's programs on the steps where it is due)."""
        t0 = time.perf_counter()
        for i in range(num_steps):
            self.leaves, meas = self.flat.run(self.leaves, batches[i % len(batches)],
                                              meta_batch, self.rng_loop, step=self.step)
            self.step += 1
        jax.block_until_ready((self.leaves, meas))
        return (time.perf_counter() - t0) / num_steps


def time_steps(bench, method_names, *, repeats, calls):
    """Amortized step times of every method, and modalimmune's by refresh and component.

    Every method is compiled first; then each repeat runs every method's window in turn, so a
    change in the machine's speed during the benchmark (a shared host) lands on all methods
    alike instead of on whichever ran last. Returns ``{name: {"step_s", "window",
    "first_call_s"}}`` (and ``periodic_first_call_s`` with a periodic update) plus, for
    modalimmune, ``modalimmune_step_s`` and ``components_s``.
    """
    mi = bench.config.mi
    start = refresh_period(mi)  # > 0, so the meta-update fires at its own step as in training
    timed, out = {}, {}

    def first_call(step, at):
        step.at_step(at)
        compile_start = time.perf_counter()
        step.run(bench.packed[:1], bench.meta_batch, 1)
        return time.perf_counter() - compile_start

    for name in method_names:
        step = bench.step_fn(name)
        # A run's first call is step 0's; the periodic update compiles at its first due step.
        out[name] = {"first_call_s": first_call(step, 0),
                     "window": (refresh_period(bench.method_config(name).mi)
                                if name.startswith("modalimmune") else 20)}
        if step.flat.compute is not None:
            due = next(s for s in itertools.count(1) if step.flat.due(s))
            out[name]["periodic_first_call_s"] = first_call(step, due)
        timed[name] = step

    def window_run(name):
        timed[name].at_step(start)
        return timed[name].run(bench.packed, bench.meta_batch, out[name]["window"])

    samples = {name: [] for name in method_names}
    for r in range(repeats + 1):  # the first round is a warm-up
        for name in method_names:
            t = window_run(name)
            if r:
                samples[name].append(t)
    for name in method_names:
        out[name]["step_s"] = statistics.median(samples[name])
    if "modalimmune" in timed:
        out["modalimmune"].update(_modalimmune_refreshes(bench, timed["modalimmune"], calls))
    return out


def _modalimmune_refreshes(bench, step, calls):
    """The compiled modalimmune step at chosen step indices: one with no refresh, one per set of
    refreshes that fire together; and what each refresh adds."""
    mi = bench.config.mi
    start = refresh_period(mi)
    by_set = {}
    for s in range(1, 4 * start + 1):
        by_set.setdefault(_refreshes(mi, s), s)

    def at(s):
        times = []
        for i in range(calls + 1):  # the first call is a warm-up
            step.at_step(s)
            times.append(step.run(bench.packed[i % len(bench.packed):], bench.meta_batch, 1))
        return statistics.median(times[1:])

    step_times = {"+".join(sorted(k)) or "plain": at(s) for k, s in by_set.items()}
    components = {}
    for name in ("controller_refresh", "hutchinson_refresh", "meta_update"):
        alone = step_times.get(name)
        if alone is not None:
            components[name] = alone - step_times["plain"]
        elif f"controller_refresh+{name}" in step_times:  # it only fires with the IG refresh
            components[name] = (step_times[f"controller_refresh+{name}"]
                                - step_times["controller_refresh"])
        else:
            components[name] = None  # switched off in the config
    return {"modalimmune_step_s": step_times, "components_s": components}


def time_collapse_regularizer(bench, *, repeats):
    """Collapse one modality's embedding, then the collapse regularizer: forward + backward."""
    mi, mods = bench.config.mi, bench.info.modalities
    batch, params = bench.batches[0], bench.params
    z = jax.jit(bench.apply_fns.encode)(params, batch)
    h_clean, _ = jax.jit(bench.apply_fns.head)(params, z, batch["mask"])
    target = jax.nn.one_hot(0, len(mods))

    def objective(z):
        z_hit = collapse_target(z, target, mi.strength, mi.gamma,
                                collapse_fn=spectral.spectral_collapse)
        h_col, _ = bench.apply_fns.head(params, z_hit, batch["mask"])
        return spectral.collapse_regularizer(h_clean, h_col)

    return _median_call(jax.jit(jax.value_and_grad(objective)), z, repeats=repeats)


def time_curvature(bench, *, repeats):
    """Gradient, HVPs and one Neumann term of the clean task loss of the real model."""
    batch = bench.batches[0]
    loss_fn = lambda p: bench.clean_task(p, batch)
    params = bench.params
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    v = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype)
                                     for k, x in zip(keys, leaves, strict=True)])
    t_grad = _median_call(jax.jit(jax.grad(loss_fn)), params, repeats=repeats)
    t_hvp = _median_call(jax.jit(lambda p, u: curvature.hvp(loss_fn, p, u)), params, v,
                         repeats=repeats)
    t_lin = _median_call(jax.jit(lambda p, u: curvature.linearized_hvp(loss_fn, p)(u)), params,
                         v, repeats=repeats)

    def neumann(num_terms):
        # A given spectrum skips Lanczos: the time is the K-term scan plus one residual HVP.
        def solve(p, u):
            x, cert = hypergrad.neumann_inverse_hvp(
                curvature.linearized_hvp(loss_fn, p), u, num_terms=num_terms, damping=1.0,
                spectrum=(1.0, 10.0))
            return x, cert["residual_norm"]

        return _median_call(jax.jit(solve), params, v, repeats=repeats)

    k_lo, k_hi = NEUMANN_TERMS
    t_lo, t_hi = neumann(k_lo), neumann(k_hi)
    per_term = (t_hi - t_lo) / (k_hi - k_lo)
    if per_term <= 0:  # noise beat the slope (a loaded machine): an upper bound instead
        per_term = t_hi / (k_hi + 1)
    return {"grad": t_grad, "hvp": t_hvp, "hvp_linearized": t_lin, "neumann_term": per_term}


def time_hypergrad_compile(bench, terms=HYPERGRAD_TERMS):
    """Seconds to compile the implicit hypergradient (Lanczos + K-term Neumann) for each K."""
    mi, mods = bench.config.mi, bench.info.modalities
    batch, meta_batch = bench.batches[0], bench.meta_batch
    phi = {"log_rec_weight": jnp.float32(0.0)}

    def inner(p, f):  # depends on φ through the reconstruction weight, as the trainer's does
        out = bench.apply_fns.apply(p, batch)
        rec = jnp.mean(losses.reconstruction_loss(
            out["recon"], losses.pooled_features(batch, mods),
            variances=losses.reconstruction_variances(bench.info)))
        return bench.clean_task(p, batch) + jnp.exp(f["log_rec_weight"]) * rec

    out = {}
    for k in terms:
        fn = jax.jit(lambda p, f, k=k: hypergrad.implicit_hypergradient(
            inner, lambda q: bench.clean_task(q, meta_batch), p, f, num_terms=k,
            damping=mi.damping, key=jax.random.key(0), num_lanczos_iters=mi.num_lanczos_iters))
        start = time.perf_counter()
        fn.lower(bench.params, phi).compile()
        out[str(k)] = time.perf_counter() - start
    return out


def time_pipeline(bench, *, num_batches):
    """Input-pipeline samples/s: the trainer's loader, host only and with the device put."""
    config = bench.config
    loader = data_pipelines.make_loader(
        config.dataset, "train", data_dir=bench.data_dir, batch_size=config.batch_size,
        seed=config.seed + 1, shuffle=True, num_epochs=None, drop_remainder=True)
    it = iter(loader)
    for _ in range(3):
        next(it)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    host = num_batches * config.batch_size / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(num_batches):
        jax.block_until_ready(bench.put_packed(next(it)))
    with_put = num_batches * config.batch_size / (time.perf_counter() - start)
    return {"host_samples_per_s": host, "with_put_samples_per_s": with_put}


def time_loop(bench, method_name, *, steps):
    """One step of the real trainer loop, from its metrics.jsonl: seconds per step.

    `training.trainer.train` on the bench's data for at least `steps` steps and 10 log records
    (no evaluation or checkpoint inside the timed span), logging every ``config.log_every`` steps
    rounded up to whole windows (the method's refresh period, as in `time_steps`). The result is
    the median over the intervals between consecutive log records from the second on, so that
    the step's compile, the meta-update's (at its first due step, before the second record) and
    the final evaluation are out, every refresh fires in each interval as often as in training,
    and one interval slowed by the shared host does not move it (the step times are medians too).
    """
    config = bench.method_config(method_name)
    window = refresh_period(config.mi) if method_name.startswith("modalimmune") else 1
    # The config's own logging interval, rounded up to whole windows: a log record reads the
    # step's measurements back to the host, so logging more often than training does would time
    # the logging.
    log_every = window * math.ceil(config.log_every / window)
    with config.unlocked():
        config.num_steps = log_every * max(math.ceil(steps / log_every), 10)
        config.log_every = log_every
        config.eval_every = config.checkpoint_every = config.num_steps
        config.eval.protocol = "full"
        config.dataset.data_dir = bench.data_dir
    with tempfile.TemporaryDirectory() as workdir:
        trainer.train(config, workdir, progress=False)
        records = [r for r in files.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
                   if "elapsed_s" in r]
    return statistics.median((b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
                             for a, b in itertools.pairwise(records[1:]))


def memory_stats():
    """Peak host RSS (MiB) and, where the backend reports it, the device's peak bytes in use."""
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    stats = jax.devices()[0].memory_stats()
    out["device_peak_bytes"] = None if not stats else stats.get("peak_bytes_in_use")
    return out


def run_benchmark(config, *, data_dir, repeats, calls, pipeline_batches, loop_steps=300,
                  methods_to_time=STEP_METHODS, hypergrad_terms=HYPERGRAD_TERMS,
                  loop_methods=LOOP_METHODS) -> dict:
    """Every measurement of the module docstring, as one JSON-ready dict."""
    bench = _Bench(config, data_dir)
    result = {
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
        "num_devices": jax.device_count(), "num_processes": jax.process_count(),
        "preset": config.preset, "batch_size": config.batch_size,
        "num_params": int(sum(x.size for x in jax.tree.leaves(bench.params))),
        "amortization": {k: config.mi[k] for k in (
            "controller", "curvature", "meta", "ig_every", "curv_every", "meta_every",
            "neumann_terms", "num_lanczos_iters", "curv_probes")},
        "repeats": repeats, "step_s": {}, "first_call_s": {}, "periodic_first_call_s": {},
    }
    for name, timed in time_steps(bench, methods_to_time, repeats=repeats,
                                  calls=calls).items():
        result["step_s"][name] = timed["step_s"]
        result["first_call_s"][name] = timed["first_call_s"]
        if "periodic_first_call_s" in timed:
            result["periodic_first_call_s"][name] = timed["periodic_first_call_s"]
        if name == "modalimmune":
            result["window_steps"] = timed["window"]
            result["modalimmune_step_s"] = timed["modalimmune_step_s"]
            result["components_s"] = timed["components_s"]
    result.setdefault("components_s", {})["collapse_regularizer"] = time_collapse_regularizer(
        bench, repeats=max(repeats, calls))
    result["curvature_s"] = time_curvature(bench, repeats=max(repeats, calls))
    result["hypergrad_compile_s"] = time_hypergrad_compile(bench, hypergrad_terms)
    result["pipeline"] = time_pipeline(bench, num_batches=pipeline_batches)
    result["loop_step_s"] = {name: time_loop(bench, name, steps=loop_steps)
                             for name in loop_methods if name in methods_to_time}
    steps = result["step_s"]
    pipeline = result["pipeline"]
    pipeline["train_samples_per_s"] = {k: config.batch_size / t for k, t in steps.items()}
    # The pipeline must keep up with every method: compare it with the fastest step.
    fastest = config.batch_size / min(steps.values())
    result["memory"] = memory_stats()

    curv = result["curvature_s"]
    compile_s = result["hypergrad_compile_s"]
    k_lo, k_hi = str(min(hypergrad_terms)), str(max(hypergrad_terms))
    ratios = {
        "hvp_over_grad": curv["hvp"] / curv["grad"],
        "hvp_linearized_over_grad": curv["hvp_linearized"] / curv["grad"],
        "neumann_term_over_hvp": curv["neumann_term"] / curv["hvp"],
        # Compile time flat in K: the Neumann series is a lax.scan (DESIGN §3.4).
        "hypergrad_compile_kmax_over_kmin": compile_s[k_hi] / compile_s[k_lo],
        # The loader alone (grain), and with the trainer's device put, which is on the loop's
        # critical path too.
        "pipeline_over_step": pipeline["host_samples_per_s"] / fastest,
        "pipeline_with_put_over_step": pipeline["with_put_samples_per_s"] / fastest,
    }
    if "erm" in steps:
        for name, t in steps.items():
            if name != "erm":
                ratios[f"{name}_over_erm_step"] = t / steps["erm"]
    for name in ("modalimmune", "modalimmune-all"):
        if "modalimmune-none" in steps and name in steps:
            ratios[f"{name}_over_none_step"] = steps[name] / steps["modalimmune-none"]
        if name in result["first_call_s"]:
            ratios[f"{name}_first_call_s"] = result["first_call_s"][name]
            # What a run pays in all: the step's compile and, on its first due step, the
            # meta-update's.
            ratios[f"{name}_compile_total_s"] = (result["first_call_s"][name]
                                                 + result["periodic_first_call_s"].get(name, 0.0))
    for name, loop_s in result["loop_step_s"].items():
        ratios[f"loop_over_step_throughput/{name}"] = steps[name] / loop_s
    result["ratios"] = ratios
    result["targets"] = {
        name: {"value": ratios[name], "target": bound, "met": bool(
            ratios[name] <= bound if how == "le" else ratios[name] >= bound)}
        for name, (bound, how) in TARGETS.items() if name in ratios}
    return result


def benchmark_command(config, out: str, *, fast: bool, repeats: int = 0,
                      data_dir: str = "") -> str:
    """`experiments.benchmark`: runs `run_benchmark`, writes `out`, returns the JSON text."""
    out = config_lib.absolute_path(out)
    if os.path.isdir(out):
        raise ConfigError(f"--out={out}: is a directory; give the JSON file to write")
    repeats = repeats or (3 if fast else 7)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_benchmark(config, data_dir=config_lib.absolute_path(data_dir) or tmp,
                               repeats=repeats, calls=5 if fast else 20,
                               pipeline_batches=200 if fast else 1000,
                               loop_steps=200 if fast else 500)
    result["fast"] = fast
    files.write_json(out, result)
    return files.to_json(result) + f"\nwrote {os.path.abspath(out)}"
