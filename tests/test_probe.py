import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from graft.probing.linear import class_weights, fit_linear_probe


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    order = np.random.RandomState(0).permutation(len(y))
    return x[order[:700]], y[order[:700]], x[order[700:1100]], y[order[700:1100]], x[order[1100:]], y[order[1100:]]


def _accuracy(linear, x, y):
    with torch.no_grad():
        return (linear(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy() == y).mean()


def test_matches_sklearn_logistic_regression_within_one_point(digits):
    train_x, train_y, val_x, val_y, test_x, test_y = digits
    result = fit_linear_probe(train_x, train_y, val_x, val_y, cv=0)  # the same C either way; CV has its own test
    scaler = StandardScaler().fit(train_x)
    reference = LogisticRegression(C=1 / (result.l2 * len(train_y)), max_iter=5000)
    reference.fit(scaler.transform(train_x), train_y)
    ours = _accuracy(result.linear, test_x, test_y)
    theirs = reference.score(scaler.transform(test_x), test_y)
    assert abs(ours - theirs) <= 0.01 and ours > 0.9


def test_the_path_is_reported_and_the_best_val_point_chosen(digits):
    train_x, train_y, val_x, val_y, *_ = digits
    result = fit_linear_probe(train_x, train_y, val_x, val_y, grid=(1.0, 1e-2, 1e-4), cv=0)  # the fallback
    assert result.selection == "validation" and result.optimistic
    assert [row["l2"] for row in result.grid] == [1.0, 1e-2, 1e-4]
    best = max(result.grid, key=lambda r: (r["val_acc"], -r["val_loss"]))
    assert result.l2 == best["l2"] and result.val_accuracy == best["val_acc"]
    assert result.grid[0]["train_acc"] < result.grid[-1]["train_acc"]  # strong L2 underfits


def test_standardisation_is_folded_into_the_layer():
    generator = np.random.RandomState(1)
    x = generator.randn(200, 5) * [1e-3, 1, 10, 100, 1] + [5, 0, -3, 100, 0]  # wildly different scales
    y = (x[:, 1] + x[:, 0] * 1000 > 5).astype(int)
    result = fit_linear_probe(x, y, x, y)
    assert _accuracy(result.linear, x, y) > 0.95


def test_balanced_weights_mean_one_and_inverse_frequency():
    labels = torch.tensor([0, 0, 0, 1])
    weights = class_weights(labels, 2)
    assert weights.tolist() == pytest.approx([4 / 6, 2.0])
    assert weights[labels].mean().item() == pytest.approx(1.0)


def test_balanced_probe_favours_the_minority_class():
    generator = np.random.RandomState(2)
    x = np.concatenate([generator.randn(190, 2), generator.randn(10, 2) + 1.0])
    y = np.array([0] * 190 + [1] * 10)
    plain = fit_linear_probe(x, y, grid=(1e-3,))
    balanced = fit_linear_probe(x, y, grid=(1e-3,), balanced=True)
    with torch.no_grad():
        minority = torch.as_tensor(x[190:], dtype=torch.float32)
        assert (balanced.linear(minority).argmax(1) == 1).sum() > (plain.linear(minority).argmax(1) == 1).sum()


def test_large_problems_use_the_minibatch_solver(digits, monkeypatch):
    import graft.probing.linear

    train_x, train_y, val_x, val_y, test_x, test_y = digits
    monkeypatch.setattr(graft.probing.linear, "FULL_BATCH_LIMIT", 0)  # as if the features did not fit one batch
    result = fit_linear_probe(train_x, train_y, val_x, val_y, grid=(1e-3,))
    assert result.grid[0]["iterations"] == 1000  # the minibatch solver's step budget, not L-BFGS's evaluations
    lbfgs = fit_linear_probe(train_x, train_y, val_x, val_y, grid=(1e-3,))
    assert abs(_accuracy(result.linear, test_x, test_y) - _accuracy(lbfgs.linear, test_x, test_y)) <= 0.01


def test_a_warm_start_reaches_sklearns_solution_in_fewer_steps(digits):
    train_x, train_y, _, _, test_x, _ = digits
    l2 = 1e-3
    nearby = fit_linear_probe(train_x[:500], train_y[:500], grid=[l2], cv=0).linear  # another subset's solution
    cold = fit_linear_probe(train_x, train_y, grid=[l2], cv=0, max_iter=1000)
    warm = fit_linear_probe(train_x, train_y, grid=[l2], cv=0, max_iter=1000, init=nearby)
    scaler = StandardScaler().fit(train_x)
    reference = LogisticRegression(C=1 / (l2 * len(train_y)), max_iter=5000, tol=1e-8)
    reference.fit(scaler.transform(train_x), train_y)
    theirs = reference.predict_proba(scaler.transform(test_x))
    with torch.no_grad():
        ours = torch.softmax(warm.linear(torch.as_tensor(test_x, dtype=torch.float32)), 1).numpy()
    assert np.abs(ours - theirs).max() < 2e-3
    assert warm.grid[0]["iterations"] < cold.grid[0]["iterations"]
