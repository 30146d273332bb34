"""The device mesh and putting host batches on it (DESIGN.md §8: data parallel over a mesh).

One 1-D ``data`` mesh over every device of every process: batches are sharded on it, params and
optimizer state replicated, and GSPMD inserts the cross-device reductions (8 devices == 1 device,
tests/test_distributed.py). `make_put_fn` puts a batch in one call (packed in one array with a
`BatchPacking`); `prefetch` reads and puts batches ahead of the step, in the loop or in a thread.
"""

import collections
import math
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D data-parallel mesh over every device of every process."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def data_sharding(mesh) -> NamedSharding:
    """Batch axis sharded on ``data``."""
    return NamedSharding(mesh, P("data"))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


class BatchPacking(NamedTuple):
    """A host batch as one int32 buffer ``[B, F]``: one device put per batch, unpacked in the step.

    `jax.device_put` costs the host ~0.07 ms per array whatever its size: 0.41 ms for the six
    arrays of a digits batch, against 0.12 ms for the same bytes in one buffer (issue 15). On a
    2-core host the input thread's put takes that CPU from the step's XLA threads. Every field
    of the batch format (DESIGN.md §2) is 4 bytes wide (float32 or int32); each travels bit for
    bit through an int32 view, and `unpack` bitcasts it back (same width: exact on every backend,
    NaN payloads included).

    Attributes:
      keys: the batch's keys, in buffer order.
      row_shapes: per key, one example's shape (the batch's shape without its leading ``B``).
      dtypes: per key, ``"float32"`` or ``"int32"``.
    """

    keys: tuple[str, ...]
    row_shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, arrays: dict) -> "BatchPacking":
        """The packing of batches shaped like `arrays` (any leading axis: a batch or a split)."""
        for k, v in arrays.items():
            if np.dtype(v.dtype) not in (np.float32, np.int32):
                raise ValueError(f"batch[{k!r}] has dtype {v.dtype}; the batch format has "
                                 "float32 and int32 fields only")
        return cls(tuple(arrays), tuple(tuple(v.shape[1:]) for v in arrays.values()),
                   tuple(np.dtype(v.dtype).name for v in arrays.values()))

    @property
    def width(self) -> int:
        """F: int32 words per example."""
        return sum(math.prod(s) for s in self.row_shapes)

    def pack(self, batch: dict) -> np.ndarray:
        """Host batch (``{key: [B, *row_shape]}``) -> ``[B, F] int32``; a mismatch names the key."""
        if set(batch) != set(self.keys):
            raise ValueError(f"batch keys {sorted(batch)} differ from the packing's "
                             f"{sorted(self.keys)}")
        rows = len(batch[self.keys[0]])
        out = np.empty((rows, self.width), np.int32)
        offset = 0
        for key, shape, dtype in zip(self.keys, self.row_shapes, self.dtypes):
            value = np.asarray(batch[key])
            if value.shape != (rows, *shape) or value.dtype.name != dtype:
                raise ValueError(f"batch[{key!r}] is {value.dtype.name}{list(value.shape)}; "
                                 f"expected {dtype}{[rows, *shape]}")
            size = math.prod(shape)
            out[:, offset:offset + size] = value.reshape(rows, size).view(np.int32)
            offset += size
        return out

    def unpack(self, packed: jax.Array) -> dict:
        """``[B, F] int32`` -> the batch dict (jit-able; the inverse of `pack`, bit for bit)."""
        batch, offset = {}, 0
        for key, shape, dtype in zip(self.keys, self.row_shapes, self.dtypes):
            size = math.prod(shape)
            value = packed[:, offset:offset + size].reshape(packed.shape[0], *shape)
            batch[key] = (value if dtype == "int32" else
                          jax.lax.bitcast_convert_type(value, jnp.float32))
            offset += size
        return batch


def make_put_fn(sharding: NamedSharding,
                packing: BatchPacking | None = None) -> Callable[[dict], dict | jax.Array]:
    """Host batch (this process's rows) -> global jax arrays sharded like `sharding`.

    One call for the whole batch pytree, not one per key: `jax.device_put` with one process,
    `jax.make_array_from_process_local_data` with several (which assembles the global array from
    each process's rows). With a `packing`, the batch goes as one ``[B, F] int32`` array
    (`BatchPacking`), for a step that unpacks it.
    """

    def put(batch):
        host = packing.pack(batch) if packing is not None else {
            k: np.asarray(v) for k, v in batch.items()}
        if jax.process_count() == 1:
            return jax.device_put(host, sharding)
        return jax.make_array_from_process_local_data(
            jax.tree.map(lambda _: sharding, host), host)

    return put


def make_eval_put_fn(mesh) -> Callable[[dict], dict]:
    """Host batch -> device arrays for evaluation, where every process holds the *whole* batch.

    Evaluation reads whole splits on every process and fetches the predictions back to the host.
    With one process the batch is sharded on ``data`` (data-parallel prediction). With several, a
    batch-sharded prediction would span other processes' devices and could not be fetched, so the
    batch is replicated instead: each device predicts the whole batch (redundant work, same
    numbers). A gather of the predictions (``multihost_utils.process_allgather``) in
    ``evaluation.predict_split`` would keep multi-host evaluation data-parallel.
    """
    sharding = data_sharding(mesh) if jax.process_count() == 1 else replicated(mesh)
    return make_put_fn(sharding)


def prefetch(iterator: Iterator, put: Callable, *, size: int = 2) -> Iterator:
    """Yields ``put(batch)`` for each batch of `iterator`; with ``size > 0``, from a thread.

    ``size = 0`` reads and puts each batch when the consumer asks for it. Dispatch is
    asynchronous, so a loop that dispatches step t and then asks for batch t+1 already reads
    and puts it while step t computes. ``size > 0`` does the reading (grain's read, the device
    put) in a thread, `size` batches ahead, which also covers the host's syncs (a log record,
    an evaluation); on a 2-core host its wake-ups and GIL hand-offs cost more than that
    (issue 15). Exceptions in the reader reach the consumer at the batch where they happened.
    Closing the generator (or garbage-collecting it) stops the reader.

    When `iterator` has ``get_state``, `prefetch` yields ``(get_state, batch)`` pairs:
    ``get_state()`` returns the iterator's state just after that batch, valid until the next
    batch is asked for (the live iterator may have read ahead; a checkpoint saves the state of
    the batches the loop consumed). Read in the loop, the state is only serialized when it is
    asked for (a checkpoint), not once per batch.
    """
    has_state = hasattr(iterator, "get_state")
    if size == 0:
        return _inline(iterator, put, has_state)
    return _threaded(iterator, put, size, has_state)


def _inline(iterator, put, has_state):
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        yield (iterator.get_state, put(batch)) if has_state else put(batch)


def _threaded(iterator, put, size, has_state):
    queue = collections.deque()
    ready = threading.Semaphore(0)
    free = threading.Semaphore(size)
    stop = threading.Event()

    def reader():
        try:
            while not stop.is_set():
                free.acquire()
                if stop.is_set():
                    break
                batch = next(iterator)
                state = iterator.get_state() if has_state else None
                queue.append(("ok", (lambda state=state: state, put(batch))))
                ready.release()
        except StopIteration:
            queue.append(("end", None))
            ready.release()
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer
            queue.append(("error", e))
            ready.release()

    thread = threading.Thread(target=reader, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ready.acquire()
            kind, item = queue.popleft()
            if kind == "end":
                return
            if kind == "error":
                raise item
            free.release()
            yield item if has_state else item[1]
    finally:
        stop.set()
        free.release()
        thread.join(timeout=10)
