"""The `graft` command: a thin typer layer over the library (every command calls an importable function)."""

from __future__ import annotations

import csv
import functools
import io
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from graft.config import MAX_BATCH_SIZE, MAX_EPOCHS, MAX_IMAGE_SIZE, MAX_LR, MIN_IMAGE_SIZE, check_option
from graft.errors import GraftError
from graft.text import display_name

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Transfer learning: a folder of labelled images in, a fine-tuned classifier out.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

# Shared option aliases (as huggingface_hub's CLI does), so each flag is spelled and documented once.
BackboneOpt = Annotated[Optional[str], typer.Option("--backbone", "-b", help="timm name[.tag] or tv:NAME[.WEIGHTS]")]
WeightsOpt = Annotated[Optional[str], typer.Option(help="local .safetensors/.pth weights instead of downloading")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps")]
ActivationOpt = Annotated[Optional[str], typer.Option(help="lab networks: relu, leaky_relu, prelu, elu, selu, gelu, "
                                                           "swish, maxout, tanh or sigmoid")]
NormOpt = Annotated[Optional[str], typer.Option(help="lab networks: batch, layer, instance, group or none")]
InitOpt = Annotated[Optional[str], typer.Option(help="lab networks: kaiming, xavier or normal:STD")]
VggStagesOpt = Annotated[Optional[str], typer.Option(help="vgg-like: CONVSxWIDTH per stage, e.g. 2x32,2x64")]
TTAOpt = Annotated[Optional[str], typer.Option(help="test-time augmentation: flip, crops or flip,crops")]


def friendly_errors(command):
    """Prints a GraftError as one line (no traceback) and exits with status 2; Ctrl-C or SIGTERM exits with 130
    after the library has left its last checkpoint on disk."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        previous = _on_sigterm(_interrupt)  # a scheduler's stop (SIGTERM) is handled like Ctrl-C
        try:
            return command(*args, **kwargs)
        except GraftError as error:
            err.print(f"[red]error:[/red] {error}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]", highlight=False)
            raise typer.Exit(130) from None
        finally:
            _on_sigterm(previous)

    return wrapper


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _on_sigterm(handler):
    """Installs a SIGTERM handler, returning the previous one; a no-op off the main thread (Python forbids it there)."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    # display_name: a class or file name that is not UTF-8 would stop the terminal's encoder
    table = Table(title=display_name(title), title_justify="left")
    for column in columns:
        table.add_column(display_name(column))
    for row in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else display_name(str(v)) for v in row])
    out.print(table)


@app.command()
@friendly_errors
def layers(
    backbone: Annotated[str, typer.Argument(help="timm name[.tag] or tv:NAME")],
    all_nodes: Annotated[bool, typer.Option("--all", help="every named module, not only the stages")] = False,
    size: Annotated[Optional[int], typer.Option(help="input size (default: the backbone's)")] = None,
):
    """List the named nodes of a backbone (output shape, parameters, receptive field): the names --cut-at takes.

    Example: graft layers resnet50 --size 224
    """
    from graft.backbones import create_backbone
    from graft.surgery import DEFAULT_NODE, cut, list_nodes

    _check_options(("--size", size, *IMAGE_SIZES))
    model = create_backbone(backbone, pretrained=False)  # shapes need no weights: works offline
    input_size = model.preprocessing.with_size(size).input_size
    nodes = list_nodes(model.net, input_size, stages_only=not all_nodes, stage_nodes=model.stage_nodes)
    rows = [[n.name + (" *" if n.stage else ""), n.kind, "x".join(map(str, n.shape)), f"{n.params:,}",
             n.receptive_field] for n in nodes]
    _, width = cut(model.net, None, "avg", input_size)
    rows.append([f"{DEFAULT_NODE} (default)", "pooled features", str(width), "", ""])
    print_table(f"{backbone} at {input_size[0]}x{input_size[1]} (* stage)",
                ["node", "type", "output", "params", "receptive field"], rows)


@app.command()
@friendly_errors
def fit(
    data: Annotated[Optional[str], typer.Argument(help="class folders (optionally train/val/test) or a CSV")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="run folder to write")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML file with data/model/train sections")] = None,
    backbone: BackboneOpt = None,
    weights: WeightsOpt = None,
    pretrained: Annotated[Optional[bool], typer.Option("--pretrained/--no-pretrained")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="probe, finetune, scratch or auto")] = None,
    head_fit: Annotated[Optional[str], typer.Option(help="lbfgs (cached features) or epochs")] = None,
    bn_stats: Annotated[Optional[str], typer.Option(help="auto, update or frozen")] = None,
    augment_views: Annotated[Optional[int], typer.Option(help="cached probe: augmented views per image")] = None,
    balance: Annotated[Optional[str], typer.Option(help="imbalanced classes: none, sampler or loss")] = None,
    cache: CacheOpt = None,
    epochs: Annotated[Optional[int], typer.Option(help="epochs of the main stage")] = None,
    head_epochs: Annotated[Optional[int], typer.Option(help="finetune: head-only epochs first")] = None,
    lr: Annotated[Optional[str], typer.Option(help="head learning rate, or auto (lr-find first)")] = None,
    finetune_lr_ratio: Annotated[Optional[float], typer.Option(help="trunk lr = lr x this when unfrozen")] = None,
    stem_lr_ratio: Annotated[Optional[float], typer.Option(help="the stem's lr relative to the top stage's")] = None,
    unfreeze: Annotated[Optional[str], typer.Option(help="all, or last:K stages")] = None,
    cut_at: Annotated[Optional[str], typer.Option(help="node name from `graft layers`")] = None,
    pool: Annotated[Optional[str], typer.Option(help="avg or avgmax")] = None,
    head: Annotated[Optional[str], typer.Option(help="linear, sigmoid (2 classes) or mlp:512[,256]")] = None,
    activation: ActivationOpt = None,
    norm: NormOpt = None,
    init: InitOpt = None,
    vgg_stages: VggStagesOpt = None,
    time_budget: Annotated[Optional[float], typer.Option(help="seconds of training; schedules end within it")] =
    None,
    dropout: Annotated[Optional[float], typer.Option()] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="adamw or sgd")] = None,
    weight_decay: Annotated[Optional[float], typer.Option()] = None,
    label_smoothing: Annotated[Optional[float], typer.Option()] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    image_size: Annotated[Optional[int], typer.Option(help="input size (default: the backbone's)")] = None,
    augment: Annotated[Optional[str], typer.Option(help="standard, light or none")] = None,
    hflip: Annotated[Optional[bool], typer.Option("--hflip/--no-hflip")] = None,
    val_fraction: Annotated[Optional[float], typer.Option()] = None,
    patience: Annotated[Optional[int], typer.Option(help="early-stopping patience in epochs, 0 = off")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N or mps")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto, fp32, bf16 or fp16")] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader workers (-1: auto)")] = None,
    limit_batches: Annotated[Optional[int], typer.Option(help="smoke runs: batches per epoch")] = None,
    precise_bn: Annotated[Optional[bool], typer.Option(
        "--precise-bn/--no-precise-bn", help="recompute BN statistics over the training set at the end")] = None,
    resume: Annotated[bool, typer.Option(help="continue the interrupted run in --output")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --output")] = False,
):
    """Train a classifier on DATA and write a run folder.

    Example: graft fit ./pets --backbone resnet50.a1_in1k --strategy finetune --epochs 10 -o runs/pets
    """
    from graft.config import load_config
    from graft.trainer import fit as fit_run

    overrides = {
        "data.path": data, "output": output, "model.backbone": backbone, "model.weights": weights,
        "model.pretrained": pretrained, "train.strategy": strategy, "train.epochs": epochs,
        "train.head_epochs": head_epochs, "train.lr": lr, "train.finetune_lr_ratio": finetune_lr_ratio,
        "train.stem_lr_ratio": stem_lr_ratio,
        "train.unfreeze": unfreeze, "model.cut_at": cut_at, "model.pool": pool, "model.head": head,
        "model.dropout": dropout, "train.optimizer": optimizer, "train.weight_decay": weight_decay,
        "train.label_smoothing": label_smoothing, "data.batch_size": batch_size, "data.image_size": image_size,
        "data.augment": augment, "data.hflip": hflip, "data.val_fraction": val_fraction, "train.patience": patience,
        "train.seed": seed, "train.device": device, "train.precision": precision, "data.workers": workers,
        "train.limit_batches": limit_batches, "train.head_fit": head_fit, "train.bn_stats": bn_stats,
        "data.augment_views": augment_views, "data.cache_dir": cache, "train.balance": balance,
        "train.precise_bn": precise_bn, "model.activation": activation, "model.norm": norm, "model.init": init,
        "model.vgg_stages": vgg_stages, "train.time_budget": time_budget,
    }
    settings = load_config(config, overrides)
    if not resume and not settings.data.path:
        raise GraftError("no data given: graft fit DATA (a class-per-folder tree or a path,label CSV)")
    result = fit_run(settings, resume=resume, overwrite=overwrite)
    metrics = result.metrics.get("val", {})
    print_table(f"run {result.run_dir}", ["split", "accuracy", "macro F1", "images"],
                [[split, result.metrics[split]["accuracy"], result.metrics[split]["macro_f1"],
                  result.metrics[split]["images"]] for split in ("val", "test") if split in result.metrics])
    if not metrics:
        out.print("no validation images: metrics.json has training history only")


def _split_runs(paths: list[str]) -> tuple[list[str], list[str]]:
    """Leading arguments that are run folders (they hold graft.json) vs the rest."""
    runs = []
    for path in paths:
        if (Path(path) / "graft.json").is_file():
            runs.append(path)
        else:
            break
    if not runs:
        raise GraftError(f"{paths[0] if paths else 'RUN'}: not a run folder (no graft.json); give the folder fit wrote")
    return runs, paths[len(runs):]


@app.command()
@friendly_errors
def predict(
    paths: Annotated[list[str], typer.Argument(help="RUN [RUN...] then images, folders or glob patterns")],
    top_k: Annotated[int, typer.Option("--top-k", "-k")] = 3,
    output_format: Annotated[str, typer.Option("--format", help="table, csv, json or jsonl (JSON lines)")] = "table",
    output: Annotated[Optional[Path], typer.Option("--output", help="write here instead of stdout")] = None,
    batch_size: Annotated[int, typer.Option()] = 32,
    device: DeviceOpt = "auto",
    tta: TTAOpt = None,
):
    """Classify images with a trained run (several runs: an ensemble). csv, json and jsonl rows are printed as each
    batch is done.

    Example: graft predict runs/pets img.jpg more_images/ --top-k 3 --format csv
    """
    from graft.evaluate import iter_predictions

    _check_options(("--top-k", top_k, *TOP_K), ("--batch-size", batch_size, *BATCH_SIZES))
    runs, inputs = _split_runs(paths)
    if not inputs:
        raise GraftError("no images given: graft predict RUN IMAGE_OR_FOLDER [...]")
    if output_format not in ("table", "csv", "json", "jsonl"):
        raise GraftError(f"format '{output_format}' not understood: choose table, csv, json or jsonl")
    rows = iter_predictions(runs, inputs, top_k=top_k, batch_size=batch_size, device=device, tta=tta)
    if output_format == "table" and output is None:  # a table needs every row for its column widths
        print_table("predictions", ["file", "labels", "probabilities", "error"],
                    [[r.path, ", ".join(r.labels), ", ".join(f"{p:.3f}" for p in r.probabilities), r.error]
                     for r in rows])
        return
    counted = _Counted(rows)
    chunks = _prediction_text(counted, top_k, "csv" if output_format == "table" else output_format)
    if output:
        from graft.model import atomic_write

        atomic_write(output, lambda temp: _write_chunks(chunks, temp))
        err.print(f"wrote {counted.count} predictions to {output}")
    else:
        for chunk in chunks:
            _print_raw(chunk)


class _Counted:
    """Passes rows through, counting them."""

    def __init__(self, rows):
        self.rows, self.count = rows, 0

    def __iter__(self):
        for row in self.rows:
            self.count += 1
            yield row


def _prediction_text(rows, top_k: int, kind: str):
    """The text of ``rows`` in pieces, one per row (plus header or brackets), made as each row arrives."""
    from graft.text import safe_row

    if kind == "jsonl":
        yield from (json.dumps(row.__dict__) + "\n" for row in rows)
        return
    if kind == "json":  # a JSON array, still streamed: one row per line
        opening = "[\n"
        for row in rows:
            yield f"{opening}  {json.dumps(row.__dict__)}"
            opening = ",\n"
        yield "[]\n" if opening == "[\n" else "\n]\n"
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path"] + [f"{name}{i + 1}" for i in range(top_k) for name in ("label", "prob")] + ["error"])
    yield buffer.getvalue()
    for row in rows:
        buffer.seek(0)
        buffer.truncate()
        pairs = [v for label, prob in zip(row.labels, row.probabilities) for v in (label, f"{prob:.6f}")]
        writer.writerow(safe_row([row.path] + pairs + [""] * (2 * top_k - len(pairs)) + [row.error]))
        yield buffer.getvalue()


def _write_chunks(chunks, path: str) -> None:
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as handle:  # non-UTF-8 names: bytes
        for chunk in chunks:
            handle.write(chunk)


def _print_raw(text: str) -> None:
    """Writes ``text`` to stdout now; a non-UTF-8 file name goes out as the bytes it has on disk."""
    stream = getattr(sys.stdout, "buffer", None)
    if stream is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    sys.stdout.flush()  # what was printed as text before comes first
    stream.write(text.encode("utf-8", "surrogateescape"))
    stream.flush()


@app.command()
@friendly_errors
def evaluate(
    paths: Annotated[list[str], typer.Argument(help="RUN [RUN...] then the labelled DATA folder or CSV")],
    split: Annotated[Optional[str], typer.Option(help="train, val or test (default: test, else val, else all)")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k")] = 5,
    output: Annotated[Optional[Path], typer.Option("--output", help="folder for the results")] = None,
    device: DeviceOpt = "auto",
    tta: TTAOpt = None,
    report: Annotated[bool, typer.Option("--report/--no-report", help="write report.html and PNG plots")] = True,
):
    """Accuracy, top-k, per-class precision/recall/F1, calibration and the confusion matrix on labelled data; writes
    metrics.json, predictions.csv and a self-contained report.html (several runs: an ensemble).

    Example: graft evaluate runs/pets ./pets_test --tta flip
    """
    from graft.evaluate import evaluate as evaluate_runs

    _check_options(("--top-k", top_k, *TOP_K))
    runs, rest = _split_runs(paths)
    if len(rest) != 1:
        raise GraftError("give exactly one DATA after the run folder(s): graft evaluate RUN DATA")
    metrics = evaluate_runs(runs, rest[0], split=split, top_k=top_k, device=device, output=output, tta=tta,
                            report=report)
    top_key = next(k for k in metrics if k.startswith("top") and k.endswith("_accuracy"))
    for name, numbers in [("", metrics)] + ([("with TTA ", metrics["tta"])] if "tta" in metrics else []):
        out.print(f"{name}accuracy {numbers['accuracy']:.4f}   {top_key.replace('_', ' ')} {numbers[top_key]:.4f}   "
                  f"macro F1 {numbers['macro_f1']:.4f}   ECE {numbers['ece']:.4f}   ({metrics['images']} images)")
    print_table("per class", ["class", "precision", "recall", "F1", "support"],
                [[c["class"], c["precision"], c["recall"], c["f1"], c["support"]] for c in metrics["per_class"]])
    classes = metrics["classes"]
    print_table("confusion matrix (rows: true, columns: predicted)", ["true \\ pred"] + classes,
                [[name] + row for name, row in zip(classes, metrics["confusion_matrix"])])
    out.print(f"wrote {metrics['output']}" + (f" and {metrics['report']}" if "report" in metrics else ""))


PretrainedOpt = Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="random weights: a baseline")]
ImageSizeOpt = Annotated[Optional[int], typer.Option(help="input size (default: the backbone's)")]
CacheOpt = Annotated[Optional[str], typer.Option(help="feature cache folder (default: $GRAFT_CACHE or ~/.cache/graft)")]
WorkersOpt = Annotated[int, typer.Option(help="DataLoader workers (-1: auto)")]


@app.command()
@friendly_errors
def features(
    data: Annotated[str, typer.Argument(help="class folders or a CSV")],
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="timm name[.tag] or tv:NAME")],
    cut_at: Annotated[Optional[str], typer.Option(help="comma-separated nodes, e.g. layer2,layer3,layer4")] = None,
    pool: Annotated[str, typer.Option(help="avg or avgmax")] = "avg",
    augment: Annotated[int, typer.Option(help="also cache K augmented views of each training image")] = 0,
    image_size: ImageSizeOpt = None,
    pretrained: PretrainedOpt = True,
    cache: CacheOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="also write NODE.npz files here")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="default: 16 on the CPU, 64 on a GPU")] = None,
    workers: WorkersOpt = -1,
    device: DeviceOpt = "auto",
):
    """Compute frozen-trunk features once (several nodes in one pass) and cache them; a rerun reads the cache.

    Example: graft features ./pets --backbone resnet50.a1_in1k --cut-at layer2,layer3,layer4 -o feats/
    """
    from graft.compare import stage_features
    from graft.data import discover, scan
    from graft.features import cache_folder, save_feature_set
    from graft.outputs import output_folder
    from graft.surgery import DEFAULT_NODE

    _check_options(("--augment", augment, 0, 64), ("--image-size", image_size, *IMAGE_SIZES),
                   ("--batch-size", batch_size, *BATCH_SIZES), ("--workers", workers, *WORKERS))
    if output:  # before the work: an unwritable or clashing folder wastes nothing
        output_folder(output, "-o", ((data, "data"), (cache_folder(cache), "feature cache")))
    splits = discover(data)
    report = scan(splits)
    for warning in report.warnings:
        err.print(f"warning: {warning}", highlight=False)
    nodes = cut_at.split(",") if cut_at else [DEFAULT_NODE]
    _, _, sets = stage_features(splits, backbone, nodes, image_size, pool, pretrained, cache, device, batch_size,
                                workers, augment_views=augment)
    stats = next(iter(sets.values())).stats
    speed = f"{stats['images_per_s']:.1f}" if stats.get("images_per_s") else "-"
    print_table(f"features of {backbone} ({stats['extracted']} images extracted at {speed} img/s, "
                f"{stats['cached']} from the cache)", ["node", "width", "train", "val", "test", "augmented views"],
                [[node, s.dim, len(s.labels["train"]), len(s.labels["val"]), len(s.labels["test"]), len(s.augmented)]
                 for node, s in sets.items()])
    for node, feature_set in sets.items() if output else ():
        out.print(f"wrote {save_feature_set(feature_set, output / f'{node}.npz')}")


@app.command()
@friendly_errors
def probe(
    data: Annotated[str, typer.Argument(help="class folders or a CSV")],
    backbones: Annotated[str, typer.Option(help="comma-separated backbone names")],
    stages: Annotated[str, typer.Option(help="default (pooled features only) or all (every stage too)")] = "default",
    pool: Annotated[str, typer.Option(help="avg or avgmax")] = "avg",
    image_size: ImageSizeOpt = None,
    pretrained: PretrainedOpt = True,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="folder for leaderboard.csv/.png")] = None,
    cache: CacheOpt = None,
    workers: WorkersOpt = -1,
    device: DeviceOpt = "auto",
):
    """Leaderboard of linear probes: which backbone, which stage (cached features, L-BFGS heads).

    Example: graft probe ./pets --backbones resnet50,convnext_tiny,vit_small_patch16_224 --stages all -o cmp/
    """
    from graft.compare import probe_backbones

    _check_options(("--image-size", image_size, *IMAGE_SIZES), ("--workers", workers, *WORKERS))
    if stages not in ("default", "all"):
        raise GraftError(f"stages '{stages}' not understood: use default or all")
    rows = probe_backbones(data, backbones.split(","), stages, image_size, pool, pretrained, cache, device,
                           workers=workers, output=output)
    print_table("linear probe leaderboard", ["backbone", "node", "width", "val acc", "k-NN acc", "extract img/s",
                                             "params (M)", "ms/image"],
                [[r.backbone, r.node, r.width, r.val_accuracy, r.knn_accuracy,
                  f"{r.extract_images_per_s:.1f}" if r.extract_images_per_s else "cached", f"{r.params_m:.2f}",
                  f"{r.inference_ms:.2f}"] for r in rows])
    if output:
        out.print(f"wrote {output / 'leaderboard.csv'} and {output / 'leaderboard.png'}")


@app.command()
@friendly_errors
def advise(
    data: Annotated[str, typer.Argument(help="class folders or a CSV")],
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="timm name[.tag] or tv:NAME")],
    image_size: ImageSizeOpt = None,
    pretrained: PretrainedOpt = True,
    cache: CacheOpt = None,
    workers: WorkersOpt = -1,
    device: DeviceOpt = "auto",
):
    """Recommend a strategy (probe top layer, probe an earlier stage, fine-tune the last stages or everything).

    Example: graft advise ./pets --backbone resnet50.a1_in1k
    """
    from graft.compare import advise as advise_on

    _check_options(("--image-size", image_size, *IMAGE_SIZES), ("--workers", workers, *WORKERS))
    advice = advise_on(data, backbone, image_size, pretrained, cache, device, workers)
    print_table("how well each stage's frozen features separate the classes", ["node", "width", "probe acc",
                                                                               "k-NN acc"],
                [[s["node"], s["width"], s["probe_accuracy"], s["knn_accuracy"]] for s in advice.stages])
    out.print(f"recommendation: [bold]{advice.recommendation}[/bold]\n{advice.reason}\nrun: {advice.command}")


@app.command()
@friendly_errors
def demo(
    data: Annotated[Optional[str], typer.Option(help="your class folders instead of scikit-learn's digits")] = None,
    shots: Annotated[int, typer.Option(help="training images per class (digits)")] = 10,
    epochs: Annotated[int, typer.Option()] = 12,
    image_size: Annotated[int, typer.Option()] = 64,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="keep the run folders here")] = None,
):
    """Scratch vs probe vs finetune with a real ImageNet backbone (EfficientNet-Lite0), offline.

    Example: graft demo            (digits, about 20 seconds on two CPU cores)
             graft demo --data ./pets
    """
    from graft.demo import DEMO_BACKBONE, run_demo

    _check_options(("--shots", shots, 1, 10_000), ("--epochs", epochs, 1, MAX_EPOCHS),
                   ("--image-size", image_size, *IMAGE_SIZES))
    what = data or f"scikit-learn digits, {shots} training images per class"
    err.print(f"graft demo: {DEMO_BACKBONE} (ImageNet) on {what}; scratch is the same network, randomly initialised")
    rows = run_demo(data=data, shots=shots, epochs=epochs, image_size=image_size, output=output)
    print_table("transfer learning vs training from scratch", ["strategy", "held-out accuracy", "split",
                                                                "wall time (s)", "images/s"],
                [[r.strategy, r.accuracy, r.split, f"{r.seconds:.1f}", f"{r.images_per_s:.0f}"] for r in rows])
    best = max(rows, key=lambda r: r.accuracy)
    scratch = next((r for r in rows if r.strategy == "scratch"), None)
    if scratch and best.strategy != "scratch":
        out.print(f"{best.strategy} beats scratch by {100 * (best.accuracy - scratch.accuracy):.1f} points")


@app.command()
@friendly_errors
def export(
    run: Annotated[str, typer.Argument(help="the run folder to export")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="default: RUN/export")] = None,
    formats: Annotated[str, typer.Option("--format", help="comma-separated: onnx, torch, safetensors")] =
    "onnx,torch,safetensors",
    fold_bn: Annotated[bool, typer.Option("--fold-bn/--no-fold-bn", help="fold batch norms into convs")] = True,
    data: Annotated[Optional[str], typer.Option(help="images for the parity checks (default: the run's data)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty output folder")] = False,
):
    """Export for deployment (ONNX, torch.export, safetensors + JSON), each verified against the trained model.

    Example: graft export runs/pets --fold-bn --format onnx
    """
    from graft.export import export as export_run

    result = export_run(run, output or Path(run) / "export", tuple(f.strip() for f in formats.split(",") if f.strip()),
                        fold_bn, data, overwrite, log=lambda message: err.print(message, highlight=False))
    rows = [[form, f"{difference:.2e}"] for form, difference in result.parity.items()]
    print_table(f"exported to {result.out_dir} (parity on {result.inputs})", ["form", "max |Δlogit|"], rows)
    print_table("batch-1 latency (median, CPU)", ["form", "ms"],
                [[form, f"{ms:.3f}"] for form, ms in result.latency_ms.items()])
    out.print("files: " + ", ".join(result.files))


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
    from graft.trainer import precise_bn

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
    max_pixels: Annotated[int, typer.Option(help="largest image accepted (decompression bombs)")] = 40_000_000,
    max_batch: Annotated[int, typer.Option(help="images per forward pass")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="how long a request waits to share a batch")] = 10.0,
    top_k: Annotated[int, typer.Option("--top-k", "-k")] = 5,
    tta: TTAOpt = None,
):
    """Serve predictions over HTTP: POST /predict (multipart images), GET /health, GET /metadata.

    Example: graft serve runs/pets --port 8000   then   curl -F file=@cat.jpg localhost:8000/predict
    """
    from graft.serve import ServeConfig, serve as serve_runs

    _check_options(("--port", port, 1, 65535), ("--max-upload-mb", max_upload_mb, 0, 10_240, True),
                   ("--max-pixels", max_pixels, 1, 1_000_000_000), ("--max-batch", max_batch, *BATCH_SIZES),
                   ("--max-wait-ms", max_wait_ms, 0, 60_000), ("--top-k", top_k, *TOP_K))
    config = ServeConfig(max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=max_pixels,
                         max_batch=max_batch, max_wait_ms=max_wait_ms, top_k=top_k, tta=tta)
    serve_runs(runs, host, port, device, config)


def _lab_overrides(activation, norm, init, vgg_stages) -> dict:
    return {"model.activation": activation, "model.norm": norm, "model.init": init, "model.vgg_stages": vgg_stages}


@app.command()
@friendly_errors
def diagnose(
    target: Annotated[str, typer.Argument(help="a run folder, or a backbone name (randomly initialised)")],
    data: Annotated[str, typer.Argument(help="class folders or a CSV: one batch of training images is used")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="diagnosis.json + activations.png")] =
    None,
    batch_size: Annotated[int, typer.Option()] = 64,
    lr: Annotated[Optional[float], typer.Option(help="for the update/weight ratios (default: the run's, or 1e-3)")]
    = None,
    image_size: ImageSizeOpt = None,
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained")] = False,
    activation: ActivationOpt = None, norm: NormOpt = None, init: InitOpt = None, vgg_stages: VggStagesOpt = None,
):
    """Why does it train badly? Activation statistics (dead ReLUs, saturation, collapse), gradient flow
    (update/weight ratios) and receptive fields, on one batch.

    Example: graft diagnose vgg-like ./pets --activation tanh --init normal:0.05 -o diag/
    """
    from graft.diagnose import diagnose as run_diagnosis

    _check_options(("--batch-size", batch_size, *BATCH_SIZES), ("--lr", lr, 0, MAX_LR, True),
                   ("--image-size", image_size, *IMAGE_SIZES))
    options = {k: v for k, v in _lab_overrides(activation, norm, init, vgg_stages).items() if v is not None}
    result = run_diagnosis(target, data, str(output) if output else None, batch_size, lr, image_size, pretrained,
                           options)
    print_table("activations (one batch, forward order)", ["layer", "type", "mean", "std", "dead", "saturated",
                                                           "flag"],
                [[r.name, r.kind, r.mean, r.std, "" if r.dead is None else f"{r.dead:.0%}",
                  "" if r.saturated is None else f"{r.saturated:.0%}", "; ".join(r.flags)] for r in result.activations])
    print_table("gradient flow (one step)", ["weights", "grad norm", "update/weight", "flag"],
                [[g.name, f"{g.grad_norm:.2e}", f"{g.update_ratio:.1e}", "; ".join(g.flags)] for g in result.gradients])
    print_table("stage nodes", ["node", "output", "receptive field"],
                [[n.name, "x".join(map(str, n.shape)), n.receptive_field] for n in result.nodes])
    out.print(f"{len(result.flags)} flag(s)" + (f"; wrote {output}/diagnosis.json and activations.png" if output
                                                else ""))


@app.command("lr-find")
@friendly_errors
def lr_find(
    data: Annotated[str, typer.Argument(help="class folders or a CSV")],
    backbone: BackboneOpt = None,
    strategy: Annotated[str, typer.Option(help="finetune or scratch: the stage whose rate is found")] = "finetune",
    output: Annotated[Path, typer.Option("--output", "-o", help="lr_find.png and lr_find.csv go here")] =
    Path("lr-find"),
    steps: Annotated[int, typer.Option(help="rates tried, one training step each")] = 200,
    start_lr: Annotated[float, typer.Option()] = 1e-7,
    end_lr: Annotated[float, typer.Option()] = 10.0,
    image_size: ImageSizeOpt = None,
    batch_size: Annotated[int, typer.Option()] = 32,
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained")] = True,
    device: DeviceOpt = "auto",
    activation: ActivationOpt = None, norm: NormOpt = None, init: InitOpt = None, vgg_stages: VggStagesOpt = None,
):
    """Sweep the learning rate exponentially for a few hundred steps and suggest one (`graft fit --lr auto` does
    this first).

    Example: graft lr-find ./pets -b resnet50.a1_in1k --strategy finetune
    """
    from graft.config import load_config
    from graft.data import discover, scan
    from graft.diagnose import plot_lr_finding
    from graft.evaluate import autocast_dtype, resolve_device
    from graft.outputs import output_folder
    from graft.trainer import Runtime, find_lr

    _check_options(("--steps", steps, 2, 100_000), ("--start-lr", start_lr, 0, MAX_LR, True),
                   ("--end-lr", end_lr, start_lr if start_lr > 0 else 0, MAX_LR, True))
    output_folder(output, "-o", ((data, "data"),))  # before the sweep: an unwritable folder wastes nothing
    values = {"data.path": data, "model.backbone": backbone, "train.strategy": strategy, "data.image_size": image_size,
              "data.batch_size": batch_size, "model.pretrained": pretrained, "train.device": device,
              **_lab_overrides(activation, norm, init, vgg_stages)}
    config = load_config(None, values)
    target = resolve_device(config.train.device)
    runtime = Runtime(target, autocast_dtype(target, config.train.precision), config.train.channels_last)
    splits = discover(data, config.data.val_fraction, config.train.seed)
    scan(splits, config.data.max_image_pixels)
    finding = find_lr(config, splits, runtime, steps, start_lr, end_lr)
    plot_lr_finding(finding, output / "lr_find.png")
    out.print(f"suggested --lr {finding.suggestion:.2e} ({finding.reason}); curve in {output}/lr_find.png")


@app.command()
@friendly_errors
def stats(
    data: Annotated[str, typer.Argument(help="class folders or a CSV")],
    size: Annotated[int, typer.Option(help="images are resized to this square first")] = 64,
    max_images: Annotated[int, typer.Option(help="a random sample of at most this many training images")] = 5000,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="stats.json + mean_image.png")] = None,
):
    """Per-channel mean and std and the mean image of a dataset (what scratch training normalises with).

    Example: graft stats ./pets -o pets-stats/
    """
    from graft.data import discover
    from graft.diagnose import dataset_statistics
    from graft.outputs import output_folder

    _check_options(("--size", size, *IMAGE_SIZES), ("--max-images", max_images, 1, 1_000_000_000))
    if output:  # before the work: an unwritable or clashing folder wastes nothing
        output_folder(output, "-o", ((data, "data"),))
    splits = discover(data)
    result = dataset_statistics([path for path, _ in splits.train], size, max_images)
    print_table(f"{result.images} training images at {size}x{size}", ["channel", "mean", "std"],
                [[c, m, s] for c, m, s in zip("RGB", result.mean, result.std)])
    if output:
        from PIL import Image

        from graft.model import atomic_write, write_json

        write_json(output / "stats.json", result.to_dict())
        mean_image = Image.fromarray((result.mean_image * 255).round().astype("uint8"))
        atomic_write(output / "mean_image.png", lambda temp: mean_image.save(temp, format="PNG"))
        out.print(f"wrote {output}/stats.json and mean_image.png")


@app.command()
@friendly_errors
def compare(
    data: Annotated[str, typer.Argument(help="class folders or a CSV")],
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="the pretrained backbone (probe, finetune)")] =
    "tf_efficientnet_lite0",
    scratch_backbone: Annotated[Optional[str], typer.Option(help="train this from scratch instead (e.g. "
                                                                 "small-cnn-cifar); default: the backbone")] = None,
    strategies: Annotated[str, typer.Option(help="comma-separated")] = "scratch,probe,finetune",
    epochs: Annotated[int, typer.Option(help="scratch and fine-tuning epochs (an upper bound with --budget)")] = 12,
    budget: Annotated[float, typer.Option(help="seconds of training per strategy: an equal wall-clock budget")] = 0,
    image_size: ImageSizeOpt = None,
    batch_size: Annotated[int, typer.Option()] = 32,
    output: Annotated[Path, typer.Option("--output", "-o", help="run folders, comparison.csv and .png")] =
    Path("compare"),
    activation: ActivationOpt = None, norm: NormOpt = None, init: InitOpt = None, vgg_stages: VggStagesOpt = None,
):
    """Scratch vs probe vs finetune on the same split and budget: the lecture's table (accuracy, wall time, img/s).

    Example: graft compare ./flowers --scratch-backbone small-cnn-cifar --budget 300
    """
    from graft.baselines import compare_strategies

    _check_options(("--epochs", epochs, 1, MAX_EPOCHS), ("--budget", budget, 0, 1e9, False, "0: no limit"),
                   ("--image-size", image_size, *IMAGE_SIZES), ("--batch-size", batch_size, *BATCH_SIZES))
    overrides = {"data.image_size": image_size, "data.batch_size": batch_size}
    lab_options = {k: v for k, v in _lab_overrides(activation, norm, init, vgg_stages).items() if v is not None}
    rows = compare_strategies(data, backbone, output, tuple(s.strip() for s in strategies.split(",")),
                              scratch_backbone, epochs, budget, overrides, lab_options, verbose=True)
    print_table("scratch vs transfer", ["strategy", "backbone", "accuracy", "split", "wall time (s)", "images/s",
                                        "epochs"],
                [[r.strategy, r.backbone, r.accuracy, r.split, f"{r.seconds:.1f}", f"{r.images_per_s:.0f}", r.epochs]
                 for r in rows])
    out.print(f"wrote {output}/comparison.csv and comparison.png")


IMAGE_SIZES, BATCH_SIZES, WORKERS, TOP_K = (MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), (1, MAX_BATCH_SIZE), (-1, 64), (1, 1000)


def _check_options(*checks: tuple) -> None:
    """Range checks of options that are not config fields (those are checked in graft.config): each check is
    (flag, value, low, high[, low_open[, note]]); a value of None (option not given) passes."""
    for flag, value, low, high, *rest in checks:
        low_open, note = (list(rest) + [False, ""][len(rest):])[:2]
        check_option(flag, value, low, high, low_open=low_open, note=note)
DEBUG = {"on": False}  # set by the global --debug flag: an unexpected exception prints its traceback


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", help="print the traceback of an internal error")] = False,
) -> None:
    DEBUG["on"] = debug


def main() -> None:
    """The `graft` entry point. Last resort for a bug (an exception no check turned into a GraftError): one line
    naming a log file with the traceback, exit status 1; with --debug, the traceback itself."""
    try:
        app()
    except Exception as error:  # KeyboardInterrupt and SystemExit (typer's exits) pass through
        if DEBUG["on"]:
            raise
        from rich.markup import escape

        text = (str(error).splitlines() or [""])[0][:200]
        err.print(f"[red]internal error:[/red] {escape(f'{type(error).__name__}: {text}; details in ')}"
                  f"{escape(_log_traceback(error))} (--debug prints them)", highlight=False)
        sys.exit(1)


def _log_traceback(error: BaseException) -> str:
    """Writes the traceback to a new file under the user cache folder (else the temp folder); returns its path."""
    import os
    import tempfile
    import traceback

    details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graft" / "logs"
    for folder in (base, Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle, path = tempfile.mkstemp(prefix="graft-internal-error-", suffix=".log", dir=folder)
            with os.fdopen(handle, "w", encoding="utf-8", errors="backslashreplace") as file:
                file.write(f"graft {' '.join(sys.argv[1:])}\n\n{details}")
            return path
        except OSError:
            continue
    return "nowhere (no writable cache or temp folder)"


if __name__ == "__main__":
    main()
