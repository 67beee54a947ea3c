"""ResNet v1.5 in Flax linen with torchvision's layout, so weights map one-to-one.

Module names follow torchvision's state_dict: `conv1`, `bn1`, `layer1_0` (torch `layer1.0`)
with `conv1`/`bn1`/.../`downsample_0`/`downsample_1` inside, in torchvision's order. Convs have
no bias and torch's explicit symmetric padding (Flax "SAME" pads stride-2 convs asymmetrically,
which would not match torchvision numerically). Initialisation follows torchvision with
zero_init_residual=True, as the official Barlow Twins code builds it: Kaiming-normal fan-out
convs, BN scale 1 and bias 0, the last BN scale of every residual block 0.

BN: eps 1e-5 and Flax momentum 0.9 (torch momentum 0.1). Statistics are taken over the whole
(global) batch the module sees: under jit over a mesh, that is the global batch; with
views=2 (the twin model's stacked, interleaved views) over each view's rows separately
(norm.ViewBatchNorm).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bt_jax.models.norm import batch_norm

# torchvision initialises convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# name -> (block type, blocks per stage)
ARCHS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


def _conv(features, kernel, stride, dtype, name):
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class _Block(nn.Module):
    """Shared plumbing of the two residual blocks: the (per-view) BN and the shortcut."""

    features: int  # inner width; the block outputs features * expansion channels
    stride: int
    train: bool
    views: int = 1  # interleaved views in the batch, each normalised by its own statistics
    dtype: Any = jnp.float32

    def bn(self, x, name, zero_init=False):
        return batch_norm(self.train, self.dtype, name, zero_init)(x, self.views)

    def shortcut(self, x, out_features):
        if self.stride == 1 and x.shape[-1] == out_features:
            return x
        x = _conv(out_features, 1, self.stride, self.dtype, "downsample_0")(x)
        return self.bn(x, "downsample_1")


class BasicBlock(_Block):
    expansion = 1

    @nn.compact
    def __call__(self, x):
        y = _conv(self.features, 3, self.stride, self.dtype, "conv1")(x)
        y = nn.relu(self.bn(y, "bn1"))
        y = _conv(self.features, 3, 1, self.dtype, "conv2")(y)
        y = self.bn(y, "bn2", zero_init=True)
        return nn.relu(y + self.shortcut(x, self.features))


class Bottleneck(_Block):
    """torchvision's v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    @nn.compact
    def __call__(self, x):
        out_features = self.features * self.expansion
        y = _conv(self.features, 1, 1, self.dtype, "conv1")(x)
        y = nn.relu(self.bn(y, "bn1"))
        y = _conv(self.features, 3, self.stride, self.dtype, "conv2")(y)
        y = nn.relu(self.bn(y, "bn2"))
        y = _conv(out_features, 1, 1, self.dtype, "conv3")(y)
        y = self.bn(y, "bn3", zero_init=True)
        return nn.relu(y + self.shortcut(x, out_features))


class ResNet(nn.Module):
    """A ResNet backbone without the final fc: images [N, H, W, 3] -> features [N, C].

    Attributes:
      block: "basic" or "bottleneck".
      stage_sizes: residual blocks per stage.
      width: multiplier on every stage's channel count (1 = torchvision's).
      cifar_stem: 3x3 stride-1 first conv and no max-pool (for 32 px images).
      dtype: compute dtype (e.g. bfloat16); parameters stay float32.
    """

    block: str
    stage_sizes: Sequence[int]
    width: float = 1.0
    cifar_stem: bool = False
    dtype: Any = jnp.float32

    @property
    def num_features(self) -> int:
        return int(64 * self.width) * 2 ** (len(self.stage_sizes) - 1) * EXPANSION[self.block]

    @nn.compact
    def __call__(self, x, train: bool = True, views: int = 1):
        """views: the batch holds this many views interleaved (row v + views * i is view v
        of example i); in train mode each BN normalises each view by its own statistics."""
        block_cls = BasicBlock if self.block == "basic" else Bottleneck
        x = x.astype(self.dtype)
        base = int(64 * self.width)
        if self.cifar_stem:
            x = _conv(base, 3, 1, self.dtype, "conv1")(x)
        else:
            x = _conv(base, 7, 2, self.dtype, "conv1")(x)
        x = nn.relu(batch_norm(train, self.dtype, "bn1")(x, views))
        if not self.cifar_stem:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, num_blocks in enumerate(self.stage_sizes):
            for i in range(num_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                x = block_cls(
                    features=base * 2**stage,
                    stride=stride,
                    train=train,
                    views=views,
                    dtype=self.dtype,
                    name=f"layer{stage + 1}_{i}",
                )(x)
        return jnp.mean(x, axis=(1, 2))  # global average pool


def resnet(
    arch: str,
    *,
    width: float = 1.0,
    cifar_stem: bool = False,
    stage_sizes: Sequence[int] | None = None,
    dtype=jnp.float32,
):
    """ResNet by torchvision name: resnet18, resnet34, resnet50, resnet101, resnet152.

    `stage_sizes` overrides the blocks per stage (e.g. (1, 1) for a two-stage toy model in
    tests and smoke runs); the result is then no longer the torchvision architecture.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}")
    block, stages = ARCHS[arch]
    if stage_sizes:
        if len(stage_sizes) > 4 or min(stage_sizes) < 1:
            raise ValueError(f"stage_sizes must hold 1 to 4 positive counts; got {stage_sizes}")
        stages = tuple(stage_sizes)
    return ResNet(block=block, stage_sizes=stages, width=width, cifar_stem=cifar_stem, dtype=dtype)
