"""The Barlow Twins projector and the twin model (backbone + projector, one call per view)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from bt_jax.models.resnet import ResNet, batch_norm, resnet

# torch.nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def parse_projector(spec: str) -> tuple[int, ...]:
    """'8192-8192-8192' -> (8192, 8192, 8192), with a clear error for anything else."""
    try:
        sizes = tuple(int(s) for s in spec.split("-"))
    except ValueError:
        sizes = ()
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"projector spec must look like '8192-8192-8192'; got {spec!r}")
    return sizes


class Projector(nn.Module):
    """Dense (no bias) -> BN -> ReLU, repeated, then a last Dense (no bias).

    Submodule names are torch nn.Sequential indices (`layers_0` = `projector.0`, `layers_1` =
    `projector.1`, ...) so the official checkpoint's projector maps onto ours by name.
    """

    sizes: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        for i, size in enumerate(self.sizes):
            x = nn.Dense(
                size,
                use_bias=False,
                kernel_init=linear_init,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"layers_{3 * i}",
            )(x)
            if i < len(self.sizes) - 1:
                x = nn.relu(batch_norm(train, self.dtype, f"layers_{3 * i + 1}")(x))
        return x


class BarlowTwins(nn.Module):
    """Backbone + projector applied to each view in its own call.

    Separate calls mean every BN layer normalises each view by that view's batch statistics,
    as in the official code; concatenating the views would mix them and change the model.
    (Running statistics are updated once per call, i.e. twice per step, also as in torch.)
    """

    backbone: ResNet
    projector: Projector

    def embed(self, x, train: bool = True):
        return self.projector(self.backbone(x, train=train), train=train)

    def __call__(self, view1, view2, train: bool = True):
        return self.embed(view1, train), self.embed(view2, train)


def barlow_twins(
    arch: str = "resnet50",
    projector: str = "8192-8192-8192",
    *,
    width: float = 1.0,
    cifar_stem: bool = False,
    stage_sizes=None,
    dtype=jnp.float32,
) -> BarlowTwins:
    backbone = resnet(
        arch, width=width, cifar_stem=cifar_stem, stage_sizes=stage_sizes, dtype=dtype
    )
    return BarlowTwins(backbone=backbone, projector=Projector(parse_projector(projector), dtype))


def build_model(model_cfg: ml_collections.ConfigDict) -> BarlowTwins:
    """The twin model a config's `model` section describes (the one place configs become
    modules: pretraining, the evaluation jobs and the benchmarks all build through it)."""
    return barlow_twins(
        model_cfg.arch,
        model_cfg.projector,
        width=model_cfg.width,
        cifar_stem=model_cfg.cifar_stem,
        stage_sizes=tuple(model_cfg.stage_sizes) or None,
        dtype=jnp.dtype(model_cfg.dtype),
    )
