"""`graft serve --runtime onnx` gives ONNX Runtime a deliberate share of the cores, not a spinning thread per core."""

import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")

from graft.deploy.serve import ServeConfig, create_app, onnx_threads  # noqa: E402
from graft.models.onnx_engine import OnnxModule  # noqa: E402


def test_a_third_of_the_cores_is_left_to_decoding_and_http():
    assert [onnx_threads(cores) for cores in (1, 2, 3, 4, 8, 16)] == [1, 1, 2, 3, 6, 11]


def test_the_serve_session_uses_that_many_threads_and_does_not_spin(trained_run, tmp_path):
    run = Path(shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("runtime")))
    app = create_app(run, "cpu", ServeConfig(runtime="onnx"))
    (member,) = app.state.predictor.per_view
    assert isinstance(member.model, OnnxModule)
    options = member.model.session.get_session_options()
    assert options.intra_op_num_threads == onnx_threads()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
