"""experiments.reproduce: summaries and tables on hand-made results, PNGs, the suite end to end.

The summaries and tables are checked against numbers worked out by hand (closed-form areas of
linear curves); the end-to-end run trains one tiny synthetic model and checks the files, their
structure, the resume path and the unlearning hook (with a stand-in unlearning job).
"""

import json
import os
import subprocess
import time
import sys

import numpy as np
import pytest

from experiments.configs import default
from modalimmune_jax.studies import plots, suite, tables
from modalimmune_jax.studies import sweep as sweep_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODS = ("text", "audio", "vision")
# The 6 missing conditions for MODS, written out (not computed) so the column order is checked too.
CONDITIONS = ("text+audio", "text+vision", "audio+vision", "text", "audio", "vision")
RATES = [f"{0.1 * i:.1f}" for i in range(8)]
LEVELS = [f"{0.1 * i:.1f}" for i in range(10)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _eval(full, missing, rm_fn, corr_fns, metric="acc"):
    """A hand-made eval.json body: rm_fn(rate) and corr_fns[(m, kind)](level) give the metric.

    The `mask` protocol's numbers are the `zero` ones minus 0.1 (missing) and 0.05 (random
    missing), so that a table reading the wrong protocol shows it.
    """
    per = {c: {metric: v} for c, v in zip(CONDITIONS, missing, strict=True)}
    per_mask = {c: {metric: v - 0.1} for c, v in zip(CONDITIONS, missing, strict=True)}
    return {
        "full": {metric: full},
        "missing": per,
        "missing_avg": {metric: float(np.mean(missing))},
        "missing_mask": per_mask,
        "missing_avg_mask": {metric: float(np.mean(missing)) - 0.1},
        "random_missing": {r: {metric: rm_fn(float(r))} for r in RATES},
        "random_missing_mask": {r: {metric: rm_fn(float(r)) - 0.05} for r in RATES},
        "corruption": {m: {kind: {lv: {metric: corr_fns.get((m, kind), lambda x: 0.5)(float(lv))}
                                  for lv in LEVELS} for kind in ("gaussian", "timestep_drop")}
                       for m in MODS},
    }


def _hand_made_evals():
    """erm degrades linearly; `flat` does not. Two seeds each, so std is non-trivial."""
    erm = [
        _eval(0.90, [0.8, 0.7, 0.6, 0.5, 0.4, 0.3], lambda r: 0.90 - 0.5 * r,
              {("text", "gaussian"): lambda x: 0.9 - 0.2 * x,
               ("audio", "gaussian"): lambda x: 0.9 - 0.1 * x}),
        _eval(0.80, [0.7, 0.7, 0.6, 0.5, 0.4, 0.2], lambda r: 0.92 - 0.3 * r,
              {("text", "gaussian"): lambda x: 0.9 - 0.2 * x,
               ("audio", "gaussian"): lambda x: 0.9 - 0.1 * x}),
    ]
    flat = [
        _eval(0.85, [0.8, 0.8, 0.8, 0.8, 0.8, 0.8], lambda r: 0.80,
              {("text", "gaussian"): lambda x: 0.8,
               ("audio", "gaussian"): lambda x: 0.7 - 0.1 * x}),
        _eval(0.87, [0.9, 0.8, 0.8, 0.8, 0.8, 0.6], lambda r: 0.84,
              {("text", "gaussian"): lambda x: 0.8,
               ("audio", "gaussian"): lambda x: 0.7 - 0.1 * x}),
    ]
    return {"erm": erm, "flat": flat}


@pytest.fixture(scope="module")
def hand_results():
    evals = _hand_made_evals()
    return tables.aggregate(evals, metric="acc", reference=evals["erm"])


def _close(stat, mean, std):
    np.testing.assert_allclose([stat["mean"], stat["std"]], [mean, std], atol=1e-9)


def test_aggregate_mean_std_and_robustness_by_hand(hand_results):
    flat, erm = hand_results["flat"], hand_results["erm"]
    _close(erm["full"]["acc"], 0.85, 0.05)  # seeds 0.90, 0.80: population std 0.05
    _close(flat["full"]["acc"], 0.86, 0.01)
    _close(flat["missing"]["text"]["acc"], 0.8, 0.0)
    _close(flat["missing"]["vision"]["acc"], 0.7, 0.1)
    _close(flat["random_missing"]["0.3"]["acc"], 0.82, 0.02)
    # Random missing, rates 0..0.7 (mean rate 0.35). RR of a flat curve is its value; ER against an
    # erm curve of slope -a is a * 0.35: seed 0 a=0.5 -> 0.175, seed 1 a=0.3 -> 0.105.
    rm = flat["robustness"]["random_missing"]
    _close(rm["relative"], 0.82, 0.02)
    _close(rm["effective"], 0.14, 0.035)
    _close(erm["robustness"]["random_missing"]["effective"], 0.0, 0.0)
    # erm's own RR: 0.90 - 0.5*0.35 = 0.725 and 0.92 - 0.3*0.35 = 0.815.
    _close(erm["robustness"]["random_missing"]["relative"], 0.77, 0.045)
    # Gaussian, levels 0..0.9 (mean level 0.45): text RR 0.8, ER 0.2*0.45 = 0.09; audio RR
    # 0.7 - 0.1*0.45 = 0.655, ER 0; vision flat 0.5 vs flat 0.5: RR 0.5, ER 0. Averages:
    gauss = flat["robustness"]["corruption_avg"]["gaussian"]
    _close(gauss["relative"], (0.8 + 0.655 + 0.5) / 3, 0.0)
    _close(gauss["effective"], 0.09 / 3, 0.0)
    _close(flat["robustness"]["corruption"]["text"]["gaussian"]["effective"], 0.09, 0.0)
    _close(flat["robustness"]["corruption_avg"]["timestep_drop"]["relative"], 0.5, 0.0)


def test_aggregate_without_reference_has_relative_only():
    evals = _hand_made_evals()
    out = tables.aggregate({"flat": evals["flat"]}, metric="acc")
    assert set(out["flat"]["robustness"]["random_missing"]) == {"relative"}
    assert set(out["flat"]["robustness"]["corruption_avg"]["gaussian"]) == {"relative"}


def _table_rows(md, first_header_cell="Method"):
    """Markdown tables in `md` as lists of rows (each a list of cells), header first."""
    tables, current = [], None
    for line in md.splitlines():
        if line.startswith("| " + first_header_cell):
            current = [line.strip("| ").split(" | ")]
            tables.append(current)
        elif line.startswith("|---"):
            continue
        elif line.startswith("| ") and current is not None:
            current.append(line.strip("| ").split(" | "))
        else:
            current = None
    return tables


def _cell(mean, std, scale=100.0, digits=1, signed=False):
    sign = "+" if signed else ""
    return f"{mean * scale:{sign}.{digits}f} ± {std * scale:.{digits}f}"


def test_tables_match_results(hand_results):
    md = tables.render_tables(hand_results, names=["erm", "flat"], modalities=MODS,
                                 family="classification", num_seeds=2)
    missing, missing_mask, rob = _table_rows(md)
    for table in (missing, missing_mask):
        assert table[0] == ["Method", "Full", *CONDITIONS, "Avg"]
        assert [r[0] for r in table[1:]] == ["erm", "flat"]
    # Hand-worked cells: erm full 0.90/0.80 -> 85.0 ± 5.0; flat vision 0.8/0.6 -> 70.0 ± 10.0;
    # erm Avg: per-seed averages 0.55 and 0.5166.. -> 53.3 ± 1.7; the mask block 0.1 lower.
    assert missing[1][1] == "85.0 ± 5.0" == missing_mask[1][1]
    assert missing[2][missing[0].index("vision")] == "70.0 ± 10.0"
    assert missing_mask[2][missing[0].index("vision")] == "60.0 ± 10.0"
    assert missing[1][-1] == "53.3 ± 1.7" and missing_mask[1][-1] == "43.3 ± 1.7"
    # Every cell is the results.json mean ± std, as a percentage with one decimal.
    for table, suffix in ((missing, ""), (missing_mask, "_mask")):
        for row in table[1:]:
            res = hand_results[row[0]]
            stats = [res["full"]["acc"], *(res["missing" + suffix][c]["acc"] for c in CONDITIONS),
                     res["missing_avg" + suffix]["acc"]]
            assert row[1:] == [_cell(s["mean"], s["std"]) for s in stats]
    assert rob[0] == ["Method", "Random missing RR", "Random missing ER",
                      "Random missing (mask) RR", "Random missing (mask) ER", "Gaussian RR",
                      "Gaussian ER", "Timestep drop RR", "Timestep drop ER"]
    flat_row = rob[2]
    assert flat_row[0] == "flat"
    assert flat_row[1] == "82.0 ± 2.0" and flat_row[2] == "+14.0 ± 3.5"
    # The mask curves are 0.05 lower for both runs: RR 0.05 lower, the same ER.
    assert flat_row[3] == "77.0 ± 2.0" and flat_row[4] == "+14.0 ± 3.5"
    assert flat_row[6] == "+3.0 ± 0.0"  # 0.09 / 3
    assert rob[1][2] == "+0.0 ± 0.0"  # erm against itself
    assert "mean ± std over 2 seeds" in md and "`zero` protocol" in md
    assert "`mask` protocol" in md


def test_sentiment_tables_use_non0_acc_and_mae():
    evals = {"erm": [_eval(0.8, [0.7] * 6, lambda r: 0.8 - 0.1 * r, {}, metric="Non0_acc_2")]}
    for ev, mae in zip(evals["erm"], [0.7123], strict=True):
        ev["full"]["MAE"] = mae
        ev["missing_avg"]["MAE"] = ev["missing_avg_mask"]["MAE"] = 0.9
        for c in CONDITIONS:
            ev["missing"][c]["MAE"] = ev["missing_mask"][c]["MAE"] = 0.9
        for d in [*ev["random_missing"].values(), *ev["random_missing_mask"].values(),
                  *(lv for m in ev["corruption"].values() for k in m.values()
                    for lv in k.values())]:
            d["MAE"] = 1.0
    results = tables.aggregate(evals, metric="Non0_acc_2", reference=evals["erm"])
    md = tables.render_tables(results, names=["erm"], modalities=MODS, family="sentiment",
                                 num_seeds=1)
    acc_table, _, mae_table, _, _ = _table_rows(md)
    assert acc_table[1][1] == "80.0 ± 0.0"
    assert mae_table[1][1] == "0.712 ± 0.000"
    assert mae_table[1][-1] == "0.900 ± 0.000"
    assert "`MAE`" in md and "`Non0_acc_2` (%)" in md


def test_format_stat():
    assert tables.format_stat({"mean": 0.9734, "std": 0.0041}, "acc") == "97.3 ± 0.4"
    assert tables.format_stat({"mean": 0.71234, "std": 0.0101}, "MAE") == "0.712 ± 0.010"
    assert tables.format_stat({"mean": 0.5, "std": 0.01}, "Corr") == "0.500 ± 0.010"
    assert tables.format_stat({"mean": -0.021, "std": 0.003}, "acc",
                                 signed=True) == "-2.1 ± 0.3"
    assert tables.format_stat({"mean": -1e-17, "std": 0.0}, "acc", signed=True) == "+0.0 ± 0.0"


def test_runs_and_ablation_configs():
    runs = suite.make_runs(["erm", "modalimmune"], ablation=True)
    assert [r.name for r in runs] == [
        "erm", "modalimmune", "modalimmune-none", "modalimmune-no_controller",
        "modalimmune-no_collapse", "modalimmune-no_regularizer", "modalimmune-no_curvature",
        "modalimmune-no_meta"]
    # A component that is off by default is switched on for its ablation row.
    flipped = suite.make_runs(["modalimmune"], ablation=True, floor=False,
                              default_on=("controller", "collapse", "meta"))
    assert [r.name for r in flipped] == [
        "modalimmune", "modalimmune-no_controller", "modalimmune-no_collapse",
        "modalimmune-with_regularizer", "modalimmune-with_curvature", "modalimmune-no_meta"]
    assert all(r.is_ablation for r in flipped[1:]) and not flipped[0].is_ablation
    assert [r.name for r in suite.make_runs(["erm"], ablation=True)] == ["erm"]
    base = suite.suite_config("synthetic", get_config=default.get_config, fast=True,
                              data_dir="/d")
    assert base.num_steps == 600 and base.dataset.data_dir == "/d"
    config = suite.run_config(base, runs[4], seed=2)
    assert config.method == "modalimmune" and config.seed == 2
    switches = ("controller", "collapse", "regularizer", "curvature", "meta")
    assert {s: config.mi[s] for s in switches} == {s: base.mi[s] and s != "collapse"
                                                   for s in switches}
    none = suite.run_config(base, runs[2], seed=0)
    assert not any(none.mi[s] for s in switches)  # the two-branch floor: every component off
    assert base.mi.collapse  # the base config is not modified
    on = suite.run_config(base, flipped[4], seed=0)
    assert on.mi.curvature and not base.mi.curvature
    # The oracle: one erm specialist per condition, scored on its own (full) input.
    oracle = suite.make_runs(["erm"], ablation=False, oracle=True, modalities=MODS)[1:]
    assert [r.name for r in oracle] == [f"oracle:{c}" for c in CONDITIONS]
    config = suite.run_config(base, oracle[0], seed=1)
    assert (config.method, config.use_modalities, config.eval.protocol) == (
        "erm", "text,audio", "full")
    with pytest.raises(ValueError, match="--methods"):
        suite.make_runs(["erm", "bogus"], ablation=False)


def _assert_png(path, min_bytes=5000):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_bytes, (path, len(data))
    # Image size from the IHDR chunk: a real figure, not a 1x1 placeholder.
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 300 and height >= 200, (path, width, height)


def test_plots_from_hand_made_data(tmp_path, hand_results):
    paths = [
        plots.plot_random_missing(hand_results, metric="acc", methods=["erm", "flat"],
                                  path=str(tmp_path / "rm.png")),
        plots.plot_corruption(hand_results, metric="acc", modalities=MODS,
                              methods=["erm", "flat"], path=str(tmp_path / "c.png")),
        plots.plot_spectra({"erm": {m: np.array([0.7, 0.2, 0.1, 0.0]) for m in MODS},
                            "modalimmune": {m: np.array([0.4, 0.3, 0.2, 0.1]) for m in MODS}},
                           path=str(tmp_path / "s.png")),
        plots.plot_information_gain(
            [{"step": s, "ig/text": 0.1 * s, "gain_ema/text": 0.05 * s, "ig/audio": -0.01}
             for s in range(1, 20)] + [{"step": 20, "valid/acc": 0.5}],
            modalities=["text", "audio"], path=str(tmp_path / "ig.png")),
    ]
    for p in paths:
        _assert_png(p)
    with pytest.raises(ValueError, match="ig/"):
        plots.plot_information_gain([{"step": 1, "loss": 1.0}], modalities=["text"],
                                    path=str(tmp_path / "none.png"))


def test_meta_trajectories_keep_the_runs_whose_phi_moved(tmp_path):
    phi = lambda step, strength: {"step": step, "strength": strength, "reg_weight": 0.1,
                                  "rec_weight": 0.1}
    runs = {"moved": [phi(10, 0.3), phi(20, 0.4), {"step": 20, "valid/acc": 0.5}],
            "still": [phi(10, 0.99), phi(20, 0.99)], "missing": None}
    for name, records in runs.items():
        (tmp_path / name).mkdir()
        if records is not None:
            (tmp_path / name / "metrics.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in records))
    moved = sweep_lib.meta_trajectories({n: str(tmp_path / n) for n in runs})
    assert list(moved) == ["moved"] and len(moved["moved"]) == 2
    _assert_png(plots.plot_meta_parameters(moved, path=str(tmp_path / "phi.png")))
    with pytest.raises(ValueError, match="strength"):
        plots.plot_meta_parameters({"erm": [{"step": 1, "loss": 1.0}]},
                                   path=str(tmp_path / "none.png"))


# --------------------------------------------------------------------------------- end to end


class _FakeUnlearn:
    """Stands in for the suite's unlearning job: records calls, writes unlearn.json."""

    def __init__(self):
        self.calls = []

    def __call__(self, workdir, forget, method, out, steps, cache, progress):
        self.calls.append((workdir, forget, method, steps))
        result = {"method": method, "forget": forget, "wall_time_s": 1.5,
                  "forget_quality": {"probe_acc": 0.25, "chance": 0.25, "alone_acc": 0.3},
                  "retained": {"missing": {"acc": 0.5}, "full": {"acc": 0.6}}}
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "unlearn.json"), "w") as f:
            json.dump(result, f)
        return result


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("suite"))
    fake = _FakeUnlearn()
    results = suite.reproduce("synthetic", out, get_config=default.get_config, seeds=1, tiny=True,
                              num_steps=10, method_names=("erm",), ablation=False,
                              unlearning=True, unlearn_job=fake)
    return out, results, fake


def test_suite_writes_results_table_and_plots(tiny_suite):
    out, results, fake = tiny_suite
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(results))
    assert set(saved) == {"erm", "_meta", "unlearning", "linear"}
    meta = saved["_meta"]
    assert meta["seeds"] == [0] and meta["steps"] == 10 and meta["runs"] == ["erm"]
    assert meta["modalities"] == list(MODS) and meta["curve_metric"] == "acc"
    assert meta["wall_time_s"]["erm"] > 0
    erm = saved["erm"]
    assert {"full", "missing", "missing_avg", "random_missing", "corruption",
            "robustness"} <= set(erm)
    assert set(erm["missing"]) == set(CONDITIONS)
    assert set(erm["random_missing"]) == set(RATES)
    assert set(erm["corruption"]) == set(MODS)
    assert set(erm["corruption"]["text"]["gaussian"]) == set(LEVELS)
    # One seed: each mean is the run's own eval.json number and each std is 0.
    with open(os.path.join(out, "runs", "erm", "seed0", "eval.json")) as f:
        ev = json.load(f)
    assert erm["full"]["acc"] == {"mean": ev["full"]["acc"], "std": 0.0}
    assert erm["missing"]["audio+vision"]["acc"]["mean"] == ev["missing"]["audio+vision"]["acc"]
    assert erm["random_missing"]["0.5"]["acc"]["mean"] == ev["random_missing"]["0.5"]["acc"]
    _close(erm["robustness"]["random_missing"]["effective"], 0.0, 0.0)  # erm against itself

    with open(os.path.join(out, "table.md")) as f:
        md = f.read()
    missing, missing_mask, rob, linear, unl = _table_rows(md)
    assert missing[0] == missing_mask[0] == ["Method", "Full", *CONDITIONS, "Avg"]
    assert [r[0] for r in missing[1:]] == ["erm"] and [r[0] for r in rob[1:]] == ["erm"]
    assert missing[1][1] == _cell(ev["full"]["acc"], 0.0)
    assert missing_mask[1][-1] == _cell(ev["missing_avg_mask"]["acc"], 0.0)
    # The linear reference: its cells are results.json's numbers (one fit, no std).
    assert linear[0] == ["Method", "Full", *CONDITIONS, "Avg"] and linear[1][0] == "linear"
    assert linear[1][1] == f"{100 * saved['linear']['full']['acc']:.1f}"
    assert saved["linear"]["pooling"] in ("mean", "flatten")
    assert [r[0] for r in unl[1:]] == list(suite.UNLEARNING_METHODS)
    assert "forget_quality/probe_acc" in unl[0] and "retained/missing/acc" in unl[0]

    for name in ("random_missing", "corruption", "spectra"):
        _assert_png(os.path.join(out, "plots", f"{name}.png"))
    # The unlearning hook: erm seed 0, forgetting the first modality, each method once.
    workdir = os.path.join(out, "runs", "erm", "seed0")
    assert [c[2] for c in fake.calls] == list(suite.UNLEARNING_METHODS)
    assert all(c[:2] == (workdir, "text") and c[3] == 5 for c in fake.calls)
    assert saved["unlearning"]["ccu"]["forget_quality"]["probe_acc"] == 0.25


def test_suite_rerun_resumes_without_training(tiny_suite):
    out, results, _ = tiny_suite

    def no_training(config_dict, workdir, progress):
        raise AssertionError(f"finished run retrained: {workdir}")

    def no_unlearning(*args):
        raise AssertionError("finished unlearning re-run")

    again = suite.reproduce("synthetic", out, get_config=default.get_config, seeds=1, tiny=True,
                            num_steps=10, method_names=("erm",), ablation=False, unlearning=True,
                            train_job=no_training, unlearn_job=no_unlearning)
    assert again["erm"] == results["erm"]
    assert again["unlearning"] == results["unlearning"]


@pytest.mark.slow  # CI: test_readme runs the quick suite with its default 2 workers
def test_workers_give_the_sequential_results(tiny_suite, tmp_path):
    """Two spawned worker processes train what one process trains, to the bit."""
    out, _, _ = tiny_suite
    par = str(tmp_path / "par")
    results = suite.reproduce("synthetic", par, get_config=default.get_config, seeds=1, tiny=True,
                              num_steps=10, method_names=("erm", "moddrop"), ablation=False,
                              unlearning=False, workers=2)
    path = os.path.join("runs", "erm", "seed0", "eval.json")
    with open(os.path.join(out, path)) as f, open(os.path.join(par, path)) as g:
        assert json.load(f) == json.load(g)
    assert set(results) == {"erm", "moddrop", "_meta", "linear"}
    with open(os.path.join(par, "wall_times.json")) as f:
        assert set(json.load(f)) == {"erm/seed0", "moddrop/seed0"}


def test_cli_bad_method_is_a_one_line_error(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.reproduce", "--suite=synthetic",
         f"--out={tmp_path / 'o'}", "--fast", "--tiny", "--num_steps=5", "--seeds=1",
         "--methods=erm,bogus", "--no_ablation", "--no_unlearning", "--dataset_path="],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "--methods" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_suite_two_seeds_with_modalimmune(tmp_path):
    """erm + modalimmune, 2 seeds: std over seeds, effective robustness, spectra and IG plots."""
    out = str(tmp_path / "suite")
    results = suite.reproduce("synthetic", out, get_config=default.get_config, seeds=2, tiny=True,
                              num_steps=30, method_names=("erm", "modalimmune"), ablation=False,
                              unlearning=False)
    evs = {}
    for name in ("erm", "modalimmune"):
        evs[name] = []
        for k in range(2):
            with open(os.path.join(out, "runs", name, f"seed{k}", "eval.json")) as f:
                evs[name].append(json.load(f))
        vals = np.array([e["full"]["acc"] for e in evs[name]])
        _close(results[name]["full"]["acc"], vals.mean(), np.sqrt(np.mean((vals - vals.mean())
                                                                           ** 2)))
    for p in ("random_missing", "corruption", "spectra", "information_gain"):
        _assert_png(os.path.join(out, "plots", f"{p}.png"))
    # Effective robustness by hand for seed 0 of modalimmune against erm seed 0 (trapezoid).
    r = np.array([float(x) for x in RATES])
    s = np.array([evs["modalimmune"][0]["random_missing"][x]["acc"] for x in RATES])
    ref = np.array([evs["erm"][0]["random_missing"][x]["acc"] for x in RATES])
    gap = s - (ref - ref[0] + s[0])
    er0 = np.sum((gap[1:] + gap[:-1]) / 2 * np.diff(r)) / (r[-1] - r[0])
    s1 = np.array([evs["modalimmune"][1]["random_missing"][x]["acc"] for x in RATES])
    ref1 = np.array([evs["erm"][1]["random_missing"][x]["acc"] for x in RATES])
    gap1 = s1 - (ref1 - ref1[0] + s1[0])
    er1 = np.sum((gap1[1:] + gap1[:-1]) / 2 * np.diff(r)) / (r[-1] - r[0])
    _close(results["modalimmune"]["robustness"]["random_missing"]["effective"],
           (er0 + er1) / 2, abs(er0 - er1) / 2)


def test_compare_to_baselines_by_hand():
    def stat(mean, std):
        return {"mean": mean, "std": std}

    def run(avg, std, full):
        return {"missing_avg": {"acc": stat(avg, std)}, "full": {"acc": stat(full, 0.0)}}

    results = {"erm": run(0.60, 0.01, 0.90), "moddrop": run(0.72, 0.006, 0.91),
               "consistency": run(0.65, 0.02, 0.90), "modalimmune": run(0.74, 0.008, 0.895)}
    cmp = tables.compare_to_baselines(results, metric="acc", higher_is_better=True)
    assert cmp["best_baseline"] == "moddrop"
    np.testing.assert_allclose(cmp["margin"], 0.02)
    np.testing.assert_allclose(cmp["pooled_std"], np.sqrt((0.008**2 + 0.006**2) / 2))
    assert cmp["holds"]
    np.testing.assert_allclose(cmp["full_gap_to_erm"], -0.005)
    # MAE: lower is better, so the sign flips and a smaller margin than the std fails.
    results = {"erm": run(0.80, 0.02, 0.10), "modalimmune": run(0.79, 0.03, 0.11)}
    cmp = tables.compare_to_baselines(results, metric="acc", higher_is_better=False)
    np.testing.assert_allclose([cmp["margin"], cmp["full_gap_to_erm"]], [0.01, -0.01])
    assert not cmp["holds"]
    assert tables.compare_to_baselines({"erm": results["erm"]}, metric="acc",
                                          higher_is_better=True) == {}


def test_ablation_pairs_and_table_by_hand():
    names = ["meta", "meta-no_meta", "meta_strength", "curv", "curv-no_curvature", "other",
             "meta-with_curvature", "other-with_regularizer", "lone-with_meta"]
    # "-with_S" pairs with its base only ("lone" is not a variant), and is no "with" of "-no_".
    assert tables.ablation_pairs(names) == [("meta", "meta-no_meta"),
                                            ("meta_strength", "meta-no_meta"),
                                            ("curv", "curv-no_curvature"),
                                            ("meta-with_curvature", "meta"),
                                            ("other-with_regularizer", "other")]
    stat = lambda mean, std: {"acc": {"mean": mean, "std": std}}
    run = lambda full, zero, mask: {"full": stat(*full), "missing_avg": stat(*zero),
                                    "missing_avg_mask": stat(*mask)}
    results = {"_meta": {"runs": ["curv", "curv-no_curvature"]},
               "curv": run((0.99, 0.0), (0.93, 0.003), (0.92, 0.004)),
               "curv-no_curvature": run((0.98, 0.0), (0.92, 0.004), (0.93, 0.003))}
    row = tables.ablation_table(results, metric="acc").splitlines()[2]
    # zero: +1.0 point over pooled std sqrt((0.3^2 + 0.4^2) / 2) = 0.3536 -> +2.8; mask: -2.8.
    assert row == ("| curv | 99.0 ± 0.0 / 93.0 ± 0.3 / 92.0 ± 0.4 | curv-no_curvature | "
                   "98.0 ± 0.0 / 92.0 ± 0.4 / 93.0 ± 0.3 | +1.0 (+2.8) / -1.0 (-2.8) |")
    assert tables.ablation_table({"_meta": {"runs": ["curv"]}, "curv": results["curv"]},
                                 metric="acc") == ""


_ORPHAN_PARENT = """
import concurrent.futures, multiprocessing, os, sys, time
from modalimmune_jax.studies import suite
if __name__ == "__main__":
    pool = concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"), initializer=suite._init_worker,
        initargs=(None,))
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 120)
    time.sleep(120)
"""


def test_workers_exit_when_the_suite_is_killed(tmp_path):
    """A SIGKILLed `reproduce` must not leave its spawned workers training on."""
    script = tmp_path / "parent.py"
    script.write_text(_ORPHAN_PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    worker = int(parent.stdout.readline())
    os.kill(worker, 0)  # alive, sleeping in its job
    parent.kill()
    parent.wait()
    for _ in range(100):
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(worker, 9)
        pytest.fail(f"worker {worker} outlived its killed parent by 10 s")


def test_defaults_sweep_flips_each_mechanism_against_the_config():
    from experiments.configs import sweeps

    variants = sweeps.defaults("digits")
    mi = default.get_config("digits").mi
    flipped = {}
    for c in suite.ABLATION_COMPONENTS:
        name = f"modalimmune-no_{c}" if mi[c] else f"modalimmune-with_{c}"
        flipped[name] = {"method": "modalimmune", f"mi.{c}": not mi[c]}
    assert variants == {"moddrop": {"method": "moddrop"}, "modalimmune": {"method": "modalimmune"},
                        **flipped}
