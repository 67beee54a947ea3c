"""The README.md of an exported backbone: a Hugging Face model card (YAML front matter, then
Markdown) that says what the weights are, how to load them, how they were trained and what
they measured, and the timm config.json that lets `timm.create_model` build them."""

from __future__ import annotations

import json

from bt_jax.data.normalize import IMAGENET_MEAN, IMAGENET_STD

# Pretraining facts a reader of the card needs, by config path.
_PROTOCOL = (
    ("data.dataset", "dataset"),
    ("model.arch", "backbone"),
    ("model.width", "width multiplier"),
    ("model.cifar_stem", "CIFAR stem (3x3, no max-pool)"),
    ("model.projector", "projector"),
    ("loss.lambd", "lambda (off-diagonal weight)"),
    ("train.global_batch", "global batch"),
    ("train.epochs", "scheduled epochs"),
    ("optim.name", "optimizer"),
    ("optim.lr_weights", "base LR, weights (x batch / 256)"),
    ("optim.lr_biases", "base LR, biases and BN (x batch / 256)"),
    ("optim.weight_decay", "weight decay"),
    ("optim.warmup_epochs", "warm-up epochs"),
    ("augment.view1.image_size", "image size"),
    ("seed", "seed"),
)


def _get(config: dict, path: str):
    for key in path.split("."):
        config = config[key]
    return config


def is_timm_architecture(model_cfg: dict) -> bool:
    """torchvision's (and timm's) ResNet exactly: full width, ImageNet stem, its depths."""
    return model_cfg["width"] == 1 and not model_cfg["cifar_stem"] and not model_cfg["stage_sizes"]


def timm_config(model_cfg: dict, image_size: int) -> dict:
    """config.json as timm writes it for a headless ResNet (num_classes 0: no fc)."""
    return {
        "architecture": model_cfg["arch"],
        "num_classes": 0,
        "num_features": 512 if model_cfg["arch"] in ("resnet18", "resnet34") else 2048,
        "global_pool": "avg",
        "pretrained_cfg": {
            "tag": "bt_jax_barlow_twins",
            "input_size": [3, image_size, image_size],
            "fixed_input_size": False,
            "interpolation": "bicubic",
            "crop_pct": 0.875,
            "crop_mode": "center",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "num_classes": 0,
            "first_conv": "conv1",
            "classifier": "fc",
        },
    }


def _table(rows) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render(
    *, config: dict, step: int, files: dict[str, str], metrics: list[dict], results: list[dict]
) -> str:
    """The card's text.

    files: exported file name -> what it holds. metrics: the run's metrics rows (see
    writers.read_metrics). results: the results.json summaries of evaluation jobs.
    """
    model = config["model"]
    arch, dataset = model["arch"], config["data"]["dataset"]
    steps_per_epoch = next((r["step"] / r["epoch"] for r in metrics if r.get("epoch")), None)
    epochs = f", epoch {step / steps_per_epoch:.2f}" if steps_per_epoch else ""
    timm = is_timm_architecture(model)
    front = {
        "license": "apache-2.0",
        "library_name": "timm" if timm else "pytorch",
        "pipeline_tag": "image-feature-extraction",
        "tags": ["barlow-twins", "self-supervised", "bt_jax", arch],
        "datasets": [dataset],
    }
    header = "---\n" + "".join(f"{k}: {json.dumps(v)}\n" for k, v in front.items()) + "---\n"

    out = [
        header,
        f"# Barlow Twins {arch} ({dataset}), bt_jax\n",
        f"A {arch} backbone pretrained with Barlow Twins (Zbontar et al., 2021) in bt_jax "
        f"(JAX/Flax), checkpoint of step {step}{epochs}. The weights are the backbone only "
        "(no classifier head): global-average-pooled features.\n",
        "## Files\n",
        "\n".join(f"- `{name}`: {what}" for name, what in files.items()) + "\n",
        "## Loading\n",
    ]
    if "model.safetensors" in files:
        out.append(
            "Inputs: RGB, scaled to [0, 1], normalised with ImageNet's mean "
            f"{list(IMAGENET_MEAN)} and std {list(IMAGENET_STD)}.\n\n"
            "```python\nimport safetensors.torch, torch, torchvision\n"
            f"net = torchvision.models.{arch}()\nnet.fc = torch.nn.Identity()\n"
            'net.load_state_dict(safetensors.torch.load_file("model.safetensors"))\n```\n'
        )
        if timm:
            out.append(
                "With timm (this folder, or the Hub repository it was uploaded to):\n\n"
                '```python\nimport timm\nnet = timm.create_model("local-dir:PATH", '
                'pretrained=True)  # or "hf-hub:USER/REPO"\n```\n'
            )
        else:
            out.append(
                "This is not torchvision's exact architecture (width, stem or depth differ): "
                "build the matching network before loading the state dict.\n"
            )
    if "model_d2.pkl" in files:
        out.append(
            "detectron2: `MODEL.WEIGHTS=model_d2.pkl`, `INPUT.FORMAT=RGB`, "
            "`MODEL.PIXEL_MEAN=[123.675, 116.28, 103.53]`, `MODEL.PIXEL_STD=[58.395, 57.12, "
            "57.375]`.\n"
        )
    out += [
        "## Pretraining protocol\n",
        _table((name, _get(config, path)) for path, name in _PROTOCOL) + "\n",
    ]
    train = [r for r in metrics if r["tag"] == "train" and r["step"] <= step]
    knn = [r for r in metrics if r["tag"] == "knn" and r["step"] <= step]
    if train or knn or results:
        out.append("## Metrics\n")
        rows = []
        if train:
            last = train[-1]
            rows += [
                (f"training {k} (step {last['step']})", _number(last[k]))
                for k in ("loss", "invariance", "redundancy")
                if k in last
            ]
        if knn:
            last = knn[-1]
            rows += [
                (f"kNN monitor {k} (step {last['step']}, {dataset})", _number(v))
                for k, v in last.items()
                if k.startswith("knn_top")
            ]
        for summary in results:
            where = f"{summary.get('dataset', '?')} {summary.get('eval_split', '')}".strip()
            rows += [
                (f"{summary['protocol']} {k} ({where})", _number(v))
                for k, v in summary["results"].items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            ]
        out.append(_table(rows) + "\n")
    out += [
        "## Full config\n",
        "<details><summary>config.to_dict() of the pretraining run</summary>\n\n```json\n"
        + json.dumps(config, indent=1, sort_keys=True, default=str)
        + "\n```\n</details>\n",
    ]
    return "\n".join(out)
