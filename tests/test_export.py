"""Weight export/import: torchvision's exact key set, round trip, numerical equivalence."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bt_jax import export
from bt_jax.models import resnet

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
    state = export.backbone_to_torchvision(v["params"], v["batch_stats"])
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
    state = export.backbone_to_torchvision(v["params"], v["batch_stats"])
    back = export.backbone_from_torchvision(state, v["params"])
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), back, v)
    assert all(jax.tree.leaves(same))


def test_import_rejects_another_architecture(resnet50_variables):
    v = resnet50_variables
    state = export.backbone_to_torchvision(v["params"], v["batch_stats"])
    small = jax.eval_shape(
        lambda: resnet("resnet18").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    )
    with pytest.raises((ValueError, KeyError), match="shape|no 'layer"):
        export.backbone_from_torchvision(state, small["params"])


def test_detectron2_names(resnet50_variables):
    v = resnet50_variables
    d2 = export.torchvision_to_detectron2(
        export.backbone_to_torchvision(v["params"], v["batch_stats"])
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
    state = export.backbone_to_torchvision(v["params"], v["batch_stats"])
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
