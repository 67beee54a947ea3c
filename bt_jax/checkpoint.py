"""Orbax checkpoints of a run: the train state plus JSON metadata (config, data position).

Layout: <workdir>/checkpoints/<step>/{state, meta}. Saves are atomic (orbax writes to a
temporary directory and renames it on commit), so a run killed at any moment leaves only
complete checkpoints; incomplete temporaries are removed on the next start.

Async saves and donated buffers: orbax copies every array to host memory before save()
returns and only writes in the background, so the jitted step may donate (and overwrite)
the state's device buffers right after save() returns.
"""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

CHECKPOINT_DIR = "checkpoints"

# Orbax splits each replicated array into per-replica slices so that hosts write in
# parallel; every slice shape costs a small XLA compile on the first save (~4 s for a
# ResNet's ~150 distinct BN/conv shapes). Only arrays of >= 1 MiB per slice are worth it.
_verbosity = logging.get_verbosity()
logging.set_verbosity(logging.ERROR)  # the override is intended; orbax would warn every run
try:
    ocp.type_handlers.register_type_handler(
        jax.Array,
        ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=1 << 20),
        override=True,
    )
finally:
    logging.set_verbosity(_verbosity)


def check_workdir(workdir: str) -> str:
    """Create workdir if needed and prove it writable, with an error that names the fix."""
    if not workdir:
        raise ValueError("--workdir is required: the folder for checkpoints and metrics")
    if "://" in workdir:  # gs://... : orbax and TF write there; nothing to check locally
        return workdir
    workdir = os.path.abspath(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_"):
            pass
    except OSError as err:
        raise ValueError(
            f"workdir {workdir} is not writable ({err.strerror}); pass a --workdir you can write to"
        ) from None
    return workdir


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run; every process must call save/restore."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(workdir, CHECKPOINT_DIR)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, meta: dict, *, wait: bool = False) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)
        if wait:
            self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state):
        """The state at `step`, laid out as `abstract_state` (shapes, dtypes, shardings)."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["meta"]

    def restore_meta(self, step: int) -> dict:
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def restore_model_variables(workdir: str, step: int | None = None):
    """{"params", "batch_stats"} (numpy, on host) and the meta of a pretraining checkpoint.

    For the evaluation jobs: no optimizer, no abstract state needed.
    """
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory) and "://" not in workdir:
        raise FileNotFoundError(
            f"no checkpoints in {directory}; pass the --config.pretrained_workdir of a "
            "pretraining run (python -m bt_jax.main --config=configs/quickstart.py "
            "--workdir=...)"
        )
    manager = ocp.CheckpointManager(
        directory,
        item_names=("state", "meta"),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory} holds no complete checkpoint")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    # Only the model variables, as numpy on the host, whatever the saved sharding.
    saved = manager.item_metadata(step)["state"].tree
    wanted = {"params": saved["params"], "batch_stats": saved["batch_stats"]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    state = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=wanted, restore_args=restore_args, partial_restore=True
            )
        ),
    )["state"]
    manager.close()
    logging.info("restored model variables of step %d from %s", step, directory)
    return {"params": state["params"], "batch_stats": state["batch_stats"]}, meta, step
