"""The backbone of a pretraining run, for the evaluation jobs (kNN, linear, fine-tuning).

The architecture is rebuilt from the checkpoint's own config (meta["config"]["model"]), so an
evaluation config never restates it; the restored parameters are then checked leaf by leaf
against that architecture, so a checkpoint that does not match fails with a clear error
instead of a shape error deep inside a jitted step. Which checkpoint, and whether to use
its trained weights or a fresh initialisation (the random-init baseline), are fields of
every evaluation config: bt_jax/defaults.py eval_config().
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bt_jax import checkpoint
from bt_jax.models import ResNet, build_model


@dataclasses.dataclass(frozen=True)
class Backbone:
    """module: the ResNet (flax, hashable: a static jit argument); variables: {"params",
    "batch_stats"} of the backbone only, numpy; info: where it came from, for results."""

    module: ResNet
    variables: dict
    info: dict

    @property
    def num_features(self) -> int:
        return self.module.num_features

    @property
    def label(self) -> str:
        """How results name this backbone: "pretrained" or "random_init"."""
        return self.info["source"]


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


def init_variables(module: ResNet, seed: int, image_size: int = 32) -> dict:
    """Fresh backbone variables (numpy), initialised as in pretraining (torchvision's)."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = jax.jit(lambda k: module.init(k, images, train=False))(jax.random.key(seed))
    return jax.tree.map(np.asarray, dict(variables))


def load_backbone(config: ml_collections.ConfigDict) -> Backbone:
    """The backbone of config.pretrained_workdir (trained or, with random_init, fresh).

    config: an evaluation config (eval_config's pretrained_workdir, pretrained_step,
    random_init, expected_arch and seed).
    """
    workdir = config.pretrained_workdir
    if not workdir:
        raise ValueError(
            "set --config.pretrained_workdir to a pretraining run's workdir (with "
            "--config.random_init=True only its architecture is used)"
        )
    step = None if config.pretrained_step < 0 else config.pretrained_step
    variables, meta, got_step = checkpoint.restore_model_variables(workdir, step)
    saved_cfg = meta.get("config", {})
    if "model" not in saved_cfg or "backbone" not in variables["params"]:
        raise ValueError(
            f"{workdir} (step {got_step}) is not a bt_jax Barlow Twins pretraining checkpoint: "
            "its metadata has no model config or its parameters no backbone"
        )
    model_cfg = saved_cfg["model"]
    arch = model_cfg["arch"]
    if config.expected_arch and config.expected_arch != arch:
        raise ValueError(
            f"the checkpoint in {workdir} (step {got_step}) is a {_describe_model(model_cfg)}, "
            f"but this evaluation expects {config.expected_arch} (config.expected_arch); pass "
            f"the right --config.pretrained_workdir or --config.expected_arch={arch}"
        )
    module = build_backbone(model_cfg)
    images = jnp.zeros((1, 32, 32, 3), jnp.float32)
    template = jax.eval_shape(lambda: module.init(jax.random.key(0), images, train=False))
    restored = {
        "params": variables["params"]["backbone"],
        "batch_stats": variables["batch_stats"].get("backbone", {}),
    }
    problems = _shape_mismatches(dict(template), restored)
    if problems:
        more = f"; ... {len(problems) - 5} more" if len(problems) > 5 else ""
        listed = "; ".join(problems[:5]) + more
        raise ValueError(
            f"the checkpoint in {workdir} (step {got_step}) does not match the architecture its "
            f"config describes ({_describe_model(model_cfg)}): {listed}. Was it written by "
            "another version of the model code?"
        )
    info = dict(
        source="random_init" if config.random_init else "pretrained",
        workdir=workdir,
        step=int(got_step),
        arch=arch,
        model=_describe_model(model_cfg),
        num_features=int(module.num_features),
        pretrain_dataset=saved_cfg.get("data", {}).get("dataset", ""),
    )
    if config.random_init:
        # Same architecture, none of the trained weights: the baseline of every protocol.
        restored = init_variables(module, config.seed)
        info["step"] = 0
    return Backbone(module=module, variables=restored, info=info)
