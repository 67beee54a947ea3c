"""ResNet family and twin model: sizes, torchvision layout, init, BN semantics, dtypes."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bt_jax.models import barlow_twins, parse_projector, resnet
from bt_jax.models.norm import ViewBatchNorm


def _shapes(module, *inputs):
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# torchvision's published parameter counts (models.resnetXX().parameters()), minus the fc
# layer (2048 * 1000 + 1000 for bottleneck nets, 512 * 1000 + 1000 for basic-block nets).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512 - 513_000,
    "resnet34": 21_797_672 - 513_000,
    "resnet50": 25_557_032 - 2_049_000,
    "resnet101": 44_549_160 - 2_049_000,
    "resnet152": 60_192_808 - 2_049_000,
}


@pytest.mark.parametrize("arch", sorted(TORCHVISION_PARAMS))
def test_parameter_count_matches_torchvision(arch):
    variables = _shapes(resnet(arch), jnp.zeros((1, 64, 64, 3)))
    assert _count(variables["params"]) == TORCHVISION_PARAMS[arch]


def test_resnet50_output_and_count():
    model = resnet("resnet50")
    assert model.num_features == 2048
    variables = _shapes(model, jnp.zeros((1, 224, 224, 3)))
    assert _count(variables["params"]) == 23_508_032
    out = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros((2, 224, 224, 3)), train=False), variables
    )
    assert out.shape == (2, 2048)


def torchvision_resnet50_shapes():
    """torchvision resnet50's state_dict shapes without fc, derived from its definition."""
    shapes = {"conv1.weight": (64, 3, 7, 7), "bn1": 64}
    in_ch = 64
    for stage, blocks in enumerate((3, 4, 6, 3)):
        width = 64 * 2**stage
        for i in range(blocks):
            name = f"layer{stage + 1}.{i}"
            shapes[f"{name}.conv1.weight"] = (width, in_ch, 1, 1)
            shapes[f"{name}.bn1"] = width
            shapes[f"{name}.conv2.weight"] = (width, width, 3, 3)
            shapes[f"{name}.bn2"] = width
            shapes[f"{name}.conv3.weight"] = (4 * width, width, 1, 1)
            shapes[f"{name}.bn3"] = 4 * width
            if i == 0:
                shapes[f"{name}.downsample.0.weight"] = (4 * width, in_ch, 1, 1)
                shapes[f"{name}.downsample.1"] = 4 * width
            in_ch = 4 * width
    return shapes


def test_parameter_tree_maps_one_to_one_onto_torchvision_names():
    variables = _shapes(resnet("resnet50"), jnp.zeros((1, 64, 64, 3)))
    ours = {}
    for path, leaf in flax.traverse_util.flatten_dict(variables["params"]).items():
        torch_name = ".".join(path[:-1]).replace("_", ".")
        if path[-1] == "kernel":  # HWIO -> OIHW
            h, w, i, o = leaf.shape
            ours[f"{torch_name}.weight"] = (o, i, h, w)
        else:  # BN scale and bias: one entry per BN, checked by size
            assert ours.setdefault(torch_name, leaf.shape[0]) == leaf.shape[0]
    assert ours == torchvision_resnet50_shapes()
    stats = flax.traverse_util.flatten_dict(variables["batch_stats"])
    assert {".".join(p[:-1]).replace("_", ".") for p in stats} == {
        k for k, v in ours.items() if isinstance(v, int)
    }


def test_projector_size_and_layout():
    model = barlow_twins("resnet50", "8192-8192-8192")
    x = jnp.zeros((2, 64, 64, 3))
    variables = _shapes(model, x, x)
    projector = variables["params"]["projector"]
    # 2048*8192 + 2 * 8192^2 weights, + 2 BN layers of 8192 scales and biases; no biases.
    assert _count(projector) == 2048 * 8192 + 2 * 8192 * 8192 + 4 * 8192
    assert _count(projector) / 1e6 == pytest.approx(151.03, abs=0.01)
    assert set(projector) == {"layers_0", "layers_1", "layers_3", "layers_4", "layers_6"}
    assert all("bias" not in projector[k] for k in ("layers_0", "layers_3", "layers_6"))


def test_projector_spec_errors():
    assert parse_projector("2048-2048-2048") == (2048, 2048, 2048)
    for bad in ("", "8192x8192", "8192--8192", "-1-8"):
        with pytest.raises(ValueError, match="projector spec"):
            parse_projector(bad)
    with pytest.raises(ValueError, match="unknown architecture 'resnet42'"):
        resnet("resnet42")


@pytest.fixture(scope="module")
def tiny_twin():
    model = barlow_twins("resnet18", "32-32", width=0.25, cifar_stem=True, stage_sizes=(1, 1))
    x = jnp.zeros((4, 16, 16, 3))
    return model, jax.jit(model.init)(jax.random.key(0), x, x)


def test_last_bn_of_every_block_starts_at_zero():
    init = jax.jit(resnet("resnet50").init)
    params = init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    blocks = [k for k in params if k.startswith("layer")]
    assert len(blocks) == 16
    for block in blocks:
        np.testing.assert_array_equal(params[block]["bn3"]["scale"], 0.0)
        np.testing.assert_array_equal(params[block]["bn2"]["scale"], 1.0)
    np.testing.assert_array_equal(params["bn1"]["scale"], 1.0)


def test_bn_momentum_and_eps_are_torchs(tiny_twin):
    model, variables = tiny_twin
    backbone = model.backbone
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 16, 16, 3)).astype(np.float32) * 2 + 1)
    bb_vars = {
        "params": variables["params"]["backbone"],
        "batch_stats": variables["batch_stats"]["backbone"],
    }
    _, updated = backbone.apply(bb_vars, x, train=True, mutable=["batch_stats"])
    # Stem conv output's batch statistics, recomputed by hand.
    kernel = bb_vars["params"]["conv1"]["kernel"]
    y = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    batch_mean = np.asarray(y).mean((0, 1, 2))
    batch_var = np.asarray(y).var((0, 1, 2))
    stats = updated["batch_stats"]["bn1"]
    # torch momentum 0.1: running = 0.9 * running + 0.1 * batch, from mean 0 / var 1.
    np.testing.assert_allclose(stats["mean"], 0.1 * batch_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * batch_var, rtol=1e-4)


def test_views_are_normalised_by_their_own_batch_statistics(tiny_twin):
    model, variables = tiny_twin
    rng = np.random.default_rng(1)
    x1 = jnp.asarray(rng.normal(size=(4, 16, 16, 3)).astype(np.float32))
    x2 = jnp.asarray(rng.normal(size=(4, 16, 16, 3)).astype(np.float32) * 5 + 3)
    (z1, z2), _ = model.apply(variables, x1, x2, mutable=["batch_stats"])
    alone1, _ = model.apply(variables, x1, method=model.embed, mutable=["batch_stats"])
    alone2, _ = model.apply(variables, x2, method=model.embed, mutable=["batch_stats"])
    np.testing.assert_allclose(z1, alone1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(z2, alone2, rtol=1e-5, atol=1e-6)
    # Had the views been concatenated, view 1's output would depend on view 2.
    both, _ = model.apply(
        variables, jnp.concatenate([x1, x2]), method=model.embed, mutable=["batch_stats"]
    )
    assert float(jnp.max(jnp.abs(both[:4] - z1))) > 1e-3


def test_bfloat16_compute_keeps_float32_parameters():
    model = barlow_twins(
        "resnet18", "32-32", width=0.25, cifar_stem=True, stage_sizes=(1, 1), dtype=jnp.bfloat16
    )
    x = jnp.zeros((4, 16, 16, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x, x)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    (z1, _), _ = model.apply(variables, x, x, mutable=["batch_stats"])
    assert z1.dtype == jnp.bfloat16 and z1.shape == (4, 32)


def test_width_multiplier_scales_every_stage():
    model = resnet("resnet50", width=2.0)
    assert model.num_features == 4096
    variables = _shapes(model, jnp.zeros((1, 64, 64, 3)))
    assert variables["params"]["conv1"]["kernel"].shape == (7, 7, 3, 128)


def _flax_bn():
    """The independent reference: flax's own BatchNorm with torch's settings."""
    return nn.BatchNorm(momentum=0.9, epsilon=1e-5, use_fast_variance=False)


def test_view_batch_norm_is_flax_batch_norm_on_one_view():
    x = jnp.asarray(np.random.default_rng(2).normal(3.0, 2.0, (6, 4, 4, 5)), jnp.float32)
    ours = ViewBatchNorm(use_running_average=False)
    variables = ours.init(jax.random.key(0), x)
    reference = _flax_bn().init(jax.random.key(0), x, use_running_average=False)
    assert jax.tree.structure(variables) == jax.tree.structure(reference)
    y, new = ours.apply(variables, x, mutable=["batch_stats"])
    y_ref, new_ref = _flax_bn().apply(
        variables, x, use_running_average=False, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new, new_ref)
    frozen = ViewBatchNorm(use_running_average=True).apply({**variables, **new}, x)
    np.testing.assert_allclose(
        frozen, _flax_bn().apply({**variables, **new}, x, use_running_average=True), rtol=1e-6
    )


def test_view_batch_norm_normalises_interleaved_views_as_two_flax_calls():
    rng = np.random.default_rng(3)
    v1 = jnp.asarray(rng.normal(0.0, 1.0, (4, 3, 3, 5)), jnp.float32)
    v2 = jnp.asarray(rng.normal(5.0, 3.0, (4, 3, 3, 5)), jnp.float32)
    both = jnp.stack([v1, v2], axis=1).reshape(8, 3, 3, 5)  # rows interleaved
    variables = ViewBatchNorm().init(jax.random.key(0), both, views=2)
    y, new = ViewBatchNorm().apply(variables, both, views=2, mutable=["batch_stats"])
    # official order: view 1's call updates the running statistics, then view 2's
    ref = _flax_bn()
    y1, after1 = ref.apply(variables, v1, use_running_average=False, mutable=["batch_stats"])
    y2, after2 = ref.apply(
        {**variables, **after1}, v2, use_running_average=False, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(y.reshape(4, 2, 3, 3, 5)[:, 0], y1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y.reshape(4, 2, 3, 3, 5)[:, 1], y2, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new, after2)
    with pytest.raises(ValueError, match="does not split into 2 views"):
        ViewBatchNorm().apply(variables, both[:7], views=2, mutable=["batch_stats"])
