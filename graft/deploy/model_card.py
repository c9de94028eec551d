"""The README.md model card of a Hugging Face hub repository, built from a run's own records.

It states what the model was trained on (data_report.json), what it predicts (graft.json), how well it did per class
(metrics.json), how to load it, what it is for and where it stops.
"""

from __future__ import annotations

from pathlib import Path

from graft.models.run_folder import trained_as
from graft.utils.files import read_json_object

__all__ = ["hf_model_card"]


def _names(classes: list[str], shown: int = 20) -> str:
    return ", ".join(classes[:shown]) + (", ..." if len(classes) > shown else "")


def _where(data: dict) -> str:
    return f" (`{Path(str(data['path'])).name}`)" if data.get("path") else ""  # the folder's name, not the user's path


def _chosen_on_validation(metrics: dict) -> list[str]:
    return [str(item) for item in metrics.get("selected_on_validation") or [] if isinstance(item, str)]


def _metrics_rows(metrics: dict) -> list[str]:
    lines = []
    for split in ("test", "val"):
        block = metrics.get(split)
        if not isinstance(block, dict):
            continue
        summary = ", ".join(f"{key.replace('_', ' ')} {block[key]:.4f}" for key in ("accuracy", "macro_f1",
                            "top3_accuracy") if isinstance(block.get(key), (int, float)))
        chosen = _chosen_on_validation(metrics) if split == "val" else []
        honesty = (["It also chose " + "; ".join(chosen) + ": these numbers are optimistic.", ""] if chosen else [])
        held = "held out from every choice" if split == "test" or not chosen else "used for model selection"
        lines += [f"### {split} split ({block.get('images', '?')} images, {held})", "", summary, "", *honesty,
                  "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for row in block.get("per_class", []):
            lines.append(f"| {row.get('class')} | {row.get('precision', 0):.4f} | {row.get('recall', 0):.4f} | "
                         f"{row.get('f1', 0):.4f} | {row.get('support', 0)} |")
        lines.append("")
    return lines or ["No held-out metrics were recorded for this run (no validation or test split).", ""]


def _evaluated_on(metrics: dict) -> str:
    if isinstance(metrics.get("test"), dict):
        return "test split, held out from every choice,"
    if _chosen_on_validation(metrics):
        return "validation split, which also chose parts of the model (optimistic),"
    return "held-out validation split"


def _data_lines(report: dict, classes: list[str]) -> list[str]:
    counts = report.get("counts", {}) if isinstance(report.get("counts"), dict) else {}
    lines = [f"Source: {report.get('source', 'an image folder')}.", "", "| class | " + " | ".join(counts) + " |",
             "|---|" + "---|" * len(counts)]
    for name in classes:
        lines.append(f"| {name} | " + " | ".join(str(split.get(name, 0)) for split in counts.values()) + " |")
    warnings = [str(w) for w in report.get("warnings", [])]
    return lines + ([""] + [f"- data warning: {w}" for w in warnings] if warnings else []) + [""]


def _front_matter(card: dict, license_id: str | None) -> list[str]:
    """The hub's YAML block: the base model only when the weights came from a hub repository (then the relation
    says fine-tuned from it), the weights' licence where timm records one, else ``other``."""
    weights = str(card.get("weights", ""))
    base = weights.removeprefix("hub:") if weights.startswith("hub:") else ""
    lines = ["---", "library_name: timm", "pipeline_tag: image-classification", f"license: {license_id or 'other'}",
             "tags:", "- image-classification", "- timm", "- graft"]
    if base:
        lines += [f"base_model: {base}", "base_model_relation: finetune"]
    return [*lines, "---", ""]


def hf_model_card(run_dir: str | Path, card: dict, repo_id: str = "OWNER/NAME",
                  license_id: str | None = None) -> str:
    """The model card's Markdown (with the hub's YAML metadata block) for the run in ``run_dir``.

    Args:
        license_id: the backbone weights' licence (an SPDX-style id from timm's pretrained config), if known.
    """
    run_dir = Path(run_dir)
    metrics, report = read_json_object(run_dir / "metrics.json"), read_json_object(run_dir / "data_report.json")
    classes, prep = list(card["classes"]), card["preprocessing"]
    config = card.get("config", {})
    data = config.get("data", {}) if isinstance(config, dict) else {}
    summary = (f"An image classifier for {len(classes)} classes ({_names(classes)}), trained with graft by transfer "
               f"learning from the `{card['backbone']}` backbone (strategy: {trained_as(card)}; head "
               f"`{card['head']}`, weights from `{card.get('weights', '?')}`).")
    usage = ["```python", "import timm, torch", "from PIL import Image", "",
             f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()',
             "config = timm.data.resolve_data_config(model=model)", "transform = timm.data.create_transform(**config)",
             'probabilities = model(transform(Image.open("photo.jpg").convert("RGB")).unsqueeze(0)).softmax(1)',
             'print(model.pretrained_cfg["label_names"][probabilities.argmax()])', "```", "",
             (f"Input: RGB, {prep['input_size'][0]}x{prep['input_size'][1]} after resizing by crop_pct "
              f"{prep['crop_pct']} ({prep['interpolation']}) and a centre crop; normalised with mean {prep['mean']} "
              f"and std {prep['std']}."), ""]
    intended = (f"Classifying images like those in the training data{_where(data)} into exactly these classes. Every "
                "image gets one of them, so an image of anything else is still assigned a class: check the "
                "probability, or add an 'other' class.")
    limitations = [
        (f"- The metrics above come from the {_evaluated_on(metrics)} of the same collection; images from other "
         "cameras, places or times may score lower."),
        "- Classes with few training images (see the table above) are the least reliable.",
        "- Biases in how the images were collected and labelled carry over into the predictions.",
        "- Not evaluated for safety-critical use.",
        *([] if license_id else ["- The licence of the backbone's weights was not recorded (`license: other`): "
                                 "check it before publishing."]), ""]
    title = f"Image classifier for {len(classes)} classes: {_names(classes, 5)}"
    lines = [*_front_matter(card, license_id), f"# {title}", "", summary, "", "## How to use", "", *usage,
             "## Training data", "", *_data_lines(report, classes), "## Metrics", "", *_metrics_rows(metrics),
             "## Intended use", "", intended, "", "## Limitations", "", *limitations]
    return "\n".join(lines)
