"""The README's commands, run as a new user runs them: parsed from README.md itself.

- The first command (the front door) is run from a fresh copy of the repository, minus the venv
  and pip set-up, with its relative paths, in a CI-sized form (a step override); it must exit 0,
  write its files, print a table that matches them, and resume when run again.
- The `experiments.train` command of "Train one model" is run the same way; its closing summary
  must match eval.json, and a second run must say that it resumed.
- Every relative link in the README resolves.

Editing the README's commands into something that does not work breaks these tests.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from modalimmune_jax.studies import tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = ("python3 -m venv", ". .venv/bin/activate", "source .venv/bin/activate", "pip install")


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def _main_part(command: str) -> list[str]:
    """A README command line without its venv/pip set-up: the argv of the binary."""
    parts = [p.strip() for p in command.split("&&")]
    kept = [p for p in parts if p and not p.startswith(SETUP)]
    assert len(kept) == 1, f"expected one command after the set-up, got {kept}"
    return shlex.split(kept[0])


def _lines(block):
    return [x for x in block.replace("\\\n", " ").splitlines()
            if x.strip() and not x.lstrip().startswith("#")]


def first_command() -> list[str]:
    return _main_part(_lines(_bash_blocks(_readme())[0])[0])


def train_command() -> list[str]:
    for block in _bash_blocks(_readme()):
        for line in _lines(block):
            if "experiments.train" in line:
                return _main_part(line)
    raise AssertionError("the README has no experiments.train command")


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    """The repository as a fresh clone has it (no venv, no runs, no caches)."""
    dest = tmp_path_factory.mktemp("clone") / "modalimmune_jax"
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.egg-info",
                                    ".pytest_cache", ".ruff_cache", "workdir*")
    shutil.copytree(ROOT, dest, ignore=ignore)
    return str(dest)


def _run(argv, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("MODALIMMUNE_DEBUG", None)
    # `python -m ...` as the README writes it, with this interpreter (the venv's).
    assert argv[:2] == ["python", "-m"], argv
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _flag(argv, name):
    for a in argv:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    raise AssertionError(f"--{name} not in {argv}")


def test_first_command_runs_as_written_and_resumes(repo_copy):
    argv = first_command()
    assert argv[:3] == ["python", "-m", "experiments.reproduce"], argv
    out = _flag(argv, "out")
    assert not os.path.isabs(out), "the front door writes under the clone (a relative --out)"
    # CI size: the same binary, flags and paths, 30 steps of the preset's tiny form.
    small = argv + ["--num_steps=30", "--tiny"]
    first = _run(small, repo_copy)
    folder = os.path.join(repo_copy, out)
    with open(os.path.join(folder, "results.json")) as f:
        results = json.load(f)
    # The printed table is the files' numbers: each method's full accuracy and missing Avg.
    metric = results["_meta"]["table_metrics"][0]
    names = [n for n in results["_meta"]["runs"] if n in results]
    assert {"erm", "moddrop", "modalimmune"} <= set(names)
    for row in tables.compact_rows(results, names=names, metric=metric):
        line = next(x for x in first.stdout.splitlines() if x.startswith(row[0] + " "))
        for cell in row[1:]:
            assert cell in line, (cell, line)
    plot = os.path.join(folder, "plots", "random_missing.png")
    assert os.path.exists(plot) and plot in first.stdout
    # Again: everything is finished, so nothing trains, and the same table is printed.
    again = _run(small, repo_copy)
    assert [x for x in again.stdout.splitlines() if "±" in x] == [
        x for x in first.stdout.splitlines() if "±" in x]


def test_train_command_runs_as_written_and_its_summary_matches_eval_json(repo_copy):
    argv = train_command()
    workdir = _flag(argv, "workdir")
    assert not os.path.isabs(workdir)
    small = argv + ["--config.num_steps=20", "--config.checkpoint_every=10",
                    "--config.eval_every=10", "--config.log_every=10"]
    first = _run(small, repo_copy)
    with open(os.path.join(repo_copy, workdir, "eval.json")) as f:
        results = json.load(f)
    assert os.path.isdir(os.path.join(repo_copy, workdir, "checkpoints", "20"))
    summary = first.stdout
    assert f"{results['full']['acc']:.4f}" in summary
    for suffix, protocol in (("", "zero"), ("_mask", "mask")):
        per = results["missing" + suffix]
        worst = min(per, key=lambda c: per[c]["acc"])
        line = next(x for x in summary.splitlines() if f"({protocol})" in x)
        assert f"{results['missing_avg' + suffix]['acc']:.4f}" in line
        assert f"worst: {worst} {per[worst]['acc']:.4f}" in line
    assert os.path.join(repo_copy, workdir, "eval.json") in summary
    again = _run(small, repo_copy)
    assert "resumed from step 20" in again.stdout + again.stderr


def test_every_relative_link_in_the_readme_resolves():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _readme())
    relative = [x for x in links if not re.match(r"[a-z]+://", x)]
    assert relative, "the README links to its docs"
    for link in relative:
        assert os.path.exists(os.path.join(ROOT, link)), link
