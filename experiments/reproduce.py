r"""Runs methods × seeds of one suite; writes results.json, table.md and plots (DESIGN.md §5, §7).

  python -m experiments.reproduce --suite=digits --quick --out=runs/quickstart
  python -m experiments.reproduce --suite=synthetic --out=runs/repro_syn --fast
  python -m experiments.reproduce --suite=digits --out=runs/repro_digits --seeds=3
  python -m experiments.reproduce --suite=cmu_mosi --dataset_path=/data/MOSI --out=runs/mosi
  # The smallest form (what tests/test_reproduce.py runs):
  python -m experiments.reproduce --suite=synthetic --tiny --num_steps=20 --seeds=1 \
      --methods=erm --no_ablation --no_unlearning --out=runs/repro_tiny

The suite is `modalimmune_jax.studies.suite` (its docstring has the layout of --out).
"""

from absl import flags

from experiments.configs import default
from modalimmune_jax.studies import suite
from modalimmune_jax.training import cli

_SUITE = flags.DEFINE_enum("suite", None, suite.SUITES, "Which dataset suite to run.")
_OUT = flags.DEFINE_string("out", None, "Output folder (runs, results.json, table.md, plots).")
_FAST = flags.DEFINE_bool("fast", False, "Fewer steps per run (suite.FAST_STEPS) for a quick look.")
_QUICK = flags.DEFINE_bool("quick", False, "The README's first command: erm, moddrop and "
                           "modalimmune, one seed, --fast steps, no ablation/oracle/unlearning.")
_ORACLE = flags.DEFINE_bool("oracle", None, "Train the per-condition specialists (the oracle row); "
                            "default: on for --suite=digits without --fast.")
_TINY = flags.DEFINE_bool("tiny", False, "The config's `tiny` modifier (smoke tests).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 0, "Steps per run; 0 keeps the preset/--fast value.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds 0..N-1 per method.")
_DATASET_PATH = flags.DEFINE_string("dataset_path", "", "config.dataset.path (npz / real data).")
_METHODS = flags.DEFINE_list("methods", list(suite.BASELINES), "Methods to compare.")
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


def main(argv):
    cli.main(argv, lambda: suite.reproduce_command(
        _SUITE.value, _OUT.value, cache=_CACHE.value, get_config=default.get_config,
        seeds=_SEEDS.value, fast=_FAST.value, tiny=_TINY.value, num_steps=_NUM_STEPS.value,
        dataset_path=_DATASET_PATH.value, method_names=tuple(_METHODS.value),
        ablation=not _NO_ABLATION.value, ablation_seeds=_ABLATION_SEEDS.value,
        unlearning=not _NO_UNLEARNING.value, workers=_WORKERS.value, quick=_QUICK.value,
        oracle=_ORACLE.value))


if __name__ == "__main__":
    flags.mark_flags_as_required(["suite", "out"])
    cli.run(main)
