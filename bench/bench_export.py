"""Inference latency and throughput: eager PyTorch vs batch-norm-folded vs ONNX Runtime, from one exported run.

    python bench/bench_export.py [--backbone tf_efficientnet_lite0] [--size 224] [--device cpu]

Builds a run folder from the backbone (pretrained weights where they install offline; the head is random — latency
does not depend on it), exports it with `graft export`, then times each form: per-image latency at batch 1
(p50/p95 over --repeats calls) and throughput at batch 32. Ratios are against eager in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from graft.config import load_config
from graft.deploy.export import call_times, export, onnx_session
from graft.models.grafted import create_model
from graft.models.run_folder import model_card, save_model


def make_run(backbone: str, size: int, folder: Path) -> Path:
    pretrained = backbone == "tf_efficientnet_lite0"  # the one ImageNet backbone that installs offline
    config = load_config(None, {"model.backbone": backbone, "model.pretrained": pretrained, "data.image_size": size,
                                "output": str(folder)})
    model, info = create_model(config, [f"class{i}" for i in range(5)])
    card = model_card(model, config, info)
    card["status"] = "complete"
    save_model(folder, model.eval(), card)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/flowers5"),
                        help="real images for the parity checks")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="graft-bench-export-"))
    run = make_run(args.backbone, args.size, root / "run")
    result = export(run, root / "export", formats=("onnx",), data=args.data)
    device = torch.device(args.device)
    from graft.models.batchnorm import fold_batch_norms
    from graft.models.run_folder import load

    eager = load(run, device).eval()
    example = torch.randn(8, 3, args.size, args.size, device=device)
    folded, _ = fold_batch_norms(eager, example)
    session = onnx_session(root / "export" / "model.onnx")
    channels_last = {"eager": eager.to(memory_format=torch.channels_last),
                     "folded": folded.to(memory_format=torch.channels_last)}

    def torch_forward(model):
        def forward(batch):
            with torch.inference_mode():
                out = model(batch.to(device).contiguous(memory_format=torch.channels_last))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return out
        return forward

    forms = {"eager": torch_forward(channels_last["eager"]), "folded": torch_forward(channels_last["folded"]),
             "onnxruntime": lambda batch: session.run(None, {"images": batch.cpu().numpy()})}
    single = torch.randn(1, 3, args.size, args.size)
    batch = torch.randn(32, 3, args.size, args.size)
    rows = {}
    for name, forward in forms.items():
        latency = sorted(call_times(forward, single, args.repeats, warmup=5))
        throughput = call_times(forward, batch, max(5, args.repeats // 10), warmup=5)
        rows[name] = (statistics.median(latency) * 1000, latency[int(0.95 * (len(latency) - 1))] * 1000,
                      32 / statistics.median(throughput))
    print(f"{args.backbone} at {args.size}px on {args.device} ({torch.get_num_threads()} threads), "
          f"{result.folded.count} batch norms folded, parity {result.parity}")
    print(f"{'form':<12} {'p50 ms':>8} {'p95 ms':>8} {'img/s b32':>10} {'p50 vs eager':>13} {'img/s vs eager':>15}")
    for name, (p50, p95, speed) in rows.items():
        print(f"{name:<12} {p50:>8.2f} {p95:>8.2f} {speed:>10.1f} {rows['eager'][0] / p50:>12.2f}x "
              f"{speed / rows['eager'][2]:>14.2f}x")


if __name__ == "__main__":
    main()
