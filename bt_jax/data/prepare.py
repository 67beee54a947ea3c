r"""A folder of your own images -> a TFDS dataset that every config can name.

  python -m bt_jax.data.prepare --image_folder=DIR --name=NAME --data_dir=OUT [--test_fraction=0.1]

then train on it with `--config.data.dataset=NAME --config.data.data_dir=OUT`.

Layouts of DIR (hidden files skipped, non-image files counted and ignored):
- DIR/<class>/**/<image>: labelled by the class subfolder (ClassLabel, names sorted);
- DIR/<split>/<class>/**/<image> with split folders among train, test, val, validation:
  those splits (configs evaluate on "test" for a dataset they do not know; name another
  with --config.data.eval_split=val);
- DIR/<image> (a flat folder): unlabelled, for pretraining only (add
  --config.knn.at_end=False; kNN needs labels).
--test_fraction holds out that fraction of each class of a single-split folder as "test"
(the split the configs evaluate on for a dataset they do not know), chosen by a hash of the
file's path, so the same files are held out on every run.

Images: RGB and grayscale JPEGs are stored byte for byte; every other image (PNG with or
without alpha, palette, 16-bit, CMYK JPEGs, rotated phone photos, WebP, BMP, TIFF, GIF) is
decoded with Pillow, made upright, alpha composited onto white, and stored as an RGB JPEG
(quality 95, full-resolution chroma), the format the pipeline decodes fused with its crop.
Every file is fully decoded first: one that cannot be is reported with its path and the
reason, and skipped.
Each example: image, label (labelled layouts) and id (the path relative to DIR).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import io
import os
import re
import sys
import time

import numpy as np
from PIL import Image, ImageOps

from bt_jax.reporting import format_duration

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_FOLDERS = ("train", "test", "val", "validation")
VERSION = "1.0.0"
_CHUNK = 256  # files decoded ahead of the writer, at most
_PROGRESS_EVERY_S = 10.0


class PrepareError(ValueError):
    """Bad input, with the fix in its message."""


def _visible(names):
    return sorted(n for n in names if not n.startswith("."))


def _images_under(folder: str, root: str) -> tuple[list[str], int]:
    """Image paths under folder (relative to root, sorted) and the count of other files."""
    images, others = [], 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = _visible(dirnames)
        for name in _visible(filenames):
            if name.lower().endswith(IMAGE_SUFFIXES):
                images.append(os.path.relpath(os.path.join(dirpath, name), root))
            else:
                others += 1
    return sorted(images), others


def _labelled(folder: str, root: str) -> tuple[dict[str, list[str]], int]:
    """class name -> image paths, for folder/<class>/**/<image>."""
    by_class, ignored = {}, 0
    for name in _visible(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            by_class[name], others = _images_under(path, root)
            ignored += others
        else:
            ignored += 1  # loose files beside the class folders belong to no class
    return {c: files for c, files in by_class.items() if files}, ignored


def scan(image_folder: str, test_fraction: float = 0.0):
    """-> (splits: {split: [(relative path, class name or None)]}, class names, ignored)."""
    if not os.path.isdir(image_folder):
        raise PrepareError(f"--image_folder {image_folder} is not a folder")
    entries = _visible(os.listdir(image_folder))
    folders = [e for e in entries if os.path.isdir(os.path.join(image_folder, e))]
    loose = [e for e in entries if e.lower().endswith(IMAGE_SUFFIXES)]
    if loose and folders:
        raise PrepareError(
            f"{image_folder} holds both images ({loose[0]}, ...) and subfolders "
            f"({folders[0]}, ...): put every image in a class subfolder (labelled) or none "
            "(unlabelled)"
        )
    if loose or not folders:  # flat: unlabelled
        images, ignored = _images_under(image_folder, image_folder)
        splits = {"train": [(p, None) for p in images]}
    elif set(folders) <= set(SPLIT_FOLDERS):
        splits, ignored = {}, 0
        for folder in folders:
            by_class, others = _labelled(os.path.join(image_folder, folder), image_folder)
            ignored += others
            splits[folder] = [(p, c) for c, files in by_class.items() for p in files]
    else:
        by_class, ignored = _labelled(image_folder, image_folder)
        splits = {"train": [(p, c) for c, files in by_class.items() for p in files]}
    if not any(splits.values()):
        raise PrepareError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {image_folder}")
    if test_fraction:
        if len(splits) > 1:
            raise PrepareError("--test_fraction needs a folder without split subfolders")
        splits = _hold_out(splits["train"], test_fraction)
    names = sorted({c for files in splits.values() for _, c in files if c is not None})
    return splits, names, ignored


def _hold_out(files, fraction: float) -> dict:
    """Each file goes to test when a hash of its path falls below fraction (stable)."""
    if not 0 < fraction < 1:
        raise PrepareError(f"--test_fraction={fraction} must lie strictly between 0 and 1")

    def unit(path):
        return int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") / 2.0**64

    test = [f for f in files if unit(f[0]) < fraction]
    train = [f for f in files if unit(f[0]) >= fraction]
    return {"train": train, "test": test}


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float: scale to 8 bits
        pixels = np.asarray(image, np.float64)
        top = pixels.max() or 1.0
        image = Image.fromarray((pixels * (255.0 / top)).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def encode(data: bytes) -> bytes:
    """The bytes to store for one image file (see the module docstring); raises if corrupt."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # a full decode: truncated and corrupt files fail here
        orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation
        if image.format == "JPEG" and image.mode in ("RGB", "L") and orientation == 1:
            return data
        upright = ImageOps.exif_transpose(image)
        out = io.BytesIO()
        _to_rgb(upright).save(out, format="JPEG", quality=95, subsampling=0)  # 4:4:4 chroma
        return out.getvalue()


def _read_one(root: str, path: str):
    try:
        with open(os.path.join(root, path), "rb") as f:
            return encode(f.read()), None
    except Exception as err:  # Pillow raises many types for bad files  # noqa: BLE001
        return None, f"{type(err).__name__}: {err}"


class _Examples:
    """One split's (key, example) pairs, decoded in a thread pool, with progress lines."""

    def __init__(self, root, split, files, labelled, report):
        self.root, self.split, self.files, self.labelled = root, split, files, labelled
        self.report = report
        self.skipped: list[tuple[str, str]] = []
        self.written = 0

    def __iter__(self):
        t0 = last = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            for start in range(0, len(self.files), _CHUNK):
                chunk = self.files[start : start + _CHUNK]
                decoded = pool.map(lambda f: _read_one(self.root, f[0]), chunk)
                for (path, label), (data, error) in zip(chunk, decoded, strict=True):
                    if error is not None:
                        self.skipped.append((path, error))
                        self.report(f"skipped {os.path.join(self.root, path)}: {error}")
                        continue
                    example = {"image": data, "id": path}
                    if self.labelled:
                        example["label"] = label
                    self.written += 1
                    yield path, example
                if time.monotonic() - last >= _PROGRESS_EVERY_S:
                    last = time.monotonic()
                    done = start + len(chunk)
                    rate = done / (last - t0)
                    self.report(
                        f"{self.split}: {done}/{len(self.files)} images "
                        f"({100 * done / len(self.files):.0f}%), {len(self.skipped)} skipped, "
                        f"{rate:.0f} img/s, ETA {format_duration((len(self.files) - done) / rate)}"
                    )


def prepare(image_folder, name, data_dir, *, test_fraction=0.0, overwrite=False, report=print):
    """Write the dataset NAME under data_dir; returns {split: images written}."""
    import tensorflow_datasets as tfds

    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise PrepareError(f"--name={name!r}: use lower case letters, digits and _ (TFDS names)")
    if name in tfds.list_builders():
        raise PrepareError(f"--name={name!r} is a TFDS catalog dataset; choose another name")
    target = os.path.join(data_dir, name, VERSION)
    if os.path.exists(target):
        if not overwrite:
            raise PrepareError(f"{target} exists; pass --overwrite to rebuild it")
        import shutil

        shutil.rmtree(target)
    splits, class_names, ignored = scan(image_folder, test_fraction)
    labelled = bool(class_names)
    features = {"image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")}
    features["id"] = tfds.features.Text()
    if labelled:
        features["label"] = tfds.features.ClassLabel(names=class_names)
    examples = {
        split: _Examples(image_folder, split, files, labelled, lambda m: report(f"[prepare] {m}"))
        for split, files in splits.items()
        if files
    }
    what = f"{len(class_names)} classes" if labelled else "unlabelled"
    report(
        f"[prepare] {image_folder}: {what}, "
        + ", ".join(f"{s} {len(f)} images" for s, f in splits.items())
        + (f" ({ignored} other files ignored)" if ignored else "")
    )
    tfds.dataset_builders.store_as_tfds_dataset(
        name=name,
        version=VERSION,
        features=tfds.features.FeaturesDict(features),
        split_datasets=examples,
        data_dir=data_dir,
        description=f"Images of {os.path.abspath(image_folder)}, by bt_jax.data.prepare.",
    )
    written = {split: ex.written for split, ex in examples.items()}
    skipped = [s for ex in examples.values() for s in ex.skipped]
    report(
        f"[prepare] wrote {name} to {target}: "
        + ", ".join(f"{s} {n}" for s, n in written.items())
        + f"; {len(skipped)} unreadable files skipped"
        + "".join(f"\n  {os.path.join(image_folder, p)}: {e}" for p, e in skipped)
    )
    if not all(written.values()):
        raise PrepareError(f"a split of {name} ended empty: every file in it was unreadable")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="A folder of images -> a TFDS dataset.")
    parser.add_argument(
        "--image_folder", required=True, help="the folder of images (layouts: see --help)"
    )
    parser.add_argument("--name", required=True, help="dataset name (--config.data.dataset)")
    parser.add_argument(
        "--data_dir", required=True, help="TFDS data folder (--config.data.data_dir)"
    )
    parser.add_argument("--test_fraction", type=float, default=0.0, help="hold out as 'test'")
    parser.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")
    args = parser.parse_args(argv)
    try:
        prepare(
            args.image_folder,
            args.name,
            args.data_dir,
            test_fraction=args.test_fraction,
            overwrite=args.overwrite,
        )
    except PrepareError as err:
        print(f"bt_jax.data.prepare: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
