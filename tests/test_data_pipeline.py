"""The grain loader over a built dataset: batches, seeded shuffle, epochs, sharding, resume.

Examples are identified by their feature bytes (the synthetic features are continuous, so every
example is unique), and every loader property is checked against `load_split`'s stored order.
"""

import dataclasses
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from data_pipelines import DatasetInfo, load_split, make_loader, prepare

N_TRAIN = 23  # prime: no batch size or shard count divides it


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    cfg = ml_collections.ConfigDict(
        {
            "name": "synthetic",
            "num_train": N_TRAIN,
            "num_valid": 5,
            "num_test": 7,
            "seq_len": 3,
            "data_seed": 3,
        }
    )
    info = prepare(cfg, data_dir=data_dir)
    train = load_split(cfg, "train", data_dir=data_dir)
    index = {train["text"][i].tobytes(): i for i in range(N_TRAIN)}
    assert len(index) == N_TRAIN
    return cfg, data_dir, info, train, index


def _loader(setup, **kw):
    cfg, data_dir = setup[0], setup[1]
    args = {"batch_size": 4, "seed": 7, "shuffle": True, "num_epochs": 1, "drop_remainder": False}
    return make_loader(cfg, "train", data_dir=data_dir, **(args | kw))


def _ids(setup, batches):
    index = setup[4]
    return [index[x.tobytes()] for b in batches for x in b["text"]]


def test_info(setup):
    _, _, info, train, _ = setup
    stats = {k: getattr(info, k) for k in ("feature_std", "pooled_mean", "pooled_variance")}
    assert dataclasses.replace(info, **dict.fromkeys(stats, {})) == DatasetInfo(
        name="synthetic",
        modalities=("text", "audio", "vision"),
        feature_shapes={"text": (3, 16), "audio": (3, 12), "vision": (3, 8)},
        task="classification",
        num_classes=4,
        metric_family="classification",
        split_sizes={"train": N_TRAIN, "valid": 5, "test": 7},
        normalize="none",  # synthetic's default
    )
    # The train statistics, against numpy on the stored train split (every step valid here).
    for m in info.modalities:
        x = train[m].astype(np.float64)  # [N, T, D]
        np.testing.assert_allclose(stats["feature_std"][m], x.reshape(-1, x.shape[-1]).std(0),
                                   rtol=1e-10)
        np.testing.assert_allclose(stats["pooled_mean"][m], x.mean(1).mean(0), rtol=1e-10,
                                   atol=1e-12)
        np.testing.assert_allclose(stats["pooled_variance"][m], x.mean(1).var(0), rtol=1e-10)


def test_batches_have_the_batch_format(setup):
    batches = list(_loader(setup, shuffle=False))
    assert [len(b["label"]) for b in batches] == [4, 4, 4, 4, 4, 3]
    b = batches[0]
    assert set(b) == {"text", "audio", "vision", "lengths", "mask", "label"}
    assert b["text"].shape == (4, 3, 16) and b["text"].dtype == np.float32
    assert b["vision"].shape == (4, 3, 8) and b["vision"].dtype == np.float32
    assert b["lengths"].dtype == np.int32 and (b["lengths"] == 3).all()
    assert b["mask"].dtype == np.float32 and (b["mask"] == 1).all() and b["mask"].shape == (4, 3)
    assert b["label"].dtype == np.int32 and b["label"].shape == (4,)
    # Unshuffled order is the stored order.
    train = setup[3]
    assert _ids(setup, batches) == list(range(N_TRAIN))
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), train["label"])


def test_drop_remainder(setup):
    assert [len(b["label"]) for b in _loader(setup, drop_remainder=True)] == [4] * 5


def test_seeded_shuffle_is_deterministic_and_a_permutation(setup):
    a = _ids(setup, _loader(setup, seed=7))
    assert a == _ids(setup, _loader(setup, seed=7))
    assert sorted(a) == list(range(N_TRAIN)) and a != list(range(N_TRAIN))
    assert a != _ids(setup, _loader(setup, seed=8))


def test_epochs(setup):
    ids = _ids(setup, _loader(setup, batch_size=1, num_epochs=2))
    assert len(ids) == 2 * N_TRAIN
    assert sorted(ids[:N_TRAIN]) == sorted(ids[N_TRAIN:]) == list(range(N_TRAIN))
    forever = iter(_loader(setup, num_epochs=None))
    ids = _ids(setup, [next(forever) for _ in range(20)])
    # Each epoch is batched on its own (no batch spans two epochs): 23 rows in batches of 4 are
    # 5 full batches and one of 3, so 20 batches are 3 epochs (69 rows) plus 2 batches (8 rows).
    assert len(ids) == 3 * N_TRAIN + 8
    for e in range(3):
        assert sorted(ids[e * N_TRAIN:(e + 1) * N_TRAIN]) == list(range(N_TRAIN))


@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_partition_the_split(setup, shuffle):
    shards = [
        _ids(setup, _loader(setup, shuffle=shuffle, shard_index=i, shard_count=3)) for i in range(3)
    ]
    assert sorted(len(s) for s in shards) == [7, 8, 8]
    assert sorted(sum(shards, [])) == list(range(N_TRAIN))  # disjoint and complete
    # drop_remainder also evens out the shards, so every host yields as many batches.
    even = [
        _ids(setup, _loader(setup, batch_size=1, drop_remainder=True, shard_index=i, shard_count=3))
        for i in range(3)
    ]
    assert [len(s) for s in even] == [7, 7, 7] and len(set(sum(even, []))) == 21


def test_get_state_set_state_resumes_the_same_sequence(setup):
    it = iter(_loader(setup, num_epochs=None))
    for _ in range(4):
        next(it)
    state = it.get_state()
    expected = _ids(setup, [next(it) for _ in range(6)])  # crosses an epoch boundary
    resumed = iter(_loader(setup, num_epochs=None))  # a fresh loader, as after a restart
    resumed.set_state(state)
    assert _ids(setup, [next(resumed) for _ in range(6)]) == expected
    # The state is plain JSON bytes, so it can be checkpointed anywhere.
    assert json.loads(state.decode())["last_seen_indices"]


def _data_loader_twin(loader, worker_count=0):
    """A `grain.DataLoader` over the same batches as an in-memory loader: the loader the trainer
    used before the MapDataset iterator (issue 15), whose checkpoints must still resume."""
    import grain

    return grain.DataLoader(data_source=loader._source, sampler=loader._sampler, operations=[],
                            worker_count=worker_count, shard_options=grain.sharding.NoSharding())


def test_in_memory_iterator_is_checkpointed_as_grain_data_loader(setup):
    loader = _loader(setup, num_epochs=None, shard_index=1, shard_count=2)
    ours, theirs = iter(loader), iter(_data_loader_twin(loader))
    assert ours.get_state() == theirs.get_state()  # nothing read yet: -1
    for _ in range(5):  # past an epoch of this shard (11 rows, batches of 4)
        a, b = next(ours), next(theirs)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        assert ours.get_state() == theirs.get_state()
    # Either one's state resumes the other at the same batch.
    state = theirs.get_state()
    following = _ids(setup, [next(theirs) for _ in range(3)])
    resumed = iter(_loader(setup, num_epochs=None, shard_index=1, shard_count=2))
    resumed.set_state(state)
    assert _ids(setup, [next(resumed) for _ in range(3)]) == following
    back = iter(_data_loader_twin(loader))
    back.set_state(resumed.get_state())
    assert _ids(setup, [next(back) for _ in range(2)]) == _ids(setup, [next(resumed)
                                                                       for _ in range(2)])


def test_in_memory_iterator_refuses_another_loaders_state(setup):
    state = iter(_loader(setup, num_epochs=None, seed=7)).get_state()
    other = iter(_loader(setup, num_epochs=None, seed=8))
    with pytest.raises(ValueError, match="does not match this loader: data_source.*seed=7"):
        other.set_state(state)
    workers = json.loads(state.decode()) | {"worker_count": 2}
    with pytest.raises(ValueError, match="worker_count 2 in the checkpoint"):
        other.set_state(json.dumps(workers).encode())


def test_bad_split_and_unknown_dataset(setup, tmp_path):
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        load_split(setup[0], "validation", data_dir=setup[1])
    cfg = ml_collections.ConfigDict({"name": "mnist"})
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*synthetic"):
        prepare(cfg, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="max_len must be an integer >= 0"):
        prepare(
            ml_collections.ConfigDict({"name": "digits", "max_len": -1}), data_dir=str(tmp_path)
        )
    assert os.listdir(tmp_path) == []


def test_build_cli(tmp_path):
    folder = tmp_path / "npz"
    folder.mkdir()
    for split, n in (("train", 5), ("valid", 3), ("test", 3)):
        np.savez(folder / f"{split}.npz", a=np.ones((n, 2, 3)), labels=np.arange(n) % 2)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [
        sys.executable,
        "-m",
        "data_pipelines.build",
        "--dataset=npz",
        f"--manual_dir={folder}",
        f"--data_dir={tmp_path / 'tfds'}",
        "--max_len=4",
    ]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout[out.stdout.index("{") :])
    assert info["feature_shapes"] == {"a": [4, 3]} and info["split_sizes"]["train"] == 5
    # The trainer's prepare() with the same dataset block reuses that build.
    cfg = ml_collections.ConfigDict({"name": "npz", "path": str(folder), "max_len": 4})
    got = load_split(cfg, "train", data_dir=str(tmp_path / "tfds"))
    np.testing.assert_array_equal(got["lengths"], np.full((5, 1), 2, np.int32))
    assert len(os.listdir(tmp_path / "tfds" / "npz")) == 1


def test_streaming_loader_reads_the_same_records(setup):
    """in_memory=False streams TFDS records through grain; same rows, same batch format."""
    cfg = setup[0].copy_and_resolve_references()
    with cfg.unlocked():
        cfg.in_memory = False
    streamed = list(make_loader(cfg, "train", data_dir=setup[1], batch_size=4, seed=7,
                                shuffle=False, num_epochs=1, drop_remainder=False))
    in_memory = list(_loader(setup, shuffle=False))
    assert sorted(_ids(setup, streamed)) == sorted(_ids(setup, in_memory)) == list(range(N_TRAIN))
    for a, b in zip(streamed, in_memory):
        assert {k: (v.shape, v.dtype) for k, v in a.items()} == {
            k: (v.shape, v.dtype) for k, v in b.items()}
