"""``graft export --quantize int8``: an int8 ONNX model beside the float one, kept only when it stays accurate.

ONNX Runtime's static quantization (QDQ format, int8 weights per output channel, uint8 activations — the x86
recommendation — ranges by min/max) is calibrated on a seeded sample of the run's own training images in the
model's evaluation preprocessing, decoded by graft's own decoder. Both models then classify the run's validation
images (or ``--data``'s); the int8 file is written only when its accuracy is at most ``MAX_DROP_POINTS`` below the
float model's, or when the caller forces it. Either way the numbers go into ``export.json``.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from graft.data.datasets import ImageDataset, loader_options
from graft.data.discovery import discover
from graft.data.scan import readable
from graft.data.transforms import create_transform
from graft.errors import GraftError
from graft.models.grafted import GraftModel
from graft.models.run_folder import config_from_card, read_card, refuse_label_sets
from graft.utils.files import atomic_write

__all__ = ["CALIBRATION_IMAGES", "INT8_FILE", "MAX_DROP_POINTS", "QUANTIZE_MODES", "CalibrationImages",
           "QuantizeResult", "labelled_splits", "onnx_predictions", "quantize_int8"]

QUANTIZE_MODES = ("int8",)
INT8_FILE = "model.int8.onnx"
MAX_DROP_POINTS = 1.0  # accuracy points int8 may lose against the float ONNX model before it is refused
CALIBRATION_IMAGES = 128  # a seeded sample of the training images; min/max ranges settle well before this
BATCH = 32


@dataclass
class QuantizeResult:
    """What ``export.json`` records under ``quantization``; ``refusal`` is the one-line error when not kept."""
    record: dict = field(default_factory=dict)
    refusal: str | None = None


class CalibrationImages:
    """ONNX Runtime's ``CalibrationDataReader`` (it accepts any object with ``get_next``): batches of images in
    the model's evaluation preprocessing, decoded by graft's own decoder, as ``{"images": array}``."""

    def __init__(self, samples: list, transform, batch_size: int = BATCH):
        self.loader = DataLoader(ImageDataset(samples, transform), batch_size=batch_size, **loader_options("cpu"))
        self.batches = iter(self.loader)

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {"images": batch[0].numpy()}

    def rewind(self) -> None:
        self.batches = iter(self.loader)


def labelled_splits(run_dir: Path, model: GraftModel, data: str | None, seed: int = 0) -> tuple[list, list, str]:
    """(calibration samples, evaluation samples, where they came from): a seeded sample of the run's training
    images, and its validation images (``data``'s, if given: its val split, else its test split), with labels in
    the model's class order."""
    card = read_card(run_dir)
    refuse_label_sets(card, run_dir, "graft export --quantize")
    config = config_from_card(card)
    source = data or config.data.path
    if not source:
        raise GraftError(f"{run_dir}: graft.json names no data to calibrate and check int8 on; pass --data")
    splits = discover(source, config.data.val_fraction, config.train.seed, 0.0 if data else config.data.test_fraction,
                      *((None, None) if data else (config.data.image_column, config.data.label_column)))
    unknown = sorted(set(splits.classes) - set(model.classes))
    if unknown:
        raise GraftError(f"{source}: classes the model does not know: {', '.join(unknown[:5])}; pass --data with "
                         "the run's classes")
    index = [model.classes.index(name) for name in splits.classes]
    calibration = readable(random.Random(seed).sample(splits.train, min(CALIBRATION_IMAGES, len(splits.train))))
    evaluation = readable(splits.val or splits.test)
    if not calibration or not evaluation:
        missing = "training" if not calibration else "validation"
        raise GraftError(f"{source}: no readable {missing} images to calibrate and check the int8 model on; pass "
                         "--data with train/ and val/ folders")
    return ([(path, index[label]) for path, label in calibration], [(path, index[label]) for path, label in evaluation],
            source)


def onnx_predictions(sessions: list, samples: list, transform) -> tuple[np.ndarray, list[np.ndarray]]:
    """(labels, top-1 class index under each ONNX Runtime session) of the samples, in batches of ``BATCH``: each
    image decoded once for all sessions; the labels are the loader's (a file broken since the check is replaced)."""
    labels, predicted = [], [[] for _ in sessions]
    for images, batch_labels in DataLoader(ImageDataset(samples, transform), batch_size=BATCH, **loader_options("cpu")):
        labels.append(batch_labels.numpy())
        for session, into in zip(sessions, predicted):
            into.append(session.run(None, {"images": images.numpy()})[0].argmax(1))
    return np.concatenate(labels), [np.concatenate(found) for found in predicted]


def _quantize_file(fp32: Path, int8: Path, reader: CalibrationImages) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="graft-quantize-") as folder:
        prepared = Path(folder) / "prepared.onnx"  # shape inference and graph optimisation ease quantization
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=False)
        quantize_static(str(prepared), str(int8), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)


def quantize_int8(run_dir: Path, out_dir: Path, model: GraftModel, data: str | None, session_for,
                  force: bool = False, max_drop: float = MAX_DROP_POINTS, log=None) -> QuantizeResult:
    """Quantizes ``out_dir/model.onnx`` into ``out_dir/model.int8.onnx`` (see the module doc).

    Args:
        session_for: opens an ONNX Runtime session on a path (export's ``onnx_session``).
        max_drop: accuracy points int8 may lose; tests pass an impossible bound to see the refusal.
    """
    say = log or (lambda message: None)
    transform = create_transform(model.preprocessing)
    calibration, evaluation, source = labelled_splits(run_dir, model, data)
    say(f"quantizing to int8: calibrating on {len(calibration)} training images, checking on {len(evaluation)} "
        f"validation images from {source}")
    with tempfile.TemporaryDirectory(prefix="graft-quantize-") as folder:
        candidate = Path(folder) / INT8_FILE  # written into place only once it passed (or was forced)
        try:
            _quantize_file(out_dir / "model.onnx", candidate, CalibrationImages(calibration, transform))
        except (GraftError, OSError):
            raise
        except Exception as error:  # noqa: BLE001 - ONNX Runtime's tools raise anything; one line, not a traceback
            raise GraftError(f"{out_dir / 'model.onnx'}: ONNX Runtime could not quantize it to int8 "
                             f"({str(error).splitlines()[0][:200] if str(error) else type(error).__name__}); "
                             "export without --quantize") from None
        labels, (fp32, int8) = onnx_predictions([session_for(out_dir / "model.onnx"), session_for(candidate)],
                                                evaluation, transform)
        accuracy = {"fp32": float((fp32 == labels).mean()), "int8": float((int8 == labels).mean())}
        drop = round((accuracy["fp32"] - accuracy["int8"]) * 100, 4)
        kept = drop <= max_drop or force
        record = {"mode": "int8", "file": INT8_FILE if kept else None, "kept": kept, "forced": force and
                  drop > max_drop, "scheme": "ONNX Runtime static, QDQ, per-channel int8 weights, uint8 activations, "
                  "min/max calibration", "calibration_images": len(calibration), "evaluation_images": len(evaluation),
                  "data": str(source), "accuracy": accuracy, "top1_agreement": float((fp32 == int8).mean()),
                  "accuracy_drop_points": drop, "max_drop_points": max_drop}
        if kept:
            atomic_write(out_dir / INT8_FILE, lambda temp: Path(temp).write_bytes(candidate.read_bytes()))
    say(f"int8: accuracy {accuracy['int8']:.4f} vs fp32 {accuracy['fp32']:.4f} on {len(evaluation)} images, top-1 "
        f"agreement {record['top1_agreement']:.4f}")
    if kept:
        return QuantizeResult(record)
    return QuantizeResult(record, f"int8 quantization refused: accuracy {accuracy['int8']:.4f} vs fp32 "
                          f"{accuracy['fp32']:.4f} on {len(evaluation)} images of {source} loses {drop:.2f} points "
                          f"(more than {max_drop:g}); {INT8_FILE} not written: pass --force-quantize to keep it "
                          "anyway")
