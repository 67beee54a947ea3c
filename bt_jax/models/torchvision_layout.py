"""Our ResNet / projector variables <-> torchvision's (and detectron2's) state_dict layout.

Mapping: our modules carry torchvision's names (layer1_0 <-> layer1.0, downsample_0 <->
downsample.0); conv kernels HWIO <-> OIHW, Dense kernels [in, out] <-> Linear weight
[out, in], BN scale/bias/mean/var <-> weight/bias/running_mean/running_var.

Used by the export CLI (weights out) and the evaluation jobs (torchvision-layout weights in).
"""

from __future__ import annotations

import collections
import re

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
        raise ValueError(f"the state dict has no {key!r}: is it a torchvision ResNet?")
    return np.asarray(state[key], np.float32)


def backbone_from_torchvision(state_dict, template_params):
    """torchvision-layout state_dict -> {"params", "batch_stats"} shaped like the template.

    Accepts the official Barlow Twins resnet50.pth (a torchvision ResNet-50 state dict) and
    our own exports; an fc layer, if present, is ignored. Shape mismatches, missing keys and
    keys the model has no place for raise ValueError (as torch's strict load_state_dict).
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
    unused = sorted(
        k
        for k in state
        if k not in used and not k.startswith("fc.") and not k.endswith(".num_batches_tracked")
    )
    if unused:
        more = f", ... ({len(unused)} in all)" if len(unused) > 5 else ""
        raise ValueError(
            f"the state dict has keys this model has no place for: {', '.join(unused[:5])}"
            f"{more}; is it a ResNet of this architecture?"
        )
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
