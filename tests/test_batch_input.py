"""The trainer's input path: one packed array per batch (`mesh.BatchPacking`) and `mesh.prefetch`.

The packed batch must unpack, inside jit, to the host batch bit for bit: NaN payloads, -0.0 and
negative integers included (an int32 label of -1 is a NaN pattern as float32).
"""

import jax
import numpy as np
import pytest

from modalimmune_jax.training import mesh as mesh_lib


def _batch(rows=4):
    rng = np.random.default_rng(0)
    text = rng.normal(size=(rows, 3, 5)).astype(np.float32)
    bits = text.view(np.int32)
    bits[0, 0, :3] = [0x7F800001, 0x7FC00123, np.int32(-0x7FFFFFFF)]  # signalling/quiet NaN
    text[1, 0, :2] = [-0.0, np.inf]
    return {
        "text": text,
        "audio": rng.normal(size=(rows, 7)).astype(np.float32),
        "lengths": np.array([[3, 1]] * rows, np.int32),
        "mask": np.ones((rows, 2), np.float32),
        "label": np.array([-1, 0, 2**31 - 1, -(2**31)], np.int32)[:rows],
    }


def test_packed_batch_unpacks_bit_for_bit_inside_jit():
    batch = _batch()
    packing = mesh_lib.BatchPacking.of(batch)
    assert packing.width == 15 + 7 + 2 + 2 + 1
    mesh = mesh_lib.make_mesh()
    packed = mesh_lib.make_put_fn(mesh_lib.data_sharding(mesh), packing)(batch)
    assert packed.shape == (4, packing.width) and packed.dtype == np.int32
    out = jax.device_get(jax.jit(packing.unpack)(packed))
    assert set(out) == set(batch)
    for key, value in batch.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape, key
        np.testing.assert_array_equal(out[key].view(np.int32), value.view(np.int32), err_msg=key)


def test_packing_names_the_field_that_does_not_fit():
    packing = mesh_lib.BatchPacking.of(_batch())
    bad = _batch() | {"audio": np.zeros((4, 6), np.float32)}
    with pytest.raises(ValueError, match=r"batch\['audio'\] is float32\[4, 6\]; expected "
                                         r"float32\[4, 7\]"):
        packing.pack(bad)
    with pytest.raises(ValueError, match=r"batch\['label'\] is int64"):
        packing.pack(_batch() | {"label": np.zeros(4, np.int64)})
    with pytest.raises(ValueError, match="batch keys .* differ"):
        packing.pack({k: v for k, v in _batch().items() if k != "mask"})
    with pytest.raises(ValueError, match=r"batch\['label'\] has dtype float64"):
        mesh_lib.BatchPacking.of(_batch() | {"label": np.zeros(4)})


class _Counter:
    """Batches 0, 1, ..., n-1 and a state that counts the batches read."""

    def __init__(self, n):
        self.read, self.n = 0, n

    def __next__(self):
        if self.read == self.n:
            raise StopIteration
        self.read += 1
        return {"x": np.full((2,), self.read - 1, np.int32)}

    def get_state(self):
        return str(self.read).encode()


@pytest.mark.parametrize("size", [0, 2])
def test_prefetch_yields_each_batch_with_the_state_after_it(size):
    got = [(int(batch["x"][0]), get_state())
           for get_state, batch in mesh_lib.prefetch(_Counter(5), lambda b: b, size=size)]
    assert got == [(i, str(i + 1).encode()) for i in range(5)]


@pytest.mark.parametrize("size", [0, 2])
def test_prefetch_hands_a_reader_error_to_the_consumer_at_its_batch(size):
    class Failing(_Counter):
        def __next__(self):
            if self.read == 2:
                raise OSError("disk gone")
            return super().__next__()

    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for _, batch in mesh_lib.prefetch(Failing(5), lambda b: b, size=size):
            seen.append(int(batch["x"][0]))
    assert seen == [0, 1]
