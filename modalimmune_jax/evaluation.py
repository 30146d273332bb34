"""Batched prediction over a whole split, with an optional jit-able batch transform.

The transform (missing modalities, corruption) runs inside the jitted prediction, and its arguments
are arrays, so every condition of the robustness protocol reuses one compiled function.
"""

from collections.abc import Callable, Mapping

import jax
import numpy as np


def make_predict_fn(apply_fn: Callable, transform: Callable | None = None) -> Callable:
    """Returns jitted ``predict(params, batch, *transform_args) -> preds``.

    Args:
      apply_fn: ``apply(params, batch) -> dict`` with a ``"preds"`` entry.
      transform: optional ``transform(batch, *transform_args) -> batch``, pure and jit-able.
    """

    def predict(params, batch, *args):
        if transform is not None:
            batch = transform(batch, *args)
        return apply_fn(params, batch)["preds"]

    return jax.jit(predict)


def iterate_batches(arrays: Mapping[str, np.ndarray], batch_size: int):
    """Yields ``(batch, n_valid)``; the last batch is padded (by repeating row 0) to `batch_size`.

    Padding keeps every batch the same shape, so the prediction compiles once.
    """
    n = len(arrays["label"])
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        n_valid = len(idx)
        if n_valid < batch_size:
            idx = np.concatenate([idx, np.zeros(batch_size - n_valid, idx.dtype)])
        yield {k: v[idx] for k, v in arrays.items()}, n_valid


def predict_split(predict_fn: Callable, params, arrays: Mapping[str, np.ndarray], *,
                  batch_size: int, args=(), key=None,
                  put_fn: Callable = lambda b: b) -> np.ndarray:
    """Predictions for every row of `arrays` (dict of ``[N, ...]``), as numpy ``[N, ...]``.

    Args:
      predict_fn: from :func:`make_predict_fn`.
      params: the params pytree.
      arrays: the split, one ``[N, ...]`` array per batch key.
      batch_size: prediction batch size (a multiple of the device count when sharded).
      args: extra arrays for the transform (e.g. a keep vector).
      key: optional PRNG key; batch i gets ``fold_in(key, i)`` as the transform's last argument,
        so stochastic conditions differ across batches yet repeat exactly across runs.
      put_fn: places a host batch on devices (e.g. a ``jax.device_put`` with a sharding).
    """
    outs = []
    for i, (batch, n_valid) in enumerate(iterate_batches(arrays, batch_size)):
        extra = args if key is None else (*args, jax.random.fold_in(key, i))
        preds = predict_fn(params, put_fn(batch), *extra)
        outs.append(np.asarray(jax.device_get(preds))[:n_valid])
    return np.concatenate(outs, axis=0)
