"""`graft suggest`'s selection after the cold start: an equal share of the picks per predicted class (NumPy only)."""

from __future__ import annotations

import numpy as np

from graft.probing.acquisition import margin, select


def confusing_pair_pool():
    """90 pool rows: 60 predicted 0 or 1 with near-ties between those two (the most uncertain of all), 30 predicted 2
    less uncertain but with uncertainties of their own; features in three well separated blobs."""
    rng = np.random.default_rng(4)
    tie = rng.uniform(0.0, 0.04, 60)  # the gap between classes 0 and 1: tiny, so margin is near 1
    pair = np.stack([0.5 + tie / 2, 0.5 - tie / 2, np.zeros(60)], axis=1)
    pair[1::2, :2] = pair[1::2, 1::-1]  # every other row predicted class 1 instead of 0
    third = rng.uniform(0.55, 0.9, 30)  # predicted 2, margins between 0.2 and 0.8: below every row of the pair
    probabilities = np.concatenate([pair, np.stack([(1 - third) / 2, (1 - third) / 2, third], axis=1)])
    blobs = np.repeat(np.eye(3) * 10, [30, 30, 30], axis=0)
    return probabilities, blobs + rng.normal(0, 1.0, (90, 3))


def test_every_predicted_class_gets_an_equal_share_of_the_picks():
    probabilities, features = confusing_pair_pool()
    labelled = np.eye(3)[[0, 1, 2, 0, 1, 2]] * 10  # 2 labelled a class, cold start off: the uncertainty rule itself
    chosen = select(probabilities, features, 6, labelled=labelled, cold_start=0)
    predicted = probabilities.argmax(1)
    # the 30 most uncertain rows (5 x 6 candidates) are all of the confusing pair: uncertainty + k-center over the
    # whole pool never reaches class 2; one share per predicted class does
    assert set(np.argsort(-margin(probabilities), kind="stable")[:30]) <= set(range(60))
    assert np.bincount(predicted[chosen.indices], minlength=3).tolist() == [2, 2, 2]
    assert len(set(chosen.indices)) == 6 and chosen.predicted == predicted[chosen.indices].tolist()
    # listed round-robin: the first three picks already cover the three classes
    assert sorted(chosen.predicted[:3]) == [0, 1, 2]
    # inside class 2, the picks are among its 5 x 2 most uncertain rows (computed here from the margins)
    third = np.flatnonzero(predicted == 2)
    most_uncertain = set(third[np.argsort(-margin(probabilities[third]), kind="stable")[:10]].tolist())
    assert {i for i in chosen.indices if predicted[i] == 2} <= most_uncertain
    old_rule = select(probabilities, features, 6, labelled=labelled, cold_start=0, balance=False)
    assert all(predicted[i] != 2 for i in old_rule.indices)  # what the share fixes


def test_a_class_predicted_for_few_rows_passes_the_rest_of_its_share_on():
    from graft.probing.acquisition import quotas

    assert quotas(6, np.array([1, 50, 50])).tolist() == [1, 3, 2]  # 2 each, class 0 holds 1: its spare to the others
    assert quotas(5, np.array([0, 7, 7])).tolist() == [0, 3, 2]  # a class nothing is predicted as gets nothing
    assert quotas(9, np.array([2, 1, 3])).tolist() == [2, 1, 3]  # fewer rows than picks: all of them
    probabilities, features = confusing_pair_pool()
    keep = np.r_[0:60, 60]  # one row predicted class 2 only
    chosen = select(probabilities[keep], features[keep], 6, cold_start=0)
    assert np.bincount(probabilities[keep].argmax(1)[chosen.indices], minlength=3).tolist() == [3, 2, 1]
