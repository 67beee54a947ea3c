"""The Barlow Twins pretraining job: one jitted train step over a device mesh, and its loop.

The step runs on global jax.Arrays: the batch is sharded along the mesh's "data" axis, the
state is replicated. BatchNorm statistics are therefore taken over the global batch (no
per-device BN), each view separately; the loss standardizes z over the global batch and is
computed with the configured sharding strategy (see losses.py).

Resuming is exact: the input pipeline is a pure function of (seed, step) and the step is
deterministic, so a run restarted from the checkpoint of step k reproduces the
uninterrupted run bit for bit on CPU.
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from bt_jax import checkpoint, data, distributed, knn, losses, optim, reporting
from bt_jax.data.device_ops import finish_views
from bt_jax.models import build_model


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key; folded with the step for any stochastic layer
    first_bad_step: jax.Array  # -1 while every loss so far was finite


def _train_step(state: TrainState, batch, *, model, tx, loss_cfg, views_cfg, mesh, nan_at=-1):
    """One LARS step on a global batch {"view1", "view2"} of uint8 images.

    With views_cfg.pixel_ops == "device" the batch also holds each example's colour-jitter /
    grayscale / blur / solarize draws, applied here on the accelerator (the host only
    decodes, crops and flips); otherwise the views arrive finished and are only normalised.
    """
    view1, view2 = finish_views(batch, views_cfg)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        (z1, z2), new_vars = model.apply(
            variables, view1, view2, train=True, mutable=["batch_stats"]
        )
        terms = losses.barlow_twins_terms(
            z1, z2, lambd=loss_cfg.lambd, mesh=mesh, strategy=loss_cfg.strategy
        )
        loss = terms.loss * loss_cfg.scale
        if nan_at >= 0:  # debugging aid and test hook: poison one step's loss
            loss = loss * jnp.where(state.step == nan_at, jnp.nan, 1.0)
        return loss, (terms, new_vars["batch_stats"])

    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # Metrics report the unscaled loss; the non-finite guard watches the one differentiated.
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    # A non-finite loss freezes the state at its last good value; the host sees
    # first_bad_step >= 0, stops the run and never checkpoints the poisoned state.
    good = jnp.isfinite(loss) & (state.first_bad_step < 0)
    keep_if_good = lambda new, old: jax.tree.map(lambda n, o: jnp.where(good, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_good(params, state.params),
        batch_stats=keep_if_good(batch_stats, state.batch_stats),
        opt_state=keep_if_good(opt_state, state.opt_state),
        first_bad_step=jnp.where(
            (state.first_bad_step < 0) & ~jnp.isfinite(loss), state.step, state.first_bad_step
        ),
    )
    metrics = {"loss": terms.loss, "invariance": terms.invariance, "redundancy": terms.redundancy}
    return new_state, metrics


_STATIC = ("model", "tx", "loss_cfg", "views_cfg", "mesh", "nan_at")
train_step = jax.jit(_train_step, static_argnames=_STATIC, donate_argnums=0)

# XLA:CPU options for the step (names from jax 0.10's XLA; setup.cfg pins jax < 0.11):
# YNNPACK for dots, reductions and elementwise fusions, XLA's own (Eigen) convolutions.
# Elementwise chains (BN, ReLU, residual sums) then stay in their own fusions instead of
# being recomputed inside the strided transposes that feed every weight-gradient
# convolution, and Eigen's weight-gradient convolutions are 2.5-4x faster than YNNPACK's
# on ResNet shapes: 1.7x the image pairs/s of XLA's defaults for the CIFAR step, 1.25x for
# the quickstart's (docs/benchmarks.md, Train step).
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": ",".join(
        f"LIBRARY_FUSION_TYPE_{kind}" for kind in ("INDIVIDUAL_DOT", "REDUCE", "ELTWISE")
    )
}
cpu_train_step = jax.jit(
    _train_step,
    static_argnames=_STATIC,
    donate_argnums=0,
    compiler_options=CPU_COMPILER_OPTIONS,
)


def step_function(mesh):
    """The jitted train step for the mesh's platform: cpu_train_step on CPUs, else train_step."""
    return cpu_train_step if mesh.devices.flat[0].platform == "cpu" else train_step


def step_options(config, model, tx, mesh) -> dict:
    """train_step's static arguments for `config` (frozen, so that jit can hash them)."""
    return dict(
        model=model,
        tx=tx,
        loss_cfg=ml_collections.FrozenConfigDict(config.loss),
        views_cfg=ml_collections.FrozenConfigDict(config.augment),
        mesh=mesh,
    )


def init_state(model, tx, config, image_size: int) -> TrainState:
    """A fresh state (jit-compiled init, so parameters are created on the devices)."""
    # RBG keys for initialisation: threefry's unrolled hashing makes XLA take 5x longer to
    # compile the init of a ResNet (16 s vs 3 s for a toy one on CPU); the values are just
    # as good and still a pure function of the seed.
    init_rng = jax.random.key(config.seed, impl="rbg")
    images = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    variables = model.init(init_rng, images, images, train=True)
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        rng=jax.random.PRNGKey(config.seed),
        first_bad_step=jnp.full([], -1, jnp.int32),
    )


class PreemptionWatch:
    """Turns SIGTERM into "checkpoint at a step every process agrees on, then exit 0"."""

    def __init__(self):
        self._event = threading.Event()
        self.multi_process = jax.process_count() > 1
        if not self.multi_process:  # jax.distributed's own service handles SIGTERM otherwise
            signal.signal(signal.SIGTERM, lambda *_: self._event.set())

    def reached(self, step: int) -> bool:
        if self.multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._event.is_set()


def schedule_summary(config, steps_per_epoch: int) -> dict:
    """Epochs -> steps, in one place."""
    total = config.train.epochs * steps_per_epoch
    stop = min(total, config.train.stop_after_steps or total)
    return dict(
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=int(config.optim.warmup_epochs * steps_per_epoch),
        stop_step=stop,
    )


def _checkpoint_meta(config, step: int, plan: dict) -> dict:
    return {
        "step": step,
        "epoch": step / plan["steps_per_epoch"],
        # The data position: the pipeline is a function of (seed, streams, batch, step).
        "data": {
            "next_step": step,
            "seed": config.seed,
            "global_batch": config.train.global_batch,
            "num_streams": config.data.num_streams,
            "dataset": config.data.dataset,
        },
        "config": config.to_dict(),
    }


def _check_resumable(meta: dict, config) -> None:
    saved = meta["config"]
    for section, key in [
        ("model", "arch"),
        ("model", "projector"),
        ("model", "width"),
        ("train", "global_batch"),
        ("data", "dataset"),
        ("data", "num_streams"),
    ]:
        old, new = saved[section][key], config[section][key]
        if list(np.atleast_1d(old)) != list(np.atleast_1d(new)):
            raise ValueError(
                f"the workdir's checkpoint was made with {section}.{key}={old!r} but this run "
                f"has {new!r}; use a fresh --workdir or the original setting"
            )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pretrain, checkpointing and resuming from workdir; returns the final metrics."""
    workdir = checkpoint.check_workdir(workdir)
    mesh = distributed.make_mesh()
    distributed.check_global_batch(config.train.global_batch, mesh)
    ckpt = checkpoint.Checkpointer(
        workdir, keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoints
    )
    start = ckpt.latest_step() or 0
    if start:
        _check_resumable(ckpt.restore_meta(start), config)
    # Opening the pipeline before any compile makes a missing dataset fail fast.
    batches = data.pretrain_batches(
        config.data,
        config.augment,
        global_batch=config.train.global_batch,
        seed=config.seed,
        start_step=start,
    )
    plan = schedule_summary(config, batches.steps_per_epoch)
    model = build_model(config.model)
    tx, schedules = optim.make_optimizer(
        config.optim,
        global_batch=config.train.global_batch,
        warmup_steps=plan["warmup_steps"],
        total_steps=plan["total_steps"],
    )
    image_size = config.augment.view1.image_size
    replicated = distributed.replicated(mesh)
    with jax.set_mesh(mesh):
        init = jax.jit(
            functools.partial(init_state, model, tx, config, image_size), out_shardings=replicated
        )
        if start:
            abstract = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                jax.eval_shape(init),
            )
            state, _ = ckpt.restore(start, abstract)
            logging.info("resumed from step %d in %s", start, ckpt.directory)
        else:
            state = init()

    progress = reporting.Progress(plan["stop_step"], start)
    progress.say(
        f"{jax.process_count()} process(es), {jax.device_count()} devices | global batch "
        f"{config.train.global_batch} | {plan['steps_per_epoch']} steps/epoch, "
        f"{plan['total_steps']} steps in {config.train.epochs} epochs (warm-up "
        f"{plan['warmup_steps']})" + (f" | resuming at step {start}" if start else "")
    )
    if start >= plan["stop_step"]:
        progress.say(f"already trained to step {start}; nothing to do")
        ckpt.close()
        return {"step": start}

    device_batches = distributed.prefetch_to_mesh(batches, mesh, config.train.device_prefetch)
    writer = reporting.MetricWriter(workdir, resume_step=start)
    watch = PreemptionWatch()
    step_fn = functools.partial(
        step_function(mesh),
        **step_options(config, model, tx, mesh),
        nan_at=config.train.debug_nan_at_step,
    )
    knn_every = config.knn.every_epochs * plan["steps_per_epoch"]
    pending, last = [], {}
    t_log, wait_time, step = time.perf_counter(), 0.0, start
    last_good_ckpt = start if start else None

    def save(at_step, wait=False):
        ckpt.save(at_step, state, _checkpoint_meta(config, at_step, plan), wait=wait)

    with jax.set_mesh(mesh):
        while step < plan["stop_step"]:
            t0 = time.perf_counter()
            batch = next(device_batches)
            wait_time += time.perf_counter() - t0
            state, metrics = step_fn(state, batch)
            pending.append(metrics)
            step += 1
            if config.train.debug_step_delay_s:
                time.sleep(config.train.debug_step_delay_s)

            report = step % config.train.log_every_steps == 0 or step == plan["stop_step"]
            ckpt_due = step % config.train.checkpoint_every_steps == 0
            preempted = watch.reached(step)
            if report or ckpt_due or preempted:
                bad = int(jax.device_get(state.first_bad_step))
                if bad >= 0:
                    ckpt.close()
                    writer.close()
                    raise FloatingPointError(
                        f"the loss became non-finite at step {bad}; stopping. The last good "
                        f"checkpoint (step {ckpt.latest_step()}) is in {ckpt.directory}. "
                        "Usual causes: a learning rate too high for the batch size, bf16 "
                        "overflow (try --config.model.dtype=float32), or corrupt inputs."
                    )
            if report:
                elapsed = time.perf_counter() - t_log
                last = _summarise(pending, step, elapsed, wait_time, schedules, config, plan)
                writer.write(step, last)
                progress.report(step, _progress_text(last))
                pending, t_log, wait_time = [], time.perf_counter(), 0.0
            if knn_every and step % knn_every == 0 and step < plan["stop_step"]:
                _knn_monitor(config, model, state, mesh, writer, progress, step)
            if ckpt_due or preempted:
                save(step, wait=preempted)
                last_good_ckpt = step
            if preempted:
                progress.say(
                    f"preemption signal: checkpoint of step {step} written to "
                    f"{ckpt.directory}; rerun the same command to resume"
                )
                ckpt.close()
                writer.close()
                return {"step": step, "preempted": True, **last}

    if last_good_ckpt != step:
        save(step)
    result = {"step": step, **last}
    if config.knn.at_end:
        result.update(_knn_monitor(config, model, state, mesh, writer, progress, step))
    ckpt.close()
    writer.close()
    return result


run = train_and_evaluate  # the job entry point main.py calls


def _summarise(pending, step, elapsed, wait_time, schedules, config, plan) -> dict:
    values = jax.device_get(pending)
    mean = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
    steps = len(values)
    images = steps * config.train.global_batch  # source images; each gives two views
    mean.update(
        epoch=step / plan["steps_per_epoch"],
        lr_weights=float(schedules["weights"](step - 1)),
        lr_biases=float(schedules["biases"](step - 1)),
        images_per_s=images / elapsed,
        images_per_s_per_device=images / elapsed / jax.device_count(),
        step_time_s=elapsed / steps,
        input_wait_fraction=wait_time / elapsed,
    )
    return mean


def _progress_text(m: dict) -> str:
    return (
        f"ep {m['epoch']:.2f} | loss {m['loss']:.2f} (inv {m['invariance']:.2f}, red "
        f"{m['redundancy']:.1f}) | lr {m['lr_weights']:.4g}/{m['lr_biases']:.3g} | "
        f"{m['images_per_s']:.1f} img/s ({m['images_per_s_per_device']:.1f}/dev) "
        f"{m['step_time_s']:.3f} s/step, input wait {100 * m['input_wait_fraction']:.0f}%"
    )


def _knn_monitor(config, model, state, mesh, writer, progress, step) -> dict:
    variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]}
    result = knn.evaluate(model.backbone, variables, config, mesh)
    named = {f"knn_{k}": v for k, v in result.items()}
    writer.write(step, named, tag="knn")
    progress.say(
        f"kNN (k={config.knn.k}, backbone features, {config.data.dataset}) at step {step}: "
        f"top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%"
    )
    return named
