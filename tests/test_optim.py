"""LARS, the learning-rate schedule and the optimizer factory against the official recipe."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bt_jax import losses, optim


def official_lars_step(params, grads, mus, lr, wd=1e-6, eta=1e-3, momentum=0.9):
    """A numpy port of facebookresearch/barlowtwins main.py LARS.step (exclude ndim == 1)."""
    new_params, new_mus = [], []
    for p, dp, mu in zip(params, grads, mus, strict=True):
        if p.ndim != 1:
            dp = dp + wd * p
            param_norm, update_norm = np.linalg.norm(p), np.linalg.norm(dp)
            q = eta * param_norm / update_norm if param_norm > 0 and update_norm > 0 else 1.0
            dp = dp * q
        mu = momentum * mu + dp
        new_params.append(p - lr * mu)
        new_mus.append(mu)
    return new_params, new_mus


def official_lr(step, batch_size, epochs, steps_per_epoch, base):
    """The official adjust_learning_rate, for one parameter group."""
    max_steps = epochs * steps_per_epoch
    warmup_steps = 10 * steps_per_epoch
    base_lr = batch_size / 256
    if step < warmup_steps:
        lr = base_lr * step / warmup_steps
    else:
        step -= warmup_steps
        max_steps -= warmup_steps
        q = 0.5 * (1 + math.cos(math.pi * step / max_steps))
        lr = base_lr * q + base_lr * 0.001 * (1 - q)
    return lr * base


def _apply(tx, params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def test_lars_one_step_on_a_matrix():
    # Hand-derived: dp = 0.1 + 1e-6 p; q = 1e-3 ||p|| / ||dp|| = 0.0273854432;
    # p -= 1.6 q dp.
    p = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    g = jnp.full((2, 2), 0.1)
    tx = optim.lars(1.6, weight_decay=1e-6, eta=1e-3)
    updates, _ = tx.update(g, tx.init(p), p)
    trust_ratio = -updates / (1.6 * (g + 1e-6 * p))
    np.testing.assert_allclose(trust_ratio, 0.0273854432, rtol=2e-6)
    new_p = optax.apply_updates(p, updates)
    expected = [[0.99561829, 1.99561824], [2.99561820, 3.99561815]]
    np.testing.assert_allclose(new_p, expected, rtol=0, atol=5e-7)  # float32 spacing at 4


def test_lars_vector_gets_neither_decay_nor_trust_ratio():
    # b -= 0.0384 * mu, mu = 0.5 then 0.9 * 0.5 + 0.5 = 0.95.
    b = jnp.array([1.0, 2.0])
    g = jnp.array([0.5, 0.5])
    tx = optim.lars(0.0384, weight_decay=1e-6, eta=1e-3)
    state = tx.init(b)
    b, state = _apply(tx, b, g, state)
    np.testing.assert_allclose(b, [0.9808, 1.9808], atol=1e-6)
    b, state = _apply(tx, b, g, state)
    np.testing.assert_allclose(b, [0.94432, 1.94432], atol=1e-6)


def test_trust_ratio_is_one_when_a_norm_is_zero():
    tx = optim.lars(1.0, weight_decay=0.0, eta=1e-3, momentum=0.0)
    zero_param = jnp.zeros((2, 2))
    new_p, _ = _apply(tx, zero_param, jnp.ones((2, 2)), tx.init(zero_param))
    np.testing.assert_allclose(new_p, -np.ones((2, 2)))  # q = 1: plain SGD step
    p = jnp.ones((2, 2))
    new_p, _ = _apply(tx, p, jnp.zeros((2, 2)), tx.init(p))
    np.testing.assert_array_equal(new_p, p)


def test_mask_selects_decay_and_adaptation():
    params = {"w": jnp.ones((2, 2)), "v": jnp.ones((2, 2))}
    grads = {"w": jnp.full((2, 2), 0.5), "v": jnp.full((2, 2), 0.5)}
    tx = optim.lars(1.0, weight_decay=0.1, momentum=0.0, mask={"w": True, "v": False})
    new, _ = _apply(tx, params, grads, tx.init(params))
    np.testing.assert_allclose(new["v"], 0.5)  # no decay, q = 1
    q = 1e-3 * 2.0 / np.linalg.norm(np.full((2, 2), 0.6))
    np.testing.assert_allclose(new["w"], 1 - q * 0.6, rtol=1e-6)


def test_lars_matches_the_official_step_under_a_changing_lr():
    rng = np.random.default_rng(0)
    params = [rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32)]
    grads = [[rng.normal(size=p.shape).astype(np.float32) * 0.1 for p in params] for _ in range(30)]
    lr = lambda step: 0.1 * (step + 1) / 30  # a warm-up: the LR changes every step

    ours = optim.lars(lr, weight_decay=1e-6, eta=1e-3)
    reference = optax.lars(lr, weight_decay=1e-6, weight_decay_mask=optim.weight_mask(params))
    p_ours, p_optax = list(map(jnp.asarray, params)), list(map(jnp.asarray, params))
    s_ours, s_optax = ours.init(p_ours), reference.init(p_optax)
    p_ref, mus = [p.astype(np.float64) for p in params], [np.zeros(p.shape) for p in params]
    for step, g in enumerate(grads):
        p_ours, s_ours = _apply(ours, p_ours, g, s_ours)
        p_optax, s_optax = _apply(reference, p_optax, g, s_optax)
        p_ref, mus = official_lars_step(p_ref, [x.astype(np.float64) for x in g], mus, lr(step))
    for a, b in zip(p_ours, p_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # optax.lars scales by the LR before momentum, which differs once the LR moves.
    gap = max(float(np.max(np.abs(a - b))) for a, b in zip(p_optax, p_ref, strict=True))
    assert gap > 1e-4


RECIPE = dict(global_batch=2048, steps_per_epoch=626, epochs=1000)


@pytest.mark.parametrize(
    "step,group,expected",
    [
        (0, "weights", 0.0),
        (3130, "weights", 0.8),
        (6260, "weights", 1.6),
        (6260, "biases", 0.0384),
        (625999, "weights", 0.0016),
    ],
)
def test_schedule_checkpoints(step, group, expected):
    cfg = ml_collections.ConfigDict(dict(lr_weights=0.2, lr_biases=0.0048, end_factor=0.001))
    schedules = optim.learning_rates(
        cfg,
        RECIPE["global_batch"],
        warmup_steps=10 * RECIPE["steps_per_epoch"],
        total_steps=RECIPE["epochs"] * RECIPE["steps_per_epoch"],
    )
    assert float(schedules[group](step)) == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_schedule_equals_official_everywhere():
    schedule = optim.warmup_cosine_schedule(0.2 * 8, 6260, 626000)
    for step in [1, 17, 6259, 6261, 100_000, 313_130, 500_000, 625_000]:
        expected = official_lr(step, 2048, 1000, 626, 0.2)
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)


def test_schedule_rejects_no_decay_phase():
    with pytest.raises(ValueError, match="must exceed warmup_steps"):
        optim.warmup_cosine_schedule(1.0, 100, 100)


def _optim_config(**overrides):
    cfg = dict(
        name="lars",
        lr_weights=0.2,
        lr_biases=0.0048,
        weight_decay=1.5e-6,
        momentum=0.9,
        eta=1e-3,
        end_factor=0.001,
        clip_lr=False,
        reference_world_size=0,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def _twin_linear_problem(seed=0, n=32, d_in=6, d=8):
    """z = x @ w + b per view: the smallest model with a weight and a bias group."""
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=(2, n, d_in)).astype(np.float32)
    params = {
        "w": jnp.asarray(rng.normal(size=(d_in, d)).astype(np.float32)),
        "b": jnp.asarray(rng.normal(size=(d,)).astype(np.float32)),
    }

    def embed(p, x):
        return jnp.tanh(x @ p["w"] + p["b"])

    return params, x1, x2, embed


def test_factory_two_groups_with_batch_scaled_rates():
    params, x1, x2, embed = _twin_linear_problem()
    tx, schedules = optim.make_optimizer(
        _optim_config(), global_batch=512, warmup_steps=10, total_steps=100
    )
    assert float(schedules["weights"](10)) == pytest.approx(0.2 * 2, rel=1e-6)
    assert float(schedules["biases"](10)) == pytest.approx(0.0048 * 2, rel=1e-6)
    state = tx.init(params)
    grads = {"w": jnp.full_like(params["w"], 0.01), "b": jnp.full_like(params["b"], 0.01)}
    p_ref = [np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)]
    mus = [np.zeros_like(p) for p in p_ref]
    p = params
    for step in range(12):
        p, state = _apply(tx, p, grads, state)
        lrs = [float(schedules[g](step)) for g in ("weights", "biases")]
        p_w, mu_w = official_lars_step(
            [p_ref[0]], [np.asarray(grads["w"])], [mus[0]], lrs[0], wd=1.5e-6
        )
        p_b, mu_b = official_lars_step(
            [p_ref[1]], [np.asarray(grads["b"])], [mus[1]], lrs[1], wd=1.5e-6
        )
        p_ref, mus = [p_w[0], p_b[0]], [mu_w[0], mu_b[0]]
    np.testing.assert_allclose(p["w"], p_ref[0], atol=1e-6)
    np.testing.assert_allclose(p["b"], p_ref[1], atol=1e-6)


def test_reference_world_size_reproduces_the_official_ddp_gradient():
    """Emulate the official code on W GPUs and compare our reference_world_size=W run.

    Officially, each GPU sums C with a non-differentiable all_reduce; SyncBatchNorm's backward
    all-reduces the statistics' gradients, so GPU k gets the exact gradient for ITS rows of the
    global batch, dL/dz_k, and backpropagates it through its own forward pass only. DDP then
    averages the parameter gradients over the W GPUs. We emulate that with one vjp per worker
    on its slice of the batch, and compare with our optimizer, which is given the true
    global-batch gradient.
    """
    world = 4
    params, x1, x2, embed = _twin_linear_problem(seed=1)
    loss_of_z = lambda z1, z2: losses.barlow_twins_loss(z1, z2)
    true_grad = jax.grad(lambda p: loss_of_z(embed(p, x1), embed(p, x2)))

    def official_ddp_grad(p):
        z1, z2 = embed(p, x1), embed(p, x2)
        dz1, dz2 = jax.grad(loss_of_z, argnums=(0, 1))(z1, z2)
        per_worker = []
        for rows in np.split(np.arange(len(x1)), world):
            _, vjp = jax.vjp(lambda q, r=rows: (embed(q, x1[r]), embed(q, x2[r])), p)
            per_worker.append(vjp((dz1[rows], dz2[rows]))[0])
        return jax.tree.map(lambda *g: sum(g) / world, *per_worker)  # DDP's average

    tx_ref, _ = optim.make_optimizer(
        _optim_config(), global_batch=256, warmup_steps=2, total_steps=20
    )
    tx_ours, _ = optim.make_optimizer(
        _optim_config(reference_world_size=world),
        global_batch=256,
        warmup_steps=2,
        total_steps=20,
    )
    p_ref, p_ours = params, params
    s_ref, s_ours = tx_ref.init(params), tx_ours.init(params)
    for _ in range(6):
        p_ref, s_ref = _apply(tx_ref, p_ref, official_ddp_grad(p_ref), s_ref)
        p_ours, s_ours = _apply(tx_ours, p_ours, true_grad(p_ours), s_ours)
    for key in params:
        np.testing.assert_allclose(p_ours[key], p_ref[key], rtol=1e-5, atol=1e-7)
    # And the scale is not a no-op: the true gradient gives other parameters.
    tx_true, _ = optim.make_optimizer(
        _optim_config(), global_batch=256, warmup_steps=2, total_steps=20
    )
    p_true, s_true = params, tx_true.init(params)
    for _ in range(6):
        p_true, s_true = _apply(tx_true, p_true, true_grad(p_true), s_true)
    assert float(jnp.max(jnp.abs(p_true["b"] - p_ours["b"]))) > 1e-6


def test_factory_rejects_unknown_optimizer_and_negative_world():
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'"):
        optim.make_optimizer(
            _optim_config(name="adamw"), global_batch=256, warmup_steps=1, total_steps=10
        )
    with pytest.raises(ValueError, match="reference_world_size must be >= 0"):
        optim.make_optimizer(
            _optim_config(reference_world_size=-2), global_batch=256, warmup_steps=1, total_steps=10
        )


def test_lars_statistics_are_what_the_official_step_sees():
    """Gradient norms per group and the mean trust ratio against numpy on fixed inputs, with
    the gradient scaled by 1 / reference_world_size as the optimizer scales it."""
    rng = np.random.default_rng(5)
    shapes = {"conv": (3, 3, 2, 4), "dense": (5, 3), "bn_scale": (4,), "bias": (3,)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    cfg = ml_collections.ConfigDict(dict(weight_decay=1e-2, eta=0.02, reference_world_size=4))
    got = jax.jit(lambda g, p: optim.lars_statistics(g, p, cfg))(grads, params)
    g = {k: v.astype(np.float64) / 4 for k, v in grads.items()}
    weights, biases = ("conv", "dense"), ("bn_scale", "bias")

    def norm(names):
        return np.sqrt(sum(np.sum(g[k] ** 2) for k in names))

    ratios = [
        0.02 * np.linalg.norm(params[k]) / np.linalg.norm(g[k] + 1e-2 * params[k]) for k in weights
    ]
    assert float(got["grad_norm_weights"]) == pytest.approx(norm(weights), rel=1e-5)
    assert float(got["grad_norm_biases"]) == pytest.approx(norm(biases), rel=1e-5)
    assert float(got["trust_ratio_mean"]) == pytest.approx(np.mean(ratios), rel=1e-5)
