"""Experiment trackers fed from fit's named hooks (``--log tensorboard,mlflow,wandb,csv``).

Each tracker writes beside the run: TensorBoard event files in RUN/tensorboard, an MLflow run in a local file store
(RUN/mlruns, or the user's $MLFLOW_TRACKING_URI; a server that does not answer within ``TRACKER_TIMEOUT_S`` is
dropped, never retried for minutes), a Weights & Biases run in RUN/wandb (or the user's $WANDB_DIR): offline, to
``wandb sync`` later, when WANDB_MODE=offline, graft is offline, no login is configured, or the server does not
answer within ``WANDB_INIT_TIMEOUT_S``. ``csv`` names RUN/history.csv, which every fit writes atomically
after each epoch anyway. A tracker that fails (a full disk, a broken store) warns once and is dropped: the run, its
checkpoints and its model never depend on it.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np

from graft.config import FitConfig, flatten
from graft.training.notebook_hooks import EPOCH_COLUMNS, NotebookTable, join_hooks
from graft.training.state import FitResult, Hooks
from graft.training.tracker_checks import check_available, wandb_mode
from graft.utils import outputs
from graft.utils.files import write_json
from graft.utils.versions import __version__

# EPOCH_COLUMNS, NotebookTable, join_hooks (notebook_hooks) and check_available, wandb_mode (tracker_checks) stay
# importable from here, where fit has always taken them
__all__ = ["EPOCH_COLUMNS", "NotebookTable", "TRACKER_TIMEOUT_S", "TRACKING_FILE", "Tracker", "check_available",
           "WANDB_INIT_TIMEOUT_S", "confusion_image", "join_hooks", "wandb_mode"]

TRACKER_TIMEOUT_S = 5  # the longest one request to a tracking server may take before the tracker is dropped
TRACKING_FILE = "tracking.json"  # the MLflow and W&B run ids, so that --resume continues those runs
# wandb.init starts a local service process before any request: seconds on a busy machine, so more than one request's
# bound; past it an online init gives up and the run is logged offline instead (never a hang)
WANDB_INIT_TIMEOUT_S = 30
_ARTIFACTS = ("graft.json", "metrics.json", "history.csv", "data_report.json", "skipped_files.txt", "lr_find.png",
              "README.md")  # the run's products; never the weights or the feature cache
_SCALARS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train",
            "val_acc": "accuracy/val", "images_per_s": "speed/images_per_s", "seconds": "time/epoch_seconds"}


def confusion_image(matrix: list[list[int]], cell: int = 0) -> np.ndarray:
    """The confusion matrix (rows: true class, columns: predicted) as an RGB uint8 image, each row's share as blue
    intensity with the count written in the cell; drawn with PIL alone (matplotlib is not a dependency)."""
    from PIL import Image, ImageDraw

    count = max(1, len(matrix))
    cell = cell or max(8, min(48, 768 // count))
    image = Image.new("RGB", (count * cell + 1, count * cell + 1), "white")
    draw = ImageDraw.Draw(image)
    for row, values in enumerate(matrix):
        total = max(1, sum(values))
        for column, value in enumerate(values):
            share = value / total
            shade = (int(255 - 200 * share), int(255 - 160 * share), 255)
            box = (column * cell, row * cell, (column + 1) * cell, (row + 1) * cell)
            draw.rectangle(box, fill=shade, outline=(128, 128, 128))
            if cell >= 20:
                draw.text((box[0] + 3, box[1] + 3), str(value), fill="white" if share > 0.6 else "black")
    return np.asarray(image)


class Tracker:
    """The trackers of one fit, as hooks; ``close`` at the end (also after a failure) records their files.

    Args:
        names: parsed --log names.
        history: the epochs already done (a resumed run continues its event files and MLflow run: each epoch that a
            tracker lacks, e.g. one that ended just before Ctrl-C, is logged from its history row).
        log: where warnings go (the runtime's log).
    """

    def __init__(self, names: tuple[str, ...], run_dir: Path, config: FitConfig, history: list[dict],
                 log: Callable[[str], None]):
        start_epoch = len(history)
        self.run_dir, self.config, self.log, self.since = run_dir, config, log, time.time() - 2
        self.writer = self.client = self.run_id = self.wandb_run = None
        self.wandb_logged = 0  # the last epoch the W&B run holds (offline, the run cannot be asked)
        self.failed: set[str] = set()
        self.step = start_epoch
        if "tensorboard" in names:
            self._safely("tensorboard", self._open_tensorboard, start_epoch)
        if "mlflow" in names:
            self._safely("mlflow", self._open_mlflow, start_epoch)
        if "wandb" in names:
            self._safely("wandb", self._open_wandb, start_epoch)
        if history:
            self._backfill(history)

    def hooks(self) -> Hooks:
        return Hooks(on_epoch_end=self.epoch_end, on_learning_rates=self.learning_rates, on_fit_end=self.fit_end)

    def _safely(self, name: str, action: Callable, *args) -> None:
        if name in self.failed:
            return
        try:
            action(*args)
        except Exception as error:  # noqa: BLE001 - any tracker failure: the run goes on without it
            self.failed.add(name)
            reason = (str(error).strip().splitlines() or [""])[0][:200]  # one line: MLflow's errors span several
            self.log(f"warning: {name} logging failed ({type(error).__name__}: {reason}); training goes on without it")

    def _active(self, name: str) -> bool:
        handle = {"tensorboard": self.writer, "mlflow": self.run_id, "wandb": self.wandb_run}[name]
        return name not in self.failed and handle is not None

    # --- TensorBoard ---
    def _open_tensorboard(self, start_epoch: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        (self.run_dir / "tensorboard").mkdir(exist_ok=True)
        folder = outputs.claim(self.run_dir / "tensorboard", "--log tensorboard")
        # purge_step: after a resume, TensorBoard hides the earlier processes' epochs, logged again from the history
        # (which the checkpoint holds exactly), so an epoch is never missing or shown twice
        self.writer = SummaryWriter(str(folder), purge_step=1 if start_epoch else None)
        if not start_epoch:
            text = json.dumps(self.config.to_dict(), indent=2)
            self.writer.add_text("config", "```\n" + text + "\n```", 0)

    # --- MLflow ---
    def _open_mlflow(self, start_epoch: int) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or self._local_store()
        # MLflow's own defaults (120 s a request, 7 retries with backoff) make an unreachable server hang the fit
        # silently for minutes; bounded so, it costs one warning within seconds. The user's own values win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(TRACKER_TIMEOUT_S))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        self.client = MlflowClient(tracking_uri=uri)
        saved = self._saved_run(uri) if start_epoch else None
        if saved:
            self.run_id = saved
            self.client.update_run(saved, status="RUNNING")
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "graft"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        model, train = self.config.model, self.config.train
        tags = {"backbone": model.backbone, "strategy": train.strategy, "graft_version": __version__,
                "graft.run_dir": str(self.run_dir.resolve())}
        run = self.client.create_run(experiment_id, tags=tags, run_name=self.run_dir.name)
        self.run_id = run.info.run_id
        self._remember({"mlflow_tracking_uri": uri, "mlflow_run_id": self.run_id})
        from mlflow.entities import Param

        params = [Param(key, str(value)) for key, value in flatten(self.config.to_dict()).items()]
        for start in range(0, len(params), 100):  # log_batch takes at most 100 params a call
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def _local_store(self) -> str:
        store = self.run_dir / "mlruns"
        if not store.exists():  # graft's only when graft made it: then --overwrite removes it whole
            store.mkdir()
            outputs.record_whole(store)
        # MLflow 3.x refuses its file store unless this opt-out is set (it wants a sqlite database, which needs
        # SQLAlchemy and Alembic and a schema migration on first use); a run's own folder of plain files is what
        # graft wants beside a run, so the opt-out is set for this process unless the user chose a value
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # an explicit file: URI: MLflow 3 otherwise defaults to a sqlite database in the working folder
        return store.resolve().as_uri()

    def _tracking(self) -> dict:
        """tracking.json's run ids (data: a value that is not text is ignored by its reader)."""
        try:
            saved = json.loads((self.run_dir / TRACKING_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return saved if isinstance(saved, dict) else {}

    def _remember(self, values: dict) -> None:
        write_json(self.run_dir / TRACKING_FILE, {**self._tracking(), **values})

    def _saved_run(self, uri: str) -> str | None:
        saved = self._tracking()
        same = saved.get("mlflow_tracking_uri") == uri
        return saved.get("mlflow_run_id") if same and isinstance(saved.get("mlflow_run_id"), str) else None

    # --- Weights & Biases ---
    def _open_wandb(self, start_epoch: int) -> None:
        import wandb

        folder = None
        if not os.environ.get("WANDB_DIR"):  # the user's folder wins; else RUN/wandb, graft's whole (as mlruns)
            folder = self.run_dir / "wandb"
            if not folder.exists():
                folder.mkdir()
                outputs.record_whole(folder)
        saved = self._tracking().get("wandb_run_id") if start_epoch else None
        if not (isinstance(saved, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", saved)):
            saved = None  # tracking.json is data: only a plain run id (wandb names folders with it) is resumed
        model, train = self.config.model, self.config.train
        options = {"project": os.environ.get("WANDB_PROJECT") or "graft", "name": self.run_dir.name,
                   "dir": str(self.run_dir) if folder else None, "config": self.config.to_dict(),
                   "tags": [model.backbone, train.strategy], "id": saved, "resume": "allow" if saved else None}
        mode = wandb_mode()
        try:
            self.wandb_run = self._wandb_init(wandb, mode, options)
        except Exception as error:  # noqa: BLE001 - no network, a refused key: the run is kept offline instead
            if mode != "online":
                raise
            reason = (str(error).strip().splitlines() or [""])[0][:200]
            self.log(f"warning: wandb could not reach its server ({type(error).__name__}: {reason}); logging "
                     "offline instead (wandb sync the run folder later)")
            self.wandb_run = self._wandb_init(wandb, "offline", options)
        logged = self._tracking().get("wandb_last_epoch") if saved else 0
        self.wandb_logged = logged if isinstance(logged, int) and not isinstance(logged, bool) else 0
        self._remember({"wandb_run_id": self.wandb_run.id})
        self.wandb_run.define_metric("*", step_metric="epoch")  # every value against the epoch, resumed or not

    def _wandb_init(self, wandb, mode: str, options: dict):
        # a bounded start; no console capture or system monitor (the run's own log and figures are graft's)
        settings = wandb.Settings(mode=mode, init_timeout=WANDB_INIT_TIMEOUT_S, console="off", silent=True,
                                  x_disable_stats=True, x_disable_machine_info=True, disable_git=True,
                                  save_code=False, x_graphql_timeout_seconds=TRACKER_TIMEOUT_S)
        return wandb.init(**options, settings=settings, reinit="create_new")

    def _backfill(self, history: list[dict]) -> None:
        logged: list[int] = []  # the epochs the MLflow run holds already
        if self._active("mlflow"):
            self._safely("mlflow", lambda: logged.extend(
                metric.step for metric in self.client.get_metric_history(self.run_id, "train_loss")))
        for row in history:
            self._epoch_scalars(row, mlflow=row["epoch"] not in logged)

    # --- the hooks ---
    def learning_rates(self, epoch: int, rates: dict[str, float]) -> None:
        if self._active("tensorboard"):
            self._safely("tensorboard", lambda: [self.writer.add_scalar(f"lr/{group}", lr, epoch)
                                                 for group, lr in rates.items()])
        if self._active("mlflow"):
            self._safely("mlflow", self._log_metrics, {f"lr.{group}": lr for group, lr in rates.items()}, epoch)
        if self._active("wandb"):
            self._safely("wandb", self.wandb_run.log, {"epoch": epoch, **{f"lr/{group}": lr for group, lr in
                                                                          rates.items()}})

    def epoch_end(self, row: dict) -> None:
        self._epoch_scalars(row)

    def _epoch_scalars(self, row: dict, mlflow: bool = True) -> None:
        epoch = row["epoch"]
        self.step = epoch
        values = {key: float(row[key]) for key in (*_SCALARS, "lr") if key in row}
        if self._active("tensorboard"):
            def scalars():
                for key, value in values.items():
                    if math.isfinite(value):
                        self.writer.add_scalar(_SCALARS.get(key, key), value, epoch)
                self.writer.flush()  # a cluster's TensorBoard sees each epoch as it ends

            self._safely("tensorboard", scalars)
        if mlflow and self._active("mlflow"):
            self._safely("mlflow", self._log_metrics, values, epoch)
        if epoch > self.wandb_logged and self._active("wandb"):
            self._safely("wandb", self._wandb_epoch, epoch, values)

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items() if math.isfinite(value)]
        self.client.log_batch(self.run_id, metrics=metrics)

    def fit_end(self, result: FitResult) -> None:
        final = {}
        for split in ("val", "test"):
            scores = result.metrics.get(split)
            if isinstance(scores, dict):
                final.update({f"{split}.{key}": float(value) for key, value in scores.items()
                              if isinstance(value, (int, float)) and not isinstance(value, bool)})
        matrix = (result.metrics.get("val") or {}).get("confusion_matrix")
        image = confusion_image(matrix) if matrix else None
        if self._active("tensorboard"):
            self._safely("tensorboard", self._tensorboard_end, final, image)
        if self._active("mlflow"):
            self._safely("mlflow", self._mlflow_end, final, image)
        if self._active("wandb"):
            self._safely("wandb", self._wandb_end, final, image)

    def _tensorboard_end(self, final: dict, image: np.ndarray | None) -> None:
        for key, value in final.items():
            if math.isfinite(value):
                self.writer.add_scalar(f"final/{key}", value, self.step)
        if image is not None:
            self.writer.add_image("confusion_matrix/val", image, self.step, dataformats="HWC")

    def _mlflow_end(self, final: dict, image: np.ndarray | None) -> None:
        self._log_metrics({f"final.{key}": value for key, value in final.items()}, self.step)
        if image is not None:
            self.client.log_image(self.run_id, image, artifact_file="confusion_matrix_val.png")
        for name in _ARTIFACTS:
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))

    def _wandb_epoch(self, epoch: int, values: dict[str, float]) -> None:
        self.wandb_run.log({"epoch": epoch, **{_SCALARS.get(key, key): value for key, value in values.items()
                                               if math.isfinite(value)}})
        self.wandb_logged = epoch
        self._remember({"wandb_last_epoch": epoch})  # so a resume logs exactly the epochs the run lacks

    def _wandb_end(self, final: dict, image: np.ndarray | None) -> None:
        import wandb

        self.wandb_run.summary.update({f"final/{key}": value for key, value in final.items() if math.isfinite(value)})
        if image is not None:
            self.wandb_run.log({"epoch": self.step, "confusion_matrix/val": wandb.Image(image)})

    def _wandb_finish(self, exit_code: int) -> None:
        import wandb

        self.wandb_run.finish(exit_code)
        if wandb.run is None:  # no run of the user's is active: stop W&B's service, which then writes out the run's
            wandb.teardown()  # log (finish alone may leave it to a later flush), so it is complete when fit returns

    def close(self, status: str = "FINISHED") -> None:
        """Flushes and closes the trackers (``status``: MLflow's FINISHED, FAILED or KILLED) and records what they
        wrote in the run's manifests."""
        if self.writer is not None:
            self._safely("tensorboard", self.writer.close)
        if self.run_id is not None:
            self._safely("mlflow", self.client.set_terminated, self.run_id, status)
        if self.wandb_run is not None:
            self._safely("wandb", self._wandb_finish, 0 if status == "FINISHED" else 1)
        if self.writer is not None:
            self._safely("tensorboard", self._record_event_files)

    def _record_event_files(self) -> None:
        """The event files this process wrote (SummaryWriter does not write through graft's atomic_write)."""
        for path in (self.run_dir / "tensorboard").iterdir():
            if "tfevents" in path.name and path.is_file() and path.stat().st_mtime >= self.since:
                outputs.record(path)
