r"""CIFAR-10 quality in a short budget: pretrain, then kNN top-1 against a random backbone.

Runs the real pretraining job (bt_jax.pretrain.train_and_evaluate) on configs/cifar10.py
shortened to fit about 30 minutes on a 2-core CPU (ResNet-18 with the CIFAR stem at reduced
width, float32, batch 256, a few epochs, 1 warm-up epoch), restores its final checkpoint, and
evaluates the backbone with the kNN protocol of bt_jax.evaluation.knn (k=200, cosine, exp(sim/0.1)
weights; bank = the 50,000 training images, queries = the 10,000 test images, no
augmentation). The baseline is the same model freshly initialised (same seed), evaluated the
same way.

The recorded run (docs/benchmarks.md, CIFAR-10 quality; 28.5 min on 2 idle CPU cores, kNN
top-1 32.62 % pretrained vs 27.42 % random):

  python bench/quality_cifar10.py --data_dir=../shared/tfds --epochs=5 --batch=64 \
      --width=0.125 --warmup_epochs=0 --lr=3.0 --projector=1024-1024-1024 \
      --json=bench/results/quality_cifar10.json

The data folder must hold the prepared `cifar10_jpeg` TFDS set (--data_dir or
BT_JAX_TFDS_DIR). Writes, with --json, {"knn_top1_pretrained", "knn_top1_random",
"train_seconds", "images_per_s", "command", ...} (accuracies in percent).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DATASET = "cifar10_jpeg"
TFDS_ENV = "BT_JAX_TFDS_DIR"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data_dir", default=os.environ.get(TFDS_ENV), help=f"default: ${TFDS_ENV}")
    p.add_argument("--epochs", type=int, default=5, help="pretraining epochs (195 steps each)")
    p.add_argument("--width", type=float, default=0.25, help="ResNet-18 channel multiplier")
    p.add_argument("--projector", default="2048-2048-2048")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup_epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.3, help="base LR (x batch/256) of the weights")
    p.add_argument(
        "--lr_biases", type=float, default=None, help="base LR of biases and BN (default: --lr)"
    )
    p.add_argument("--dtype", default="float32", help="compute dtype (bf16 convs are slow on CPU)")
    p.add_argument("--stop_after_steps", type=int, default=0, help=">0: cut the run (smoke tests)")
    p.add_argument("--devices", type=int, default=1, help="CPU devices (XLA host devices)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="default: a fresh temporary folder")
    p.add_argument(
        "--monitor_every_epochs",
        type=int,
        default=0,
        help="kNN during pretraining on a subset (train[:10000] / test[:2000]); 0 = none",
    )
    p.add_argument("--json", default=None, help="write the result here")
    return p.parse_args(argv)


def make_config(args):
    from configs import cifar10

    config = cifar10.get_config()
    config.seed = args.seed
    config.model.width = args.width
    config.model.projector = args.projector
    config.model.dtype = args.dtype
    config.optim.lr_weights = args.lr
    config.optim.lr_biases = args.lr if args.lr_biases is None else args.lr_biases
    config.optim.warmup_epochs = args.warmup_epochs
    config.train.global_batch = args.batch
    config.train.epochs = args.epochs
    config.train.stop_after_steps = args.stop_after_steps
    config.train.log_every_steps = 25
    config.train.checkpoint_every_steps = 100  # a crashed run resumes from its workdir
    config.train.async_checkpoints = False
    config.data.dataset = DATASET
    config.data.data_dir = args.data_dir
    config.knn.every_epochs = 0
    config.knn.at_end = False  # evaluated here, outside the timed pretraining
    config.knn.global_batch = 500  # divides 50,000 and 10,000: no padded batch
    return config


def monitored(config, every_epochs: int):
    """The pretraining config with a cheap kNN monitor (a learning curve; adds its time)."""
    config = copy.deepcopy(config)
    config.knn.every_epochs = every_epochs
    config.knn.bank_split = "train[:10000]"
    config.knn.query_split = "test[:2000]"
    return config


def knn_top1(model, variables, config, mesh) -> dict:
    from bt_jax.evaluation import knn

    t0 = time.perf_counter()
    bank, queries = knn.splits(config.knn, config.data, mesh)
    result = knn.evaluate(model.backbone, variables, bank, queries, config.knn, mesh)
    result["seconds"] = time.perf_counter() - t0
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.data_dir or not os.path.isdir(os.path.join(args.data_dir, DATASET)):
        sys.exit(
            f"quality_cifar10: needs the prepared TFDS set {DATASET!r}: pass --data_dir=FOLDER "
            f"or set {TFDS_ENV} to the folder that holds {DATASET}/ (got {args.data_dir!r})"
        )
    common.set_devices(args.devices)

    import functools

    import jax

    from bt_jax import checkpoint, distributed, models, optim, pretrain

    config = make_config(args)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bt_quality_cifar10_")
    print(f"pretraining in {workdir} on {jax.device_count()} {jax.default_backend()} device(s)")
    print(
        f"resnet18 x{args.width} cifar stem, projector {args.projector}, batch {args.batch}, "
        f"{args.epochs} epochs, {args.dtype}",
        flush=True,
    )

    t0 = time.perf_counter()
    train_config = (
        monitored(config, args.monitor_every_epochs) if args.monitor_every_epochs else config
    )
    result = pretrain.train_and_evaluate(train_config, workdir)
    train_seconds = time.perf_counter() - t0
    steps = int(result["step"])
    images_per_s = steps * args.batch / train_seconds
    print(
        f"pretraining: {steps} steps in {train_seconds:.0f} s (with compile and checkpoint): "
        f"{images_per_s:.1f} images/s; last loss {result.get('loss', float('nan')):.1f}",
        flush=True,
    )

    # The final state, restored from the run's checkpoint exactly as the job left it.
    mesh = distributed.make_mesh()
    model = models.build_model(config.model)
    tx, _ = optim.make_optimizer(
        config.optim, global_batch=args.batch, warmup_steps=1, total_steps=steps + 1
    )
    init = functools.partial(pretrain.init_state, model, tx, config, 32)
    replicated = distributed.replicated(mesh)
    with jax.set_mesh(mesh):
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
            jax.eval_shape(init),
        )
        ckpt = checkpoint.Checkpointer(workdir, async_save=False)
        state, _ = ckpt.restore(ckpt.latest_step(), abstract)
        ckpt.close()
        fresh = jax.jit(init, out_shardings=replicated)()

        def backbone_vars(s):
            return {"params": s.params["backbone"], "batch_stats": s.batch_stats["backbone"]}

        pretrained = knn_top1(model, backbone_vars(state), config, mesh)
        print(
            f"kNN top-1, pretrained backbone: {pretrained['top1']:.2f}% "
            f"({pretrained['seconds']:.0f} s)",
            flush=True,
        )
        random = knn_top1(model, backbone_vars(fresh), config, mesh)
        print(
            f"kNN top-1, random backbone:     {random['top1']:.2f}% ({random['seconds']:.0f} s)",
            flush=True,
        )

    out = {
        "knn_top1_pretrained": float(pretrained["top1"]),
        "knn_top1_random": float(random["top1"]),
        "train_seconds": float(train_seconds),
        "images_per_s": float(images_per_s),
        "command": common.command_line(),
        "gap_points": float(pretrained["top1"] - random["top1"]),
        "knn_top5_pretrained": float(pretrained["top5"]),
        "knn_top5_random": float(random["top5"]),
        "knn_seconds": float(pretrained["seconds"] + random["seconds"]),
        "steps": steps,
        "epochs": steps * args.batch / 50_000,
        "final_loss": float(result.get("loss", float("nan"))),
        "steady_images_per_s": float(result.get("images_per_s", float("nan"))),
        "setup": {
            "config": "configs/cifar10.py",
            "dataset": DATASET,
            "arch": "resnet18 (cifar stem)",
            "width": args.width,
            "projector": args.projector,
            "batch": args.batch,
            "epochs": args.epochs,
            "warmup_epochs": args.warmup_epochs,
            "lr": args.lr,
            "lr_biases": args.lr if args.lr_biases is None else args.lr_biases,
            "dtype": args.dtype,
            "knn": {"k": config.knn.k, "temperature": config.knn.temperature},
        },
    }
    print()
    print(
        common.table(
            [
                ["pretrained", out["knn_top1_pretrained"], out["knn_top5_pretrained"]],
                ["random init", out["knn_top1_random"], out["knn_top5_random"]],
            ],
            ["backbone", "kNN top-1 %", "kNN top-5 %"],
        )
    )
    print(
        f"gap {out['gap_points']:.1f} points | pretraining {train_seconds:.0f} s, "
        f"{images_per_s:.1f} images/s overall ({out['steady_images_per_s']:.1f} at the last "
        f"log) | kNN {out['knn_seconds']:.0f} s"
    )
    if args.json:
        common.write_json(args.json, {**common.envelope(), **out})
    return out


if __name__ == "__main__":
    main()
