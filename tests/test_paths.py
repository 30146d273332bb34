"""User-given paths, end to end: relative, with ``~``, with a space and a non-ASCII character.

Orbax needs absolute paths, and every earlier test passed an absolute temporary folder, so the
README's own relative ``--workdir=runs/...`` crashed at the first checkpoint. Each case here runs
the binaries as a user would, from a working directory of its own: train, then evaluate and
unlearn with the same spelling of the workdir; ``config.json`` must record absolute paths, and a
rerun from another working directory must resume the same run.
"""

import json
import os
import subprocess
import sys

import data_fixtures
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "configs", "default.py")


def _env(home):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HOME=str(home),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MODALIMMUNE_DEBUG", None)
    return env


def _run(args, *, cwd, home):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=_env(home),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# (workdir as typed, dataset path as typed): relative with a space and non-ASCII; with ~.
CASES = {
    "relative_space_non_ascii": ("runs/my run ü", "data/npz ü"),
    "home_tilde": ("~/runs/tilde run", "~/data/npz ü"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_evaluate_unlearn_with_user_paths(tmp_path, case):
    workdir_arg, data_arg = CASES[case]
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    base = home if data_arg.startswith("~") else cwd
    data_folder = os.path.join(base, data_arg.removeprefix("~/"))
    data_fixtures.write_npz_folder(data_folder, data=data_fixtures.npz_data(sizes=(64, 32, 32)))
    args = [f"--config={CONFIG}:npz,tiny", f"--config.dataset.path={data_arg}",
            f"--workdir={workdir_arg}", "--config.num_steps=6", "--config.checkpoint_every=3",
            "--config.eval_every=3", "--config.log_every=3", "--config.batch_size=16",
            "--config.eval.batch_size=32",
            "--config.eval.protocol=full"]  # the paths are under test, not the evaluation
    out = _run(["experiments.train", *args], cwd=cwd, home=home)
    workdir = os.path.join(home if workdir_arg.startswith("~") else cwd,
                           workdir_arg.removeprefix("~/"))
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    assert saved["dataset"]["path"] == os.path.realpath(data_folder) or (
        saved["dataset"]["path"] == os.path.abspath(data_folder))
    assert os.path.isabs(saved["dataset"]["path"])
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    assert os.path.join(workdir, "eval.json") in out.stdout  # the summary names the file

    # The same run from another working directory: it resumes, it does not start over.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    abs_args = [a if not a.startswith(("--workdir", "--config.dataset.path")) else
                a.split("=")[0] + "=" + (workdir if a.startswith("--workdir") else data_folder)
                for a in args]
    again = _run(["experiments.train", *abs_args], cwd=elsewhere, home=home)
    assert "resumed from step 6" in again.stderr

    if case != "relative_space_non_ascii":
        return  # evaluate and unlearn resolve their paths with the same function: one case
    _run(["experiments.evaluate", f"--workdir={workdir_arg}", "--split=valid"], cwd=cwd,
         home=home)
    assert os.path.exists(os.path.join(workdir, "eval_valid.json"))
    out_arg = workdir_arg + " unlearned"
    _run(["experiments.unlearn", f"--workdir={workdir_arg}", "--forget=alpha",
          "--method=finetune", "--steps=2", f"--out={out_arg}"], cwd=cwd, home=home)
    assert os.path.exists(os.path.join(workdir + " unlearned", "unlearn.json"))
