"""Helpers for end-to-end tests: run `python -m bt_jax.main` as real processes."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "--config=configs/quickstart.py:smoke"


def cpu_env(devices: int) -> dict:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    return env


def main_command(workdir, *overrides) -> list[str]:
    return [sys.executable, "-m", "bt_jax.main", SMOKE, f"--workdir={workdir}", *overrides]


def run_main(workdir, *overrides, devices=8, timeout=600, check=True):
    result = subprocess.run(
        main_command(workdir, *overrides),
        cwd=ROOT,
        env=cpu_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def run_multiprocess(
    workdir, *overrides, processes=2, devices_per_process=4, timeout=600, check=True
):
    cmd = [
        sys.executable,
        "launch/local_multiprocess.py",
        f"--num_processes={processes}",
        f"--devices_per_process={devices_per_process}",
        "--",
        SMOKE,
        f"--workdir={workdir}",
        *overrides,
    ]
    result = subprocess.run(
        cmd,
        cwd=ROOT,
        env=cpu_env(devices_per_process),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def read_metrics(workdir, tag="train") -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r["tag"] == tag]


def final_params(workdir, step=None):
    from bt_jax.checkpoint import restore_model_variables

    variables, meta, got_step = restore_model_variables(str(workdir), step)
    return jax.tree.map(np.asarray, variables), meta, got_step


def max_abs_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
    return max(jax.tree.leaves(diffs))


def truncate_an_array_file(step_dir) -> None:
    """Damage a real orbax checkpoint: cut its largest array data file in half."""
    arrays = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    biggest = max(arrays, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)


def two_view_batches(n: int, size: int, steps: int, seed: int) -> list[dict]:
    """Random uint8 view pairs, view 2 brighter than view 1, so that a model mixing the two
    views' BN statistics would show."""
    rng = np.random.default_rng(seed)
    return [
        {
            "view1": rng.integers(0, 128, (n, size, size, 3), dtype=np.uint8),
            "view2": rng.integers(64, 256, (n, size, size, 3), dtype=np.uint8),
        }
        for _ in range(steps)
    ]
