"""The Barlow Twins objective, on one device or sharded over a ("data", "model") mesh.

    z1n, z2n = standardize(z1), standardize(z2)          # per view, over the global batch
    C = z1n^T z2n / N                                     # D x D
    loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2

Standardization is affine-free BatchNorm1d in train mode: per-feature batch mean and *biased*
variance, eps 1e-5. Everything is computed in float32 at HIGHEST matmul precision whatever
the model's compute dtype. Every strategy gives the value and the gradient of the
single-device global-batch computation.

C-form strategies (z sharded P("data", None) over W devices, features unsharded); the loss is
sum(w * (C - I)^2) with w = lambd + (1 - lambd) I, which never extracts a sharded diagonal:
  "gather"     all-gather z1n over the batch and all-to-all z2n into column blocks; each
               device computes C[:, its D/W columns] and the psum of its partial loss.
  "allreduce"  each device's partial C = z1n_local^T z2n_local / N is psum'd to the full C.
  "jit"        the global-array computation; XLA's partitioner picks the collectives (on CPU
               it all-reduces C and all-gathers another D x D in the backward).

"gram" never forms C: with G1 = z1n z1n^T and G2 = z2n z2n^T ([N, N]),
sum_ij C_ij^2 = <G1, G2>_F / N^2 and C_ii = (1/N) sum_n z1n_ni z2n_ni, so
loss = sum_i (1 - C_ii)^2 + lambd (<G1, G2>_F / N^2 - sum_i C_ii^2). z is P("data", "model")
over Wd x M = K devices (M = 1 without a "model" axis); each device holds z[its N/Wd rows,
its D/M columns] and
  1. all-to-alls it over "data" into z[every row, its D/K columns], so standardization and
     C_ii of those columns are local (no statistics to psum);
  2. reduce-scatters its partial Grams z_cols z_cols^T over all K devices into [N/K, N] row
     blocks of G1 and G2 (rows zero-padded to a multiple of K);
  3. psums four scalars: its shares of <G1, G2>, sum (1 - C_ii)^2, sum C_ii^2 and sum C_ii.
No device holds a whole row of z, a whole C or a D x D / D x D/W block. Transposing rows into
columns moves N D/K floats per view where all-gathering rows for [N/W, N] Gram blocks moves
N D; the reduce-scatter adds N^2. The Gram's backward is one matmul, (dG + dG^T) z.

Per device, value_and_grad w.r.t. both views (matmul FLOPs; float32 bytes sent by
bandwidth-optimal collectives, what `strategy_cost` returns; fw = (Wd-1)/Wd, fk = (K-1)/K;
gram needs D % K == 0, gather D % W == 0; bench/scaling.py's compiled HLO agrees):

                                                         temporaries, MiB, N = 2048, W = 8
  strategy   FLOPs          bytes                        D = 8192    D = 65,536
  gram       8 N^2 D / K    16 (fw N D / K + fk N^2)     82          448
  gather     6 N D^2 / W    8 fw (N + N / W) D           208         8,834
  allreduce  6 N D^2 / W    8 fw D^2                     1,040       65,666
  jit        6 N D^2 / W    12 fw D^2                    624         39,042

At the paper's N = 2048, W = 8: D = 8192 gram 34 GFLOP / 84 MiB, gather 103 / 126,
allreduce 103 / 448; D = 32,768 gram 137 GFLOP / 168 MiB, gather 1,649 / 504.

"auto" picks the applicable strategy of least FLOPs / FLOPS_PER_BYTE + bytes
(FLOPS_PER_BYTE = 200: float32 matmul rate over per-device collective bandwidth, about an
A100 on InfiniBand or a TPU v4 on ICI). On one device (no bytes): gram iff 4 N < 3 D, else
the C form. On W devices: gram up to N ~ 0.6-0.75 D, then gather (W >= 8) up to N ~ 0.9 D,
then allreduce; FLOPS_PER_BYTE from 30 to 300 moves these bounds by < 0.15 D. With a "model"
axis of M > 1 only gram applies.

Numerics of gram: the redundancy is the difference <G1, G2>_F / N^2 - S, S = sum_i C_ii^2,
so the float32 rounding of ||C||_F^2 (~1e-7 relative) is amplified by
A = ||C||_F^2 / redundancy in the redundancy and by lambd ||C||_F^2 / loss <= A in the loss.
As |C_ii| <= 1 and rank C <= N - 1 (centred columns), ||C||_F^2 >= (sum_i |C_ii|)^2 / (N - 1)
>= S^2 / (N - 1), so A <= 1 + (N - 1) / (S - N + 1) whenever S > N - 1. For C as close to
the identity as the batch allows (C_ii ~ 1, S ~ D): A <= 1 + (N - 1) / (D - N + 1), 1.07 at
N = 2048, D = 32,768, 2 at D = 2 N, 4 at D = 4 N / 3; for random C (S ~ D / N),
A ~ 1 + 1 / D. Only with D < N and C -> I (whitened embeddings, nearly equal views) is A
unbounded: N = 2048, D = 512 gives A = 4e4 and 2e-4 relative error on a loss of 7e-5 (the C
form: 1e-5); auto leaves that regime to the C forms unless the features are sharded.
Measured at N = 2048 (docs/benchmarks.md): <= 1.2e-7 relative up to D = 32,768, random and
near-identity C; tests/test_losses.py checks 1e-5 at D = 4096.
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
MODEL_AXIS = "model"
C_FORMS = ("gather", "allreduce", "jit")
STRATEGIES = ("gram", *C_FORMS)  # the computations; "auto" picks one of them
FLOPS_PER_BYTE = 200.0  # auto's exchange rate between matmul FLOPs and collective bytes
_HIGHEST = jax.lax.Precision.HIGHEST


class LossTerms(NamedTuple):
    """The loss and its two parts, loss = invariance + lambd * redundancy, and trace(C).

    Scale-free health statistics follow (pretrain.py logs them): the mean of C's diagonal,
    diagonal / D, and the RMS of its off-diagonal entries, sqrt(redundancy / (D (D - 1))).
    """

    loss: jax.Array
    invariance: jax.Array  # sum_i (1 - C_ii)^2
    redundancy: jax.Array  # sum_{i != j} C_ij^2 (not yet multiplied by lambd)
    diagonal: jax.Array  # sum_i C_ii


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


# --- C-form strategies ---------------------------------------------------------------------


def _eye_block(rows: int, cols: int, col_offset=0) -> jax.Array:
    """The [rows, cols] block of the identity whose first column is col_offset."""
    row = jnp.arange(rows)[:, None]
    col = jnp.arange(cols)[None, :] + col_offset
    return (row == col).astype(jnp.float32)


def _terms_from_block(c_block, col_offset=0):
    """(invariance, redundancy, diagonal) partial sums of a [D, D_block] block of C."""
    eye = _eye_block(c_block.shape[0], c_block.shape[1], col_offset)
    sq_dev = jnp.square(c_block - eye)  # (1 - C_ii)^2 on the diagonal, C_ij^2 off it
    invariance = jnp.sum(eye * sq_dev)
    redundancy = jnp.sum((1.0 - eye) * sq_dev)
    return invariance, redundancy, jnp.sum(eye * c_block)


def cross_correlation(z1: jax.Array, z2: jax.Array) -> jax.Array:
    """C = standardize(z1)^T standardize(z2) / N, a [D, D] float32 matrix."""
    _check_pair(z1, z2)
    n = z1.shape[0]
    return jnp.einsum("nd,ne->de", standardize(z1), standardize(z2), precision=_HIGHEST) / n


def _terms_c_single(z1, z2, lambd):
    inv, red, diag = _terms_from_block(cross_correlation(z1, z2))
    return LossTerms(inv + lambd * red, inv, red, diag)


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
    inv, red, diag = jax.lax.psum(_terms_from_block(c_block, offset), axis)
    return LossTerms(inv + lambd * red, inv, red, diag)


def _terms_allreduce_local(z1_local, z2_local, *, n_global, lambd, axis):
    z1n = _global_standardize(z1_local, n_global, axis)
    z2n = _global_standardize(z2_local, n_global, axis)
    c_partial = jnp.einsum("nd,ne->de", z1n, z2n, precision=_HIGHEST) / n_global
    c = jax.lax.psum(c_partial, axis)
    inv, red, diag = _terms_from_block(c)
    return LossTerms(inv + lambd * red, inv, red, diag)


def _terms_jit(z1, z2, lambd, mesh, axis):
    n = z1.shape[0]
    z1n, z2n = standardize(z1), standardize(z2)
    # C's columns sharded over the axis, as in "gather"; the partitioner picks collectives.
    c_sharding = NamedSharding(mesh, P(None, axis))
    if _is_explicit(mesh, axis):
        # Explicit axes: a contraction over the sharded batch must name its output sharding.
        c = jnp.einsum("nd,ne->de", z1n, z2n, precision=_HIGHEST, out_sharding=c_sharding)
    else:
        c = jnp.einsum("nd,ne->de", z1n, z2n, precision=_HIGHEST)
        c = jax.lax.with_sharding_constraint(c, c_sharding)
    c = c / n
    inv, red, diag = _terms_from_block(c)
    return LossTerms(inv + lambd * red, inv, red, diag)


# --- gram ----------------------------------------------------------------------------------


@jax.custom_jvp
def _gram(z):
    """z z^T in float32 at HIGHEST precision."""
    return jnp.dot(z, z.T, precision=_HIGHEST)


@_gram.defjvp
def _gram_jvp(primals, tangents):
    (z,), (dz,) = primals, tangents
    # d(z z^T) = t + t^T with t = dz z^T: its transpose is the single matmul (g + g^T) z,
    # where autodiff of dz z^T + z dz^T emits two.
    t = jnp.dot(dz, z.T, precision=_HIGHEST)
    return _gram(z), t + t.T


def _terms_gram(z1n, z2n, *, n_global, lambd, axes=()):
    """Terms from every row of a block of columns of z1n, z2n; blocks summed over `axes`."""
    c_diag = jnp.sum(z1n * z2n, axis=0) / n_global  # C_ii of these columns
    inv = jnp.sum(jnp.square(1.0 - c_diag))
    diag_sq = jnp.sum(jnp.square(c_diag))
    diag = jnp.sum(c_diag)
    g1, g2 = _gram(z1n), _gram(z2n)  # partial [N, N] Grams over these columns
    if axes:
        pad = -n_global % jax.lax.axis_size(axes)  # zero rows add nothing to <G1, G2>
        g1, g2 = (
            jax.lax.psum_scatter(jnp.pad(g, ((0, pad), (0, 0))), axes, tiled=True) for g in (g1, g2)
        )
    frob = jnp.sum(g1 * g2) / n_global**2  # this device's share of sum_ij C_ij^2
    if axes:
        inv, frob, diag_sq, diag = jax.lax.psum((inv, frob, diag_sq, diag), axes)
    red = frob - diag_sq
    return LossTerms(inv + lambd * red, inv, red, diag)


def _terms_gram_local(z1_local, z2_local, *, n_global, lambd, data_axis, axes):
    # [N/Wd, D/M] -> [N, D/K]: every row, this device's block of columns.
    z1, z2 = (
        jax.lax.all_to_all(z, data_axis, split_axis=1, concat_axis=0, tiled=True)
        for z in (z1_local, z2_local)
    )
    return _terms_gram(standardize(z1), standardize(z2), n_global=n_global, lambd=lambd, axes=axes)


# --- costs and the choice of strategy --------------------------------------------------------


class Cost(NamedTuple):
    """Per device, value and gradient w.r.t. both views (see the module docstring)."""

    flops: float  # matmul FLOPs
    bytes: float  # float32 bytes sent by bandwidth-optimal collectives


def strategy_cost(strategy: str, n: int, d: int, data: int = 1, model: int = 1) -> Cost:
    """The closed-form cost of `strategy` at [N, D] on a data x model mesh."""
    k = data * model
    fw, fk = (data - 1) / data, (k - 1) / k
    if strategy == "gram":
        n_padded = n + (-n % k)
        return Cost(8 * n * n * d / k, 16 * (fw * n * d / k + fk * n_padded * n))
    if model > 1:
        raise ValueError(f"strategy {strategy!r} needs the features unsharded (model = 1)")
    collective_floats = {
        "gather": 2 * fw * (n + n / data) * d,
        "allreduce": 2 * fw * d * d,
        "jit": 3 * fw * d * d,
    }[strategy]
    return Cost(6 * n * d * d / data, 4 * collective_floats)


def _applies(strategy, d, data, model) -> bool:
    if strategy == "gram":
        return d % (data * model) == 0
    return model == 1 and (strategy != "gather" or d % data == 0)


def choose_strategy(n: int, d: int, data: int = 1, model: int = 1) -> str:
    """What "auto" picks: the applicable strategy of least FLOPs / FLOPS_PER_BYTE + bytes."""
    candidates = [s for s in ("gram", "allreduce", "gather") if _applies(s, d, data, model)]
    if not candidates:
        raise ValueError(
            f"no loss strategy splits D={d} features over the {data} x {model} devices of the "
            f"data x model mesh; use D divisible by {data * model}"
        )

    def estimated_time(strategy):
        cost = strategy_cost(strategy, n, d, data, model)
        return cost.flops / FLOPS_PER_BYTE + cost.bytes

    return min(candidates, key=estimated_time)


# --- the API -------------------------------------------------------------------------------


def _is_explicit(mesh, axis) -> bool:
    return mesh.axis_types[mesh.axis_names.index(axis)] == AxisType.Explicit


def _check_strategy(strategy) -> None:
    if strategy not in (*STRATEGIES, "auto"):
        raise ValueError(
            f"unknown loss strategy {strategy!r}; choose one of {(*STRATEGIES, 'auto')}"
        )


def resolve_strategy(
    strategy: str,
    n: int,
    d: int,
    mesh: jax.sharding.Mesh | None = None,
    *,
    axis: str = DATA_AXIS,
    model_axis: str = MODEL_AXIS,
) -> str:
    """The strategy that computes the loss of [N, D] embeddings on `mesh` ("auto" resolved),
    after checking it can split them there: a ValueError naming the fix otherwise.

    barlow_twins_terms calls it while tracing; the pretraining job calls it before it
    compiles anything.
    """
    _check_strategy(strategy)
    if mesh is None:
        return choose_strategy(n, d) if strategy == "auto" else strategy
    if axis not in mesh.axis_names:
        raise ValueError(f"the mesh has no axis {axis!r}; its axes are {mesh.axis_names}")
    data = mesh.shape[axis]
    model = mesh.shape[model_axis] if model_axis in mesh.axis_names else 1
    if n % data:
        raise ValueError(
            f"the global batch N={n} does not divide over the {data} devices of mesh "
            f"axis {axis!r}; use a batch size that is a multiple of {data}"
        )
    if strategy in C_FORMS and model > 1:
        raise ValueError(
            f"the {strategy!r} strategy forms C from whole rows of z, but mesh axis "
            f"{model_axis!r} shards the features over {model} devices; use strategy='gram' "
            "or 'auto'"
        )
    if strategy == "gather" and d % data:
        raise ValueError(
            f"the 'gather' strategy splits the D={d} features into {data} column blocks; "
            f"use D divisible by {data} or strategy='allreduce'"
        )
    if strategy == "gram" and d % (data * model):
        raise ValueError(
            f"the 'gram' strategy splits the D={d} features over the {data} x {model} devices "
            f"of mesh axes {axis!r} x {model_axis!r}; use D divisible by {data * model}"
            + (" or strategy='allreduce'" if model == 1 else "")
        )
    return choose_strategy(n, d, data, model) if strategy == "auto" else strategy


def barlow_twins_terms(
    z1: jax.Array,
    z2: jax.Array,
    *,
    lambd: float = LAMBD,
    mesh: jax.sharding.Mesh | None = None,
    strategy: str = "gather",
    axis: str = DATA_AXIS,
    model_axis: str = MODEL_AXIS,
) -> LossTerms:
    """Loss, invariance and redundancy terms and trace(C); see LossTerms, barlow_twins_loss."""
    _check_pair(z1, z2)
    n, d = z1.shape
    strategy = resolve_strategy(strategy, n, d, mesh, axis=axis, model_axis=model_axis)
    if mesh is None:
        if strategy == "gram":
            return _terms_gram(standardize(z1), standardize(z2), n_global=n, lambd=lambd)
        return _terms_c_single(z1, z2, lambd)
    if strategy == "jit":
        return _terms_jit(z1, z2, lambd, mesh, axis)
    if strategy == "gram":
        axes = (axis, model_axis) if model_axis in mesh.axis_names else (axis,)
        spec = P(*axes)
        local_fn = lambda a, b: _terms_gram_local(
            a, b, n_global=n, lambd=lambd, data_axis=axis, axes=axes
        )
    else:
        axes, spec = (axis,), P(axis, None)
        local = _terms_gather_local if strategy == "gather" else _terms_allreduce_local
        local_fn = lambda a, b: local(a, b, n_global=n, lambd=lambd, axis=axis)
    if all(_is_explicit(mesh, a) for a in axes):
        # Explicit axes: shard_map takes z only in its in_specs' sharding (a local slice here
        # when z arrives replicated or as P("data", None)).
        z1, z2 = (jax.sharding.reshard(z, NamedSharding(mesh, spec)) for z in (z1, z2))
    sharded = jax.shard_map(
        local_fn, mesh=mesh, in_specs=(spec, spec), out_specs=P(), axis_names=set(axes)
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
    model_axis: str = MODEL_AXIS,
) -> jax.Array:
    """sum_i (1 - C_ii)^2 + lambd * sum_{i!=j} C_ij^2 over the global batch, float32 scalar.

    Args:
      z1, z2: [N, D] embeddings of the two views (any float dtype).
      lambd: weight of the redundancy-reduction term (paper: 0.0051).
      mesh: when given, z1 and z2 are global arrays sharded P(axis, model_axis) (or
        P(axis, None)) on this mesh and the loss is computed with `strategy`; the value and
        gradient equal the unsharded ones.
      strategy: "gram", "gather", "allreduce", "jit" or "auto" (see the module docstring).
        Without a mesh the three C forms are one computation, "gram" the other, and "auto"
        picks between them.
      axis: the mesh axis that shards the batch.
      model_axis: the mesh axis that shards the features, used when the mesh has it.
    """
    return barlow_twins_terms(
        z1, z2, lambd=lambd, mesh=mesh, strategy=strategy, axis=axis, model_axis=model_axis
    ).loss
