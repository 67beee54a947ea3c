r"""The train-step alternatives of docs/benchmarks.md ("what we tried"), timed side by side.

Every variant is compiled in this process and their timed repeats are interleaved (with
the official PyTorch step's, if asked; the order rotates from repeat to repeat), so that
load from other jobs hits all alike. Per variant: image pairs/s (median and best repeat),
process CPU-seconds per step (what the step consumed, which other jobs distort less than
wall time), and the median over repeats of its speed relative to the current step in the
same repeat ("paired ratio").

  current        pretrain.step_function: the loop's step (XLA:CPU options on CPUs)
  probe          the current step with the online linear probe (labelled data, as the
                 quickstart and the CIFAR config train it: train.online_probe "auto")
  xla_defaults   the same step compiled with XLA's default options
  xnn_graph      current options + XNNPACK graph fusion (greedy)
  two_calls      the official arrangement: backbone + projector called once per view
  remat          every residual block rematerialised in the backward pass (jax.checkpoint)
  two_devices    the same global batch over 2 XLA host devices of this CPU (data parallel)
  torch          bench/torch_baseline.py, the official PyTorch step
and, measured alone (ms per step, next to the current step's time):
  guard          the non-finite guard's select over the whole state (donated)
  optimizer      LARS (optax.partition of two groups) update + apply, without the model

  python bench/step_attempts.py --config=configs/cifar10.py --width=0.25 \
      --attempts=current,xla_defaults,two_calls,torch --json=/tmp/bt_attempts.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import train_step as bench_step  # noqa: E402

ATTEMPTS = (
    "current", "probe", "xla_defaults", "xnn_graph", "two_calls", "remat", "two_devices", "torch"
)  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/cifar10.py")
    p.add_argument("--width", type=float, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--projector", default=None)
    p.add_argument("--stage_sizes", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attempts", default=",".join(ATTEMPTS), help="comma list of " + str(ATTEMPTS))
    p.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    unknown = set(args.attempts.split(",")) - set(ATTEMPTS) - {""}
    if unknown:
        p.error(f"unknown --attempts {sorted(unknown)}; choose from {', '.join(ATTEMPTS)}")
    return args


@contextlib.contextmanager
def _rematerialised_blocks():
    """While tracing: every residual block of bt_jax's ResNet wrapped in nn.remat."""
    import flax.linen as nn

    resnet = importlib.import_module("bt_jax.models.resnet")
    saved = resnet.BasicBlock, resnet.Bottleneck
    resnet.BasicBlock, resnet.Bottleneck = nn.remat(saved[0]), nn.remat(saved[1])
    try:
        yield
    finally:
        resnet.BasicBlock, resnet.Bottleneck = saved


def _variant_models(model):
    from bt_jax.models import BarlowTwins

    class TwoCalls(BarlowTwins):
        def __call__(self, view1, view2, train: bool = True):
            return self.embed(view1, train), self.embed(view2, train)

    class Remat(BarlowTwins):
        def __call__(self, view1, view2, train: bool = True):
            with _rematerialised_blocks():
                return super().__call__(view1, view2, train)

    return {
        "two_calls": TwoCalls(model.backbone, model.projector),
        "remat": Remat(model.backbone, model.projector),
    }


def _timed(fn, repeats=5):
    """Best wall seconds of fn() (already compiled)."""
    return min(common.repeat_median(fn, repeats)[1])


def main(argv=None) -> dict:
    args = parse_args(argv)
    attempts = [a for a in args.attempts.split(",") if a]
    common.set_devices(2 if "two_devices" in attempts else 1)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from bt_jax import distributed, models, optim, pretrain

    config = bench_step.configure(
        bench_step.parse_args(
            [f"--config={args.config}", "--synthetic", f"--dtype={args.dtype}"]
            + [f"--{k}={v}" for k in ("width", "batch", "projector", "stage_sizes")
               if (v := getattr(args, k)) is not None]
        )
    )  # fmt: skip
    n, size = config.train.global_batch, config.augment.view1.image_size
    model = models.build_model(config.model)
    tx, _ = optim.make_optimizer(config.optim, global_batch=n, warmup_steps=10, total_steps=10**6)
    host_batch = bench_step.synthetic_batch(config, n)
    labels = np.random.default_rng(1).integers(0, 10, n).astype(np.int32)
    plan = {"warmup_steps": 10, "total_steps": 10**6}

    def build(name):
        """(compiled step, its mesh, its state, its batch) for one variant."""
        mesh = distributed.make_mesh(2 if name == "two_devices" else 1)
        variant_model = _variant_models(model).get(name, model)
        probe = pretrain.online_probe(config, 10, plan) if name == "probe" else None
        with jax.set_mesh(mesh):
            state = jax.jit(
                functools.partial(pretrain.init_state, model, tx, config, size, probe),
                out_shardings=distributed.replicated(mesh),
            )()
            batch = distributed.host_to_global(
                {**host_batch, "label": labels} if probe else host_batch, mesh
            )
            options = pretrain.step_options(config, variant_model, tx, mesh, probe)
            if name == "xla_defaults":
                compiled = pretrain.train_step.lower(state, batch, **options).compile()
            else:
                extra = {}
                if name == "xnn_graph":
                    extra = {
                        "xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_GREEDY"
                    }
                lowered = pretrain.train_step.lower(state, batch, **options)
                compiled = lowered.compile({**pretrain.CPU_COMPILER_OPTIONS, **extra})
        return compiled, mesh, state, batch

    variants = {}
    for name in attempts:
        if name == "torch":
            continue
        print(f"compiling {name} ...", flush=True)
        variants[name] = list(build(name))
    baseline = None
    if "torch" in attempts:
        baseline = bench_step.torch_step(argparse.Namespace(baseline="torch", devices=1), config)

    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    if baseline:
        wall["torch"], cpu["torch"] = [], []
        baseline.run(1)
    for k, (compiled, mesh, state, batch) in variants.items():  # warm-up
        with jax.set_mesh(mesh):
            variants[k][2], m = compiled(state, batch)
            jax.block_until_ready(m)
    names = list(variants)
    for r in range(args.repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:  # rotate: no fixed order
            run = variants[k]
            compiled, mesh, state, batch = run
            t0, c0 = time.perf_counter(), time.process_time()
            with jax.set_mesh(mesh):
                for _ in range(args.steps):
                    state, m = compiled(state, batch)
                jax.block_until_ready((state, m))
            run[2] = state
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
        if baseline:
            c0 = time.process_time()
            wall["torch"].append(baseline.run(args.steps))
            cpu["torch"].append(time.process_time() - c0)

    # Components measured alone, on the current step's state shapes.
    state = variants[next(iter(variants))][2]
    keep = jax.jit(
        lambda new, old, good: jax.tree.map(lambda a, b: jnp.where(good, a, b), new, old),
        donate_argnums=0,
    )
    guarded = (state.params, state.batch_stats, state.opt_state)
    copies = lambda: jax.tree.map(jnp.copy, guarded)
    keep(copies(), guarded, True)
    guard_s = _timed(lambda: jax.block_until_ready(keep(copies(), guarded, True)))
    copy_s = _timed(lambda: jax.block_until_ready(copies()))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)
    update = jax.jit(
        lambda g, o, p: (lambda u, o2: (optax.apply_updates(p, u), o2))(*tx.update(g, o, p))
    )
    jax.block_until_ready(update(grads, state.opt_state, state.params))
    optimizer_s = _timed(
        lambda: jax.block_until_ready(update(grads, state.opt_state, state.params))
    )

    ref = attempts[0] if attempts[0] != "torch" else next(iter(variants))
    rows, out = [], {}
    for k in wall:
        per_step = [t / args.steps for t in wall[k]]
        ratios = [a / b for a, b in zip(wall[ref], wall[k], strict=True)]
        out[k] = {
            "pairs_per_s_median": n / statistics.median(per_step),
            "pairs_per_s_best": n / min(per_step),
            "cpu_seconds_per_step": statistics.median(cpu[k]) / args.steps,
            "speed_vs_reference_paired_median": statistics.median(ratios),
            "speed_vs_reference_range": [min(ratios), max(ratios)],
            "repeat_seconds": wall[k],
        }
        rows.append([
            k, out[k]["pairs_per_s_median"], out[k]["pairs_per_s_best"],
            out[k]["cpu_seconds_per_step"], f"{out[k]['speed_vs_reference_paired_median']:.2f}x",
        ])  # fmt: skip
    step_s = statistics.median(wall[ref]) / args.steps
    components = {
        "guard_ms": 1e3 * max(guard_s - copy_s, 0.0),
        "optimizer_ms": 1e3 * optimizer_s,
        "reference_step_ms": 1e3 * step_s,
    }
    print(f"\n{config.model.arch} x{config.model.width}, projector {config.model.projector}, "
          f"batch {n}, {size} px, {config.model.dtype}; reference: {ref}\n")  # fmt: skip
    print(common.table(rows, ["variant", "pairs/s (median)", "pairs/s (best)", "CPU-s/step",
                              f"speed vs {ref} (paired median)"]))  # fmt: skip
    print(
        f"\nalone: non-finite guard {components['guard_ms']:.1f} ms, LARS update "
        f"{components['optimizer_ms']:.1f} ms, against {components['reference_step_ms']:.0f} "
        f"ms per {ref} step"
    )
    result = {"variants": out, "components": components, "reference": ref}
    if args.json:
        common.write_json(args.json, {**common.envelope(), **result})
    return result


if __name__ == "__main__":
    common.run_as_the_job(main)
