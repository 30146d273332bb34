"""Tests for modalimmune_jax.robustness: missing-modality and corruption protocol (DESIGN §5)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modalimmune_jax.robustness import (
    apply_missing,
    effective_robustness,
    gaussian_noise,
    missing_conditions,
    random_missing_keep,
    relative_robustness,
    summarize_seeds,
    timestep_drop,
)

MODS = ("text", "audio", "vision")


def _batch(b=4, t=5, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "text": jnp.asarray(rng.normal(size=(b, t, 3)), jnp.float32),
        "audio": jnp.asarray(rng.normal(size=(b, 2)), jnp.float32),
        "vision": jnp.asarray(rng.normal(size=(b, t, 4)), jnp.float32),
        "mask": jnp.ones((b, 3), jnp.float32),
        "label": jnp.arange(b, dtype=jnp.int32),
    }


# --------------------------------------------------------------------------- missing conditions


def test_missing_conditions_two_modalities():
    conds = missing_conditions(("text", "audio"))
    assert [n for n, _ in conds] == ["text", "audio"]
    np.testing.assert_array_equal(conds[0][1], [1, 0])
    np.testing.assert_array_equal(conds[1][1], [0, 1])


def test_missing_conditions_three_modalities():
    conds = missing_conditions(MODS)
    names = [n for n, _ in conds]
    assert names == ["text+audio", "text+vision", "audio+vision", "text", "audio", "vision"]
    want = [[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    for (_, keep), w in zip(conds, want, strict=True):
        assert keep.dtype == np.float32 and keep.shape == (3,)
        np.testing.assert_array_equal(keep, w)


def test_missing_conditions_four_modalities_are_all_proper_subsets():
    conds = missing_conditions("abcd")
    keeps = {tuple(k.astype(int)) for _, k in conds}
    assert len(conds) == 14 and len(keeps) == 14
    assert (0, 0, 0, 0) not in keeps and (1, 1, 1, 1) not in keeps
    sizes = [int(k.sum()) for _, k in conds]
    assert sizes == sorted(sizes, reverse=True)


# ------------------------------------------------------------------------------- apply_missing


@pytest.mark.parametrize("protocol", ["zero", "mask"])
def test_apply_missing_removes_information(protocol):
    batch = _batch()
    # NaN/inf in the removed modality must not leak through (0 * NaN would).
    batch["audio"] = batch["audio"].at[0, 0].set(jnp.nan).at[1, 1].set(jnp.inf)
    out = apply_missing(batch, np.array([1, 0, 1], np.float32), modalities=MODS, protocol=protocol)
    np.testing.assert_array_equal(out["audio"], np.zeros((4, 2), np.float32))
    for k in ("text", "vision", "label"):
        np.testing.assert_array_equal(out[k], batch[k])
    want_mask = np.ones((4, 3), np.float32)
    if protocol == "mask":
        want_mask[:, 1] = 0.0
    np.testing.assert_array_equal(out["mask"], want_mask)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, batch)


def test_apply_missing_per_sample_keep_and_unknown_protocol():
    batch = _batch()
    keep = np.array([[1, 1, 1], [0, 1, 1], [1, 0, 0], [1, 1, 0]], np.float32)
    out = apply_missing(batch, keep, modalities=MODS, protocol="mask")
    np.testing.assert_array_equal(out["mask"], keep)
    np.testing.assert_array_equal(out["text"][1], 0.0)
    np.testing.assert_array_equal(out["text"][0], batch["text"][0])
    np.testing.assert_array_equal(out["vision"][2:], 0.0)
    np.testing.assert_array_equal(out["vision"][:2], batch["vision"][:2])
    with pytest.raises(ValueError):
        apply_missing(batch, keep, modalities=MODS, protocol="drop")


# ------------------------------------------------------------------------------ random missing


@jax.jit
@chex.assert_max_traces(n=1)
def _keep_big(key, rate):
    return random_missing_keep(key, 30_000, 3, rate)


@pytest.mark.parametrize("rate", [0.1, 0.4, 0.7])
def test_random_missing_rate(rate):
    keep = np.asarray(_keep_big(jax.random.key(0), rate))
    assert keep.shape == (30_000, 3) and keep.dtype == np.float32
    assert set(np.unique(keep)) <= {0.0, 1.0}
    assert keep.sum(1).min() >= 1
    frac = 1.0 - keep.mean()
    # The all-dropped rescue returns one modality: E[frac] = rate - rate^M / M exactly.
    assert frac == pytest.approx(rate - rate**3 / 3, abs=0.01)
    assert abs(frac - rate) < 0.12
    # Independence across modalities: the pairwise drop rate of two columns is rate^2 - (rescues).
    both = np.mean((keep[:, 0] == 0) & (keep[:, 1] == 0))
    assert both == pytest.approx(rate**2 - rate**3 * 2 / 3, abs=0.01)


def test_random_missing_extremes():
    keep0 = np.asarray(random_missing_keep(jax.random.key(1), 64, 3, 0.0))
    np.testing.assert_array_equal(keep0, np.ones((64, 3)))
    keep1 = np.asarray(random_missing_keep(jax.random.key(1), 6000, 3, 1.0))
    np.testing.assert_array_equal(keep1.sum(1), np.ones(6000))  # exactly the rescued one
    np.testing.assert_allclose(keep1.mean(0), 1 / 3, atol=0.03)  # rescued uniformly


# ---------------------------------------------------------------------------------- corruption


def _padded_batch(b=200, t=40, d=3, seed=0):
    rng = np.random.default_rng(seed)
    batch = _batch(b, t, seed)
    batch["text"] = jnp.asarray(rng.normal(size=(b, t, d)) + 5.0, jnp.float32)
    lengths = rng.integers(1, t + 1, size=(b, 3)).astype(np.int32)
    batch["lengths"] = jnp.asarray(lengths)
    valid = np.arange(t)[None, :] < lengths[:, 0:1]  # [B, T] for text (column 0)
    return batch, valid


def test_gaussian_noise_std_and_padding():
    batch, valid = _padded_batch()
    feature_std = jnp.array([0.5, 1.0, 2.0])
    fn = jax.jit(
        lambda b, level, key: gaussian_noise(
            b, "text", level, key=key, feature_std=feature_std, modalities=MODS
        )
    )
    out = fn(batch, 0.3, jax.random.key(2))
    chex.assert_trees_all_equal_shapes_and_dtypes(out, batch)
    delta = np.asarray(out["text"] - batch["text"])
    np.testing.assert_array_equal(delta[~valid], 0.0)  # padding untouched
    std = delta[valid].std(axis=0)
    np.testing.assert_allclose(std, 0.3 * np.array([0.5, 1.0, 2.0]), rtol=0.05)
    np.testing.assert_allclose(delta[valid].mean(axis=0), 0.0, atol=0.03)
    for k in ("audio", "vision", "mask", "label", "lengths"):
        np.testing.assert_array_equal(out[k], batch[k])
    np.testing.assert_array_equal(fn(batch, 0.0, jax.random.key(2))["text"], batch["text"])


def test_gaussian_noise_without_lengths_and_vector_modality():
    batch = _batch(b=3000, t=2)
    std = jnp.array([1.0, 4.0])
    out = gaussian_noise(batch, "audio", 0.5, key=jax.random.key(3), feature_std=std)
    delta = np.asarray(out["audio"] - batch["audio"])
    np.testing.assert_allclose(delta.std(0), [0.5, 2.0], rtol=0.05)
    np.testing.assert_array_equal(out["text"], batch["text"])
    batch["lengths"] = jnp.ones((3000, 3), jnp.int32)
    with pytest.raises(ValueError):  # lengths present but no column order
        gaussian_noise(batch, "text", 0.5, key=jax.random.key(3), feature_std=jnp.ones(3))


@pytest.mark.parametrize("level", [0.3, 0.8])
def test_timestep_drop_rate_and_whole_steps(level):
    batch, valid = _padded_batch()
    batch["text"] = batch["text"].at[0, 0, 1].set(jnp.nan)  # a dropped NaN step must become 0
    fn = jax.jit(lambda b, lv, key: timestep_drop(b, "text", lv, key=key, modalities=MODS))
    out = fn(batch, level, jax.random.key(4))
    x, y = np.asarray(batch["text"]), np.asarray(out["text"])
    zero = np.all(y == 0.0, axis=-1)  # [B, T]; the original features are ~5, never 0
    same = np.all((y == x) | (np.isnan(x) & np.isnan(y)), axis=-1)
    assert np.all(zero ^ same)  # each step is either wholly zeroed or untouched
    assert not zero[~valid].any()  # padding untouched
    assert zero[valid].mean() == pytest.approx(level, abs=0.03)
    all_dropped = np.asarray(fn(batch, 1.0, jax.random.key(4))["text"])
    np.testing.assert_array_equal(all_dropped[valid], 0.0)  # including the NaN step
    np.testing.assert_array_equal(all_dropped[~valid], x[~valid])
    for k in ("audio", "vision", "mask", "label", "lengths"):
        np.testing.assert_array_equal(out[k], batch[k])
    np.testing.assert_array_equal(fn(batch, 0.0, jax.random.key(4))["text"], batch["text"])


def test_timestep_drop_vector_modality_and_no_lengths():
    batch = _batch(b=4000, t=6)
    out = timestep_drop(batch, "audio", 0.25, key=jax.random.key(5))
    dropped = np.all(np.asarray(out["audio"]) == 0.0, axis=-1)
    assert dropped.mean() == pytest.approx(0.25, abs=0.03)
    np.testing.assert_array_equal(np.asarray(out["audio"])[~dropped], batch["audio"][~dropped])
    out = timestep_drop(batch, "vision", 0.5, key=jax.random.key(6))
    assert np.all(np.asarray(out["vision"]) == 0.0, axis=-1).mean() == pytest.approx(0.5, abs=0.02)


# ----------------------------------------------------------------------------------- summaries


def test_relative_robustness_hand_computed():
    assert relative_robustness([0.0, 0.5, 1.0], [1.0, 0.5, 0.0]) == pytest.approx(0.5)
    # Non-uniform grid: (0.2 * 0.9 + 0.4 * 0.6) / 0.6.
    assert relative_robustness([0.0, 0.2, 0.6], [1.0, 0.8, 0.4]) == pytest.approx(0.7)
    levels = np.arange(10) / 10  # DESIGN's 0.0-0.9 grid: a flat curve at s gives s
    assert relative_robustness(levels, np.full(10, 0.7)) == pytest.approx(0.7)


def test_relative_robustness_equals_multibench_on_its_grid():
    scores = np.random.default_rng(7).random(11)
    # MultiBench eval_scripts/robustness.py relative_robustness_helper, on levels 0, 0.1, ..., 1.0.
    area = 0.0
    for i in range(len(scores) - 1):
        area += (scores[i] + scores[i + 1]) * 0.1 / 2
    assert relative_robustness(np.linspace(0, 1, 11), scores) == pytest.approx(area)


def test_effective_robustness_hand_computed():
    levels = [0.0, 0.5, 1.0]
    # baseline = ref - 0.8 + 0.9 = [0.9, 0.7, 0.4]; gap = [0, 0.1, 0.2]; area = 0.025 + 0.075.
    assert effective_robustness(levels, [0.9, 0.8, 0.6], [0.8, 0.6, 0.3]) == pytest.approx(0.1)
    assert effective_robustness(levels, [0.8, 0.6, 0.3], [0.8, 0.6, 0.3]) == pytest.approx(0.0)
    # Same degradation from a higher start earns nothing.
    assert effective_robustness(levels, [0.95, 0.75, 0.45], [0.8, 0.6, 0.3]) == pytest.approx(0.0)
    assert effective_robustness(levels, [0.8, 0.45, 0.1], [0.8, 0.6, 0.3]) == pytest.approx(-0.125)


def test_robustness_curve_validation():
    with pytest.raises(ValueError):
        relative_robustness([0.0, 0.0, 1.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        relative_robustness([0.0, 1.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        effective_robustness([0.0, 1.0], [1.0, 1.0], [1.0])


def test_summarize_seeds():
    runs = [
        {"acc": 0.5, "f1": 1.0, "missing": {"text": 0.1}},
        {"acc": 0.7, "f1": 1.0, "missing": {"text": 0.2}},
        {"acc": np.float32(0.9), "f1": 1.0, "missing": {"text": 0.6}},
    ]
    got = summarize_seeds(runs)
    assert got["acc"]["mean"] == pytest.approx(0.7)
    assert got["acc"]["std"] == pytest.approx(np.sqrt((0.2**2 + 0 + 0.2**2) / 3))  # ddof=0
    assert got["f1"] == {"mean": 1.0, "std": 0.0}
    assert got["missing"]["text"]["mean"] == pytest.approx(0.3)
    assert isinstance(got["acc"]["std"], float)
    assert summarize_seeds(runs[:1])["acc"] == {"mean": 0.5, "std": 0.0}
    with pytest.raises(ValueError):
        summarize_seeds([{"acc": 1.0}, {"f1": 1.0}])
    with pytest.raises(ValueError):
        summarize_seeds([])
