"""Evaluating torchvision / timm ResNet files (--config.pretrained_torchvision): the
architecture read from torchvision's own definitions, prefixes, heads and whole-model
checkpoints, strict loading, clear errors; the same numbers as from the bt_jax workdir the
file was exported from; the documented commands for the official checkpoint.
"""

import ast
import hashlib
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from e2e import ROOT, cpu_env
from e2e_eval import load_config, read_results, write_init_checkpoint

from bt_jax import export
from bt_jax.evaluation import backbone
from bt_jax.models import torchvision_layout

try:  # optional (.[bench]); without it the .pth cases skip and .safetensors stands in
    import torch
except ImportError:
    torch = None


def _needs_torch():
    if torch is None:
        pytest.skip("PyTorch is not installed (pip install '.[bench]'): .pth files not tested")


# torchvision.models.resnet's builders: resnet18 ... resnet152
TORCHVISION = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def torchvision_shapes(block, layers, base=64, stem=7, fc=True) -> dict[str, tuple]:
    """name -> shape of torchvision's ResNet state_dict, following its __init__,
    _make_layer, BasicBlock and Bottleneck (base = width_per_group 64 scaled)."""
    shapes = {}

    def conv(name, out, inp, k):
        shapes[f"{name}.weight"] = (out, inp, k, k)

    def bn(name, channels):
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{p}"] = (channels,)
        shapes[f"{name}.num_batches_tracked"] = ()

    conv("conv1", base, 3, stem)
    bn("bn1", base)
    expansion = 4 if block == "bottleneck" else 1
    inplanes = base
    for stage, blocks in enumerate(layers):
        planes = base * 2**stage
        for b in range(blocks):
            p, stride = f"layer{stage + 1}.{b}", 2 if stage > 0 and b == 0 else 1
            kernels = (3, 3) if block == "basic" else (1, 3, 1)
            widths = (planes, planes) if block == "basic" else (planes, planes, 4 * planes)
            inp = inplanes
            for i, (k, out) in enumerate(zip(kernels, widths, strict=True), 1):
                conv(f"{p}.conv{i}", out, inp, k)
                bn(f"{p}.bn{i}", out)
                inp = out
            if b == 0 and (stride != 1 or inplanes != planes * expansion):
                conv(f"{p}.downsample.0", planes * expansion, inplanes, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    if fc:
        shapes.update({"fc.weight": (1000, inplanes), "fc.bias": (1000,)})
    return shapes


def zeros(shapes) -> dict[str, np.ndarray]:
    """Arrays of those shapes that take no memory (zero strides): enough for keys/shapes."""
    return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}


def _loads_strictly(state, model_cfg):
    module = backbone.build_backbone(model_cfg.to_dict())
    template = backbone._template(module)
    return torchvision_layout.backbone_from_torchvision(state, template["params"])


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_architecture_of_each_torchvision_resnet(name):
    state, left_out = backbone.backbone_state(zeros(torchvision_shapes(*TORCHVISION[name])))
    assert left_out == ["fc.bias", "fc.weight"]
    model = backbone.infer_model_config(state)
    assert (model.arch, tuple(model.stage_sizes), model.width, model.cifar_stem) == (
        name,
        (),
        1.0,
        False,
    )
    _loads_strictly(state, model)  # every key placed, every shape right


@pytest.mark.parametrize(
    "shapes, expected",
    [
        # solo-learn's CIFAR ResNet-18: 3x3 stride-1 stem, no max-pool
        (torchvision_shapes("basic", (2, 2, 2, 2), stem=3), ("resnet18", (), 1.0, True)),
        (torchvision_shapes("bottleneck", (3, 4, 6, 3), base=32), ("resnet50", (), 0.5, False)),
        # the smoke model (configs/quickstart.py:smoke) and a toy bottleneck net
        (torchvision_shapes("basic", (1, 1), base=8, stem=3), ("resnet18", (1, 1), 0.125, True)),
        (torchvision_shapes("bottleneck", (1, 2), base=16), ("resnet50", (1, 2), 0.25, False)),
    ],
)
def test_architecture_of_stems_widths_and_depths(shapes, expected):
    state, _ = backbone.backbone_state(zeros(shapes))
    model = backbone.infer_model_config(state)
    assert (model.arch, tuple(model.stage_sizes), model.width, model.cifar_stem) == expected
    _loads_strictly(state, model)


def test_prefixes_and_whole_model_checkpoints():
    plain = zeros(torchvision_shapes("basic", (1, 1), base=8))
    ddp, _ = backbone.backbone_state({f"module.{k}": v for k, v in plain.items()})
    assert sorted(ddp) == sorted(k for k in plain if not k.startswith("fc."))
    # the official full checkpoint's model: module.backbone.*, module.projector.*, module.bn.*
    whole = {f"module.backbone.{k}": v for k, v in plain.items() if not k.startswith("fc.")}
    whole |= {"module.projector.0.weight": np.zeros((4, 8)), "module.bn.running_mean": np.zeros(4)}
    state, left_out = backbone.backbone_state(whole)
    assert sorted(state) == sorted(ddp)
    assert left_out == ["bn.running_mean", "projector.0.weight"]


def test_strict_loading_names_the_problem():
    shapes = torchvision_shapes("basic", (1, 1), base=8, fc=False)
    model = backbone.infer_model_config(zeros(shapes))
    with pytest.raises(ValueError, match="no place for: layer1.0.se.weight"):
        _loads_strictly(zeros({**shapes, "layer1.0.se.weight": (8, 8, 1, 1)}), model)
    without = {k: v for k, v in shapes.items() if k != "layer2.0.bn2.running_var"}
    with pytest.raises(ValueError, match="has no 'layer2.0.bn2.running_var'"):
        _loads_strictly(zeros(without), model)
    wide = {**shapes, "layer2.0.conv2.weight": (32, 16, 3, 3)}  # not what the stem implies
    with pytest.raises(ValueError, match=r"layer2.0.conv2.weight has shape \(32, 16, 3, 3\)"):
        _loads_strictly(zeros(wide), model)
    with pytest.raises(ValueError, match="no conv1.weight: not a torchvision-layout ResNet"):
        backbone.infer_model_config({"encoder.weight": np.zeros(3)})


def _toy_file(path, wrap=None) -> str:
    """The smoke backbone's initial weights as a torchvision state dict file."""
    module = backbone.build_backbone(load_config("configs/quickstart.py:smoke").model.to_dict())
    v = backbone.init_variables(module, seed=3)
    state = torchvision_layout.backbone_to_torchvision(v["params"], v["batch_stats"])
    if str(path).endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(dict(state), str(path))
    else:
        _needs_torch()
        tensors = {k: torch.from_numpy(np.array(a)) for k, a in state.items()}
        torch.save(wrap(tensors) if wrap else tensors, str(path))
    return str(path)


def _eval_config(**fields):
    config = load_config("configs/knn.py:smoke")
    config.update(fields)
    return config


def test_exactly_one_source():
    for fields in ({}, dict(pretrained_workdir="/w", pretrained_torchvision="/f.pth")):
        with pytest.raises(ValueError, match="set exactly one of --config.pretrained_workdir"):
            backbone.load_backbone(_eval_config(**fields))


def test_file_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="pretrained_torchvision: no file"):
        backbone.load_backbone(_eval_config(pretrained_torchvision=str(tmp_path / "x.pth")))
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="expected a .safetensors or .pth file"):
        backbone.load_backbone(_eval_config(pretrained_torchvision=str(tmp_path / "w.npz")))
    pth = tmp_path / "w.pth"
    pth.write_bytes(b"torch would read this")
    pth = str(pth)
    monkeypatch.setitem(sys.modules, "torch", None)  # a machine without torch: mocked
    with pytest.raises(ValueError, match=r"needs PyTorch: pip install torch \(or save"):
        backbone.load_backbone(_eval_config(pretrained_torchvision=pth))


def test_pth_of_a_whole_checkpoint_names_file_and_hash(tmp_path):
    pth = _toy_file(
        tmp_path / "checkpoint.pth",
        wrap=lambda t: {"epoch": 3, "model": {f"module.backbone.{k}": v for k, v in t.items()}},
    )
    net = backbone.load_backbone(_eval_config(pretrained_torchvision=pth, expected_arch="resnet18"))
    sha = hashlib.sha256(pathlib.Path(pth).read_bytes()).hexdigest()
    assert net.info["file"] == pth and net.info["sha256"] == sha[:12]
    assert net.info["model"] == "resnet18 width 0.125 cifar_stem True stages (1, 1)"
    assert net.module.dtype == np.float32  # as torch evaluates it
    with pytest.raises(ValueError, match="is a resnet18 .* expects resnet50"):
        backbone.load_backbone(_eval_config(pretrained_torchvision=pth, expected_arch="resnet50"))


# ---------------------------------------------------------------------------------------
# Acceptance: a torchvision file gives the numbers of the workdir it was exported from


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A smoke checkpoint (BN drawn at random), its export, and the same tensors as .pth."""
    from safetensors.numpy import load_file

    root = tmp_path_factory.mktemp("external")
    workdir = write_init_checkpoint(root / "pretrain", random_bn=True)
    out = root / "export"
    assert export.main(["--workdir", workdir, "--format", "torchvision", "--out", str(out)]) == 0
    safetensors_file = str(out / "model.safetensors")
    if torch is None:  # the .pth copy needs PyTorch; the exported file is still compared
        return workdir, safetensors_file
    pth = str(root / "resnet18.pth")
    torch.save({k: torch.from_numpy(v) for k, v in load_file(safetensors_file).items()}, pth)
    return workdir, safetensors_file, pth


@pytest.mark.slow
@pytest.mark.usefixtures("compilation_cache")
@pytest.mark.parametrize("spec", ["configs/knn.py:smoke", "configs/linear_eval.py:smoke"])
def test_file_gives_the_numbers_of_its_workdir(exported, spec, tmp_path):
    from bt_jax import main

    workdir, *files = exported
    results, infos = [], []
    for i, source in enumerate([dict(pretrained_workdir=workdir)] + [
        dict(pretrained_torchvision=f) for f in files
    ]):  # fmt: skip
        config = load_config(spec)
        config.update(source)
        if i:  # a file does not know its inputs' statistics: the export's card names them
            config.backbone_normalization = infos[0]["normalization"]
        if "linear" in spec:
            config.data.train_split = "train[:512]"
        results.append(main.run(config, str(tmp_path / str(i))))
        infos.append(read_results(tmp_path / str(i))["backbone"])
    assert all(r == results[0] for r in results[1:])
    assert min(v for v in results[0].values() if isinstance(v, float)) > 0
    assert infos[0]["workdir"] == workdir and infos[0]["model"] == infos[1]["model"]
    for info, path in zip(infos[1:], files, strict=True):
        sha = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:12]
        assert (info["file"], info["sha256"], info["source"]) == (path, sha, "pretrained")
    # and the weights themselves, BN statistics included
    ours = backbone.load_backbone(_eval_config(pretrained_workdir=workdir)).variables
    theirs = backbone.load_backbone(_eval_config(pretrained_torchvision=files[-1])).variables
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, ours, theirs)))


# ---------------------------------------------------------------------------------------
# The documented commands for the official checkpoint


def _documented_commands() -> list[tuple[str, str]]:
    """`python -m bt_jax.main ... --config.pretrained_torchvision=...` commands in README.md
    and the config docstrings, continuation lines joined."""
    texts = {"README.md": pathlib.Path(ROOT, "README.md").read_text()}
    for path in sorted(pathlib.Path(ROOT, "configs").glob("*.py")):
        texts[f"configs/{path.name}"] = ast.get_docstring(ast.parse(path.read_text())) or ""
    found, seen = [], set()
    for where, text in texts.items():
        for line in text.replace("\\\n", " ").splitlines():
            command = " ".join(line.split())
            key = " ".join(w for w in command.split() if not w.startswith("--workdir"))
            documented = command.startswith("python -m bt_jax.main")
            if documented and "pretrained_torchvision" in key and key not in seen:
                seen.add(key)
                found.append((where, command))
    return found


def test_the_official_checkpoint_is_documented_for_every_protocol():
    configs = {c.split("--config=")[1].split()[0] for _, c in _documented_commands()}
    assert {
        "configs/knn.py",
        "configs/linear_eval.py",
        "configs/semi_supervised.py",
        "configs/transfer_voc2007.py",
    } <= configs


@pytest.fixture(scope="module")
def official_format_pth(tmp_path_factory) -> str:
    """A file shaped as the official resnet50.pth: torchvision's resnet50 state dict without
    fc (evaluate.py's strict=False load misses exactly fc.weight and fc.bias); zeros.
    Without PyTorch the same tensors as .safetensors (the loader reads both)."""
    shapes = torchvision_shapes("bottleneck", (3, 4, 6, 3), fc=False)
    if torch is None:
        from safetensors.numpy import save_file

        path = tmp_path_factory.mktemp("official") / "resnet50.safetensors"
        dtypes = {k: np.int64 if k.endswith("tracked") else np.float32 for k in shapes}
        save_file({k: np.zeros(s, dtypes[k]) for k, s in shapes.items()}, str(path))
        return str(path)
    state = {
        k: torch.zeros(s, dtype=torch.int64 if k.endswith("tracked") else torch.float32)
        for k, s in shapes.items()
    }
    path = tmp_path_factory.mktemp("official") / "resnet50.pth"
    torch.save(state, path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("where, command", _documented_commands())
def test_documented_command_loads_the_checkpoint(where, command, official_format_pth, tmp_path):
    """Flags parsed, config built, the backbone read from the file and inferred as a
    ResNet-50; then the job stops where this machine has no ImageNet / VOC."""
    command = command.replace("/tmp/bt_", f"{tmp_path}/bt_")
    command = command.replace("/ckpt/resnet50.pth", official_format_pth)
    command = command.replace("$TFDS_DATA_DIR", str(tmp_path / "tfds"))
    argv = command.split()[3:]
    os.makedirs(tmp_path / "tfds")
    result = subprocess.run(
        [sys.executable, "-m", "bt_jax.main", *argv],
        cwd=ROOT,
        env={**cpu_env(8), "TFDS_DATA_DIR": str(tmp_path / "tfds")},  # never a real ImageNet
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, f"{where}: {command}\n{result.stdout}\n{result.stderr}"
    sha = hashlib.sha256(pathlib.Path(official_format_pth).read_bytes()).hexdigest()[:12]
    assert (
        "backbone: pretrained resnet50 width 1.0 cifar_stem False stages default from "
        f"{official_format_pth} (sha256 {sha})"
    ) in result.stdout, result.stdout + result.stderr
    stopped = r"bt_jax: error: (unknown TFDS dataset|TFDS dataset '\S+' is not prepared)"
    assert re.search(stopped, result.stderr), result.stderr
