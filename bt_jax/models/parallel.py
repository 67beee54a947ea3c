"""How the twin model lies on a ("data", "model") device mesh.

- Backbone: data-parallel over every device. Its variables are replicated and the batch is
  sharded over both axes, P(("data", "model")): each of the K = Wd x M devices computes the
  ResNet on its K-th of the batch (BN statistics over the global batch, as on one device).
- Projector: tensor-parallel over "model", every Dense column-sharded. A kernel [in, out]
  is P(None, "model"): each device holds out / M columns and computes them for the rows of
  its "data" slice, after its input is all-gathered over "model" (P("data", None)). The BN
  that follows normalises features that are whole on their device, so it stays local (its
  statistics are the batch's: a psum over "data") and its scale, bias, running mean and
  running var are P("model") too. The last Dense leaves z as P("data", "model"): the
  layout of the gram loss (bt_jax/losses.py), so no device gathers D.
- LARS momentum follows its parameter. Trust ratios use whole-parameter norms: the arrays
  are global, so ||p|| of a sharded kernel is a psum of the shards' partial sums.

Why every layer column-sharded (bench/scaling.py, docs/benchmarks.md "Projector layouts";
ResNet-50 + projector 8192-8192-32768, 4 images per device on 8 devices, M = 8): the
sharded weights, their gradients and momentum are P / M per device in every layout, so the
choice is about what else moves and is held.
- FSDP (kernels sharded, all-gathered for each use, the batch over all devices) moves every
  weight per step: an all-gather forward, again backward, a reduce-scatter of its gradient:
  ~3 x 4 P bytes per device, 3.5 GiB here, independent of the batch; and holds the whole
  gathered kernel (1 GiB for 8192 x 32768) as a temporary.
- Tensor-parallel layers move activations instead: rows x width, where rows = 2 x batch /
  Wd per device, a few hundred MiB even at a pod's per-chip batch: column-sharded layers
  all-gather each layer's input forward and reduce-scatter its gradient backward.
- Megatron's column-then-row pairing replaces the middle all-gather and reduce-scatter by an
  all-reduce of the same bytes, but leaves the middle BN on replicated features (computed
  M times, its parameters and statistics replicated) and a row-sharded kernel's gradient
  for the next layer's input. Column everywhere is as cheap in bytes, needs one rule for
  every layer and keeps every BN local.
The weight-gradient all-reduce of a sharded kernel runs over "data" only (Wd devices) and
carries P / M: both factors shrink with M.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bt_jax.distributed import MODEL_AXIS, has_model_axis

PROJECTOR = "projector"  # the twin model's submodule whose variables are sharded


def layer_input(x: jax.Array) -> jax.Array:
    """A column-sharded Dense's input [rows, features]: every feature of the rows of its
    "data" slice, i.e. "model" dropped from both axes' shardings (an all-gather over
    "model" of the backbone's output or of the previous layer's columns). Unchanged off a
    data x model mesh, and when x is replicated (as in init)."""
    sharding = jax.typeof(x).sharding
    if not has_model_axis(sharding.mesh):
        return x
    rows = sharding.spec[0] if sharding.spec else None
    rows = tuple(a for a in (rows if isinstance(rows, tuple) else (rows,)) if a != MODEL_AXIS)
    spec = P(rows[0] if len(rows) == 1 else rows or None, None)
    return jax.sharding.reshard(x, NamedSharding(sharding.mesh, spec))


def column_sharded(init):
    """A kernel initializer whose [in, out] kernel is created column-sharded when traced
    under a data x model mesh (jax.set_mesh), so that init's forward pass computes on the
    shards. Its bits come from a threefry key derived from the given one: XLA partitions
    threefry (each device draws only its columns) but not the RBG keys that
    pretrain.init_state uses for the backbone, which would make every device draw each
    whole kernel (8 GiB of temporaries at 32768-32768-32768). The values are a function of
    the key alone, the same on every mesh."""

    def init_kernel(key, shape, dtype=jnp.float32):
        bits = jax.random.bits(key, (2,), jnp.uint32)
        key = jax.random.wrap_key_data(bits, impl="threefry2x32")
        if has_model_axis(jax.sharding.get_abstract_mesh()):
            return init(key, shape, dtype, out_sharding=P(None, MODEL_AXIS))
        return init(key, shape, dtype)

    return init_kernel


def variable_spec(path, leaf, mesh) -> P:
    """The PartitionSpec of a leaf of the train state, from its tree path.

    Leaves under a "projector" key (the projector's variables and every optimizer slot that
    mirrors them) are sharded over "model" along their last axis (a kernel's columns, a
    BN vector's features); everything else, whatever new fields the state grows, is
    replicated.
    """
    if not has_model_axis(mesh) or leaf.ndim == 0:
        return P()
    if any(getattr(key, "key", None) == PROJECTOR for key in path):
        return P(*([None] * (leaf.ndim - 1)), MODEL_AXIS)
    return P()


def state_shardings(tree, mesh):
    """NamedShardings of every leaf of `tree` (arrays or ShapeDtypeStructs) by variable_spec."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, variable_spec(path, leaf, mesh)), tree
    )
