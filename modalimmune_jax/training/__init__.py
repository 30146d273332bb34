"""The trainer library: one loop for every method, and what the experiment binaries share.

Layers point downward only: ``data_pipelines`` -> ``modalimmune_jax`` (model, methods) ->
``modalimmune_jax.training`` (this package) -> ``modalimmune_jax.studies`` -> ``experiments/``
(thin binaries). docs/architecture.md has the picture.

- `trainer`: `train`, `train_and_evaluate`, `evaluate_workdir`, `load_trained`, `Hooks`;
- `step`: the optimizer and the pure train step; `checkpoint`: orbax save/restore;
- `evaluator`: the evaluation protocol of eval.json; `summary`: closing summaries;
- `config`: validation, paths, deprecated names; `cli`: the command-line boundary;
- `mesh`, `distributed`: devices and hosts; `files`: strict JSON, atomic writes.
"""

from modalimmune_jax.training.errors import CheckpointError, ConfigError, TrainingDiverged
from modalimmune_jax.training.trainer import (
                                              Hooks,
                                              evaluate_workdir,
                                              load_trained,
                                              setup,
                                              train,
                                              train_and_evaluate,
)

__all__ = ["CheckpointError", "ConfigError", "Hooks", "TrainingDiverged", "evaluate_workdir",
           "load_trained", "setup", "train", "train_and_evaluate"]
