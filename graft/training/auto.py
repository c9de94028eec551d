"""``--strategy auto`` from evidence: the images-per-class table and per-stage probes (``advise``, cached features,
seconds) choose probe or fine-tune and the layers; a fine-tune then runs only while it beats the probe on validation
or still climbs toward it (``probe_patience``, early stopping against the probe's score) within ``--time-budget``,
and the probe is kept when it never wins (``graft.training.selection``). What was tried, what each cost and why is
printed and recorded in metrics.json under ``auto``.
"""

from __future__ import annotations

import copy
import time

from graft.config import FitConfig, apply_overrides
from graft.probing.advice import advise
from graft.training.state import TrainState

__all__ = ["TRIAL_PATIENCE", "finish_report", "overhead", "resolve"]

TRIAL_PATIENCE = 2  # fine-tuning epochs in a row that may fail to beat the probe before auto stops the trial


def resolve(config: FitConfig, log=None) -> tuple[FitConfig, dict]:
    """Runs ``advise`` on the config's data and backbone and applies its recommendation; a fine-tune becomes a trial
    against the probe. Returns the resolved config and the report so far (the advice and its cost)."""
    start = time.perf_counter()
    advice = advise(config.data.path, config.model.backbone, config.data.image_size, config.model.pretrained,
                    config.data.cache_dir, config.train.device, config.data.workers, config.data.val_fraction,
                    config.train.seed, log, config.model.weights, config.data.test_fraction,
                    config.train.extract_engine)
    seconds = time.perf_counter() - start
    overrides = dict(advice.overrides)
    if overrides["train.strategy"] == "finetune" and not config.train.probe_patience:
        overrides["train.probe_patience"] = TRIAL_PATIENCE
    if log:
        log(f"auto: {advice.recommendation} ({seconds:.1f}s of per-stage probes): {advice.reason}")
        if overrides["train.strategy"] == "finetune":
            budget = (f" within {config.train.time_budget:g}s" if config.train.time_budget else
                      f" within the default fine-tune's time (advise's {seconds:.0f}s come out of its epochs)")
            log(f"auto: fine-tuning ({overrides.get('train.unfreeze', 'all')}) runs after the probe only while it "
                f"beats the probe on val or improves on its own best (stops after "
                f"{overrides.get('train.probe_patience', 0)} epochs that do neither){budget}; the probe is kept "
                "otherwise")
    resolved = apply_overrides(copy.deepcopy(config), overrides, "advice")
    best = max(advice.stages, key=lambda s: s["probe_accuracy"]) if advice.stages else {}
    report = {"advice": advice.recommendation, "reason": advice.reason, "overrides": overrides,
              "tried": [{"candidate": "per-stage probes (advise)", "seconds": round(seconds, 2),
                         "best_node": best.get("node"), "val_acc": best.get("probe_accuracy")}]}
    return resolved, report


def overhead(report: dict | None, config: FitConfig) -> float:
    """Seconds advise spent, which a fine-tune trial without ``--time-budget`` gives back from its epochs (0: none to
    give back — not auto, a probe, or a budget the user set)."""
    if not report or config.train.strategy != "finetune" or config.train.time_budget:
        return 0.0
    return float(report["tried"][0]["seconds"])


def finish_report(report: dict, chosen: dict | None, state: TrainState, log=None) -> dict:
    """Completes the report with the probe and fine-tune candidates (from the model selection) and the choice."""
    report = copy.deepcopy(report)
    if chosen:
        report["tried"] += [{"candidate": c["name"], **{k: v for k, v in c.items() if k != "name"}}
                            for c in chosen["candidates"]]
        report["chose"], report["why"] = chosen["kept"], chosen["why"]
    else:  # advise chose the probe outright (or there was no val split to compare on)
        strategy = report["overrides"]["train.strategy"]
        report["tried"].append({"candidate": strategy, "seconds": round(state.elapsed, 2)})
        report["chose"], report["why"] = strategy, report["reason"]
    if log:
        for row in report["tried"]:
            score = f"val acc {row['val_acc']:.4f}, " if isinstance(row.get("val_acc"), float) else ""
            log(f"auto tried {row['candidate']}: {score}{row.get('seconds') or 0:.1f}s")
        log(f"auto chose {report['chose']}: {report['why']}")
    return report
