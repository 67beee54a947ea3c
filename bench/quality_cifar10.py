r"""CIFAR-10 quality on the reference recipe: pretrain, then kNN top-1 against a random backbone.

For each seed: the pretraining job (bt_jax.main.run on configs/cifar10.py with the knobs
below), with the kNN monitor at every epoch on a subset (train[:10000] bank, test[:2000]
queries: the learning curve); then the kNN job (configs/knn.py, bt_jax/knn_eval.py: k=200,
cosine, exp(sim/0.1) weights, eval preprocessing) on the final checkpoint, bank = the 50,000
training images, queries = the 10,000 test images. The baseline is the kNN job on the same
architecture freshly initialised (config.random_init, seed = the run's) with its BN running
statistics re-estimated on training images (precise BN, bt_jax/evaluation/backbone.py: the
mean of each BN's train-mode batch statistics over --bn_batches batches of --bn_batch
images, 50 x 256 = 12,800 by default; the JSON records the number used), not the initial
mean 0 / variance 1 that no trained network has.

Defaults = the reference recipe: ResNet-18 with the CIFAR stem at width 0.25, projector
2048-2048-2048, batch 256, 5 epochs with 1 warm-up epoch, lr 0.3 for weights and for
biases/BN, LARS eta 0.02 without LR clipping, weight decay 1e-4, loss x 0.1, float32,
CIFAR-10 normalisation. The command (from the repository root; per seed ~40 min of
pretraining on 2 idle CPU cores, as estimated from a 3,097 s run on a shared machine, plus
the 5 monitor kNNs and the two final kNN jobs, a few minutes):

  python bench/quality_cifar10.py --data_dir=../shared/tfds --seeds 0,1

prints one row per seed and the mean and spread (sample standard deviation) over seeds, and
writes bench/results/quality_cifar10.json (--json): per seed the loss curve (every logged
step), the monitor's kNN at each epoch, both final kNN results, the BN images used, wall
times; and the summary over seeds. The data folder must hold the prepared `cifar10_jpeg` TFDS
set (--data_dir or BT_JAX_TFDS_DIR). --train_split / --knn_bank / --knn_queries /
--monitor_bank / --monitor_queries take TFDS slices for smoke runs (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DATASET = "cifar10_jpeg"
TFDS_ENV = "BT_JAX_TFDS_DIR"
CURVE = ("step", "epoch", "loss", "c_diag_mean", "c_offdiag_rms", "online_linear_train_top1")
NORMALIZATIONS = ("auto", "cifar10", "imagenet")  # bt_jax/data/normalization.py CHOICES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data_dir", default=os.environ.get(TFDS_ENV), help=f"default: ${TFDS_ENV}")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, one run each")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--warmup_epochs", type=int, default=1)
    p.add_argument("--width", type=float, default=0.25, help="ResNet-18 channel multiplier")
    p.add_argument("--projector", default="2048-2048-2048")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr_weights", type=float, default=0.3, help="base LR (x batch/256)")
    p.add_argument("--lr_biases", type=float, default=0.3, help="base LR of biases and BN")
    p.add_argument("--eta", type=float, default=0.02, help="LARS trust coefficient")
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--loss_scale", type=float, default=0.1)
    p.add_argument(
        "--clip_lr",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="LARS LR clipping (solo-learn's exclude/clip option; configs/cifar10.py has it on)",
    )
    p.add_argument("--normalization", default="cifar10", choices=NORMALIZATIONS)
    p.add_argument("--dtype", default="float32", help="compute dtype (bf16 convs are slow on CPU)")
    p.add_argument("--train_split", default="train")
    p.add_argument("--monitor_bank", default="train[:10000]")
    p.add_argument("--monitor_queries", default="test[:2000]")
    p.add_argument("--monitor_every_epochs", type=int, default=1, help="0 = no learning curve")
    p.add_argument("--knn_bank", default="train")
    p.add_argument("--knn_queries", default="test")
    p.add_argument("--knn_batch", type=int, default=500, help="divides 50,000 and 10,000")
    p.add_argument(
        "--bn_batches", type=int, default=50, help="precise-BN batches; 0 = initial stats"
    )
    p.add_argument("--bn_batch", type=int, default=256, help="precise-BN batch size")
    p.add_argument("--log_every_steps", type=int, default=25, help="loss curve resolution")
    p.add_argument("--stop_after_steps", type=int, default=0, help=">0: cut each run")
    p.add_argument("--devices", type=int, default=1, help="CPU devices (XLA host devices)")
    p.add_argument("--workdir", default=None, help="default: a fresh temporary folder")
    p.add_argument("--json", default=os.path.join(common.RESULTS_DIR, "quality_cifar10.json"))
    args = p.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds: comma-separated integers, e.g. --seeds 0,1 (got {args.seeds!r})")
    return args


def pretrain_config(args, seed: int):
    """configs/cifar10.py with the bench's knobs."""
    from configs import cifar10

    config = cifar10.get_config()
    config.seed = seed
    config.model.width = args.width
    config.model.projector = args.projector
    config.model.dtype = args.dtype
    config.model.normalization = args.normalization
    config.loss.scale = args.loss_scale
    config.optim.lr_weights = args.lr_weights
    config.optim.lr_biases = args.lr_biases
    config.optim.eta = args.eta
    config.optim.weight_decay = args.weight_decay
    config.optim.clip_lr = args.clip_lr
    config.optim.warmup_epochs = args.warmup_epochs
    config.train.global_batch = args.batch
    config.train.epochs = args.epochs
    config.train.stop_after_steps = args.stop_after_steps
    config.train.log_every_steps = args.log_every_steps
    config.train.checkpoint_every_steps = 200  # a crashed run resumes from its workdir
    config.train.async_checkpoints = False
    config.data.dataset = DATASET
    config.data.data_dir = args.data_dir
    config.data.train_split = args.train_split
    config.knn.every_epochs = args.monitor_every_epochs
    config.knn.at_end = args.monitor_every_epochs > 0  # the last epoch's point, same subset
    config.knn.bank_split = args.monitor_bank
    config.knn.query_split = args.monitor_queries
    config.knn.global_batch = args.knn_batch
    return config


def knn_config(args, pretrained_workdir: str, seed: int, random_init: bool):
    """configs/knn.py on the run's checkpoint, or (random_init) its architecture, fresh."""
    from configs import knn

    config = knn.get_config()
    config.seed = seed
    config.pretrained_workdir = pretrained_workdir
    config.random_init = random_init
    config.random_init_bn.batches = args.bn_batches
    config.random_init_bn.global_batch = args.bn_batch
    config.data.dataset = DATASET
    config.data.data_dir = args.data_dir
    config.data.train_split = args.train_split  # precise BN's images
    config.data.eval_split = "test"
    config.data.cache = True
    config.knn.bank_split = args.knn_bank
    config.knn.query_split = args.knn_queries
    config.knn.image_size = 32
    config.knn.global_batch = args.knn_batch
    return config


def run_seed(args, seed: int, root: str) -> dict:
    from bt_jax import main, reporting

    workdir = os.path.join(root, f"seed{seed}")
    pretrain_dir = os.path.join(workdir, "pretrain")
    print(f"seed {seed}: pretraining in {pretrain_dir}", flush=True)
    t0 = time.perf_counter()
    final = main.run(pretrain_config(args, seed), pretrain_dir)
    train_seconds = time.perf_counter() - t0
    train_rows = reporting.read_metrics(pretrain_dir, "train")
    monitor_rows = reporting.read_metrics(pretrain_dir, "knn")

    knn = {}
    for name, random_init in (("pretrained", False), ("random", True)):
        t0 = time.perf_counter()
        config = knn_config(args, pretrain_dir, seed, random_init)
        knn[name] = main.run(config, os.path.join(workdir, f"knn_{name}"))
        knn[name]["seconds"] = time.perf_counter() - t0
    with open(os.path.join(workdir, "knn_random", "results.json")) as f:
        random_info = json.load(f)["backbone"]
    steps = int(final["step"])
    steps_per_epoch = train_rows[-1]["step"] / train_rows[-1]["epoch"]
    return {
        "seed": seed,
        "knn_top1_pretrained": float(knn["pretrained"]["knn_top1"]),
        "knn_top5_pretrained": float(knn["pretrained"]["knn_top5"]),
        "knn_top1_random": float(knn["random"]["knn_top1"]),
        "knn_top5_random": float(knn["random"]["knn_top5"]),
        "gap_points": float(knn["pretrained"]["knn_top1"] - knn["random"]["knn_top1"]),
        "rankme_pretrained": float(knn["pretrained"]["rankme"]),
        "rankme_random": float(knn["random"]["rankme"]),
        "knn_queries": int(knn["pretrained"]["knn_num_queries"]),
        "random_bn_images": int(random_info.get("bn_images", 0)),
        "random_bn_statistics": random_info.get("bn_statistics", "initial (mean 0, var 1)"),
        "steps": steps,
        "train_seconds": float(train_seconds),
        "images_per_s": float(steps * args.batch / train_seconds),
        "knn_seconds": float(knn["pretrained"]["seconds"] + knn["random"]["seconds"]),
        "final_loss": float(final.get("loss", float("nan"))),
        "loss_curve": [{k: r[k] for k in CURVE if k in r} for r in train_rows],
        # kNN top-1/top-5, RankMe and the online probe on the monitor's subset, every epoch
        "monitor_knn": [
            {"epoch": r["step"] / steps_per_epoch, **{k: v for k, v in r.items() if k != "tag"}}
            for r in monitor_rows
        ],
        "workdir": workdir,
    }


def summarise(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": spread, "min": min(values), "max": max(values)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.data_dir or not os.path.isdir(os.path.join(args.data_dir, DATASET)):
        sys.exit(
            f"quality_cifar10: needs the prepared TFDS set {DATASET!r}: pass --data_dir=FOLDER "
            f"or set {TFDS_ENV} to the folder that holds {DATASET}/ (got {args.data_dir!r})"
        )
    args.data_dir = os.path.abspath(args.data_dir)
    common.set_devices(args.devices)
    root = args.workdir or tempfile.mkdtemp(prefix="bt_quality_cifar10_")
    print(
        f"resnet18 x{args.width} cifar stem, projector {args.projector}, batch {args.batch}, "
        f"{args.epochs} epochs ({args.warmup_epochs} warm-up), lr {args.lr_weights}/"
        f"{args.lr_biases}, eta {args.eta}, wd {args.weight_decay}, loss x {args.loss_scale}, "
        f"clip_lr {args.clip_lr}, {args.normalization} normalisation, {args.dtype}, "
        f"seeds {args.seeds}",
        flush=True,
    )
    runs = [run_seed(args, seed, root) for seed in args.seeds]
    keys = ("knn_top1_pretrained", "knn_top1_random", "gap_points", "train_seconds")
    summary = {key: summarise(runs, key) for key in keys}
    out = {
        "command": common.command_line(),
        "setup": {k: v for k, v in vars(args).items() if k not in ("json", "workdir")},
        "summary": summary,
        "runs": runs,
    }
    rows = [
        [
            r["seed"],
            r["knn_top1_pretrained"],
            r["knn_top5_pretrained"],
            r["knn_top1_random"],
            r["gap_points"],
            r["train_seconds"],
        ]
        for r in runs
    ]
    rows.append(
        ["mean ± std"]
        + [
            f"{summary[k]['mean']:.2f} ± {summary[k]['std']:.2f}" if k in summary else ""
            for k in ("knn_top1_pretrained", "", "knn_top1_random", "gap_points")
        ]
        + [f"{summary['train_seconds']['mean']:.0f}"]
    )
    print()
    header = ["seed", "kNN top-1 %", "top-5 %", "random top-1 %", "gap (points)", "train s"]
    print(common.table(rows, header))
    print(
        f"random baseline: BN statistics re-estimated on {runs[0]['random_bn_images']} "
        f"{args.train_split} images; kNN on {runs[0]['knn_queries']} {args.knn_queries} queries"
    )
    if args.json:
        common.write_json(args.json, {**common.envelope(), **out})
    return out


if __name__ == "__main__":
    common.run_as_the_job(main)
