"""fit --log tensorboard,mlflow,wandb,csv: what each tracker wrote, read back with its own reader (W&B's offline
transaction log with a reader of its record format written here)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import tiny_config
from synthetic import make_shapes

from graft.config import FitConfig, flatten, load_config
from graft.errors import GraftError
from graft.training.fitting import fit
from graft.training.tracking import confusion_image
from graft.utils import outputs

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
EPOCHS = 2


@pytest.fixture(scope="module")
def two_shapes(tmp_path_factory) -> Path:
    root = make_shapes(tmp_path_factory.mktemp("two"), splits={"train": 12, "val": 6}, seed=3)
    for split in ("train", "val"):
        shutil.rmtree(sorted((root / split).iterdir())[-1])  # two classes
    return root


@pytest.fixture(scope="module")
def tracked(two_shapes, tmp_path_factory):
    """A 2-epoch finetune with all three trackers, into the run's own local stores."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    config = tiny_config(two_shapes, run_dir, **{"train.strategy": "finetune", "train.head_fit": "epochs",
                                                 "train.head_epochs": 0, "train.epochs": EPOCHS,
                                                 "log": "tensorboard,mlflow,csv"})
    return fit(config, verbose=False)


def _scalars(run_dir: Path) -> tuple[dict[str, list], list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}, tags["images"]


def test_tensorboard_scalars_equal_the_history(tracked):
    scalars, images = _scalars(tracked.run_dir)
    history = tracked.history
    assert len(history) == EPOCHS
    for tag, key in (("loss/train", "train_loss"), ("loss/val", "val_loss"), ("accuracy/train", "train_acc"),
                     ("accuracy/val", "val_acc"), ("lr", "lr")):
        assert [step for step, _ in scalars[tag]] == [row["epoch"] for row in history]
        assert [value for _, value in scalars[tag]] == pytest.approx([row[key] for row in history], rel=1e-6)
    assert "lr/head" in scalars and any(tag.startswith("lr/trunk") for tag in scalars)  # per param group
    assert scalars["final/val.accuracy"][0][1] == pytest.approx(tracked.metrics["val"]["accuracy"], rel=1e-6)
    assert images == ["confusion_matrix/val"]


def test_mlflow_run_reads_back(tracked):
    from mlflow.tracking import MlflowClient

    store = tracked.run_dir / "mlruns"
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("graft").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    config = FitConfig.from_dict(__import__("json").loads((tracked.run_dir / "graft.json").read_text())["config"])
    assert run.data.params == {key: str(value) for key, value in flatten(config.to_dict()).items()}
    assert run.data.tags["backbone"] == "test_resnet" and run.data.tags["strategy"] == "finetune"
    assert "graft_version" in run.data.tags
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([row["val_loss"] for row in tracked.history], rel=1e-6)
    assert run.data.metrics["final.val.accuracy"] == pytest.approx(tracked.metrics["val"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"graft.json", "metrics.json", "history.csv", "confusion_matrix_val.png"} <= artifacts
    assert "model.safetensors" not in artifacts


def test_csv_equals_the_history(tracked):
    with open(tracked.run_dir / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == EPOCHS
    for row, expected in zip(rows, tracked.history):
        assert int(row["epoch"]) == expected["epoch"]
        for key in ("train_loss", "val_loss", "train_acc", "val_acc", "lr"):
            assert float(row[key]) == pytest.approx(expected[key], rel=1e-9)


def test_tracking_folders_are_graft_products(tracked, tmp_path):
    """--overwrite removes both trackers' folders; a user's file in tensorboard/ (older than the run) stays."""
    run_dir = tracked.run_dir
    names = outputs.read_manifest(run_dir)
    assert {"tensorboard", "mlruns/", "tracking.json"} <= set(names), names
    events = [p.name for p in (run_dir / "tensorboard").iterdir() if "tfevents" in p.name]
    assert events and set(events) <= set(outputs.read_manifest(run_dir / "tensorboard"))
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "tensorboard" / "notes.txt").write_text("a user's file")
    os.utime(copy / "tensorboard" / "notes.txt", (0, 0))
    (copy / "mine.txt").write_text("a user's file")
    left = outputs.replace_own(copy)
    assert left == ["mine.txt", "tensorboard"]
    assert [p.name for p in (copy / "tensorboard").iterdir() if p.name != outputs.MANIFEST] == ["notes.txt"]
    assert not (copy / "mlruns").exists()


def test_resume_appends_to_the_same_trackers(two_shapes, tmp_path):
    """Interrupted after epoch 1 (Ctrl-C in the hook), resumed: one MLflow run with both epochs, events 1 and 2."""
    from mlflow.tracking import MlflowClient

    from graft.training.state import Hooks

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    run_dir = tmp_path / "run"
    config = tiny_config(two_shapes, run_dir, **{"train.strategy": "probe", "train.head_fit": "epochs",
                                                 "train.epochs": 2, "log": ["tensorboard", "mlflow"]})

    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(config, hooks=Hooks(on_epoch_end=stop), verbose=False)
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    first = client.search_runs([client.get_experiment_by_name("graft").experiment_id])
    assert [r.info.status for r in first] == ["KILLED"]
    result = fit(config, resume=True, verbose=False)
    runs = client.search_runs([client.get_experiment_by_name("graft").experiment_id])
    assert [r.info.run_id for r in runs] == [first[0].info.run_id] and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss")] == [1, 2]
    scalars, _ = _scalars(run_dir)
    assert [step for step, _ in scalars["loss/val"]] == [1, 2]
    assert [v for _, v in scalars["loss/val"]] == pytest.approx([r["val_loss"] for r in result.history], rel=1e-6)


def test_mlflow_tracking_uri_wins(two_shapes, tmp_path, monkeypatch):
    """A user's $MLFLOW_TRACKING_URI: the run goes there, and the run folder holds no store of its own."""
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "theirs").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    config = tiny_config(two_shapes, tmp_path / "run", **{"train.strategy": "probe", "train.head_fit": "epochs",
                                                          "train.epochs": 1, "log": "mlflow"})
    fit(config, verbose=False)
    assert not (tmp_path / "run" / "mlruns").exists()
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("graft").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["graft.run_dir"] == str((tmp_path / "run").resolve())


def test_unknown_logger_refused_with_the_known_ones(tmp_path):
    with pytest.raises(GraftError, match="--log 'comet' not understood: choose from tensorboard, mlflow, wandb, csv"):
        load_config(None, {"data.path": str(tmp_path), "log": "tensorboard,comet"})
    with pytest.raises(GraftError, match="list of names"):
        load_config(None, {"data.path": str(tmp_path), "log": [1]})
    assert load_config(None, {"data.path": str(tmp_path), "log": ["csv", "mlflow", "csv"]}).log == "csv,mlflow,csv"


def test_missing_package_refused_before_training(two_shapes, tmp_path):
    """tensorboard blocked in a fresh interpreter: the GraftError names the extra, and nothing was written."""
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys
        sys.modules["tensorboard"] = None
        from graft.training.fitting import fit
        from graft.errors import GraftError
        try:
            fit({str(two_shapes)!r}, backbone="test_resnet", pretrained=False, image_size=32, workers=0, epochs=1,
                output={str(run_dir)!r}, log="tensorboard", verbose=False)
        except GraftError as error:
            print("refused:", error)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert "refused: --log tensorboard needs the tensorboard package: pip install 'graft[track]'" in done.stdout, \
        done.stderr[-2000:]
    assert not run_dir.exists()  # refused before the output folder was even made


def test_a_failing_tracker_warns_once_and_the_run_completes(two_shapes, tmp_path, monkeypatch, capsys):
    from torch.utils.tensorboard import SummaryWriter

    calls = []

    def broken(self, *args, **kwargs):
        calls.append(args[0])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", broken)  # in the test only: a full disk under TensorBoard
    run_dir = tmp_path / "run"
    config = tiny_config(two_shapes, run_dir, **{"train.strategy": "probe", "train.head_fit": "epochs",
                                                 "train.epochs": 2, "log": "tensorboard"})
    result = fit(config, verbose=True)
    assert result.metrics["epochs"] == 2 and (run_dir / "model.safetensors").is_file()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "tensorboard logging failed" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert len(calls) == 1  # dropped after the first failure


def test_confusion_image_shades_rows():
    image = confusion_image([[3, 1], [0, 4]], cell=20)
    assert image.shape == (41, 41, 3) and image.dtype.name == "uint8"
    full, empty = image[30, 35], image[30, 5]  # row 1: all four in column 1, none in column 0
    assert tuple(empty) == (255, 255, 255) and full[0] < 100 and full[2] == 255
    assert not math.isnan(float(image.mean()))


@pytest.fixture
def silent_server():
    """A tracking server that accepts each connection and never answers: (its URI, the connections it accepted)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []

    def accept():
        while True:
            try:
                accepted.append(server.accept()[0])  # held open, never answered: what a hung server does
            except OSError:  # closed at the end of the test
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    server.close()
    for connection in accepted:
        connection.close()


def test_an_unanswering_mlflow_server_costs_one_request_and_one_warning(two_shapes, tmp_path, monkeypatch,
                                                                       silent_server, capsys):
    """MLflow's defaults retry such a server 7 times with backoff (minutes, nothing printed): graft asks once."""
    uri, accepted = silent_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # the test's own bound on the one request it waits for
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "unset")  # so that the teardown removes what graft sets
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    config = tiny_config(two_shapes, tmp_path / "run", **{"train.strategy": "probe", "train.head_fit": "epochs",
                                                          "train.epochs": 1, "log": "mlflow"})
    result = fit(config, verbose=True)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "mlflow logging failed" in line]
    assert len(warnings) == 1 and "training goes on without it" in warnings[0], warnings
    assert len(accepted) == 1  # asked once, then dropped: no retries, no request per epoch
    assert len(result.history) == 1 and not (tmp_path / "run" / "tracking.json").exists()
    assert json.loads((tmp_path / "run" / "graft.json").read_text())["status"] == "complete"


def _wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (``run-ID.wandb``): a 7-byte ``:W&B`` header, then LevelDB's log
    format (32 KiB blocks of records, each a 7-byte header: CRC, little-endian length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        if room < 7:  # a block's tail too short for a header is padding
            position += room
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL, LAST: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_reads_back(two_shapes, tmp_path, monkeypatch):
    """WANDB_MODE=offline: the run's transaction log holds graft's config, each epoch's values and the final ones."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    config = tiny_config(two_shapes, tmp_path / "run", **{"train.strategy": "finetune", "train.head_fit": "epochs",
                                                          "train.head_epochs": 0, "train.epochs": EPOCHS,
                                                          "log": "wandb"})
    result = fit(config, verbose=False)
    logs = list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1 and not (tmp_path / "run" / "wandb").exists()  # the user's WANDB_DIR wins
    records = list(_wandb_records(logs[0]))
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    saved_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["wandb_run_id"]
    assert [run.run_id for run in runs] == [saved_id]
    logged = {item.key: json.loads(item.value_json) for item in runs[0].config.update}
    saved = json.loads((tmp_path / "run" / "graft.json").read_text())["config"]
    assert {key: logged[key] for key in saved} == saved
    rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    epochs = [row for row in rows if "loss/val" in row]
    assert [row["epoch"] for row in epochs] == [row["epoch"] for row in result.history] == [1, 2]
    for tag, key in (("loss/train", "train_loss"), ("loss/val", "val_loss"), ("accuracy/val", "val_acc"), ("lr", "lr")):
        assert [row[tag] for row in epochs] == pytest.approx([row[key] for row in result.history], rel=1e-6)
    assert any("lr/head" in row for row in rows)
    summary = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
               for r in records if r.WhichOneof("record_type") == "summary" for item in r.summary.update}
    assert summary["final/val.accuracy"] == pytest.approx(result.metrics["val"]["accuracy"], rel=1e-6)
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [0]


def test_wandb_resume_continues_the_run(two_shapes, tmp_path, monkeypatch):
    """Ctrl-C in epoch 1's hook (before the trackers saw it), resumed: the same W&B run id, and the resumed process's
    log holds epoch 1 (from the history) and epoch 2, once each."""
    from graft.training.state import Hooks

    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run_dir = tmp_path / "run"
    config = tiny_config(two_shapes, run_dir, **{"train.strategy": "probe", "train.head_fit": "epochs",
                                                 "train.epochs": 2, "log": "wandb"})

    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(config, hooks=Hooks(on_epoch_end=stop), verbose=False)
    first = json.loads((run_dir / "tracking.json").read_text())["wandb_run_id"]
    result = fit(config, resume=True, verbose=False)
    assert "wandb/" in outputs.read_manifest(run_dir)  # RUN/wandb is graft's: --overwrite removes it whole
    logs = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and all(log.name == f"run-{first}.wandb" for log in logs)
    resumed = [record for record in _wandb_records(logs[-1]) if record.WhichOneof("record_type") == "history"]
    rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in resumed]
    assert [(row["epoch"], row["loss/val"]) for row in rows if "loss/val" in row] == \
        [(row["epoch"], pytest.approx(row["val_loss"], rel=1e-6)) for row in result.history]


def test_wandb_goes_offline_without_a_login(tmp_path, monkeypatch):
    """No WANDB_MODE: offline when graft is offline or no login is configured (an online start would ask for a key)."""
    from graft.training.tracking import wandb_mode

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("GRAFT_OFFLINE", "0")
    assert wandb_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password KEY\n")
    assert wandb_mode() == "online"
    monkeypatch.setenv("GRAFT_OFFLINE", "1")
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode() == "online"
