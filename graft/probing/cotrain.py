"""Co-training over two views of the same images (Blum & Mitchell 1998): the probe on the model's features and a
probe on a second view of each image, here an earlier stage of the same backbone (the lecture's "linear classifiers
from different stages"). Each view's probe pseudo-labels the pool for the OTHER view's probe, so one view's
confident mistakes are only learnt where the other view cannot see they are mistakes.

Each round r of R, each view's probe picks its most confident share r/R of the pool, class-balanced to the labelled
images' prior (``graft.probing.semi.balanced_pick`` at threshold 0), and the other view's probe is refitted on the
labelled images plus those picks. The result is the main view's probe: a linear head on the model's own features,
so the model that ships is unchanged in shape; the second view only teaches.

Measured at 5% labels, seeds 0 / 1 (bench/RESULTS.md, "Few labels after the fifth pass"): mnist_test10k at 64 px
with blocks.4 as the second view, chosen by the CV on both seeds, +6.9 / +6.7 points over the labelled-only probe
where self-training on one view gave +2.9 / +1.4; flowers5 with blocks.6 it would lose 1.7 / 3.7 points on val, and
the one time the CV chose it (seed 0) validation returned the labelled-only probe (a view that repeats the main
one's mistakes teaches nothing). The second view alone can be the better head: on mnist_test10k
the labelled-only probe on blocks.4 reaches 0.94 (``--cut-at blocks.4``), above co-training's 0.90.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from graft.probing.linear import fit_linear_probe
from graft.probing.semi import LinearFit, balanced_pick, class_prior, probabilities, with_pseudo

__all__ = ["SecondView", "co_train", "second_view"]


@dataclass
class SecondView:
    """The second view's features: ``x`` for the labelled images (same rows as the main view's), ``pool_x`` for the
    pool (same rows), and ``fit``: a fixed-strength probe fit for it (``graft.probing.semi.LinearFit``)."""

    x: np.ndarray
    pool_x: np.ndarray
    fit: LinearFit

    def fold(self, keep: np.ndarray, sample: np.ndarray) -> SecondView:
        """The view for one CV fold: the ``keep`` labelled images and the search's ``sample`` of the pool (the
        held-out labelled images are scored, never pooled)."""
        return SecondView(self.x[keep], self.pool_x[sample], self.fit)

    def co_train(self, x: np.ndarray, y: np.ndarray, pool_x: np.ndarray, fit: LinearFit, rounds: int,
                 start: nn.Linear | None = None, log=None) -> tuple[np.ndarray, nn.Linear]:
        """``co_train`` of the main view (``x``, ``y``, ``pool_x``, ``fit``) with this one (``choose_and_fit``'s
        co-training candidate calls it here: graft.probing.semi cannot import this module)."""
        return co_train(x, y, pool_x, fit, self, rounds, start, log)


def co_train(x: np.ndarray, y: np.ndarray, pool_x: np.ndarray, fit: LinearFit, second: SecondView, rounds: int,
             start: nn.Linear | None = None, log=None) -> tuple[np.ndarray, nn.Linear]:
    """Co-training of the main view's probe (labelled ``x``, ``y``; ``pool_x``; ``fit``) with ``second``.

    Returns:
        (the pool's pseudo-labels the main probe was last refitted on, -1: none; the main view's refitted probe).
    """
    prior = class_prior(y, fit.classes)
    main = start if start is not None else fit(x, y)
    other = second.fit(second.x, y)
    taught = np.full(len(pool_x), -1, dtype=np.int64)
    for round_ in range(1, rounds + 1):
        share = round_ / rounds
        from_main = balanced_pick(probabilities(main, pool_x), 0.0, prior, share)
        taught = balanced_pick(probabilities(other, second.pool_x), 0.0, prior, share)
        main = fit(*with_pseudo(x, y, pool_x, taught), start=main)
        other = second.fit(*with_pseudo(second.x, y, second.pool_x, from_main), start=other)
        if log:
            log(f"co-training round {round_}/{rounds}: {int((taught >= 0).sum()):,} of {len(pool_x):,} pool images "
                "pseudo-labelled by the second view")
    return taught, main


def second_view(x: np.ndarray, y: np.ndarray, pool_x: np.ndarray, classes: int, balanced: bool = False,
                device="cpu", seed: int = 0) -> SecondView:
    """The second view of the labelled images (``x``, ``y``) and the pool, with its own probe strength: λ and the
    temperature by CV on the labelled images, as the main view's labelled-only probe has them."""
    base = fit_linear_probe(x, y, classes=classes, balanced=balanced, device=device, seed=seed)
    return SecondView(np.asarray(x, dtype=np.float32), np.asarray(pool_x, dtype=np.float32),
                      LinearFit(base.l2, base.temperature, classes, balanced, device))
