"""Both views in one call (per-view BN) equal the official two calls, step for step.

The reference is the official arrangement built from the same modules: backbone and
projector applied to each view in its own call, the running statistics updated by view 1's
call and then by view 2's. Both run through the pretraining loop's train step (LARS, loss,
guard), on 1 and on 8 devices, with the official ImageNet LARS settings. (The quickstart's
CIFAR settings put lr 0.3 on the BN biases, which makes this toy chaotic: a 1e-7
perturbation of the reference itself grows to 2e-2 in three steps, so no two float orders
could agree there.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from e2e import two_view_batches

from bt_jax import distributed, losses, optim, pretrain
from bt_jax.data import normalization, normalize
from bt_jax.defaults import load_config, pretrain_config
from bt_jax.models import BarlowTwins, build_model

STEPS = 5


class TwoCallTwins(BarlowTwins):
    """The official model: one backbone + projector call per view (same parameter tree)."""

    def __call__(self, view1, view2, train: bool = True):
        return self.embed(view1, train), self.embed(view2, train)


@pytest.fixture(scope="module")
def setup():
    config = load_config("configs/quickstart.py:smoke")
    config.optim = pretrain_config().optim
    one_call = build_model(config.model)
    two_calls = TwoCallTwins(backbone=one_call.backbone, projector=one_call.projector)
    n, size = config.train.global_batch, config.augment.view1.image_size
    tx, _ = optim.make_optimizer(config.optim, global_batch=n, warmup_steps=1, total_steps=100)
    batches = two_view_batches(n, size, STEPS, seed=0)
    return config, one_call, two_calls, tx, batches


def _train(config, model, tx, batches, devices):
    mesh = distributed.make_mesh(devices)
    size = config.augment.view1.image_size
    with jax.set_mesh(mesh):
        state = jax.jit(
            functools.partial(pretrain.init_state, model, tx, config, size),
            out_shardings=distributed.replicated(mesh),
        )()
        first = distributed.host_to_global(batches[0], mesh)
        grads = jax.jit(functools.partial(_grads, model, config, mesh))(state, first)
        losses_seen = []
        for batch in batches:
            state, metrics = pretrain.step_function(mesh)(
                state,
                distributed.host_to_global(batch, mesh),
                **pretrain.step_options(config, model, tx, mesh),
            )
            losses_seen.append(float(metrics["loss"]))
        return jax.device_get((grads, state, losses_seen))


def _grads(model, config, mesh, state, batch):
    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        (z1, z2), _ = model.apply(
            variables,
            normalize(batch["view1"], normalization.of_config(config)),
            normalize(batch["view2"], normalization.of_config(config)),
            mutable=["batch_stats"],
        )
        return losses.barlow_twins_loss(z1, z2, mesh=mesh, strategy=config.loss.strategy)

    return jax.grad(loss_fn)(state.params)


def _relative_error(a, b):
    """Largest leaf-wise ||a - b|| / ||b|| over two pytrees of the same structure."""
    errors = jax.tree.map(
        lambda x, y: np.linalg.norm(np.asarray(x) - y) / max(np.linalg.norm(y), 1e-30), a, b
    )
    return max(jax.tree.leaves(errors))


@pytest.mark.parametrize("devices", [1, 8])
def test_one_call_equals_two_calls_over_five_lars_steps(setup, devices):
    config, one_call, two_calls, tx, batches = setup
    grads, state, seen = _train(config, one_call, tx, batches, devices)
    ref_grads, ref_state, ref_seen = _train(config, two_calls, tx, batches, devices)
    np.testing.assert_allclose(seen, ref_seen, rtol=1e-5)
    assert _relative_error(grads, ref_grads) <= 1e-5
    assert _relative_error(state.params, ref_state.params) <= 1e-5
    assert _relative_error(state.opt_state, ref_state.opt_state) <= 1e-5
    # running statistics: view 1's update, then view 2's, five times over
    assert _relative_error(state.batch_stats, ref_state.batch_stats) <= 1e-6
    assert int(state.step) == STEPS and int(state.first_bad_step) == -1


def test_running_statistics_follow_the_official_view_order(setup):
    """The check above can tell the orders apart: view 2 first gives other statistics."""
    config, one_call, _, _, batches = setup
    size = config.augment.view1.image_size
    x = jnp.zeros((2, size, size, 3))
    variables = jax.jit(one_call.init)(jax.random.key(0), x, x)
    v1, v2 = (normalize(batches[0][k], normalization.IMAGENET) for k in ("view1", "view2"))

    def stats(model, a, b):
        _, new = model.apply(variables, a, b, mutable=["batch_stats"])
        return new["batch_stats"]

    ours = stats(one_call, v1, v2)
    swapped = stats(one_call, v2, v1)
    # ra = m (m ra + (1 - m) s1) + (1 - m) s2 differs from the swap by (1 - m)^2 (s2 - s1)
    assert _relative_error(swapped, ours) > 1e-3
    two_call = stats(TwoCallTwins(one_call.backbone, one_call.projector), v1, v2)
    assert _relative_error(ours, two_call) <= 1e-6


def test_online_probe_never_touches_the_backbone_and_sees_view_1(setup):
    """3 steps on 8 devices with and without the probe: parameters, BN statistics and LARS
    state bit-identical. The probe's first step is SGD on view 1's backbone features
    (computed here by a separate call on view 1 alone, per-view BN statistics), by hand."""
    config, model, _, tx, batches = setup
    n, size = config.train.global_batch, config.augment.view1.image_size
    labels = np.random.default_rng(1).integers(0, 10, (3, n)).astype(np.int32)
    labelled = [{**b, "label": y} for b, y in zip(batches[:3], labels, strict=True)]
    plan = {"warmup_steps": 0, "total_steps": 100}  # the probe's lr at step 0: its peak
    probe = pretrain.online_probe(config, 10, plan)
    mesh = distributed.make_mesh(8)
    runs = {}
    with jax.set_mesh(mesh):
        for name, p in (("without", None), ("with", probe)):
            init = functools.partial(pretrain.init_state, model, tx, config, size, p)
            state = jax.jit(init, out_shardings=distributed.replicated(mesh))()
            seen = [jax.device_get(state)]  # host copies: each state is donated to the next step
            for batch in labelled:
                state, metrics = pretrain.step_function(mesh)(
                    state,
                    distributed.host_to_global(batch, mesh),
                    **pretrain.step_options(config, model, tx, mesh, p),
                )
                seen.append(jax.device_get(state))
            runs[name] = (seen[0], seen[1], seen[-1], metrics)
    plain, (initial, second, probed, metrics) = runs["without"][2], runs["with"]
    for part in ("params", "batch_stats", "opt_state"):
        same = jax.tree.map(np.array_equal, getattr(plain, part), getattr(probed, part))
        assert all(jax.tree.leaves(same)), part
    assert plain.probe_params is None and np.isfinite(float(metrics["online_linear_loss"]))

    stats = normalization.of_config(config)
    variables = {
        "params": initial.params["backbone"],
        "batch_stats": initial.batch_stats["backbone"],
    }
    h, _ = model.backbone.apply(
        variables, normalize(labelled[0]["view1"], stats), train=True, mutable=["batch_stats"]
    )
    h = np.asarray(h, np.float64)
    kernel, bias = (np.asarray(initial.probe_params[k], np.float64) for k in ("kernel", "bias"))
    logits = h @ kernel + bias
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    d_logits = (softmax - np.eye(10)[labels[0]]) / n  # mean cross-entropy
    lr = config.train.online_probe_lr * n / 256
    want = kernel - lr * h.T @ d_logits
    np.testing.assert_allclose(second.probe_params["kernel"], want, rtol=1e-4, atol=1e-6)
