"""On-disk storage: a TFDS array_record dataset per (dataset, identity), written atomically.

DESIGN.md §6. A checked `SourceData` is written by a `tfds.core.GeneratorBasedBuilder` with
``file_format="array_record"`` and read back through `tfds.builder_from_directory` and
``as_data_source()``; neither needs TensorFlow, and ``tfds build`` (which does) is never used.

Layout: ``<data_dir>/<dataset>/<config>/<VERSION>/``, where ``<config>`` is a readable tag plus a
hash of everything that changes the stored data (see `pipeline.identity`), so different configs
never collide in one data_dir. A build runs in a fresh ``<data_dir>/.tmp-*`` folder and is renamed
into place only once complete; a failure removes the temp folder, so nothing half-written remains.
Examples keep the source order (``disable_shuffling``), so index i of a split is example i of the
user's file.
"""

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import tempfile
import types
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from data_pipelines._common import SPLITS, SourceData

VERSION = "1.0.0"


@dataclasses.dataclass(eq=False)
class _Config(tfds.core.BuilderConfig):
    """A BuilderConfig that carries the in-memory data to write (only while building)."""

    # repr=False: TFDS logs the config, and the arrays would flood the log.
    source: SourceData | None = dataclasses.field(default=None, repr=False)
    identity: dict[str, Any] | None = dataclasses.field(default=None, repr=False)
    # Extra JSON metadata: the normalization and the train statistics (pipeline.normalize).
    metadata: dict[str, Any] | None = dataclasses.field(default=None, repr=False)


class _ArrayBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes a `SourceData` held by the builder config; one subclass per dataset name."""

    VERSION = tfds.core.Version(VERSION)

    def _info(self) -> tfds.core.DatasetInfo:
        src: SourceData = self.builder_config.source
        train = src.splits["train"]
        features = {m: _tensor(train[m]) for m in src.modalities}
        features["lengths"] = _tensor(train["lengths"])
        features["label"] = _tensor(train["label"])
        return tfds.core.DatasetInfo(
            builder=self,
            description="modalimmune_jax data pipeline (data_pipelines/)",
            features=tfds.features.FeaturesDict(features),
            # Keep the user's order so index i of a split is example i of the source file.
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(
                modalities=list(src.modalities),
                task=src.task,
                num_classes=int(src.num_classes),
                metric_family=src.metric_family,
                label_names=list(src.label_names),
                identity=self.builder_config.identity,
                notes=src.notes,
                **(self.builder_config.metadata or {}),
            ),
        )

    # Nothing is downloaded: the data is already in memory, so no "Downloading and preparing".
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _split_generators(self, dl_manager):
        del dl_manager  # the data is already in memory
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
        arrays = self.builder_config.source.splits[split]
        keys = list(self.info.features.keys())
        for i in range(len(arrays["label"])):
            yield i, {k: arrays[k][i] for k in keys}


class _NotOurWarning(logging.Filter):
    """Drops TFDS's warning that our builder config is a custom one: every one of ours is."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Using custom data configuration")


@contextlib.contextmanager
def _quiet_tfds():
    """A build prints one line of ours (`pipeline`), not TFDS's download banner and bars.

    TFDS's progress bars (splits, examples, shuffling) are off during the build and come back
    after it; its "custom data configuration" warning is dropped for our own configs only. Real
    warnings still show.
    """
    was_active = tqdm_utils._active  # noqa: SLF001 -- TFDS has no getter for it
    tqdm_utils.display_progress_bar(False)
    quiet = _NotOurWarning()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(quiet)
    try:
        yield
    finally:
        absl_logger.removeFilter(quiet)
        tqdm_utils.display_progress_bar(was_active)


def _tensor(x: np.ndarray) -> tfds.features.Tensor:
    """The per-example feature spec of a stacked ``[N, ...]`` array."""
    return tfds.features.Tensor(shape=x.shape[1:], dtype=x.dtype.type)


@functools.cache
def _builder_class(name: str) -> type[_ArrayBuilder]:
    # TFDS takes the directory name from the class attribute `name`; skip_registration keeps these
    # out of TFDS's global registry (where names like "digits" could clash).
    return types.new_class(
        f"_{name}_builder",
        (_ArrayBuilder,),
        {"skip_registration": True},
        lambda ns: ns.update(name=name),
    )


def build_path(data_dir: str, name: str, config_name: str) -> str:
    return os.path.join(data_dir, name, config_name, VERSION)


def is_built(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_info.json"))


def write(
    source: SourceData,
    identity: dict[str, Any],
    *,
    data_dir: str,
    name: str,
    config_name: str,
    metadata: dict[str, Any] | None = None,
) -> str:
    """Writes `source` to ``build_path(...)`` atomically; returns that path.

    `metadata` (JSON-serialisable) joins the TFDS metadata next to the modalities and task.

    If another process (another host) finishes the same build first, its copy is kept: the data
    is a deterministic function of the identity, so the two are the same.
    """
    final = build_path(data_dir, name, config_name)
    os.makedirs(data_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=data_dir)
    created = []  # parents of `final` made here, removed again if the build fails
    try:
        config = _Config(name=config_name, version=VERSION, source=source, identity=identity,
                         metadata=metadata)
        with _quiet_tfds():
            builder = _builder_class(name)(config=config, data_dir=tmp,
                                           file_format="array_record")
            builder.download_and_prepare()
        for d in (os.path.dirname(os.path.dirname(final)), os.path.dirname(final)):
            if not os.path.isdir(d):
                os.mkdir(d)
                created.append(d)
        try:
            os.rename(os.path.join(tmp, name, config_name, VERSION), final)
        except OSError:
            if not is_built(final):
                raise
    except BaseException:
        for d in reversed(created):
            try:
                os.rmdir(d)
            except OSError:
                pass  # not empty: another build put something there meanwhile
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def open_built(path: str) -> tfds.core.DatasetBuilder:
    """A read-only builder over a finished build (no source code or source files needed)."""
    return tfds.builder_from_directory(path)
