"""The public data API: `prepare`, `make_loader`, `load_split` and `DatasetInfo` (DESIGN.md §6).

`prepare` turns a ``config.dataset`` block into a built TFDS array_record dataset under
``data_dir`` (building it on first use) and describes it. `make_loader` batches a split with grain
(seeded shuffle, epochs, per-host sharding, a checkpointable iterator); `load_split` returns a whole
split as numpy arrays for evaluation. Every element has the batch format of DESIGN.md §2:

- one float32 array per modality, ``[T_m, D_m]`` (sequence) or ``[D_m]`` (vector);
- ``"lengths"`` ``[M] int32``: valid timesteps per modality after pad/truncate (1 for vectors);
- ``"mask"`` ``[M] float32``: all ones (every modality is present in the data);
- ``"label"``: ``[] int32`` (classification), ``[] float32`` (regression, sentiment) or
  ``[K] int32`` in {0, 1} (multilabel, IEMOCAP).

``config.dataset.max_len`` > 0 zero-pads or truncates (keeping the first steps) every sequence
modality to that many timesteps; 0 keeps the stored length (padding to the longest split if the
splits differ).

``config.dataset.normalize`` ("none" | "standardize"; unset: the dataset's entry in
`DEFAULT_NORMALIZE`) standardizes every feature with statistics fitted on the train split, when the
dataset is built (data_pipelines/normalization.py). It is part of the build's identity, so changing
it rebuilds; the statistics are kept in the build's TFDS metadata and on `DatasetInfo`.
"""

import dataclasses
import functools
import hashlib
import json
import sys
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import affect, digits, normalization, npz, storage, synthetic
from data_pipelines._common import SPLITS, SourceData

# Bump when the stored format or any source's conversion changes, so old builds are not reused.
# 2: normalization and the train statistics in the metadata.
FORMAT_VERSION = 2
# `config.dataset.normalize` when the config leaves it unset; experiments/configs/default.py sets
# the same values, with the evidence for each choice.
DEFAULT_NORMALIZE = {
    "npz": "standardize",  # a user's features: any scale (DESIGN.md §6)
    "digits": "standardize",
    "synthetic": "none",
    # MMSA and MulT feed the published features as they are (only -inf -> 0).
    "cmu_mosi": "none",
    "cmu_mosei": "none",
    "iemocap": "none",
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about a built dataset.

    Attributes:
      name: the dataset name from the config.
      modalities: modality names; their order is the column order of ``batch["mask"]`` and
        ``batch["lengths"]``.
      feature_shapes: per modality, ``(T, D)`` for sequences or ``(D,)`` for vectors, after
        pad/truncate.
      task: "classification" | "regression" | "multilabel".
      num_classes: classification C; regression 1; multilabel K (IEMOCAP: 4, each 2-way).
      metric_family: "classification" | "regression" | "sentiment" (MOSI/MOSEI) | "iemocap".
      split_sizes: ``{"train": N, "valid": N, "test": N}``.
      label_names: multilabel target names (IEMOCAP: Neutral, Happy, Sad, Angry), else ().
      normalize: the build's ``dataset.normalize``: "none" | "standardize".
      feature_std: per modality, ``D_m`` floats: the population std of each stored feature over
        the train split's values (valid timesteps, MMSA's -inf left out). About 1 after
        standardization (0 for a constant feature). Empty for a hand-made DatasetInfo.
      pooled_mean, pooled_variance: per modality, ``D_m`` floats: the train mean and variance of
        each time-pooled stored feature (the reconstruction targets); the variance is the
        ``sigma^2_mj`` of the scale-free reconstruction loss (DESIGN.md §3.5). Empty for a
        hand-made DatasetInfo (``model.reconstruction_stats`` then uses 0 and 1).
      normalization: per modality ``{"mean": D_m floats, "scale": D_m floats}``, the standardization
        fitted on train (maps a stored feature back: ``x = x' * scale + mean``); empty for "none".
    """

    name: str
    modalities: tuple[str, ...]
    feature_shapes: dict[str, tuple[int, ...]]
    task: str
    num_classes: int
    metric_family: str
    split_sizes: dict[str, int]
    label_names: tuple[str, ...] = ()
    normalize: str = "none"
    # repr=False: hundreds of floats per modality would bury the rest of the record in logs.
    feature_std: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict, repr=False)
    pooled_mean: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict, repr=False)
    pooled_variance: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict,
                                                                      repr=False)
    normalization: dict[str, dict[str, tuple[float, ...]]] = dataclasses.field(
        default_factory=dict, repr=False)


@dataclasses.dataclass(frozen=True)
class _Source:
    identity: Any  # dataset_cfg -> dict; cheap (stats files at most)
    load: Any  # dataset_cfg -> SourceData; reads and checks the user's files


SOURCES = {
    "synthetic": _Source(synthetic.identity, synthetic.load),
    "digits": _Source(digits.identity, digits.load),
    "npz": _Source(npz.identity, npz.load),
    **{
        name: _Source(
            functools.partial(affect.identity, name=name), functools.partial(affect.load, name=name)
        )
        for name in affect.NAMES
    },
}


def _source(dataset_cfg) -> tuple[str, _Source]:
    name = dataset_cfg.get("name", None)
    if name not in SOURCES:
        raise ValueError(
            f"config.dataset.name: unknown dataset {name!r}; expected one of {sorted(SOURCES)}"
        )
    return name, SOURCES[name]


def _max_len(dataset_cfg) -> int:
    max_len = dataset_cfg.get("max_len", 0) or 0
    if int(max_len) != max_len or max_len < 0:
        raise ValueError(f"config.dataset.max_len must be an integer >= 0, got {max_len!r}")
    return int(max_len)


def normalize_mode(dataset_cfg) -> str:
    """``config.dataset.normalize``, or the dataset's default (`DEFAULT_NORMALIZE`) when unset."""
    name, _ = _source(dataset_cfg)
    mode = dataset_cfg.get("normalize", None) or DEFAULT_NORMALIZE[name]
    if mode not in normalization.MODES:
        raise ValueError(
            f"config.dataset.normalize must be one of {list(normalization.MODES)}, got {mode!r}"
        )
    return mode


def identity(dataset_cfg) -> tuple[str, dict[str, Any]]:
    """The build's config name and the identity it hashes: everything that changes stored data."""
    name, source = _source(dataset_cfg)
    max_len = _max_len(dataset_cfg)
    ident = {
        "dataset": name,
        "format": FORMAT_VERSION,
        "max_len": max_len,
        "normalize": normalize_mode(dataset_cfg),
        **source.identity(dataset_cfg),
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    tag = ident.get("tag", "default")
    return f"{tag}-len{max_len}-{digest}", ident


def fit_lengths(src: SourceData, max_len: int) -> SourceData:
    """Zero-pads or truncates every sequence modality to a common T and caps the lengths.

    T is `max_len` if positive, else the longest stored T over the splits. Truncation keeps the
    first T steps: the published files pad at the end, so the start holds the data.
    """
    splits = {s: dict(a) for s, a in src.splits.items()}
    absent = {s: dict(a) for s, a in src.absent.items()}
    for i, m in enumerate(src.modalities):
        if splits["train"][m].ndim != 3:
            continue
        t = max_len or max(a[m].shape[1] for a in splits.values())
        for split, arrays in splits.items():
            arrays[m] = _fit_steps(arrays[m], t)
            if m in absent.get(split, {}):
                absent[split][m] = _fit_steps(absent[split][m], t)
            lengths = arrays["lengths"].copy()
            lengths[:, i] = np.minimum(lengths[:, i], t)
            arrays["lengths"] = lengths
    return dataclasses.replace(src, splits=splits, absent=absent)


def _fit_steps(x: np.ndarray, t: int) -> np.ndarray:
    """``[N, T0, D]`` -> ``[N, t, D]``: the first t steps, zero- (False-) padded at the end."""
    x = x[:, :t]
    return np.pad(x, ((0, 0), (0, t - x.shape[1]), (0, 0)))


def normalize(src: SourceData, mode: str) -> tuple[SourceData, dict[str, Any]]:
    """Applies ``dataset.normalize`` to every split; returns the data and the metadata to store.

    The metadata holds ``normalization`` (the mode and, for "standardize", the train statistics)
    and ``statistics`` (`normalization.statistics` of the stored train split).
    """
    stats = normalization.fit(src) if mode == "standardize" else None
    if stats is not None:
        src = normalization.apply(src, stats)
    return src, {"normalization": normalization.to_json(stats, mode),
                 "statistics": normalization.statistics(src)}


def _open(dataset_cfg, data_dir: str) -> tuple[DatasetInfo, tfds.core.DatasetBuilder]:
    name, source = _source(dataset_cfg)
    config_name, ident = identity(dataset_cfg)
    path = storage.build_path(data_dir, name, config_name)
    if not storage.is_built(path):
        # The one line a first run prints about its data (nothing is downloaded).
        print(f"preparing {name} → {path} (first run only)", file=sys.stderr, flush=True)
        # All user-facing checks run here, before anything is written to data_dir.
        src = fit_lengths(source.load(dataset_cfg), ident["max_len"])
        src, stats = normalize(src, ident["normalize"])
        storage.write(src, ident, data_dir=data_dir, name=name, config_name=config_name,
                      metadata=stats)
    builder = storage.open_built(path)
    return _describe(name, builder, path), builder


def _per_modality(record, modalities) -> dict[str, tuple[float, ...]]:
    return {m: tuple(float(v) for v in record[m]) for m in modalities}


def _describe(name: str, builder: tfds.core.DatasetBuilder, path: str) -> DatasetInfo:
    """DatasetInfo from a built dataset, checking that the build is whole."""
    try:
        meta = builder.info.metadata
        modalities = tuple(meta["modalities"])
        features = builder.info.features
        info = DatasetInfo(
            name=name,
            modalities=modalities,
            feature_shapes={m: tuple(features[m].shape) for m in modalities},
            task=meta["task"],
            num_classes=int(meta["num_classes"]),
            metric_family=meta["metric_family"],
            split_sizes={s: int(builder.info.splits[s].num_examples) for s in SPLITS},
            label_names=tuple(meta["label_names"]),
            normalize=meta["normalization"]["mode"],
            feature_std=_per_modality(meta["statistics"]["feature_std"], modalities),
            pooled_mean=_per_modality(meta["statistics"]["pooled_mean"], modalities),
            pooled_variance=_per_modality(meta["statistics"]["pooled_variance"], modalities),
            normalization={
                m: {k: tuple(float(v) for v in meta["normalization"][k][m])
                    for k in ("mean", "scale")}
                for m in modalities} if "mean" in meta["normalization"] else {},
        )
        ok = tuple(features["lengths"].shape) == (len(modalities),) and "label" in features
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{path}: built dataset is unreadable ({e!r}); delete it to rebuild"
        ) from e
    if not ok or min(info.split_sizes.values()) <= 0:
        raise ValueError(f"{path}: built dataset is inconsistent ({info}); delete it to rebuild")
    return info


def prepare(dataset_cfg, *, data_dir: str) -> DatasetInfo:
    """Builds the dataset into `data_dir` on first use, checks it, and describes it.

    The first call reads and checks the user's files (raising ValueError naming the file, split,
    key and offending value), then writes the TFDS dataset atomically: built in a temp folder and
    renamed into place, so a failed build leaves nothing half-written. Later calls with the same
    identity only stat the source files and read the build's JSON.

    Args:
      dataset_cfg: the ``config.dataset`` ConfigDict (``name``, ``path``, ``layout``, ``max_len``,
        and the synthetic knobs).
      data_dir: folder holding built datasets (created if needed).

    Returns:
      The DatasetInfo of the built dataset.
    """
    return _open(dataset_cfg, data_dir)[0]


class _ToBatchFormat(grain.transforms.Map):
    """Casts a decoded record to the batch format and adds the all-ones presence mask."""

    def __init__(self, modalities: tuple[str, ...], label_dtype: str):
        self._modalities = tuple(modalities)
        self._label_dtype = label_dtype

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        out = {m: np.asarray(element[m], np.float32) for m in self._modalities}
        out["lengths"] = np.asarray(element["lengths"], np.int32)
        out["mask"] = np.ones((len(self._modalities),), np.float32)
        # TFDS decodes scalars to Python int/float, which would stack as int64/float64.
        out["label"] = np.asarray(element["label"], self._label_dtype)
        return out


def _to_batch_format(info: DatasetInfo) -> _ToBatchFormat:
    label_dtype = "float32" if info.task == "regression" else "int32"
    return _ToBatchFormat(info.modalities, label_dtype)


def _data_source(builder, info: DatasetInfo, split: str):
    if split not in info.split_sizes:
        raise ValueError(f"unknown split {split!r}; expected one of {list(info.split_sizes)}")
    return builder.as_data_source(split=split)


def make_loader(
    dataset_cfg,
    split: str,
    *,
    data_dir: str,
    batch_size: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    drop_remainder: bool,
    shard_index: int = 0,
    shard_count: int = 1,
) -> Any:
    """A grain loader over one split of the built dataset.

    Sharding splits the records into `shard_count` contiguous blocks, as grain's `ShardOptions`
    describe (the first ``N % shard_count`` blocks get one extra record); this host reads block
    `shard_index`, reshuffled by `seed` every epoch. With `drop_remainder` the blocks are made
    equal (``N // shard_count``), so every host yields the same number of batches; without it the
    shards partition the split exactly.

    Args:
      dataset_cfg: the ``config.dataset`` ConfigDict; ``worker_count`` (default 0) sets grain's
        worker processes.
      split: "train" | "valid" | "test".
      data_dir: as in `prepare` (the dataset is built here if needed).
      batch_size: per-host batch size B.
      seed: non-negative 32-bit shuffle seed.
      shuffle: shuffle records (differently each epoch).
      num_epochs: passes over the shard; None repeats forever.
      drop_remainder: drop the last incomplete batch (and unequal shard remainders).
      shard_index: this host's shard, in [0, shard_count).
      shard_count: number of hosts reading disjoint shards.

    Returns:
      A loader whose ``iter(loader)`` is a checkpointable iterator (``get_state()`` /
      ``set_state()``, grain DataLoader's JSON bytes) yielding batches with a leading ``[B]``
      axis: `grain.DataLoader`, or in memory without workers a `grain.MapDataset` iterator.
    """
    info, builder = _open(dataset_cfg, data_dir)
    shard_options = grain.sharding.ShardOptions(  # validates index and count
        shard_index=shard_index, shard_count=shard_count, drop_remainder=drop_remainder
    )
    if dataset_cfg.get("in_memory", True):
        return _in_memory_loader(
            load_split(dataset_cfg, split, data_dir=data_dir), shard_options,
            name=f"{info.name}/{split}", batch_size=batch_size, seed=seed, shuffle=shuffle,
            num_epochs=num_epochs, drop_remainder=drop_remainder,
            worker_count=int(dataset_cfg.get("worker_count", 0) or 0))
    operations = [_to_batch_format(info)]
    source = _ShardSource(_data_source(builder, info, split), shard_options)
    if len(source) == 0:
        raise ValueError(
            f"split {split!r} has {info.split_sizes[split]} examples: too few for "
            f"{shard_count} shards"
        )
    # The shard is cut above, so grain sees a single shard. Its DataLoader would otherwise cut
    # every shard to floor(N / shard_count) records per epoch (grain 0.2.18), silently dropping
    # the remainder even without drop_remainder.
    no_sharding = grain.sharding.NoSharding()
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=no_sharding,
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[
            *operations,
            grain.transforms.Batch(batch_size=batch_size, drop_remainder=drop_remainder),
        ],
        worker_count=int(dataset_cfg.get("worker_count", 0) or 0),
        shard_options=no_sharding,
    )


class _ShardSource:
    """One host's contiguous block of a random-access data source (picklable for grain workers)."""

    def __init__(self, source, shard_options: grain.sharding.ShardOptions):
        self._source = source
        n, k, i = len(source), shard_options.shard_count, shard_options.shard_index
        per, extra = divmod(n, k)
        if shard_options.drop_remainder:
            self._start, self._stop = i * per, (i + 1) * per
        else:
            self._start = i * per + min(i, extra)
            self._stop = self._start + per + (i < extra)
        self._repr = f"{source!r}[shard {i} of {k}: {self._start}:{self._stop}]"

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self._repr}")
        return self._source[self._start + index]

    def __getitems__(self, indices):
        return self._source.__getitems__([self._start + int(i) for i in indices])

    def __repr__(self) -> str:
        # grain checks this against the checkpointed state, so a shard only resumes its own state.
        return self._repr


# "Forever" for an in-memory loader: grain needs a finite record count.
_MAX_EPOCHS = 1_000_000


def _in_memory_loader(arrays, shard_options, *, name, batch_size, seed, shuffle, num_epochs,
                      drop_remainder, worker_count):
    """A grain loader whose records are whole batches of an in-memory split.

    Decoding TFDS records one at a time, and grain's per-record bookkeeping, cap a loader near
    1k examples/s on a busy CPU core, slower than a training step. Here the array_record split is
    read once into RAM and grain walks over *batches*: record k is batch ``k % nb`` of epoch
    ``k // nb``, whose rows come from a permutation seeded by ``(seed, epoch)``. Shuffling,
    epochs, per-host shards and grain's checkpointable iterator state keep their meaning.
    """
    shard = _ShardSource(_ArraySource(arrays, name), shard_options)
    rows = np.arange(shard._start, shard._stop)
    source = _EpochBatchSource({k: v[rows] for k, v in arrays.items()}, batch_size=batch_size,
                               seed=seed, shuffle=shuffle, drop_remainder=drop_remainder,
                               num_epochs=num_epochs or _MAX_EPOCHS, name=repr(shard))
    if len(source) == 0:
        raise ValueError(f"{name}: {len(rows)} examples in this shard, fewer than one batch of "
                         f"{batch_size}")
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=grain.sharding.NoSharding(), shuffle=False,
        num_epochs=1, seed=seed)
    if worker_count:
        return grain.DataLoader(data_source=source, sampler=sampler, operations=[],
                                worker_count=worker_count,
                                shard_options=grain.sharding.NoSharding())
    return _BatchLoader(source, sampler)


class _BatchLoader:
    """The in-memory loader without worker processes: ``iter()`` gives a `_BatchIterator`."""

    def __init__(self, source, sampler):
        self._source, self._sampler = source, sampler

    def __iter__(self) -> "_BatchIterator":
        return _BatchIterator(self._source, self._sampler)


class _BatchIterator:
    """grain's dataset iterator over an in-memory split's batches, checkpointed as DataLoader is.

    `grain.DataLoader` spends ~0.6 ms of host CPU per batch on its sampler, record metadata and
    state wrappers (grain 0.2.18, digits), a fifth of an erm step that the input thread takes
    from the step's XLA threads on a 2-core host (issue 15). ``grain.MapDataset`` walks the same
    records in the same order for ~0.09 ms. The state is DataLoader's own JSON (version 2, no
    workers, the sampler's and the source's ``repr``), checked the same way on restore, so a
    checkpoint written by either loader resumes in the other.
    """

    def __init__(self, source, sampler):
        self._source_repr, self._sampler_repr = repr(source), repr(sampler)
        self._it = iter(grain.MapDataset.source(source).to_iter_dataset(
            grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> bytes:
        """DataLoader's state: ``last_seen_indices["0"]`` is the last record read (-1: none)."""
        return json.dumps({
            "version": 2, "last_seen_indices": {"0": self._it.get_state()["next_index"] - 1},
            "last_worker_index": -1, "worker_count": 0, "sampler": self._sampler_repr,
            "data_source": self._source_repr}, indent=4).encode()

    def set_state(self, state: bytes) -> None:
        state = json.loads(state.decode())
        for key, ours in (("worker_count", 0), ("data_source", self._source_repr),
                          ("sampler", self._sampler_repr)):
            if state.get(key) != ours:
                raise ValueError(f"the checkpointed data iterator does not match this loader: "
                                 f"{key} {state.get(key)!r} in the checkpoint, {ours!r} here "
                                 "(a different dataset, seed, batch size or shard)")
        self._it.set_state({"next_index": int(state["last_seen_indices"]["0"]) + 1})

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after a restore; nothing is read ahead here."""


class _EpochBatchSource:
    """Record k = batch ``k % nb`` of epoch ``k // nb`` of an in-memory split (see above)."""

    def __init__(self, arrays, *, batch_size, seed, shuffle, drop_remainder, num_epochs, name):
        self._arrays = arrays
        self._n = len(arrays["label"])
        self._batch = batch_size
        self._seed, self._shuffle = seed, shuffle
        self._per_epoch = (self._n // batch_size if drop_remainder
                           else -(-self._n // batch_size))
        self._epochs = num_epochs
        self._name = name
        self._cached = (None, None)

    def __len__(self) -> int:
        return self._per_epoch * self._epochs

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:
            order = (np.random.default_rng([self._seed, epoch]).permutation(self._n)
                     if self._shuffle else np.arange(self._n))
            self._cached = (epoch, order)
        return self._cached[1]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        epoch, j = divmod(int(index), self._per_epoch)
        idx = self._order(epoch)[j * self._batch:(j + 1) * self._batch]
        return {k: v[idx] for k, v in self._arrays.items()}

    def __repr__(self) -> str:
        # grain checks this against the checkpointed state: a resumed run must see the same data.
        return (f"EpochBatches({self._name}, n={self._n}, batch={self._batch}, "
                f"seed={self._seed}, shuffle={self._shuffle})")


class _ArraySource:
    """A split held in memory as stacked batch-format arrays; random access by row."""

    def __init__(self, arrays: dict[str, np.ndarray], name: str):
        self._arrays = arrays
        self._len = len(arrays["label"])
        self._name = name

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self._arrays.items()}

    def __getitems__(self, indices):
        return [self[int(i)] for i in indices]

    def __repr__(self) -> str:
        return f"InMemory({self._name}, n={self._len})"


def load_split(dataset_cfg, split: str, *, data_dir: str) -> dict[str, np.ndarray]:
    """One whole split, stacked, in the batch format (for evaluation).

    Returns:
      Each modality ``[N, T_m, D_m]`` or ``[N, D_m]`` float32; ``lengths`` ``[N, M] int32``;
      ``mask`` ``[N, M] float32`` ones; ``label`` ``[N]`` or ``[N, K]``; in stored (source) order.
    """
    info, builder = _open(dataset_cfg, data_dir)
    source = _data_source(builder, info, split)
    to_batch = _to_batch_format(info)
    records = [to_batch.map(r) for r in source.__getitems__(list(range(len(source))))]
    return {k: np.stack([r[k] for r in records]) for k in records[0]}
