"""fit --unlabeled: self-training and label propagation of the probe on an unlabelled pool (issue 26)."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY
from sklearn.linear_model import LogisticRegression
from sklearn.semi_supervised import LabelSpreading, SelfTrainingClassifier

from graft.data.discovery import discover
from graft.data.pool import read_pool
from graft.errors import GraftError
from graft.probing.extraction import FeatureSet
from graft.probing.linear import fit_linear_probe
from graft.probing.semi import (
    LinearFit,
    balanced_pick,
    choose_and_fit,
    label_graph,
    probabilities,
    propagate,
    self_train,
)
from graft.training.semi import _decide, pool_paths
from graft.utils.runtime import Runtime


def blobs(seed: int = 0, labelled: int = 4, pool: int = 900, val: int = 600, dim: int = 30, classes: int = 3):
    """Gaussian blobs: ``labelled`` labelled images a class, an unlabelled pool and a val set (its labels: truth)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (classes, dim))

    def draw(n):
        y = np.arange(n) % classes
        return (centers[y] + rng.normal(0, 1.4, (n, dim))).astype(np.float32), y

    return draw(labelled * classes), draw(pool), draw(val), centers


def accuracy(linear, x, y) -> float:
    return float((probabilities(linear, x).argmax(1) == y).mean())


@pytest.fixture(scope="module")
def problem():
    (x, y), (px, py), (vx, vy), centers = blobs()
    base = fit_linear_probe(x, y, classes=3)
    return SimpleNamespace(x=x, y=y, px=px, py=py, vx=vx, vy=vy, centers=centers, base=base,
                           fit=LinearFit(base.l2, base.temperature, 3))


def test_self_training_gains_over_labelled_only_like_sklearn(problem):
    p = problem
    before = accuracy(p.base.linear, p.vx, p.vy)
    pseudo, linear = self_train(p.x, p.y, p.px, p.fit, 0.9)
    after = accuracy(linear, p.vx, p.vy)
    # the independent reference: scikit-learn's self-training of a logistic regression on the same arrays
    reference = SelfTrainingClassifier(LogisticRegression(C=1 / (p.base.l2 * len(p.y)), max_iter=1000),
                                       threshold=0.9).fit(np.concatenate([p.x, p.px]),
                                                          np.concatenate([p.y, np.full(len(p.px), -1)]))
    sklearn_after = float((reference.predict(p.vx) == p.vy).mean())
    assert after >= before + 0.02
    assert after >= sklearn_after - 0.02
    used = pseudo >= 0
    assert used.sum() > len(p.px) // 2 and (pseudo[used] == p.py[used]).mean() > 0.95


def test_propagation_agrees_with_label_spreading(problem):
    p = problem
    features = np.concatenate([p.x, p.px])
    labels = np.concatenate([p.y, np.full(len(p.px), -1)])
    ours = propagate(label_graph(features), labels, 3)[len(p.y):].argmax(1)
    reference = LabelSpreading(kernel="knn", n_neighbors=10, alpha=0.9, max_iter=200).fit(features, labels)
    theirs = reference.transduction_[len(p.y):]
    labelled_only = probabilities(p.base.linear, p.px).argmax(1)
    assert (ours == theirs).mean() > 0.95
    assert (ours == p.py).mean() >= (labelled_only == p.py).mean() + 0.02


def test_choice_by_cross_validation_gains_on_val(problem):
    p = problem
    result = choose_and_fit(p.x, p.y, p.px, p.fit)
    assert result.method in ("self-training", "propagation") and result.linear is not None
    assert result.selection.startswith("3-fold CV")
    assert len(result.pseudo_labels) == len(p.px)  # only the pool is pseudo-labelled
    assert accuracy(result.linear, p.vx, p.vy) >= accuracy(p.base.linear, p.vx, p.vy) + 0.02


def test_balanced_pick_caps_each_class_at_its_prior():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.91, 0.99, 100)
    predicted = np.array([0] * 90 + [1] * 10)
    probs = np.zeros((100, 2))
    probs[np.arange(100), predicted] = confidence
    probs[np.arange(100), 1 - predicted] = 1 - confidence
    labels = balanced_pick(probs, 0.9, np.array([0.5, 0.5]))
    assert (labels == 0).sum() == 50 and (labels == 1).sum() == 10
    assert confidence[labels == 0].min() >= np.sort(confidence[:90])[-50]  # the 50 most confident of class 0
    assert (balanced_pick(probs, 0.995, np.array([0.5, 0.5])) == -1).all()  # none reaches the threshold


def test_a_pool_of_one_class_does_not_swallow_the_other(problem):
    p = problem
    dominant = np.concatenate([np.flatnonzero(p.py == 0)[:270], np.flatnonzero(p.py == 1)[:15],
                               np.flatnonzero(p.py == 2)[:15]])  # 90% class 0
    pseudo, _ = self_train(p.x, p.y, p.px[dominant], p.fit, 0.8)
    used = pseudo[pseudo >= 0]
    assert (used == 0).sum() <= len(dominant) // 3  # the labelled prior is a third a class
    assert set(used.tolist()) == {0, 1, 2}


def test_labelled_only_kept_when_the_pool_is_no_better_on_val(problem):
    """A labelled-only head that is already perfect on val (the Bayes rule between the known centres, sharpened):
    whatever the pool gives cannot beat it, so the head is returned unchanged and the record says so."""
    p = problem
    centers = torch.as_tensor(p.centers, dtype=torch.float32)
    perfect = torch.nn.Linear(centers.shape[1], 3)
    with torch.no_grad():  # nearest centre: argmax of c·x - |c|²/2, scaled so the loss is ~0
        perfect.weight.copy_(centers * 50)
        perfect.bias.copy_(-(centers ** 2).sum(1) * 25)
    vx, vy = p.vx, p.vy
    right = (probabilities(perfect, vx).argmax(1) == vy)
    vx, vy = vx[right], vy[right]  # val = the images the Bayes rule gets right: accuracy 1.0
    model = SimpleNamespace(head=torch.nn.Sequential(perfect), classes=["a", "b", "c"])
    features = FeatureSet("pre_logits", model.classes, {"train": p.x, "val": vx, "test": vx[:0]},
                          {"train": p.y, "val": vy, "test": vy[:0]}, {}, [],
                          {"probe_l2": p.base.l2, "probe_temperature": p.base.temperature})
    before = {k: v.clone() for k, v in perfect.state_dict().items()}
    config = SimpleNamespace(train=SimpleNamespace(balance="none", seed=0))
    record = _decide(model, features, p.px, config, Runtime(torch.device("cpu"), None, False, verbose=False))
    assert record["kept"] == "labelled-only" and record["method"] != "labelled-only"
    assert record["labelled_only_val_acc"] == 1.0 and record["with_pool_val_acc"] <= 1.0
    assert all(torch.equal(before[k], v) for k, v in model.head[0].state_dict().items())


@pytest.fixture()
def few_labels(shapes, tmp_path):
    """shapes with 4 training images a class labelled; the other 20 a class in pool/ (no class folders), beside
    two val images copied in under other names and one broken file."""
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    pool = tmp_path / "pool"
    for folder in sorted((data / "train").iterdir()):
        for index, image in enumerate(sorted(folder.iterdir())[4:]):
            (pool / f"part{index % 2}").mkdir(parents=True, exist_ok=True)
            shutil.move(str(image), pool / f"part{index % 2}" / f"{folder.name}-{image.name}")
    val = sorted((data / "val" / "circle").iterdir())
    shutil.copy(val[0], pool / "copy-of-val.png")
    shutil.copy(val[1], pool / "part0" / "another-copy.png")
    (pool / "broken.png").write_bytes(b"not an image")
    return data, pool


def test_pool_never_holds_a_val_image(few_labels):
    data, pool = few_labels
    splits = discover(data)
    config = SimpleNamespace(data=SimpleNamespace(unlabeled=str(pool), max_image_pixels=10**8),
                             model=SimpleNamespace(head="linear", dropout=0, pretrained=False),
                             train=SimpleNamespace(head_fit="lbfgs", strategy="probe"))
    found = pool_paths(config, splits, Runtime(torch.device("cpu"), None, False, verbose=False))
    val_bytes = {Path(path).read_bytes() for path, _ in splits.val}
    assert len(found) == 60 and len(read_pool(pool).paths) == 63
    assert not any(Path(path).read_bytes() in val_bytes for path in found)


def test_pool_csv_paths_stay_in_its_folder(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "pool.csv").write_text("path,note\na.png,x\n")
    assert read_pool(tmp_path / "pool.csv").paths == [str(tmp_path / "a.png")]
    (tmp_path / "bad.csv").write_text("path\n../outside.png\n")
    with pytest.raises(GraftError, match=r"bad.csv, line 2"):
        read_pool(tmp_path / "bad.csv")



def test_both_pool_readers_refuse_a_csv_naming_an_image_outside_its_folder(shapes, tmp_path):
    """fit --unlabeled and suggest read a pool CSV alike: an absolute path outside the CSV's folder is refused, as a
    relative one climbing out is (a path read from a file stays inside its folder)."""
    from graft.analysis.suggest import suggest

    outside = tmp_path / "outside.png"
    shutil.copy(next((shapes / "train" / "circle").iterdir()), outside)
    (tmp_path / "pool").mkdir()
    listing = tmp_path / "pool" / "pool.csv"
    listing.write_text(f"path\n{outside}\n")
    refused = r"pool.csv, line 2: .*outside.png.* lies outside the CSV's folder"
    config = SimpleNamespace(data=SimpleNamespace(unlabeled=str(listing), max_image_pixels=10**8),
                             model=SimpleNamespace(head="linear", dropout=0, pretrained=False),
                             train=SimpleNamespace(head_fit="lbfgs", strategy="probe"))
    with pytest.raises(GraftError, match=refused):
        pool_paths(config, discover(shapes), Runtime(torch.device("cpu"), None, False, verbose=False))
    with pytest.raises(GraftError, match=refused):
        suggest(tmp_path / "no-run-needed", listing)  # the pool is read before the run

def test_fit_unlabeled_cli(few_labels, tmp_path):
    from typer.testing import CliRunner

    from graft.cli import app

    data, pool = few_labels
    args = ["fit", str(data), "--unlabeled", str(pool), "--backbone", TINY, "--no-pretrained", "--image-size", "32",
            "--workers", "0", "--strategy", "probe", "-o", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    record = metrics["semi_supervised"]
    assert record["pool"] == 60 and "unlabelled images pseudo-labelled" in result.output
    card = json.loads((tmp_path / "run" / "graft.json").read_text())
    assert card["semi_supervised"] == record
    shown = record["with_pool_val_acc"] if record["kept"] != "labelled-only" else record["labelled_only_val_acc"]
    assert metrics["val"]["accuracy"] == pytest.approx(shown, abs=1e-4)  # the saved model is the one kept
    if record["kept"] != "labelled-only":
        assert record["with_pool_val_acc"] >= record["labelled_only_val_acc"]
    args[args.index("probe")] = "finetune"
    refused = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "ft")])
    assert refused.exit_code != 0 and "--unlabeled works with --strategy probe or auto" in refused.output



def test_a_method_that_pseudo_labels_nothing_cannot_win_the_search():
    """Two overlapping classes in the first two dimensions, and a pool along a third one no labelled image has: no
    pool image is confident, so every method is the labelled-only probe and scores exactly as it does (labelled-only
    wins the tie). The old search put each fold's held-out labelled images into the pool, where they were
    pseudo-labelled and then scored: a method won the search on the labels themselves and then used nothing."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 9)
    x = (np.array([[2.0, 0, 0], [-2.0, 0, 0]])[y] + rng.normal(0, 1.0, (18, 3)) * [1, 1, 0]).astype(np.float32)
    pool = np.zeros((30, 3), np.float32)
    pool[:, 2] = rng.uniform(5, 6, 30)
    base = fit_linear_probe(x, y, classes=2)
    result = choose_and_fit(x, y, pool, LinearFit(base.l2, base.temperature, 2), thresholds=(0.8, 0.9))
    alone = next(row for row in result.search if row["method"] == "labelled-only")
    assert all((row["cv_accuracy"], row["cv_loss"]) == (alone["cv_accuracy"], alone["cv_loss"])
               for row in result.search)
    assert result.used == 0
    assert result.method == "labelled-only" and result.linear is None and result.threshold is None
