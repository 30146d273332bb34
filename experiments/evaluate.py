r"""Re-evaluates the best-on-valid params of a workdir's latest checkpoint and rewrites eval.json.

  python -m experiments.evaluate --workdir=/tmp/mi
  # The same protocol on the valid split (for choosing hyperparameters without touching test):
  python -m experiments.evaluate --workdir=/tmp/mi --split=valid   # writes eval_valid.json
"""

import json
import os

import jax
import ml_collections
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import data_pipelines
from experiments import distributed, eval_lib, io_lib, train
from experiments.config_lib import ConfigError

# `--workdir` is defined once, by experiments.train (imported above); defining it again here
# raised DuplicateFlagError.
_WORKDIR = train._WORKDIR
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "valid"],
                           "Split to evaluate; test rewrites eval.json, valid writes eval_valid.json.")


def evaluate(workdir: str, split: str = "test") -> dict:
    """Restores the latest checkpoint in `workdir`, evaluates `split`, writes eval[_valid].json."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise ConfigError(f"--workdir={workdir}: no config.json; is it a training workdir?")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    mesh = train.make_mesh()
    replicated = NamedSharding(mesh, P())
    info, data_dir, build_model, apply_fns = train.setup(config, workdir)
    params, meta, _ = train.restore_best(workdir, config, build_model=build_model,
                                         apply_fns=apply_fns, info=info, sharding=replicated)
    put = distributed.make_eval_put_fn(mesh, NamedSharding(mesh, P("data")))
    train_arrays = data_pipelines.load_split(config.dataset, "train", data_dir=data_dir)
    evaluator = eval_lib.Evaluator(
        apply_fns, info, batch_size=config.eval.batch_size, put_fn=put, seed=config.seed,
        feature_std=eval_lib.feature_stds(train_arrays, info.modalities))
    del train_arrays
    arrays = data_pipelines.load_split(config.dataset, split, data_dir=data_dir)
    results = eval_lib.final_evaluation(evaluator, params, arrays)
    results["best_step"] = meta["best_step"]
    results["valid_best"] = meta["best_value"]
    if jax.process_index() == 0:
        name = "eval.json" if split == "test" else f"eval_{split}.json"
        io_lib.atomic_write_json(os.path.join(workdir, name), results)
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    train.quiet_libraries()
    train.run_cli(distributed.initialize)  # before anything touches a JAX backend
    train.run_cli(lambda: evaluate(_WORKDIR.value, _SPLIT.value))


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
