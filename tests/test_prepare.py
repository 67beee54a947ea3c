"""Your own images: a folder of JPEG/PNG files becomes a TFDS dataset the configs train on.

The folder is made here: two classes of RGB JPEGs, plus a grayscale JPEG, a CMYK JPEG, an
RGBA PNG, a palette PNG, a 16-bit PNG, an EXIF-rotated JPEG, a corrupt file, a non-image
file and a hidden one. The README's "Your own data" commands run on it (paths substituted).
"""

import io
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from e2e import ROOT, cpu_env
from PIL import Image

from bt_jax.data import prepare

README = pathlib.Path(ROOT, "README.md").read_text()
PER_CLASS = 40


def _save(path: pathlib.Path, image: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def _noise(rng, size, mode="RGB") -> Image.Image:
    channels = {"RGB": 3, "CMYK": 4, "RGBA": 4}.get(mode, 1)
    shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _smooth(rng, size, mode="RGB") -> Image.Image:
    """Blobs of colour (noise of 4 x 4 pixels, upsampled): JPEG keeps them within ~2 levels,
    so a wrong conversion (inverted CMYK, dropped alpha, unrotated) stands out."""
    return _noise(rng, (4, 4), mode).resize(size, Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("my_images")
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        for i in range(PER_CLASS):
            size = (int(rng.integers(24, 64)), int(rng.integers(24, 64)))
            _save(root / label / f"{i:03d}.jpg", _noise(rng, size), quality=90)
    _save(root / "cat" / "gray.jpg", _smooth(rng, (40, 30), "L"))
    _save(root / "cat" / "cmyk.jpg", _smooth(rng, (40, 30), "CMYK"), quality=98)
    _save(root / "dog" / "alpha.png", _smooth(rng, (30, 40), "RGBA"))
    _save(
        root / "dog" / "nested" / "palette.png",
        _smooth(rng, (32, 32)).quantize(16, dither=Image.Dither.NONE),
    )
    deep = np.asarray(_smooth(rng, (30, 20), "L"), np.uint16) * 200  # 16 bits, max < 65536
    _save(root / "dog" / "deep.png", Image.fromarray(deep))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    _save(root / "dog" / "rotated.jpg", _smooth(rng, (40, 20)), exif=exif, quality=98)
    good = io.BytesIO()
    _noise(rng, (48, 48)).save(good, format="JPEG")
    (root / "cat" / "broken.jpg").write_bytes(good.getvalue()[:300])  # truncated download
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / ".DS_Store").write_bytes(b"\0\1")
    return root


def _own_data_commands() -> list[str]:
    section = README.split("## Your own data")[1].split("\n## ")[0]
    block = re.findall(r"```sh\n(.*?)```", section, flags=re.S)[0]
    return [" ".join(ln.split()) for ln in block.replace("\\\n", " ").splitlines() if ln.strip()]


def _run(command: str, image_folder, tmp_path, *extra, env=None):
    command = command.replace("/path/to/my_images", str(image_folder))
    command = re.sub(r"/tmp/(bt_[\w.]+)", lambda m: str(tmp_path / m.group(1)), command)
    argv = shlex.split(command)
    assert argv[0] == "python"
    return subprocess.run(
        [sys.executable, *argv[1:], *extra],
        cwd=ROOT,
        env=env or cpu_env(8),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def prepared(image_folder, tmp_path_factory):
    """The README's prepare command, run on the folder."""
    tmp_path = tmp_path_factory.mktemp("prepared")
    result = _run(_own_data_commands()[0], image_folder, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path, result


def _examples(builder, split):
    return list(
        tfds.as_numpy(builder.as_dataset(split, decoders={"image": tfds.decode.SkipDecoding()}))
    )


def test_prepare_reports_the_corrupt_file_and_keeps_every_other_image(prepared, image_folder):
    tmp_path, result = prepared
    assert f"skipped {image_folder / 'cat' / 'broken.jpg'}: " in result.stdout
    assert "1 unreadable files skipped" in result.stdout
    assert "(1 other files ignored)" in result.stdout  # notes.txt; .DS_Store is hidden
    builder = tfds.builder("my_images", data_dir=str(tmp_path / "bt_own_data"))
    assert builder.info.features["label"].names == ["cat", "dog"]
    train, test = _examples(builder, "train"), _examples(builder, "test")
    ids = sorted(e["id"].decode() for e in train + test)
    expected = [str(p.relative_to(image_folder)) for p in image_folder.rglob("*")]
    expected = sorted(p for p in expected if p.endswith((".jpg", ".png")) and "broken" not in p)
    assert ids == expected and len(ids) == 2 * PER_CLASS + 6
    assert 0 < len(test) < len(train)  # --test_fraction=0.2, by a hash of the path
    for example in train + test:
        label = builder.info.features["label"].int2str(example["label"])
        assert example["id"].decode().startswith(label + "/")
        assert tf.io.is_jpeg(example["image"]).numpy()  # every image stored as a JPEG
        assert tf.io.decode_jpeg(example["image"]).shape[-1] in (1, 3)


def test_images_are_stored_as_rgb_jpegs_true_to_the_source(prepared, image_folder):
    tmp_path, _ = prepared
    builder = tfds.builder("my_images", data_dir=str(tmp_path / "bt_own_data"))
    stored = {
        e["id"].decode(): e["image"] for s in ("train", "test") for e in _examples(builder, s)
    }
    # RGB and grayscale JPEGs: byte for byte
    for path in ("cat/000.jpg", "dog/017.jpg", "cat/gray.jpg"):
        assert stored[path] == (image_folder / path).read_bytes(), path

    def decoded(path):
        return tf.io.decode_jpeg(stored[path], channels=3).numpy().astype(np.float64)

    def source(path, transform=lambda im: im.convert("RGB")):
        with Image.open(image_folder / path) as im:
            return np.asarray(transform(im), np.float64)

    def white_background(im):
        rgba = np.asarray(im.convert("RGBA"), np.float64)
        alpha = rgba[..., 3:] / 255.0
        return Image.fromarray(
            (rgba[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
        )

    def rotated(im):  # EXIF 6: the upright image is the stored one turned 90 degrees clockwise
        return im.convert("RGB").transpose(Image.Transpose.ROTATE_270)

    def eight_bit(im):
        deep = np.asarray(im, np.float64)
        return Image.fromarray((deep * 255.0 / deep.max()).round().astype(np.uint8)).convert("RGB")

    for path, transform in (
        ("cat/cmyk.jpg", lambda im: im.convert("RGB")),
        ("dog/alpha.png", white_background),
        ("dog/nested/palette.png", lambda im: im.convert("RGB")),
        ("dog/rotated.jpg", rotated),
        ("dog/deep.png", eight_bit),
    ):
        ours, theirs = decoded(path), source(path, transform)
        assert ours.shape == theirs.shape, path
        assert np.abs(ours - theirs).mean() < 4, path  # a wrong conversion: tens of levels


@pytest.mark.slow
def test_quickstart_trains_on_the_prepared_folder(prepared, image_folder):
    """The README's training command, on the smoke variant for two steps."""
    tmp_path, _ = prepared
    command = _own_data_commands()[1].replace(
        "configs/quickstart.py", "configs/quickstart.py:smoke"
    )
    result = _run(
        command, image_folder, tmp_path, "--config.train.stop_after_steps=2", env=cpu_env(8)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[pretrain] step 2/2" in result.stdout
    assert os.path.isdir(tmp_path / "bt_own_run" / "checkpoints" / "2")


def test_layouts_and_bad_input(tmp_path):
    rng = np.random.default_rng(1)
    flat = tmp_path / "flat"
    for i in range(3):
        _save(flat / f"{i}.png", _noise(rng, (8, 8)))
    splits, names, _ = prepare.scan(str(flat))
    assert names == [] and [c for _, c in splits["train"]] == [None] * 3  # unlabelled
    by_split = tmp_path / "by_split"
    for split in ("train", "val"):
        _save(by_split / split / "a" / "x.jpg", _noise(rng, (8, 8)))
    splits, names, _ = prepare.scan(str(by_split))
    assert sorted(splits) == ["train", "val"] and names == ["a"]
    with pytest.raises(prepare.PrepareError, match="needs a folder without split subfolders"):
        prepare.scan(str(by_split), 0.1)
    _save(by_split / "loose.jpg", _noise(rng, (8, 8)))
    with pytest.raises(prepare.PrepareError, match="both images .* and subfolders"):
        prepare.scan(str(by_split))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(prepare.PrepareError, match="no images"):
        prepare.scan(str(tmp_path / "empty"))
    with pytest.raises(prepare.PrepareError, match="TFDS names"):
        prepare.prepare(str(flat), "My-Images", str(tmp_path / "out"))
    with pytest.raises(prepare.PrepareError, match="catalog dataset"):
        prepare.prepare(str(flat), "mnist", str(tmp_path / "out"))


def test_progress_lines_and_an_unlabelled_dataset(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    for i in range(3):
        _save(tmp_path / "flat" / f"{i}.jpg", _noise(rng, (8, 8)))
    monkeypatch.setattr(prepare, "_PROGRESS_EVERY_S", 0.0)  # a line after every chunk
    lines = []
    written = prepare.prepare(
        str(tmp_path / "flat"), "flat_images", str(tmp_path), report=lines.append
    )
    assert written == {"train": 3}
    assert any(
        re.fullmatch(r"\[prepare\] train: 3/3 images \(100%\), 0 skipped, .*ETA .*", ln)
        for ln in lines
    )
    builder = tfds.builder("flat_images", data_dir=str(tmp_path))
    assert sorted(builder.info.features.keys()) == ["id", "image"]  # no label: unlabelled
    with pytest.raises(prepare.PrepareError, match="exists; pass --overwrite"):
        prepare.prepare(str(tmp_path / "flat"), "flat_images", str(tmp_path), report=lines.append)
