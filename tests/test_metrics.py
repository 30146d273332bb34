"""Tests for modalimmune_jax.metrics: sklearn/scipy references, MMSA's code, hand-computed cases."""

import warnings

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
)

from modalimmune_jax.metrics import (
    classification_metrics,
    compute_metrics,
    iemocap_metrics,
    pearson_corr,
    primary_metric,
    regression_metrics,
    sentiment_metrics,
)

SENTIMENT_KEYS = {
    "Has0_acc_2",
    "Has0_F1_score",
    "Non0_acc_2",
    "Non0_F1_score",
    "Mult_acc_5",
    "Mult_acc_7",
    "MAE",
    "Corr",
}


def _mmsa_eval_mosei_regression(test_preds, test_truth):
    """MMSA's metricsTop.__eval_mosei_regression, transcribed (minus torch and the rounding)."""

    def multiclass_acc(y_pred, y_true):
        return np.sum(np.round(y_pred) == np.round(y_true)) / float(len(y_true))

    test_preds_a7 = np.clip(test_preds, a_min=-3.0, a_max=3.0)
    test_truth_a7 = np.clip(test_truth, a_min=-3.0, a_max=3.0)
    test_preds_a5 = np.clip(test_preds, a_min=-2.0, a_max=2.0)
    test_truth_a5 = np.clip(test_truth, a_min=-2.0, a_max=2.0)
    mae = np.mean(np.absolute(test_preds - test_truth))
    corr = np.corrcoef(test_preds, test_truth)[0][1]
    mult_a7 = multiclass_acc(test_preds_a7, test_truth_a7)
    mult_a5 = multiclass_acc(test_preds_a5, test_truth_a5)
    non_zeros = np.array([i for i, e in enumerate(test_truth) if e != 0])
    non_zeros_binary_truth = test_truth[non_zeros] > 0
    non_zeros_binary_preds = test_preds[non_zeros] > 0
    non_zeros_acc2 = accuracy_score(non_zeros_binary_preds, non_zeros_binary_truth)
    non_zeros_f1_score = f1_score(
        non_zeros_binary_truth, non_zeros_binary_preds, average="weighted"
    )
    binary_truth = test_truth >= 0
    binary_preds = test_preds >= 0
    acc2 = accuracy_score(binary_preds, binary_truth)
    f_score = f1_score(binary_truth, binary_preds, average="weighted")
    return {
        "Has0_acc_2": acc2,
        "Has0_F1_score": f_score,
        "Non0_acc_2": non_zeros_acc2,
        "Non0_F1_score": non_zeros_f1_score,
        "Mult_acc_5": mult_a5,
        "Mult_acc_7": mult_a7,
        "MAE": mae,
        "Corr": corr,
    }


# ------------------------------------------------------------------------------------ sentiment


def test_sentiment_matches_mmsa_on_random_inputs():
    rng = np.random.default_rng(0)
    # MOSI labels are averages of 3 annotators on a 7-point scale: multiples of 1/3, many exact 0s.
    labels = np.clip(np.round(rng.normal(0, 1.5, 500) * 3) / 3, -3, 3)
    labels[:40] = 0.0
    preds = labels + rng.normal(0, 1.0, 500)
    got = sentiment_metrics(preds.astype(np.float32)[:, None], labels.astype(np.float32))
    want = _mmsa_eval_mosei_regression(
        preds.astype(np.float32).astype(np.float64), labels.astype(np.float32).astype(np.float64)
    )
    assert set(got) == SENTIMENT_KEYS
    for k in SENTIMENT_KEYS:
        assert isinstance(got[k], float), k
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-12, err_msg=k)
    assert got["Has0_acc_2"] != got["Non0_acc_2"]  # the 40 zero labels matter
    np.testing.assert_allclose(got["Corr"], pearsonr(preds, labels)[0], rtol=1e-5)


def test_sentiment_hand_computed():
    # Ties 0.5, -0.5, 1.5, 2.5, -2.5 exercise round-half-to-even; 2.6 vs 2.2 match only after the
    # +-2 clip; two labels are exactly 0 so Has0 and Non0 differ.
    preds = np.array([0.5, -0.5, 1.5, 2.5, -2.5, 0.0, -0.2, 2.6])
    labels = np.array([0.0, 0.0, 2.0, 2.0, -2.0, 1.0, -1.0, 2.2])
    got = sentiment_metrics(preds, labels)
    # Has0: preds>=0 TFTTFTFT, labels>=0 TTTTFTFT -> 7/8.
    assert got["Has0_acc_2"] == pytest.approx(7 / 8)
    # True class: support 6, P=1, R=5/6 -> 10/11; False class: support 2, P=2/3, R=1 -> 4/5.
    assert got["Has0_F1_score"] == pytest.approx((6 * 10 / 11 + 2 * 4 / 5) / 8)
    # Non0 drops the two zero labels: preds>0 TTFFFT vs labels>0 TTFTFT -> 5/6.
    assert got["Non0_acc_2"] == pytest.approx(5 / 6)
    assert got["Non0_F1_score"] == pytest.approx((4 * 6 / 7 + 2 * 4 / 5) / 6)
    # a7: rounded preds 0,-0,2,2,-2,0,-0,3 vs labels 0,0,2,2,-2,1,-1,2 -> 5/8 (half-away: 1/8).
    assert got["Mult_acc_7"] == pytest.approx(5 / 8)
    # a5: 2.6 and 2.2 both clip to 2 -> 6/8.
    assert got["Mult_acc_5"] == pytest.approx(6 / 8)
    assert got["MAE"] == pytest.approx(4.7 / 8)


def test_sentiment_f1_argument_order():
    # Weighted F1 is asymmetric: weighted by true-class support, not predicted-class support.
    preds = np.array([1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0])
    labels = np.array([1.0, 1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0])
    got = sentiment_metrics(preds, labels)
    right = f1_score(labels >= 0, preds >= 0, average="weighted")
    wrong = f1_score(preds >= 0, labels >= 0, average="weighted")
    assert right != pytest.approx(wrong)
    assert got["Has0_F1_score"] == pytest.approx(right)


def test_sentiment_clipping():
    preds = np.array([5.0, -7.0, 3.4, -2.2])
    labels = np.array([3.0, -3.0, 2.6, -2.0])
    got = sentiment_metrics(preds, labels)
    assert got["Mult_acc_7"] == 1.0  # 5 -> 3, -7 -> -3, 3.4 -> 3, -2.2 -> -2
    assert got["Mult_acc_5"] == 1.0


def test_sentiment_constant_predictions_give_zero_corr():
    labels = np.array([-1.0, 0.0, 2.0, 1.4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero RuntimeWarning either
        got = sentiment_metrics(np.full(4, 0.3), labels)
        got_const_label = sentiment_metrics(labels, np.full(4, 1.0))
    assert got["Corr"] == 0.0 and got_const_label["Corr"] == 0.0
    assert all(np.isfinite(v) for v in got.values())


def test_sentiment_all_zero_labels():
    got = sentiment_metrics(np.array([0.3, -0.2]), np.zeros(2))
    assert np.isnan(got["Non0_acc_2"]) and np.isnan(got["Non0_F1_score"])
    assert got["Has0_acc_2"] == 0.5


def test_pearson_corr_matches_scipy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=100)
    y = 0.5 * x + rng.normal(size=100)
    assert pearson_corr(x, y) == pytest.approx(pearsonr(x, y)[0], rel=1e-10)
    assert pearson_corr([1.0], [2.0]) == 0.0


# -------------------------------------------------------------------------------------- iemocap


def test_iemocap_hand_computed():
    names = ("Neutral", "Happy", "Sad", "Angry")
    # logit[..., 0] = 0 and logit[..., 1] = d, so the binary prediction is d > 0 and the 4-class
    # score is d itself.
    d = np.array(
        [
            [2.0, -1.0, -1.0, -1.0],
            [-1.0, 1.0, -1.0, -1.0],
            [3.0, 1.0, -1.0, -1.0],
            [-1.0, -1.0, 1.0, 1.0],
            [-1.0, -1.0, -1.0, -1.0],
        ]
    )
    logits = np.stack([np.zeros_like(d), d], axis=-1)
    labels = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    got = iemocap_metrics(logits, labels)
    assert got["Neutral_acc"] == pytest.approx(4 / 5)
    neutral_f1 = (1 * 2 / 3 + 4 * 6 / 7) / 5  # class 1: P=1/2, R=1; class 0: P=1, R=3/4
    assert got["Neutral_f1"] == pytest.approx(neutral_f1)
    for n in names[1:]:
        assert got[f"{n}_acc"] == 1.0 and got[f"{n}_f1"] == 1.0
    assert got["avg_acc"] == pytest.approx((0.8 + 3) / 4)
    assert got["avg_f1"] == pytest.approx((neutral_f1 + 3) / 4)
    # 4-class: samples 0-2 have one label (3 has two, 4 none); predictions 0, 1, 0 vs 0, 1, 1.
    assert got["acc4_weighted"] == pytest.approx(2 / 3)
    assert got["acc4_unweighted"] == pytest.approx((1.0 + 0.5) / 2)


def test_iemocap_matches_sklearn_on_random_inputs():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(300, 4, 2))
    labels = (rng.random((300, 4)) < 0.3).astype(np.int32)
    # Flat [N, 8] logits as MulT's head emits them.
    got = iemocap_metrics(logits.reshape(300, 8), labels)
    for i, n in enumerate(("Neutral", "Happy", "Sad", "Angry")):
        pred = np.argmax(logits[:, i], axis=1)
        assert got[f"{n}_acc"] == pytest.approx(accuracy_score(labels[:, i], pred))
        assert got[f"{n}_f1"] == pytest.approx(f1_score(labels[:, i], pred, average="weighted"))
    single = labels.sum(1) == 1
    y4 = np.argmax(labels[single], 1)
    p4 = np.argmax(logits[single, :, 1] - logits[single, :, 0], 1)
    assert got["acc4_weighted"] == pytest.approx(accuracy_score(y4, p4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert got["acc4_unweighted"] == pytest.approx(balanced_accuracy_score(y4, p4))


def test_iemocap_unweighted_with_absent_true_class():
    # Predicted class 3 never occurs in the gold labels: recall is averaged over gold classes only.
    logits = np.zeros((3, 4, 2))
    logits[0, 0, 1] = logits[1, 3, 1] = logits[2, 1, 1] = 1.0
    labels = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]])
    got = iemocap_metrics(logits, labels)
    assert got["acc4_unweighted"] == pytest.approx((0.5 + 1.0) / 2)
    assert got["acc4_weighted"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------- classification/regression


def test_classification_hand_computed():
    got = classification_metrics(np.array([0, 2, 2, 2]), np.array([0, 1, 2, 2]))
    assert got["acc"] == 0.75
    # per-class F1: class 0 -> 1, class 1 -> 0 (never predicted), class 2 -> P=2/3, R=1 -> 0.8.
    assert got["f1_macro"] == pytest.approx((1 + 0 + 0.8) / 3)
    assert got["f1_weighted"] == pytest.approx((1 * 1 + 1 * 0 + 2 * 0.8) / 4)


def test_classification_logits_match_sklearn():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(200, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 200)
    got = classification_metrics(logits, labels)
    pred = logits.argmax(1)
    assert got["acc"] == pytest.approx(accuracy_score(labels, pred))
    assert got["f1_weighted"] == pytest.approx(f1_score(labels, pred, average="weighted"))
    assert got["f1_macro"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert got == classification_metrics(pred, labels)


def test_regression_matches_sklearn_and_scipy():
    rng = np.random.default_rng(4)
    y = rng.normal(size=200)
    p = 0.8 * y + 0.3 * rng.normal(size=200)
    got = regression_metrics(p[:, None], y)
    assert got["MAE"] == pytest.approx(mean_absolute_error(y, p))
    assert got["MSE"] == pytest.approx(mean_squared_error(y, p))
    assert got["R2"] == pytest.approx(r2_score(y, p))
    assert got["Corr"] == pytest.approx(pearsonr(p, y)[0])
    baseline = mean_absolute_error(y, np.full_like(y, y.mean()))
    assert got["mean_baseline_MAE"] == pytest.approx(baseline)


def test_regression_hand_computed_and_constant_labels():
    got = regression_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 6.0]))
    assert got["mean_baseline_MAE"] == pytest.approx((2 + 1 + 0 + 3) / 4)
    assert got["MAE"] == pytest.approx(0.5) and got["MSE"] == pytest.approx(1.0)
    assert got["R2"] == pytest.approx(1 - 4 / 14)
    const = np.full(3, 2.0)
    for p in (const, np.array([1.0, 2.0, 3.0])):
        got = regression_metrics(p, const)
        assert got["R2"] == r2_score(const, p) and got["Corr"] == 0.0


# ------------------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize(
    "family,outputs,labels",
    [
        ("classification", np.eye(3)[[0, 1, 1, 2]], np.array([0, 1, 2, 2])),
        ("regression", np.array([0.1, 0.5, 0.9]), np.array([0.0, 0.5, 1.0])),
        ("sentiment", np.array([[0.1], [-0.5], [2.9]]), np.array([0.0, -1.0, 3.0])),
        ("iemocap", np.random.default_rng(5).normal(size=(6, 4, 2)), np.eye(4, dtype=int)[[0] * 6]),
    ],
)
def test_compute_metrics_dispatch_and_primary_metric(family, outputs, labels):
    direct = {
        "classification": classification_metrics,
        "regression": regression_metrics,
        "sentiment": sentiment_metrics,
        "iemocap": iemocap_metrics,
    }[family](outputs, labels)
    got = compute_metrics(family, outputs, labels)
    np.testing.assert_equal(got, direct)
    name, higher = primary_metric(family)
    assert name in got
    assert higher == (family in ("classification", "iemocap"))


def test_primary_metric_values_and_unknown_family():
    assert primary_metric("classification") == ("acc", True)
    assert primary_metric("regression") == ("MAE", False)
    assert primary_metric("sentiment") == ("MAE", False)
    assert primary_metric("iemocap") == ("avg_acc", True)
    with pytest.raises(ValueError):
        compute_metrics("ranking", np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError):
        primary_metric("ranking")
