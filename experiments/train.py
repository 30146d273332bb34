r"""Trains a multimodal model with one of the methods of DESIGN.md §4, then evaluates it.

  python -m experiments.train --config=experiments/configs/default.py:digits --workdir=runs/mi
  python -m experiments.train --config=experiments/configs/default.py:synthetic \
      --config.method=moddrop --config.seed=1 --workdir=runs/mi_syn

Writes config.json, metrics.jsonl, checkpoints/ (orbax) and eval.json into --workdir, then prints
a summary. A rerun with the same --workdir resumes from the latest checkpoint. The trainer is
`modalimmune_jax.training.trainer`.
"""

from absl import flags
from ml_collections import config_flags

from modalimmune_jax.training import cli, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs and checkpoints go.")
cli.define_distributed_flags()


def main(argv):
    cli.main(argv, lambda: trainer.train_command(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)
