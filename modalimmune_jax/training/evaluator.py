"""The evaluation that `train` runs at the end and `evaluate` re-runs (DESIGN.md §5, §7).

``eval.json`` keys:
- ``full``: metrics with every modality present;
- ``missing``: per non-empty proper subset, named by the kept modalities (``"text+audio"``), under
  the default `zero` protocol; ``missing_mask``: the same under the `mask` protocol;
- ``missing_avg`` / ``missing_avg_mask``: the mean of each metric over those conditions;
- ``random_missing`` / ``random_missing_mask``: per rate r in 0.0..0.7 (each modality of each
  sample dropped independently, at least one kept), under the `zero` / `mask` protocol; the same
  draws for both;
- ``corruption``: per modality, ``gaussian`` and ``timestep_drop`` at levels 0.0..0.9;
- ``robustness``: relative robustness (area under the curve of the task's curve metric) of every
  curve above; effective robustness needs a reference (erm) curve, which `reproduce` supplies;
- ``reconstruction``: R² per modality with the input clean, and with that modality collapsed to
  its batch mean (so the decoder must rebuild it from the others).

A dataset with one modality has no missing condition: ``missing`` is ``{}``, ``missing_avg`` is
null and ``missing_note`` says why. ``config.eval.protocol = "missing"`` stops after the missing
conditions (choosing settings on valid), ``"full"`` keeps only ``full`` (a quick run, or an
unlearning run that measures itself).
"""

import jax
import jax.numpy as jnp
import numpy as np

from modalimmune_jax import losses, metrics, robustness
from modalimmune_jax.evaluation import iterate_batches, make_predict_fn, predict_split
from modalimmune_jax.model import collapse_target
from modalimmune_jax.spectral import spectral_collapse

MISSING_RATES = tuple(round(0.1 * i, 1) for i in range(8))  # 0.0 .. 0.7
CORRUPTION_LEVELS = tuple(round(0.1 * i, 1) for i in range(10))  # 0.0 .. 0.9
CORRUPTIONS = ("gaussian", "timestep_drop")
# The higher-is-better score whose curve the robustness summaries integrate.
CURVE_METRIC = {"classification": "acc", "sentiment": "Non0_acc_2", "iemocap": "avg_acc",
                "regression": "Corr"}


class Evaluator:
    """Prediction functions compiled once per run, shared by every split and condition."""

    def __init__(self, apply_fns, info, *, batch_size, put_fn, feature_std=None, seed=0):
        self.info = info
        self.apply_fns = apply_fns
        self.batch_size = batch_size
        self.put_fn = put_fn
        self.feature_std = feature_std
        self.key = jax.random.key(seed)
        mods = info.modalities
        self.clean_fn = make_predict_fn(apply_fns.apply)

        def remove(batch, keep, set_mask):
            # set_mask is an array, not a Python bool, so both protocols share one compilation.
            return robustness.remove_under_protocol(batch, keep, modalities=mods, told=set_mask)

        def random_missing(batch, rate, set_mask, key):
            keep = robustness.random_missing_keep(key, batch["mask"].shape[0], len(mods), rate)
            return remove(batch, keep, set_mask)

        self.missing_fn = make_predict_fn(apply_fns.apply, remove)
        self.random_missing_fn = make_predict_fn(apply_fns.apply, random_missing)
        self.corrupt_fns = {}
        for m in mods:
            std = None if feature_std is None else jnp.asarray(feature_std[m])
            self.corrupt_fns[(m, "gaussian")] = make_predict_fn(
                apply_fns.apply, lambda b, lvl, key, m=m, std=std: robustness.gaussian_noise(
                    b, m, lvl, key=key, feature_std=std, modalities=mods))
            self.corrupt_fns[(m, "timestep_drop")] = make_predict_fn(
                apply_fns.apply, lambda b, lvl, key, m=m: robustness.timestep_drop(
                    b, m, lvl, key=key, modalities=mods))

        def recon_r2_terms(params, batch, target):
            # Sums for R² per modality; target [M] one-hot collapses that modality (zeros: clean).
            z = apply_fns.encode(params, batch)
            z = collapse_target(z, target, 1.0, 0.0, collapse_fn=spectral_collapse)
            h, _ = apply_fns.head(params, z, batch["mask"])
            recon = apply_fns.reconstruct(params, h)
            return recon, losses.pooled_features(batch, mods)

        self.recon_fn = jax.jit(recon_r2_terms)

    # --------------------------------------------------------------------------- single numbers

    def metrics(self, preds, arrays) -> dict:
        return metrics.compute_metrics(self.info.metric_family, preds, arrays["label"])

    def _run(self, fn, params, arrays, *args, key=None) -> dict:
        preds = predict_split(fn, params, arrays, batch_size=self.batch_size, args=args, key=key,
                              put_fn=self.put_fn)
        return self.metrics(preds, arrays)

    def full(self, params, arrays) -> dict:
        """Metrics with every modality present."""
        return self._run(self.clean_fn, params, arrays)

    def missing(self, params, arrays, keep, *, protocol: str) -> dict:
        """Metrics with the modalities where ``keep`` ``[M]`` is 0 removed under `protocol`."""
        if protocol not in robustness.PROTOCOLS:
            raise ValueError(f"unknown missing-modality protocol {protocol!r}")
        return self._run(self.missing_fn, params, arrays, jnp.asarray(keep, jnp.float32),
                         jnp.float32(protocol == "mask"))

    def primary(self, results: dict) -> float:
        name, _ = metrics.primary_metric(self.info.metric_family)
        return float(results[name])

    def is_better(self, new: float, best: float | None) -> bool:
        """Whether a validation score replaces the best so far: better, or *equal* (a tie).

        Ties go to the later checkpoint. Valid accuracy moves in steps of 1/N (0.4 points on
        digits' 270 examples), so ties are common, and keeping the earliest one evaluated a
        ModalImmune digits seed at step 250 of 1500, before its collapsed branch had trained
        (missing Avg 88.4 against 94.5-94.8 for the other seeds). Same rule for every method.
        """
        _, higher_is_better = metrics.primary_metric(self.info.metric_family)
        if best is None:
            return True
        return new >= best if higher_is_better else new <= best

    # ----------------------------------------------------------------------------- the protocol

    def reconstruction(self, params, arrays) -> dict:
        """R² per modality, clean and with that modality collapsed to its batch mean."""
        mods = self.info.modalities
        out = {}
        for name, target in [("clean", np.zeros(len(mods)))] + [
                (m, np.eye(len(mods))[i]) for i, m in enumerate(mods)]:
            recons, targets = [[] for _ in mods], [[] for _ in mods]
            for batch, n_valid in iterate_batches(arrays, self.batch_size):
                r, t = jax.device_get(self.recon_fn(params, self.put_fn(batch),
                                                    jnp.asarray(target, jnp.float32)))
                for i in range(len(mods)):
                    recons[i].append(np.asarray(r[i])[:n_valid])
                    targets[i].append(np.asarray(t[i])[:n_valid])
            r2 = losses.r2_per_modality([np.concatenate(x) for x in recons],
                                        [np.concatenate(x) for x in targets])
            if name == "clean":
                out["clean"] = {m: float(r2[i]) for i, m in enumerate(mods)}
            else:
                out.setdefault("collapsed", {})[name] = float(r2[mods.index(name)])
        return out

    def protocol(self, params, arrays, *, kind: str = "robustness") -> dict:
        """The eval.json body (module docstring) for one split.

        ``kind``: ``"robustness"`` (everything), ``"missing"`` (``full`` and the missing
        conditions under both protocols: what model selection on valid needs) or ``"full"``.
        """
        mods = self.info.modalities
        if kind == "full":
            return {"full": self.full(params, arrays)}
        curve = CURVE_METRIC[self.info.metric_family]
        results = {"full": self.full(params, arrays)}
        for protocol, suffix in (("zero", ""), ("mask", "_mask")):
            per = {name: self.missing(params, arrays, keep, protocol=protocol)
                   for name, keep in robustness.missing_conditions(mods)}
            results["missing" + suffix] = per
            # One modality: no proper non-empty subset to keep, so no average (not NaN).
            results["missing_avg" + suffix] = {
                k: float(np.mean([v[k] for v in per.values()])) for k in results["full"]
            } if per else None
        if len(mods) == 1:
            results["missing_note"] = ("one modality: there is no missing-modality condition "
                                       "(every proper subset is empty)")
        if kind == "missing":
            return results
        for protocol, suffix in (("zero", ""), ("mask", "_mask")):
            results["random_missing" + suffix] = {
                str(r): self._run(self.random_missing_fn, params, arrays, jnp.float32(r),
                                  jnp.float32(protocol == "mask"),
                                  key=jax.random.fold_in(self.key, i))
                for i, r in enumerate(MISSING_RATES)}
        corruption = {}
        if self.feature_std is not None:
            for (m, kind), fn in self.corrupt_fns.items():
                corruption.setdefault(m, {})[kind] = {
                    str(lvl): self._run(fn, params, arrays, jnp.float32(lvl),
                                        key=jax.random.fold_in(self.key, 1000 + j))
                    for j, lvl in enumerate(CORRUPTION_LEVELS)}
        results["corruption"] = corruption
        results["robustness"] = robustness_summary(results, curve)
        results["reconstruction"] = self.reconstruction(params, arrays)
        return results


def _curve(per_level: dict, metric: str):
    levels = sorted(per_level, key=float)
    return [float(x) for x in levels], [per_level[x][metric] for x in levels]


def robustness_summary(results: dict, metric: str, reference: dict | None = None) -> dict:
    """Relative (and, given a reference run's eval.json, effective) robustness of each curve."""

    def summarize(get):
        levels, scores = _curve(get(results), metric)
        out = {"metric": metric, "relative": robustness.relative_robustness(levels, scores)}
        if reference is not None:
            _, ref = _curve(get(reference), metric)
            out["effective"] = robustness.effective_robustness(levels, scores, ref)
        return out

    out = {"random_missing": summarize(lambda r: r["random_missing"]), "corruption": {}}
    if "random_missing_mask" in results:
        out["random_missing_mask"] = summarize(lambda r: r["random_missing_mask"])
    for m, kinds in results.get("corruption", {}).items():
        out["corruption"][m] = {k: summarize(lambda r, m=m, k=k: r["corruption"][m][k])
                                for k in kinds}
    return out
