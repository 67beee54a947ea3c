r"""How the cost of a step grows with the projector width D, the batch N and the devices W.

Nothing runs: every figure comes from XLA's compiled programs on W CPU devices (default 8),
which are exact and hardware-independent for FLOPs, bytes and collectives.

1. The loss alone: value_and_grad of losses.barlow_twins_loss on [N, D] float32 embeddings
   sharded along "data", for each strategy (gram, gather, allreduce, jit) and the
   single-device reference, for D in {2048, 8192, 16384, 32768} and N in {256, 2048, 8192},
   and gram alone at the paper's N = 2048 with D = 65,536 (a C form's D x D would be 16 GiB
   per device there): per-device
   FLOPs, compiled memory (arguments, temporaries, outputs) and the collectives in the
   optimised HLO (all-reduce, all-gather, all-to-all, reduce-scatter, collective-permute)
   with their bytes per device, next to the closed-form expectations.
2. The whole train step (bt_jax.pretrain.train_step): ResNet-50 + projector D-D-D and
   8192-8192-D, D in {8192, 16384, 32768, 65536}, at 224 px, bfloat16 compute as
   configs/imagenet.py, 4 images per device, LARS state, on a (W / M) x M data x model mesh,
   M in {1, 2, 4, 8} (the projector's state sharded over M): per-device FLOPs, memory
   (arguments = params + LARS momentum, temporaries), collective bytes, with the gram loss
   and the gather C form (M = 1 only: a C form needs whole rows of z). The table lists
   every step entry in --json compiled with the same backbone, so runs restricted to a few
   points add up.
3. A labelled estimate for a TPU v4-128 pod (64 chips) and 32 x A100 at the paper's batch
   2048, from the per-image FLOPs and bytes measured in 2 plus the loss's in 1.

  python bench/scaling.py                  # everything (35 ResNet-50 compiles)
  python bench/scaling.py --quick          # D in {2048, 8192}, N = 2048, three step compiles
  python bench/scaling.py --step_projectors 8192-8192-D --step_dims 65536 --models 8

Results are cached in --json (default bench/results/scaling.json): an entry already there
is reused unless --force.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DIMS = (2048, 8192, 16384, 32768)
STEP_DIMS = "8192,16384,32768,65536"
BATCHES = (256, 2048, 8192)
STRATEGIES = ("gram", "gather", "allreduce", "jit")
WIDE_LOSS = (2048, 65536)  # (N, D) of the gram-only loss point
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")
DEFAULT_JSON = os.path.join(common.RESULTS_DIR, "scaling.json")

# Labelled assumptions of the pod estimate (public spec sheets; dense bf16 peaks).
HARDWARE = {
    "TPU v4-128 (64 chips)": dict(
        chips=64,
        peak_flops=275e12,
        hbm_gib=32,
        allreduce_gbps=300.0,
        note="all-reduce bus bandwidth on the ICI 3D torus",
    ),
    "32 x A100-40GB (4 nodes x 8)": dict(
        chips=32,
        peak_flops=312e12,
        hbm_gib=40,
        allreduce_gbps=100.0,
        note="all-reduce bus bandwidth across DGX A100 nodes, 8 x 200 Gb/s HDR InfiniBand each",
    ),
}
# Model FLOP utilisation assumed for the estimate: what good ResNet-50 training reaches
# (supervised ResNet-50 at ~2,500 images/s on an A100 is ~20 % of its bf16 peak).
ASSUMED_MFU = 0.35


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="a reduced set (a few minutes)")
    p.add_argument("--dims", default=None, help="comma list of D (default: 2048,...,32768)")
    p.add_argument("--batches", default=None, help="comma list of global N for the loss")
    p.add_argument(
        "--device_counts", default="2,4", help="also the loss at N=2048, D=8192 on these W"
    )
    p.add_argument(
        "--step_projectors",
        default=None,
        help="projector templates of the whole step, D = each of --step_dims (D-D-D,8192-8192-D)",
    )
    p.add_argument("--step_dims", default=None, help="D of the whole step (8192,...,65536)")
    p.add_argument("--models", default=None, help="model-axis sizes M of the step (1,2,4,8)")
    p.add_argument(
        "--step_strategies", default="gram,gather", help="losses (C forms at M = 1 only)"
    )
    p.add_argument("--per_device_batch", type=int, default=4, help="whole-step batch per device")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--width", type=float, default=1.0, help="backbone width multiplier")
    p.add_argument("--stage_sizes", default="", help="blocks per stage, e.g. 1,1 (toy)")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--no_step", action="store_true", help="only the loss (seconds, no ResNet)")
    p.add_argument("--json", default=DEFAULT_JSON)
    p.add_argument("--force", action="store_true", help="recompile entries already in --json")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- HLO parsing

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
    "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
}  # fmt: skip
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\("
)
_GROUPS = re.compile(r"replica_groups=\{\{([0-9,]+)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")


def _shapes_bytes(text: str) -> list[int]:
    """Bytes of every array shape written in `text` (a shape or a tuple of shapes)."""
    sizes = []
    for dtype, dims in _SHAPE.findall(text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        sizes.append(n * _DTYPE_BYTES[dtype])
    return sizes


def _shape_bytes(text: str) -> int:
    return sum(_shapes_bytes(text))


def _group_size(line: str, default: int) -> int:
    m = _GROUPS.search(line)
    if m:
        return len(m.group(1).split(","))
    m = _MESH_GROUPS.search(line)
    if m:  # mesh['axis_0'=1,'axis_1'=8] {'axis_1'}: the product of the named axes
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        size = 1
        for name in re.findall(r"'([^']+)'", m.group(2)):
            size *= int(sizes.get(name, 1))
        return size
    return default


def collectives(hlo_text: str, devices: int) -> dict:
    """Collective ops of an optimised HLO module and their bytes per device.

    payload: the bytes of the (larger of) operand and result of each op, per device: the
      N x D of an all-gather result, the D x D of an all-reduce.
    ring: the bytes each device sends with bandwidth-optimal algorithms over a group of G:
      all-reduce 2 (G-1)/G S; all-gather and reduce-scatter (G-1)/G of the gathered size;
      all-to-all (G-1)/G S; collective-permute S.
    """
    ops = {k: {"count": 0, "payload_bytes": 0, "ring_bytes": 0.0} for k in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        result_text, kind = m.group(1), m.group(2)
        size = _shape_bytes(result_text)
        if m.group(3):  # async all-gather/reduce-scatter/permute-start: (operand, result, ...)
            sizes = _shapes_bytes(result_text)
            if kind == "all-gather":
                size = max(sizes)
            elif kind == "reduce-scatter":
                size = min(sizes)
            elif kind == "collective-permute":
                size = sizes[0]
        g = _group_size(line, devices)
        if kind == "reduce-scatter":
            full = size * g  # operand: the unscattered array
            ring = (g - 1) / g * full
        elif kind == "all-gather":
            full = size
            ring = (g - 1) / g * full
        elif kind == "all-reduce":
            full = size
            ring = 2 * (g - 1) / g * size
        elif kind == "all-to-all":
            full = size
            ring = (g - 1) / g * size
        else:
            full = size
            ring = float(size)
        ops[kind]["count"] += 1
        ops[kind]["payload_bytes"] += full
        ops[kind]["ring_bytes"] += ring
    used = {k: v for k, v in ops.items() if v["count"]}
    return {
        "ops": used,
        "payload_bytes": sum(v["payload_bytes"] for v in used.values()),
        "ring_bytes": sum(v["ring_bytes"] for v in used.values()),
    }


def weight_gradient_allreduce(hlo_text: str, weight_shapes: list[tuple[int, ...]]) -> dict:
    """The all-reduce bytes of the weight gradients in an optimised HLO module.

    Counted: every all-reduce operand shaped like a weight (ndim >= 2: conv and dense
    kernels; in any axis order, since XLA may reduce a dense gradient as [out, in] before
    transposing it), in the all-reduces the SPMD partitioner inserted (the loss's own shard_map
    collectives, such as the allreduce strategy's D x D C, are left out by their op_name).
    One reduction per weight and step moves 4 bytes x weights in float32; a model that
    applies its weights in two batch-sharded calls (one per view) reduces each twice.
    BN scales and biases (1-D) are not counted: XLA derives their gradients from the BN
    backward's own per-channel sums, so they have no all-reduce of their own to find.
    """
    wanted = collections.Counter(tuple(sorted(s)) for s in weight_shapes if len(s) >= 2)
    found, payload = collections.Counter(), 0
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if not m or m.group(2) != "all-reduce":
            continue
        name = _OP_NAME.search(line)
        parts = name.group(1).split(":") if name else []
        if parts and all("shard_map" in part for part in parts):
            continue
        for dtype, dims in _SHAPE.findall(m.group(1)):
            shape = tuple(sorted(int(d) for d in filter(None, dims.split(","))))
            if shape in wanted and dtype in _DTYPE_BYTES:
                found[shape] += 1
                payload += math.prod(shape) * _DTYPE_BYTES[dtype]
    weights = sum(wanted.values())
    elements = sum(math.prod(s) * k for s, k in wanted.items())
    return {
        "payload_bytes": payload,
        "weight_elements": elements,
        "float32_bytes_once": 4 * elements,
        "reductions_per_weight": sum(found.values()) / weights if weights else 0.0,
    }


def analyse(compiled, devices: int, compile_seconds: float) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0]
    mem = compiled.memory_analysis()
    return {
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "memory": {
            "arguments": int(mem.argument_size_in_bytes),
            "temporaries": int(mem.temp_size_in_bytes),
            "outputs": int(mem.output_size_in_bytes),
            "aliased": int(mem.alias_size_in_bytes),
            "peak_estimate": int(
                mem.argument_size_in_bytes
                + mem.temp_size_in_bytes
                + mem.output_size_in_bytes
                - mem.alias_size_in_bytes
            ),
        },
        "collectives": collectives(compiled.as_text(), devices),
        "compile_seconds": round(compile_seconds, 2),
    }


# ------------------------------------------------------------------------- the loss alone


def loss_entry(n: int, d: int, strategy: str, mesh) -> dict:
    """value_and_grad of the loss w.r.t. both views; strategy "single" = one device."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from bt_jax import losses

    if strategy == "single":
        z = jax.ShapeDtypeStruct((n, d), jnp.float32)
        fn = lambda a, b: losses.barlow_twins_loss(a, b)
        devices = 1
    else:
        z = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=NamedSharding(mesh, P("data")))
        fn = lambda a, b: losses.barlow_twins_loss(a, b, mesh=mesh, strategy=strategy)
        devices = mesh.devices.size
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.lower(z, z).compile()
    out = analyse(compiled, devices, time.perf_counter() - t0)
    out.update(n=n, d=d, strategy=strategy, devices=devices)
    return out


def loss_formulas(n: int, d: int, w: int) -> dict:
    """Closed-form expectations, float32 (4 bytes), per device."""
    return {
        # matmul FLOPs: forward C (2 N D^2) + both gradients (2 x 2 N D^2) = 6 N D^2
        "single_matmul_flops": 6 * n * d * d,
        "gather_fwd_payload": (n + n // w) * d * 4,  # all-gather z1n + all-to-all z2n
        "gather_fwd_bwd_payload": 2 * (n + n // w) * d * 4,  # + reduce-scatter + all-to-all
        "allreduce_payload": d * d * 4,  # psum of the partial D x D C
        "allreduce_ring": 2 * (w - 1) / w * d * d * 4,
    }


# ---------------------------------------------------------------------- the whole step


def step_config(projector: str, strategy: str, per_device_batch: int, args, devices: int):
    """configs/imagenet.py with the bench's backbone, projector, loss and batch."""
    from configs import imagenet

    config = imagenet.get_config()
    config.model.arch = args.arch
    config.model.width = args.width
    config.model.stage_sizes = tuple(int(k) for k in args.stage_sizes.split(",") if k)
    config.model.projector = projector
    config.loss.strategy = strategy
    config.train.global_batch = per_device_batch * devices
    return config


def compile_step(config, model, state, mesh, image_size: int) -> dict:
    """The train step compiled for the abstract `state` on `mesh`, analysed: FLOPs, memory,
    collectives, the weight-gradient all-reduce (counted on each kernel's shard shape)."""
    import jax
    import jax.numpy as jnp

    from bt_jax import distributed, optim, pretrain

    n = config.train.global_batch
    rows = distributed.batch_sharded(mesh)
    image = jax.ShapeDtypeStruct((n, image_size, image_size, 3), jnp.uint8, sharding=rows)
    batch = {"view1": image, "view2": image}
    if config.augment.get("pixel_ops", "host") == "device":
        # the host sends each view's random draws; the step finishes the views on the device
        # (float32[13] per view: bt_jax.data.augment.pack_device_params)
        ops = jax.ShapeDtypeStruct((n, 13), jnp.float32, sharding=rows)
        batch.update(view1_ops=ops, view2_ops=ops)
    tx, _ = optim.make_optimizer(config.optim, global_batch=n, warmup_steps=10, total_steps=1000)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        options = pretrain.step_options(config, model, tx, mesh)
        compiled = pretrain.train_step.lower(state, batch, **options).compile()
    out = analyse(compiled, mesh.devices.size, time.perf_counter() - t0)
    shard_shapes = [x.sharding.shard_shape(x.shape) for x in jax.tree.leaves(state.params)]
    out["weight_gradient_allreduce"] = weight_gradient_allreduce(compiled.as_text(), shard_shapes)
    count = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))  # noqa: E731
    out.update(
        devices=mesh.devices.size,
        mesh=dict(mesh.shape),
        global_batch=n,
        dtype=config.model.dtype,
        pixel_ops=config.augment.get("pixel_ops", "host"),
        params_backbone=count(state.params["backbone"]),
        params_projector=count(state.params["projector"]),
        opt_state_bytes=int(
            sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))
        ),
    )
    return out


def step_entry(projector: str, strategy: str, model_axis: int, per_device_batch: int, args) -> dict:
    """The whole train step with the library's layout: the projector's state sharded over a
    model axis of model_axis (1 = replicated), and the compiled init that creates it."""
    import jax

    from bt_jax import distributed, models, optim, pretrain

    config = step_config(projector, strategy, per_device_batch, args, args.devices)
    mesh = distributed.make_mesh(args.devices, model=model_axis)
    model = models.build_model(config.model)
    tx, _ = optim.make_optimizer(
        config.optim, global_batch=config.train.global_batch, warmup_steps=10, total_steps=1000
    )
    with jax.set_mesh(mesh):
        init, state = pretrain.sharded_init(model, tx, config, args.image_size, mesh)
        init_memory = init.lower().compile().memory_analysis()
    out = compile_step(config, model, state, mesh, args.image_size)
    out.update(
        projector=projector,
        d=models.parse_projector(projector)[-1],
        strategy=strategy,
        model=model_axis,
        layout="columns",
        per_device_batch=per_device_batch,
        arch=args.arch,
        image_size=args.image_size,
        backbone_features=model.backbone.num_features,
        init_memory={
            "temporaries": int(init_memory.temp_size_in_bytes),
            "outputs": int(init_memory.output_size_in_bytes),
        },
    )
    return out


def tensor_parallel_ring_bytes(widths, rows: int, model_axis: int, act_bytes: int = 2) -> float:
    """Ring bytes per device of the column-sharded projector's activations: each layer's
    input [rows, width] all-gathered over "model" forward and its gradient reduce-scattered
    backward, (M - 1) / M of it each way, in the compute dtype (bf16)."""
    if model_axis == 1:
        return 0.0
    return 2 * (model_axis - 1) / model_axis * rows * sum(widths) * act_bytes


def step_formula(e: dict, n: int | None = None, chips: int | None = None) -> dict:
    """Ring bytes and state bytes per device of entry e's layout at global batch n on
    `chips` devices (default: as compiled), from closed forms: the gradient all-reduces
    (backbone over every device, the projector's 1/M shards over the data axis), the
    tensor-parallel activations and the loss (losses.strategy_cost)."""
    from bt_jax import losses
    from bt_jax.models import parse_projector

    n = n or e["global_batch"]
    k = chips or e["devices"]
    m = e["model"]
    wd = k // m
    widths = parse_projector(e["projector"])
    inputs = [e["backbone_features"], *widths[:-1]]
    rows = 2 * n // wd  # both views of the data slice's examples
    grads = 2 * (k - 1) / k * 4 * e["params_backbone"]
    grads += 2 * (wd - 1) / wd * 4 * e["params_projector"] / m
    loss = losses.strategy_cost(e["strategy"], n, widths[-1], wd, m).bytes
    activations = tensor_parallel_ring_bytes(inputs, rows, m)
    return {
        "gradient_ring_bytes": grads,
        "activation_ring_bytes": activations,
        "loss_ring_bytes": loss,
        "ring_bytes": grads + activations + loss,
        # float32 params + LARS momentum + the gradient (a transient of the same size)
        "state_bytes": 3 * 4 * (e["params_backbone"] + e["params_projector"] / m),
    }


# ----------------------------------------------------------------------------- reporting


def _key(**kw) -> str:
    return json.dumps(kw, sort_keys=True)


def _mib(b) -> float:
    return b / 2**20


def loss_table(entries: list[dict], w: int) -> str:
    rows = []
    for e in sorted(
        entries, key=lambda e: (e["n"], e["d"], e["strategy"] != "single", e["strategy"])
    ):
        f = loss_formulas(e["n"], e["d"], w)
        single = next(
            (x for x in entries if (x["n"], x["d"], x["strategy"]) == (e["n"], e["d"], "single")),
            None,
        )
        ratio = e["flops"] / single["flops"] if single else float("nan")
        expect = {
            "gather": f["gather_fwd_bwd_payload"],
            "allreduce": f["allreduce_payload"],
        }.get(e["strategy"])
        c = e["collectives"]
        rows.append(
            [
                e["n"], e["d"], e["strategy"], e["devices"],
                e["flops"] / 1e9, ratio,
                _mib(e["memory"]["temporaries"]),
                _mib(c["payload_bytes"]),
                _mib(expect) if expect is not None else "-",
                _mib(c["ring_bytes"]),
                ", ".join(f"{k} x{v['count']}" for k, v in c["ops"].items()) or "-",
            ]
        )  # fmt: skip
    return common.table(
        rows,
        [
            "N", "D", "strategy", "dev", "GFLOP/dev", "vs 1 dev", "temp MiB/dev",
            "coll. payload MiB/dev", "formula MiB", "ring MiB/dev", "ops",
        ],
    )  # fmt: skip


def devices_table(entries: list[dict], loss_entries: list[dict]) -> str:
    single = next(
        (e for e in loss_entries if (e["n"], e["d"], e["strategy"]) == (2048, 8192, "single")),
        None,
    )
    rows = []
    for e in sorted(entries, key=lambda e: (e["strategy"], e["devices"])):
        k = e["devices"]
        f = loss_formulas(e["n"], e["d"], k)
        expect = (
            f["gather_fwd_bwd_payload"] if e["strategy"] == "gather" else f["allreduce_payload"]
        )
        rows.append(
            [
                e["strategy"], k, e["flops"] / 1e9,
                e["flops"] / single["flops"] if single else "-", 1 / k,
                _mib(e["collectives"]["payload_bytes"]), _mib(expect),
                _mib(e["collectives"]["ring_bytes"]), _mib(e["memory"]["temporaries"]),
            ]
        )  # fmt: skip
    return common.table(
        rows,
        [
            "strategy", "W", "GFLOP/dev", "vs 1 dev", "1/W", "payload MiB/dev",
            "formula MiB", "ring MiB/dev", "temp MiB/dev",
        ],
    )  # fmt: skip


def step_table(entries: list[dict]) -> str:
    rows = []
    order = lambda e: (e["projector"].count("8192-8192-") == 0, e["d"], e["model"], e["strategy"])  # noqa: E731
    for e in sorted(entries, key=order):
        m, c = e["memory"], e["collectives"]
        g = e["weight_gradient_allreduce"]
        ring = lambda kind, c=c: _mib(c["ops"].get(kind, {}).get("ring_bytes", 0.0))  # noqa: E731
        rows.append(
            [
                e["projector"], e["strategy"], f"{e['mesh'].get('data', 1)} x {e['model']}",
                (e["params_backbone"] + e["params_projector"]) / 1e6,
                e["flops"] / 1e9 / e["per_device_batch"],
                _mib(m["arguments"]), _mib(m["temporaries"]),
                (m["arguments"] + m["temporaries"]) / 2**30,
                _mib(e["init_memory"]["temporaries"]),
                _mib(c["ring_bytes"]), _mib(step_formula(e)["ring_bytes"]),
                ring("all-reduce"), ring("all-gather"), ring("reduce-scatter"), ring("all-to-all"),
                _mib(g["payload_bytes"]), g["reductions_per_weight"],
                round(e["compile_seconds"]),
            ]
        )  # fmt: skip
    return common.table(
        rows,
        [
            "projector", "loss", "mesh", "params M", "GFLOP/pair", "args MiB", "temp MiB",
            "args+temp GiB", "init temp MiB", "ring MiB", "formula ring MiB", "all-reduce",
            "all-gather", "reduce-scatter", "all-to-all", "weight-grad all-reduce MiB",
            "reductions/weight", "compile s",
        ],
    )  # fmt: skip


def pod_estimate(step_entries: list[dict], n: int = 2048) -> list[dict]:
    """Labelled estimate at global batch n on the HARDWARE above, for every layout measured
    at model = 1 and at the largest model axis.

    Per-chip FLOPs: the whole step's per-device FLOPs as compiled, minus its loss
    (losses.strategy_cost at the compiled N), per image pair, x the per-chip batch, plus the
    loss at (n, D) on the pod's data x model mesh (strategy_cost: it falls as 1/chips). The
    LARS update is inside the per-pair term, spread over the compiled 4 pairs per device:
    an overstatement at large D.
    Communication per chip, ring algorithms: step_formula at (n, chips) (gradient
    all-reduces, tensor-parallel activations, the loss), the closed form that matches the
    compiled HLO's ring bytes in the step table.
    """
    from bt_jax import losses

    largest = max((e["model"] for e in step_entries), default=1)
    out = []
    for e in sorted(step_entries, key=lambda e: (e["projector"], e["model"], e["strategy"])):
        if e["model"] not in (1, largest):
            continue
        b, m, d = e["per_device_batch"], e["model"], e["d"]
        wd_compiled = e["devices"] // m
        compiled_loss = losses.strategy_cost(e["strategy"], b * e["devices"], d, wd_compiled, m)
        per_pair = (e["flops"] - compiled_loss.flops) / b
        for name, hw in HARDWARE.items():
            chips = hw["chips"]
            per_chip_batch = n / chips
            loss = losses.strategy_cost(e["strategy"], n, d, chips // m, m)
            flops = per_pair * per_chip_batch + loss.flops
            compute_s = flops / (hw["peak_flops"] * ASSUMED_MFU)
            formula = step_formula(e, n, chips)
            comm_s = formula["ring_bytes"] / (hw["allreduce_gbps"] * 1e9)
            step_s = max(compute_s, comm_s)  # compute and communication assumed to overlap
            out.append(
                dict(
                    hardware=name,
                    projector=e["projector"],
                    strategy=e["strategy"],
                    model=m,
                    global_batch=n,
                    per_chip_batch=per_chip_batch,
                    gflop_per_pair=per_pair / 1e9,
                    gflop_per_chip_step=flops / 1e9,
                    loss_share=loss.flops / flops,
                    compute_ms=1e3 * compute_s,
                    comm_ms=1e3 * comm_s,
                    comm_gradients_ms=1e3
                    * formula["gradient_ring_bytes"]
                    / (hw["allreduce_gbps"] * 1e9),
                    pairs_per_s_per_chip=per_chip_batch / step_s,
                    state_gib=formula["state_bytes"] / 2**30,
                    hbm_gib=hw["hbm_gib"],
                    assumptions=(
                        f"{hw['peak_flops'] / 1e12:.0f} TFLOP/s bf16 peak x {ASSUMED_MFU:.0%} "
                        f"MFU; {hw['allreduce_gbps']:.0f} GB/s per chip for collectives "
                        f"({hw['note']}); compute and communication overlapped"
                    ),
                )
            )
    return out


def pod_table(estimate: list[dict]) -> str:
    return common.table(
        [
            [
                x["hardware"], x["projector"], x["strategy"], x["model"], x["per_chip_batch"],
                x["gflop_per_chip_step"], x["loss_share"], x["compute_ms"], x["comm_ms"],
                x["comm_gradients_ms"], x["pairs_per_s_per_chip"], x["state_gib"],
            ]
            for x in estimate
        ],
        [
            "hardware", "projector", "loss", "M", "batch/chip", "GFLOP/chip/step",
            "loss share", "compute ms", "comm ms", "of which gradients ms", "pairs/s/chip",
            "state GiB/chip",
        ],
    )  # fmt: skip


def step_points(args) -> list[tuple[str, str, int]]:
    """(projector, strategy, model axis) of every whole-step compile asked for: every
    projector template at every D and model axis with gram, the C forms at model = 1."""
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    strategies = [s for s in args.step_strategies.split(",") if s]
    points = []
    for template in args.step_projectors.split(","):
        for d in ints(args.step_dims):
            projector = template.replace("D", str(d))
            for model_axis in ints(args.models):
                for strategy in strategies:
                    if model_axis > 1 and strategy != "gram":
                        continue  # the C forms need whole rows of z
                    if (projector, strategy, model_axis) not in points:
                        points.append((projector, strategy, model_axis))
    return points


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.set_devices(args.devices)
    import jax

    from bt_jax import distributed

    if jax.device_count() < args.devices:
        sys.exit(f"scaling: asked for {args.devices} devices, jax has {jax.device_count()}")
    mesh = distributed.make_mesh(args.devices)
    w = args.devices

    quick = dict(step_projectors="D-D-D", step_dims="8192", models="1,8")
    full = dict(step_projectors="D-D-D,8192-8192-D", step_dims=STEP_DIMS, models="1,2,4,8")
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    ints = lambda s: [int(x) for x in s.split(",")] if s else None
    dims = ints(args.dims) or ([2048, 8192] if args.quick else list(DIMS))
    batches = ints(args.batches) or ([2048] if args.quick else list(BATCHES))

    cache = {}
    if os.path.exists(args.json) and not args.force:
        with open(args.json) as f:
            old = json.load(f)
        for e in old.get("loss", []) + old.get("step", []):
            cache[e["key"]] = e

    def cached(key, fn):
        if key in cache:
            return cache[key]
        entry = fn()
        entry["key"] = key
        cache[key] = entry
        save_cache()  # a long run keeps what it compiled even if stopped
        return entry

    def save_cache():
        if not args.json:
            return
        entries = list(cache.values())
        common.write_json(
            args.json,
            common.envelope(
                devices=w,
                loss=[e for e in entries if '"kind": "loss"' in e["key"]],
                step=[e for e in entries if '"kind": "step"' in e["key"]],
            ),
            quiet=True,
        )

    loss_entries = []
    pb = args.per_device_batch
    loss_points = {(n, d) for n in batches for d in dims}
    if args.dims is None and not args.quick:
        loss_points.add(WIDE_LOSS)
    for n, d in sorted(loss_points):
        for strategy in ("single", *STRATEGIES):
            if strategy == "single" and n * d * d > 2048 * 32768**2:
                continue  # the one-device reference only where it compiles quickly
            if (n, d) == WIDE_LOSS and strategy != "gram":
                continue
            devs = 1 if strategy == "single" else w
            key = _key(kind="loss", n=n, d=d, strategy=strategy, devices=devs)
            print(f"loss N={n} D={d} {strategy} ...", flush=True)
            entry = cached(key, functools.partial(loss_entry, n, d, strategy, mesh))
            loss_entries.append({**entry, "kind": "loss"})

    # How the loss's cost per device falls with the device count at the paper's N and D.
    device_entries = []
    counts = [k for k in ints(args.device_counts) or [] if 1 < k <= jax.device_count()]
    for k in sorted(set(counts) | {w}) if counts else []:
        sub_mesh = distributed.make_mesh(k)
        for strategy in ("gather", "allreduce"):
            key = _key(kind="loss", n=2048, d=8192, strategy=strategy, devices=k)
            print(f"loss N=2048 D=8192 {strategy} on {k} devices ...", flush=True)
            entry = cached(key, functools.partial(loss_entry, 2048, 8192, strategy, sub_mesh))
            device_entries.append({**entry, "kind": "loss"})

    step_entries = []
    if not args.no_step:
        backbone = dict(
            kind="step", arch=args.arch, devices=w, per_device_batch=pb,
            image_size=args.image_size, width=args.width, stage_sizes=args.stage_sizes,
        )  # fmt: skip
        for projector, strategy, model_axis in step_points(args):
            key = _key(**backbone, projector=projector, strategy=strategy, model=model_axis)
            print(f"train step {args.arch} {projector} {strategy} M={model_axis} ...", flush=True)
            cached(key, functools.partial(step_entry, projector, strategy, model_axis, pb, args))
        # every step compiled with this backbone, in this run or an earlier one
        step_entries = [
            {**e, "kind": "step"}
            for key, e in cache.items()
            if all(json.loads(key).get(k) == v for k, v in backbone.items())
        ]

    print()
    print(f"## The loss alone (value_and_grad, float32), {w} CPU devices\n")
    print(loss_table(loss_entries, w))
    print(
        "\nformula: gather (N + N/W) D x 4 B forward, x2 with the backward (reduce-scatter + "
        "all-to-all); allreduce D^2 x 4 B payload, 2 (W-1)/W D^2 x 4 B on a ring."
    )
    if device_entries:
        print("\n## The loss at N = 2048, D = 8192 against the device count W\n")
        print(devices_table(device_entries, loss_entries))
    estimate = pod_estimate(step_entries)
    if step_entries:
        print(
            f"\n## The whole train step ({args.arch}, {args.image_size} px, bf16), {pb} images "
            f"per device x {w} devices, data x model mesh\n"
        )
        print(step_table(step_entries))
        print("\n## Estimate at global batch 2048 (labelled: assumptions in the JSON)\n")
        print(pod_table(estimate))

    # The file keeps every entry compiled so far (a --quick run does not drop the others).
    everything = list(cache.values())
    result = common.envelope(
        devices=w,
        loss=[e for e in everything if '"kind": "loss"' in e["key"]],
        step=[e for e in everything if '"kind": "step"' in e["key"]],
        pod_estimate=estimate,
        pod_assumptions={"hardware": HARDWARE, "mfu": ASSUMED_MFU},
    )
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
