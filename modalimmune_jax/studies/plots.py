"""PNG figures for `experiments.reproduce` (matplotlib, Agg; no pyplot, so no global backend state).

Each function takes plain data (the ``results.json`` summaries, spectra arrays, ``metrics.jsonl``
records), draws one figure and writes it to `path`:

1. `plot_random_missing`: the curve metric against the random-missing rate, one line per method
   (mean over seeds, with a ± std band);
2. `plot_corruption`: the curve metric against the corruption level, one panel per
   modality × corruption kind;
3. `plot_spectra`: each modality's normalized singular-value spectrum of its test-split embedding,
   one line per method (DESIGN.md §3.2 diagnostics);
4. `plot_information_gain`: the controller's leave-one-out IG per modality over training
   (and `plot_meta_parameters`: φ over training, one line per run, written by sweeps)
   (DESIGN.md §3.1), raw and EMA.
"""

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

_DPI = 120


def _new_figure(nrows: int = 1, ncols: int = 1, *, panel=(4.6, 3.4)):
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), dpi=_DPI)
    FigureCanvasAgg(fig)  # Agg draws the PNG whatever backend the process has selected.
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _curve(per_level: Mapping[str, Mapping], metric: str):
    """``{level: {metric: {"mean","std"}}}`` -> sorted levels, means, stds (each ``[K]``)."""
    levels = sorted(per_level, key=float)
    mean = np.array([per_level[lv][metric]["mean"] for lv in levels], np.float64)
    std = np.array([per_level[lv][metric]["std"] for lv in levels], np.float64)
    return np.array([float(lv) for lv in levels]), mean, std


def _band(ax, x, mean, std, label):
    (line,) = ax.plot(x, mean, marker="o", markersize=3, label=label)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)


def plot_random_missing(results: Mapping[str, Mapping], *, metric: str, methods: Sequence[str],
                        path: str) -> str:
    """Metric vs random-missing rate, per method (mean line, ± std band over seeds).

    One panel per protocol: `zero` (``random_missing``) and, where every method has it, `mask`
    (``random_missing_mask``).

    Args:
      results: ``results.json`` body: ``{method: {"random_missing": {rate: {metric: {"mean",
        "std"}}}}}``.
      metric: the curve metric (``evaluator.CURVE_METRIC[family]``).
      methods: which methods to draw, in legend order.
      path: where the PNG goes.

    Returns:
      `path`.
    """
    panels = [("random_missing", "zero protocol: mask left at 1")]
    if all("random_missing_mask" in results[name] for name in methods):
        panels.append(("random_missing_mask", "mask protocol: flagged absent"))
    fig, axes = _new_figure(1, len(panels), panel=(5.5, 3.8))
    for ax, (key, subtitle) in zip(axes[0], panels, strict=True):
        for name in methods:
            _band(ax, *_curve(results[name][key], metric), label=name)
        ax.set_xlabel("random missing rate (per sample and modality)")
        ax.set_ylabel(f"test {metric}")
        ax.set_title(f"Random missing modalities ({subtitle})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_corruption(results: Mapping[str, Mapping], *, metric: str, modalities: Sequence[str],
                    methods: Sequence[str], path: str) -> str:
    """Metric vs corruption level, one panel per (modality, corruption kind), per method.

    Args:
      results: ``results.json`` body: ``{method: {"corruption": {modality: {kind: {level:
        {metric: {"mean","std"}}}}}}}``.
      metric: the curve metric.
      modalities: panel rows, in the dataset's order.
      methods: which methods to draw.
      path: where the PNG goes.

    Returns:
      `path`.
    """
    kinds = sorted({k for name in methods for m in modalities
                    for k in results[name]["corruption"].get(m, {})})
    fig, axes = _new_figure(len(modalities), max(len(kinds), 1), panel=(4.2, 3.0))
    for i, m in enumerate(modalities):
        for j, kind in enumerate(kinds):
            ax = axes[i, j]
            for name in methods:
                per_level = results[name]["corruption"].get(m, {}).get(kind)
                if per_level:
                    _band(ax, *_curve(per_level, metric), label=name)
            ax.set_title(f"{m}: {kind}", fontsize=10)
            ax.set_xlabel("corruption level")
            ax.set_ylabel(f"test {metric}")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    return _save(fig, path)


def plot_spectra(spectra: Mapping[str, Mapping[str, np.ndarray]], *, path: str,
                 effective_ranks: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """Normalized singular-value spectra of each modality's embedding, per method.

    Args:
      spectra: ``{method: {modality: [k] float}}``, energy shares ``s_i^2 / sum s^2`` in descending
        order (``spectral.singular_value_spectrum``).
      path: where the PNG goes.
      effective_ranks: optional ``{method: {modality: float}}``, shown in the legend.

    Returns:
      `path`.
    """
    modalities = list(next(iter(spectra.values())))
    fig, axes = _new_figure(1, len(modalities), panel=(4.2, 3.4))
    for j, m in enumerate(modalities):
        ax = axes[0, j]
        for name, per_mod in spectra.items():
            s = np.asarray(per_mod[m], np.float64)
            label = name
            if effective_ranks is not None:
                label += f" (erank {effective_ranks[name][m]:.1f})"
            # Clip at a floor so exact zeros (a collapsed direction) stay on the log axis.
            ax.semilogy(np.arange(1, len(s) + 1), np.maximum(s, 1e-12), label=label)
        ax.set_title(f"{m} embedding spectrum (test)", fontsize=10)
        ax.set_xlabel("singular value index i")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(r"$s_i^2 / \sum_j s_j^2$")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_information_gain(records: Sequence[Mapping[str, float]], *, modalities: Sequence[str],
                          path: str) -> str:
    """The controller's ``ig/<modality>`` (thin) and ``gain_ema/<modality>`` (thick) over steps.

    Args:
      records: ``metrics.jsonl`` records; those without ``ig/<m>`` (eval lines) are skipped.
      modalities: which series to draw.
      path: where the PNG goes.

    Returns:
      `path`.

    Raises:
      ValueError: if no record holds an ``ig/`` key.
    """
    rows = [r for r in records if any(f"ig/{m}" in r for m in modalities)]
    if not rows:
        raise ValueError("no ig/<modality> series in the records")
    fig, axes = _new_figure(panel=(6.0, 3.8))
    ax = axes[0, 0]
    for m in modalities:
        pts = [(r["step"], r[f"ig/{m}"]) for r in rows if f"ig/{m}" in r]
        (line,) = ax.plot(*zip(*pts, strict=True), linewidth=1.0, alpha=0.6, label=f"IG {m}")
        ema = [(r["step"], r[f"gain_ema/{m}"]) for r in rows if f"gain_ema/{m}" in r]
        if ema:
            ax.plot(*zip(*ema, strict=True), color=line.get_color(), linewidth=2.2,
                    label=f"EMA {m}")
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("leave-one-out loss increase")
    ax.set_title("ModalImmune controller: information gain per modality")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


# metrics.jsonl key -> panel title and whether its axis is logarithmic (the loss weights span
# orders of magnitude when the meta-update drives them).
PHI_SERIES = (("strength", "collapse strength", False), ("reg_weight", "λ_c (regularizer)", True),
              ("rec_weight", "λ_r (reconstruction)", True))


def plot_meta_parameters(runs: Mapping[str, Sequence[Mapping[str, float]]], *, path: str) -> str:
    """The meta-parameters φ over training, one line per run, one panel per component.

    Args:
      runs: label -> that run's ``metrics.jsonl`` records; records without ``strength`` (eval
        lines) are skipped.
      path: where the PNG goes.

    Returns:
      `path`.

    Raises:
      ValueError: if no run has a ``strength`` series.
    """
    series = {label: [r for r in records if "strength" in r] for label, records in runs.items()}
    series = {label: rows for label, rows in series.items() if rows}
    if not series:
        raise ValueError("no run has a strength series (a modalimmune run's metrics.jsonl)")
    fig, axes = _new_figure(1, len(PHI_SERIES), panel=(4.2, 3.4))
    for ax, (key, title, log) in zip(axes[0], PHI_SERIES, strict=True):
        for label, rows in series.items():
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], linewidth=1.4, label=label)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    return _save(fig, path)
