"""Builds a dataset ahead of time (the TFDS ``tfds build`` CLI needs TensorFlow; this does not).

Usage::

  python -m data_pipelines.build --dataset=cmu_mosi --manual_dir=/data/MOSI/Processed \
      --data_dir=/data/tfds [--layout=auto] [--max_len=0] [--normalize=standardize]
  python -m data_pipelines.build --dataset=synthetic --data_dir=/data/tfds

``--manual_dir`` is the folder (or file) holding the user's files: the published pickles for
cmu_mosi / cmu_mosei / iemocap, or the npz folder; it is ``config.dataset.path`` in a training
config. A later run with the same dataset, files, layout, max_len and normalize reuses the build.
Synthetic builds use the default knobs (data_pipelines/synthetic.py) unless overridden by the flags
below.
"""

import dataclasses
import json

import ml_collections
from absl import flags

from data_pipelines.normalization import MODES
from data_pipelines.pipeline import SOURCES, prepare
from modalimmune_jax.training import cli
from modalimmune_jax.training.config import absolute_path

_DATASET = flags.DEFINE_enum("dataset", None, sorted(SOURCES), "Dataset to build.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "Folder (or file) with the user's data files.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where built datasets live.")
_LAYOUT = flags.DEFINE_enum(
    "layout",
    "auto",
    ["auto", "mmsa_aligned", "mmsa_unaligned", "mult"],
    "Pickle layout for cmu_mosi / cmu_mosei / iemocap.",
)
_MAX_LEN = flags.DEFINE_integer("max_len", 0, "Pad/truncate sequences to this T; 0 keeps stored T.")
_NORMALIZE = flags.DEFINE_enum(
    "normalize", None, list(MODES), "Feature normalization; default: the dataset's (pipeline.py)."
)
_TASK = flags.DEFINE_enum("task", None, ["classification", "regression"], "synthetic only.")
_DATA_SEED = flags.DEFINE_integer("data_seed", None, "synthetic only.")


def build_command() -> str:
    """Builds (or finds) the dataset; returns its description (JSON) for the terminal."""
    cfg = {
        "name": _DATASET.value,
        # Paths as the user typed them, resolved once here (relative, ~).
        "path": absolute_path(_MANUAL_DIR.value),
        "layout": _LAYOUT.value,
        "max_len": _MAX_LEN.value,
    }
    if _NORMALIZE.value is not None:
        cfg["normalize"] = _NORMALIZE.value
    if _TASK.value is not None:
        cfg["task"] = _TASK.value
    if _DATA_SEED.value is not None:
        cfg["data_seed"] = _DATA_SEED.value
    data_dir = absolute_path(_DATA_DIR.value)
    info = prepare(ml_collections.ConfigDict(cfg), data_dir=data_dir)
    out = dataclasses.asdict(info)
    # The per-feature statistics run to thousands of numbers (768 BERT features): they are in the
    # build's metadata.json; print their size only.
    for key in ("feature_std", "pooled_mean", "pooled_variance", "normalization"):
        out[key] = f"{len(out[key])} modalities (see the build's metadata.json)"
    return json.dumps({**out, "data_dir": data_dir}, indent=2)


def main(argv):
    cli.main(argv, build_command)


if __name__ == "__main__":
    flags.mark_flags_as_required(["dataset", "data_dir"])
    cli.run(main)
