"""A linear head on a backbone: its train step, optimizer, loop and accuracies.

One train step serves every protocol:
  finetune=False (linear eval): the backbone runs in inference mode (running BN statistics)
    outside the differentiated function, so no gradient or BN update ever reaches it; only
    the head is in the optimizer.
  finetune=True (semi-supervised, transfer fine-tuning): every layer is trained, BN in train
    mode (batch statistics of the global batch, running statistics updated), two learning
    rates (backbone, head) through optax.multi_transform.
  backbone=None: the inputs are precomputed features (the fast variants).

Optimizer: torch SGD (weight decay added to the gradient before the momentum, the LR
applied after it) with CosineAnnealingLR(T_max=epochs) stepped once per epoch: the LR is
constant within an epoch. The head starts at weight N(0, 0.01), bias 0. Losses are
masked means, so padded rows never train anything; eval counts ignore them too. How the
protocols wire these pieces together: bt_jax/evaluation/protocols.py.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from bt_jax import distributed, reporting
from bt_jax.evaluation.features import Encoder, backbone_features


@flax.struct.dataclass
class State:
    step: jax.Array
    params: Any  # {"backbone": ..., "head": ...}; backbone {} on precomputed features
    batch_stats: Any  # the backbone's
    opt_state: Any  # over the trainable part: {"head"} or everything


def linear_head(num_classes: int) -> nn.Dense:
    return nn.Dense(
        num_classes,
        kernel_init=nn.initializers.normal(0.01),
        bias_init=nn.initializers.zeros,
        param_dtype=jnp.float32,
    )


def epoch_cosine(base_lr: float, steps_per_epoch: int, epochs: int) -> Callable:
    """torch CosineAnnealingLR(T_max=epochs, eta_min=0) stepped after every epoch."""

    def schedule(step):
        epoch = jnp.minimum(step // steps_per_epoch, epochs)
        return base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))

    return schedule


def torch_sgd(schedule, momentum: float, weight_decay: float) -> optax.GradientTransformation:
    """torch.optim.SGD: d = g + wd p; buf = momentum buf + d; p -= lr buf."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum))


def make_optimizer(
    cfg: ml_collections.ConfigDict, steps_per_epoch: int, *, finetune: bool
) -> tuple[optax.GradientTransformation, dict]:
    """SGD over the trainable tree: {"head"} (linear) or {"backbone", "head"} (fine-tuning).

    cfg: lr_head, lr_backbone (fine-tuning only), momentum, weight_decay, epochs; learning
    rates as given (the caller scales them with the batch size).
    """
    schedules = {"head": epoch_cosine(cfg.lr_head, steps_per_epoch, cfg.epochs)}
    if not finetune:
        return torch_sgd(schedules["head"], cfg.momentum, cfg.weight_decay), schedules
    schedules["backbone"] = epoch_cosine(cfg.lr_backbone, steps_per_epoch, cfg.epochs)
    transforms = {k: torch_sgd(s, cfg.momentum, cfg.weight_decay) for k, s in schedules.items()}

    # Every leaf is labelled by its top-level key: "backbone" or "head".
    def labels(params):
        return {key: jax.tree.map(lambda _, key=key: key, tree) for key, tree in params.items()}

    return optax.multi_transform(transforms, labels), schedules


def trainable(params: dict, finetune: bool) -> dict:
    return params if finetune else {"head": params["head"]}


def init_state(
    backbone_variables: dict,
    num_features: int,
    num_classes: int,
    tx: optax.GradientTransformation,
    *,
    finetune: bool,
    seed: int = 0,
) -> State:
    head = linear_head(num_classes)
    head_params = head.init(jax.random.key(seed), jnp.zeros((1, num_features)))["params"]
    params = {"backbone": backbone_variables.get("params", {}), "head": head_params}
    return State(
        step=jnp.zeros([], jnp.int32),
        params=params,
        batch_stats=backbone_variables.get("batch_stats", {}),
        opt_state=tx.init(trainable(params, finetune)),
    )


def _features(backbone: Encoder | None, params, batch_stats, inputs, train: bool):
    """(float32 features, updated batch_stats) of images, or the inputs if backbone is None."""
    if backbone is None:
        return inputs.astype(jnp.float32), batch_stats
    variables = {"params": params["backbone"], "batch_stats": batch_stats}
    if not train:
        return backbone_features(backbone, variables, inputs), batch_stats
    out, new = backbone.apply(variables, inputs, train=True, mutable=["batch_stats"])
    return out.astype(jnp.float32), new["batch_stats"]


def masked_cross_entropy(logits, labels, mask):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    weights = mask.astype(jnp.float32)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@functools.partial(
    jax.jit, static_argnames=("backbone", "num_classes", "tx", "finetune"), donate_argnums=0
)
def train_step(
    state: State,
    batch: dict,
    *,
    backbone: Encoder | None,
    num_classes: int,
    tx: optax.GradientTransformation,
    finetune: bool,
) -> tuple[State, dict]:
    head = linear_head(num_classes)
    if not finetune:  # frozen: features computed once, outside the gradient
        frozen, _ = _features(backbone, state.params, state.batch_stats, batch["image"], False)

    def loss_fn(train_params):
        if finetune:
            feats, stats = _features(
                backbone, train_params, state.batch_stats, batch["image"], True
            )
        else:
            feats, stats = frozen, state.batch_stats
        logits = head.apply({"params": train_params["head"]}, feats)
        return masked_cross_entropy(logits, batch["label"], batch["mask"]), stats

    train_params = trainable(state.params, finetune)
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_params)
    updates, opt_state = tx.update(grads, state.opt_state, train_params)
    train_params = optax.apply_updates(train_params, updates)
    new_state = state.replace(
        step=state.step + 1,
        params={**state.params, **train_params},
        batch_stats=stats,
        opt_state=opt_state,
    )
    return new_state, {"loss": loss}


@functools.partial(jax.jit, static_argnames=("backbone", "num_classes"))
def eval_counts(params, batch_stats, batch: dict, *, backbone: Encoder | None, num_classes: int):
    """Top-1 / top-5 hits and per-class (correct, total) of a batch; padding excluded."""
    feats, _ = _features(backbone, params, batch_stats, batch["image"], False)
    logits = linear_head(num_classes).apply({"params": params["head"]}, feats)
    _, ranked = jax.lax.top_k(logits, min(5, num_classes))
    hit = ranked == batch["label"][:, None]
    mask = batch["mask"]
    per_class = jax.nn.one_hot(batch["label"], num_classes) * mask[:, None]
    return {
        "top1": jnp.sum(hit[:, 0] & mask),
        "top5": jnp.sum(jnp.any(hit, axis=1) & mask),
        "count": jnp.sum(mask),
        "class_correct": jnp.sum(per_class * hit[:, :1], axis=0),
        "class_count": jnp.sum(per_class, axis=0),
    }


def evaluate(
    state: State, batches: Iterable, mesh: Mesh, *, backbone: Encoder | None, num_classes: int
) -> dict:
    """Top-1, top-5 and mean per-class accuracy (percent) over every unpadded example."""
    counts = [
        eval_counts(
            state.params, state.batch_stats, batch, backbone=backbone, num_classes=num_classes
        )
        for batch in distributed.prefetch_to_mesh(batches, mesh)
    ]
    return accuracies_of(counts)


def accuracies_of(counts: list) -> dict:
    """accuracies() of a list of eval_counts results (global arrays), summed over batches."""
    return accuracies(
        jax.tree.map(lambda *x: np.sum(x, axis=0), *distributed.global_to_host(counts))
    )


def accuracies(totals: dict) -> dict:
    """Top-1, top-5 and mean per-class accuracy (percent) from summed eval_counts."""
    n = int(totals["count"])
    if n == 0:
        raise ValueError("the evaluation split is empty")
    seen = totals["class_count"] > 0  # classes absent from the split do not count
    per_class = totals["class_correct"][seen] / totals["class_count"][seen]
    return {
        "top1": 100.0 * float(totals["top1"]) / n,
        "top5": 100.0 * float(totals["top5"]) / n,
        "mean_per_class": 100.0 * float(np.mean(per_class)),
        "num_examples": n,
    }


def fit(
    state: State,
    *,
    train_epoch: Callable[[int], Iterable],
    steps_per_epoch: int,
    epochs: int,
    evaluate_fn: Callable[[State], dict],
    step_kwargs: dict,
    schedules: dict,
    mesh: Mesh,
    writer: reporting.MetricWriter,
    name: str,
    log_every_steps: int = 50,
    eval_every_epochs: int = 1,
) -> tuple[State, list[dict]]:
    """Train `epochs` epochs, evaluating every `eval_every_epochs` and after the last one.

    Returns the state and one row per evaluation: {"epoch", "top1", "top5", ...}. Rows go
    to `writer` (tag `name`) named by `name`: f"{name}_top1", ...
    """
    total = steps_per_epoch * epochs
    progress = reporting.Progress(total, 0, name=name)
    history, losses = [], []
    step = 0
    with jax.set_mesh(mesh):
        for epoch in range(epochs):
            for batch in distributed.prefetch_to_mesh(train_epoch(epoch), mesh):
                state, metrics = train_step(state, batch, **step_kwargs)
                losses.append(metrics["loss"])
                step += 1
                if step % log_every_steps == 0 or step == total:
                    loss = float(np.mean(distributed.global_to_host(losses)))
                    lrs = {f"lr_{k}": float(s(step - 1)) for k, s in schedules.items()}
                    writer.write(step, {"loss": loss, "epoch": step / steps_per_epoch, **lrs})
                    lr_text = " ".join(f"{k} {v:.4g}" for k, v in lrs.items())
                    text = f"ep {step / steps_per_epoch:.2f} | loss {loss:.4f} | {lr_text}"
                    progress.report(step, text)
                    losses = []
            if (epoch + 1) % eval_every_epochs == 0 or epoch + 1 == epochs:
                result = {"epoch": epoch + 1, **evaluate_fn(state)}
                history.append(result)
                writer.write(step, {f"{name}_{k}": v for k, v in result.items()}, tag=name)
                progress.say(
                    f"epoch {epoch + 1}/{epochs}: top-1 {result['top1']:.2f}%, top-5 "
                    f"{result['top5']:.2f}%, mean per-class {result['mean_per_class']:.2f}% "
                    f"({result['num_examples']} examples)"
                )
    return state, history


def summarise(history: list[dict], prefix: str) -> dict:
    """Last and best epoch, named by protocol: f"{prefix}_top1_last", f"{prefix}_top1_best"...

    "Best" is the maximum over evaluated epochs of each metric separately, as the official
    evaluate.py reports best_acc1 / best_acc5; f"{prefix}_best_epoch" is top-1's.
    """
    last = history[-1]
    out = {f"{prefix}_{k}_last": last[k] for k in ("top1", "top5", "mean_per_class")}
    for k in ("top1", "top5", "mean_per_class"):
        out[f"{prefix}_{k}_best"] = max(h[k] for h in history)
    out[f"{prefix}_best_epoch"] = max(history, key=lambda h: h["top1"])["epoch"]
    out[f"{prefix}_num_examples"] = last["num_examples"]
    out[f"{prefix}_epochs"] = last["epoch"]
    return out


def epochs_of(iterator: Iterable, steps_per_epoch: int) -> Callable[[int], Iterable]:
    """train_epoch for fit() from one continuous iterator of batches."""
    iterator = iter(iterator)
    return lambda _epoch: itertools.islice(iterator, steps_per_epoch)


def scaled_lr(lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """Learning rates are given for batch 256 and scale linearly with the batch."""
    return lr * global_batch / reference_batch
