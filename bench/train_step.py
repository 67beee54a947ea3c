r"""Throughput of the full jitted train step, its utilisation, and whether the input keeps up.

Measures, in one process and one run (so the ratios are trustworthy on a shared machine):

  (a) device step: bt_jax.pretrain.train_step on one fixed batch already on the devices,
      after compilation and warm-up; median over --repeats runs of --steps steps;
      with --baseline torch, the official PyTorch step (bench/torch_baseline.py) for the
      same architecture, projector, batch and dtype, its repeats interleaved with bt_jax's
      so that load from other jobs hits both alike;
  (b) input pipeline: batches/s of bt_jax.data.pretrain_batches alone (host numpy batches,
      after the first batch, which fills the cache), median over --repeats runs;
  (c) end to end: the pretraining loop's own pattern (prefetch_to_mesh + train_step), with
      the time spent waiting for input;

and reports input_rate / step_rate (> 1: the input keeps up and the device step is the
bottleneck). Utilisation: achieved FLOP/s (XLA's cost analysis of the compiled step x
devices / step time) over this machine's dense float32 matmul rate, measured in the same
run on the same devices (a large jnp.dot), and over the chip's bf16 peak where it is known
(bench/common.py PEAK_TFLOPS, or --peak_tflops).

  python bench/train_step.py --config=configs/cifar10.py --width=0.25 --baseline torch
  python bench/train_step.py --config=configs/cifar10.py --data_dir=/work/shared/tfds \
      --width=0.25 --json=bench/results/train_step_cifar10.json

Without --data_dir (or BT_JAX_TFDS_DIR) it reads the embedded cifar10_jpeg_mini.
--synthetic: random uint8 views instead of data, only (a); needs neither TFDS nor
TensorFlow (the step never imports it), as on a GPU image without them. --profile DIR:
a jax.profiler trace of --steps steps, summed per XLA op (bench/xla_profile.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TFDS_ENV = "BT_JAX_TFDS_DIR"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/cifar10.py", help="file[:variant]")
    p.add_argument("--devices", type=int, default=1, help="CPU devices (XLA host devices)")
    p.add_argument("--data_dir", default=os.environ.get(TFDS_ENV))
    p.add_argument("--dataset", default=None, help="default: cifar10_jpeg with --data_dir")
    p.add_argument("--synthetic", action="store_true", help="random views; no TFDS, no TF")
    p.add_argument("--baseline", choices=("none", "torch"), default="none")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: config's)")
    p.add_argument("--width", type=float, default=None, help="backbone width multiplier")
    p.add_argument("--projector", default=None, help="e.g. 2048-2048-2048")
    p.add_argument("--arch", default=None)
    p.add_argument("--stage_sizes", default=None, help="blocks per stage, e.g. 1,1 (toy)")
    p.add_argument("--image_size", type=int, default=None, help="default: the config's")
    p.add_argument("--dtype", default="float32", help="compute dtype (bf16 is slow on CPU)")
    p.add_argument("--strategy", default=None, help="loss strategy (default: config's)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--input_batches", type=int, default=20, help="batches per input repeat")
    p.add_argument("--matmul_size", type=int, default=2048, help="0: skip the matmul rate")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="chip peak (default: known)")
    p.add_argument("--profile", default=None, help="trace --steps steps into this folder")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def configure(args):
    from bt_jax.data.config import view_config
    from bt_jax.defaults import load_config

    config = load_config(args.config)
    if args.batch:
        config.train.global_batch = args.batch
    if args.width:
        config.model.width = args.width
    if args.projector:
        config.model.projector = args.projector
    if args.arch:
        config.model.arch = args.arch
    if args.stage_sizes:
        config.model.stage_sizes = tuple(int(s) for s in args.stage_sizes.split(","))
    if args.image_size:
        for view in (config.augment.view1, config.augment.view2):
            view.image_size = args.image_size
            view.blur_kernel_size = view_config(args.image_size).blur_kernel_size
    if args.strategy:
        config.loss.strategy = args.strategy
    config.model.dtype = args.dtype
    if args.synthetic:
        config.data.dataset = "synthetic"
    elif args.dataset:
        config.data.dataset = args.dataset
    elif args.data_dir:
        config.data.dataset = "cifar10_jpeg"
    else:
        config.data.dataset = "cifar10_jpeg_mini"  # embedded in the package
    if args.data_dir and config.data.dataset not in ("cifar10_jpeg_mini", "synthetic"):
        config.data.data_dir = args.data_dir
    return config


def synthetic_batch(config, global_batch: int, seed: int = 0) -> dict:
    """Random uint8 views, plus plausible per-example draws when pixel_ops="device"
    (layout of bt_jax.data.augment.DEVICE_PARAMS; the step's cost does not depend on
    their values: every op is computed and selected per example)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    size = config.augment.view1.image_size
    batch = {
        name: rng.integers(0, 256, (global_batch, size, size, 3), dtype=np.uint8)
        for name in ("view1", "view2")
    }
    n = global_batch
    flag = lambda p: (rng.random(n) < p).astype(np.float32)
    if config.augment.get("pixel_ops", "host") == "device":
        for name in ("view1", "view2"):
            columns = [
                flag(0.8),  # jitter
                rng.uniform(0.6, 1.4, n),  # brightness
                rng.uniform(0.6, 1.4, n),  # contrast
                rng.uniform(0.8, 1.2, n),  # saturation
                rng.uniform(-0.1, 0.1, n),  # hue
                *np.argsort(rng.random((4, n)), axis=0),  # jitter order (4 columns)
                flag(0.2),  # grayscale
                flag(0.5),  # blur
                rng.uniform(0.1, 2.0, n),  # blur sigma
                flag(0.1),  # solarize
            ]
            batch[f"{name}_ops"] = np.stack(columns, axis=1).astype(np.float32)
    return batch


def matmul_rate(mesh, n: int, repeats: int) -> dict:
    """FLOP/s of a float32 [n*W, n] x [n, n] product sharded by rows over the mesh."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    w = mesh.devices.size
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.device_put(
        jax.random.normal(key_a, (n * w, n), jnp.float32), NamedSharding(mesh, P("data"))
    )
    b = jax.device_put(jax.random.normal(key_b, (n, n), jnp.float32), NamedSharding(mesh, P()))
    dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    dot(a, b).block_until_ready()
    seconds, times = common.repeat_median(lambda: dot(a, b).block_until_ready(), repeats)
    flops = 2.0 * n * w * n * n
    return {"n": n, "flops": flops, "seconds": seconds, "times": times, "rate": flops / seconds}


def torch_step(args, config):
    """The official PyTorch step for this config, or None (with a message) without torch."""
    if args.baseline != "torch":
        return None
    if args.devices != 1:
        sys.exit("train_step: --baseline torch runs one PyTorch process; use --devices=1")
    try:
        import torch_baseline
    except ImportError:
        print("torch is not installed (pip install '.[bench]'): PyTorch baseline skipped")
        return None
    m, o = config.model, config.optim
    return torch_baseline.TorchStep(
        arch=m.arch,
        width=m.width,
        cifar_stem=m.cifar_stem,
        stage_sizes=tuple(m.stage_sizes) or None,
        projector=m.projector,
        batch=config.train.global_batch,
        image_size=config.augment.view1.image_size,
        dtype=m.dtype,
        lambd=config.loss.lambd,
        lr_weights=o.lr_weights,
        lr_biases=o.lr_biases,
        weight_decay=o.weight_decay,
        eta=o.eta,
    )


def jax_peak_memory(compiled) -> tuple[int, str]:
    """Peak device memory: the allocator's own count where it keeps one (GPU, TPU), else
    XLA's estimate for the compiled step (arguments + temporaries + outputs - aliased)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "allocator peak"
    m = compiled.memory_analysis()
    estimate = (
        m.argument_size_in_bytes
        + m.temp_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )
    return int(estimate), "XLA estimate"


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.set_devices(args.devices)

    import functools

    import jax

    from bt_jax import distributed, models, optim, pretrain

    config = configure(args)
    mesh = distributed.make_mesh(args.devices)
    w = mesh.devices.size
    global_batch = config.train.global_batch
    distributed.check_global_batch(global_batch, mesh)
    image_size = config.augment.view1.image_size
    what = (
        f"{config.model.arch} x{config.model.width} "
        f"{'cifar stem ' if config.model.cifar_stem else ''}projector {config.model.projector}, "
        f"{image_size} px, {config.model.dtype}, batch {global_batch}, loss "
        f"{config.loss.strategy}, {w} {jax.default_backend()} device(s) "
        f"({jax.devices()[0].device_kind}), {config.data.dataset}"
    )
    print(what, flush=True)
    baseline = torch_step(args, config)

    # (b) the input pipeline alone
    if args.synthetic:
        first, input_s, input_times, first_batch_s = synthetic_batch(config, global_batch), 0, [], 0
    else:
        from bt_jax.data import pretrain_batches  # tf.data

        def new_batches():
            return pretrain_batches(
                config.data, config.augment, global_batch=global_batch, seed=config.seed
            )

        iterator = iter(new_batches())
        t0 = time.perf_counter()
        first = next(iterator)
        first_batch_s = time.perf_counter() - t0
        input_times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(args.input_batches):
                next(iterator)
            input_times.append((time.perf_counter() - t0) / args.input_batches)
        input_s = statistics.median(input_times)
        print(
            f"input: {1 / input_s:.2f} batches/s ({global_batch / input_s:.0f} images/s), "
            f"first batch {first_batch_s:.1f} s",
            flush=True,
        )

    # (a) the device step alone, on a fixed batch already on the devices
    model = models.build_model(config.model)
    tx, _ = optim.make_optimizer(
        config.optim, global_batch=global_batch, warmup_steps=10, total_steps=10**6
    )
    options = pretrain.step_options(config, model, tx, mesh)
    jitted = pretrain.step_function(mesh)  # what the pretraining loop runs
    step_fn = functools.partial(jitted, **options)
    replicated = distributed.replicated(mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(
            functools.partial(pretrain.init_state, model, tx, config, image_size),
            out_shardings=replicated,
        )()
        batch = distributed.host_to_global(first, mesh)
        t0 = time.perf_counter()
        compiled = jitted.lower(state, batch, **options).compile()
        compile_s = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops_per_device = float(cost["flops"])

        for _ in range(args.warmup):
            state, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics)
        if baseline:
            baseline.run(args.warmup)

        def run_steps():
            nonlocal state
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, m = step_fn(state, batch)
            jax.block_until_ready((state, m))
            return time.perf_counter() - t0

        step_times, torch_times = [], []
        for _ in range(args.repeats):  # interleaved: both see the same machine load
            step_times.append(run_steps())
            if baseline:
                torch_times.append(baseline.run(args.steps))
        step_s = statistics.median(step_times) / args.steps
        peak_bytes, peak_source = jax_peak_memory(compiled)
        print(f"device step: {step_s:.3f} s/step ({global_batch / step_s:.1f} pairs/s)")
        if baseline:
            torch_s = statistics.median(torch_times) / args.steps
            print(
                f"PyTorch official step: {torch_s:.3f} s/step ({global_batch / torch_s:.1f} "
                f"pairs/s); bt_jax / PyTorch = {torch_s / step_s:.2f}x"
            )

        if not args.synthetic:  # (c) end to end, as the pretraining loop runs
            device_batches = distributed.prefetch_to_mesh(
                new_batches(), mesh, config.train.device_prefetch
            )
            state, m = step_fn(state, next(device_batches))  # fills the cache; untimed
            jax.block_until_ready(m)
            e2e_steps = args.steps * args.repeats
            wait = 0.0
            t0 = time.perf_counter()
            for _ in range(e2e_steps):
                t1 = time.perf_counter()
                b = next(device_batches)
                wait += time.perf_counter() - t1
                state, m = step_fn(state, b)
            jax.block_until_ready((state, m))
            e2e_s = (time.perf_counter() - t0) / e2e_steps
            print(
                f"end to end: {e2e_s:.3f} s/step, input wait {100 * wait / e2e_steps / e2e_s:.0f}%"
            )

        if args.profile:
            import xla_profile

            profile = xla_profile.trace_ops(
                run_steps, steps=args.steps, trace_dir=args.profile, hlo=compiled.as_text()
            )
        mm = matmul_rate(mesh, args.matmul_size, max(3, args.repeats)) if args.matmul_size else None

    achieved = flops_per_device * w / step_s
    peak = common.peak_flops(jax.devices()[0].device_kind, args.peak_tflops)
    out = {
        "setup": {
            "config": args.config,
            "description": what,
            "arch": config.model.arch,
            "width": config.model.width,
            "projector": config.model.projector,
            "image_size": image_size,
            "dtype": config.model.dtype,
            "global_batch": global_batch,
            "devices": w,
            "loss_strategy": config.loss.strategy,
            "dataset": config.data.dataset,
            "pixel_ops": config.augment.get("pixel_ops", "host"),
            "steps_per_repeat": args.steps,
            "repeats": args.repeats,
            "input_batches_per_repeat": args.input_batches,
        },
        "compile_seconds": compile_s,
        "device_step": {
            "seconds_per_step": step_s,
            "steps_per_s": 1 / step_s,
            "pairs_per_s": global_batch / step_s,
            "pairs_per_s_per_device": global_batch / step_s / w,
            "repeat_seconds": step_times,
            "peak_memory_bytes": peak_bytes,
            "peak_memory_source": peak_source,
        },
        "flops_per_step_per_device": flops_per_device,
        "flops_per_pair": flops_per_device * w / global_batch,
        "achieved_flops_per_s": achieved,
    }
    rows = [["bt_jax device step alone", 1 / step_s, global_batch / step_s]]
    if baseline:
        out["baseline"] = {
            "framework": baseline_description(baseline),
            "seconds_per_step": torch_s,
            "pairs_per_s": global_batch / torch_s,
            "repeat_seconds": torch_times,
            "peak_memory_bytes": baseline.peak_memory_bytes(),
        }
        out["bt_jax_over_baseline"] = torch_s / step_s
        rows.append(["PyTorch official step (interleaved)", 1 / torch_s, global_batch / torch_s])
    if not args.synthetic:
        out["input"] = {
            "seconds_per_batch": input_s,
            "batches_per_s": 1 / input_s,
            "images_per_s": global_batch / input_s,
            "first_batch_seconds": first_batch_s,
            "repeat_seconds_per_batch": input_times,
        }
        out["end_to_end"] = {
            "seconds_per_step": e2e_s,
            "steps_per_s": 1 / e2e_s,
            "pairs_per_s": global_batch / e2e_s,
            "input_wait_fraction": wait / e2e_steps / e2e_s,
            "steps": e2e_steps,
        }
        out["input_rate_over_step_rate"] = step_s / input_s
        rows += [
            ["input pipeline alone", 1 / input_s, global_batch / input_s],
            ["end to end", 1 / e2e_s, global_batch / e2e_s],
        ]
    if mm:
        out["matmul"] = mm
        out["utilisation_vs_matmul"] = achieved / mm["rate"]
    if peak:
        out["peak_flops_per_device"] = peak
        out["mfu"] = achieved / w / peak
    if args.profile:
        out["profile"] = profile

    print()
    print(common.table(rows, ["measurement", "steps/s", "image pairs/s"]))
    if not args.synthetic:
        bottleneck = "device step" if out["input_rate_over_step_rate"] > 1 else "input pipeline"
        print(
            f"\ninput rate / step rate = {out['input_rate_over_step_rate']:.2f} (bottleneck: "
            f"{bottleneck}); end-to-end input wait "
            f"{100 * out['end_to_end']['input_wait_fraction']:.0f}%"
        )
    line = (
        f"\nstep: {flops_per_device * w / 1e9:.1f} GFLOP ({out['flops_per_pair'] / 1e9:.2f} "
        f"GFLOP/pair) -> {achieved / 1e9:.1f} GFLOP/s achieved"
    )
    if mm:
        line += (
            f"; dense f32 matmul {mm['rate'] / 1e9:.1f} GFLOP/s -> utilisation "
            f"{100 * out['utilisation_vs_matmul']:.0f}%"
        )
    if peak:
        line += f"; MFU {100 * out['mfu']:.1f}% of {peak / 1e12:.0f} TFLOP/s peak"
    print(line)
    print(f"peak memory: {common.human_bytes(peak_bytes)} ({peak_source})")
    if args.profile:
        total = sum(profile["ms_per_step_by_kind"].values())
        kinds = [
            [k, ms, f"{100 * ms / total:.0f} %"] for k, ms in profile["ms_per_step_by_kind"].items()
        ]
        print(f"\nprofile ({profile['trace']}), XLA ops by kind:\n")
        print(common.table(kinds, ["kind", "ms/step", "share"]))
        print()
        print(common.table(profile["top_ops"], ["op", "ms/step", "shape", "from"]))
    if args.json:
        common.write_json(args.json, {**common.envelope(), **out})
    return out


def baseline_description(baseline) -> str:
    import torch_baseline

    return f"{torch_baseline.describe()}, {baseline.device}"


if __name__ == "__main__":
    common.run_as_the_job(main)
