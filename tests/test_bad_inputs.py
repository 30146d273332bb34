"""The bad-input matrix (README "Reliability"): a one-line error naming the culprit, exit code 2.

Every case asserts: exit code != 0, no traceback, the last stderr line starts with ``error:`` and
names the offending flag, file, key or shape, and an existing workdir is left byte for byte as it
was (its config.json, metrics.jsonl and a checkpoint file). Cases that go through absl's flag
parsing, and a few data-file cases end to end, run ``python -m experiments.train`` (or
``experiments.unlearn``) as a subprocess; the others call ``cli.run_cli(train_and_evaluate)``
in-process, the CLI's code path after flag parsing (a subprocess costs ~5 s of imports).
"""

import json
import os
import subprocess
import sys

import data_fixtures
import numpy as np
import optax
import pytest

from experiments.configs import default
from modalimmune_jax.training import cli, step, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "configs", "default.py")
TINY = f"--config={CONFIG}:digits,tiny"


# ------------------------------------------------------------------------------ case builders


def _config(preset="digits,tiny", **fields):
    """`preset`'s config with dotted `fields` (``dataset__path`` for ``dataset.path``) set."""
    config = default.get_config(preset)
    with config.unlocked():
        for name, value in fields.items():
            *parents, leaf = name.split("__")
            node = config
            for p in parents:
                node = node[p]
            node[leaf] = value
    return config


def _npz(tmp, mutate=None, meta=None, *, method="erm", **kw):
    """A DESIGN.md §7 npz folder (tests/data_fixtures.py), `mutate`d; returns its config."""
    data = data_fixtures.npz_data(**kw)
    if mutate is not None:
        mutate(data)
    folder = str(tmp / "npz")
    data_fixtures.write_npz_folder(folder, data=data, meta=meta)
    return _config("npz,tiny", dataset__path=folder, method=method)


def _mult(tmp, mutate=None):
    """A MulT ``mosi_data.pkl`` folder, `mutate`d; returns a cmu_mosi config."""
    data = data_fixtures.mult_data(dataset="mosi")
    if mutate is not None:
        mutate(data)
    folder = str(tmp / "mosi")
    data_fixtures.write_pickle(os.path.join(folder, data_fixtures.MULT_FILES["mosi"]), data)
    return _config("cmu_mosi,tiny", dataset__path=folder)


def _setall(key, fn):
    def mutate(data):
        for split in data:
            data[split][key] = fn(data[split][key])
    return mutate


def _delall(key):
    def mutate(data):
        for split in data:
            del data[split][key]
    return mutate


def _rename(old, new):
    def mutate(data):
        for split in data:
            data[split][new] = data[split].pop(old)
    return mutate


def _setitem(split, key, fn):
    def mutate(data):
        data[split][key] = fn(data[split][key])
    return mutate


def _delitem(split, key):
    def mutate(data):
        del data[split][key]
    return mutate


def _not_a_pickle(tmp):
    folder = tmp / "mosi"
    folder.mkdir()
    (folder / "aligned_50.pkl").write_text("these are not the features you are looking for\n")
    return str(folder)


def _put(index, value):
    def fn(x):
        x = np.array(x, np.float64)
        x[index] = value
        return x
    return fn


# In-process cases: name -> (tmp -> config, substrings of the last stderr line).
IN_PROCESS = {
    "unknown_dataset": (lambda tmp: _config(dataset__name="mnist"), ["config.dataset.name"]),
    "unknown_method": (lambda tmp: _config(method="sgd"), ["config.method", "'sgd'"]),
    "zero_num_steps": (lambda tmp: _config(num_steps=0), ["config.num_steps"]),
    "negative_num_steps": (lambda tmp: _config(num_steps=-5), ["config.num_steps", "-5"]),
    "zero_batch_size": (lambda tmp: _config(batch_size=0), ["config.batch_size"]),
    "negative_batch_size": (lambda tmp: _config(batch_size=-8), ["config.batch_size", "-8"]),
    "negative_lr": (lambda tmp: _config(optimizer__lr=-1e-3), ["config.optimizer.lr"]),
    "strength_of_one": (lambda tmp: _config(method="modalimmune", mi__strength=1.0),
                        ["config.mi.strength"]),
    "negative_damping": (lambda tmp: _config(mi__damping=-1.0), ["config.mi.damping"]),
    "zero_keep_checkpoints": (lambda tmp: _config(keep_checkpoints=0),
                              ["config.keep_checkpoints"]),
    "batch_larger_than_dataset": (lambda tmp: _config(batch_size=4096),
                                  ["config.batch_size=4096", "training split"]),
    "npz_path_missing": (lambda tmp: _config("npz,tiny", dataset__path=str(tmp / "nowhere")),
                         ["config.dataset.path", "nowhere"]),
    "npz_path_empty": (lambda tmp: _config("npz,tiny"), ["config.dataset.path"]),
    "mosi_folder_without_pickle": (
        lambda tmp: _config("cmu_mosi,tiny", dataset__path=str(tmp)), ["file not found"]),
    "npz_n_differs": (lambda tmp: _npz(tmp, _setitem("train", "alpha", lambda x: x[:5])),
                      ["train.npz", "'alpha'", "5 examples"]),
    "npz_inf_feature": (
        lambda tmp: _npz(tmp, _setitem("test", "alpha", _put((2, 3), -np.inf))),
        ["test.npz", "'alpha'", "1 inf", "(2, 3)"]),
    "npz_label_out_of_range": (
        lambda tmp: _npz(tmp, _setitem("valid", "labels", lambda y: y + 5)),
        ["valid.npz", "'labels'", ">= C = 3"]),
    "npz_float_labels_for_classification": (
        lambda tmp: _npz(tmp, _setitem("train", "labels", lambda y: y + 0.5),
                         meta={"task": "classification"}),
        ["train.npz", "'labels'", "integers"]),
    "npz_no_labels": (lambda tmp: _npz(tmp, _delitem("valid", "labels")),
                      ["valid.npz", "'labels'", "missing"]),
    "npz_empty_split": (lambda tmp: _npz(tmp, sizes=(6, 4, 0)), ["test.npz", "empty split"]),
    "npz_feature_dims_differ": (
        lambda tmp: _npz(tmp, _setitem("valid", "alpha", lambda x: np.zeros((4, 7), np.float32))),
        ["valid.npz", "'alpha'", "(7,)"]),
    "npz_wrong_rank": (lambda tmp: _npz(tmp, _setitem("train", "zeta", lambda x: x[..., None])),
                       ["train.npz", "'zeta'", "(6, 5, 3, 1)"]),
    "npz_unknown_modality": (lambda tmp: _npz(tmp, meta={"modalities": ["zeta", "beta"]}),
                             ["train.npz", "'beta'", "missing"]),
    "pickle_missing_key": (lambda tmp: _mult(tmp, _delitem("valid", "audio")),
                           ["mosi_data.pkl", "'valid'", "'audio'"]),
    "pickle_wrong_rank": (lambda tmp: _mult(tmp, _setitem("train", "vision", lambda x: x[:, 0])),
                          ["mosi_data.pkl", "'vision'", "rank 3"]),
    # Issue 11's cases.
    "npz_zero_features": (
        lambda tmp: _npz(tmp, _setall("alpha", lambda x: x[:, :0])),
        ["train.npz", "'alpha'", "0 features", "(6, 0)"]),
    "npz_single_class": (lambda tmp: _npz(tmp, _setall("labels", lambda y: 0 * y)),
                         ["train.npz", "'labels'", "one class"]),
    "negative_seed": (lambda tmp: _config(seed=-1), ["config.seed", "-1"]),
    # Our own: inputs a user could plausibly give.
    "seed_too_large": (lambda tmp: _config(seed=2**32), ["config.seed", "4294967296"]),
    "nan_lr": (lambda tmp: _config(optimizer__lr=float("nan")), ["config.optimizer.lr", "nan"]),
    "mask_prob_above_one": (lambda tmp: _config(removal__mask_prob=1.5),
                            ["config.removal.mask_prob", "1.5"]),
    "unknown_use_modality": (lambda tmp: _config(use_modalities="left,sonar"),
                             ["config.use_modalities", "'sonar'"]),
    "unknown_eval_protocol": (lambda tmp: _config(eval__protocol="fast"),
                              ["config.eval.protocol", "'fast'"]),
    "negative_ogm_alpha": (lambda tmp: _config(method="ogm_ge", ogm_ge__alpha=-1.0),
                           ["config.ogm_ge.alpha"]),
    "meta_params_typo": (lambda tmp: _config(method="modalimmune", mi__meta_params="strenght"),
                         ["config.mi.meta_params", "'strenght'"]),
    "robust_method_on_one_modality": (
        lambda tmp: _npz(tmp, _delall("zeta"), method="moddrop"),
        ["config.method='moddrop'", "2 modalities", "alpha"]),
    "npz_reserved_modality_name": (
        lambda tmp: _npz(tmp, _rename("alpha", "mask")), ["'mask'", "reserved"]),
    "npz_negative_label": (lambda tmp: _npz(tmp, _setitem("test", "labels", lambda y: y - 1)),
                           ["test.npz", "'labels'", "negative"]),
    "npz_nan_regression_label": (
        lambda tmp: _npz(tmp, _setitem("train", "labels", _put(3, np.nan)),
                         meta={"task": "regression"}), ["train.npz", "'labels'", "NaN"]),
}

def _train(*args, env=None, config=None):
    """A subprocess case: (module, argv after it, extra env, the workdir's saved config)."""
    return "experiments.train", list(args), env or {}, config


def _binary(module, *args, workdir=True):
    """A subprocess case for any binary; `workdir`: append the test's --workdir."""
    return module, list(args), {}, None if workdir else "no-workdir"


def _unlearn(tmp, *args):
    return ("experiments.unlearn", ["--method=finetune", f"--out={tmp / 'out'}", *args], {},
            None)


def _npz_cli(tmp):
    config = _npz(tmp, _setitem("valid", "zeta", _put((1, 2, 0), np.nan)))
    # The workdir holds this very config, so the data check (not the workdir check) must fire.
    return _train(f"--config={CONFIG}:npz,tiny", f"--config.dataset.path={config.dataset.path}",
                  config=config)


def _pickle_cli(tmp):
    folder = _not_a_pickle(tmp)
    return _train(f"--config={CONFIG}:cmu_mosi,tiny", f"--config.dataset.path={folder}",
                  config=_config("cmu_mosi,tiny", dataset__path=folder))


# Subprocess cases: name -> (tmp -> _train(...) or _unlearn(...), needles). The test adds
# --workdir, a workdir holding the digits,tiny config unless the case gives its own.
SUBPROCESS = {
    "config_type": (lambda tmp: _train(TINY, "--config.num_steps=abc"),
                    ["--config.num_steps=abc"]),
    "unknown_preset": (lambda tmp: _train(f"--config={CONFIG}:mnist"),
                       ["--config=", "preset 'mnist'"]),
    "unknown_modifier": (lambda tmp: _train(f"--config={CONFIG}:digits,huge"),
                         ["--config=", "modifier 'huge'"]),
    "unknown_config_field": (lambda tmp: _train(TINY, "--config.optimizer.lrr=0.1"),
                             ["--config.optimizer.lrr", "Did you mean"]),
    "missing_config_file": (lambda tmp: _train(f"--config={tmp / 'nope.py'}"), ["nope.py"]),
    "unknown_flag": (lambda tmp: _train(TINY, "--num_steps=3"), ["num_steps"]),
    "eval_batch_not_divisible": (
        lambda tmp: _train(TINY, "--config.eval.batch_size=3",
                           env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}),
        ["config.eval.batch_size=3", "device count (2)"]),
    "npz_nan_feature_cli": (_npz_cli, ["valid.npz", "'zeta'", "1 NaN", "(1, 2, 0)"]),
    "not_a_pickle_cli": (_pickle_cli, ["aligned_50.pkl", "not a readable pickle"]),
    "unlearn_unknown_modality": (lambda tmp: _unlearn(tmp, "--forget=sonar"),
                                 ["--forget='sonar'", "left"]),
    "unlearn_hparams_typo": (lambda tmp: _unlearn(tmp, "--forget=left", "--hparams.lrr=1"),
                             ["--hparams.lrr", "Did you mean"]),
    # Issue 11's cases.
    "evaluate_split_typo": (lambda tmp: _binary("experiments.evaluate", "--split=tset"),
                            ["--split=tset", "test|valid"]),
    "reproduce_suite_typo": (
        lambda tmp: _binary("experiments.reproduce", "--suite=digts", f"--out={tmp / 'o'}"),
        ["--suite=digts", "digits"]),
    "stray_positional_argument": (lambda tmp: _train(f"--config={CONFIG}:digits,", "tiny"),
                                  ["unexpected argument", "'tiny'"]),
    # Our own.
    "evaluate_workdir_without_config": (
        lambda tmp: _binary("experiments.evaluate", f"--workdir={tmp / 'empty'}", workdir=False),
        ["--workdir=", "empty", "no config.json"]),
    "reproduce_zero_seeds": (
        lambda tmp: _binary("experiments.reproduce", "--suite=digits", "--seeds=0",
                            f"--out={tmp / 'o'}"), ["--seeds", "0"]),
    "unlearn_negative_steps": (lambda tmp: _unlearn(tmp, "--forget=left", "--steps=-1"),
                               ["--steps=-1"]),
    "build_dataset_typo": (
        lambda tmp: _binary("data_pipelines.build", "--dataset=mnsit",
                            f"--data_dir={tmp / 'd'}"), ["--dataset=mnsit", "digits"]),
    "benchmark_out_is_a_folder": (
        lambda tmp: _binary("experiments.benchmark", f"--out={tmp}", "--fast"),
        ["--out=", "is a directory"]),
}


# ---------------------------------------------------------------------------- workdir damage


def _populate(workdir, config):
    """An existing run's workdir: its config.json, metrics and a checkpoint file."""
    os.makedirs(os.path.join(workdir, "checkpoints", "20"), exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write('{"loss": 1.5, "step": 10}\n{"loss": 1.25, "step": 20}\n')
    with open(os.path.join(workdir, "checkpoints", "20", "state"), "wb") as f:
        f.write(b"\x00weights\x01")


def _snapshot(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _assert_untouched(before, root):
    after = _snapshot(root)
    for path, content in before.items():
        assert after.get(path) == content, f"{path} was changed or removed"


def _assert_one_line_error(code, err, needles):
    assert code not in (0, None), err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for needle in needles:
        assert needle in last, (needle, last)


# ------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("name", sorted(IN_PROCESS))
def test_bad_input_in_process(name, tmp_path, capsys):
    make_config, needles = IN_PROCESS[name]
    config = make_config(tmp_path)
    workdir = str(tmp_path / "work")
    _populate(workdir, config)
    before = _snapshot(workdir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(lambda: trainer.train_and_evaluate(config, workdir))
    _assert_one_line_error(exit_info.value.code, capsys.readouterr().err, needles)
    _assert_untouched(before, workdir)


@pytest.mark.parametrize("name", sorted(SUBPROCESS))
def test_bad_input_cli(name, tmp_path):
    make_args, needles = SUBPROCESS[name]
    module, args, env_extra, saved = make_args(tmp_path)
    workdir = str(tmp_path / "work")
    _populate(workdir, default.get_config("digits,tiny") if saved in (None, "no-workdir")
              else saved)
    before = _snapshot(workdir)
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_extra)
    env.pop("MODALIMMUNE_DEBUG", None)
    takes_workdir = saved != "no-workdir" and module in ("experiments.train",
                                                         "experiments.evaluate",
                                                         "experiments.unlearn")
    proc = subprocess.run([sys.executable, "-m", module, *args,
                           *([f"--workdir={workdir}"] if takes_workdir else [])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    _assert_one_line_error(proc.returncode, proc.stderr, needles)
    _assert_untouched(before, workdir)


def test_incompatible_workdir_is_refused_untouched(tmp_path, capsys):
    workdir = str(tmp_path / "work")
    _populate(workdir, _config(model__d=8))
    before = _snapshot(workdir)
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(lambda: trainer.train_and_evaluate(_config(), workdir))
    _assert_one_line_error(exit_info.value.code, capsys.readouterr().err,
                           ["config.model.d was 8, now 16", "config.json"])
    _assert_untouched(before, workdir)


def test_unreadable_config_json_is_refused_untouched(tmp_path, capsys):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"seed": 0, "method": "er')  # torn by a crash
    before = _snapshot(str(workdir))
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(lambda: trainer.train_and_evaluate(_config(), str(workdir)))
    _assert_one_line_error(exit_info.value.code, capsys.readouterr().err,
                           ["config.json", "cannot read the saved config"])
    _assert_untouched(before, str(workdir))


def test_workdir_that_is_a_file_is_refused_untouched(tmp_path, capsys):
    path = tmp_path / "results.txt"
    path.write_text("a file the user cares about\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(lambda: trainer.train_and_evaluate(_config(), str(path)))
    _assert_one_line_error(exit_info.value.code, capsys.readouterr().err,
                           [f"--workdir={path}", "not a directory"])
    assert path.read_text() == "a file the user cares about\n"


@pytest.mark.parametrize("num_steps,warmup", [(1, 5), (5, 5), (3, 100), (50, 10)])
def test_make_optimizer_clamps_the_warmup(num_steps, warmup):
    """A run no longer than its warmup used to raise in optax (cosine decay_steps=0)."""
    config = _config(num_steps=num_steps, optimizer__warmup_steps=warmup)
    tx, schedule = step.make_optimizer(config)
    lr, end = config.optimizer.lr, config.optimizer.lr * config.optimizer.end_lr_factor
    w = min(warmup, num_steps - 1)  # warms up for all but the last step
    # Reference: linear 0 -> lr over w steps, then cosine lr -> end over num_steps - w steps.
    for t in range(num_steps + 1):
        if t < w:
            want = lr * t / w
        else:
            want = end + (lr - end) * 0.5 * (1 + np.cos(np.pi * (t - w) / (num_steps - w)))
        np.testing.assert_allclose(float(schedule(t)), want, rtol=1e-5, atol=1e-12)
    params = {"w": np.ones(3, np.float32)}
    updates, _ = tx.update({"w": np.ones(3, np.float32)}, tx.init(params), params)
    assert np.all(np.isfinite(optax.tree.norm(updates)))



# ------------------------------------------------------------------- valid JSON, one modality


def _strict_load(path):
    """json.load that refuses NaN / Infinity (what strict JSON parsers do)."""
    def refuse(token):
        raise ValueError(f"{path}: non-standard JSON token {token}")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def test_one_modality_dataset_trains_and_writes_strict_json(tmp_path):
    """An npz folder with a single view has no missing condition: eval.json says so (no NaN)."""
    config = _npz(tmp_path, _delall("zeta"), sizes=(64, 32, 32))
    workdir = str(tmp_path / "one")
    with config.unlocked():
        config.num_steps, config.checkpoint_every, config.eval_every = 4, 4, 4
        config.batch_size, config.eval.batch_size = 16, 32
    text = trainer.train_command(config, workdir)
    results = _strict_load(os.path.join(workdir, "eval.json"))
    assert results["missing"] == {} and results["missing_mask"] == {}
    assert results["missing_avg"] is None and results["missing_avg_mask"] is None
    assert "no missing-modality condition" in results["missing_note"]
    assert "no missing-modality condition" in text  # the closing summary says it too
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        json.loads(line, parse_constant=lambda token: pytest.fail(f"metrics.jsonl: {token}"))
    _strict_load(os.path.join(workdir, "config.json"))


def test_every_json_writer_is_strict(tmp_path):
    from modalimmune_jax.training import files

    record = {"bound": float("inf"), "valid": np.float32(0.0), "nan": float("nan"),
              "nested": [np.array([1.0, np.nan]), {"x": -np.inf}], "n": np.int32(3)}
    line = json.loads(files.json_line(record), parse_constant=pytest.fail)
    assert line == {"bound": None, "valid": 0.0, "nan": None, "nested": [[1.0, None],
                                                                          {"x": None}], "n": 3}
    files.write_json(str(tmp_path / "x.json"), record)
    assert _strict_load(str(tmp_path / "x.json")) == line
