"""Dataset pipelines: every dataset as TFDS array_record, batched by grain (DESIGN.md §6).

Public API (the trainer relies on exactly these):

- `prepare(dataset_cfg, *, data_dir) -> DatasetInfo`: build on first use (atomically), check,
  describe.
- `make_loader(dataset_cfg, split, *, data_dir, batch_size, seed, shuffle, num_epochs,
  drop_remainder, shard_index=0, shard_count=1) -> grain.DataLoader`.
- `load_split(dataset_cfg, split, *, data_dir) -> dict[str, np.ndarray]`.

Datasets (``config.dataset.name``): "synthetic", "digits", "npz", "cmu_mosi", "cmu_mosei",
"iemocap". Build ahead of time with ``python -m data_pipelines.build``.
"""

from data_pipelines.pipeline import SOURCES, DatasetInfo, load_split, make_loader, prepare

# Every dataset name, in one place: configs, validation and the reproduce suites read it here.
DATASETS = tuple(SOURCES)

__all__ = ["DATASETS", "DatasetInfo", "load_split", "make_loader", "prepare"]
