"""Training methods: the consistency divergence by hand, ModalImmune's pieces against exact
references (the null embedding against the full zero-filled pass, the removal rule observed through
the head), its trainer contract, and a ModalImmune run end to end."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from data_pipelines import pipeline
from experiments.configs import default
from modalimmune_jax.curvature_mask import CurvatureMaskState
from modalimmune_jax.interventions import drop_modalities
from modalimmune_jax.methods import METHODS, Method, make_method
from modalimmune_jax.methods.baselines import prediction_divergence
from modalimmune_jax.methods.modalimmune import META_PARAMS, ModalImmuneState, null_embeddings
from modalimmune_jax.model import ApplyFns, create_model, make_apply_fns
from modalimmune_jax.training import step, trainer
from modalimmune_jax.training.config import validate_config
from modalimmune_jax.training.errors import ConfigError


def test_prediction_divergence_by_hand():
    q, p = jnp.array([[0.0, 1.0]]), jnp.array([[1.0, 0.0]])
    sq, sp = np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum(), np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
    np.testing.assert_allclose(prediction_divergence(q, p, task="classification"),
                               [np.sum(sq * np.log(sq / sp))], rtol=1e-6)
    np.testing.assert_allclose(prediction_divergence(jnp.array([1.0, 3.0]), jnp.array([0.0, 1.0]),
                                                     task="regression"), [1.0, 4.0])
    assert float(prediction_divergence(q, q, task="classification")[0]) == 0.0
    # The reference first: KL(p || q), p = softmax([log 0.5, log 0.5]), q = [0.25, 0.75].
    q2, p2 = jnp.log(jnp.array([[0.25, 0.75]])), jnp.zeros((1, 2))
    np.testing.assert_allclose(
        prediction_divergence(q2, p2, task="classification", reference_first=True),
        [0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)], rtol=1e-6)
    np.testing.assert_allclose(
        prediction_divergence(q2, p2, task="classification"),
        [0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5)], rtol=1e-6)
    # At T = 2: logits [0, 2] against [2, 0] become [0, 1] against [1, 0] (sq, sp above), x 4.
    np.testing.assert_allclose(
        prediction_divergence(2.0 * q, 2.0 * p, task="classification", temperature=2.0),
        [4.0 * np.sum(sq * np.log(sq / sp))], rtol=1e-6)


def _run_modalimmune(tmp_path, *, meta):
    config = default.get_config("synthetic,tiny")
    with config.unlocked():
        config.mi.meta = meta
        # Every component: the curvature mask and the regularizer are off by default.
        config.mi.curvature = config.mi.regularizer = True
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


def _toy_two_modalities(feature_std=None, dropout=0.0):
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
        fns, params, batch, info, config = _toy_two_modalities(feature_std=std)
        loss_fn = make_consistency_loss(fns, info=info, config=config)
        for seed in range(3):  # whichever modality is picked
            _, meas = loss_fn(params, batch, jax.random.key(seed))
            assert (float(meas["consistency"]) == 0.0) == expect_zero, (std, seed)


def test_erm_dropout_draws_from_the_step_key():
    import jax

    from modalimmune_jax.methods.baselines import make_erm_loss, supervised_loss

    fns, params, batch, info, config = _toy_two_modalities(dropout=0.5)
    loss_fn = make_erm_loss(fns, info=info, config=config)
    a, _ = loss_fn(params, batch, jax.random.key(0))
    b, _ = loss_fn(params, batch, jax.random.key(1))
    again, _ = loss_fn(params, batch, jax.random.key(0))
    det, _ = supervised_loss(fns, params, batch, info=info, config=config)
    assert float(a) != float(b) and float(a) == float(again) and float(det) not in (a, b)
    fns0, params0, _, info0, config0 = _toy_two_modalities(dropout=0.0)
    no_drop = make_erm_loss(fns0, info=info0, config=config0)
    assert float(no_drop(params0, batch, jax.random.key(0))[0]) == float(
        no_drop(params0, batch, jax.random.key(1))[0])


# ------------------------------------------------------------------ ModalImmune's pieces


MODS = ("seq", "short", "vec")


def _toy(encoder="mlp", batch_size=16, seed=0):
    """A 3-modality toy model (two sequences of different lengths, one vector) and a batch."""
    info = pipeline.DatasetInfo(
        name="toy", modalities=MODS, feature_shapes={"seq": (6, 3), "short": (4, 2), "vec": (5,)},
        task="classification", num_classes=3, metric_family="classification",
        split_sizes={"train": batch_size, "valid": batch_size, "test": batch_size})
    config = default.get_config("synthetic,tiny")
    with config.unlocked():
        config.model.encoder = encoder
        config.model.d, config.model.d_h = 8, 12
    model = create_model(info, config.model, rngs=nnx.Rngs(params=jax.random.key(seed)))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(seed)
    # Every length from 0 (clipped to 1 by the model) to beyond T, in no order.
    lengths = np.stack([rng.integers(0, 8, batch_size), rng.integers(0, 5, batch_size),
                        np.ones(batch_size, int)], axis=1)
    batch = {"seq": rng.normal(size=(batch_size, 6, 3)),
             "short": rng.normal(size=(batch_size, 4, 2)),
             "vec": rng.normal(size=(batch_size, 5)), "lengths": lengths,
             "mask": np.ones((batch_size, 3)), "label": rng.integers(0, 3, batch_size)}
    batch = {k: jnp.asarray(v, jnp.int32 if k in ("lengths", "label") else jnp.float32)
             for k, v in batch.items()}
    return info, config, graphdef, params, batch


@pytest.mark.parametrize("encoder,batch_size", [
    ("mlp", 16), ("conv", 16), ("transformer", 4), ("mlp", 4),
    pytest.param("transformer", 16, marks=pytest.mark.slow)])
def test_null_embeddings_equal_the_full_zero_filled_pass(encoder, batch_size):
    # One row per possible length (or, with B <= T, the whole batch) against the encoder on the
    # whole zero-filled batch, with varied, zero and out-of-range lengths.
    _, _, graphdef, params, batch = _toy(encoder, batch_size)
    fns = make_apply_fns(graphdef)
    full = jax.jit(fns.encode)(params, drop_modalities(batch, jnp.zeros(3), modalities=MODS,
                                                       set_mask=False))
    ours = jax.jit(lambda p, b: null_embeddings(fns.encode, p, b, modalities=MODS))(params, batch)
    chex.assert_shape(ours, full.shape)
    np.testing.assert_allclose(ours, full, atol=1e-6, rtol=1e-6)
    # And its gradient (the null anchor trains the encoder's response to a missing input).
    g_full = jax.grad(lambda p: jnp.sum(jnp.sin(fns.encode(p, drop_modalities(
        batch, jnp.zeros(3), modalities=MODS, set_mask=False)))))(params)
    g_ours = jax.grad(lambda p: jnp.sum(jnp.sin(null_embeddings(fns.encode, p, batch,
                                                                modalities=MODS))))(params)
    chex.assert_trees_all_close(g_ours, g_full, atol=1e-5, rtol=1e-5)


def _recording_fns(graphdef, records, *, preds=False):
    """ApplyFns whose `head` records the presence mask it is given, or with `preds` the pair
    ``(mask, logits)`` (a seam for the tests)."""
    fns = make_apply_fns(graphdef)

    def head(params, z, mask, **kwargs):
        h, out = fns.head(params, z, mask, **kwargs)
        # Ordered: the clean branch's call comes first, then the collapsed branch's.
        record = ((lambda m, p: records.append((np.asarray(m), np.asarray(p)))) if preds
                  else (lambda m, p: records.append(np.asarray(m))))
        jax.debug.callback(record, mask, out, ordered=True)
        return h, out

    return ApplyFns(encode=fns.encode, head=head, reconstruct=fns.reconstruct, apply=fns.apply)


@pytest.mark.parametrize("direction,temperature", [("collapsed_clean", 1.0),
                                                   ("clean_collapsed", 2.0),
                                                   ("collapsed_uniform", 1.0)])
def test_distillation_is_the_hand_computed_kl_on_the_hit_examples(direction, temperature):
    """mi.distill_weight / distill_kl / distill_temperature against a numpy KL of the two
    branches' recorded logits, averaged over the examples that lost a modality, and its weight
    in the destructive loss."""
    info, config, graphdef, params, batch = _toy(batch_size=16)
    with config.unlocked():
        config.removal.mask_prob = 1.0  # every target flagged: the hit rows read off the mask
        config.mi.update({"controller": False, "curvature": False, "meta": False,
                          "regularizer": False, "p_clean": 0.3, "distill_weight": 0.5,
                          "distill_kl": direction, "distill_temperature": temperature})
    records = []
    method = make_method("modalimmune", _recording_fns(graphdef, records, preds=True), info=info,
                         config=config)
    _, _, meas, _ = jax.block_until_ready(jax.jit(
        lambda p, s, b, k: method.grads(p, s, b, k, step=jnp.int32(1), meta_batch=b))(
            params, method.init(params), batch, jax.random.key(3)))
    (_, clean), (hit_mask, col) = records
    hit_mask, col = hit_mask.reshape(16, 3), col.reshape(16, 3).astype(np.float64)
    rows = (hit_mask == 0).any(axis=1)
    assert 0 < rows.sum() < 16
    def log_softmax(x):
        x = x / temperature
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    if direction == "collapsed_uniform":
        clean = np.zeros_like(clean)  # the uniform prediction
    log_q, log_p = log_softmax(col), log_softmax(clean.astype(np.float64))
    if direction == "clean_collapsed":
        log_q, log_p = log_p, log_q
    kl = temperature**2 * np.sum(np.exp(log_q) * (log_q - log_p), axis=-1)
    np.testing.assert_allclose(float(meas["distill"]), kl[rows].mean(), rtol=1e-5)
    np.testing.assert_allclose(
        float(meas["destructive_loss"]),
        config.mi.collapse_weight * float(meas["collapsed_task_loss"]) + 0.5 * kl[rows].mean(),
        rtol=1e-5)


@pytest.mark.parametrize("collapse", [True, False])
@pytest.mark.parametrize("mask_prob", [0.0, 1.0, 0.5])
def test_modalimmune_targets_follow_the_shared_removal_rule(collapse, mask_prob):
    """config.removal.mask_prob decides the collapsed branch's mask, for both variants: 0 never
    changes it, 1 flags every collapsed/removed target, 0.5 flags about half the hit examples."""
    info, config, graphdef, params, batch = _toy(batch_size=64)
    with config.unlocked():
        config.removal.mask_prob = mask_prob
        config.mi.update({"collapse": collapse, "controller": False, "curvature": False,
                          "meta": False, "p_clean": 0.2})
    records = []
    method = make_method("modalimmune", _recording_fns(graphdef, records), info=info,
                         config=config)
    state = method.init(params)
    grads = jax.jit(lambda p, s, b, k: method.grads(p, s, b, k, step=jnp.int32(1),
                                                    meta_batch=b))
    target_entries = flagged_entries = 0.0
    for i in range(8):
        records.clear()
        _, _, meas, tx_args = jax.block_until_ready(grads(params, state, batch,
                                                          jax.random.key(i)))
        assert tx_args == {}
        clean_mask, hit_mask = records  # the clean branch, then the collapsed one
        np.testing.assert_array_equal(clean_mask, batch["mask"])
        assert set(np.unique(hit_mask)) <= {0.0, 1.0}
        removed = 1.0 - hit_mask  # [B, M]: 1 where a target was flagged absent
        targets = float(meas["num_targets"]) * 64  # target entries drawn in this batch
        assert targets > 0
        if mask_prob == 0.0:
            assert not removed.any()
        if mask_prob == 1.0:
            assert removed.sum() == round(targets)
            for m, name in enumerate(MODS):  # and each modality as often as it was targeted
                np.testing.assert_allclose(removed[:, m].mean(), meas[f"target_rate/{name}"])
        target_entries += targets
        flagged_entries += removed.sum()
    if mask_prob == 0.5:
        # One flag per example for all its targets (1 or 2): var <= 0.25 * 2 * entries.
        sd = np.sqrt(0.25 * 2 * target_entries)
        assert abs(flagged_entries - 0.5 * target_entries) < 5 * sd, (flagged_entries,
                                                                      target_entries)


def test_modalimmune_state_and_trainer_contract():
    info, config, graphdef, params, batch = _toy()
    with config.unlocked():
        config.mi.curvature = True  # off by default: its transform goes first in the chain
    method = make_method("modalimmune", make_apply_fns(graphdef),
                         info=info, config=config)
    assert isinstance(method, Method)
    assert isinstance(method.transform, optax.GradientTransformationExtraArgs)
    state = method.init(params)
    assert isinstance(state, ModalImmuneState)
    assert state.last_ig.dtype == jnp.float32 and state.meta_skips.dtype == jnp.int32
    assert state.effective_rank.dtype == jnp.float32 and state.curvature.count.dtype == jnp.int32
    with config.unlocked():
        config.method = "modalimmune"
    tx, _ = step.make_optimizer(config, transform=method.transform)
    opt_state = tx.init(params)
    assert isinstance(optax.tree.get(opt_state, "curvature_count"), jax.Array)
    assert optax.tree.get(opt_state, "scale") is not None
    assert any(isinstance(s, CurvatureMaskState) for s in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, CurvatureMaskState)))
    # A missing extra fails loudly, inside apply_if_finite too.
    with pytest.raises(TypeError):
        tx.update(params, opt_state, params)
    assert make_method("erm", make_apply_fns(graphdef), info=info, config=config).transform is None
    with config.unlocked():
        config.mi.curvature = False
    assert make_method("modalimmune", make_apply_fns(graphdef),
                       info=info, config=config).transform is None


def test_meta_update_beside_the_step_equals_it_fused_into_the_step():
    """The meta-update as the method's own programs around the step (`step.FlatStep.run`: compute,
    step, merge on due steps) against the form it replaced: the same update in a ``lax.cond``
    inside ``grads``, from the pre-step state, reverted with the rest of the method's state when
    the step is skipped. Steps 0-6 with a meta-update every 2 steps and a NaN batch on due step 4
    (skipped: phi keeps its value there). (The two were also bit-identical over 130 digits steps,
    metrics.jsonl and eval.json, default and every mechanism on, when the split was made.)"""
    from modalimmune_jax.methods.modalimmune import MetaUpdate

    info, config, graphdef, params, batch = _toy()
    with config.unlocked():
        config.method = "modalimmune"
        config.mi.update({"meta": True, "meta_every": 2, "meta_lr": 0.1, "curvature": False,
                          "ig_every": 3, "neumann_terms": 3, "num_lanczos_iters": 4})
    method = make_method("modalimmune", make_apply_fns(graphdef), info=info, config=config)
    periodic = method.periodic
    assert [s for s in range(7) if periodic.due(s)] == [2, 4, 6]

    def fused_grads(params, state, batch, rng, *, step, meta_batch):
        g, new_state, meas, tx_args = method.grads(params, state, batch, rng, step=step,
                                                   meta_batch=meta_batch)
        unchanged = MetaUpdate(new_state.phi, new_state.meta_opt, new_state.cert,
                               new_state.meta_skips)
        new_state, changed = jax.lax.cond(
            (step > 0) & (step % 2 == 0),
            lambda: periodic.apply(new_state, periodic.compute(
                params, state, batch, rng, step=step, meta_batch=meta_batch)),
            lambda: periodic.apply(new_state, unchanged))
        return g, new_state, {**meas, **changed}, tx_args

    fused = method._replace(grads=fused_grads, periodic=None)
    tx, _ = step.make_optimizer(config, transform=method.transform)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    rng_loop = jax.random.key(3)

    def flat_step(m):
        state = jax.jit(step.make_init_fn(None, tx, m))(None, params)  # no shared buffers
        flat = step.jit_flat_step(step.make_train_step(m, tx), state, replicated=one,
                                  data_sharding=one, periodic=m.periodic)
        return flat, flat.leaves(state)

    (ours, ours_leaves), (ref, ref_leaves) = flat_step(method), flat_step(fused)
    nan_batch = {**batch, "seq": batch["seq"].at[0, 0, 0].set(jnp.nan)}
    phis, first = [], jax.tree.map(np.asarray, ours.state(ours_leaves)["extra"].phi)
    for s in range(7):
        b = nan_batch if s == 4 else batch
        ours_leaves, ours_meas = ours.run(ours_leaves, b, batch, rng_loop, step=s)
        ref_leaves, ref_meas = ref.run(ref_leaves, b, batch, rng_loop, step=s)
        chex.assert_trees_all_close(ours_leaves, ref_leaves, rtol=1e-6, atol=1e-7)
        chex.assert_trees_all_close(ours_meas, ref_meas, rtol=1e-6, atol=1e-7)
        assert int(ours_meas["skipped"]) == (s == 4)
        phis.append(float(ours.state(ours_leaves)["extra"].phi.logit_strength))
    # The check bites: phi moved on due steps 2 and 6 only (4 was skipped), and not between.
    assert phis[0] == phis[1] != phis[2] == phis[3] == phis[4] == phis[5] != phis[6], phis
    # config.mi.meta_params: only the named components move (the default, "strength"); adam's
    # first step moves one by about meta_lr. Every component moving is tests/test_reliability.py's
    # valid-certificate case.
    last = ours.state(ours_leaves)["extra"].phi
    assert config.mi.meta_params == "strength"
    for field in META_PARAMS.values():
        moved = abs(float(getattr(last, field) - getattr(first, field)))
        expected = moved > 0.05 if field == META_PARAMS["strength"] else moved == 0.0
        assert expected, (field, moved)


@pytest.mark.parametrize("value", ["", "strength,strength", "gamma", "strength,,rec"])
def test_meta_params_typo_is_a_config_error(value):
    config = default.get_config("digits,tiny")
    with config.unlocked():
        config.mi.meta_params = value
    with pytest.raises(ConfigError, match="mi.meta_params"):
        validate_config(config, methods=METHODS)
