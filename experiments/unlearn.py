r"""Forgets one modality of a trained model, then measures forget quality and retained utility.

  python -m experiments.unlearn --workdir=runs/mi --forget=left --method=ccu --out=runs/unl_ccu
  python -m experiments.unlearn --workdir=runs/mi --forget=left --method=retrain \
      --out=runs/unl_retrain
  python -m experiments.unlearn --workdir=runs/mi --forget=left --method=manu --steps=100 \
      --hparams.manu.fraction=0.3 --out=runs/unl_manu

The methods and unlearn.json are described in `modalimmune_jax.studies.unlearn`.
"""

import sys

from absl import flags
from ml_collections import config_flags

from modalimmune_jax.studies import unlearn
from modalimmune_jax.training import cli


def _define_flags():
    flags.DEFINE_string("workdir", None, "A trained workdir (experiments.train).")
    flags.DEFINE_string("forget", None, "The modality to forget.")
    flags.DEFINE_enum("method", None, unlearn.METHODS, "The unlearning method.")
    flags.DEFINE_string("out", None, "Output folder for unlearn.json.")
    flags.DEFINE_integer("steps", None, "Unlearning steps (retrain: training steps).")
    config_flags.DEFINE_config_dict("hparams", unlearn.default_hparams(),
                                    "Unlearning hyperparameters.")
    flags.mark_flags_as_required(["workdir", "forget", "method", "out"])


def main(argv):
    f = flags.FLAGS
    cli.main(argv, lambda: unlearn.unlearn_command(f.workdir, f.forget, f.method, f.out,
                                                   steps=f.steps, hparams=f.hparams))


if __name__ == "__main__":
    # ml_collections resolves the --hparams.<field> overrides when the flag is defined, so a typo
    # there is a bare AttributeError before app.run: one line instead, like every bad flag.
    with cli.flag_errors(sys.argv):
        _define_flags()
    cli.run(main)
