"""Task metrics, following the field's published evaluation code exactly (DESIGN.md §5).

Everything here runs on host: numpy (or anything `np.asarray` accepts) in, plain Python floats out,
so the results drop straight into `eval.json`. Accuracies and F1 scores are fractions in [0, 1].
Unlike MMSA and MulT we do not round to 4 decimals; that is left to the tables.

- `sentiment_metrics`: CMU-MOSI / MOSEI regression, MMSA's `metricsTop.__eval_mosei_regression`.
- `iemocap_metrics`: IEMOCAP 4 x binary emotions, MulT's `eval_iemocap`, plus 4-class accuracy.
- `classification_metrics`, `regression_metrics`: generic tasks (synthetic, digits, npz).
- `compute_metrics` / `primary_metric`: dispatch on the task family, and the model-selection metric.
"""

from collections.abc import Sequence

import jax
import numpy as np
from sklearn.metrics import accuracy_score, f1_score

FAMILIES = ("classification", "regression", "sentiment", "iemocap")
IEMOCAP_EMOTIONS = ("Neutral", "Happy", "Sad", "Angry")


def _flat(x: jax.typing.ArrayLike) -> np.ndarray:
    # MMSA flattens with `.view(-1)`, so a [B, 1] regression head and [B] labels line up.
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    # zero_division=0 gives the same value as sklearn's default "warn" (an undefined per-class F1
    # counts as 0), without flooding the logs; argument order (y_true, y_pred) as in MMSA and MulT.
    return float(f1_score(y_true, y_pred, average="weighted", zero_division=0))


def pearson_corr(preds: jax.typing.ArrayLike, labels: jax.typing.ArrayLike) -> float:
    """Pearson correlation of two flat vectors, 0.0 where it is undefined.

    ``r = cov(p, y) / (std(p) std(y))`` as ``np.corrcoef(p, y)[0, 1]``. If either side is exactly
    constant (or there are fewer than 2 samples) r is 0/0; we return 0.0 instead of NaN, so a
    collapsed model that predicts a constant scores "no correlation" and tables stay finite.

    Args:
      preds: ``[N]`` (or ``[N, 1]``) float.
      labels: ``[N]`` (or ``[N, 1]``) float.

    Returns:
      Python float in [-1, 1].
    """
    p, y = _flat(preds), _flat(labels)
    if p.size < 2 or np.all(p == p[0]) or np.all(y == y[0]):
        return 0.0
    return float(np.corrcoef(p, y)[0, 1])


def _multiclass_acc(preds: np.ndarray, labels: np.ndarray, bound: float) -> float:
    # np.round rounds half to even (0.5 -> 0, 1.5 -> 2, 2.5 -> 2), exactly as MMSA's
    # `__multiclass_acc`; both sides are clipped first, so |x| > bound lands in the end class.
    p = np.round(np.clip(preds, -bound, bound))
    y = np.round(np.clip(labels, -bound, bound))
    return float(np.mean(p == y))


def sentiment_metrics(
    preds: jax.typing.ArrayLike, labels: jax.typing.ArrayLike
) -> dict[str, float]:
    """CMU-MOSI / MOSEI sentiment metrics, as MMSA's ``metricsTop.__eval_mosei_regression``.

    - ``Has0_acc_2``, ``Has0_F1_score``: binary task with both sides split at ``>= 0`` (neutral
      counts as positive), all samples.
    - ``Non0_acc_2``, ``Non0_F1_score``: samples whose label is exactly 0 are dropped, both sides
      split at ``> 0``. NaN if every label is 0 (MMSA would crash).
    - F1 is ``sklearn.metrics.f1_score(y_true, y_pred, average="weighted")``.
    - ``Mult_acc_5`` / ``Mult_acc_7``: clip both sides to [-2, 2] / [-3, 3], then ``np.round``
      (half to even), then exact-match accuracy.
    - ``MAE`` = ``mean |p - y|``; ``Corr`` = Pearson r, 0.0 (not NaN) if either side is constant.

    Args:
      preds: ``[N]`` or ``[N, 1]`` float, predicted sentiment in roughly [-3, 3].
      labels: ``[N]`` or ``[N, 1]`` float, gold sentiment in [-3, 3].

    Returns:
      dict of Python floats with exactly the 8 keys above; accuracies and F1 in [0, 1].

    Reference: DESIGN.md §5; MMSA ``src/MMSA/utils/metricsTop.py``.
    """
    p, y = _flat(preds), _flat(labels)
    has0_p, has0_y = p >= 0, y >= 0
    nz = y != 0
    non0_p, non0_y = p[nz] > 0, y[nz] > 0
    if nz.any():
        non0_acc, non0_f1 = float(accuracy_score(non0_y, non0_p)), _weighted_f1(non0_y, non0_p)
    else:
        non0_acc = non0_f1 = float("nan")
    return {
        "Has0_acc_2": float(accuracy_score(has0_y, has0_p)),
        "Has0_F1_score": _weighted_f1(has0_y, has0_p),
        "Non0_acc_2": non0_acc,
        "Non0_F1_score": non0_f1,
        "Mult_acc_5": _multiclass_acc(p, y, 2.0),
        "Mult_acc_7": _multiclass_acc(p, y, 3.0),
        "MAE": float(np.mean(np.abs(p - y))),
        "Corr": pearson_corr(p, y),
    }


def iemocap_metrics(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    label_names: Sequence[str] = IEMOCAP_EMOTIONS,
) -> dict[str, float]:
    """IEMOCAP metrics: MulT's per-emotion binary scores plus 4-class accuracy.

    Per emotion k (MulT ``eval_iemocap``): ``pred_k = argmax_c logits[:, k, c]``;
    ``<Name>_acc`` = accuracy and ``<Name>_f1`` = weighted F1 (sklearn, ``(y_true, y_pred)``).
    ``avg_acc`` / ``avg_f1`` are their unweighted means over the K emotions.

    4-class: only samples with exactly one positive label take part; the predicted class is
    ``argmax_k (logits[:, k, 1] - logits[:, k, 0])``, the emotion the model is most sure is present.
    ``acc4_weighted`` is plain accuracy over those samples (the "weighted accuracy" of the IEMOCAP
    literature) and ``acc4_unweighted`` the mean per-class recall over the classes present in the
    gold labels (sklearn's ``balanced_accuracy_score``). Both are NaN if no sample has exactly one
    label.

    Args:
      logits: ``[N, K, 2]`` float (``[N, 2K]`` is reshaped, like MulT's ``view(-1, 4, 2)``).
      labels: ``[N, K]`` int in {0, 1}.
      label_names: the K emotion names, in column order.

    Returns:
      dict of Python floats: ``<Name>_acc``, ``<Name>_f1`` for each name, ``avg_acc``, ``avg_f1``,
      ``acc4_weighted``, ``acc4_unweighted``.

    Reference: DESIGN.md §5; MulT ``src/eval_metrics.py``.
    """
    k = len(label_names)
    logits = np.asarray(logits, dtype=np.float64).reshape(-1, k, 2)
    labels = np.asarray(labels).reshape(-1, k).astype(np.int64)
    preds = np.argmax(logits, axis=-1)  # [N, K]
    out: dict[str, float] = {}
    for i, name in enumerate(label_names):
        out[f"{name}_acc"] = float(accuracy_score(labels[:, i], preds[:, i]))
        out[f"{name}_f1"] = _weighted_f1(labels[:, i], preds[:, i])
    out["avg_acc"] = float(np.mean([out[f"{n}_acc"] for n in label_names]))
    out["avg_f1"] = float(np.mean([out[f"{n}_f1"] for n in label_names]))
    single = labels.sum(axis=1) == 1
    if single.any():
        y4 = np.argmax(labels[single], axis=1)
        p4 = np.argmax(logits[single, :, 1] - logits[single, :, 0], axis=1)
        out["acc4_weighted"] = float(accuracy_score(y4, p4))
        out["acc4_unweighted"] = _balanced_accuracy(y4, p4)
    else:
        out["acc4_weighted"] = out["acc4_unweighted"] = float("nan")
    return out


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    # Mean recall over the classes present in y_true; sklearn warns (harmlessly) when y_pred holds a
    # class absent from y_true, which is routine on small evaluation sets.
    classes = np.unique(y_true)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in classes]))


def classification_metrics(
    logits_or_preds: jax.typing.ArrayLike, labels: jax.typing.ArrayLike
) -> dict[str, float]:
    """Single-label classification: accuracy, weighted F1 and macro F1 (sklearn).

    Args:
      logits_or_preds: ``[N, C]`` float logits (argmax taken) or ``[N]`` int predicted classes.
      labels: ``[N]`` int gold classes.

    Returns:
      dict of Python floats ``acc``, ``f1_weighted``, ``f1_macro``, all in [0, 1]. F1 averages run
      over the classes seen in labels or predictions, sklearn's default.
    """
    out = np.asarray(logits_or_preds)
    preds = np.argmax(out, axis=-1) if out.ndim == 2 else out.reshape(-1)
    preds = preds.astype(np.int64)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    return {
        "acc": float(accuracy_score(y, preds)),
        "f1_weighted": _weighted_f1(y, preds),
        "f1_macro": float(f1_score(y, preds, average="macro", zero_division=0)),
    }


def regression_metrics(
    preds: jax.typing.ArrayLike, labels: jax.typing.ArrayLike
) -> dict[str, float]:
    """Scalar regression: MAE, MSE, Pearson r, R², and the MAE of the mean predictor.

    ``R2 = 1 - sum (y - p)^2 / sum (y - mean y)^2``; for constant labels it follows sklearn's
    ``r2_score`` (1.0 for a perfect fit, else 0.0). ``Corr`` is 0.0 if either side is constant.
    ``mean_baseline_MAE = mean |y - mean(y)|`` uses the label mean *of the evaluated set itself*
    (an oracle constant), so it is the bar any useful model must clear on that set.

    Args:
      preds: ``[N]`` or ``[N, 1]`` float.
      labels: ``[N]`` or ``[N, 1]`` float.

    Returns:
      dict of Python floats ``MAE``, ``MSE``, ``Corr``, ``R2``, ``mean_baseline_MAE``.
    """
    p, y = _flat(preds), _flat(labels)
    ss_res = float(np.sum((y - p) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot > 0:
        r2 = 1.0 - ss_res / ss_tot
    else:
        r2 = 1.0 if ss_res == 0 else 0.0
    return {
        "MAE": float(np.mean(np.abs(p - y))),
        "MSE": float(np.mean((p - y) ** 2)),
        "Corr": pearson_corr(p, y),
        "R2": r2,
        "mean_baseline_MAE": float(np.mean(np.abs(y - y.mean()))),
    }


def compute_metrics(
    family: str, outputs: jax.typing.ArrayLike, labels: jax.typing.ArrayLike
) -> dict[str, float]:
    """Metrics for one task family.

    Args:
      family: ``"classification"`` (outputs ``[N, C]`` logits or ``[N]`` preds, labels ``[N]`` int),
        ``"regression"`` / ``"sentiment"`` (outputs and labels ``[N]`` or ``[N, 1]`` float), or
        ``"iemocap"`` (outputs ``[N, K, 2]`` logits, labels ``[N, K]`` int).
      outputs: the model's outputs on the evaluated set, concatenated over batches.
      labels: the gold labels, aligned with outputs.

    Returns:
      dict of Python floats, as the family's function above.

    Raises:
      ValueError: on an unknown family.
    """
    fns = {
        "classification": classification_metrics,
        "regression": regression_metrics,
        "sentiment": sentiment_metrics,
        "iemocap": iemocap_metrics,
    }
    if family not in fns:
        raise ValueError(f"unknown task family {family!r}; expected one of {FAMILIES}")
    return fns[family](outputs, labels)


# The columns of the field's missing-modality tables (MMSA / MulT / classification papers), the
# first being each family's headline; and the metrics where lower is better.
TABLE_METRICS = {"classification": ("acc",), "sentiment": ("Non0_acc_2", "MAE"),
                 "iemocap": ("avg_acc",), "regression": ("MAE",)}
LOWER_IS_BETTER = ("MAE",)


def primary_metric(family: str) -> tuple[str, bool]:
    """The metric used for model selection on the validation split, and whether higher is better.

    classification -> ``("acc", True)``; regression -> ``("MAE", False)``; iemocap ->
    ``("avg_acc", True)``; sentiment -> ``("MAE", False)``: MMSA selects its checkpoint on the
    validation loss, which for its L1-trained regressors is the MAE, so we do the same rather than
    select on a thresholded accuracy.

    Raises:
      ValueError: on an unknown family.
    """
    table = {
        "classification": ("acc", True),
        "regression": ("MAE", False),
        "sentiment": ("MAE", False),
        "iemocap": ("avg_acc", True),
    }
    if family not in table:
        raise ValueError(f"unknown task family {family!r}; expected one of {FAMILIES}")
    return table[family]
