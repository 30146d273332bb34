"""Reliability (README "Reliability"): exact resume after SIGKILL, determinism, divergence guards.

The resume tests run the real CLI as a subprocess and kill it with SIGKILL (no handler can run) at
several points, then compare the resumed run with an uninterrupted one bit for bit: every array
of the final checkpoint, the bytes of eval.json, and every logged measurement but the wall time.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from data_pipelines import pipeline
from experiments.configs import default
from modalimmune_jax.methods.modalimmune import make_modalimmune
from modalimmune_jax.model import create_model, make_apply_fns
from modalimmune_jax.training import cli, files, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "configs", "default.py")
# 60 steps, a checkpoint every 20: kill points before, between and after the checkpoints.
DIGITS_ARGS = (f"--config={CONFIG}:digits,tiny", "--config.num_steps=60",
               "--config.checkpoint_every=20", "--config.log_every=2", "--config.eval_every=20")
TIMEOUT_S = 600


# ----------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent XLA cache shared by this module's subprocesses: the first run compiles, the
    later ones load the same executables (a fresh compile of the final evaluation is ~25 s)."""
    return str(tmp_path_factory.mktemp("xla_cache"))


def _launch(workdir, args, cache=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("MODALIMMUNE_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "experiments.train", *args,
                             f"--workdir={workdir}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(proc):
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err[-3000:]
    return err


def _kill_when(proc, ready, what):
    """SIGKILLs `proc` as soon as ``ready()`` holds; fails if the run ends first."""
    deadline = time.time() + TIMEOUT_S
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.communicate()[1][-2000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    return err


def _checkpoints(workdir):
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def _logged(workdir):
    """metrics.jsonl without the wall-clock field (the only one allowed to differ)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.endswith("\n")]
    for r in records:
        r.pop("elapsed_s", None)
    return records


def _last_train_step(workdir):
    try:
        return max([r["step"] for r in _logged(workdir) if "loss" in r], default=0)
    except (OSError, json.JSONDecodeError):  # not written yet, or a line half-flushed
        return 0


def _state(workdir, step):
    """``{path: np.ndarray}`` of the `state` item of checkpoint `step` (train state + best)."""
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_bit_identical(state_a, state_b):
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        a, b = state_a[k], state_b[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        # Bytes, not values: -0.0 vs 0.0 or a different NaN payload would count as a change.
        assert a.tobytes() == b.tobytes(), f"{k} differs"


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _run_uninterrupted(workdir, args, cache):
    _finish(_launch(workdir, args, cache))
    return workdir


@pytest.fixture(scope="module")
def digits_reference(tmp_path_factory, compile_cache):
    """One uninterrupted digits,tiny erm run, shared by the resume and determinism tests."""
    return _run_uninterrupted(str(tmp_path_factory.mktemp("reference") / "run"), DIGITS_ARGS,
                              compile_cache)


# ------------------------------------------------------------------------ exact resume (item 1)


def test_sigkill_at_three_points_then_resume_is_bit_identical(digits_reference, compile_cache,
                                                              tmp_path):
    workdir = str(tmp_path / "killed")
    ckpt = lambda s: os.path.join(workdir, "checkpoints", str(s))

    # Kill 1: right after the first checkpoint (step 20) is committed.
    _kill_when(_launch(workdir, DIGITS_ARGS, compile_cache), lambda: os.path.isdir(ckpt(20)),
               "checkpoint 20")
    assert _checkpoints(workdir)[0] == 20

    # Kill 2: mid-way between checkpoints 40 and 60, with steps past 40 done and lost.
    proc = _launch(workdir, DIGITS_ARGS, compile_cache)
    err = _kill_when(proc, lambda: _last_train_step(workdir) >= 46, "step 46")
    assert "resumed from step 20" in err
    assert _checkpoints(workdir)[-1] == 40 and _last_train_step(workdir) > 40

    # Kill 3: after the last checkpoint, during the final evaluation (before eval.json).
    proc = _launch(workdir, DIGITS_ARGS, compile_cache)
    err = _kill_when(proc, lambda: os.path.isdir(ckpt(60)), "checkpoint 60")
    assert "resumed from step 40" in err
    assert not os.path.exists(os.path.join(workdir, "eval.json"))

    err = _finish(_launch(workdir, DIGITS_ARGS, compile_cache))
    assert "resumed from step 60" in err

    assert _read(os.path.join(workdir, "eval.json")) == _read(
        os.path.join(digits_reference, "eval.json"))
    # (Checkpoint 20 may linger: kill 3 can land before orbax deletes it for max_to_keep.)
    assert _checkpoints(workdir)[-1] == _checkpoints(digits_reference)[-1] == 60
    _assert_bit_identical(_state(workdir, 60), _state(digits_reference, 60))
    # Every loss, gradient norm and validation metric on the way, too (no step logged twice).
    assert _logged(workdir) == _logged(digits_reference)


def _tear(workdir, step):
    """A torn write of checkpoint `step`: every array data file cut to 100 bytes."""
    files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"),
                      recursive=True)
    assert files
    for f in files:
        os.truncate(f, 100)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(digits_reference, compile_cache,
                                                                  tmp_path):
    workdir = str(tmp_path / "torn")
    shutil.copytree(digits_reference, workdir)
    os.remove(os.path.join(workdir, "eval.json"))
    _tear(workdir, 60)
    err = _finish(_launch(workdir, DIGITS_ARGS, compile_cache))
    assert "checkpoint at step 60 is unreadable" in err and "resumed from step 40" in err
    # Steps 41-60 were redone from checkpoint 40 and land exactly where they did the first time.
    assert _read(os.path.join(workdir, "eval.json")) == _read(
        os.path.join(digits_reference, "eval.json"))
    _assert_bit_identical(_state(workdir, 60), _state(digits_reference, 60))
    assert _logged(workdir) == _logged(digits_reference)


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(digits_reference, tmp_path, capsys):
    workdir = str(tmp_path / "all_torn")
    shutil.copytree(digits_reference, workdir)
    os.remove(os.path.join(workdir, "eval.json"))
    for step in _checkpoints(workdir):
        _tear(workdir, step)
    metrics = _read(os.path.join(workdir, "metrics.jsonl"))
    config = default.get_config("digits,tiny")
    with config.unlocked():
        config.num_steps, config.checkpoint_every, config.log_every, config.eval_every = (
            60, 20, 2, 20)
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(lambda: trainer.train_and_evaluate(config, workdir))
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: no readable checkpoint among steps [60, 40]"), last
    # Nothing was restarted or truncated: the log and the (torn) checkpoints are still there.
    assert _read(os.path.join(workdir, "metrics.jsonl")) == metrics
    assert _checkpoints(workdir) == [40, 60]


@pytest.mark.slow
def test_modalimmune_sigkill_then_resume_is_bit_identical(tmp_path):
    """ModalImmune's controller, curvature EMA and mask state survive a kill (no meta-update)."""
    args = (f"--config={CONFIG}:digits,tiny", "--config.method=modalimmune",
            "--config.mi.meta=False", "--config.mi.curvature=True", "--config.mi.ig_every=3",
            "--config.mi.curv_every=3",
            "--config.num_steps=20", "--config.checkpoint_every=10", "--config.log_every=1",
            "--config.eval_every=10")
    cache = str(tmp_path / "xla_cache")
    reference = _run_uninterrupted(str(tmp_path / "reference"), args, cache)
    workdir = str(tmp_path / "killed")
    _kill_when(_launch(workdir, args, cache), lambda: _last_train_step(workdir) >= 14, "step 14")
    assert "resumed from step 10" in _finish(_launch(workdir, args, cache))
    assert _read(os.path.join(workdir, "eval.json")) == _read(os.path.join(reference, "eval.json"))
    _assert_bit_identical(_state(workdir, 20), _state(reference, 20))
    assert _logged(workdir) == _logged(reference)


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    """eval.json, config.json and metrics truncation go through files: temp file, then rename."""
    path = tmp_path / "eval.json"
    files.write_json(str(path), {"acc": 0.5})
    old = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        files.write_json(str(path), {"acc": 0.9})
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["eval.json"]  # no temp file left behind


# ------------------------------------------------------------------------- determinism (item 4)


def test_same_seed_twice_gives_identical_results(digits_reference, compile_cache, tmp_path):
    again = _run_uninterrupted(str(tmp_path / "again"), DIGITS_ARGS, compile_cache)
    assert _read(os.path.join(again, "eval.json")) == _read(
        os.path.join(digits_reference, "eval.json"))
    _assert_bit_identical(_state(again, 60), _state(digits_reference, 60))


# --------------------------------------------------------------------- divergence guards (item 2)


def _inject_nan(*, record, modality):
    """The trainer's `map_batch` hook: batch `record` (0-based, step ``record + 1``) gets a NaN."""

    def map_batch(step, batch):
        if step == record:
            x = np.array(batch[modality], np.float32)
            x[0, 0] = np.nan
            batch = {**batch, modality: x}
        return batch

    return trainer.Hooks(map_batch=map_batch)


def _train_records(workdir):
    return {r["step"]: r for r in _logged(workdir) if "loss" in r}


def _nan_batch_run(tmp_path, *, record, **fields):
    hooks = _inject_nan(record=record, modality="left")
    config = default.get_config("digits,tiny")
    with config.unlocked():
        config.num_steps, config.log_every, config.eval_every = 8, 1, 8
        config.checkpoint_every = 8
        # The guard is what is under test, not the 25 s final evaluation.
        config.eval.protocol = "full"
        for name, value in fields.items():  # mi__meta=False sets config.mi.meta
            *parents, leaf = name.split("__")
            node = config
            for p in parents:
                node = node[p]
            node[leaf] = value
    workdir = str(tmp_path / "nan")
    results = trainer.train_and_evaluate(config, workdir, hooks=hooks)
    return _train_records(workdir), results, workdir


def test_nan_batch_skips_the_update_and_counts_it(tmp_path):
    records, results, workdir = _nan_batch_run(tmp_path, record=3)
    assert sorted(records) == list(range(1, 9))
    bad = records[4]
    # The loss was NaN: strict JSON records an undefined figure as null.
    assert bad["loss"] is None and bad["skipped"] == 1
    assert bad["consecutive_skips"] == 1 and bad["total_skips"] == 1
    for step in (1, 2, 3, 5, 6, 7, 8):
        assert records[step]["skipped"] == 0 and records[step]["consecutive_skips"] == 0
        assert records[step]["total_skips"] == (0 if step < 4 else 1)
    # param_norm is taken before each step's update: step 4 left the params exactly as they were,
    # while every other step moved them.
    assert records[5]["param_norm"] == records[4]["param_norm"]
    assert records[4]["param_norm"] != records[3]["param_norm"]
    assert records[6]["param_norm"] != records[5]["param_norm"]
    state = _state(workdir, 8)
    assert all(np.all(np.isfinite(v)) for v in state.values() if v.dtype.kind == "f")
    assert np.isfinite(results["full"]["acc"])


@pytest.mark.slow
def test_nan_batch_leaves_modalimmune_state_clean(tmp_path):
    """A NaN batch on an IG and curvature refresh step: without reverting the method's state on a
    skipped update, the NaN gain/curvature EMAs would skip every later step."""
    records, _, _ = _nan_batch_run(tmp_path, record=4, method="modalimmune",
                                   mi__meta=False, mi__curvature=True, mi__ig_every=2,
                                   mi__curv_every=2)
    assert records[5]["skipped"] == 1 and records[8]["total_skips"] == 1
    for step in (6, 7, 8):
        assert records[step]["skipped"] == 0
        assert all(np.isfinite(v) for k, v in records[step].items() if k.startswith("gain_ema/"))


def test_absurd_lr_aborts_with_one_line_and_a_finite_checkpoint(tmp_path):
    """lr = 1e30 with the collapse near full strength: every update after the first is
    non-finite; the run stops after max_consecutive_nonfinite of them and keeps a checkpoint."""
    workdir = str(tmp_path / "diverged")
    args = (f"--config={CONFIG}:digits,tiny", "--config.method=modalimmune",
            "--config.mi.strength=0.999", "--config.optimizer.lr=1e30",
            "--config.optimizer.warmup_steps=0", "--config.optimizer.max_consecutive_nonfinite=3",
            "--config.log_every=1", "--config.checkpoint_every=2",
            # Components that do not bear on the guard, off for a faster compile.
            "--config.mi.meta=False", "--config.mi.controller=False",
            "--config.mi.curvature=False")
    proc = _launch(workdir, args)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: 3 consecutive non-finite updates at step 4"), last
    assert workdir in last
    records = _train_records(workdir)
    assert [records[s]["skipped"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert not os.path.exists(os.path.join(workdir, "eval.json"))
    # The abort saved step 4: restorable, finite, and its best-on-valid params are the init's
    # (no validation ran), so evaluate has something sane to load.
    assert _checkpoints(workdir)[-1] == 4
    state = _state(workdir, 4)
    assert all(np.all(np.isfinite(v)) for v in state.values() if v.dtype.kind == "f")
    assert int(state["['train']['step']"]) == 4


# ----------------------------------------------------------- skipped meta-update (item 2, cert)


def _namespace(d):
    return types.SimpleNamespace(**{k: _namespace(v) if isinstance(v, dict) else v
                                    for k, v in d.items()})


@pytest.fixture(scope="module")
def toy_meta_step():
    """``damping -> (extra, new_extra, measurements)``: one ModalImmune `grads` at a meta-update
    step on a 2-modality toy model, compiled once for every damping.

    `make_modalimmune` reads ``config.mi.damping`` when the meta-update is traced, so a traced
    damping set on a plain-namespace config lets the invalid and the valid case share one
    compile (~25 s of CPU each otherwise). The components that do not bear on the certificate
    are off (the SVD collapse and the spectral regularizer double the compile of the HVPs
    through them): the target is zero-filled.
    """
    config = default.get_config("synthetic,tiny")
    with config.unlocked():
        config.model.d, config.model.d_h = 4, 8
        config.mi.update({"controller": False, "curvature": False, "collapse": False,
                          "regularizer": False, "meta": True, "meta_every": 1, "p_clean": 0.0,
                          "neumann_terms": 2, "num_lanczos_iters": 6, "floor_curvature": False,
                          # Zero-fill: the strength is not in the objective, only the weights.
                          "meta_params": "strength,reg_weight,rec_weight"})
    info = pipeline.DatasetInfo(
        name="toy", modalities=("a", "b"), feature_shapes={"a": (3,), "b": (2,)},
        task="classification", num_classes=3, metric_family="classification",
        split_sizes={"train": 16, "valid": 16, "test": 16})
    model = create_model(info, config.model, rngs=nnx.Rngs(params=jax.random.key(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    config = _namespace(config.to_dict())
    method = make_modalimmune(make_apply_fns(graphdef),
                              info=info, config=config)

    def batch(key):
        ka, kb, ky = jax.random.split(key, 3)
        return {"a": jax.random.normal(ka, (16, 3)), "b": jax.random.normal(kb, (16, 2)),
                "lengths": jnp.ones((16, 2), jnp.int32), "mask": jnp.ones((16, 2)),
                "label": jax.random.randint(ky, (16,), 0, 3)}

    @jax.jit
    def step_fn(params, extra, batch, rng, meta_batch, damping):
        config.mi.damping = damping
        pending = method.periodic.compute(params, extra, batch, rng, step=jnp.int32(1),
                                          meta_batch=meta_batch)
        return method.periodic.apply(extra, pending)

    extra = method.init(params)

    def run(damping):
        new_extra, meas = step_fn(params, extra, batch(jax.random.key(1)), jax.random.key(2),
                                  batch(jax.random.key(3)), jnp.float32(damping))
        return extra, new_extra, meas

    return run


def test_meta_update_with_an_invalid_certificate_is_skipped_and_counted(toy_meta_step):
    # No damping on an indefinite Hessian (a net at init): lambda_min(H + 0 I) < 0, so the
    # Neumann series diverges along that direction and the certificate says so.
    extra, new_extra, meas = toy_meta_step(0.0)
    assert float(meas["cert/lambda_min"]) < 0 and float(meas["cert/valid"]) == 0
    assert int(new_extra.meta_skips) == int(extra.meta_skips) + 1 == int(meas["meta_skips"])
    for old_phi, new_phi in zip(extra.phi, new_extra.phi, strict=True):
        assert np.asarray(new_phi).tobytes() == np.asarray(old_phi).tobytes()
    same = jax.tree.map(lambda a, b: np.array_equal(a, b), new_extra.meta_opt, extra.meta_opt)
    assert all(jax.tree.leaves(same))


def test_meta_update_with_a_valid_certificate_moves_phi(toy_meta_step):
    # A damping far above the toy Hessian's |lambda_min| makes H + mu I positive definite.
    extra, new_extra, meas = toy_meta_step(10.0)
    assert float(meas["cert/lambda_min"]) > 0 and float(meas["cert/valid"]) == 1
    assert int(new_extra.meta_skips) == 0 == int(meas["meta_skips"])
    moved = [float(jnp.abs(b - a)) for a, b in zip(extra.phi, new_extra.phi, strict=True)]
    # adam's first step moves every coordinate with a non-zero hypergradient by ~meta_lr.
    assert max(moved) > 1e-3, moved
