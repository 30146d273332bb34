r"""Prices every part of a training step, as medians over repeated runs in one process (DESIGN §8).

  python -m experiments.benchmark --out=runs/bench.json
  python -m experiments.benchmark --out=runs/bench.json --fast        # ~2-3 minutes on a CPU
  python -m experiments.benchmark --out=runs/bench.json \
      --config=experiments/configs/default.py:synthetic --config.mi.ig_every=20

What it measures is described in `modalimmune_jax.studies.benchmark`.
"""

from absl import flags
from ml_collections import config_flags

from experiments.configs import default
from modalimmune_jax.studies import benchmark
from modalimmune_jax.training import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (default: digits).",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON.")
_FAST = flags.DEFINE_bool("fast", False, "Fewer repeats and shorter windows (~2-3 min on CPU).")
_REPEATS = flags.DEFINE_integer("repeats", 0, "Timed repeats per median; 0: 3 with --fast, else 7.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Built datasets; default: a temporary folder.")


def main(argv):
    cli.main(argv, lambda: benchmark.benchmark_command(
        _CONFIG.value or default.get_config("digits"), _OUT.value, fast=_FAST.value,
        repeats=_REPEATS.value, data_dir=_DATA_DIR.value))


if __name__ == "__main__":
    flags.mark_flags_as_required(["out"])
    cli.run(main)
