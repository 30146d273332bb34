"""The evaluation that `train` runs at the end and `evaluate` re-runs: metrics on a whole split."""

import jax.numpy as jnp

from modalimmune_jax import metrics
from modalimmune_jax.evaluation import make_predict_fn, predict_split
from modalimmune_jax.interventions import drop_modalities


class Evaluator:
    """Prediction functions compiled once per run, shared by every split and condition."""

    def __init__(self, apply_fn, info, *, batch_size, put_fn):
        self.info = info
        self.batch_size = batch_size
        self.put_fn = put_fn
        self.clean_fn = make_predict_fn(apply_fn)

        def remove(batch, keep, set_mask):
            # set_mask is an array, not a Python bool, so both protocols share one compilation.
            zero = drop_modalities(batch, keep, modalities=info.modalities, set_mask=False)
            told = drop_modalities(batch, keep, modalities=info.modalities, set_mask=True)
            return {**zero, "mask": jnp.where(set_mask > 0, told["mask"], zero["mask"])}

        self.missing_fn = make_predict_fn(apply_fn, remove)

    def metrics(self, preds, arrays) -> dict:
        return metrics.compute_metrics(self.info.metric_family, preds, arrays["label"])

    def full(self, params, arrays) -> dict:
        """Metrics with every modality present."""
        preds = predict_split(self.clean_fn, params, arrays, batch_size=self.batch_size,
                              put_fn=self.put_fn)
        return self.metrics(preds, arrays)

    def missing(self, params, arrays, keep, *, protocol: str) -> dict:
        """Metrics with the modalities where ``keep`` ``[M]`` is 0 removed under `protocol`."""
        if protocol not in ("zero", "mask"):
            raise ValueError(f"unknown missing-modality protocol {protocol!r}")
        args = (jnp.asarray(keep, jnp.float32), jnp.float32(protocol == "mask"))
        preds = predict_split(self.missing_fn, params, arrays, batch_size=self.batch_size,
                              args=args, put_fn=self.put_fn)
        return self.metrics(preds, arrays)

    def primary(self, results: dict) -> float:
        name, _ = metrics.primary_metric(self.info.metric_family)
        return float(results[name])

    def is_better(self, new: float, best: float | None) -> bool:
        _, higher_is_better = metrics.primary_metric(self.info.metric_family)
        if best is None:
            return True
        return new > best if higher_is_better else new < best


def final_evaluation(evaluator: Evaluator, params, arrays) -> dict:
    """The ``eval.json`` body for one split: ``full`` now; the robustness keys join it (§7)."""
    return {"full": evaluator.full(params, arrays)}
