"""Training methods: the consistency divergence by hand, and a ModalImmune run end to end."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import default
from modalimmune_jax.methods.baselines import prediction_divergence
from modalimmune_jax.training import trainer


def test_prediction_divergence_by_hand():
    q, p = jnp.array([[0.0, 1.0]]), jnp.array([[1.0, 0.0]])
    sq, sp = np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum(), np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
    np.testing.assert_allclose(prediction_divergence(q, p, task="classification"),
                               [np.sum(sq * np.log(sq / sp))], rtol=1e-6)
    np.testing.assert_allclose(prediction_divergence(jnp.array([1.0, 3.0]), jnp.array([0.0, 1.0]),
                                                     task="regression"), [1.0, 4.0])
    assert float(prediction_divergence(q, q, task="classification")[0]) == 0.0


def _run_modalimmune(tmp_path, *, meta):
    config = default.get_config("synthetic,tiny")
    with config.unlocked():
        config.mi.meta = meta
        config.method = "modalimmune"
        config.num_steps = 6
        config.log_every = 1
        config.eval_every = 6
        config.checkpoint_every = 6
        config.mi.ig_every = 2
        config.mi.curv_every = 2
        config.mi.meta_every = 3
    workdir = str(tmp_path / "mi")
    return trainer.train_and_evaluate(config, workdir), workdir


@pytest.mark.slow
def test_modalimmune_runs_end_to_end_with_every_component(tmp_path):
    """All five components, the certified meta-update included (a slow compile on CPU)."""
    results, workdir = _run_modalimmune(tmp_path, meta=True)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("ig/text", "gain_ema/audio", "target_rate/text", "strength", "cert/valid",
                "cert/bound", "mask_fraction", "meta_skips", "regularizer", "effective_rank_target"):
        assert key in records[-1], key
    assert all(np.isfinite(r["loss"]) for r in records)
    # The IG refresh at step 0 fills the controller; a meta-update ran at step 3 (certified or
    # skipped and counted).
    assert any(r["ig/text"] != 0.0 for r in records)
    assert records[-1]["cert/lambda_max"] != 0.0
    assert set(results) >= {"full", "missing", "missing_avg", "random_missing", "corruption",
                            "robustness", "reconstruction", "missing_mask"}
    assert set(results["missing"]) == {"text+audio", "text+vision", "audio+vision", "text",
                                       "audio", "vision"}


def test_modalimmune_fast_variant(tmp_path):
    """CI's version: every component but the meta-update (tested on its own in test_hypergrad)."""
    results, workdir = _run_modalimmune(tmp_path, meta=False)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "loss" in r]
    assert len(records) == 6 and all(np.isfinite(r["loss"]) for r in records)
    assert any(r["ig/text"] != 0.0 for r in records) and "mask_fraction" in records[-1]
    assert {"full", "missing_avg", "robustness"} <= set(results)


def _toy(feature_std=None, dropout=0.0):
    """A 2-modality toy model and batch, and a config with its consistency and dropout settings."""
    import jax
    from flax import nnx

    from data_pipelines.pipeline import DatasetInfo
    from modalimmune_jax.model import create_model, make_apply_fns

    config = default.get_config("synthetic,tiny")
    with config.unlocked():
        config.model.dropout = dropout
        config.consistency.eps = 0.5
    info = DatasetInfo(name="toy", modalities=("a", "b"), feature_shapes={"a": (4, 3), "b": (2,)},
                       task="classification", num_classes=3, metric_family="classification",
                       split_sizes={"train": 8, "valid": 8, "test": 8},
                       feature_std=feature_std or {})
    model = create_model(info, config.model, rngs=nnx.Rngs(params=jax.random.key(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    ka, kb, ky = jax.random.split(jax.random.key(1), 3)
    batch = {"a": jax.random.normal(ka, (8, 4, 3)), "b": jax.random.normal(kb, (8, 2)),
             "lengths": jnp.full((8, 2), jnp.asarray([4, 1])), "mask": jnp.ones((8, 2)),
             "label": jax.random.randint(ky, (8,), 0, 3)}
    return make_apply_fns(graphdef), params, batch, info, config


def test_consistency_perturbs_in_units_of_the_feature_std():
    import jax

    from modalimmune_jax.methods.baselines import make_consistency_loss

    zero = {"a": (0.0, 0.0, 0.0), "b": (0.0, 0.0)}
    for std, expect_zero in ((zero, True), ({"a": (1.0,) * 3, "b": (1.0,) * 2}, False)):
        fns, params, batch, info, config = _toy(feature_std=std)
        loss_fn = make_consistency_loss(fns, info=info, config=config)
        for seed in range(3):  # whichever modality is picked
            _, meas = loss_fn(params, batch, jax.random.key(seed))
            assert (float(meas["consistency"]) == 0.0) == expect_zero, (std, seed)


def test_erm_dropout_draws_from_the_step_key():
    import jax

    from modalimmune_jax.methods.baselines import make_erm_loss, supervised_loss

    fns, params, batch, info, config = _toy(dropout=0.5)
    loss_fn = make_erm_loss(fns, info=info, config=config)
    a, _ = loss_fn(params, batch, jax.random.key(0))
    b, _ = loss_fn(params, batch, jax.random.key(1))
    again, _ = loss_fn(params, batch, jax.random.key(0))
    det, _ = supervised_loss(fns, params, batch, info=info, config=config)
    assert float(a) != float(b) and float(a) == float(again) and float(det) not in (a, b)
    fns0, params0, _, info0, config0 = _toy(dropout=0.0)
    no_drop = make_erm_loss(fns0, info=info0, config=config0)
    assert float(no_drop(params0, batch, jax.random.key(0))[0]) == float(
        no_drop(params0, batch, jax.random.key(1))[0])
