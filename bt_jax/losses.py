"""The Barlow Twins objective, on one device or sharded over a mesh's "data" axis.

    z1n, z2n = standardize(z1), standardize(z2)          # per view, over the global batch
    C = z1n^T z2n / N                                     # D x D
    loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2

Standardization is affine-free BatchNorm1d in train mode: per-feature batch mean and *biased*
variance, eps 1e-5. Everything is computed in float32 at HIGHEST matmul precision whatever
the model's compute dtype.

Sharded strategies (z1, z2 are global arrays sharded along "data"); each gives the value and
the gradient of the single-device global-batch computation:

  "gather"     all-gather z1n over the batch and all-to-all z2n into column blocks; each
               device computes C[:, its D/W columns] and the psum of its partial loss. No
               device forms the whole D x D product; per device it moves ~(N + N/W) x D
               floats instead of the D x D of an all-reduce, and does 1/W of the matmul.
  "allreduce"  each device forms its partial C = z1n_local^T z2n_local / N, psum'd to the full
               C on every device (D^2 floats per device; simple, best when N > D / 2).
  "jit"        the plain global-array computation; XLA's partitioner chooses the collectives.
               For comparison: on CPU it all-reduces the whole C and all-gathers another
               D x D in the backward, twice the bytes of "allreduce" (docs/benchmarks.md).

The loss is written as sum(w * (C - I)^2) with w = lambd + (1 - lambd) I, which never extracts
a diagonal from a sharded C.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

BN_EPS = 1e-5
LAMBD = 0.0051
DATA_AXIS = "data"
STRATEGIES = ("gather", "allreduce", "jit")
_HIGHEST = jax.lax.Precision.HIGHEST


class LossTerms(NamedTuple):
    """The loss and its two parts: loss = invariance + lambd * redundancy."""

    loss: jax.Array
    invariance: jax.Array  # sum_i (1 - C_ii)^2
    redundancy: jax.Array  # sum_{i != j} C_ij^2 (not yet multiplied by lambd)


def _check_pair(z1, z2) -> None:
    if z1.ndim != 2 or z2.ndim != 2:
        raise ValueError(
            f"z1 and z2 must be [batch, features] matrices; got shapes {z1.shape} and {z2.shape}"
        )
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape; got {z1.shape} and {z2.shape}")
    if z1.shape[0] < 2:
        raise ValueError(
            f"the batch must hold at least 2 examples to standardize over it; got N={z1.shape[0]}"
        )


def standardize(z: jax.Array, eps: float = BN_EPS) -> jax.Array:
    """Affine-free train-mode BatchNorm1d: (z - mean) / sqrt(biased var + eps), in float32."""
    z = z.astype(jnp.float32)
    mean = jnp.mean(z, axis=0)
    var = jnp.mean(jnp.square(z - mean), axis=0)  # two-pass: exact for large means
    return (z - mean) * jax.lax.rsqrt(var + eps)


def _eye_block(rows: int, cols: int, col_offset=0) -> jax.Array:
    """The [rows, cols] block of the identity whose first column is col_offset."""
    row = jnp.arange(rows)[:, None]
    col = jnp.arange(cols)[None, :] + col_offset
    return (row == col).astype(jnp.float32)


def _terms_from_block(c_block, col_offset=0):
    """(invariance, redundancy) partial sums of a [D, D_block] block of C."""
    eye = _eye_block(c_block.shape[0], c_block.shape[1], col_offset)
    sq_dev = jnp.square(c_block - eye)  # (1 - C_ii)^2 on the diagonal, C_ij^2 off it
    invariance = jnp.sum(eye * sq_dev)
    redundancy = jnp.sum((1.0 - eye) * sq_dev)
    return invariance, redundancy


def cross_correlation(z1: jax.Array, z2: jax.Array) -> jax.Array:
    """C = standardize(z1)^T standardize(z2) / N, a [D, D] float32 matrix."""
    _check_pair(z1, z2)
    n = z1.shape[0]
    return jnp.einsum("nd,ne->de", standardize(z1), standardize(z2), precision=_HIGHEST) / n


def _terms_single(z1, z2, lambd):
    inv, red = _terms_from_block(cross_correlation(z1, z2))
    return LossTerms(inv + lambd * red, inv, red)


def _global_standardize(z_local, n_global, axis):
    """standardize() over the global batch from inside shard_map: stats by psum."""
    z_local = z_local.astype(jnp.float32)
    mean = jax.lax.psum(jnp.sum(z_local, axis=0), axis) / n_global
    var = jax.lax.psum(jnp.sum(jnp.square(z_local - mean), axis=0), axis) / n_global
    return (z_local - mean) * jax.lax.rsqrt(var + BN_EPS)


def _terms_gather_local(z1_local, z2_local, *, n_global, lambd, axis):
    num_shards = jax.lax.axis_size(axis)
    d = z1_local.shape[1]
    z1n = _global_standardize(z1_local, n_global, axis)
    z2n = _global_standardize(z2_local, n_global, axis)
    # [N, D]: every row of view 1.
    z1n_all = jax.lax.all_gather(z1n, axis, axis=0, tiled=True)
    # [N, D/W]: every row of view 2, only this device's block of columns.
    z2n_cols = jax.lax.all_to_all(z2n, axis, split_axis=1, concat_axis=0, tiled=True)
    c_block = jnp.einsum("nd,ne->de", z1n_all, z2n_cols, precision=_HIGHEST) / n_global
    offset = jax.lax.axis_index(axis) * (d // num_shards)
    inv, red = _terms_from_block(c_block, offset)
    inv, red = jax.lax.psum((inv, red), axis)
    return LossTerms(inv + lambd * red, inv, red)


def _terms_allreduce_local(z1_local, z2_local, *, n_global, lambd, axis):
    z1n = _global_standardize(z1_local, n_global, axis)
    z2n = _global_standardize(z2_local, n_global, axis)
    c_partial = jnp.einsum("nd,ne->de", z1n, z2n, precision=_HIGHEST) / n_global
    c = jax.lax.psum(c_partial, axis)
    inv, red = _terms_from_block(c)
    return LossTerms(inv + lambd * red, inv, red)


def _terms_jit(z1, z2, lambd, mesh, axis):
    n = z1.shape[0]
    z1n, z2n = standardize(z1), standardize(z2)
    # C's columns sharded over the axis, as in "gather"; the partitioner picks collectives.
    c_sharding = NamedSharding(mesh, P(None, axis))
    if mesh.axis_types[mesh.axis_names.index(axis)] == AxisType.Explicit:
        # Explicit axes: a contraction over the sharded batch must name its output sharding.
        c = jnp.einsum("nd,ne->de", z1n, z2n, precision=_HIGHEST, out_sharding=c_sharding)
    else:
        c = jnp.einsum("nd,ne->de", z1n, z2n, precision=_HIGHEST)
        c = jax.lax.with_sharding_constraint(c, c_sharding)
    c = c / n
    inv, red = _terms_from_block(c)
    return LossTerms(inv + lambd * red, inv, red)


def _check_mesh(z1, mesh, strategy, axis):
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown loss strategy {strategy!r}; choose one of {STRATEGIES}")
    if axis not in mesh.axis_names:
        raise ValueError(f"the mesh has no axis {axis!r}; its axes are {mesh.axis_names}")
    num_shards = mesh.shape[axis]
    n, d = z1.shape
    if n % num_shards:
        raise ValueError(
            f"the global batch N={n} does not divide over the {num_shards} devices of mesh "
            f"axis {axis!r}; use a batch size that is a multiple of {num_shards}"
        )
    if strategy == "gather" and d % num_shards:
        raise ValueError(
            f"the 'gather' strategy splits the D={d} features into {num_shards} column blocks; "
            f"use D divisible by {num_shards} or strategy='allreduce'"
        )


def barlow_twins_terms(
    z1: jax.Array,
    z2: jax.Array,
    *,
    lambd: float = LAMBD,
    mesh: jax.sharding.Mesh | None = None,
    strategy: str = "gather",
    axis: str = DATA_AXIS,
) -> LossTerms:
    """Loss, invariance and redundancy terms; see barlow_twins_loss."""
    _check_pair(z1, z2)
    if mesh is None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown loss strategy {strategy!r}; choose one of {STRATEGIES}")
        return _terms_single(z1, z2, lambd)
    _check_mesh(z1, mesh, strategy, axis)
    if strategy == "jit":
        return _terms_jit(z1, z2, lambd, mesh, axis)
    local_fn = _terms_gather_local if strategy == "gather" else _terms_allreduce_local
    sharded = jax.shard_map(
        lambda a, b: local_fn(a, b, n_global=z1.shape[0], lambd=lambd, axis=axis),
        mesh=mesh,
        in_specs=(P(axis, None), P(axis, None)),
        out_specs=P(),
        axis_names={axis},
    )
    return sharded(z1, z2)


def barlow_twins_loss(
    z1: jax.Array,
    z2: jax.Array,
    *,
    lambd: float = LAMBD,
    mesh: jax.sharding.Mesh | None = None,
    strategy: str = "gather",
    axis: str = DATA_AXIS,
) -> jax.Array:
    """sum_i (1 - C_ii)^2 + lambd * sum_{i!=j} C_ij^2 over the global batch, float32 scalar.

    Args:
      z1, z2: [N, D] embeddings of the two views (any float dtype).
      lambd: weight of the redundancy-reduction term (paper: 0.0051).
      mesh: when given, z1 and z2 are global arrays sharded along `axis` of this mesh and the
        loss is computed with `strategy`; the value and gradient equal the unsharded ones.
      strategy: "gather", "allreduce" or "jit" (see the module docstring).
      axis: the mesh axis that shards the batch.
    """
    return barlow_twins_terms(z1, z2, lambd=lambd, mesh=mesh, strategy=strategy, axis=axis).loss
