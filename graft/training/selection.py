"""Model selection across strategies: the solved probe is candidate epoch 0, and a fine-tune that never beats it on
validation gives the probe back (trunk as it was, probe head).

The rule, precisely: fine-tuning wins when its final weights (the stage's best-val-loss epoch when early stopping is
on, else the last) have a higher validation accuracy than the probe, or the same accuracy and a lower validation
loss (plain cross-entropy, no label smoothing, both measured by the same forward pass over the same val images).
Otherwise the probe is kept. Both numbers were chosen on validation, so the one reported is labelled optimistic.
"""

from __future__ import annotations

import math
from pathlib import Path

from graft.config import FitConfig
from graft.models.grafted import GraftModel
from graft.training.loop import validate
from graft.training.stages import beats_probe
from graft.training.state import TrainState
from graft.utils import distributed
from graft.utils.files import save_weights
from graft.utils.runtime import Runtime
from graft.utils.safefiles import read_safetensors

__all__ = ["PROBE", "RULE", "keep_better", "probe_candidate"]

PROBE = "probe.safetensors"  # the probe's whole model while fine-tuning runs; removed when the run completes
RULE = "higher val accuracy, ties broken by lower val loss; selected on validation: optimistic"


def probe_candidate(model: GraftModel, val_loader, runtime: Runtime, run_dir: Path, config: FitConfig) -> dict | None:
    """Scores the solved probe on val (the fine-tune's own validation pass) and keeps its weights on disk, so a
    resumed run can still return to it; None without validation images (nothing to compare on)."""
    row = validate(model, val_loader, runtime, config.train.limit_batches)
    if math.isnan(row["val_acc"]):
        return None
    if runtime.is_main:
        save_weights(run_dir / PROBE, model)
    runtime.log(f"probe (candidate epoch 0): val accuracy {row['val_acc']:.4f}, loss {row['val_loss']:.4f}")
    return {"val_acc": row["val_acc"], "val_loss": row["val_loss"]}


def keep_better(model: GraftModel, state: TrainState, val_loader, runtime: Runtime, run_dir: Path,
                config: FitConfig) -> dict | None:
    """After fine-tuning: keeps it if it beats the probe on val, else loads the probe's weights back. Returns what
    metrics.json records (the candidates, which was kept and why); None when there was no probe candidate."""
    path = run_dir / PROBE
    if not state.probe or not path.is_file():
        return None
    row = validate(model, val_loader, runtime, config.train.limit_batches)
    probe = state.probe
    finetune_seconds = max(0.0, state.elapsed - probe.get("seconds", 0.0))
    epochs = sum(1 for r in state.history if r["stage"] == "finetune")
    candidates = [{"name": "probe", "epoch": 0, "val_acc": probe["val_acc"], "val_loss": probe["val_loss"],
                   "seconds": probe.get("seconds")},
                  {"name": "finetune", "epochs": epochs, "val_acc": row["val_acc"], "val_loss": row["val_loss"],
                   "seconds": round(finetune_seconds, 2)}]
    if not math.isnan(row["val_acc"]) and beats_probe(row, probe):
        kept = "finetune"
        why = (f"fine-tuning beat the probe on val: accuracy {row['val_acc']:.4f} vs {probe['val_acc']:.4f}, loss "
               f"{row['val_loss']:.4f} vs {probe['val_loss']:.4f}")
    else:
        model.load_state_dict(read_safetensors(path, "delete it and train the run again (--overwrite)")[0])
        kept = "probe"
        why = (f"fine-tuning did not improve on the probe: kept the probe, saved {finetune_seconds:.0f} s next time "
               "with --strategy probe")
    runtime.log(why)
    distributed.barrier()  # under torchrun every rank has read the file (or decided not to) before rank 0 removes it
    if runtime.is_main:
        path.unlink(missing_ok=True)
    return {"kept": kept, "why": why, "rule": RULE, "candidates": candidates}
