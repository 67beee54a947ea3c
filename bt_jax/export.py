r"""Backbone weights out to torchvision / timm / detectron2 (and the Hub), and torchvision-
layout weights in.

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
convN.norm), for detection transfer (set MODEL.PIXEL_MEAN/STD to torchvision's RGB values and
INPUT.FORMAT to RGB).

Mapping: our modules carry torchvision's names (layer1_0 <-> layer1.0, downsample_0 <->
downsample.0); conv kernels HWIO <-> OIHW, Dense kernels [in, out] <-> Linear weight
[out, in], BN scale/bias/mean/var <-> weight/bias/running_mean/running_var.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import re
import sys

import numpy as np

_BN_PARAMS = (("scale", "weight"), ("bias", "bias"))
_BN_STATS = (("mean", "running_mean"), ("var", "running_var"))


def _module_order(name: str):
    """torchvision's module order: conv1, bn1, then the residual blocks by (stage, block)."""
    match = re.fullmatch(r"layer(\d+)_(\d+)", name)
    if match:
        return (1, int(match[1]), int(match[2]))
    return (0, ("conv1", "bn1").index(name), 0)


def _block_order(name: str):
    order = ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_0", "downsample_1"]
    return order.index(name)


def _emit(out, torch_name, params, stats):
    if "kernel" in params:  # conv HWIO -> OIHW, dense [in, out] -> [out, in]
        kernel = np.asarray(params["kernel"])
        out[f"{torch_name}.weight"] = (
            kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T
        ).copy()
    else:  # BatchNorm
        for ours, theirs in _BN_PARAMS:
            out[f"{torch_name}.{theirs}"] = np.asarray(params[ours])
        for ours, theirs in _BN_STATS:
            out[f"{torch_name}.{theirs}"] = np.asarray(stats[ours])
        out[f"{torch_name}.num_batches_tracked"] = np.zeros((), np.int64)


def backbone_to_torchvision(params, batch_stats) -> collections.OrderedDict:
    """Our ResNet variables -> torchvision state_dict (numpy), without fc."""
    out = collections.OrderedDict()
    for name in sorted(params, key=_module_order):
        if name.startswith("layer"):
            block = params[name]
            for child in sorted(block, key=_block_order):
                torch_name = f"{name.replace('_', '.')}.{child.replace('_', '.')}"
                _emit(out, torch_name, block[child], batch_stats.get(name, {}).get(child))
        else:
            _emit(out, name, params[name], batch_stats.get(name))
    return out


def projector_to_torch(params, batch_stats) -> collections.OrderedDict:
    out = collections.OrderedDict()
    for name in sorted(params, key=lambda n: int(n.split("_")[1])):
        _emit(out, f"projector.{name.split('_')[1]}", params[name], batch_stats.get(name))
    return out


def _take(state, key, used):
    used.add(key)
    if key not in state:
        raise KeyError(f"the state dict has no {key!r}: is it a torchvision ResNet?")
    return np.asarray(state[key], np.float32)


def backbone_from_torchvision(state_dict, template_params):
    """torchvision-layout state_dict -> {"params", "batch_stats"} shaped like the template.

    Accepts the official Barlow Twins resnet50.pth (a torchvision ResNet-50 state dict) and
    our own exports; an fc layer, if present, is ignored. Shape mismatches raise.
    """
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state_dict.items()}
    used: set[str] = set()
    params, stats = {}, {}

    def load(torch_name, ours):
        if "kernel" in ours:
            weight = _take(state, f"{torch_name}.weight", used)
            kernel = weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T
            if kernel.shape != tuple(ours["kernel"].shape):
                raise ValueError(
                    f"{torch_name}.weight has shape {weight.shape}; this model needs "
                    f"{tuple(ours['kernel'].shape)} (HWIO); wrong architecture or width?"
                )
            return {"kernel": kernel}, None
        p = {o: _take(state, f"{torch_name}.{t}", used) for o, t in _BN_PARAMS}
        s = {o: _take(state, f"{torch_name}.{t}", used) for o, t in _BN_STATS}
        if p["scale"].shape != tuple(ours["scale"].shape):
            raise ValueError(
                f"{torch_name} has {p['scale'].shape[0]} channels; expected "
                f"{ours['scale'].shape[0]}"
            )
        return p, s

    for name, module in template_params.items():
        if name.startswith("layer"):
            params[name], stats[name] = {}, {}
            for child, leaves in module.items():
                torch_name = f"{name.replace('_', '.')}.{child.replace('_', '.')}"
                params[name][child], s = load(torch_name, leaves)
                if s is not None:
                    stats[name][child] = s
        else:
            params[name], s = load(name, module)
            if s is not None:
                stats[name] = s
    return {"params": params, "batch_stats": stats}


def torchvision_to_detectron2(state_dict) -> dict:
    """detectron2's tools/convert-torchvision-to-d2.py renaming, as a picklable dict."""
    model = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked") or key.startswith("fc."):
            continue
        new = key if "layer" in key else "stem." + key
        for t in (1, 2, 3, 4):
            new = new.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            new = new.replace(f"bn{t}", f"conv{t}.norm")
        new = new.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        model[new] = np.asarray(value)
    return {"model": model, "__author__": "bt_jax", "matching_heuristics": True}


WEIGHTS = {"torchvision": "model.safetensors", "detectron2": "model_d2.pkl"}
CARD = "README.md"
TIMM_CONFIG = "config.json"


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

    from bt_jax import model_card, writers
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
        if model_card.is_timm_architecture(config["model"]) and not include_projector:
            image_size = config["augment"]["view1"]["image_size"]
            with open(os.path.join(out, TIMM_CONFIG), "w") as f:
                json.dump(model_card.timm_config(config["model"], image_size), f, indent=2)
            files[TIMM_CONFIG] = "timm's model config (architecture, preprocessing)"
    else:
        with open(weights, "wb") as f:
            pickle.dump(torchvision_to_detectron2(state), f)
        files[WEIGHTS[fmt]] = "detectron2 backbone weights (convert-torchvision-to-d2 names)"
    metrics = writers.read_metrics(workdir)
    card = model_card.render(
        config=config, step=got_step, files=files, metrics=metrics, results=results
    )
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
