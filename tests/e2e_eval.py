"""Helpers for evaluation-job tests: a tiny checkpoint without training, jobs as processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from e2e import ROOT, cpu_env

from bt_jax.defaults import load_config


def _random_bn(state, seed: int = 0):
    """The backbone's BN scales, biases and running statistics drawn at random (at init
    they are 1 / 0 / 0 / 1, and the last scale of every block 0: a load that dropped or
    swapped any of them, or a residual branch, would go unseen)."""
    import jax

    rng = np.random.default_rng(seed)
    draw = {
        "scale": lambda s: rng.uniform(0.5, 1.5, s),
        "bias": lambda s: rng.normal(0.0, 0.2, s),
        "mean": lambda s: rng.normal(0.0, 0.2, s),
        "var": lambda s: rng.uniform(0.5, 2.0, s),
    }

    def redraw(tree):
        def leaf(path, x):
            name = path[-1].key
            if name not in draw:
                return x
            value = draw[name](x.shape).astype(np.float32)
            return jax.device_put(value, x.sharding)

        return {**tree, "backbone": jax.tree_util.tree_map_with_path(leaf, tree["backbone"])}

    return state.replace(params=redraw(state.params), batch_stats=redraw(state.batch_stats))


def write_init_checkpoint(workdir, step: int = 1, random_bn: bool = False, **model) -> str:
    """A pretraining checkpoint of the smoke model at its initialisation (no train step
    compiled: seconds), saved exactly as the pretraining job saves it; random_bn: with the
    backbone's BN parameters and statistics drawn at random (_random_bn)."""
    import jax

    from bt_jax import checkpoint, distributed, models, optim, pretrain

    config = load_config("configs/quickstart.py:smoke")
    config.model.update(model)
    mesh = distributed.make_mesh()
    tx, _ = optim.make_optimizer(
        config.optim, global_batch=config.train.global_batch, warmup_steps=1, total_steps=10
    )
    init = jax.jit(
        lambda: pretrain.init_state(models.build_model(config.model), tx, config, 16),
        out_shardings=distributed.replicated(mesh),
    )
    with jax.set_mesh(mesh):
        state = init()
    if random_bn:
        state = _random_bn(state)
    ckpt = checkpoint.Checkpointer(str(workdir), async_save=False)
    ckpt.save(step, state, {"step": step, "config": config.to_dict()}, wait=True)
    ckpt.close()
    return str(workdir)


def job_command(config_spec, workdir, *overrides) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bt_jax.main",
        f"--config=configs/{config_spec}",
        f"--workdir={workdir}",
        *overrides,
    ]


def run_job(config_spec, workdir, *overrides, processes=1, devices=8, timeout=600, check=True):
    """`python -m bt_jax.main` (processes=1) or launch/local_multiprocess.py."""
    if processes == 1:
        cmd = job_command(config_spec, workdir, *overrides)
    else:
        cmd = [
            sys.executable,
            "launch/local_multiprocess.py",
            f"--num_processes={processes}",
            f"--devices_per_process={devices}",
            "--",
            *job_command(config_spec, workdir, *overrides)[3:],
        ]
    result = subprocess.run(
        cmd, cwd=ROOT, env=cpu_env(devices), capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def read_results(workdir) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)
