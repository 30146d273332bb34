r"""Chooses settings on the VALID split: named variants × seeds of one suite (never test).

  python -m experiments.sweep --suite=digits --variants=methods --seeds=2 --out=runs/sweep_digits
  python -m experiments.sweep --suite=npz --dataset_path=runs/hetero --variants=modalimmune \
      --out=runs/sweep_hetero

The variants are the named sets in experiments/configs/sweeps.py. Writes sweep.json and table.md
(ranked by the mean of the `zero` and `mask` missing-modality averages on valid); the runs resume.
The sweep is `modalimmune_jax.studies.sweep`.
"""

from absl import flags

from experiments.configs import default, sweeps
from modalimmune_jax.studies import suite, sweep
from modalimmune_jax.training import cli

_SUITE = flags.DEFINE_enum("suite", None, suite.SUITES, "Which dataset.")
_VARIANTS = flags.DEFINE_enum("variants", None, sorted(sweeps.SWEEPS), "Which set of variants.")
_OUT = flags.DEFINE_string("out", None, "Output folder (runs, sweep.json, table.md).")
_SEEDS = flags.DEFINE_integer("seeds", 2, "Seeds 0..N-1 per variant.")
_FAST = flags.DEFINE_bool("fast", False, "suite.FAST_STEPS per run.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 0, "Steps per run; 0 keeps the preset's.")
_DATASET_PATH = flags.DEFINE_string("dataset_path", "", "config.dataset.path (npz / real data).")
_WORKERS = flags.DEFINE_integer("workers", 0, "Runs at once; 0: as experiments.reproduce.")


def main(argv):
    cli.main(argv, lambda: sweep.sweep_command(
        _SUITE.value, _OUT.value, get_config=default.get_config,
        variants=sweeps.SWEEPS[_VARIANTS.value](_SUITE.value), seeds=_SEEDS.value,
        fast=_FAST.value, num_steps=_NUM_STEPS.value, dataset_path=_DATASET_PATH.value,
        workers=_WORKERS.value))


if __name__ == "__main__":
    flags.mark_flags_as_required(["suite", "variants", "out"])
    cli.run(main)
