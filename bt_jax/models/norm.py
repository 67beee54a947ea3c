"""BatchNorm with per-view statistics, so both views can share one forward pass.

The twin model stacks the two views into one batch with rows interleaved (view 1 of
example i at row 2i, view 2 at row 2i + 1) and runs backbone and projector once: every
weight is then used once per step and its gradient all-reduced once over the mesh (two
calls made XLA reduce each weight gradient twice). A plain BatchNorm over that batch would
mix the views' statistics and change the model; ViewBatchNorm(x, views=2) normalises each
view by its own batch statistics, exactly what the official code's one call per view does.

Interleaving (not [view1; view2]) keeps each device's shard of the "data" axis holding its
own examples of both views: [N, 2, ...] -> [2N, ...] merges the sharded example axis with an
unsharded minor one, which needs no communication.

Variables are nn.BatchNorm's (params scale/bias, batch_stats mean/var), so checkpoints,
export and the evaluation jobs see the same tree. Statistics as torch BatchNorm in train
mode: mean and biased variance (two-pass) in float32 over batch and spatial axes, eps 1e-5.
The running statistics are updated view after view, ra = m ra + (1 - m) stat_view1, then
ra = m ra + (1 - m) stat_view2: the same float operations as the official two calls. As in
flax (and unlike torch, which stores the unbiased variance) the running var is the biased
batch variance.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_MOMENTUM = 0.9  # Flax convention: ra = m * ra + (1 - m) * batch; torch momentum 0.1
BN_EPS = 1e-5


class ViewBatchNorm(nn.Module):
    """BatchNorm over the last axis; in train mode one set of statistics per view.

    Attributes:
      use_running_average: inference mode (normalise by the running statistics).
      momentum: running-statistics decay (Flax convention; torch momentum = 1 - momentum).
      epsilon: added to the variance.
      dtype: output dtype; statistics and normalisation run in float32.
      scale_init: initialiser of the scale (zeros for the last BN of a residual block).
    """

    use_running_average: bool = False
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPS
    dtype: Any = jnp.float32
    scale_init: Any = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array, views: int = 1) -> jax.Array:
        """x: [views * N, ..., C] with the views interleaved along the first axis."""
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        scale = self.param("scale", self.scale_init, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)

        if self.use_running_average:
            return _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, self.dtype)

        if x.shape[0] % views:
            raise ValueError(f"a batch of {x.shape[0]} rows does not split into {views} views")
        grouped = x.reshape(x.shape[0] // views, views, *x.shape[1:]).astype(jnp.float32)
        axes = (0, *range(2, grouped.ndim - 1))  # examples and spatial axes, per view
        mean = grouped.mean(axes)  # [views, C]
        var = jnp.square(grouped - jnp.expand_dims(mean, axes)).mean(axes)
        if not self.is_initializing():
            m = self.momentum
            for v in range(views):  # the official order: view 1's update, then view 2's
                ra_mean.value = m * ra_mean.value + (1 - m) * mean[v]
                ra_var.value = m * ra_var.value + (1 - m) * var[v]
        y = _normalize(
            grouped,
            jnp.expand_dims(mean, axes),
            jnp.expand_dims(var, axes),
            scale,
            bias,
            self.epsilon,
            self.dtype,
        )
        return y.reshape(x.shape)


def _normalize(x, mean, var, scale, bias, epsilon, dtype):
    """(x - mean) * (rsqrt(var + eps) * scale) + bias in float32, as flax's BatchNorm."""
    y = x.astype(jnp.float32) - mean
    y = y * (jax.lax.rsqrt(var + epsilon) * scale)
    return (y + bias).astype(dtype)


def batch_norm(train: bool, dtype, name: str, zero_init: bool = False) -> ViewBatchNorm:
    """torch-equivalent BatchNorm2d/1d: eps 1e-5, momentum 0.1 (torch), two-pass variance."""
    return ViewBatchNorm(
        use_running_average=not train,
        scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
        dtype=dtype,
        name=name,
    )
