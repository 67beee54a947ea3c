"""The projector sharded over a "model" mesh axis computes the single-device model.

The train step (LARS, loss, guard) on the toy model of configs/quickstart.py:smoke, in this
process: 3 steps on the data x model meshes 8x1, 4x2, 2x4 and 1x8 against 1 device; LARS on
sharded parameters against the unsharded optimizer; orbax checkpoints restored onto other
mesh shapes. The end-to-end runs (two processes with model = 2, kill and resume, kNN) are
in test_pretrain.py.
"""

import jax
import numpy as np
import pytest
from e2e import two_view_batches
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bt_jax import checkpoint, distributed, optim, pretrain
from bt_jax.defaults import load_config, pretrain_config
from bt_jax.models import build_model

STEPS = 3
MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]  # data x model; 8x1 is the data-only mesh


@pytest.fixture(scope="module")
def setup():
    config = load_config("configs/quickstart.py:smoke")
    # The official LARS settings: the quickstart's lr 0.3 on BN biases makes this toy
    # chaotic (a 1e-7 perturbation grows to 1e-2 in a few steps: test_one_pass.py).
    config.optim = pretrain_config().optim
    config.loss.strategy = "gram"
    config.augment.pixel_ops = "host"  # views arrive finished; only normalised in the step
    config.model.projector = "64-64"  # D divisible by every mesh's 8 devices (gram)
    model = build_model(config.model)
    n, size = config.train.global_batch, config.augment.view1.image_size
    tx, _ = optim.make_optimizer(config.optim, global_batch=n, warmup_steps=1, total_steps=100)
    # Seed 1: seed 0's batches put one projector pre-activation of step 2 within 1e-6 of
    # ReLU's kink (under the RBG-drawn projector init of 2026-12-01): a 1e-6 perturbation
    # flipped it and moved the gradient by 2 %, as any float reordering may.
    batches = two_view_batches(n, size, STEPS, seed=1)
    return config, model, tx, batches


def _train(setup, devices, model_axis=1, steps=STEPS):
    config, model, tx, batches = setup
    mesh = distributed.make_mesh(devices, model=model_axis)
    with jax.set_mesh(mesh):
        init, _ = pretrain.sharded_init(model, tx, config, config.augment.view1.image_size, mesh)
        state = init()
        step = pretrain.step_function(mesh)
        options = pretrain.step_options(config, model, tx, mesh)
        for batch in batches[:steps]:
            state, _ = step(state, distributed.host_to_global(batch, mesh), **options)
    return state


def _max_abs_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree.leaves(diffs))


@pytest.fixture(scope="module")
def one_device(setup):
    return jax.device_get(_train(setup, 1))


@pytest.mark.parametrize("shape", MESHES, ids=[f"{d}x{m}" for d, m in MESHES])
def test_every_mesh_reaches_the_one_device_parameters(setup, one_device, shape):
    data, model_axis = shape
    state = _train(setup, 8, model_axis)
    kernel = state.params["projector"]["layers_3"]["kernel"]
    momentum = state.opt_state.inner_states["weights"].inner_state.momentum
    if model_axis > 1:
        # each device holds its 1/M of the projector's columns and of their momentum
        assert kernel.sharding.spec == P(None, "model")
        assert {s.data.shape for s in kernel.addressable_shards} == {(64, 64 // model_axis)}
        bn_mean = state.batch_stats["projector"]["layers_1"]["mean"]
        assert {s.data.shape for s in bn_mean.addressable_shards} == {(64 // model_axis,)}
        mu = momentum["projector"]["layers_3"]["kernel"]
        assert {s.data.shape for s in mu.addressable_shards} == {(64, 64 // model_axis)}
        assert momentum["backbone"]["conv1"]["kernel"].sharding.is_fully_replicated
    else:
        assert kernel.sharding.is_fully_replicated
    got = jax.device_get(state)
    moved = _max_abs_diff(got.params, jax.device_get(_train(setup, 1, steps=0)).params)
    assert moved > 1e-3  # the steps did change the parameters
    for part in ("params", "batch_stats", "opt_state"):
        assert _max_abs_diff(getattr(got, part), getattr(one_device, part)) <= 1e-5, part
    assert int(got.step) == STEPS and int(got.first_bad_step) == -1


def test_lars_trust_ratios_use_whole_parameter_norms():
    """LARS on kernels sharded over 8 devices equals the unsharded optimizer; trust ratios
    from the shards' own norms would differ by far more (the shards' norms differ)."""
    config = pretrain_config()
    tx, _ = optim.make_optimizer(config.optim, global_batch=256, warmup_steps=2, total_steps=9)
    rng = np.random.default_rng(1)
    scales = np.linspace(0.1, 10.0, 64, dtype=np.float32)  # columns of different sizes
    params = {
        "projector": {
            "kernel": rng.normal(size=(16, 64)).astype(np.float32) * scales,
            "bias": rng.normal(size=64).astype(np.float32),
        }
    }
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32) * 1e-3, params)
    mesh = distributed.make_mesh(8, model=8)
    specs = {"projector": {"kernel": P(None, "model"), "bias": P("model")}}

    def updates(params, grads, steps=3):
        state = tx.init(params)
        for _ in range(steps):
            out, state = tx.update(grads, state, params)
        return out

    expected = jax.jit(updates)(params, grads)
    with jax.set_mesh(mesh):
        put = lambda tree: jax.tree.map(  # noqa: E731
            lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs
        )
        sharded = jax.jit(updates)(put(params), put(grads))
    assert sharded["projector"]["kernel"].sharding.spec == P(None, "model")
    ratio = np.linalg.norm(sharded["projector"]["kernel"]) / np.linalg.norm(
        expected["projector"]["kernel"]
    )
    assert ratio == pytest.approx(1.0, abs=1e-6)
    assert _max_abs_diff(sharded, expected) <= 1e-6 * float(
        np.max(np.abs(expected["projector"]["kernel"]))
    )
    # the control: trust ratios from per-shard norms give a visibly different update
    k, g = params["projector"]["kernel"], grads["projector"]["kernel"]
    g = g + config.optim.weight_decay * k
    shard_ratios = [
        np.linalg.norm(k[:, c : c + 8]) / np.linalg.norm(g[:, c : c + 8]) for c in range(0, 64, 8)
    ]
    whole = np.linalg.norm(k) / np.linalg.norm(g)
    assert max(abs(r / whole - 1) for r in shard_ratios) > 0.5


def test_checkpoints_restore_onto_other_mesh_shapes(setup, tmp_path):
    """A state saved on 8x1 restores onto 4x2, that one's save onto 2x4, then 1x8 and back
    to 8x1: every array bit-identical, each laid out as the target mesh's abstract state."""
    config, model, tx, _ = setup
    size = config.augment.view1.image_size
    trained = _train(setup, 8, 1, steps=1)
    expected = jax.device_get(trained)
    state, step = trained, 1
    for shape in [(4, 2), (2, 4), (1, 8), (8, 1)]:
        ckpt = checkpoint.Checkpointer(str(tmp_path / f"from_{step}"), async_save=False)
        ckpt.save(step, state, {"step": step}, wait=True)
        mesh = distributed.make_mesh(8, model=shape[1])
        with jax.set_mesh(mesh):
            _, abstract = pretrain.sharded_init(model, tx, config, size, mesh)
            state, meta = ckpt.restore(step, abstract)
        ckpt.close()
        assert meta == {"step": step}
        shardings = jax.tree.map(lambda a: a.sharding, abstract)
        assert jax.tree.map(lambda a: a.sharding, state) == shardings
        assert _max_abs_diff(jax.device_get(state), expected) == 0.0, shape
        step += 1


def test_a_model_sharded_checkpoint_exports_as_its_host_copy(setup, tmp_path):
    """The evaluation jobs and export read a checkpoint through restore_model_variables: a
    state saved from the 4x2 mesh (projector columns on different devices) gives the host
    arrays it was saved from, and its export, projector included, is byte-for-byte the
    export of the same state saved as one host copy."""
    from safetensors.numpy import load_file

    from bt_jax import export

    config = setup[0]
    sharded = _train(setup, 8, model_axis=2, steps=1)
    assert not sharded.params["projector"]["layers_0"]["kernel"].sharding.is_fully_replicated
    host = jax.device_get(sharded)
    exports = []
    for name, state in [("sharded", sharded), ("host", host)]:
        workdir = str(tmp_path / name)
        ckpt = checkpoint.Checkpointer(workdir, async_save=False)
        ckpt.save(1, state, {"step": 1, "config": config.to_dict()}, wait=True)
        ckpt.close()
        variables, _, _ = checkpoint.restore_model_variables(workdir)
        wanted = {"params": host.params, "batch_stats": host.batch_stats}
        assert _max_abs_diff(variables, wanted) == 0.0
        out = str(tmp_path / f"{name}_export")
        export.export(workdir, "torchvision", out, include_projector=True)
        exports.append(load_file(f"{out}/model.safetensors"))
    assert sorted(exports[0]) == sorted(exports[1])
    assert any(k.startswith("projector.") for k in exports[0])
    for key, tensor in exports[0].items():
        np.testing.assert_array_equal(tensor, exports[1][key], err_msg=key)


def test_projector_init_draws_only_its_columns():
    """The projector's init compiled on a 1 x 8 mesh holds no whole kernel: the RBG key of
    init_state is not partitioned by XLA (every device would draw each kernel's whole bits:
    two 1024 x 1024 kernels, 8 MiB), the threefry key column_sharded derives from it is.
    And the values are those of the unsharded init."""
    import jax.numpy as jnp

    from bt_jax.models import barlow, parallel

    d = 1024
    projector = barlow.Projector(sizes=(d, d, d))

    def init():
        key = jax.random.key(0, impl="rbg")
        return projector.init(key, jnp.zeros((8, 64), jnp.float32), train=True)

    mesh = distributed.make_mesh(8, model=8)
    with jax.set_mesh(mesh):
        shardings = parallel.state_shardings({"projector": jax.eval_shape(init)}, mesh)
        sharded_init = jax.jit(init, out_shardings=shardings["projector"])
        memory = sharded_init.lower().compile().memory_analysis()
        sharded = jax.device_get(sharded_init())
    whole_kernel = d * d * 4
    assert memory.temp_size_in_bytes < whole_kernel, memory
    assert memory.output_size_in_bytes < (64 * d + 2 * d * d) * 4 / 8 + 2**16  # its 1/8
    with jax.set_mesh(distributed.make_mesh(1)):
        unsharded = jax.device_get(jax.jit(init)())
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, sharded, unsharded)))
