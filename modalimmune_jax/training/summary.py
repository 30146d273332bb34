"""The short, aligned block each binary prints when it ends: headline numbers and files written.

Every number comes from the results the binary just wrote (eval.json, unlearn.json,
results.json), so the terminal and the files always agree (tests/test_summary.py checks that).
"""

from collections.abc import Mapping, Sequence

from modalimmune_jax.metrics import LOWER_IS_BETTER, TABLE_METRICS


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def block(title: str, rows: Sequence[tuple[str, str]]) -> str:
    """``title`` then ``  label  value`` rows, labels padded to one column."""
    width = max((len(label) for label, _ in rows), default=0)
    return "\n".join([title] + [f"  {label.ljust(width)}  {value}" for label, value in rows])


def worst_condition(per_condition: Mapping[str, Mapping], metric: str,
                    higher_is_better: bool = True) -> tuple[str, float] | None:
    """``(condition, value)`` with the worst `metric` among the missing conditions, or None."""
    if not per_condition:
        return None
    pick = min if higher_is_better else max
    name = pick(per_condition, key=lambda c: per_condition[c][metric])
    return name, per_condition[name][metric]


def headline_rows(results: Mapping, family: str) -> list[tuple[str, str]]:
    """Full, missing Avg and worst condition per protocol, of an eval.json body."""
    metric = TABLE_METRICS[family][0]
    higher = metric not in LOWER_IS_BETTER
    rows = [(f"full {metric}", _fmt(results["full"].get(metric)))]
    if "missing" not in results:
        return rows
    for protocol, suffix in (("zero", ""), ("mask", "_mask")):
        avg = results.get("missing_avg" + suffix)
        worst = worst_condition(results.get("missing" + suffix, {}), metric, higher)
        if avg is None or worst is None:
            rows.append((f"missing avg ({protocol})",
                         results.get("missing_note", "no missing-modality condition")))
            continue
        rows.append((f"missing avg ({protocol})",
                     f"{_fmt(avg[metric])}   worst: {worst[0]} {_fmt(worst[1])}"))
    return rows


def run_summary(outcome, *, family: str, title: str) -> str:
    """The closing block of `train` and `evaluate` (a `trainer.Outcome`)."""
    results = outcome.results
    rows = headline_rows(results, family)
    if results.get("best_step") is not None:
        rows.append(("best-on-valid step", str(results["best_step"])))
    if outcome.resumed_from is not None:
        title += f" (resumed from step {outcome.resumed_from})"
    rows += [(name, path) for name, path in outcome.files.items()]
    return block(title, rows)
