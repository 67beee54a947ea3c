"""The backbone an evaluation job measures: of a pretraining run, or of a torchvision file.

Two sources, exactly one per evaluation config (bt_jax/defaults.py eval_config()):
- pretrained_workdir: a bt_jax pretraining run. The architecture is rebuilt from the
  checkpoint's own config (meta["config"]["model"]), so an evaluation config never restates
  it; the restored parameters are checked leaf by leaf against it.
- pretrained_torchvision: a torchvision / timm ResNet state dict (.safetensors, or .pth
  read with torch), e.g. the official Barlow Twins resnet50.pth (torchvision's resnet50
  keys without fc). The architecture is inferred from the keys and shapes: bottleneck
  blocks if layer1.0.conv3 exists, blocks per stage from the layerN.M indices, the width
  from conv1's output channels (64 = 1x) and the stem from conv1's kernel (7x7: ImageNet
  stem with max-pool; 3x3: the CIFAR stem, stride 1 without max-pool, solo-learn's
  convention). Everything but the stem's stride and pooling is in the shapes, and the
  mapping (bt_jax/models/torchvision_layout.py) then checks every tensor's shape and
  refuses keys it does not use, so a file the inference misreads fails loudly instead of
  evaluating another network. BN running statistics come from the file.
Either way the trained weights, or with random_init a fresh initialisation of the same
architecture (the baseline), whose BN running statistics the job re-estimates on data
(precise_bn_statistics). The input statistics go with the weights: a pretraining run's own
(its checkpoint's config), ImageNet's for a file (the torchvision / timm convention), or
the config's backbone_normalization preset. Results name the source (Backbone.info).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from bt_jax import checkpoint, defaults, distributed
from bt_jax.data import normalization
from bt_jax.evaluation.features import Encoder
from bt_jax.models import ARCHS, ResNet, build_model, torchvision_layout
from bt_jax.models.norm import BN_MOMENTUM

SOURCES = ("pretrained_workdir", "pretrained_torchvision")
# Where the backbone of a whole-model checkpoint lives (e.g. the official full
# checkpoint.pth: {"model": {"module.backbone.conv1.weight", ..., "module.projector..."}}).
_WRAPPERS = ("state_dict", "model")


@dataclasses.dataclass(frozen=True)
class Backbone:
    """module: the ResNet (flax, hashable: a static jit argument); variables: {"params",
    "batch_stats"} of the backbone only, numpy; normalization: the input statistics it was
    trained with; info: where it came from, for results."""

    module: ResNet
    variables: dict
    normalization: normalization.Normalization
    info: dict

    @property
    def encoder(self) -> Encoder:
        """The module with its input statistics: what the protocols run."""
        return Encoder(self.module, self.normalization)

    @property
    def num_features(self) -> int:
        return self.module.num_features

    @property
    def label(self) -> str:
        """How results name this backbone: "pretrained" or "random_init"."""
        return self.info["source"]

    @property
    def origin(self) -> str:
        """Where the weights (or, for random_init, the architecture) came from, for logs."""
        if "file" in self.info:
            return f"{self.info['file']} (sha256 {self.info['sha256']})"
        return f"{self.info['workdir']} step {self.info['step']}"


def _describe_model(model_cfg) -> str:
    stages = tuple(model_cfg.get("stage_sizes") or ()) or "default"
    return (
        f"{model_cfg['arch']} width {model_cfg['width']} cifar_stem {model_cfg['cifar_stem']} "
        f"stages {stages}"
    )


def _shape_mismatches(expected, restored, prefix="") -> list[str]:
    """Paths where the restored tree differs from the architecture's (missing, extra, shape)."""
    out = []
    if not isinstance(expected, dict) or not isinstance(restored, dict):
        if isinstance(expected, dict) != isinstance(restored, dict):
            return [f"{prefix or '/'}: structure differs"]
        if tuple(expected.shape) != tuple(np.shape(restored)):
            return [f"{prefix}: checkpoint {np.shape(restored)} vs model {tuple(expected.shape)}"]
        return []
    for key in sorted(set(expected) | set(restored)):
        path = f"{prefix}/{key}"
        if key not in restored:
            out.append(f"{path}: missing from the checkpoint")
        elif key not in expected:
            out.append(f"{path}: not in the model")
        else:
            out += _shape_mismatches(expected[key], restored[key], path)
    return out


def build_backbone(model_cfg: dict) -> ResNet:
    """The backbone module a pretraining config's model section describes."""
    return build_model(ml_collections.ConfigDict(model_cfg)).backbone


def _template(module: ResNet) -> dict:
    images = jnp.zeros((1, 32, 32, 3), jnp.float32)
    return dict(jax.eval_shape(lambda: module.init(jax.random.key(0), images, train=False)))


def init_variables(module: ResNet, seed: int, image_size: int = 32) -> dict:
    """Fresh backbone variables (numpy), initialised as in pretraining (torchvision's)."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = jax.jit(lambda k: module.init(k, images, train=False))(jax.random.key(seed))
    return jax.tree.map(np.asarray, dict(variables))


def check_source(config: ml_collections.ConfigDict) -> str:
    """The one backbone source field an evaluation config sets (SOURCES); else one error."""
    given = [name for name in SOURCES if config[name]]
    if len(given) != 1:
        raise ValueError(
            "set exactly one of --config.pretrained_workdir (a bt_jax pretraining run's "
            "workdir) and --config.pretrained_torchvision (a torchvision/timm ResNet state "
            f"dict, .safetensors or .pth){'; both are set' if given else ''} (with "
            "--config.random_init=True only its architecture is used)"
        )
    return given[0]


def load_backbone(config: ml_collections.ConfigDict) -> Backbone:
    """The backbone config names (trained or, with random_init, fresh).

    config: an evaluation config (eval_config's pretrained_workdir or pretrained_torchvision,
    pretrained_step, backbone_dtype, random_init, expected_arch and seed).
    """
    source = check_source(config)
    load = _from_workdir if source == "pretrained_workdir" else _from_torchvision
    module, variables, info = load(config)
    if config.backbone_normalization:
        info["normalization"] = normalization.resolve(config.backbone_normalization, "")
    if config.expected_arch and config.expected_arch != info["arch"]:
        raise ValueError(
            f"the backbone of {info.get('workdir') or info.get('file')} is a {info['model']}, "
            f"but this evaluation expects {config.expected_arch} (config.expected_arch); pass "
            f"the right --config.{source} or --config.expected_arch={info['arch']}"
        )
    info.update(source="random_init" if config.random_init else "pretrained")
    if config.random_init:
        # Same architecture, none of the trained weights: the baseline of every protocol.
        variables = init_variables(module, config.seed)
        info["step"] = 0
    stats = normalization.PRESETS[info["normalization"]]
    return Backbone(module=module, variables=variables, normalization=stats, info=info)


def precise_bn_statistics(
    encoder: Encoder, variables: dict, batches: Iterable, mesh: Mesh, *, num_batches: int
) -> tuple[dict, int]:
    """variables with every BN's running statistics replaced by the mean over the first
    `num_batches` full batches (fewer if the data ends) of its train-mode batch statistics
    ("precise BN"), and the number of batches used.

    The network runs in train mode (each BN normalises by its batch's statistics, as in
    training) on eval-preprocessed images. A BN updates ra = m ra + (1 - m) stat from
    ra = 0, so stat = new ra / (1 - m): mean and biased variance exactly, per batch.
    Batches with padding (mask False) end the estimate, on every process alike.
    """
    zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])

    @jax.jit
    def batch_statistics(params, images):
        _, new = encoder.apply(
            {"params": params, "batch_stats": zeros}, images, train=True, mutable=["batch_stats"]
        )
        return jax.tree.map(lambda s: s / (1.0 - BN_MOMENTUM), new["batch_stats"])

    total, used = None, 0
    for batch in batches:
        if used == num_batches or distributed.any_process(not batch["mask"].all()):
            break
        images = distributed.host_to_global({"image": batch["image"]}, mesh)["image"]
        stats = batch_statistics(variables["params"], images)
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
        used += 1
    if not used:
        raise ValueError("precise BN: the data yielded no full batch; lower its global_batch")
    mean = jax.tree.map(lambda t: t / used, total)
    return {**variables, "batch_stats": mean}, used


def _from_workdir(config: ml_collections.ConfigDict):
    workdir = config.pretrained_workdir
    step = None if config.pretrained_step < 0 else config.pretrained_step
    variables, meta, got_step = checkpoint.restore_model_variables(workdir, step)
    saved_cfg = meta.get("config", {})
    if "model" not in saved_cfg or "backbone" not in variables["params"]:
        raise ValueError(
            f"{workdir} (step {got_step}) is not a bt_jax Barlow Twins pretraining checkpoint: "
            "its metadata has no model config or its parameters no backbone"
        )
    model_cfg = dict(saved_cfg["model"])
    if config.backbone_dtype:
        model_cfg["dtype"] = config.backbone_dtype
    module = build_backbone(model_cfg)
    restored = {
        "params": variables["params"]["backbone"],
        "batch_stats": variables["batch_stats"].get("backbone", {}),
    }
    problems = _shape_mismatches(_template(module), restored)
    if problems:
        more = f"; ... {len(problems) - 5} more" if len(problems) > 5 else ""
        listed = "; ".join(problems[:5]) + more
        raise ValueError(
            f"the checkpoint in {workdir} (step {got_step}) does not match the architecture its "
            f"config describes ({_describe_model(model_cfg)}): {listed}. Was it written by "
            "another version of the model code?"
        )
    info = dict(
        workdir=workdir,
        step=int(got_step),
        arch=model_cfg["arch"],
        model=_describe_model(model_cfg),
        num_features=int(module.num_features),
        pretrain_dataset=saved_cfg.get("data", {}).get("dataset", ""),
        normalization=normalization.preset_of(saved_cfg),  # what the run trained with
    )
    return module, restored, info


# ---------------------------------------------------------------------------------------
# torchvision / timm state dicts


def read_state_dict(path: str) -> tuple[dict[str, np.ndarray], str]:
    """(name -> numpy array, sha256 hex) of a .safetensors or .pth file (local or gs://)."""
    import tensorflow as tf  # gfile: local paths and object stores alike

    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"--config.pretrained_torchvision: no file {path}")
    with tf.io.gfile.GFile(path, "rb") as f:
        blob = f.read()
    digest = hashlib.sha256(blob).hexdigest()
    if path.endswith(".safetensors"):
        from safetensors.numpy import load

        return load(blob), digest
    if not path.endswith((".pth", ".pt", ".bin")):
        raise ValueError(
            f"--config.pretrained_torchvision={path}: expected a .safetensors or .pth file"
        )
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"reading {path} needs PyTorch: pip install torch (or save the state dict as "
            ".safetensors, which needs no torch)"
        ) from None
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    for key in _WRAPPERS:  # a whole checkpoint: its model's state dict
        if isinstance(state.get(key), dict):
            state = state[key]
    return {
        k: (v.float() if v.is_floating_point() else v).numpy()
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }, digest


def backbone_state(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The backbone's tensors under torchvision names, and the names of those left out.

    Drops "module." (DDP) and "backbone." prefixes; where some keys carry "backbone." (a
    whole Barlow Twins model), only those are the backbone (the projector is left out).
    The fc head, if any, is left out too: the evaluation trains its own.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        kept = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        left_out = sorted(k for k in state if not k.startswith("backbone."))
    else:
        kept, left_out = state, []
    left_out += sorted(k for k in kept if k.startswith("fc."))
    return {k: v for k, v in kept.items() if not k.startswith("fc.")}, left_out


def infer_model_config(state: dict[str, np.ndarray]) -> ml_collections.ConfigDict:
    """The model section (defaults.model_config) of a torchvision-layout ResNet state dict."""
    if "conv1.weight" not in state:
        raise ValueError(
            "no conv1.weight: not a torchvision-layout ResNet state dict (its first keys: "
            f"{', '.join(sorted(state)[:5]) or 'none'})"
        )
    stem_channels, _, kernel, _ = np.shape(state["conv1.weight"])
    if kernel not in (3, 7):
        raise ValueError(f"conv1 is {kernel}x{kernel}; a torchvision ResNet stem is 7x7 (or 3x3)")
    stages = []
    for stage in range(1, 5):
        blocks = {int(m[1]) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        if not blocks:
            break
        if blocks != set(range(len(blocks))):
            raise ValueError(f"layer{stage} has blocks {sorted(blocks)}: not 0, 1, 2, ...")
        stages.append(len(blocks))
    if not stages:
        raise ValueError("no layer1.* keys: not a torchvision-layout ResNet state dict")
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    named = [a for a, (b, s) in ARCHS.items() if b == block and s == tuple(stages)]
    model = defaults.model_config()
    model.update(
        arch=named[0] if named else {"basic": "resnet18", "bottleneck": "resnet50"}[block],
        width=stem_channels / 64,
        cifar_stem=bool(kernel == 3),
        stage_sizes=() if named else tuple(stages),
    )
    return model


def _from_torchvision(config: ml_collections.ConfigDict):
    path = config.pretrained_torchvision
    tensors, digest = read_state_dict(path)
    state, left_out = backbone_state(tensors)
    try:
        model_cfg = infer_model_config(state)
    except ValueError as err:
        raise ValueError(f"--config.pretrained_torchvision={path}: {err}") from None
    model_cfg.dtype = config.backbone_dtype or "float32"  # as torch evaluates it
    module = build_backbone(model_cfg.to_dict())
    try:
        variables = torchvision_layout.backbone_from_torchvision(state, _template(module)["params"])
    except ValueError as err:
        raise ValueError(
            f"--config.pretrained_torchvision={path} (read as a {_describe_model(model_cfg)}, "
            f"inferred from its keys): {err}"
        ) from None
    info = dict(
        file=path,
        sha256=digest[:12],
        step=-1,  # unknown: not a bt_jax run
        arch=model_cfg.arch,
        model=_describe_model(model_cfg),
        num_features=int(module.num_features),
        pretrain_dataset="",
        keys_left_out=len(left_out),
        normalization="imagenet",  # torchvision's and timm's convention
    )
    return module, variables, info
