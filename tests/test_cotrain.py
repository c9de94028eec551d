"""fit --unlabeled with a second view (an earlier stage's features): co-training of the probe (issue 26)."""

import numpy as np
import pytest

from graft.probing.cotrain import SecondView, co_train
from graft.probing.linear import fit_linear_probe
from graft.probing.semi import LinearFit, choose_and_fit, probabilities, search_steps, self_train


def two_views(seed: int = 0, labelled: int = 3, pool: int = 600, val: int = 300, classes: int = 3):
    """Each image seen twice, with noise drawn independently a view: a weak view (the main one, a few labels leave
    its probe unsure) and a clearer one; the truth is each row's class."""
    rng = np.random.default_rng(seed)
    weak, clear = rng.normal(0, 1, (classes, 30)), rng.normal(0, 1, (classes, 20))

    def draw(n):
        y = np.arange(n) % classes
        return ((weak[y] + rng.normal(0, 3.0, (n, 30))).astype(np.float32),
                (clear[y] + rng.normal(0, 1.0, (n, 20))).astype(np.float32), y)

    return draw(labelled * classes), draw(pool), draw(val)


def probe_fit(x, y):
    base = fit_linear_probe(x, y, classes=3)
    return base.linear, LinearFit(base.l2, base.temperature, 3)


def accuracy(linear, x, y) -> float:
    return float((probabilities(linear, x).argmax(1) == y).mean())


@pytest.fixture(scope="module")
def views():
    (x, x2, y), (px, px2, py), (vx, _, vy) = two_views()
    start, fit = probe_fit(x, y)
    _, fit2 = probe_fit(x2, y)
    return dict(x=x, y=y, px=px, py=py, vx=vx, vy=vy, start=start, fit=fit, second=SecondView(x2, px2, fit2))


def test_co_training_teaches_the_weak_view_more_than_self_training(views):
    v = views
    before = accuracy(v["start"], v["vx"], v["vy"])
    _, alone = self_train(v["x"], v["y"], v["px"], v["fit"], 0.0)
    taught, linear = co_train(v["x"], v["y"], v["px"], v["fit"], v["second"], rounds=3, start=v["start"])
    after = accuracy(linear, v["vx"], v["vy"])
    # the pseudo-labels the weak view learnt from are the clear view's: right far more often than its own guesses
    own = probabilities(v["start"], v["px"]).argmax(1)
    assert (taught[taught >= 0] == v["py"][taught >= 0]).mean() >= (own == v["py"]).mean() + 0.1
    assert after >= before + 0.2
    assert after >= accuracy(alone, v["vx"], v["vy"]) + 0.05
    assert linear.in_features == v["x"].shape[1]  # the head stays on the main view's features


def test_the_search_offers_co_training_only_with_a_second_view(views):
    v = views
    result = choose_and_fit(v["x"], v["y"], v["px"], v["fit"], second=v["second"])
    assert result.method == "co-training"
    assert {row["method"] for row in result.search} >= {"labelled-only", "self-training", "propagation",
                                                         "co-training"}
    assert len(result.search) * 3 == search_steps(v["y"], second=True)
    assert accuracy(result.linear, v["vx"], v["vy"]) >= accuracy(v["start"], v["vx"], v["vy"]) + 0.2
    plain = choose_and_fit(v["x"], v["y"], v["px"], v["fit"])
    assert "co-training" not in {row["method"] for row in plain.search}
