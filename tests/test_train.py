"""The trainer end to end: a tiny run, kill-and-resume, evaluate, and one-line errors for bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments.configs import default
from modalimmune_jax import methods
from modalimmune_jax.training import config as config_lib
from modalimmune_jax.training import step, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "configs", "default.py")


def _run(args, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _steps(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow  # CI: test_reliability kills runs at three points and resumes them
def test_kill_and_resume_continues_the_step(tmp_path):
    workdir = str(tmp_path / "run")
    args = ["experiments.train", f"--config={CONFIG}:digits,tiny", f"--workdir={workdir}",
            "--config.num_steps=60", "--config.checkpoint_every=10", "--config.log_every=10",
            "--config.eval_every=30"]
    proc = _run(args)
    ckpt = os.path.join(workdir, "checkpoints", "20")
    deadline = time.time() + 300
    while not os.path.isdir(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(workdir, "eval.json"))
    done_before = max(_steps(workdir))
    assert 20 <= done_before < 60

    proc = _run(args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from step" in err
    steps = _steps(workdir)
    # Logged steps are strictly increasing: nothing restarted from 0, nothing logged twice.
    assert steps == sorted(set(steps)) and steps[-1] == 60 and steps[0] == 10
    with open(os.path.join(workdir, "eval.json")) as f:
        results = json.load(f)
    assert results["full"]["acc"] > 0.2  # 10 classes: twice chance after 60 tiny steps

    # evaluate re-runs the final evaluation on the same checkpoint and gets the same numbers.
    proc = _run(["experiments.evaluate", f"--workdir={workdir}"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    with open(os.path.join(workdir, "eval.json")) as f:
        assert json.load(f)["full"] == results["full"]
    # On valid it reproduces the trainer's own best-on-valid score (same params, same split).
    proc = _run(["experiments.evaluate", f"--workdir={workdir}", "--split=valid"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    with open(os.path.join(workdir, "eval_valid.json")) as f:
        assert json.load(f)["full"]["acc"] == pytest.approx(results["valid_best"], abs=1e-6)


@pytest.mark.parametrize("flag,needle", [
    ("--config.method=bogus", "config.method"),
    ("--config.num_steps=0", "config.num_steps"),
    ("--config.dataset.name=mnist", "config.dataset.name"),
])
def test_bad_flag_is_a_one_line_error(tmp_path, flag, needle):
    proc = _run(["experiments.train", f"--config={CONFIG}:digits,tiny",
                 f"--workdir={tmp_path / 'w'}", flag])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in err
    assert needle in err.strip().splitlines()[-1]


@pytest.mark.parametrize("field,value", [
    ("batch_size", -1), ("eval_every", 0), ("model.encoder", "lstm"), ("model.fusion", "sum"),
    ("optimizer.lr", 0.0), ("moddrop.p", 1.0), ("loss.regression", "huber"),
])
def test_validate_config_names_the_field(field, value):
    config = default.get_config("digits")
    node, leaf = config, field.split(".")
    for part in leaf[:-1]:
        node = node[part]
    with config.unlocked():
        node[leaf[-1]] = value
    with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
        config_lib.validate_config(config, methods=methods.METHODS)


def test_incompatible_workdir_is_refused(tmp_path):
    config = default.get_config("digits")
    path = str(tmp_path / "config.json")
    with open(path, "w") as f:
        json.dump(config.to_dict(), f)
    config_lib.check_workdir_compatible(path, config)  # identical: fine
    with config.unlocked():
        config.num_steps = 10  # resumable field: fine
    config_lib.check_workdir_compatible(path, config)
    with config.unlocked():
        config.model.d = 7
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.d"):
        config_lib.check_workdir_compatible(path, config)


def test_a_field_added_later_resumes_at_the_value_of_the_runs_before_it(tmp_path):
    config = default.get_config("digits")
    saved = config.to_dict()
    del saved["mi"]["distill_kl"]  # a run written before the field existed
    path = str(tmp_path / "config.json")
    with open(path, "w") as f:
        json.dump(saved, f)
    config_lib.check_workdir_compatible(path, config)  # "collapsed_clean": those runs' behaviour
    with config.unlocked():
        config.mi.distill_kl = "clean_collapsed"
    with pytest.raises(config_lib.ConfigError,
                       match=r"config\.mi\.distill_kl was 'collapsed_clean'"):
        config_lib.check_workdir_compatible(path, config)


def test_optimizer_schedule_warms_up_then_decays():
    config = default.get_config("digits")
    _, schedule = step.make_optimizer(config)
    lr = config.optimizer.lr
    assert float(schedule(0)) == 0.0
    assert abs(float(schedule(config.optimizer.warmup_steps)) - lr) < 1e-9
    assert abs(float(schedule(config.num_steps)) - lr * config.optimizer.end_lr_factor) < 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("preset,key,bound", [("digits", "acc", 0.95)])
def test_full_run_reaches_target(tmp_path, preset, key, bound):
    config = default.get_config(preset)
    results = trainer.train_and_evaluate(config, str(tmp_path / preset))
    assert results["full"][key] >= bound


@pytest.mark.slow
def test_synthetic_regression_beats_the_mean(tmp_path):
    config = default.get_config("synthetic_regression")
    results = trainer.train_and_evaluate(config, str(tmp_path / "reg"))
    assert results["full"]["MAE"] < results["full"]["mean_baseline_MAE"]


@pytest.mark.parametrize("family,new,best,expected", [
    ("classification", 0.9815, 0.9815, True),   # a tie: the later checkpoint
    ("classification", 0.9778, 0.9815, False),
    ("classification", 0.9852, 0.9815, True),
    ("regression", 0.30, 0.30, True),           # MAE, lower is better: a tie, later
    ("regression", 0.31, 0.30, False),
    ("regression", 0.29, 0.30, True),
    ("classification", 0.5, None, True),
])
def test_best_on_valid_keeps_the_later_checkpoint_on_a_tie(family, new, best, expected):
    from types import SimpleNamespace

    from modalimmune_jax.training.evaluator import Evaluator
    holder = SimpleNamespace(info=SimpleNamespace(metric_family=family))
    assert Evaluator.is_better(holder, new, best) is expected
