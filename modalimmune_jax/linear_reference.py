"""The linear reference row of every results table (DESIGN.md §4): linear models on pooled features.

scikit-learn's ``LogisticRegression`` (``Ridge`` for regression; for multilabel tasks such as
IEMOCAP one binary logistic regression per label) on the time-pooled features of the kept
modalities, each feature standardized with ``StandardScaler`` fitted on the training split, scored
with `metrics.compute_metrics`, exactly as the deep models are. It shows what a model that cannot
be hurt by feature scales, and has no capacity to overfit, reaches on the same inputs; a deep model
below it has a problem with its inputs or its training (issue 14).

Pooling: the mean over the valid timesteps ``t < max(lengths, 1)``, the reconstruction targets'
convention (``losses.pooled_features``); vectors pass through. ``pooling="flatten"`` instead
concatenates every timestep (padding included, as zeros), the stronger reference for fixed-length
sequences such as the digits' image rows.

Everything runs on host in numpy and sklearn (seconds on digits); nothing here touches JAX.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from modalimmune_jax import metrics
from modalimmune_jax.robustness import missing_conditions

POOLINGS = ("mean", "flatten")


def _kept(modalities: Sequence[str], keep) -> list[int]:
    """Indices of the kept modalities; `keep` is None (all), names, or an ``[M]`` 0/1 vector."""
    if keep is None:
        return list(range(len(modalities)))
    keep = list(keep)
    if keep and all(isinstance(k, str) for k in keep):
        unknown = sorted(set(keep) - set(modalities))
        if unknown:
            raise ValueError(f"keep: unknown modalities {unknown}; expected some of {modalities}")
        return [i for i, m in enumerate(modalities) if m in keep]
    if len(keep) != len(modalities):
        raise ValueError(f"keep: expected {len(modalities)} entries, got {len(keep)}")
    return [i for i, k in enumerate(keep) if k > 0]


def design_matrix(arrays: Mapping[str, np.ndarray], *, modalities: Sequence[str], keep=None,
                  pooling: str = "mean") -> np.ndarray:
    """The kept modalities' pooled features side by side (module docstring).

    Args:
      arrays: a split in the batch format: each modality ``[N, T_m, D_m]`` or ``[N, D_m]``, and
        ``"lengths"`` ``[N, M]`` int (optional; without it every step is valid).
      modalities: the M names, in the column order of ``lengths``.
      keep: None (all), a list of names, or an ``[M]`` 0/1 vector.
      pooling: "mean" | "flatten".

    Returns:
      ``[N, sum_m D_m]`` (mean) or ``[N, sum_m T_m D_m]`` (flatten) float64.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    cols = []
    for i in _kept(modalities, keep):
        x = np.asarray(arrays[modalities[i]], np.float64)
        if x.ndim == 3 and pooling == "flatten":
            x = x.reshape(len(x), -1)  # [N, T, D] -> [N, T*D]
        elif x.ndim == 3:
            lengths = (np.asarray(arrays["lengths"])[:, i] if "lengths" in arrays
                       else np.full(len(x), x.shape[1]))
            w = (np.arange(x.shape[1])[None] < np.maximum(lengths, 1)[:, None])[..., None]
            x = (x * w).sum(axis=1) / w.sum(axis=1)  # [N, T, D] -> [N, D]
        cols.append(x)
    if not cols:
        raise ValueError("keep: no modality kept")
    return np.concatenate(cols, axis=1)


def _fit_predict(x_train, y_train, x_test, *, task: str, C: float, alpha: float,
                 max_iter: int) -> np.ndarray:
    """Test outputs in the form `metrics.compute_metrics` takes for `task`."""
    # Imported here: sklearn's estimators take a while to import and only this path needs them.
    from sklearn.linear_model import LogisticRegression, Ridge  # noqa: PLC0415

    if task == "regression":
        return Ridge(alpha=alpha).fit(x_train, y_train).predict(x_test)  # [N]
    if task == "classification":
        return LogisticRegression(C=C, max_iter=max_iter).fit(x_train, y_train).predict(x_test)
    if task == "multilabel":
        logits = np.zeros((len(x_test), y_train.shape[1], 2))  # [N, K, 2]
        for k in range(y_train.shape[1]):
            yk = y_train[:, k]
            if np.unique(yk).size < 2:  # one class only in train: predict it
                logits[:, k, int(yk[0])] = 1.0
                continue
            proba = LogisticRegression(C=C, max_iter=max_iter).fit(x_train, yk).predict_proba(
                x_test)  # [N, 2], columns = classes 0 and 1
            logits[:, k] = np.log(np.clip(proba, 1e-12, None))
        return logits
    raise ValueError(f"unknown task {task!r}")


def linear_reference(train_arrays: Mapping[str, np.ndarray],
                     test_arrays: Mapping[str, np.ndarray], *, modalities: Sequence[str],
                     task: str, metric_family: str, keep=None, pooling: str = "mean",
                     C: float = 1.0, alpha: float = 1.0, max_iter: int = 2000) -> dict[str, float]:
    """Fits the linear reference on `train_arrays` and scores it on `test_arrays`.

    Args:
      train_arrays, test_arrays: splits in the batch format (``data_pipelines.load_split``):
        each modality ``[N, T_m, D_m]`` or ``[N, D_m]``, ``"lengths"`` ``[N, M]`` int, ``"label"``
        ``[N]`` int (classification), ``[N]`` float (regression) or ``[N, K]`` int (multilabel).
      modalities: the M names, in the column order of ``lengths``.
      task: "classification" | "regression" | "multilabel" (``DatasetInfo.task``).
      metric_family: ``DatasetInfo.metric_family``, for `metrics.compute_metrics`.
      keep: the modalities the model sees: None (all), a list of names, or an ``[M]`` 0/1 vector
        (as `robustness.missing_conditions` gives). A dropped modality is left out of the fit, so
        this is the per-condition *specialist*, not a full model with an input removed.
      pooling: "mean" (DESIGN.md's reference) or "flatten" (module docstring).
      C: inverse L2 strength of the logistic regressions (sklearn's default 1.0).
      alpha: the Ridge penalty (sklearn's default 1.0).
      max_iter: lbfgs iterations of the logistic regressions.

    Returns:
      `metrics.compute_metrics(metric_family, ...)` on the test split: a dict of floats.
    """
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    x_train = design_matrix(train_arrays, modalities=modalities, keep=keep, pooling=pooling)
    x_test = design_matrix(test_arrays, modalities=modalities, keep=keep, pooling=pooling)
    scaler = StandardScaler().fit(x_train)
    outputs = _fit_predict(scaler.transform(x_train), np.asarray(train_arrays["label"]),
                           scaler.transform(x_test), task=task, C=C, alpha=alpha,
                           max_iter=max_iter)
    return metrics.compute_metrics(metric_family, outputs, np.asarray(test_arrays["label"]))


def linear_reference_conditions(train_arrays: Mapping[str, np.ndarray],
                                test_arrays: Mapping[str, np.ndarray], *,
                                modalities: Sequence[str], task: str, metric_family: str,
                                **kwargs: Any) -> dict[str, Any]:
    """The linear reference on every modality and per missing condition (the specialists).

    Args:
      train_arrays, test_arrays, modalities, task, metric_family: as `linear_reference`.
      **kwargs: `linear_reference`'s ``pooling``, ``C``, ``alpha``, ``max_iter``.

    Returns:
      In eval.json's layout: ``full`` (every modality), ``missing`` (per condition of
      `robustness.missing_conditions`, named by the kept modalities: a linear model fitted on
      those only) and ``missing_avg`` (the mean of each metric over the conditions).
    """
    def fit(keep):
        return linear_reference(train_arrays, test_arrays, modalities=modalities, task=task,
                                metric_family=metric_family, keep=keep, **kwargs)

    full = fit(None)
    missing = {name: fit(keep) for name, keep in missing_conditions(modalities)}
    # One modality: no condition, so no average (null in JSON, not NaN).
    avg = ({k: float(np.mean([v[k] for v in missing.values()])) for k in full}
           if missing else None)
    return {"full": full, "missing": missing, "missing_avg": avg}
