"""The Barlow Twins projector and the twin model (backbone + projector, both views in one call)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from bt_jax.models.norm import batch_norm
from bt_jax.models.parallel import column_sharded, layer_input
from bt_jax.models.resnet import ResNet, resnet

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
    `projector.1`, ...) so the official checkpoint's projector maps onto ours by name. On a
    ("data", "model") mesh every Dense is column-sharded over "model" and every BN local to
    its features (models/parallel.py); elsewhere it is the plain computation.
    """

    sizes: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True, views: int = 1):
        for i, size in enumerate(self.sizes):
            x = nn.Dense(
                size,
                use_bias=False,
                kernel_init=column_sharded(linear_init),
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"layers_{3 * i}",
            )(layer_input(x))
            if i < len(self.sizes) - 1:
                x = nn.relu(batch_norm(train, self.dtype, f"layers_{3 * i + 1}")(x, views))
        return x


class BarlowTwins(nn.Module):
    """Backbone + projector applied to both views in one call, with per-view BN statistics.

    The views are stacked with rows interleaved ([N, 2, ...] -> [2N, ...]) and every BN
    normalises each view by that view's own batch statistics (norm.ViewBatchNorm): the
    model of the official code, which calls backbone and projector once per view, with each
    weight used once per step (its gradient reduced once over the mesh, not once per view).
    Running statistics are updated view 1 first, then view 2, as the official two calls.
    """

    backbone: ResNet
    projector: Projector

    def embed(self, x, train: bool = True, views: int = 1):
        """[views * N, H, W, 3] (views interleaved) -> [views * N, D]."""
        return self.projector(self.backbone(x, train=train, views=views), train=train, views=views)

    def __call__(self, view1, view2, train: bool = True):
        n = view1.shape[0]
        both = jnp.stack([view1, view2], axis=1).reshape(2 * n, *view1.shape[1:])
        z = self.embed(both, train, views=2).reshape(n, 2, -1)
        return z[:, 0], z[:, 1]


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
