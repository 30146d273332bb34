"""Shared pieces of the dataset sources: the in-memory split format and input checks.

Every source (synthetic, digits, npz, the affect pickles) reads the user's files, checks them and
returns a `SourceData`: whole splits as numpy arrays, before any pad/truncate. The checks raise
`ValueError` messages that name the file, the split, the key and the offending shape or value,
because a bad pickle is the commonest way a user's first run fails (task brief, "Bad input").
"""

import dataclasses
import os
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SPLITS = ("train", "valid", "test")
# Keys of the batch format that a modality must never shadow.
RESERVED_KEYS = ("lengths", "mask", "label")


@dataclasses.dataclass(frozen=True)
class SourceData:
    """A whole dataset in memory, already checked, in the batch format without the mask.

    Attributes:
      modalities: the M modality names, in the column order of ``lengths`` and of the batch mask.
      splits: per split name, a dict with one float32 array per modality, ``[N, T_m, D_m]`` or
        ``[N, D_m]``; ``"lengths"`` ``[N, M] int32`` (valid timesteps, 1 for vector modalities);
        and ``"label"``: ``[N] int32`` (classification), ``[N] float32`` (regression) or
        ``[N, K] int32`` (multilabel).
      task: "classification" | "regression" | "multilabel".
      num_classes: C for classification, 1 for regression, K for multilabel.
      metric_family: "classification" | "regression" | "sentiment" | "iemocap".
      label_names: optional names of the K multilabel targets.
      notes: JSON-serialisable facts about the build (e.g. how many -inf were replaced), kept in
        the built dataset's metadata for inspection.
      absent: per split, per modality, an optional bool array shaped like the modality's features:
        True where the source held no value (MMSA/MulT's ``-inf`` audio, stored as 0). Such
        entries are left out of the normalization statistics and stay 0 (data_pipelines/
        normalization.py). Not written to disk.
    """

    modalities: tuple[str, ...]
    splits: dict[str, dict[str, np.ndarray]]
    task: str
    num_classes: int
    metric_family: str
    label_names: tuple[str, ...] = ()
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    absent: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict, repr=False)


def input_error(file: str, split: str | None, key: str | None, problem: str) -> ValueError:
    """A ValueError that says where the bad input is: ``"<file>: split 's' key 'k': <problem>"``."""
    where = str(file)
    if split is not None:
        where += f": split {split!r}"
    if key is not None:
        where += f" key {key!r}" if split is not None else f": key {key!r}"
    return ValueError(f"{where}: {problem}")


def file_fingerprint(path: str) -> dict[str, Any]:
    """Identity of a source file for the build cache: absolute path, size and mtime.

    Statting is cheap even for multi-GB pickles, where hashing the content on every start would
    not be. A changed, replaced or moved file therefore gets a fresh build rather than a stale one;
    a copy of the same file elsewhere builds once more, which is the safe direction to err.
    """
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def load_pickle(path: str) -> Any:
    """Unpickles `path`, turning any failure into a ValueError that names the file."""
    if not os.path.isfile(path):
        raise input_error(path, None, None, "file not found")
    try:
        with open(path, "rb") as f:
            # Unpickling runs code from the file: only load pickles you trust (see README).
            return pickle.load(f)
    except UnicodeDecodeError:
        # Python 2 pickles (some older feature dumps) hold str as bytes; latin1 maps them 1:1.
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")  # same trust caveat as above
        except Exception as e:  # noqa: BLE001 - any failure means "not a usable pickle"
            raise input_error(path, None, None, f"not a readable pickle ({e!r})") from e
    except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, missing classes, ...
        raise input_error(path, None, None, f"not a readable pickle ({e!r})") from e


def get_splits(data: Any, file: str) -> dict[str, Mapping[str, Any]]:
    """Checks the published top-level layout ``{"train": {...}, "valid": {...}, "test": {...}}``."""
    if not isinstance(data, Mapping):
        raise input_error(
            file,
            None,
            None,
            f"expected a dict with keys {list(SPLITS)}, got {type(data).__name__}",
        )
    out = {}
    for split in SPLITS:
        if split not in data:
            raise input_error(
                file, split, None, f"missing split; the file has {sorted(map(str, data))}"
            )
        if not isinstance(data[split], Mapping):
            raise input_error(
                file, split, None, f"expected a dict of arrays, got {type(data[split]).__name__}"
            )
        out[split] = data[split]
    return out


def require_keys(d: Mapping[str, Any], keys: Sequence[str], *, file: str, split: str) -> None:
    """Raises if any of `keys` is missing from one split's dict."""
    for key in keys:
        if key not in d:
            raise input_error(file, split, key, f"missing key; the split has {sorted(map(str, d))}")


_RANK_DOC = {1: "[N]", 2: "[N, D]", 3: "[N, T, D]"}


def numeric_array(
    value: Any, *, ranks: Sequence[int], file: str, split: str, key: str, what: str = ""
) -> np.ndarray:
    """`value` as a numeric (bool/int/float) ndarray of one of the allowed ranks, not yet cast."""
    try:
        x = np.asarray(value)
    except Exception as e:  # noqa: BLE001 - ragged lists and the like
        raise input_error(file, split, key, f"not convertible to an array ({e!r})") from e
    if x.dtype.kind not in "biuf":
        raise input_error(file, split, key, f"expected a numeric array, got dtype {x.dtype}")
    if x.ndim not in ranks:
        doc = what or " or ".join(f"rank {r} {_RANK_DOC[r]}" for r in ranks)
        raise input_error(file, split, key, f"expected {doc}, got shape {x.shape}")
    return x


def check_has_features(x: np.ndarray, *, file: str, split: str, key: str) -> None:
    """Raises for a modality with no feature (``D == 0``): nothing for an encoder to read."""
    if x.shape[-1] == 0:
        raise input_error(file, split, key, f"0 features: shape {x.shape}; a modality needs at "
                                            "least one feature (leave it out instead)")


def check_finite(x: np.ndarray, *, file: str, split: str, key: str) -> None:
    """Raises on NaN or inf, saying how many and where the first one is."""
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise input_error(
            file,
            split,
            key,
            f"{int(np.isnan(x).sum())} NaN and {int(np.isinf(x).sum())} inf values "
            f"(first at index {first}, value {x[first]})",
        )


def check_num_examples(sizes: Mapping[str, int], *, file: str, split: str) -> int:
    """All keys of one split must hold the same number of examples N > 0; returns N."""
    (ref_key, n), *rest = sizes.items()
    for key, m in rest:
        if m != n:
            raise input_error(file, split, key, f"has {m} examples but {ref_key!r} has {n}")
    if n == 0:
        raise input_error(file, split, ref_key, "empty split (0 examples)")
    return n


def check_same_dims(
    shapes: Mapping[str, tuple[int, ...]], *, files: Mapping[str, str], key: str
) -> None:
    """Per-example feature dims (all but N and T) must agree between splits."""
    ref_split = next(iter(shapes))
    ref = shapes[ref_split]
    for split, shape in shapes.items():
        if len(shape) != len(ref) or shape[-1] != ref[-1]:
            raise input_error(
                files[split],
                split,
                key,
                f"feature shape {shape[1:]} per example differs from split {ref_split!r}'s "
                f"{ref[1:]} (feature dims must agree between splits)",
            )


def check_modality_name(name: str, *, file: str) -> None:
    """Modality names become batch keys and TFDS feature names."""
    if name in RESERVED_KEYS or not name.isidentifier():
        raise input_error(
            file,
            None,
            name,
            f"cannot be a modality name (reserved: {list(RESERVED_KEYS)}; must be an identifier)",
        )
