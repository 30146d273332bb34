r"""Re-evaluates the best-on-valid params of a workdir's latest checkpoint and rewrites eval.json.

  python -m experiments.evaluate --workdir=runs/mi
  # The same protocol on the valid split (for choosing hyperparameters without touching test):
  python -m experiments.evaluate --workdir=runs/mi --split=valid   # writes eval_valid.json
"""

from absl import flags

from modalimmune_jax.training import cli, trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (experiments.train).")
_SPLIT = flags.DEFINE_enum(
    "split", "test", ["test", "valid"],
    "Split to evaluate; test rewrites eval.json, valid writes eval_valid.json.")
cli.define_distributed_flags()


def main(argv):
    cli.main(argv, lambda: trainer.evaluate_command(_WORKDIR.value, _SPLIT.value))


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    cli.run(main)
