r"""Backbone weights out to torchvision / timm / detectron2, with a model card (and the Hub).

  python -m bt_jax.export --workdir=W --format=torchvision --out=DIR [--push_to_hub=USER/REPO]
  python -m bt_jax.export --workdir=W --format=detectron2 --out=DIR

DIR receives the weights and README.md, a Hugging Face model card (what the weights are, how
to load them, the pretraining protocol, the run's metrics and, with --results, the numbers of
evaluation jobs). torchvision: model.safetensors, whose keys and shapes are exactly
torchvision's ResNet state_dict without fc.weight / fc.bias (torch not needed to write or
read it; `torchvision.models.resnet50()` with `fc = Identity()` loads it strictly). For a
torchvision-layout ResNet (width 1, ImageNet stem) config.json is timm's, so the folder is
what `timm.create_model("local-dir:DIR", pretrained=True)` (or "hf-hub:USER/REPO" after
--push_to_hub) loads. With --include_projector the projector follows as `projector.<i>.*`,
named as in the official Barlow Twins checkpoint. detectron2: model_d2.pkl, the pickle its
tools/convert-torchvision-to-d2.py would produce (stem.*, res2..res5, shortcut,
convN.norm), for detection transfer (the card gives MODEL.PIXEL_MEAN/STD: the run's input
statistics, in RGB and 0-255 units, with INPUT.FORMAT RGB).

Every file states the input normalisation the backbone was pretrained with (the run's
config.model.normalization: ImageNet's or CIFAR-10's mean/std, bt_jax/data/normalization.py):
the card in words and numbers, timm's config.json in its pretrained_cfg mean/std.

The key mapping lives in bt_jax/models/torchvision_layout.py.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys

import numpy as np

from bt_jax.data import normalization
from bt_jax.models.torchvision_layout import (
    backbone_to_torchvision,
    projector_to_torch,
    torchvision_to_detectron2,
)

WEIGHTS = {"torchvision": "model.safetensors", "detectron2": "model_d2.pkl"}
CARD = "README.md"
TIMM_CONFIG = "config.json"


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


def timm_config(model_cfg: dict, image_size: int, stats: normalization.Normalization) -> dict:
    """config.json as timm writes it for a headless ResNet (num_classes 0: no fc); stats:
    the input mean/std the backbone was trained with."""
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
            "mean": list(stats.mean),
            "std": list(stats.std),
            "num_classes": 0,
            "first_conv": "conv1",
            "classifier": "fc",
        },
    }


def _in_0_255(values) -> list[float]:
    """detectron2 wants pixel statistics in 0-255 units."""
    return [round(255 * v, 4) for v in values]


def _table(rows) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(
    *, config: dict, step: int, files: dict[str, str], metrics: list[dict], results: list[dict]
) -> str:
    """The card's text.

    files: exported file name -> what it holds. metrics: the run's metrics rows (see
    reporting.read_metrics). results: the results.json summaries of evaluation jobs.
    """
    model = config["model"]
    arch, dataset = model["arch"], config["data"]["dataset"]
    preset = normalization.preset_of(config)
    stats = normalization.PRESETS[preset]
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
            f"Inputs: RGB, scaled to [0, 1], normalised with the statistics the backbone was "
            f"pretrained with ({preset}): mean {list(stats.mean)} and std {list(stats.std)}."
            "\n\n"
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
            f"`MODEL.PIXEL_MEAN={_in_0_255(stats.mean)}`, `MODEL.PIXEL_STD={_in_0_255(stats.std)}` "
            f"({preset} statistics, as pretrained).\n"
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


def _results(eval_workdirs) -> list[dict]:
    summaries = []
    for directory in eval_workdirs:
        path = os.path.join(directory, "results.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--results {directory} holds no results.json of an evaluation")
        with open(path) as f:
            summaries.append(json.load(f))
    return summaries


def export(
    workdir,
    fmt,
    out,
    *,
    include_projector=False,
    step=None,
    overwrite=False,
    eval_workdirs=(),
    push_to_hub="",
) -> str:
    """Write the folder `out`: the weights, README.md (model card) and, for a torchvision-
    layout ResNet, timm's config.json; upload it to the Hub repository `push_to_hub`."""
    from safetensors.numpy import save_file

    from bt_jax import reporting
    from bt_jax.checkpoint import restore_model_variables

    if fmt not in WEIGHTS:
        raise ValueError(f"unknown format {fmt!r}; choose {' or '.join(WEIGHTS)}")
    if out.endswith((".safetensors", ".pkl")):
        raise ValueError(
            f"--out={out} names a file; --out is the export folder (it will hold "
            f"{WEIGHTS[fmt]} and {CARD}), e.g. --out={os.path.splitext(out)[0]}"
        )
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    results = _results(eval_workdirs)  # before any work: a wrong path fails at once
    variables, meta, got_step = restore_model_variables(workdir, step)
    params, stats = variables["params"], variables["batch_stats"]
    state = backbone_to_torchvision(params["backbone"], stats["backbone"])
    os.makedirs(out, exist_ok=True)
    for name in (*WEIGHTS.values(), CARD, TIMM_CONFIG):  # an earlier export's: none may linger
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    config, weights = meta["config"], os.path.join(out, WEIGHTS[fmt])
    files = {}
    if fmt == "torchvision":
        if include_projector:
            state.update(projector_to_torch(params["projector"], stats["projector"]))
        tensors = {k: np.ascontiguousarray(v) for k, v in state.items()}
        save_file(tensors, weights, metadata={"step": str(got_step), "source": "bt_jax"})
        files[WEIGHTS[fmt]] = "torchvision ResNet state_dict without fc" + (
            ", then the projector (projector.<i>.*)" if include_projector else ""
        )
        if is_timm_architecture(config["model"]) and not include_projector:
            image_size = config["augment"]["view1"]["image_size"]
            with open(os.path.join(out, TIMM_CONFIG), "w") as f:
                stats = normalization.of_config(config)
                json.dump(timm_config(config["model"], image_size, stats), f, indent=2)
            files[TIMM_CONFIG] = "timm's model config (architecture, preprocessing)"
    else:
        with open(weights, "wb") as f:
            pickle.dump(torchvision_to_detectron2(state), f)
        files[WEIGHTS[fmt]] = "detectron2 backbone weights (convert-torchvision-to-d2 names)"
    metrics = reporting.read_metrics(workdir)
    card = model_card(config=config, step=got_step, files=files, metrics=metrics, results=results)
    with open(os.path.join(out, CARD), "w") as f:
        f.write(card)
    message = (
        f"wrote {len(state)} tensors of step {got_step} ({config['model']['arch']}) and a "
        f"model card to {out}"
    )
    if push_to_hub:
        message += "\n" + upload(out, push_to_hub, step=got_step)
    return message


def upload(folder: str, repo_id: str, *, step: int) -> str:
    """The export folder to a Hugging Face Hub model repository (created if missing)."""
    try:
        import huggingface_hub
    except ImportError:
        raise ValueError("--push_to_hub needs huggingface_hub: pip install -e '.[hub]'") from None
    api = huggingface_hub.HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        commit_message=f"bt_jax export of step {step}",
    )
    return f"uploaded {sorted(os.listdir(folder))} to the Hub repository {repo_id}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Export a bt_jax backbone.")
    parser.add_argument("--workdir", required=True, help="a pretraining run's workdir")
    parser.add_argument("--format", required=True, choices=tuple(WEIGHTS))
    parser.add_argument("--out", required=True, help="output folder (weights + README.md)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
    parser.add_argument("--include_projector", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--results",
        action="append",
        default=[],
        metavar="EVAL_WORKDIR",
        help="an evaluation job's workdir whose results.json goes into the card (repeatable)",
    )
    parser.add_argument(
        "--push_to_hub", default="", metavar="REPO", help="upload the folder to this Hub repo"
    )
    args = parser.parse_args(argv)
    try:
        print(
            export(
                args.workdir,
                args.format,
                args.out,
                include_projector=args.include_projector,
                step=args.step,
                overwrite=args.overwrite,
                eval_workdirs=args.results,
                push_to_hub=args.push_to_hub,
            )
        )
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        print(f"bt_jax.export: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
