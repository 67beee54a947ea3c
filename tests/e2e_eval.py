"""Helpers for evaluation-job tests: a tiny checkpoint without training, jobs as processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from e2e import ROOT, cpu_env

from bt_jax.defaults import load_config


def write_init_checkpoint(workdir, step: int = 1, **model) -> str:
    """A pretraining checkpoint of the smoke model at its initialisation (no train step
    compiled: seconds), saved exactly as the pretraining job saves it."""
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
