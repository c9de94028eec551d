"""predict's decoding plan follows the measurements: threads beside ONNX Runtime, the calling thread for eager."""

import pytest
import torch

from graft.data.prefetch import engine_plan
from graft.evaluation.inference import prediction_plan

CPU = torch.device("cpu")


def test_eager_predict_decodes_in_the_calling_thread():
    assert prediction_plan("torch", CPU, -1) is None  # eval_loader with no workers: decode, then forward
    assert prediction_plan("torch", CPU, 2) is None


def test_onnx_predict_keeps_the_threaded_plan():
    pytest.importorskip("onnxruntime")
    assert prediction_plan("onnx", CPU, -1) == engine_plan(True)
    assert prediction_plan("auto", CPU, -1) == engine_plan(True)
    assert prediction_plan("onnx", CPU, 2) is None  # a worker count given: DataLoader workers
