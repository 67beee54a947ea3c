"""LARS with the official Barlow Twins semantics, its learning-rate schedule, and the factory.

Official LARS step (facebookresearch/barlowtwins main.py), per parameter p with gradient g:

    if mask(p):                    # default: p.ndim > 1, i.e. not biases or BN parameters
        g = g + wd * p
        q = eta * ||p|| / ||g||    # q = 1 if either norm is 0
        g = q * g
    mu = momentum * mu + g         # momentum accumulated *before* the learning rate
    p = p - lr_t * mu

optax.lars applies the learning rate before momentum (mu = m mu + lr_t g), which differs
whenever lr_t changes, i.e. during all of warm-up and cosine decay.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

ScalarOrSchedule = float | Callable[[chex.Numeric], chex.Numeric]


def weight_mask(params) -> Any:
    """True for weights (ndim > 1), False for biases and BN scales/offsets."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


class LarsState(NamedTuple):
    count: chex.Array  # steps taken; indexes the learning-rate schedule
    momentum: optax.Updates


def _trust_ratio(param, update, eta):
    p_norm = jnp.linalg.norm(param)
    u_norm = jnp.linalg.norm(update)
    safe = jnp.where(u_norm > 0, u_norm, 1.0)
    return jnp.where((p_norm > 0) & (u_norm > 0), eta * p_norm / safe, 1.0)


def lars(
    learning_rate: ScalarOrSchedule,
    *,
    weight_decay: float,
    momentum: float = 0.9,
    eta: float = 0.001,
    mask: Any = None,
    clip_lr: bool = False,
) -> optax.GradientTransformation:
    """The official Barlow Twins LARS as an optax GradientTransformation.

    Args:
      learning_rate: a float or a schedule step -> lr (evaluated at the step count before the
        update, as the official adjust_learning_rate is called before optimizer.step()).
      weight_decay: L2 coefficient added to the gradient of masked parameters.
      momentum: heavy-ball coefficient; mu = momentum * mu + g, applied as p -= lr * mu.
      eta: LARS trust coefficient.
      mask: pytree of bools (or a function params -> pytree) choosing the parameters that get
        weight decay and the trust ratio; default weight_mask (ndim > 1).
      clip_lr: solo-learn's variant for the CIFAR recipe: the trust ratio is capped so the
        effective rate lr * q never exceeds lr (q <- min(q / lr, 1)).
    """
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init_fn(params):
        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)
        return LarsState(count=jnp.zeros([], jnp.int32), momentum=zeros)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("lars needs the parameters: call update(grads, state, params)")
        lr = jnp.asarray(schedule(state.count), jnp.float32)
        masks = mask(params) if callable(mask) else mask
        if masks is None:
            masks = weight_mask(params)

        def adapt(g, p, m):
            if not m:
                return g.astype(jnp.float32)
            g = g.astype(jnp.float32) + weight_decay * p
            q = _trust_ratio(p, g, eta)
            if clip_lr:
                q = jnp.minimum(q / jnp.maximum(lr, 1e-12), 1.0)
            return q * g

        adapted = jax.tree.map(adapt, updates, params, masks)
        mu = jax.tree.map(lambda m, g: momentum * m + g, state.momentum, adapted)
        new_updates = jax.tree.map(lambda m, p: (-lr * m).astype(p.dtype), mu, params)
        return new_updates, LarsState(count=optax.safe_increment(state.count), momentum=mu)

    return optax.GradientTransformation(init_fn, update_fn)


def warmup_cosine_schedule(
    peak_value: float, warmup_steps: int, total_steps: int, end_factor: float = 0.001
) -> Callable[[chex.Numeric], jax.Array]:
    """The official adjust_learning_rate, times peak_value.

    f(step) = step / warmup for step < warmup; afterwards a cosine from 1 down to end_factor,
    reached at step = total_steps: with s = step - warmup and S = total - warmup,
    q = (1 + cos(pi s / S)) / 2 and f = q + end_factor (1 - q).
    """
    if total_steps <= warmup_steps:
        raise ValueError(
            f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps}); "
            "train for longer or shorten the warm-up"
        )

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = step / max(warmup_steps, 1)
        # (1 + cos(pi s / S)) / 2 == sin^2(pi (S - s) / (2 S)): exact in float32 near the end,
        # where the cosine form loses ~1e-5 of the final LR to rounding.
        remaining = (total_steps - step) / (total_steps - warmup_steps)
        q = jnp.square(jnp.sin(0.5 * math.pi * remaining))
        cosine = q + end_factor * (1.0 - q)
        return peak_value * jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def learning_rates(optim_config, global_batch: int, warmup_steps: int, total_steps: int):
    """{"weights": schedule, "biases": schedule}: base rates times batch / 256 times f(step)."""
    scale = global_batch / 256
    return {
        group: warmup_cosine_schedule(
            base * scale, warmup_steps, total_steps, optim_config.end_factor
        )
        for group, base in (
            ("weights", optim_config.lr_weights),
            ("biases", optim_config.lr_biases),
        )
    }


def gradient_scale(optim_config) -> float:
    """Factor applied to the true global-batch gradient before the optimizer.

    The official code sums C with a non-differentiable all_reduce and DDP averages gradients,
    so the gradient it feeds LARS is 1/W of the true one (W = its number of GPUs). With LARS
    that acts like weight decay x W on weights and lr_biases / W on biases and BN parameters.
    `reference_world_size = W` reproduces those dynamics on any device count; 0 (or None)
    uses the true gradient.
    """
    world = optim_config.get("reference_world_size") or 0
    if world < 0:
        raise ValueError(f"optim.reference_world_size must be >= 0; got {world}")
    return 1.0 / world if world else 1.0


def lars_statistics(grads, params, optim_config) -> dict:
    """What LARS sees this step, per parameter group (health metrics for the train step).

    grad_norm_weights / grad_norm_biases: the global L2 norm of the gradient LARS receives
    (the differentiated loss's gradient times gradient_scale) over the weights (ndim > 1)
    and over the biases and BN parameters. trust_ratio_mean: the mean over weight tensors
    of eta ||p|| / ||g + wd p||, the official ratio before any clip_lr cap. ||p|| and
    ||g + wd p|| are the expressions the LARS update computes from the same arrays, so under
    one jit XLA computes them once: no second pass over the parameters (compiled with the
    update, the statistics add one reduction per gradient tensor, the sum of its squares,
    and none over parameters).
    """
    scale = gradient_scale(optim_config)
    wd, eta = optim_config.weight_decay, optim_config.eta
    weights, squares, ratios = weight_mask(params), {True: [], False: []}, []
    for g, p, is_weight in zip(
        jax.tree.leaves(grads), jax.tree.leaves(params), jax.tree.leaves(weights), strict=True
    ):
        g = g.astype(jnp.float32) * scale
        squares[is_weight].append(jnp.sum(jnp.square(g)))
        if is_weight:
            ratios.append(_trust_ratio(p, g + wd * p, eta))
    return {
        "grad_norm_weights": _global_norm(squares[True]),
        "grad_norm_biases": _global_norm(squares[False]),
        "trust_ratio_mean": jnp.mean(jnp.stack(ratios)) if ratios else jnp.ones([]),
    }


def _global_norm(squared_norms: list) -> jax.Array:
    return jnp.sqrt(sum(squared_norms)) if squared_norms else jnp.zeros([], jnp.float32)


def make_optimizer(optim_config, *, global_batch: int, warmup_steps: int, total_steps: int):
    """The pretraining optimizer from config.optim; returns (tx, learning-rate schedules).

    Two LARS parameter groups as in the official code: weights (ndim > 1) at lr_weights with
    decay and trust ratio, biases/BN (ndim == 1) at lr_biases with neither.
    """
    if optim_config.name != "lars":
        raise ValueError(f"unknown optimizer {optim_config.name!r}; only 'lars' is implemented")
    schedules = learning_rates(optim_config, global_batch, warmup_steps, total_steps)
    group_tx = {
        group: lars(
            schedules[group],
            weight_decay=optim_config.weight_decay,
            momentum=optim_config.momentum,
            eta=optim_config.eta,
            mask=(lambda params, g=group: jax.tree.map(lambda _: g == "weights", params)),
            clip_lr=optim_config.get("clip_lr", False),
        )
        for group in ("weights", "biases")
    }
    labels = lambda params: jax.tree.map(lambda p: "weights" if p.ndim > 1 else "biases", params)
    tx = optax.partition(group_tx, labels)
    scale = gradient_scale(optim_config)
    if scale != 1.0:
        tx = optax.chain(optax.scale(scale), tx)
    return tx, schedules
