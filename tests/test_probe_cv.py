"""The probe's L2 strength is chosen by stratified k-fold CV on the training features, as sklearn would choose it."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from graft.probing.linear import DEFAULT_GRID, GRID_LIMITS, fit_linear_probe, fit_temperature, stratified_folds


@pytest.fixture(scope="module")
def features():
    """sklearn's digits through a fixed random projection + ReLU: 96 correlated, non-negative 'features' (like a
    pooled CNN layer's), split train / val / test."""
    x, y = load_digits(return_X_y=True)
    generator = np.random.RandomState(0)
    x = np.maximum(x @ generator.randn(64, 96) / 8, 0)
    order = generator.permutation(len(y))
    train, val, test = order[:600], order[600:1000], order[1000:]
    return x[train], y[train], x[val], y[val], x[test], y[test]


def _accuracy(linear, x, y):
    with torch.no_grad():
        return (linear(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy() == y).mean()


def test_folds_are_stratified_disjoint_and_cover_everything():
    labels = np.array([0] * 23 + [1] * 7 + [2] * 10)
    folds = stratified_folds(labels, 5, seed=3)
    assert len(folds) == 5
    assert sorted(np.concatenate(folds).tolist()) == list(range(40))
    per_fold = np.array([np.bincount(labels[fold], minlength=3) for fold in folds])
    assert (per_fold.max(axis=0) - per_fold.min(axis=0) <= 1).all()  # each class spread evenly: stratified
    for counts in per_fold:
        assert 4 <= counts[0] <= 5 and 1 <= counts[1] <= 2 and counts[2] == 2  # 23/5, 7/5, 10/5 by hand
    theirs = StratifiedKFold(5).split(np.zeros(len(labels)), labels)  # the same per-class sizes as scikit-learn's
    assert sorted(map(sorted, per_fold.T.tolist())) == sorted(
        map(sorted, np.array([np.bincount(labels[held], minlength=3) for _, held in theirs]).T.tolist()))
    assert [f.tolist() for f in stratified_folds(labels, 5, seed=3)] == [f.tolist() for f in folds]  # seeded
    assert len(stratified_folds(np.array([0, 0, 0, 1, 1, 1, 1]), 5)) == 3  # capped by the smallest class


@pytest.mark.filterwarnings("ignore::FutureWarning")  # sklearn 1.9's transition notices
def test_cv_choice_matches_sklearn_logistic_regression_cv(features):
    train_x, train_y, val_x, val_y, test_x, test_y = features
    result = fit_linear_probe(train_x, train_y, val_x, val_y, seed=0)
    assert result.selection == "cv-5" and not result.optimistic
    folds = stratified_folds(train_y, 5, seed=0)
    splits = [(np.setdiff1d(np.arange(len(train_y)), held), held) for held in folds]
    fold_n = len(train_y) - len(folds[0])
    grid = sorted(DEFAULT_GRID, reverse=True)
    cs = [1 / (l2 * fold_n) for l2 in grid]  # C = 1/(λ·N), N: a fold's training images
    scaler = StandardScaler().fit(train_x)
    reference = LogisticRegressionCV(Cs=cs, cv=splits, scoring="neg_log_loss", max_iter=5000,
                                     tol=1e-6).fit(scaler.transform(train_x), train_y)
    theirs = 1 / (reference.C_[0] * fold_n)  # back to λ
    assert abs(np.log10(result.l2) - np.log10(theirs)) <= 1.01  # the same strength, within one grid step
    for x, y in ((val_x, val_y), (test_x, test_y)):
        ours, theirs = _accuracy(result.linear, x, y), (reference.predict(scaler.transform(x)) == y).mean()
        assert abs(ours - theirs) <= 0.01 and ours > 0.9
    chosen = next(row for row in result.grid if row["l2"] == result.l2)
    assert result.cv_accuracy == chosen["cv_acc"] and chosen["cv_loss"] == min(row["cv_loss"] for row in result.grid)
    assert {"cv_acc", "cv_loss", "val_acc", "train_acc"} <= set(chosen)


def test_validation_does_not_choose_when_cv_runs(features):
    """CV picks λ from the training features alone: shuffling the validation labels changes nothing chosen."""
    train_x, train_y, val_x, val_y, *_ = features
    honest = fit_linear_probe(train_x, train_y, val_x, val_y, grid=(1.0, 1e-3), cv=3)
    noise = fit_linear_probe(train_x, train_y, val_x, np.random.RandomState(1).permutation(val_y), grid=(1.0, 1e-3),
                             cv=3)
    assert honest.selection == "cv-3" and honest.l2 == noise.l2 and torch.equal(honest.linear.weight, noise.linear.weight)


def test_the_grid_reaches_strong_regularisation():
    assert max(DEFAULT_GRID) == 10.0 and min(DEFAULT_GRID) == pytest.approx(1e-7) and len(DEFAULT_GRID) == 9


def test_one_image_class_falls_back_to_validation_and_says_so(features):
    train_x, train_y, val_x, val_y, *_ = features
    keep = np.concatenate([np.flatnonzero(train_y != 9), np.flatnonzero(train_y == 9)[:1]])
    result = fit_linear_probe(train_x[keep], train_y[keep], val_x, val_y, grid=(1.0, 1e-2, 1e-4))
    assert result.selection == "validation" and result.optimistic
    best = max(result.grid, key=lambda r: (r["val_acc"], -r["val_loss"]))
    assert result.l2 == best["l2"] and "cv_acc" not in result.grid[0]
    assert fit_linear_probe(train_x, train_y, grid=(1e-3,)).selection == "fixed"


def test_a_choice_at_the_strong_end_extends_the_grid():
    """Labels that are noise: the held-out log-loss only falls as λ grows, so the grid grows until its limit."""
    generator = np.random.RandomState(3)
    x, y = generator.randn(120, 20), generator.randint(0, 3, 120)
    result = fit_linear_probe(x, y, grid=(1.0, 1e-2), cv=3, calibrate=False)
    strengths = [row["l2"] for row in result.grid]
    assert max(strengths) == pytest.approx(GRID_LIMITS[0]) and strengths == sorted(strengths, reverse=True)
    assert result.l2 == pytest.approx(GRID_LIMITS[0])


def test_the_temperature_minimises_the_log_loss_as_scipy_finds():
    from scipy.optimize import minimize_scalar

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (300,), generator=generator)
    logits = 6 * torch.randn(300, 4, generator=generator) + 3 * torch.nn.functional.one_hot(labels, 4)  # overconfident
    ours = fit_temperature(logits, labels)

    def nll(t):
        scaled = logits.double().numpy() / t
        scaled -= scaled.max(1, keepdims=True)
        return -(scaled[np.arange(300), labels.numpy()] - np.log(np.exp(scaled).sum(1))).mean()

    theirs = minimize_scalar(nll, bounds=(0.01, 100), method="bounded", options={"xatol": 1e-8}).x
    assert ours == pytest.approx(theirs, rel=1e-3) and ours > 1.5  # overconfident logits: cooled


def _ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    confidence, correct = probabilities.max(1), probabilities.argmax(1) == labels
    which = np.minimum(np.ceil(confidence * bins).astype(int) - 1, bins - 1)
    return sum(abs(correct[which == b].mean() - confidence[which == b].mean()) * (which == b).sum()
               for b in range(bins) if (which == b).any()) / len(labels)


def test_temperature_scaling_calibrates_a_small_data_probe_without_changing_its_answers():
    """10 digits per class: the CV'd probe's confidences are off; the out-of-fold temperature brings the held-out
    ECE (computed here in numpy) down, and every predicted class stays the same."""
    x, y = load_digits(return_X_y=True)
    order = np.random.RandomState(4).permutation(len(y))
    train = np.concatenate([order[y[order] == c][:10] for c in range(10)])
    test = np.setdiff1d(order, train)
    plain = fit_linear_probe(x[train], y[train], calibrate=False)
    calibrated = fit_linear_probe(x[train], y[train])
    with torch.no_grad():
        before = torch.softmax(plain.linear(torch.as_tensor(x[test], dtype=torch.float32)), 1).numpy()
        after = torch.softmax(calibrated.linear(torch.as_tensor(x[test], dtype=torch.float32)), 1).numpy()
    assert (before.argmax(1) == after.argmax(1)).all() and plain.l2 == calibrated.l2
    assert calibrated.temperature != pytest.approx(1.0, abs=0.05)
    assert calibrated.calibrated_cv_loss < calibrated.cv_loss
    assert _ece(after, y[test]) < _ece(before, y[test]) and _ece(after, y[test]) <= 0.08


def test_no_temperature_is_fitted_where_every_image_is_right_or_wrong():
    """All right, the log-loss falls as T goes to 0 (a model claiming certainty): no temperature, not T = e^-5."""
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    right = torch.nn.functional.one_hot(labels, 3).double() * 2
    assert fit_temperature(right, labels) is None
    assert fit_temperature(right, (labels + 1) % 3) is None  # all wrong
    mixed = right.clone()
    mixed[0] = torch.tensor([0.0, 2.0, 0.0])  # one mistake: a minimum inside, a finite temperature
    assert fit_temperature(mixed, labels) is not None


def test_a_separable_probe_keeps_its_own_probabilities():
    generator = np.random.RandomState(5)
    y = np.repeat([0, 1], 30)
    x = generator.randn(60, 4) + 8 * y[:, None]  # two far-apart clusters: every held-out image right
    result = fit_linear_probe(x, y, cv=3)
    assert result.temperature == 1.0 and np.isnan(result.calibrated_cv_loss)
