r"""How the cost of a step grows with the projector width D, the batch N and the devices W.

Nothing runs: every figure comes from XLA's compiled programs on W CPU devices (default 8),
which are exact and hardware-independent for FLOPs, bytes and collectives.

1. The loss alone: value_and_grad of losses.barlow_twins_loss on [N, D] float32 embeddings
   sharded along "data", for each strategy (gather, allreduce, jit) and the single-device
   reference, for D in {2048, 8192, 16384, 32768} and N in {256, 2048, 8192}: per-device
   FLOPs, compiled memory (arguments, temporaries, outputs) and the collectives in the
   optimised HLO (all-reduce, all-gather, all-to-all, reduce-scatter, collective-permute)
   with their bytes per device, next to the closed-form expectations.
2. The whole train step (bt_jax.pretrain.train_step): ResNet-50 + projector D-D-D at 224 px,
   bfloat16 compute as configs/imagenet.py, a small per-device batch, LARS state, on the
   W-device mesh: per-device FLOPs, memory, collective bytes.
3. A labelled estimate for a TPU v4-128 pod (64 chips) and 32 x A100 at the paper's batch
   2048, from the per-image FLOPs and bytes measured in 2 plus the loss's in 1.

  python bench/scaling.py                  # everything (several ResNet-50 compiles)
  python bench/scaling.py --quick          # D in {2048, 8192}, N = 2048, two step compiles

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
BATCHES = (256, 2048, 8192)
STRATEGIES = ("gather", "allreduce", "jit")
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
    p.add_argument("--step_dims", default=None, help="comma list of D for the whole step")
    p.add_argument("--step_strategies", default="gather,allreduce", help="at D = 8192")
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


def step_entry(d: int, strategy: str, per_device_batch: int, args, mesh) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from bt_jax import distributed, models, optim, pretrain
    from configs import imagenet

    config = imagenet.get_config()
    config.model.arch = args.arch
    config.model.width = args.width
    config.model.stage_sizes = tuple(int(k) for k in args.stage_sizes.split(",") if k)
    config.model.projector = f"{d}-{d}-{d}"
    config.loss.strategy = strategy
    w = mesh.devices.size
    global_batch = per_device_batch * w
    config.train.global_batch = global_batch
    model = models.build_model(config.model)
    tx, _ = optim.make_optimizer(
        config.optim, global_batch=global_batch, warmup_steps=10, total_steps=1000
    )
    replicated = distributed.replicated(mesh)
    init = functools.partial(pretrain.init_state, model, tx, config, args.image_size)
    state = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
        jax.eval_shape(init),
    )
    image = jax.ShapeDtypeStruct(
        (global_batch, args.image_size, args.image_size, 3),
        jnp.uint8,
        sharding=NamedSharding(mesh, P("data")),
    )
    batch = {"view1": image, "view2": image}
    if config.augment.get("pixel_ops", "host") == "device":
        # the host sends each view's random draws; the step finishes the views on the device
        # (float32[13] per view: bt_jax.data.augment.pack_device_params)
        ops = jax.ShapeDtypeStruct(
            (global_batch, 13), jnp.float32, sharding=NamedSharding(mesh, P("data"))
        )
        batch.update(view1_ops=ops, view2_ops=ops)

    def param_count(tree):
        return int(sum(x.size for x in jax.tree.leaves(tree)))

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        options = pretrain.step_options(config, model, tx, mesh)
        compiled = pretrain.train_step.lower(state, batch, **options).compile()
    out = analyse(compiled, w, time.perf_counter() - t0)
    weight_shapes = [x.shape for x in jax.tree.leaves(state.params)]
    out["weight_gradient_allreduce"] = weight_gradient_allreduce(compiled.as_text(), weight_shapes)
    out.update(
        d=d,
        strategy=strategy,
        devices=w,
        per_device_batch=per_device_batch,
        global_batch=global_batch,
        arch=args.arch,
        image_size=args.image_size,
        dtype=config.model.dtype,
        pixel_ops=config.augment.get("pixel_ops", "host"),
        params_backbone=param_count(state.params["backbone"]),
        params_projector=param_count(state.params["projector"]),
        opt_state_bytes=int(
            sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))
        ),
    )
    return out


# ----------------------------------------------------------------------------- reporting


def _key(_, **kw) -> str:
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
    for e in sorted(entries, key=lambda e: (e["d"], e["strategy"])):
        m, c = e["memory"], e["collectives"]
        g = e.get("weight_gradient_allreduce", {})
        rows.append(
            [
                e["d"], e["strategy"], f"{e['per_device_batch']} x {e['devices']}",
                (e["params_backbone"] + e["params_projector"]) / 1e6,
                e["flops"] / 1e9 / e["per_device_batch"],
                _mib(m["arguments"]), _mib(m["temporaries"]), _mib(m["outputs"]),
                _mib(c["payload_bytes"]), _mib(c["ring_bytes"]),
                _mib(g["payload_bytes"]) if g else "-",
                _mib(g["float32_bytes_once"]) if g else "-",
                g.get("reductions_per_weight", "-"),
                round(e["compile_seconds"]),
            ]
        )  # fmt: skip
    return common.table(
        rows,
        [
            "D", "strategy", "batch/dev x dev", "params M", "GFLOP/pair",
            "args MiB", "temp MiB", "out MiB", "coll. payload MiB", "ring MiB",
            "weight-grad all-reduce MiB", "4 B x weights MiB", "reductions/weight", "compile s",
        ],
    )  # fmt: skip


def projector_sharding(step_entries: list[dict], w: int) -> list[dict]:
    """Estimate: what a model axis of size W would save by sharding the projector."""
    out = []
    for e in sorted(step_entries, key=lambda e: e["d"]):
        if e["strategy"] != "gather":
            continue
        p = e["params_projector"]
        # params f32 + LARS momentum f32 (+ the gradient, a transient of the same size)
        replicated = 2 * 4 * p
        out.append(
            dict(
                d=e["d"],
                projector_params=p,
                replicated_param_opt_bytes=replicated,
                sharded_param_opt_bytes=replicated / w,
                saved_bytes=replicated * (1 - 1 / w),
                gradient_bytes_replicated=4 * p,
                measured_arguments=e["memory"]["arguments"],
            )
        )
    return out


def pod_estimate(step_entries: list[dict], loss_entries: list[dict], n: int = 2048) -> list[dict]:
    """Labelled estimate at global batch n on the HARDWARE above, D from the step entries.

    Per-chip FLOPs = per-image-pair FLOPs of backbone + projector (from the whole step,
    minus the loss measured alone at the same N and W) x per-chip batch + the gather loss's
    single-device FLOPs at (N, D) / chips (it scales as 1/W: part 1).
    Communication per chip, ring algorithms: the gradient all-reduce plus the gather loss's
    2 (N + N/W) D x 4 bytes. "as compiled": the all-reduce payload measured in the step's
    HLO (weight gradients plus BN statistics); "one reduction": 4 bytes x parameters, one
    float32 reduction of every gradient and nothing else.
    """
    out = []
    for e in sorted(step_entries, key=lambda e: e["d"]):
        if e["strategy"] != "gather":
            continue
        w, b, d = e["devices"], e["per_device_batch"], e["d"]
        same = [
            x
            for x in loss_entries
            if (x["n"], x["d"], x["strategy"], x["devices"]) == (b * w, d, "gather", w)
        ]
        loss_small = same[0]["flops"] if same else 0.0
        per_pair = (e["flops"] - loss_small) / b
        single = [x for x in loss_entries if (x["n"], x["d"], x["strategy"]) == (n, d, "single")]
        loss_total = single[0]["flops"] if single else loss_formulas(n, d, 1)["single_matmul_flops"]
        params = e["params_backbone"] + e["params_projector"]
        allreduce_payload = e["collectives"]["ops"].get("all-reduce", {}).get("payload_bytes", 0)
        for name, hw in HARDWARE.items():
            chips = hw["chips"]
            ring = 2 * (chips - 1) / chips
            per_chip_batch = n / chips
            flops = per_pair * per_chip_batch + loss_total / chips
            compute_s = flops / (hw["peak_flops"] * ASSUMED_MFU)
            loss_bytes = 2 * (n + n / chips) * d * 4 * (chips - 1) / chips
            bandwidth = hw["allreduce_gbps"] * 1e9
            comm_compiled_s = (ring * allreduce_payload + loss_bytes) / bandwidth
            comm_one_s = (ring * 4 * params + loss_bytes) / bandwidth
            # compute and communication assumed to overlap: the step takes the longer one
            step_compiled_s = max(compute_s, comm_compiled_s)
            step_one_s = max(compute_s, comm_one_s)
            state_bytes = 3 * 4 * params  # f32 params + LARS momentum + gradients, replicated
            out.append(
                dict(
                    hardware=name,
                    d=d,
                    global_batch=n,
                    per_chip_batch=per_chip_batch,
                    gflop_per_pair=per_pair / 1e9,
                    gflop_per_chip_step=flops / 1e9,
                    loss_share=loss_total / chips / flops,
                    compute_ms=1e3 * compute_s,
                    comm_ms_as_compiled=1e3 * comm_compiled_s,
                    comm_ms_one_reduction=1e3 * comm_one_s,
                    pairs_per_s_per_chip_as_compiled=per_chip_batch / step_compiled_s,
                    pairs_per_s_per_chip_one_reduction=per_chip_batch / step_one_s,
                    state_gib_replicated=state_bytes / 2**30,
                    state_gib_projector_sharded=(
                        3 * 4 * (e["params_backbone"] + e["params_projector"] / chips) / 2**30
                    ),
                    hbm_gib=hw["hbm_gib"],
                    assumptions=(
                        f"{hw['peak_flops'] / 1e12:.0f} TFLOP/s bf16 peak x {ASSUMED_MFU:.0%} "
                        f"MFU; {hw['allreduce_gbps']:.0f} GB/s per chip for collectives "
                        f"({hw['note']}); compute and communication overlapped"
                    ),
                )
            )
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.set_devices(args.devices)
    import jax

    from bt_jax import distributed

    if jax.device_count() < args.devices:
        sys.exit(f"scaling: asked for {args.devices} devices, jax has {jax.device_count()}")
    mesh = distributed.make_mesh(args.devices)
    w = args.devices

    ints = lambda s: [int(x) for x in s.split(",")] if s else None
    dims = ints(args.dims) or ([2048, 8192] if args.quick else list(DIMS))
    batches = ints(args.batches) or ([2048] if args.quick else list(BATCHES))
    step_dims = ints(args.step_dims) or ([2048, 8192] if args.quick else list(DIMS))
    step_strategies = [s for s in args.step_strategies.split(",") if s]

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
    loss_points = {(n, d) for n in batches for d in dims} | {(pb * w, d) for d in step_dims}
    for n, d in sorted(loss_points):
        for strategy in ("single", *STRATEGIES):
            if strategy == "single" and n * d * d > 2048 * 32768**2:
                continue  # the one-device reference only where it compiles quickly
            devs = 1 if strategy == "single" else w
            key = _key(None, kind="loss", n=n, d=d, strategy=strategy, devices=devs)
            print(f"loss N={n} D={d} {strategy} ...", flush=True)
            entry = cached(key, functools.partial(loss_entry, n, d, strategy, mesh))
            loss_entries.append({**entry, "kind": "loss"})

    # How the loss's cost per device falls with the device count at the paper's N and D.
    device_entries = []
    counts = [k for k in ints(args.device_counts) or [] if 1 < k <= jax.device_count()]
    for k in sorted(set(counts) | {w}) if counts else []:
        sub_mesh = distributed.make_mesh(k)
        for strategy in ("gather", "allreduce"):
            key = _key(None, kind="loss", n=2048, d=8192, strategy=strategy, devices=k)
            print(f"loss N=2048 D=8192 {strategy} on {k} devices ...", flush=True)
            entry = cached(key, functools.partial(loss_entry, 2048, 8192, strategy, sub_mesh))
            device_entries.append({**entry, "kind": "loss"})

    step_entries = []
    if not args.no_step:
        todo = [(d, "gather") for d in step_dims]
        todo += [(8192, s) for s in step_strategies if s != "gather" and 8192 in step_dims]
        for d, strategy in todo:
            key = _key(
                None, kind="step", arch=args.arch, d=d, strategy=strategy, devices=w,
                per_device_batch=pb, image_size=args.image_size, width=args.width,
                stage_sizes=args.stage_sizes,
            )  # fmt: skip
            print(f"train step {args.arch} D={d} {strategy} (compiling) ...", flush=True)
            entry = cached(key, functools.partial(step_entry, d, strategy, pb, args, mesh))
            step_entries.append({**entry, "kind": "step"})

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
    sharding = projector_sharding(step_entries, w)
    estimate = pod_estimate(step_entries, loss_entries)
    if step_entries:
        print(f"\n## The whole train step ({args.arch}, {args.image_size} px, bf16), {w} devices\n")
        print(step_table(step_entries))
        print("\n## Projector sharded over a model axis of size W (estimate, not built)\n")
        print(
            common.table(
                [
                    [
                        s["d"],
                        s["projector_params"] / 1e6,
                        _mib(s["replicated_param_opt_bytes"]),
                        _mib(s["sharded_param_opt_bytes"]),
                        _mib(s["saved_bytes"]),
                    ]
                    for s in sharding
                ],
                [
                    "D",
                    "projector params M",
                    "params+momentum MiB/dev (replicated)",
                    f"sharded /{w} MiB/dev",
                    "saved MiB/dev",
                ],
            )  # fmt: skip
        )
        print("\n## Estimate at global batch 2048 (labelled: assumptions in the JSON)\n")
        print(
            common.table(
                [
                    [
                        x["hardware"],
                        x["d"],
                        x["per_chip_batch"],
                        x["gflop_per_chip_step"],
                        x["loss_share"],
                        x["compute_ms"],
                        x["comm_ms_as_compiled"],
                        x["comm_ms_one_reduction"],
                        x["pairs_per_s_per_chip_as_compiled"],
                        x["pairs_per_s_per_chip_one_reduction"],
                        x["state_gib_replicated"],
                        x["state_gib_projector_sharded"],
                    ]
                    for x in estimate
                ],
                [
                    "hardware",
                    "D",
                    "batch/chip",
                    "GFLOP/chip/step",
                    "loss share",
                    "compute ms",
                    "comm ms (as compiled)",
                    "comm ms (1 reduction)",
                    "pairs/s/chip (as compiled)",
                    "pairs/s/chip (1 reduction)",
                    "state GiB (replicated)",
                    "state GiB (projector sharded)",
                ],
            )  # fmt: skip
        )

    # The file keeps every entry compiled so far (a --quick run does not drop the others).
    everything = list(cache.values())
    result = common.envelope(
        devices=w,
        loss=[e for e in everything if '"kind": "loss"' in e["key"]],
        step=[e for e in everything if '"kind": "step"' in e["key"]],
        projector_sharding_estimate=sharding,
        pod_estimate=estimate,
        pod_assumptions={"hardware": HARDWARE, "mfu": ASSUMED_MFU},
    )
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
