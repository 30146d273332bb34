"""ModalImmune on a model of one's own (notebooks/own_model.py): a GRU encoder, through the API.

The example's model goes through the trainer's `Hooks(build_model=...)`; a few steps must show
the controller, the collapse and the curvature mask acting on it (non-trivial measurements), and
the evaluation must run on it.
"""

import importlib.util
import json
import os

import numpy as np

from modalimmune_jax.training import Hooks, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example():
    spec = importlib.util.spec_from_file_location(
        "own_model", os.path.join(ROOT, "notebooks", "own_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_own_model_trains_with_modalimmune(tmp_path):
    example = _example()
    config = example.own_model_config(num_steps=12)
    with config.unlocked():
        config.log_every, config.eval_every, config.checkpoint_every = 2, 12, 12
        config.mi.ig_every, config.mi.curv_every = 2, 3
        config.mi.meta = False  # the hypergradient's compile; tested on the library's model
        config.mi.curvature = True  # off by default; its mask acting on the own model is tested
        config.eval.protocol = "missing"
    workdir = str(tmp_path / "own")
    outcome = train(config, workdir, progress=False, hooks=Hooks(
        build_model=lambda info, cfg, rngs: example.OwnModel(info, cfg, rngs=rngs)))
    # The trainer built the example's model: its GRU cell's parameters are in the checkpoint.
    assert "cell" in outcome.params["encoders"][0]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    last = records[-1]
    mods = ("left", "right", "down")
    # The controller measured each modality's gain and keeps an EMA of it.
    assert any(last[f"gain_ema/{m}"] != 0.0 for m in mods)
    assert all(np.isfinite(last[f"ig/{m}"]) for m in mods)
    # The collapse hit examples, and the collapsed branch's loss is its own.
    assert 0.0 < last["num_targets"] <= 2.0
    assert any(last[f"target_rate/{m}"] > 0 for m in mods)
    assert np.isfinite(last["collapsed_task_loss"])
    assert last["collapsed_task_loss"] != last["task_loss"]
    assert abs(last["strength"] - config.mi.strength) < 1e-6
    # The curvature mask damped part of the destructive gradient.
    assert any(r["mask_fraction"] > 0 for r in records)
    assert 0.0 <= outcome.results["full"]["acc"] <= 1.0
    assert set(outcome.results["missing"]) == {"left+right", "left+down", "right+down",
                                               "left", "right", "down"}
