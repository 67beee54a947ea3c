r"""One 3x3 convolution's forward, input gradient and weight gradient: XLA:CPU against oneDNN.

The evidence for docs/benchmarks.md's "what limits the CPU step": for each stage of the
config's ResNet (its batch of both views, its spatial size and width), the best of
--repeats timings of
  fwd      y = conv(x, w)
  dx       the input gradient (a transposed convolution)
  dw       the weight gradient (a convolution over the batch and spatial axes)
with XLA's default options, with bt_jax's XLA:CPU options (pretrain.CPU_COMPILER_OPTIONS),
and in PyTorch (oneDNN) on NCHW and channels_last tensors, all in one process.

  python bench/conv_backward.py --config=configs/cifar10.py --width=0.25
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/cifar10.py")
    p.add_argument("--width", type=float, default=None)
    p.add_argument("--batch", type=int, default=None, help="global batch (default: config's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _best(fn, repeats):
    fn()
    return min(common.repeat_median(fn, repeats)[1])


def xla_times(shape, repeats, options) -> dict:
    import jax

    n, h, c = shape
    x = jax.random.normal(jax.random.key(0), (n, h, h, c))
    w = jax.random.normal(jax.random.key(1), (3, 3, c, c))
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    fns = {
        "fwd": (conv, (x, w)),
        "dx": (lambda x, w, g: jax.vjp(lambda a: conv(a, w), x)[1](g)[0], (x, w, x)),
        "dw": (lambda x, w, g: jax.vjp(lambda b: conv(x, b), w)[1](g)[0], (x, w, x)),
    }
    out = {}
    for name, (fn, inputs) in fns.items():
        lowered = jax.jit(fn).lower(*inputs)
        compiled = lowered.compile(options) if options else lowered.compile()
        run = lambda f=compiled, a=inputs: jax.block_until_ready(f(*a))
        out[name] = _best(run, repeats)
    return out


def torch_times(shape, repeats, channels_last: bool) -> dict:
    import torch

    n, h, c = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c, h, h).contiguous(memory_format=fmt)
    w = torch.randn(c, c, 3, 3).contiguous(memory_format=fmt)
    backward = lambda mask: torch.ops.aten.convolution_backward(
        x, x, w, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1, mask
    )
    return {
        "fwd": _best(lambda: torch.nn.functional.conv2d(x, w, padding=1), repeats),
        "dx": _best(lambda: backward((True, False, False)), repeats),
        "dw": _best(lambda: backward((False, True, False)), repeats),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.set_devices(1)
    import train_step as bench_step

    from bt_jax import pretrain

    config = bench_step.configure(
        bench_step.parse_args(
            [f"--config={args.config}", "--synthetic"]
            + ([f"--width={args.width}"] if args.width else [])
            + ([f"--batch={args.batch}"] if args.batch else [])
        )
    )
    images = 2 * config.train.global_batch  # both views go through the backbone together
    size, base = config.augment.view1.image_size, int(64 * config.model.width)
    if not config.model.cifar_stem:
        size //= 4  # the 7x7 stride-2 stem and the max-pool
    stages = len(config.model.stage_sizes) or 4
    shapes = [(images, size // 2**s, base * 2**s) for s in range(stages)]
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        print("torch is not installed (pip install '.[bench]'): oneDNN columns skipped")
        have_torch = False

    kinds = {"xla_defaults": None, "xla_bt_jax": pretrain.CPU_COMPILER_OPTIONS}
    rows, out = [], []
    for shape in shapes:
        entry = {"shape_nhwc": [shape[0], shape[1], shape[1], shape[2]]}
        for kind, options in kinds.items():
            entry[kind] = xla_times(shape, args.repeats, options)
        if have_torch:
            entry["torch_nchw"] = torch_times(shape, args.repeats, channels_last=False)
            entry["torch_channels_last"] = torch_times(shape, args.repeats, channels_last=True)
        out.append(entry)
        for kind in [k for k in entry if k != "shape_nhwc"]:
            t = entry[kind]
            rows.append(
                [f"{shape[0]}x{shape[1]}x{shape[1]}x{shape[2]}", kind]
                + [1e3 * t[k] for k in ("fwd", "dx", "dw")]
                + [1e3 * sum(t.values())]
            )
        print(f"done {shape}", flush=True)
    print()
    print(
        common.table(
            rows, ["activation (NHWC)", "implementation", "fwd ms", "dx ms", "dw ms", "sum ms"]
        )
    )
    if args.json:
        common.write_json(args.json, {**common.envelope(), "convolutions": out})
    return {"convolutions": out}


if __name__ == "__main__":
    common.run_as_the_job(main)
