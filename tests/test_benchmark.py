"""The benchmark binary's JSON at a tiny size: every key of issue #5, ratios positive and finite.

Timings are never asserted (a shared CPU makes them noise); the refresh bookkeeping is checked
against the step conditions written out by hand.
"""

import json
import math

import pytest

from experiments.configs import default
from modalimmune_jax.studies import benchmark
from modalimmune_jax.training import files


def _numbers(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _numbers(v)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


def test_refresh_schedule_by_hand():
    mi = default.get_config("digits").mi
    with mi.unlocked():  # every refresh on, at periods chosen here
        mi.update({"controller": True, "curvature": True, "meta": True, "ig_every": 10,
                   "curv_every": 20, "meta_every": 50})
    assert benchmark.refresh_period(mi) == 100
    assert benchmark._refreshes(mi, 0) == {"controller_refresh", "hutchinson_refresh"}  # no meta
    assert benchmark._refreshes(mi, 1) == set()
    assert benchmark._refreshes(mi, 10) == {"controller_refresh"}
    assert benchmark._refreshes(mi, 40) == {"controller_refresh", "hutchinson_refresh"}
    assert benchmark._refreshes(mi, 50) == {"controller_refresh", "meta_update"}
    assert benchmark._refreshes(mi, 100) == {"controller_refresh", "hutchinson_refresh",
                                             "meta_update"}
    with mi.unlocked():
        mi.meta, mi.controller = False, False
    assert benchmark.refresh_period(mi) == 20
    assert benchmark._refreshes(mi, 100) == {"hutchinson_refresh"}


def _tiny_run(tmp, *, meta):
    """One tiny benchmark run, written and read back as the binary does.

    CI times erm, ModalImmune and its floor (the ratios' terms); the slow one every method."""
    config = default.get_config("digits,tiny")
    with config.unlocked():
        config.batch_size = 32
        # Short amortization periods keep the timed windows short. The meta-update's compile is
        # the slow one on CPU: CI leaves it out of the step; the slow test keeps it, at small K.
        config.mi.ig_every, config.mi.curv_every, config.mi.meta_every = 2, 3, 4
        config.mi.meta = meta
        config.mi.curvature = True  # off by default; on, so that every refresh is timed
        config.mi.neumann_terms, config.mi.num_lanczos_iters = 2, 2
    # The loop is timed for erm only here (each timed loop is a whole trainer run).
    methods = benchmark.STEP_METHODS if meta else ("erm", "modalimmune", "modalimmune-none")
    result = benchmark.run_benchmark(config, data_dir=str(tmp), repeats=1, calls=1,
                                     methods_to_time=methods,
                                     pipeline_batches=3, hypergrad_terms=(1, 2), loop_steps=20,
                                     loop_methods=("erm",))
    path = str(tmp / "bench.json")
    files.write_json(path, result)
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module", params=[False, pytest.param(True, marks=pytest.mark.slow)],
                ids=["no_meta", "meta"])
def tiny_result(request, tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("bench"), meta=request.param)


def test_json_has_every_key(tiny_result):
    r = tiny_result
    assert set(r["step_s"]) == (set(benchmark.STEP_METHODS) if r["amortization"]["meta"]
                                else {"erm", "modalimmune", "modalimmune-none"})
    assert set(r["components_s"]) == {"controller_refresh", "hutchinson_refresh", "meta_update",
                                      "collapse_regularizer"}
    meta = r["amortization"]["meta"]
    assert (r["components_s"]["meta_update"] is None) == (not meta)
    # With periods 2, 3 (and 4) every refresh set shows up at some step.
    assert set(r["modalimmune_step_s"]) >= {"plain", "controller_refresh", "hutchinson_refresh"}
    assert ("controller_refresh+meta_update" in r["modalimmune_step_s"]) == meta
    assert set(r["curvature_s"]) == {"grad", "hvp", "hvp_linearized", "neumann_term"}
    assert set(r["hypergrad_compile_s"]) == {"1", "2"}
    assert {"host_samples_per_s", "with_put_samples_per_s", "train_samples_per_s"} <= set(
        r["pipeline"])
    assert r["memory"]["peak_rss_mib"] > 0
    assert {"modalimmune_over_erm_step", "modalimmune_over_none_step", "modalimmune_first_call_s",
            "loop_over_step_throughput/erm", "hvp_over_grad", "neumann_term_over_hvp",
            "pipeline_over_step", "hypergrad_compile_kmax_over_kmin"} <= set(r["ratios"])
    assert set(r["loop_step_s"]) == {"erm"} and set(r["first_call_s"]) == set(r["step_s"])
    # The meta-update's own program compiles at its first due step, apart from the first call.
    assert set(r["periodic_first_call_s"]) == ({"modalimmune", "modalimmune-all"} if meta
                                               else set())
    assert r["ratios"]["modalimmune_compile_total_s"] == (
        r["first_call_s"]["modalimmune"] + r["periodic_first_call_s"].get("modalimmune", 0.0))
    # The floor's step is ModalImmune's with every component off, so it is no slower.
    assert r["ratios"]["modalimmune_over_none_step"] == (
        r["step_s"]["modalimmune"] / r["step_s"]["modalimmune-none"])
    assert r["window_steps"] == (12 if meta else 6)  # lcm(2, 3, 4) or lcm(2, 3)
    assert r["num_devices"] >= 1 and r["num_params"] > 0


def test_ratios_and_times_are_positive_finite(tiny_result):
    for name, value in tiny_result["ratios"].items():
        assert math.isfinite(value) and value > 0, (name, value)
    for key in ("step_s", "modalimmune_step_s", "curvature_s", "hypergrad_compile_s", "pipeline"):
        for value in _numbers(tiny_result[key]):
            assert math.isfinite(value) and value > 0, (key, value)
    for value in _numbers(tiny_result["components_s"]):  # differences of medians: any sign
        assert math.isfinite(value)
    # Every target whose ratio was measured (the tiny run times the loop for erm only).
    assert set(tiny_result["targets"]) == set(benchmark.TARGETS) - {
        "loop_over_step_throughput/modalimmune"}
    for name, target in tiny_result["targets"].items():
        assert target["value"] == tiny_result["ratios"][name]
        assert isinstance(target["met"], bool)
