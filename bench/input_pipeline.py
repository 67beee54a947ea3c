"""Input-pipeline throughput: images per second per CPU core, TF pipeline vs the PIL baseline.

    python bench/input_pipeline.py --data_dir ../shared/tfds --json bench/results/pipeline.json

Measures, each in a fresh subprocess pinned to 1 and to 2 cores (os.sched_setaffinity; the
TF pipeline also gets threads = cores):
  tf_two_view_224    bt_jax.data.pretrain_batches on imagewoof320_sample (JPEG decode, both
                     views at 224 px with the BYOL parameters, uint8 batches of 64)
  tf_device_ops_two_view_224   the same with pixel_ops="device": the host part only (decode,
                     crop, resize, flip); jitter/grayscale/blur/solarize run in the train step
  pil_two_view_224   the official PyTorch transforms re-implemented with PIL + numpy on the
                     same JPEG bytes (one worker process per core, as DataLoader workers)
  tf_two_view_32_cifar / pil_two_view_32_cifar   the CIFAR preset on cifar10_jpeg
An "image" is one source image, i.e. one pair of views. Per core = images/s / cores (wall
clock; this is the JSON's images_per_s_per_core). "per cpu-s" = images per CPU-second used
(all threads / worker processes), which other jobs on a shared machine do not distort.
Each number is the best of --repeats timed passes.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import time

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]

# kind -> pixel_ops of the TF pipeline ("pil" is the baseline)
KINDS = {"tf": "host", "tf_device_ops": "device", "pil": None}
# name: (dataset, split, image size, blur on view 1, max images)
PIPELINES = {
    "two_view_224": ("imagewoof320_sample", "val", 224, True, 1000),
    "two_view_32_cifar": ("cifar10_jpeg", "train", 32, False, 6400),
}


# ---------------------------------------------------------------------------------------
# The official transforms (facebookresearch/barlowtwins main.py Transform), with PIL + numpy
# exactly as torchvision runs them on PIL images.


def _random_resized_crop(image, rng, size):
    """torchvision RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3), BICUBIC)."""
    from PIL import Image

    width, height = image.size
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            break
    else:  # central crop with the aspect clamped
        ratio = width / height
        if ratio < 3 / 4:
            w, h = width, int(round(width / (3 / 4)))
        elif ratio > 4 / 3:
            h, w = height, int(round(height * (4 / 3)))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return image.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)


def _adjust_hue(image, factor):
    """torchvision.transforms._functional_pil.adjust_hue."""
    from PIL import Image

    h, s, v = image.convert("HSV").split()
    hue = np.array(h, dtype=np.uint8)
    with np.errstate(over="ignore"):
        hue += np.uint8(int(factor * 255) % 256)
    return Image.merge("HSV", (Image.fromarray(hue, "L"), s, v)).convert("RGB")


def _color_jitter(image, rng):
    """ColorJitter(0.4, 0.4, 0.2, 0.1): the four ops in a random order."""
    from PIL import ImageEnhance

    b, c, s, h = (rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.8, 1.2),
                  rng.uniform(-0.1, 0.1))  # fmt: skip
    ops = [
        lambda x: ImageEnhance.Brightness(x).enhance(b),
        lambda x: ImageEnhance.Contrast(x).enhance(c),
        lambda x: ImageEnhance.Color(x).enhance(s),
        lambda x: _adjust_hue(x, h),
    ]
    for index in rng.sample(range(4), 4):
        image = ops[index](image)
    return image


def pil_view(image, rng, size, blur_prob, solarize_prob):
    """One view, returned as the normalised float32 CHW tensor the model would get."""
    from PIL import Image, ImageFilter, ImageOps

    image = _random_resized_crop(image, rng, size)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.8:
        image = _color_jitter(image, rng)
    if rng.random() < 0.2:  # RandomGrayscale: L, stacked to 3 channels
        gray = np.array(image.convert("L"), dtype=np.uint8)
        image = Image.fromarray(np.dstack([gray, gray, gray]), "RGB")
    if rng.random() < blur_prob:
        image = image.filter(ImageFilter.GaussianBlur(rng.random() * 1.9 + 0.1))
    if rng.random() < solarize_prob:
        image = ImageOps.solarize(image)
    chw = np.ascontiguousarray(np.array(image, np.uint8).transpose(2, 0, 1))  # ToTensor
    return (chw.astype(np.float32) / 255.0 - MEAN) / STD  # Normalize


def _pil_pairs(args):
    """Both views of each encoded image in a share (worker-process entry point)."""
    from PIL import Image

    encoded, size, blur, seed = args
    rng = random.Random(seed)
    start = time.process_time()
    for data in encoded:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        pil_view(image, rng, size, 1.0 if blur else 0.0, 0.0)
        pil_view(image, rng, size, 0.1 if blur else 0.0, 0.2)
    return len(encoded), time.process_time() - start


# ---------------------------------------------------------------------------------------
# One measurement, run in a subprocess pinned to `cores` cores.


def _encoded_images(data_dir, dataset, split, limit):
    import tensorflow_datasets as tfds

    ds = tfds.load(
        dataset, split=split, data_dir=data_dir, decoders={"image": tfds.decode.SkipDecoding()}
    )
    return [ex["image"] for ex in ds.take(limit).as_numpy_iterator()]


def measure_pil(data_dir, pipeline, cores, repeats):
    dataset, split, size, blur, limit = PIPELINES[pipeline]
    encoded = _encoded_images(data_dir, dataset, split, limit)
    best, best_cpu = math.inf, math.inf
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        pool.map(abs, range(cores))  # start the workers before timing
        for repeat in range(repeats):
            shares = [(encoded[i::cores], size, blur, repeat * cores + i) for i in range(cores)]
            start = time.perf_counter()
            counts, cpu_times = zip(*pool.map(_pil_pairs, shares), strict=True)
            best = min(best, time.perf_counter() - start)
            best_cpu = min(best_cpu, sum(cpu_times))
    return sum(counts) / best, sum(counts) / best_cpu


def measure_tf(data_dir, pipeline, cores, repeats, pixel_ops="host"):
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(cores)
    tf.config.threading.set_inter_op_parallelism_threads(cores)
    from bt_jax.data import cifar_views, data_config, imagenet_views, pretrain_batches

    dataset, split, size, _, limit = PIPELINES[pipeline]
    views = (imagenet_views if size >= 64 else cifar_views)(size, pixel_ops=pixel_ops)
    # Records cached in memory: the benchmark measures decode + augment, not the disk.
    cfg = data_config(dataset, data_dir=data_dir, train_split=f"{split}[:{limit}]", cache=True,
                      threads=cores, prefetch=1)  # fmt: skip
    batches = pretrain_batches(cfg, views, global_batch=64, seed=0, process_count=1,
                               process_index=0)  # fmt: skip
    iterator = iter(batches)
    steps = batches.steps_per_epoch
    for _ in range(steps):  # warm-up epoch: tracing, thread pools, autotuning
        next(iterator)
    best, best_cpu = math.inf, math.inf
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            batch = next(iterator)
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    assert batch["view1"].shape[1] == size
    return steps * 64 / best, steps * 64 / best_cpu


def _worker(spec):
    kind, pipeline, cores, data_dir, repeats = spec.split(",")
    cores, repeats = int(cores), int(repeats)
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if kind == "pil":
        rate, cpu_rate = measure_pil(data_dir, pipeline, cores, repeats)
    else:
        rate, cpu_rate = measure_tf(data_dir, pipeline, cores, repeats, KINDS[kind])
    print(json.dumps({"images_per_s": rate, "images_per_cpu_s": cpu_rate}))


def _run_worker(kind, pipeline, cores, data_dir, repeats):
    spec = f"{kind},{pipeline},{cores},{data_dir},{repeats}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--_worker", spec],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"{spec} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["images_per_s"], result["images_per_cpu_s"]


def _cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=os.environ.get("BT_JAX_TFDS_DIR"))
    parser.add_argument("--json", default="bench/results/input_pipeline.json")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--cores", default="1,2")
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        return _worker(args._worker)
    if not args.data_dir or not os.path.isdir(os.path.join(args.data_dir, "imagewoof320_sample")):
        sys.exit(
            "needs the offline TFDS sets (imagewoof320_sample, cifar10_jpeg): pass --data_dir "
            f"or set BT_JAX_TFDS_DIR (got {args.data_dir!r})"
        )
    data_dir = os.path.abspath(args.data_dir)
    available = len(os.sched_getaffinity(0))
    results = {}
    print(f"{'pipeline':40s} {'cores':>5s} {'images/s':>9s} {'per core':>9s} {'per cpu-s':>9s}")
    for pipeline in args.pipelines.split(","):
        size = PIPELINES[pipeline][2]
        for cores in (int(c) for c in args.cores.split(",")):
            if cores > available:
                print(f"skipping {cores} cores: only {available} available")
                continue
            for kind in args.kinds.split(","):
                rate, cpu_rate = _run_worker(kind, pipeline, cores, data_dir, args.repeats)
                name = f"{kind}_{pipeline}_{cores}core"
                results[name] = {
                    "images_per_s_per_core": rate / cores,
                    "size": size,
                    "cores": cores,
                }
                line = f"{name:40s} {cores:5d} {rate:9.1f} {rate / cores:9.1f} {cpu_rate:9.1f}"
                print(line, flush=True)
            pil = results.get(f"pil_{pipeline}_{cores}core")
            for kind in ("tf", "tf_device_ops"):
                measured = results.get(f"{kind}_{pipeline}_{cores}core")
                if pil and measured:
                    ratio = measured["images_per_s_per_core"] / pil["images_per_s_per_core"]
                    print(f"{'  ' + kind + ' / pil':40s} {ratio:9.2f}x", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        meta = {
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "cpu": _cpu_model(),
            "cores_available": available,
            "date": datetime.date.today().isoformat(),
        }
        print(f"wrote {args.json} ({json.dumps(meta)})")


if __name__ == "__main__":
    main()
