"""`graft layers`, `graft features`, `graft probe` and `graft advise`: frozen features and what they say."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from graft.cli.options import config_option
from graft.cli.shared import (
    BATCH_SIZES,
    IMAGE_SIZES,
    WORKERS,
    CacheOpt,
    DeviceOpt,
    ImageSizeOpt,
    PoolOpt,
    PretrainedOpt,
    WorkersOpt,
    app,
    check_options,
    err,
    friendly_errors,
    out,
    print_table,
)
from graft.config import COMPILE_MODES, ENGINES, ModelConfig
from graft.errors import GraftError

__all__ = ["advise", "features", "layers", "probe"]

ExtractEngineOpt = Annotated[str, config_option("train.extract_engine")]


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise GraftError(f"--extract-engine '{engine}' not understood: choose one of {', '.join(ENGINES)}")


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
    from graft.models.backbones.registry import create_backbone
    from graft.models.inspection import list_nodes
    from graft.models.surgery import DEFAULT_NODE, cut

    check_options(("--size", size, *IMAGE_SIZES))
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
def features(
    data: Annotated[str, typer.Argument(help="class folders or a CSV")],
    backbone: Annotated[str, config_option("model.backbone", with_default=True)] = ModelConfig.backbone,
    cut_at: Annotated[Optional[str], typer.Option(help="comma-separated nodes, e.g. layer2,layer3,layer4")] = None,
    pool: PoolOpt = "avg",
    augment: Annotated[int, typer.Option(help="also cache K augmented views of each training image")] = 0,
    image_size: ImageSizeOpt = None,
    pretrained: PretrainedOpt = True,
    cache: CacheOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="also write NODE.npz files here")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="default: 16 on the CPU, 64 on a GPU")] = None,
    workers: WorkersOpt = -1,
    device: DeviceOpt = "auto",
    compile: Annotated[str, config_option(
        "train.compile", help="torch.compile the extraction forward: off, default, reduce-overhead or max-autotune; "
        "a failure warns and extracts eagerly")] = "off",
    extract_engine: ExtractEngineOpt = "auto",
):
    """Compute frozen-trunk features once (several nodes in one pass) and cache them; a rerun reads the cache.

    Example: graft features ./pets --backbone resnet50.a1_in1k --cut-at layer2,layer3,layer4 -o feats/
    """
    from graft.data.discovery import discover
    from graft.data.scan import scan
    from graft.models.surgery import DEFAULT_NODE
    from graft.probing.cache import cache_folder
    from graft.probing.featureset import save_feature_set
    from graft.probing.warm import cached_features
    from graft.utils import distributed
    from graft.utils.outputs import output_folder

    check_options(("--augment", augment, 0, 64), ("--image-size", image_size, *IMAGE_SIZES),
                  ("--batch-size", batch_size, *BATCH_SIZES), ("--workers", workers, *WORKERS))
    if compile not in COMPILE_MODES:
        raise GraftError(f"--compile '{compile}' not understood: choose one of {', '.join(COMPILE_MODES)}")
    _check_engine(extract_engine)
    distributed.init_from_env(device)  # under torchrun each process extracts a share of the images
    if output:  # before the work: an unwritable or clashing folder wastes nothing; rank 0 writes
        clashes = ((data, "data"), (cache_folder(cache), "feature cache"))
        distributed.main_decides(lambda: output_folder(output, "-o", clashes))
    splits = discover(data)
    report = scan(splits, log=err.print if distributed.is_main() else None)
    for warning in report.warnings if distributed.is_main() else ():
        err.print(f"warning: {warning}")
    nodes = cut_at.split(",") if cut_at else [DEFAULT_NODE]
    # a warm rerun reads the cache without timm or the network (graft.probing.warm)
    sets = cached_features(splits, backbone, nodes, image_size, pool, pretrained, cache, device, batch_size, workers,
                           err.print if distributed.is_main() else None, augment_views=augment, compile_mode=compile,
                           engine=extract_engine)
    if not distributed.is_main():
        return
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
    pool: PoolOpt = "avg",
    image_size: ImageSizeOpt = None,
    pretrained: PretrainedOpt = True,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="folder for leaderboard.csv/.png")] = None,
    cache: CacheOpt = None,
    workers: WorkersOpt = -1,
    device: DeviceOpt = "auto",
    extract_engine: ExtractEngineOpt = "auto",
):
    """Leaderboard of linear probes: which backbone, which stage (cached features, L-BFGS heads).

    Example: graft probe ./pets --backbones resnet50,convnext_tiny,vit_small_patch16_224 --stages all -o cmp/
    """
    from graft.probing.leaderboard import probe_backbones
    from graft.utils import distributed

    check_options(("--image-size", image_size, *IMAGE_SIZES), ("--workers", workers, *WORKERS))
    if stages not in ("default", "all"):
        raise GraftError(f"stages '{stages}' not understood: use default or all")
    _check_engine(extract_engine)
    distributed.init_from_env(device)  # under torchrun: extraction shared, the probes dealt out over the ranks
    rows = probe_backbones(data, backbones.split(","), stages, image_size, pool, pretrained, cache, device,
                           workers=workers, output=output, log=err.print if distributed.is_main() else None,
                           engine=extract_engine)
    if not distributed.is_main():
        return
    print_table("linear probe leaderboard", ["backbone", "node", "width", "val acc", "k-NN acc", "extract img/s",
                                             "params (M)", "ms/image"],
                [[r.backbone, r.node, r.width, r.val_accuracy, r.knn_accuracy,
                  f"{r.extract_images_per_s:.1f}" if r.extract_images_per_s else "cached", f"{r.params_m:.2f}",
                  f"{r.inference_ms:.2f}"] for r in rows])
    if output:
        from graft.utils.plotting import can_plot

        out.print(f"wrote {output / 'leaderboard.csv'}" + (f" and {output / 'leaderboard.png'}" if can_plot() else ""))


@app.command()
@friendly_errors
def advise(
    data: Annotated[str, typer.Argument(help="class folders or a CSV")],
    backbone: Annotated[str, config_option("model.backbone", with_default=True)] = ModelConfig.backbone,
    image_size: ImageSizeOpt = None,
    pretrained: PretrainedOpt = True,
    cache: CacheOpt = None,
    workers: WorkersOpt = -1,
    device: DeviceOpt = "auto",
    extract_engine: ExtractEngineOpt = "auto",
):
    """Recommend a strategy (probe top layer, probe an earlier stage, fine-tune the last stages or everything).

    Example: graft advise ./pets (the default backbone) or graft advise ./pets --backbone resnet50.a1_in1k
    """
    from graft.probing.advice import advise as advise_on

    check_options(("--image-size", image_size, *IMAGE_SIZES), ("--workers", workers, *WORKERS))
    _check_engine(extract_engine)
    advice = advise_on(data, backbone, image_size, pretrained, cache, device, workers, log=err.print,
                       engine=extract_engine)
    print_table("how well each stage's frozen features separate the classes", ["node", "width", "probe acc",
                                                                               "k-NN acc"],
                [[s["node"], s["width"], s["probe_accuracy"], s["knn_accuracy"]] for s in advice.stages])
    out.print(Text.assemble("recommendation: ", (advice.recommendation, "bold")))
    out.print(f"{advice.reason}\nrun: {advice.command}")
