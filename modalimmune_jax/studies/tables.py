"""Results across seeds: summaries, the acceptance comparison and the markdown tables.

Pure functions of eval.json bodies (and unlearn.json bodies); `studies.suite` runs the jobs and
calls them. Every number printed comes from `aggregate`'s mean ± std (population std) over seeds.
"""

import os
from collections.abc import Mapping, Sequence

import numpy as np

from modalimmune_jax import robustness
from modalimmune_jax.metrics import LOWER_IS_BETTER, TABLE_METRICS
from modalimmune_jax.training.evaluator import CURVE_METRIC, robustness_summary

SUMMARY_KEYS = ("full", "missing", "missing_avg", "missing_mask", "missing_avg_mask",
                "random_missing", "random_missing_mask", "corruption", "reconstruction")
KIND_TITLES = {"gaussian": "Gaussian", "timestep_drop": "Timestep drop"}
PROTOCOLS = (("zero", ""), ("mask", "_mask"))  # (name, eval.json key suffix)
# The comparison's baselines (DESIGN.md §4), ModalImmune's own floor included.
COMPARED = ("erm", "moddrop", "consistency", "ogm_ge", "modalimmune-none")
ORACLE = "oracle"

def _drop_strings(tree):
    # robustness_summary tags each curve with its metric name; summarize_seeds needs numbers only.
    return {k: _drop_strings(v) if isinstance(v, Mapping) else v
            for k, v in tree.items() if not isinstance(v, str)}


def seed_robustness(eval_result: Mapping, metric: str, reference: Mapping | None = None) -> dict:
    """One run's robustness summaries, plus each corruption kind averaged over modalities.

    Args:
      eval_result: a run's eval.json body.
      metric: the curve metric (``CURVE_METRIC[family]``).
      reference: the erm eval.json of the same seed, for effective robustness; None for relative
        robustness only.

    Returns:
      ``{"random_missing": {"relative"[, "effective"]}, "corruption": {modality: {kind: {...}}},
      "corruption_avg": {kind: {...}}}`` of Python floats.
    """
    rob = _drop_strings(robustness_summary(eval_result, metric, reference=reference))
    kinds = sorted({k for per_mod in rob["corruption"].values() for k in per_mod})
    rob["corruption_avg"] = {}
    for kind in kinds:
        curves = [per_mod[kind] for per_mod in rob["corruption"].values() if kind in per_mod]
        rob["corruption_avg"][kind] = {stat: float(np.mean([c[stat] for c in curves]))
                                       for stat in curves[0]}
    return rob


def oracle_eval(specialists: Mapping[str, Mapping]) -> dict:
    """One seed's oracle row from its specialists' eval.json bodies.

    Args:
      specialists: ``{condition: eval.json body}`` of the model trained and evaluated on that
        condition's kept modalities only (``config.use_modalities``).

    Returns:
      An eval.json-shaped body: ``missing`` (= ``missing_mask``: a specialist sees its condition
      the same way under both protocols) per condition, and ``missing_avg`` (= ``_mask``).
    """
    per = {cond: dict(ev["full"]) for cond, ev in specialists.items()}
    avg = {k: float(np.mean([v[k] for v in per.values()])) for k in next(iter(per.values()))}
    return {"missing": per, "missing_mask": per, "missing_avg": avg, "missing_avg_mask": avg}


def aggregate(evals: Mapping[str, Sequence[Mapping]], *, metric: str,
              reference: Sequence[Mapping] | None = None) -> dict:
    """Per run name, every eval.json number as ``{"mean", "std"}`` over seeds.

    Args:
      evals: ``{name: [eval.json body of seed 0, seed 1, ...]}``.
      metric: the curve metric for the robustness summaries.
      reference: the erm eval.json per seed, aligned with each name's list; None skips effective
        robustness.

    Returns:
      ``{name: {key: summary}}`` for the eval.json keys in ``SUMMARY_KEYS`` that the runs hold, and
      ``robustness`` (see `seed_robustness`), each leaf ``{"mean": float, "std": float}`` with
      the population std (``robustness.summarize_seeds``).
    """
    out = {}
    for name, per_seed in evals.items():
        # A run may have fewer seeds than erm (the ablation under --fast): seeds 0..n-1 align.
        if reference is not None and len(reference) < len(per_seed):
            raise ValueError(f"{name}: {len(per_seed)} seeds but {len(reference)} reference runs")
        rows = []
        for k, ev in enumerate(per_seed):
            row = {key: ev[key] for key in SUMMARY_KEYS if key in ev}
            if "random_missing" in ev:  # the oracle row has no curves
                row["robustness"] = seed_robustness(
                    ev, metric, reference=None if reference is None else reference[k])
            rows.append(row)
        out[name] = robustness.summarize_seeds(rows)
    return out


def pooled_margin(a: Mapping[str, float], b: Mapping[str, float], *, sign: float = 1.0
                  ) -> tuple[float, float, float | None]:
    """``(margin, pooled_std, margin / pooled_std)`` of stat `a` over stat `b` (``{"mean",
    "std"}`` each): ``margin = sign (a - b)``, ``pooled_std = sqrt((std_a^2 + std_b^2) / 2)``;
    the ratio is None when both stds are 0."""
    margin = float(sign * (a["mean"] - b["mean"]))
    pooled = float(np.sqrt((a["std"] ** 2 + b["std"] ** 2) / 2))
    return margin, pooled, (margin / pooled if pooled > 0 else None)


def ablation_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """``(with, without)`` pairs among a sweep's variant names.

    A variant ``"X-no_S"`` is ``X`` without its mechanism ``S``; it is paired with every variant
    whose name starts with ``X`` and has neither ``-no_`` nor ``-with_`` in it (``meta_misset``
    and ``meta_misset_strength`` both against ``meta_misset-no_meta``). A variant
    ``"X-with_S"`` is ``X`` with a mechanism that ``X`` has off; it is paired with ``X``. In the
    order of `names`.
    """
    pairs = []
    for name in names:
        if "-no_" in name:
            base = name.split("-no_")[0]
            pairs += [(w, name) for w in names
                      if w.startswith(base) and "-no_" not in w and "-with_" not in w]
        elif "-with_" in name and name.split("-with_")[0] in names:
            pairs.append((name, name.split("-with_")[0]))
    return pairs


def ablation_table(results: Mapping, *, metric: str) -> str:
    """Markdown: each `ablation_pairs` pair's full metric and missing Avg under both protocols,
    with and without, and the Avg's margin in points and in pooled std (> 0: the mechanism
    helps, sign flipped for lower-is-better metrics). Empty without pairs."""
    pairs = ablation_pairs([n for n in results["_meta"]["runs"] if n in results])
    if not pairs:
        return ""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    scale = 100.0 if is_percent(metric) else 1.0
    stats = lambda name: " / ".join(format_stat(s, metric) for s in (
        [results[name]["full"][metric]]
        + [results[name]["missing_avg" + suffix][metric] for _, suffix in PROTOCOLS]))
    rows = []
    for with_, without in pairs:
        cells = []
        for _, suffix in PROTOCOLS:
            margin, _, ratio = pooled_margin(results[with_]["missing_avg" + suffix][metric],
                                             results[without]["missing_avg" + suffix][metric],
                                             sign=sign)
            cells.append(f"{margin * scale:+.1f}" + ("" if ratio is None else f" ({ratio:+.1f})"))
        rows.append([with_, stats(with_), without, stats(without), " / ".join(cells)])
    header = ["with", "full / Avg zero / Avg mask", "without", "full / Avg zero / Avg mask",
              "margin zero / mask (pooled std)"]
    return markdown(header, rows)


def compare_to_baselines(results: Mapping, *, metric: str, higher_is_better: bool,
                         protocol: str = "zero", method: str = "modalimmune",
                         baselines: Sequence[str] = COMPARED) -> dict:
    """The acceptance check of the suite: does `method` beat every baseline on the missing Avg?

    Under `protocol` (``"zero"`` or ``"mask"``), ``margin`` is ``method - best baseline`` (sign
    flipped for lower-is-better metrics, so > 0 is better); ``pooled_std = sqrt((std_method^2 +
    std_best^2) / 2)``; ``margin_in_pooled_std = margin / pooled_std``; ``holds`` is
    ``margin > pooled_std`` and ``holds_2std`` is ``margin > 2 pooled_std`` (the bar of the
    method issue). ``full_gap_to_erm`` is ``method - erm`` on the full-modality metric (same sign
    convention); ``oracle_share`` is the method's Avg over the oracle's, when the oracle ran.
    """
    suffix = dict(PROTOCOLS)[protocol]
    present = [b for b in baselines if b in results]
    if method not in results or not present:
        return {}
    sign = 1.0 if higher_is_better else -1.0
    avg = lambda name: results[name]["missing_avg" + suffix][metric]
    best = max(present, key=lambda b: sign * avg(b)["mean"])
    margin, pooled, ratio = pooled_margin(avg(method), avg(best), sign=sign)
    out = {"protocol": protocol, "metric": metric, "best_baseline": best,
           "margin": margin, "pooled_std": pooled, "margin_in_pooled_std": ratio,
           "holds": bool(margin > pooled), "holds_2std": bool(margin > 2 * pooled)}
    if "erm" in results:
        full = lambda name: results[name]["full"][metric]["mean"]
        out["full_gap_to_erm"] = float(sign * (full(method) - full("erm")))
    if ORACLE in results:
        out["oracle_share"] = oracle_share(results, method, metric=metric, protocol=protocol)
    return out


def oracle_share(results: Mapping, name: str, *, metric: str, protocol: str) -> float | None:
    """`name`'s missing Avg as a share of the oracle's (ratio of the means over seeds)."""
    suffix = dict(PROTOCOLS)[protocol]
    if ORACLE not in results or name not in results:
        return None
    oracle = results[ORACLE]["missing_avg" + suffix][metric]["mean"]
    mine = results[name]["missing_avg" + suffix][metric]["mean"]
    if not oracle:
        return None
    # For a lower-is-better metric (MAE) the share is oracle / method, so 1.0 is still the top.
    return float(oracle / mine if metric in LOWER_IS_BETTER else mine / oracle)


def is_percent(metric: str) -> bool:
    """Accuracies and F1 scores print as percentages; MAE, Corr and the like as raw numbers."""
    lowered = metric.lower()
    return "acc" in lowered or "f1" in lowered


def format_stat(stat: Mapping[str, float], metric: str, *, signed: bool = False) -> str:
    """``{"mean", "std"}`` -> ``"97.3 ± 0.4"`` (percent, 1 decimal) or ``"0.712 ± 0.010"``."""
    scale, digits = (100.0, 1) if is_percent(metric) else (1.0, 3)
    sign = "+" if signed else ""
    # Rounding first, then adding +0.0, turns a float-noise "-0.0" (erm's ER against itself) into 0.
    mean = round(stat["mean"] * scale, digits) + 0.0
    return f"{mean:{sign}.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def missing_table(results: Mapping, *, names: Sequence[str], modalities: Sequence[str],
                  metric: str, protocol: str = "zero") -> tuple[list[str], list[list[str]]]:
    """Rows = run names; columns = Full, each missing condition (kept modalities), Avg.

    Under `protocol`; with an oracle row in `results`, a last column gives each Avg as a share of
    the oracle's, and the oracle row itself closes the table.
    """
    suffix = dict(PROTOCOLS)[protocol]
    conditions = [c for c, _ in robustness.missing_conditions(modalities)]
    with_oracle = ORACLE in results
    header = ["Method", "Full", *conditions, "Avg"] + (["Avg / oracle"] if with_oracle else [])
    rows = []
    for name in [*names, *([ORACLE] if with_oracle else [])]:
        r = results[name]
        row = [name, format_stat(r["full"][metric], metric) if "full" in r else "—",
               *(format_stat(r["missing" + suffix][c][metric], metric) for c in conditions),
               format_stat(r["missing_avg" + suffix][metric], metric)]
        if with_oracle:
            share = oracle_share(results, name, metric=metric, protocol=protocol)
            row.append("—" if share is None else f"{100 * share:.1f}%")
        rows.append(row)
    return header, rows


def robustness_table(results: Mapping, *, names: Sequence[str],
                     metric: str) -> tuple[list[str], list[list[str]]]:
    """Rows = run names; RR and ER under random missing and each corruption kind (modality avg)."""
    kinds = sorted({k for name in names for k in results[name]["robustness"]["corruption_avg"]})
    blocks = [("Random missing", lambda r: r["random_missing"])]
    if all("random_missing_mask" in results[name]["robustness"] for name in names):
        blocks.append(("Random missing (mask)", lambda r: r["random_missing_mask"]))
    blocks += [(KIND_TITLES.get(k, k), lambda r, k=k: r["corruption_avg"][k]) for k in kinds]
    header = ["Method"]
    for title, _ in blocks:
        header += [f"{title} RR", f"{title} ER"]
    rows = []
    for name in names:
        row = [name]
        for _, get in blocks:
            stats = get(results[name]["robustness"])
            row.append(format_stat(stats["relative"], metric))
            row.append(format_stat(stats["effective"], metric, signed=True)
                       if "effective" in stats else "—")
        rows.append(row)
    return header, rows


def _flat_scalars(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def unlearning_table(unlearning: Mapping[str, Mapping], *,
                     metric: str) -> tuple[list[str], list[list[str]]]:
    """Rows = unlearning methods; forget quality, retained `metric` and wall time (one seed)."""
    flat = {name: _flat_scalars(r) for name, r in unlearning.items()}
    keys = sorted({k for f in flat.values() for k in f
                   if k.startswith("forget_quality/") or k == "wall_time_s"
                   or (k.startswith("retained/") and k.rsplit("/", 1)[-1] == metric)})
    rows = [[name, *(f"{f[k]:.3f}" if k in f else "—" for k in keys)] for name, f in flat.items()]
    return ["Method", *keys], rows


def _comparison_sentence(cmp: Mapping) -> str:
    if not cmp:
        return ""
    share = ("" if cmp.get("oracle_share") is None
             else f" It reaches {100 * cmp['oracle_share']:.1f}% of the oracle's Avg.")
    # Without an erm run there is no gap to state (0.0 would read as a measurement).
    gap = ("" if "full_gap_to_erm" not in cmp else
           f" Full-modality gap to erm: {cmp['full_gap_to_erm']:+.4f} (positive is better).")
    ratio = cmp.get("margin_in_pooled_std")
    ratio = "" if ratio is None else f" ({ratio:+.1f} pooled std)"
    return (f"Under `{cmp['protocol']}`, modalimmune's Avg against the best baseline "
            f"({cmp['best_baseline']}): margin {cmp['margin']:+.4f}, pooled std "
            f"{cmp['pooled_std']:.4f}{ratio}.{share}{gap}\n")


def render_tables(results: Mapping, *, names: Sequence[str], modalities: Sequence[str],
                  family: str, num_seeds: int, title: str = "Results") -> str:
    """table.md: the missing-modality tables (one per protocol and main metric), robustness,
    the linear reference and unlearning.

    Rows run on fewer seeds than ``num_seeds`` (``_meta.seeds_per_run``) are marked with their
    count; ``_meta.comparison`` (`compare_to_baselines`, per protocol) is stated under each table
    of the first metric.
    """
    seeds = f"mean ± std over {num_seeds} seed{'s' if num_seeds != 1 else ''}"
    meta = results.get("_meta", {})
    per_run = meta.get("seeds_per_run", {})

    def table(header_rows):
        header, rows = header_rows
        for row in rows:
            n = per_run.get(row[0], num_seeds)
            if n != num_seeds:
                row[0] = f"{row[0]} ({n} seed{'s' if n != 1 else ''})"
        return markdown(header, rows) + "\n"

    curve = CURVE_METRIC[family]
    n_cond = len(robustness.missing_conditions(modalities))
    protocol_text = {"zero": "zero-filled with the presence mask left at 1 (`zero` protocol: the "
                             "model is not told)",
                     "mask": "zero-filled and flagged absent in the presence mask (`mask` "
                             "protocol: the model is told)"}
    oracle = (" The oracle row: per condition, the same model trained with erm on the kept "
              "modalities only (a specialist); Avg / oracle is each method's Avg as a share of "
              "the oracle's." if ORACLE in results else "")
    parts = [f"# {title}\n"]
    number = 0
    for i, metric in enumerate(TABLE_METRICS[family]):
        for protocol, _ in PROTOCOLS:
            number += 1
            unit = " (%)" if is_percent(metric) else ""
            parts.append(
                f"**Table {number}.** Test-split `{metric}`{unit} with modalities missing, "
                f"`{protocol}` protocol; {seeds} (population std). Full: every modality present. "
                f"Each further column keeps only the named modalities; the others are "
                f"{protocol_text[protocol]}, DESIGN.md §5. Avg: the mean over the {n_cond} "
                f"missing conditions.{oracle}\n")
            parts.append(table(missing_table(results, names=names, modalities=modalities,
                                             metric=metric, protocol=protocol)))
            if i == 0:
                parts.append(_comparison_sentence(meta.get("comparison", {}).get(protocol, {})))
    number += 1
    unit = " (%)" if is_percent(curve) else ""
    parts.append(
        f"**Table {number}.** Robustness on the test split, from the `{curve}`{unit} curves; "
        f"{seeds}. RR (relative robustness, MultiBench): the area under the metric-vs-level curve "
        f"divided by the level range (random missing: rates 0.0-0.7 per sample and modality, at "
        f"least one kept, `zero` protocol, then `mask`; corruption: levels 0.0-0.9 of one "
        f"modality at a time, averaged over the {len(modalities)} modalities). ER (effective "
        f"robustness): the same area for the gap to the erm curve of the same seed shifted to "
        f"match at level 0, so erm scores 0 and positive is more robust than erm.\n")
    parts.append(table(robustness_table(results, names=names, metric=curve)))
    if results.get("linear"):
        pooled = {"mean": "time-pooled", "flatten": "timesteps side by side"}.get(
            results["linear"].get("pooling"), "time-pooled")
        number += 1
        metric = TABLE_METRICS[family][0]
        parts.append(
            f"**Table {number}.** The linear reference: scikit-learn logistic regression (ridge "
            f"for regression) on standardized features ({pooled}), test split `{metric}`. "
            f"Full: on every modality; each condition: a linear specialist trained on the kept "
            f"modalities only. Deterministic (no seeds).\n")
        parts.append(markdown(*linear_table(results["linear"], modalities=modalities,
                                             metric=metric)) + "\n")
    if results.get("unlearning"):
        metric = TABLE_METRICS[family][0]
        number += 1
        parts.append(
            f"**Table {number}.** Modality unlearning on the erm seed-0 run, one seed, test split: "
            f"forget quality (probe and alone accuracy on the forgotten modality, its information "
            f"gain), retained `{metric}` and wall time (s). See `modalimmune_jax/studies/"
            f"unlearn.py`.\n")
        parts.append(markdown(*unlearning_table(results["unlearning"], metric=metric)) + "\n")
    return "\n".join(parts)


def linear_table(linear: Mapping, *, modalities: Sequence[str],
                 metric: str) -> tuple[list[str], list[list[str]]]:
    """One row: the linear reference, full and per condition (specialists), and their Avg."""
    conditions = [c for c, _ in robustness.missing_conditions(modalities)]
    scale = 100.0 if is_percent(metric) else 1.0
    fmt = lambda v: f"{scale * v:.1f}" if is_percent(metric) else f"{v:.3f}"
    row = ["linear", fmt(linear["full"][metric]),
           *(fmt(linear["missing"][c][metric]) for c in conditions),
           fmt(linear["missing_avg"][metric]) if linear.get("missing_avg") else "—"]
    return ["Method", "Full", *conditions, "Avg"], [row]


def compact_rows(results: Mapping, *, names: Sequence[str], metric: str) -> list[list[str]]:
    """Per run: full, missing Avg under `zero` and `mask`, and each protocol's worst condition."""
    rows = []
    for name in names:
        r = results[name]
        row = [name, format_stat(r["full"][metric], metric)]
        for suffix in ("", "_mask"):
            per = r.get("missing" + suffix) or {}
            if not per:
                row += ["—", "—"]
                continue
            pick = max if metric in LOWER_IS_BETTER else min
            worst = pick(per, key=lambda c: per[c][metric]["mean"])
            row += [format_stat(r["missing_avg" + suffix][metric], metric),
                    f"{worst} {format_stat(per[worst][metric], metric)}"]
        rows.append(row)
    return rows


def suite_summary(results: Mapping, *, out: str) -> str:
    """The closing block of `experiments.reproduce`: a compact table and the files written."""
    meta = results["_meta"]
    metric = meta["table_metrics"][0]
    names = [n for n in meta["runs"] if n in results]
    header = ["Method", f"Full {metric}", "Avg (zero)", "worst (zero)", "Avg (mask)",
              "worst (mask)"]
    rows = compact_rows(results, names=names, metric=metric)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w)
                                   for c, w in zip(cells, widths, strict=True)).rstrip()
    seeds = len(meta["seeds"])
    text = [f"reproduce finished: {meta['suite']}, {meta['steps']} steps per run, {seeds} "
            f"seed{'s' if seeds != 1 else ''} (mean ± std; test split)", line(header)]
    text += [line(row) for row in rows]
    text += ["", f"table.md      {os.path.join(out, 'table.md')}",
             f"results.json  {os.path.join(out, 'results.json')}",
             f"plots         {os.path.join(out, 'plots', 'random_missing.png')} (and more)"]
    return "\n".join(text)
