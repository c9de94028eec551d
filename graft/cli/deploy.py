"""`graft export`, `graft serve` and `graft precise-bn`: getting a trained run out of graft."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from graft.cli.shared import (
    BATCH_SIZES,
    TOP_K,
    DeviceOpt,
    RuntimeOpt,
    TTAOpt,
    app,
    check_options,
    check_runtime,
    err,
    friendly_errors,
    out,
    print_table,
)
from graft.errors import GraftError
from graft.utils.limits import SERVE_MAX_PIXELS

__all__ = ["export", "precise_bn_command", "push", "serve"]


@app.command()
@friendly_errors
def export(
    run: Annotated[str, typer.Argument(help="the run folder to export")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="default: RUN/export")] = None,
    formats: Annotated[str, typer.Option("--format", help="comma-separated: onnx, torch, safetensors, timm, hf "
                                          "(timm / hf: a folder plain timm or the Hugging Face hub loads; OUTPUT/timm, "
                                          "OUTPUT/hf beside other formats, OUTPUT itself alone)")] =
    "onnx,torch,safetensors",
    fold_bn: Annotated[bool, typer.Option("--fold-bn/--no-fold-bn", help="fold batch norms into convs")] = True,
    data: Annotated[Optional[str], typer.Option(help="images for the parity checks (default: the run's data)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty output folder")] = False,
    quantize: Annotated[Optional[str], typer.Option(help="int8: also model.int8.onnx (static quantization "
                                                    "calibrated on the training images), refused when it loses more "
                                                    "than 1 accuracy point against the float model")] = None,
    force_quantize: Annotated[bool, typer.Option(help="keep the int8 model whatever accuracy it loses")] = False,
):
    """Export for deployment (ONNX, torch.export, safetensors + JSON), each verified against the trained model.

    Example: graft export runs/pets --format onnx,torch,safetensors,timm,hf;  graft export runs/pets --quantize int8
    """
    from graft.deploy.export import export as export_run

    result = export_run(run, output or Path(run) / "export", tuple(f.strip() for f in formats.split(",") if f.strip()),
                        fold_bn, data, overwrite, log=lambda message: err.print(message), quantize=quantize,
                        force_quantize=force_quantize)
    rows = [[form, f"{difference:.2e}"] for form, difference in result.parity.items()]
    print_table(f"exported to {result.out_dir} (parity on {result.inputs})", ["form", "max |Δlogit|"], rows)
    if result.latency_ms:  # none for --format timm / hf, which time nothing
        print_table("batch-1 latency (median, CPU)", ["form", "ms"],
                    [[form, f"{ms:.3f}"] for form, ms in result.latency_ms.items()])
    if result.quantization:
        done = result.quantization
        print_table(f"int8 vs fp32 on {done['evaluation_images']} validation images (top-1 agreement "
                    f"{done['top1_agreement']:.4f})", ["model", "accuracy"],
                    [[name, f"{value:.4f}"] for name, value in done["accuracy"].items()])
    out.print("files: " + ", ".join(result.files))


@app.command()
@friendly_errors
def push(
    run: Annotated[str, typer.Argument(help="the run folder to upload")],
    repo_id: Annotated[str, typer.Argument(help="the hub repository, OWNER/NAME")],
    private: Annotated[bool, typer.Option("--private/--public", help="a private repository")] = False,
    folder: Annotated[Optional[Path], typer.Option("--folder", help="a folder `graft export --format hf` wrote, "
                                                   "uploaded only if every file matches its export.json (default: "
                                                   "exported now to RUN/hf)")] = None,
):
    """Upload a run to the Hugging Face hub as a timm model repository (weights, config.json, model card).

    Example: graft push runs/pets your-name/pets-resnet50 --private
    """
    from graft.deploy.hub import push as push_run

    url = push_run(run, repo_id, private, folder, log=lambda message: err.print(message))
    out.print(f"uploaded to {url}")


@app.command("precise-bn")
@friendly_errors
def precise_bn_command(
    run: Annotated[str, typer.Argument(help="a finished run folder")],
    data: Annotated[Optional[str], typer.Option(help="the training data (default: the run's own)")] = None,
    device: DeviceOpt = "auto",
    augment: Annotated[bool, typer.Option("--augment/--no-augment",
                                          help="in the training augmentation (default) or evaluation preprocessing")]
    = True,
):
    """Recompute batch-norm statistics over the whole training set ("precise BN") and save them into the run.

    Example: graft precise-bn runs/pets
    """
    from graft.training.precise_bn import precise_bn

    precise_bn(run, data, device, augmented=augment)


@app.command()
@friendly_errors
def serve(
    runs: Annotated[list[str], typer.Argument(help="RUN [RUN...] (several: an ensemble)")],
    host: Annotated[str, typer.Option(help="127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")] =
    "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    device: DeviceOpt = "auto",
    max_upload_mb: Annotated[float, typer.Option(help="largest request body accepted")] = 20.0,
    max_pixels: Annotated[int, typer.Option(help="largest image accepted (decompression bombs)")] = SERVE_MAX_PIXELS,
    max_batch: Annotated[int, typer.Option(help="images per forward pass")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="how long a request waits to share a batch")] = 10.0,
    top_k: Annotated[int, typer.Option("--top-k", "-k")] = 5,
    tta: TTAOpt = None,
    runtime: RuntimeOpt = "auto",
    audit: Annotated[Optional[Path], typer.Option(help="a folder graft audit wrote: also a review page on /review to "
                                                  "confirm or reject its suspects, saved to AUDIT/decisions.csv "
                                                  "(what fit --exclude reads)")] = None,
    data: Annotated[Optional[str], typer.Option(help="with --audit: the dataset it audited (default: the data field "
                                                "of AUDIT/audit.json)")] = None,
    label: Annotated[Optional[str], typer.Option(help="instead: a page to label this pool of images (folder, glob "
                                                 "or CSV) with the run's classes")] = None,
    labels_out: Annotated[Optional[Path], typer.Option(help="with --label: the path,label CSV written (default "
                                                       "./labels.csv); graft fit reads it as a manifest")] = None,
    suggestions: Annotated[Optional[Path], typer.Option(help="with --label: only the images of this "
                                                        "suggestions.csv (graft suggest), in its order")] = None,
):
    """Serve predictions over HTTP: POST /predict (multipart images), a web page on GET /, /health, /metadata, /report.

    Example: graft serve runs/pets --port 8000   then   curl -F file=@cat.jpg localhost:8000/predict;
    graft serve runs/pets --audit audit/   then open localhost:8000/review
    graft serve runs/pets --label ./unlabelled --labels-out new-labels.csv
    """
    check_options(("--port", port, 1, 65535))
    if label is not None or labels_out is not None or suggestions is not None:
        if audit is not None or data is not None:
            raise GraftError("--label serves a labelling page and --audit a review page: run one at a time")
        _serve_labelling(runs, label, labels_out, suggestions, host, port)
        return
    from graft.deploy.labelsets import refuse_one_label_mode
    from graft.deploy.serve import ServeConfig
    from graft.deploy.serve import serve as serve_runs

    check_options(("--port", port, 1, 65535), ("--max-upload-mb", max_upload_mb, 0, 10_240, True),
                  ("--max-pixels", max_pixels, 1, 1_000_000_000), ("--max-batch", max_batch, *BATCH_SIZES),
                  ("--max-wait-ms", max_wait_ms, 0, 60_000), ("--top-k", top_k, *TOP_K))
    check_runtime(runtime)
    config = ServeConfig(max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=max_pixels,
                         max_batch=max_batch, max_wait_ms=max_wait_ms, top_k=top_k, tta=tta, runtime=runtime)
    if data is not None and audit is None:
        raise GraftError("--data goes with --audit (the dataset the audit read)")
    if audit is not None:
        refuse_one_label_mode(runs, "--audit")  # before the line saying where the review page is
        err.print(f"review page: http://{host}:{port}/review (decisions go to {audit / 'decisions.csv'})")
    serve_runs(runs, host, port, device, config, audit, data)


def _serve_labelling(runs: list[str], pool: str | None, labels_out: Path | None, suggestions: Path | None,
                     host: str, port: int) -> None:
    from graft.deploy.labelling import serve_labelling

    if pool is None:
        raise GraftError("--labels-out and --suggestions go with --label POOL: name the images to label")
    if len(runs) != 1:
        raise GraftError(f"--label takes one run (its classes are the labels), got {len(runs)}")
    serve_labelling(runs[0], pool, labels_out, suggestions, host, port, log=err.print)
