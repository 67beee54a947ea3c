"""Weight export/import: torchvision's exact key set, round trip, numerical equivalence;
the export folder (weights, model card, timm config) and its Hub upload."""

import importlib.util
import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from bt_jax import export, reporting
from bt_jax.checkpoint import Checkpointer
from bt_jax.defaults import load_config
from bt_jax.models import resnet, torchvision_layout

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_resnet50_keys():
    """torchvision resnet50().state_dict() keys in order, minus fc, from its definition."""
    keys = ["conv1.weight", *(f"bn1.{k}" for k in BN_KEYS)]
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        for i in range(blocks):
            for j in (1, 2, 3):
                keys.append(f"layer{stage}.{i}.conv{j}.weight")
                keys.extend(f"layer{stage}.{i}.bn{j}.{k}" for k in BN_KEYS)
            if i == 0:
                keys.append(f"layer{stage}.{i}.downsample.0.weight")
                keys.extend(f"layer{stage}.{i}.downsample.1.{k}" for k in BN_KEYS)
    return keys


def random_variables(model, size=32, seed=0):
    """Initialised variables with every leaf perturbed, in ranges that keep features O(1).

    Every BN scale, bias, mean and variance differs from its neighbours, so a mapping that
    swapped any two of them would show in the features.
    """
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, size, size, 3)))
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        name = jax.tree_util.keystr(path)
        shape = np.shape(leaf)
        if "kernel" in name:
            return np.asarray(leaf) + 0.01 * rng.standard_normal(shape).astype(np.float32)
        low, high = {
            "scale": (0.2, 0.6),
            "bias": (-0.1, 0.1),
            "mean": (-0.1, 0.1),
            "var": (0.5, 2.0),
        }[name.rsplit("'", 2)[-2]]
        return rng.uniform(low, high, shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(perturb, variables)


@pytest.fixture(scope="module")
def resnet50_variables():
    return random_variables(resnet("resnet50"))


def test_exported_keys_are_torchvisions_minus_fc(resnet50_variables):
    v = resnet50_variables
    state = torchvision_layout.backbone_to_torchvision(v["params"], v["batch_stats"])
    assert list(state) == torchvision_resnet50_keys()  # same keys, same order
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1)
    assert state["layer3.5.conv2.weight"].shape == (256, 256, 3, 3)
    assert state["layer1.0.bn3.running_var"].shape == (256,)
    assert state["bn1.num_batches_tracked"].dtype == np.int64
    assert (
        sum(
            v.size
            for k, v in state.items()
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
        )
        == 23_508_032
    )


def test_import_of_export_is_the_identity(resnet50_variables):
    v = resnet50_variables
    state = torchvision_layout.backbone_to_torchvision(v["params"], v["batch_stats"])
    back = torchvision_layout.backbone_from_torchvision(state, v["params"])
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), back, v)
    assert all(jax.tree.leaves(same))


def test_import_rejects_another_architecture(resnet50_variables):
    v = resnet50_variables
    state = torchvision_layout.backbone_to_torchvision(v["params"], v["batch_stats"])
    small = jax.eval_shape(
        lambda: resnet("resnet18").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    )
    with pytest.raises((ValueError, KeyError), match="shape|no 'layer"):
        torchvision_layout.backbone_from_torchvision(state, small["params"])


def test_detectron2_names(resnet50_variables):
    v = resnet50_variables
    d2 = torchvision_layout.torchvision_to_detectron2(
        torchvision_layout.backbone_to_torchvision(v["params"], v["batch_stats"])
    )["model"]
    for key in (
        "stem.conv1.weight",
        "stem.conv1.norm.weight",
        "stem.conv1.norm.running_var",
        "res2.0.conv1.weight",
        "res2.0.shortcut.weight",
        "res2.0.shortcut.norm.bias",
        "res5.2.conv3.norm.running_mean",
        "res4.5.conv2.weight",
    ):
        assert key in d2, key
    assert not any("num_batches_tracked" in k or "layer" in k or "bn" in k for k in d2)
    assert len(d2) == 53 * 1 + 53 * 4  # 53 convs, 53 BNs with 4 tensors each


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None,
    reason="torchvision is not installed: pip install torch torchvision",
)
def test_torchvision_resnet50_gives_our_features(resnet50_variables):
    import torch
    import torchvision

    v = resnet50_variables
    state = torchvision_layout.backbone_to_torchvision(v["params"], v["batch_stats"])
    net = torchvision.models.resnet50()
    net.fc = torch.nn.Identity()
    # strict: our keys are exactly the fc-less network's, nothing missing or unexpected
    net.load_state_dict({k: torch.from_numpy(np.array(a)) for k, a in state.items()})
    net.eval()
    x = np.random.default_rng(1).standard_normal((2, 3, 96, 96)).astype(np.float32)
    with torch.no_grad():
        theirs = net(torch.from_numpy(x)).numpy()
    ours = resnet("resnet50").apply(v, jnp.asarray(x.transpose(0, 2, 3, 1)), train=False)
    assert ours.shape == theirs.shape == (2, 2048)
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- the export folder and card
def _config_of(arch, **model):
    config = load_config("configs/quickstart.py:smoke")
    config.model.update({"arch": arch, "width": 1.0, "cifar_stem": False, "stage_sizes": ()})
    config.model.update(model)
    return config.to_dict()


@pytest.fixture(scope="module")
def pretraining_workdir(tmp_path_factory, resnet50_variables):
    """A workdir as pretraining leaves it: an orbax checkpoint (real Checkpointer) of a
    ResNet-50 whose every leaf is perturbed, its meta, and metrics.jsonl."""
    workdir = str(tmp_path_factory.mktemp("pretrained"))
    v = jax.tree.map(np.asarray, resnet50_variables)
    state = {"params": {"backbone": v["params"]}, "batch_stats": {"backbone": v["batch_stats"]}}
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(40, state, {"step": 40, "config": _config_of("resnet50")}, wait=True)
    ckpt.close()
    rows = reporting.JsonLinesWriter(workdir)
    for step in range(1, 41):
        rows.write_scalars(step, {"train/loss": 500.0 - step, "train/epoch": step / 20})
    rows.write_scalars(40, {"knn/knn_top1": 31.25, "knn/knn_top5": 80.5})
    rows.close()
    return workdir


@pytest.fixture(scope="module")
def eval_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("linear")
    summary = {"protocol": "linear", "dataset": "cifar10_jpeg_mini", "eval_split": "test"}
    summary["results"] = {"linear_top1_last": 41.5, "linear_top5_last": 88.0, "epochs": 10}
    (workdir / "results.json").write_text(json.dumps(summary))
    return str(workdir)


def _front_matter(card: str) -> dict:
    import yaml  # PyYAML, TensorFlow's dependency

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_export_writes_weights_model_card_and_timm_config(
    pretraining_workdir, eval_workdir, resnet50_variables, tmp_path
):
    out = tmp_path / "bt_r50"
    argv = ["--workdir", pretraining_workdir, "--format=torchvision", f"--out={out}"]
    assert export.main([*argv, "--results", eval_workdir]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    tensors = safetensors.numpy.load_file(str(out / "model.safetensors"))
    assert sorted(tensors) == sorted(torchvision_resnet50_keys())
    v = resnet50_variables
    np.testing.assert_array_equal(
        tensors["layer2.1.conv2.weight"],
        np.asarray(v["params"]["layer2_1"]["conv2"]["kernel"]).transpose(3, 2, 0, 1),
    )
    timm_cfg = json.loads((out / "config.json").read_text())
    assert timm_cfg["architecture"] == "resnet50" and timm_cfg["num_classes"] == 0
    assert timm_cfg["num_features"] == 2048

    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "timm" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["cifar10_jpeg_mini"] and "barlow-twins" in meta["tags"]
    assert "checkpoint of step 40, epoch 2.00" in card
    config = _config_of("resnet50")
    for line in (
        f"| global batch | {config['train']['global_batch']} |",
        f"| projector | {config['model']['projector']} |",
        f"| lambda (off-diagonal weight) | {config['loss']['lambd']} |",
        "| training loss (step 40) | 460 |",  # the last train row: 500 - 40
        "| kNN monitor knn_top1 (step 40, cifar10_jpeg_mini) | 31.25 |",
        "| linear linear_top1_last (cifar10_jpeg_mini test) | 41.5 |",
    ):
        assert line in card, line
    full_config = card.split("```json\n")[1].split("\n```")[0]
    assert json.loads(full_config) == json.loads(json.dumps(config))  # tuples -> lists

    assert export.main(argv) == 1  # a non-empty folder is refused...
    assert export.main([*argv, "--overwrite"]) == 0  # ...unless asked


def test_export_out_is_a_folder_and_names_the_fix(pretraining_workdir, tmp_path, capsys):
    out = tmp_path / "r50.safetensors"
    argv = ["--workdir", pretraining_workdir, "--format=torchvision", f"--out={out}"]
    assert export.main(argv) == 1
    assert (
        f"--out is the export folder (it will hold model.safetensors and README.md), e.g. "
        f"--out={tmp_path / 'r50'}" in capsys.readouterr().err
    )
    assert not out.exists()


def test_detectron2_export_folder(pretraining_workdir, tmp_path):
    out = tmp_path / "d2"
    assert (
        export.main(["--workdir", pretraining_workdir, "--format=detectron2", f"--out={out}"]) == 0
    )
    assert sorted(os.listdir(out)) == ["README.md", "model_d2.pkl"]
    with open(out / "model_d2.pkl", "rb") as f:
        assert "res5.2.conv3.norm.running_mean" in pickle.load(f)["model"]
    assert "MODEL.WEIGHTS=model_d2.pkl" in (out / "README.md").read_text()


def test_card_of_a_non_torchvision_architecture_says_so():
    card = export.model_card(
        config=_config_of("resnet18", width=0.125, cifar_stem=True),
        step=3,
        files={"model.safetensors": "weights"},
        metrics=[],
        results=[],
    )
    assert _front_matter(card)["library_name"] == "pytorch"
    assert "not torchvision's exact architecture" in card and "timm" not in card.split("---")[2]


@pytest.mark.skipif(
    importlib.util.find_spec("timm") is None,
    reason="timm is not installed (it needs torchvision: pip install timm torchvision)",
)
def test_timm_builds_the_export_folder_and_gives_our_features(
    pretraining_workdir, resnet50_variables, tmp_path
):
    import timm
    import torch

    out = tmp_path / "bt_r50"
    assert (
        export.main(["--workdir", pretraining_workdir, "--format=torchvision", f"--out={out}"]) == 0
    )
    # local-dir: reads config.json and model.safetensors, as "hf-hub:REPO" does after upload
    net = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = np.random.default_rng(2).standard_normal((2, 3, 96, 96)).astype(np.float32)
    with torch.no_grad():
        theirs = net(torch.from_numpy(x)).numpy()
    ours = resnet("resnet50").apply(
        resnet50_variables, jnp.asarray(x.transpose(0, 2, 3, 1)), train=False
    )
    assert theirs.shape == (2, 2048)
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


@pytest.mark.skipif(
    importlib.util.find_spec("huggingface_hub") is None,
    reason="huggingface_hub is not installed: pip install -e '.[hub]'",
)
def test_push_to_hub_uploads_the_export_folder(pretraining_workdir, tmp_path, monkeypatch):
    """The network is what cannot exist here: HfApi's two calls are recorded instead."""
    import huggingface_hub

    calls = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(repo_id)
    )

    def upload_folder(self, *, repo_id, folder_path, **kw):
        calls.append((repo_id, sorted(os.listdir(folder_path)), kw["repo_type"]))
        card = huggingface_hub.ModelCard.load(os.path.join(folder_path, "README.md"))
        calls.append(card.data.library_name)

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    out = tmp_path / "bt_r50"
    argv = ["--workdir", pretraining_workdir, "--format=torchvision", f"--out={out}"]
    assert export.main([*argv, "--push_to_hub=someone/bt-resnet50"]) == 0
    files = ["README.md", "config.json", "model.safetensors"]
    assert calls == ["someone/bt-resnet50", ("someone/bt-resnet50", files, "model"), "timm"]
