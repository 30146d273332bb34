"""Modality unlearning: the pure pieces by hand, then every method end to end on tiny digits."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import default
from modalimmune_jax.interventions import drop_modalities
from modalimmune_jax.methods import unlearning
from modalimmune_jax.model import FusionModel, make_apply_fns
from modalimmune_jax.studies import unlearn
from modalimmune_jax.training import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODS = ("a", "b")


def _tiny_model():
    model = FusionModel(modalities=MODS, feature_shapes={"a": (3, 2), "b": (4,)},
                        task="classification", num_classes=3, d=4, d_h=6, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params, make_apply_fns(graphdef)


def _tiny_batch(key=0, n=5):
    ka, kb = jax.random.split(jax.random.key(key))
    return {"a": jax.random.normal(ka, (n, 3, 2)), "b": jax.random.normal(kb, (n, 4)),
            "lengths": jnp.tile(jnp.array([[3, 1]], jnp.int32), (n, 1)),
            "mask": jnp.ones((n, 2)), "label": jnp.arange(n) % 3}


# ------------------------------------------------------------------------------------- MANU


def test_manu_scores_by_hand():
    # Two neurons; the 5th row has weight 0 (padding) and must not count.
    forget = np.array([[1.0, 0.0], [3.0, 0.0], [-1.0, 2.0], [1.0, 2.0], [100.0, 100.0]])
    retain = np.array([[1.0, -1.0], [1.0, 1.0], [1.0, -1.0], [1.0, 1.0], [100.0, 100.0]])
    w = np.array([1.0, 1.0, 1.0, 1.0, 0.0])
    sf = unlearning.activation_statistics(jax.device_get(unlearning.activation_sums(forget, w)))
    sr = unlearning.activation_statistics(jax.device_get(unlearning.activation_sums(retain, w)))
    # Neuron 0, forget [1, 3, -1, 1]: mean|a| = 6/4, mean = 1, mean a^2 = 12/4 -> var 2, rms √3.
    # Neuron 1, forget [0, 0, 2, 2]: mean|a| = 1, mean = 1, mean a^2 = 2 -> var 1, rms √2.
    np.testing.assert_allclose(sf["abs"], [1.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(sf["var"], [2.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(sf["rms"], [math.sqrt(3), math.sqrt(2)], rtol=1e-6)
    # Retain: neuron 0 constant 1 (abs 1, var 0, rms 1); neuron 1 = ±1 (abs 1, var 1, rms 1).
    np.testing.assert_allclose(sr["abs"], [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(sr["var"], [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(sr["rms"], [1.0, 1.0], rtol=1e-6)
    weights = {"abs": 0.5, "var": 0.25, "rms": 0.25}
    scores = unlearning.manu_scores(sf, sr, weights)
    e = 1e-5
    s0 = 0.5 * (1.5 / (1 + e) - 1) + 0.25 * (2.0 / e - 1) + 0.25 * (math.sqrt(3) / (1 + e) - 1)
    s1 = (0.5 * (1.0 / (1 + e) - 1) + 0.25 * (1.0 / (1 + e) - 1)
          + 0.25 * (math.sqrt(2) / (1 + e) - 1))
    np.testing.assert_allclose(scores, [s0, s1], rtol=1e-5)
    assert s0 == pytest.approx(50000.1830, abs=1e-3)  # 0.2499925 + 49999.75 + 0.1830, by hand
    np.testing.assert_array_equal(unlearning.top_fraction(scores, 0.5), [True, False])
    np.testing.assert_array_equal(unlearning.top_fraction([3.0, 1.0, 3.0, 2.0], 0.5),
                                  [True, False, True, False])


def test_encoder_activations_and_pruning_match_the_layers():
    graphdef, params, _ = _tiny_model()
    batch = _tiny_batch()
    # jit: eagerly, every small op compiles on its own (slow on a busy CPU).
    acts = jax.jit(lambda p, b: unlearning.encoder_layer_activations(graphdef, p, b, index=0,
                                                                     modality="a"))(params, batch)
    assert set(acts) == {("proj",), ("out",)}
    p = params["encoders"][0]
    proj = batch["a"] @ p["proj"]["kernel"][...] + p["proj"]["bias"][...]  # [B, T, d]
    np.testing.assert_allclose(acts[("proj",)][0], proj, rtol=1e-5, atol=1e-6)
    hidden = jax.nn.gelu(proj + p["pos"][...][None]).mean(axis=1)  # learned positions, T = 3
    out = hidden @ p["out"]["kernel"][...] + p["out"]["bias"][...]
    np.testing.assert_allclose(acts[("out",)][0], out, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(acts[("proj",)][1], np.ones((5, 3)))

    mask = np.array([False, True, False, True])
    pruned = jax.jit(lambda p: unlearning.prune_rows(p, {("out",): mask}, index=0))(params)
    k = np.asarray(pruned["encoders"][0]["out"]["kernel"][...])
    np.testing.assert_array_equal(k[:, mask], 0.0)
    np.testing.assert_array_equal(k[:, ~mask], np.asarray(p["out"]["kernel"][...])[:, ~mask])
    np.testing.assert_array_equal(np.asarray(pruned["encoders"][0]["out"]["bias"][...])[mask], 0)
    # Other encoders and layers untouched.
    np.testing.assert_array_equal(pruned["encoders"][1]["out"]["kernel"][...],
                                  params["encoders"][1]["out"]["kernel"][...])
    np.testing.assert_array_equal(pruned["encoders"][0]["proj"]["kernel"][...],
                                  p["proj"]["kernel"][...])


# -------------------------------------------------------------------------------------- CCU


def _softmax_rows_without_self(s):
    out = np.zeros_like(s)
    for i in range(len(s)):
        others = [j for j in range(len(s)) if j != i]
        e = np.exp(s[i, others] - s[i, others].max())
        out[i, others] = e / e.sum()
    return out


def test_inverse_contrastive_loss_matches_a_loop():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 3))
    classes = np.array([0, 0, 1, 1, 1, 2])  # class 2 has no positive: not an anchor
    tau = 0.7
    u = z - z.mean(axis=0)
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    p = _softmax_rows_without_self(u @ u.T / tau)
    terms = []
    for i in range(6):
        pos = [j for j in range(6) if j != i and classes[j] == classes[i]]
        if pos:
            terms.append(max(0.0, math.log(p[i, pos].sum() * 5 / len(pos))))
    expected = sum(terms) / len(terms)
    assert expected > 0
    loss_fn = jax.jit(jax.value_and_grad(
        lambda x: unlearning.inverse_contrastive_loss(x, classes, temperature=tau)))
    np.testing.assert_allclose(loss_fn(jnp.asarray(z, jnp.float32))[0], expected, rtol=1e-5)
    # A collapsed embedding is at chance for every anchor: zero loss, finite gradient.
    value, g = loss_fn(jnp.ones((6, 3)))
    assert float(value) == 0.0 and np.all(np.isfinite(g))


def test_prototype_loss_is_the_mean_correlation_ratio():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(9, 4))
    classes = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    # eta^2 per feature: between-class sum of squares over the total one, by a loop.
    etas = []
    for j in range(4):
        x = z[:, j]
        between = sum(np.sum(classes == c) * (x[classes == c].mean() - x.mean()) ** 2
                      for c in range(3))
        etas.append(between / np.sum((x - x.mean()) ** 2))
    got = unlearning.prototype_loss(z, classes, num_classes=4)  # class 3 absent: no term
    np.testing.assert_allclose(got, np.mean(etas), rtol=1e-4)
    # Equal class means in every feature: nothing for a class-mean probe, loss 0.
    flat = np.array([[1.0, 2.0], [-1.0, -2.0], [1.0, -2.0], [-1.0, 2.0]])
    assert float(unlearning.prototype_loss(flat, np.array([0, 0, 1, 1]), num_classes=2)) < 1e-6
    # Features that are the class: loss 1.
    onehot = np.eye(2)[[0, 0, 1, 1]]
    np.testing.assert_allclose(
        unlearning.prototype_loss(onehot, np.array([0, 0, 1, 1]), num_classes=2), 1.0,
        rtol=1e-4)


def test_separation_loss_matches_a_loop():
    rng = np.random.default_rng(1)
    hf, hr = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    c = hr.mean(axis=0)
    expected = np.mean([max(0.0, 0.8 - (1 - np.dot(a - c, b - c) / np.linalg.norm(a - c)
                                        / np.linalg.norm(b - c))) for a, b in zip(hf, hr)])
    np.testing.assert_allclose(unlearning.separation_loss(hf, hr, margin=0.8), expected,
                               rtol=1e-5)
    # Gradient reaches only the forget side.
    g = jax.grad(lambda r: unlearning.separation_loss(hf, r, margin=0.8))(jnp.asarray(hr))
    np.testing.assert_array_equal(g, 0.0)


# ----------------------------------------------------------------------- batches and the gate


class _Info:
    modalities = MODS
    task = "classification"
    num_classes = 3


@pytest.mark.parametrize("mask_prob", [0.0, 1.0])
def test_retain_and_forget_batches_follow_the_removal_rule(mask_prob):
    """The retain batch zero-fills `a` (forgotten) and the forget batch `b`; at mask_prob 0 the
    mask stays 1, at 1 the removed column is 0 (the shared rule's two ends, DESIGN.md §2)."""
    _, params, fns = _tiny_model()
    batch = _tiny_batch()
    labels = np.asarray(batch["label"])

    def hand_loss(removed, flag):  # mean cross-entropy on a hand-built batch, in numpy
        b = {**batch, removed: jnp.zeros_like(batch[removed])}
        b["mask"] = batch["mask"].at[:, MODS.index(removed)].set(1.0 - flag)
        logits = np.asarray(fns.apply(params, b)["preds"], np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return -np.mean(logp[np.arange(len(labels)), labels])

    hp = unlearn.default_hparams()
    retain = unlearning.make_retain_loss(fns, info=_Info, index=0, hparams=hp,
                                         mask_prob=mask_prob)
    loss, _ = retain(params, params, batch, jax.random.key(0))
    np.testing.assert_allclose(loss, hand_loss("a", mask_prob), rtol=1e-5)
    neggrad = unlearning.make_neggrad_loss(fns, info=_Info, index=0, hparams=hp,
                                           mask_prob=mask_prob, max_forget_loss=1e9)
    _, meas = neggrad(params, params, batch, jax.random.key(1))
    np.testing.assert_allclose(meas["retain_loss"], hand_loss("a", mask_prob), rtol=1e-5)
    np.testing.assert_allclose(meas["forget_loss"], hand_loss("b", mask_prob), rtol=1e-5)


def test_forget_gate_cuts_the_modality_off():
    _, params, fns = _tiny_model()
    gated = unlearning.forget_gate(fns, index=0, modalities=MODS)
    batch, other = _tiny_batch(0), _tiny_batch(1)
    z = jax.jit(gated.encode)(params, batch)
    zero = drop_modalities(batch, jnp.array([0.0, 1.0]), modalities=MODS, set_mask=False)
    encode = jax.jit(fns.encode)
    null = encode(params, {**zero, "lengths": zero["lengths"].at[:, 0].set(1)})
    # z_m is the null embedding of a length-1 input, the same for every sample; the other
    # modality is untouched.
    np.testing.assert_array_equal(z[:, 0], null[:, 0])
    np.testing.assert_array_equal(z[:, 0], jnp.broadcast_to(z[0, 0], z[:, 0].shape))
    np.testing.assert_array_equal(z[:, 1], encode(params, batch)[:, 1])
    # Predictions ignore x_m and its mask entry: both protocols and any x_m give the same output.
    swapped = {**batch, "a": other["a"], "mask": batch["mask"].at[:, 0].set(0.0)}
    predict = jax.jit(lambda p, b: gated.apply(p, b)["preds"])
    np.testing.assert_array_equal(predict(params, batch), predict(params, swapped))
    # x_m is not a training target either: its reconstruction carries no gradient.
    grads = jax.jit(jax.grad(lambda p: jnp.sum(gated.apply(p, batch)["recon"][0])))(params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_chance_loss_by_hand():
    assert unlearning.chance_loss(np.array([0, 0, 1, 1]), task="classification",
                                  num_classes=3) == pytest.approx(math.log(2))
    # median 2.5 -> mean |y - 2.5| = (1.5 + 0.5 + 0.5 + 7.5) / 4
    assert unlearning.chance_loss(np.array([1.0, 2.0, 3.0, 10.0]), task="regression",
                                  num_classes=1) == pytest.approx(2.5)
    assert unlearning.chance_loss(np.array([[1, 0], [1, 1]]), task="multilabel",
                                  num_classes=2) == pytest.approx(math.log(2) / 2)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = default.get_config("digits,tiny")
    with config.unlocked():
        config.num_steps = 60
        config.eval_every = 60
        config.checkpoint_every = 60
        # The final robustness protocol (tested in test_train) compiles dozens of programs;
        # these tests need only the checkpoint.
        config.eval.protocol = "full"
        # The digits preset's encoder (tiny switches to the MLP): MANU prunes its conv layer too.
        config.model.encoder = "conv"
    workdir = str(tmp_path_factory.mktemp("unl") / "erm")
    trainer.train_and_evaluate(config, workdir)
    return workdir


def _check_body(result, method, steps):
    assert result["method"] == method and result["forget"] == "left"
    assert result["steps"] == steps and result["metric"] == "acc"
    assert isinstance(result["wall_time_s"], float) and result["wall_time_s"] > 0
    for body in (result, result["original"]):
        fq = body["forget_quality"]
        assert set(fq) == {"probe_acc", "chance", "alone_acc", "alone_acc_mask", "ig",
                           "forget_loss"}
        assert all(isinstance(v, float) and np.isfinite(v) for v in fq.values())
        assert 0.0 <= fq["probe_acc"] <= 1.0 and 0.0 < fq["chance"] < 1.0
        assert set(body["retained"]) == {"full", "without", "without_mask"}
        for block in (*body["retained"].values(), *body["alone"].values()):
            assert set(block) == {"acc", "f1_weighted", "f1_macro"}
    # digits' train split: class 3 is the majority (128 of 1257); the test split has 27 of 270.
    assert result["forget_quality"]["chance"] == pytest.approx(27 / 270)


STEPS = 4


@pytest.mark.parametrize("method", ["finetune", "ccu", "manu"])
def test_method_writes_unlearn_json(trained, tmp_path, method):
    out = str(tmp_path / method)
    result = unlearn.unlearn(trained, "left", method, out, steps=STEPS)
    with open(os.path.join(out, "unlearn.json")) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    _check_body(result, method, STEPS)
    if method == "manu":
        layers = result["details"]["layers"]
        # tiny: d = 16 neurons per layer, 20% -> round(3.2) = 3 zeroed in each of the digits
        # preset's conv encoder's layers (proj, conv, out; the fixture keeps the conv encoder).
        assert {k: v["pruned"] for k, v in layers.items()} == {"proj": 3, "conv": 3, "out": 3}


def test_neggrad_raises_the_forget_loss(trained, tmp_path):
    result = unlearn.unlearn(trained, "left", "neggrad", str(tmp_path / "ng"), steps=STEPS,
                             hparams={"lr": 1e-2, "neggrad": {"forget_weight": 5.0}})
    _check_body(result, "neggrad", STEPS)
    assert (result["forget_quality"]["forget_loss"]
            > result["original"]["forget_quality"]["forget_loss"])
    assert result["details"]["max_forget_loss"] == pytest.approx(
        -sum(c / 1257 * math.log(c / 1257) for c in (124, 127, 124, 128, 127, 127, 127, 125,
                                                      122, 126)))


@pytest.mark.parametrize("method", ["modalimmune", "retrain"])
def test_gated_methods_leave_nothing_to_probe(trained, tmp_path, method):
    out = str(tmp_path / method)
    result = unlearn.unlearn(trained, "left", method, out, steps=STEPS)
    _check_body(result, method, STEPS)
    fq = result["forget_quality"]
    # z_m is one constant row for every sample: the probe can only predict the majority class.
    assert fq["probe_acc"] == fq["chance"]
    # Removing m changes nothing, under either protocol.
    assert fq["ig"] == 0.0
    assert result["retained"]["without"] == result["retained"]["without_mask"]
    assert result["retained"]["without"] == result["retained"]["full"]
    if method == "retrain":
        assert os.path.exists(os.path.join(out, "retrain_run", "eval.json"))


def test_cli_rejects_an_unknown_modality(trained, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.unlearn", f"--workdir={trained}", "--forget=nose",
         "--method=ccu", f"--out={tmp_path / 'x'}", "--hparams.ccu.margin=0.5"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "--forget='nose'" in last and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------ slow


@pytest.fixture(scope="module")
def digits_comparison(tmp_path_factory):
    """Full digits (erm, 1500 steps), then retrain, modalimmune and CCU forgetting `left`."""
    root = tmp_path_factory.mktemp("unl_digits")
    workdir = str(root / "erm")
    trainer.train_and_evaluate(default.get_config("digits"), workdir)
    return {m: unlearn.unlearn(workdir, "left", m, str(root / m))
            for m in ("retrain", "modalimmune", "ccu")}


def _forgets_and_keeps_retrain_utility(results, method):
    fq = results[method]["forget_quality"]
    # The probe can read m before unlearning (0.82 measured), so near-chance is a real change.
    assert results[method]["original"]["forget_quality"]["probe_acc"] > 0.5
    assert fq["probe_acc"] <= fq["chance"] + 0.05, fq
    gold = results["retrain"]["retained"]["without"]["acc"]
    assert results[method]["retained"]["without"]["acc"] >= gold - 0.02, (gold, results[method])


@pytest.mark.slow
def test_modalimmune_forgets_and_keeps_retrain_utility(digits_comparison):
    _forgets_and_keeps_retrain_utility(digits_comparison, "modalimmune")


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "measured on digits (erm 1500 steps, seed 1): CCU's probe accuracy on z_left only falls from "
    "0.80 to 0.77 (chance 0.10; 0.58 after 1000 steps), while its utility without `left` is "
    "0.926, up from 0.70 before the KL retention distilled the full-input predictions"))
def test_ccu_forgets_and_keeps_retrain_utility(digits_comparison):
    _forgets_and_keeps_retrain_utility(digits_comparison, "ccu")
