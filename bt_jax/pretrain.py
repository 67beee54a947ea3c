"""The Barlow Twins pretraining job: one jitted train step over a device mesh, and its loop.

The step runs on global jax.Arrays: the batch is sharded along the mesh's "data" axis, the
state is replicated. BatchNorm statistics are therefore taken over the global batch (no
per-device BN), each view separately; the loss standardizes z over the global batch and is
computed with the configured sharding strategy (see losses.py).

Resuming is exact: the input pipeline is a pure function of (seed, step) and the step is
deterministic, so a run restarted from the checkpoint of step k reproduces the
uninterrupted run bit for bit on CPU.

With labels (train.online_probe, "auto": when the dataset has them) the step also trains an
online linear probe: a linear head on view 1's backbone features behind a stop-gradient,
with its own SGD, so it never changes the backbone or projector. View 1's features are
already computed by the step (an un-augmented image would cost a third forward pass and a
third decode); the price is that the probe trains on augmented crops and is scored on
center crops (with the kNN monitor), so it reads a little below a linear evaluation.

Health metrics every log step, from what the step computes anyway: the mean of C's
diagonal and the RMS of its off-diagonal (from the loss terms), the gradient norm of the
weights and of the biases/BN parameters and the mean LARS trust ratio (optim.lars_statistics);
with the kNN monitor, RankMe of the bank's backbone features (README, Metrics).
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from bt_jax import checkpoint, data, defaults, distributed, losses, optim, reporting
from bt_jax.data import normalization
from bt_jax.data.device_ops import finish_views
from bt_jax.evaluation import classifier, knn
from bt_jax.evaluation.features import Encoder
from bt_jax.models import ResNet, build_model, parallel, parse_projector


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key; folded with the step for any stochastic layer
    first_bad_step: jax.Array  # -1 while every loss so far was finite
    probe_params: Any  # the online linear probe's head (None without the probe)
    probe_opt_state: Any


@dataclasses.dataclass(frozen=True)
class OnlineProbe:
    """The online linear probe's static part (hashable: a jit static argument)."""

    num_classes: int
    tx: optax.GradientTransformation
    learning_rate: Callable  # step -> lr, for the metrics

    def init(self, num_features: int, seed: int):
        """(head parameters, optimizer state): the linear protocol's head, N(0, 0.01)."""
        head = classifier.linear_head(self.num_classes)
        key = jax.random.fold_in(jax.random.key(seed), 1)
        params = head.init(key, jnp.zeros((1, num_features), jnp.float32))["params"]
        return params, self.tx.init(params)

    def step(self, params, opt_state, features, labels):
        """One SGD step on (stop-gradient) features; labels < 0 (unlabelled) are masked."""
        head = classifier.linear_head(self.num_classes)
        mask = labels >= 0

        def loss_fn(p):
            logits = head.apply({"params": p}, features)
            safe = jnp.where(mask, labels, 0)
            return classifier.masked_cross_entropy(logits, safe, mask), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        hits = (jnp.argmax(logits, -1) == labels) & mask
        top1 = 100.0 * jnp.sum(hits) / jnp.maximum(jnp.sum(mask), 1)
        metrics = {"online_linear_loss": loss, "online_linear_train_top1": top1}
        return optax.apply_updates(params, updates), opt_state, metrics


def online_probe(config, num_classes: int, plan: dict) -> OnlineProbe | None:
    """The probe config.train.online_probe asks for on a dataset of num_classes (0 =
    unlabelled): SGD with momentum 0.9, no decay, lr online_probe_lr x batch / 256 on the
    pretraining schedule's warm-up + cosine shape (as solo-learn's online classifier
    follows its scheduler)."""
    mode = config.train.online_probe
    if mode == "off" or (mode == "auto" and not num_classes):
        return None
    if not num_classes:
        raise ValueError(
            f"config.train.online_probe='on' needs labels, but {config.data.dataset} has no "
            "ClassLabel 'label'; use --config.train.online_probe=auto (or off)"
        )
    lr = config.train.online_probe_lr * config.train.global_batch / 256
    schedule = optim.warmup_cosine_schedule(
        lr, plan["warmup_steps"], plan["total_steps"], config.optim.end_factor
    )
    return OnlineProbe(num_classes, classifier.torch_sgd(schedule, 0.9, 0.0), schedule)


def _is_backbone_call(module, method_name: str) -> bool:
    return isinstance(module, ResNet) and method_name == "__call__"


def health_metrics(terms: losses.LossTerms, features: int) -> dict:
    """Mean of C's diagonal and RMS of its off-diagonal entries, from the loss's own sums."""
    pairs = max(features * (features - 1), 1)
    return {
        "c_diag_mean": terms.diagonal / features,
        "c_offdiag_rms": jnp.sqrt(jnp.maximum(terms.redundancy, 0.0) / pairs),
    }


def _train_step(
    state: TrainState,
    batch,
    *,
    model,
    tx,
    loss_cfg,
    optim_cfg,
    views_cfg,
    stats,
    mesh,
    probe=None,
    nan_at=-1,
):
    """One LARS step on a global batch {"view1", "view2"[, "label"]} of uint8 images.

    With views_cfg.pixel_ops == "device" the batch also holds each example's colour-jitter /
    grayscale / blur / solarize draws, applied here on the accelerator (the host only
    decodes, crops and flips); otherwise the views arrive finished and are only normalised
    (with `stats`). With a probe, its head takes one step on view 1's backbone features.
    """
    view1, view2 = finish_views(batch, views_cfg, stats)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        (z1, z2), new_vars = model.apply(
            variables,
            view1,
            view2,
            train=True,
            mutable=["batch_stats", "intermediates"] if probe else ["batch_stats"],
            capture_intermediates=_is_backbone_call if probe else False,
        )
        terms = losses.barlow_twins_terms(
            z1, z2, lambd=loss_cfg.lambd, mesh=mesh, strategy=loss_cfg.strategy
        )
        loss = terms.loss * loss_cfg.scale
        if nan_at >= 0:  # debugging aid and test hook: poison one step's loss
            loss = loss * jnp.where(state.step == nan_at, jnp.nan, 1.0)
        health = health_metrics(terms, z1.shape[-1])
        return loss, (terms, health, new_vars["batch_stats"], new_vars.get("intermediates"))

    (loss, (terms, health, batch_stats, captured)), grads = jax.value_and_grad(
        loss_fn, has_aux=True
    )(state.params)
    # Metrics report the unscaled loss; the non-finite guard watches the one differentiated.
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": terms.loss,
        "invariance": terms.invariance,
        "redundancy": terms.redundancy,
        **health,
        **optim.lars_statistics(grads, state.params, optim_cfg),
    }
    probe_params, probe_opt_state = state.probe_params, state.probe_opt_state
    if probe:
        # The backbone's output on both views, interleaved as the twin model stacks them
        # (row 2i: view 1 of example i); behind a stop-gradient nothing flows back.
        (features,) = jax.tree.leaves(captured)
        n = view1.shape[0]
        view1_features = jax.lax.stop_gradient(features.reshape(n, 2, -1)[:, 0])
        probe_params, probe_opt_state, probe_metrics = probe.step(
            probe_params, probe_opt_state, view1_features.astype(jnp.float32), batch["label"]
        )
        metrics.update(probe_metrics)

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
        probe_params=keep_if_good(probe_params, state.probe_params),
        probe_opt_state=keep_if_good(probe_opt_state, state.probe_opt_state),
    )
    return new_state, metrics


_STATIC = ("model", "tx", "loss_cfg", "optim_cfg", "views_cfg", "stats", "mesh", "probe", "nan_at")
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


def step_options(config, model, tx, mesh, probe: OnlineProbe | None = None) -> dict:
    """train_step's static arguments for `config` (frozen, so that jit can hash them)."""
    return dict(
        model=model,
        tx=tx,
        loss_cfg=ml_collections.FrozenConfigDict(config.loss),
        optim_cfg=ml_collections.FrozenConfigDict(config.optim),
        views_cfg=ml_collections.FrozenConfigDict(config.augment),
        stats=normalization.of_config(config),
        mesh=mesh,
        probe=probe,
    )


def init_state(model, tx, config, image_size: int, probe: OnlineProbe | None = None) -> TrainState:
    """A fresh state (jit-compiled init, so parameters are created on the devices)."""
    # RBG keys for initialisation: threefry's unrolled hashing makes XLA take 5x longer to
    # compile the init of a ResNet (16 s vs 3 s for a toy one on CPU); the values are just
    # as good and still a pure function of the seed.
    init_rng = jax.random.key(config.seed, impl="rbg")
    images = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    variables = model.init(init_rng, images, images, train=True)
    probe_params, probe_opt_state = (
        probe.init(model.backbone.num_features, config.seed) if probe else (None, None)
    )
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        rng=jax.random.PRNGKey(config.seed),
        first_bad_step=jnp.full([], -1, jnp.int32),
        probe_params=probe_params,
        probe_opt_state=probe_opt_state,
    )


def sharded_init(model, tx, config, image_size: int, mesh, probe: OnlineProbe | None = None):
    """(init, abstract): init_state jitted to create each leaf with its sharding on `mesh`
    (models/parallel.py: the projector's over "model", the rest replicated) and the abstract
    state (shapes, dtypes, shardings) that restores and ahead-of-time compiles take."""
    fresh = functools.partial(init_state, model, tx, config, image_size, probe)
    shapes = jax.eval_shape(fresh)
    shardings = parallel.state_shardings(shapes, mesh)
    abstract = jax.tree.map(
        lambda a, sharding: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
        shapes,
        shardings,
    )
    return jax.jit(fresh, out_shardings=shardings), abstract


def _replicated_on(state, mesh):
    """The state's replicated leaves moved to `mesh` (the same devices), the model-sharded
    ones (the projector's) left out as None: what the kNN monitor may read."""
    if jax.tree.leaves(state)[0].sharding.mesh == mesh:
        return state
    sharding = distributed.replicated(mesh)
    return jax.tree.map(
        lambda x: jax.device_put(x, sharding) if x.sharding.is_fully_replicated else None, state
    )


class PreemptionWatch:
    """Turns SIGTERM into "checkpoint at a step every process agrees on, then exit 0".

    The job creates it first, so SIGTERM during start-up (data, restore, compile) is caught
    too. One process: a Python handler sets a flag, and a signal before the first step ends
    the run at once with nothing to save. Several processes: jax.distributed's preemption
    service (installed by jax.distributed.initialize) takes the signal and picks the sync
    step as 1 + the largest step any process has reported, counting from 0 in every
    process; the loop therefore reports the steps done *in this run*, so a notice during
    the start-up of a resumed run stops it after its first step instead of never.
    """

    def __init__(self):
        self._event = threading.Event()
        self.multi_process = jax.process_count() > 1
        self._previous = None
        if not self.multi_process:
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())

    def before_first_step(self) -> bool:
        return not self.multi_process and self._event.is_set()

    def reached(self, steps_this_run: int) -> bool:
        if self.multi_process:
            return multihost_utils.reached_preemption_sync_point(steps_this_run)
        return self._event.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def schedule_summary(config, steps_per_epoch: int) -> dict:
    """Epochs -> steps, in one place. Steps count from 1: step k is the k-th update, as in
    the progress lines, the metrics, the checkpoints' names and every message."""
    total = config.train.epochs * steps_per_epoch
    stop = min(total, config.train.stop_after_steps or total)
    return dict(
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=int(config.optim.warmup_epochs * steps_per_epoch),
        stop_step=stop,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pretrain, checkpointing and resuming from workdir; returns the final metrics.

    Before anything is opened or compiled: the config is validated and the workdir locked
    (one run per workdir); SIGTERM is handled from the first line on.
    """
    watch = PreemptionWatch()
    say = reporting.Progress(0, 0).say
    try:
        defaults.validate_pretrain_config(config)
        config = defaults.resolve_pretrain_config(config)
        workdir = checkpoint.check_workdir(workdir)
        with distributed.hold_workdir(workdir, say=say):
            return _train(config, workdir, watch, say)
    finally:
        watch.close()


def _train(config, workdir: str, watch: PreemptionWatch, say) -> dict:
    mesh = distributed.make_mesh(model=config.mesh.model)
    distributed.check_global_batch(config.train.global_batch, mesh)
    losses.resolve_strategy(
        config.loss.strategy,
        config.train.global_batch,
        parse_projector(config.model.projector)[-1],
        mesh,
    )
    # The kNN monitor runs data-parallel over every device; it reads replicated leaves only.
    knn_mesh = mesh if mesh.devices.ndim == 1 else distributed.make_mesh()
    # Opening the pipeline before any compile makes a missing dataset fail fast.
    batches = data.pretrain_batches(
        config.data, config.augment, global_batch=config.train.global_batch, seed=config.seed
    )
    plan = schedule_summary(config, batches.steps_per_epoch)
    probe = online_probe(config, batches.num_classes, plan)
    model = build_model(config.model)
    tx, schedules = optim.make_optimizer(
        config.optim,
        global_batch=config.train.global_batch,
        warmup_steps=plan["warmup_steps"],
        total_steps=plan["total_steps"],
    )
    image_size = config.augment.view1.image_size
    ckpt = checkpoint.Checkpointer(
        workdir, keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoints
    )
    check = functools.partial(
        checkpoint.check_resumable, config=config, streams=batches.num_streams
    )
    with jax.set_mesh(mesh):
        init, abstract = sharded_init(model, tx, config, image_size, mesh, probe)
        try:
            restored = ckpt.restore_latest(abstract, check, say=say)
        except Exception:
            ckpt.close()
            raise
        # Undecodable images skipped so far, per stream: they shift each stream's position.
        skipped_streams = np.zeros(batches.num_streams, np.int64)
        wandb_run_id = ""  # the W&B run a resumed run continues
        if restored:
            state, meta = restored
            start, wandb_run_id = int(meta["step"]), meta.get("wandb_run_id", "")
            skipped_streams += meta.get("data", {}).get("skipped_per_stream", 0)
            logging.info("resumed from step %d in %s", start, ckpt.directory)
        else:
            state, start = init(), 0
    skipped = int(skipped_streams.sum())

    progress = reporting.Progress(plan["stop_step"], start)
    progress.say(
        f"{jax.process_count()} process(es), {jax.device_count()} devices | global batch "
        f"{config.train.global_batch} | {plan['steps_per_epoch']} steps/epoch, "
        f"{plan['total_steps']} steps in {config.train.epochs} epochs (warm-up "
        f"{plan['warmup_steps']}) | lr {config.optim.lr_weights:g}/{config.optim.lr_biases:g} "
        f"x {config.train.global_batch}/256 | inputs normalised with "
        f"{config.model.normalization} statistics | online linear probe: "
        + (f"{probe.num_classes} classes" if probe else "off")
        + (f" | resuming at step {start}" if start else "")
    )
    if start >= plan["stop_step"]:
        progress.say(f"already trained to step {start}; nothing to do")
        ckpt.close()
        return {"step": start, "skipped_images": skipped}
    if watch.before_first_step():
        progress.say(
            "preemption signal before the first step: nothing new to save "
            + (f"(the checkpoint of step {start} stays)" if start else "(no step was taken)")
            + "; rerun the same command to resume"
        )
        ckpt.close()
        return {"step": start, "preempted": True, "skipped_images": skipped}

    batches = batches.resumed_at(start, skipped_streams)
    device_batches = distributed.prefetch_to_mesh(batches, mesh, config.train.device_prefetch)
    writer = reporting.MetricWriter(
        workdir,
        resume_step=start,
        wandb_project=config.train.wandb_project,
        wandb_run_id=wandb_run_id,
        config=config.to_dict(),
    )
    step_fn = functools.partial(
        step_function(mesh),
        **step_options(config, model, tx, mesh, probe),
        # the config counts steps from 1 (0 = off), train_step the updates done before it
        nan_at=config.train.debug_nan_at_step - 1,
    )
    knn_every = config.knn.every_epochs * plan["steps_per_epoch"]
    pending, last, skipped_since = [], {}, np.zeros_like(skipped_streams)
    t_log, wait_time, step = time.perf_counter(), 0.0, start
    last_saved = start

    def save(at_step, wait=False):
        writer.flush()  # the rows up to at_step are on disk before its checkpoint commits
        meta = checkpoint.run_meta(
            config, at_step, plan, batches.num_streams, skipped_streams, writer.wandb_run_id
        )
        ckpt.save(at_step, state, meta, wait=wait)

    def stop(text):
        progress.say(f"{text} | undecodable images skipped: {skipped} in steps 1-{step}")
        ckpt.close()
        writer.close()

    with jax.set_mesh(mesh):
        while step < plan["stop_step"]:
            t0 = time.perf_counter()
            batch = next(device_batches)
            wait_time += time.perf_counter() - t0
            skipped_since += batches.skipped_per_batch.popleft()
            state, metrics = step_fn(state, batch)
            pending.append(metrics)
            step += 1
            if config.train.debug_step_delay_s:
                time.sleep(config.train.debug_step_delay_s)

            report = step % config.train.log_every_steps == 0 or step == plan["stop_step"]
            ckpt_due = step % config.train.checkpoint_every_steps == 0
            preempted = watch.reached(step - start)
            if report or ckpt_due or preempted:  # every process gets here at the same steps
                _raise_if_non_finite(state, ckpt, writer)
                skipped_streams += distributed.process_sum(skipped_since)
                skipped, skipped_since = int(skipped_streams.sum()), np.zeros_like(skipped_since)
            if report:
                elapsed = time.perf_counter() - t_log
                last = _summarise(pending, step, elapsed, wait_time, schedules, config, plan)
                last["skipped_images"] = skipped
                writer.write(step, last)
                progress.report(step, _progress_text(last))
                pending, t_log, wait_time = [], time.perf_counter(), 0.0
            if knn_every and step % knn_every == 0 and step < plan["stop_step"]:
                _knn_monitor(
                    config, model, _replicated_on(state, knn_mesh), knn_mesh, writer, progress, step
                )
            if ckpt_due or preempted:
                save(step, wait=preempted)
                last_saved = step
            if preempted:
                stop(
                    f"preemption signal: checkpoint of step {step} written to "
                    f"{ckpt.directory}; rerun the same command to resume"
                )
                return {"step": step, "preempted": True, **last, "skipped_images": skipped}

    if last_saved != step:
        save(step)
    result = {"step": step, **last, "skipped_images": skipped}
    if config.knn.at_end:
        monitored = _replicated_on(state, knn_mesh)
        result.update(_knn_monitor(config, model, monitored, knn_mesh, writer, progress, step))
    stop(f"done at step {step}; checkpoints in {ckpt.directory}")
    return result


run = train_and_evaluate  # the job entry point main.py calls


def _raise_if_non_finite(state, ckpt, writer) -> None:
    """Stop the run if a loss was non-finite; the poisoned state never reaches a checkpoint."""
    bad = int(jax.device_get(state.first_bad_step))  # updates done before the bad one
    if bad < 0:
        return
    ckpt.wait()
    good = ckpt.latest_step()
    ckpt.close()
    writer.close()
    kept = (
        f"The last good checkpoint, step {good}, is in {ckpt.directory}"
        if good is not None
        else f"No checkpoint was written before it ({ckpt.directory} holds none)"
    )
    raise FloatingPointError(
        f"the loss became non-finite at step {bad + 1}; stopping. {kept}. Usual causes: a "
        "learning rate too high for the batch size, bf16 overflow (try "
        "--config.model.dtype=float32), or corrupt inputs."
    )


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
    skipped = m.get("skipped_images", 0)
    probe = m.get("online_linear_train_top1")
    return (
        f"ep {m['epoch']:.2f} | loss {m['loss']:.2f} (inv {m['invariance']:.2f}, red "
        f"{m['redundancy']:.1f}) | C_ii {m['c_diag_mean']:.3f}, C_ij rms "
        f"{m['c_offdiag_rms']:.4f} | trust {m['trust_ratio_mean']:.3g} | lr "
        f"{m['lr_weights']:.4g}/{m['lr_biases']:.3g} | {m['images_per_s']:.1f} img/s "
        f"({m['images_per_s_per_device']:.1f}/dev) {m['step_time_s']:.3f} s/step, input "
        f"wait {100 * m['input_wait_fraction']:.0f}%"
    ) + (
        (f" | probe train top-1 {probe:.1f}%" if probe is not None else "")
        + (f" | {skipped} undecodable images skipped" if skipped else "")
    )


def _knn_monitor(config, model, state, mesh, writer, progress, step) -> dict:
    """kNN top-1/top-5, RankMe of the bank features and, with the probe, its accuracy on
    the same query features; written with tag "knn" and printed in one line."""
    variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]}
    encoder = Encoder(model.backbone, normalization.of_config(config))
    bank, queries = knn.splits(config.knn, config.data, mesh)
    probe = state.probe_params
    result = knn.evaluate(encoder, variables, bank, queries, config.knn, mesh, probe=probe)
    named = knn.named(result)
    writer.write(step, named, tag="knn")
    progress.say(
        f"kNN (k={config.knn.k}, backbone features, {config.data.dataset}) at step {step}: "
        f"top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%"
        + (f" | online linear probe top-1 {result['probe_top1']:.2f}%" if probe else "")
        + f" | RankMe {result['rankme']:.1f} of {model.backbone.num_features} features"
    )
    return named
