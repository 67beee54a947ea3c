"""Orbax checkpoints of a run: the train state plus JSON metadata (config, data position).

Layout: <workdir>/checkpoints/<step>/{state, meta}; <step> counts completed steps. Saves are
atomic (orbax writes to a temporary directory and renames it on commit), so a run killed at
any moment leaves only complete checkpoints; incomplete temporaries are removed on the next
start. What a file system can still do to them (a truncated array file, a lost _METADATA,
manifest or meta item, a step folder that holds no items) is handled on restore: a
checkpoint that does not read is moved, whole, to <workdir>/checkpoints_unreadable/
<step>-<time> and the previous one is tried (`Checkpointer.restore_latest`).

Async saves and donated buffers: orbax copies every array to host memory before save()
returns and only writes in the background, so the jitted step may donate (and overwrite)
the state's device buffers right after save() returns.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from bt_jax import distributed

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints_unreadable"

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
    """Keeps the last `keep` checkpoints of a run; every process must call its methods."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.workdir = workdir
        self.directory = os.path.join(workdir, CHECKPOINT_DIR)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
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

    def restore_latest(self, abstract_state, check_meta: Callable[[dict], None], say=print):
        """(state, meta) of the newest checkpoint that reads, or None when there is none.

        check_meta(meta) raises a ValueError when the checkpoint belongs to another run (a
        different model or data stream): that stops the run, nothing is moved. A checkpoint
        whose files do not read is moved to <workdir>/checkpoints_unreadable/<step>-<time>
        (by process 0, once; every process agrees on the outcome), `say` reports it in one
        line, and the previous one is tried. When none is left, a FileNotFoundError names
        the folder and the way out; a workdir whose checkpoints were all moved aside refuses
        to start afresh for the same reason.
        """
        self._refuse_if_all_unreadable()
        for step in reversed(self._manager.all_steps()):
            try:
                meta = self.restore_meta(step)
            except Exception as err:  # orbax/tensorstore raise anything: KeyError, OSError...
                meta, problem = None, f"its meta item does not read ({_first_line(err)})"
            else:
                check_meta(meta)
                problem = self._state_problem(step, abstract_state)
            if not distributed.any_process(problem is not None):
                try:
                    state, _ = self.restore(step, abstract_state)
                except Exception as err:
                    problem = f"its arrays do not read ({_first_line(err)})"
                if not distributed.any_process(problem is not None):
                    return state, meta
            problem = problem or "another process could not read it"
            moved = self._move_aside(step)
            say(f"checkpoint {step} cannot be read: {problem}; moved it to {moved}")
        self._refuse_if_all_unreadable()
        return None

    def _state_problem(self, step: int, abstract_state) -> str | None:
        """Why the saved state's metadata does not read; a ValueError if it reads but does
        not match this program's train state (other code wrote it: moving it would not help)."""
        try:
            saved = self._manager.item_metadata(step)["state"]
            saved = _shapes(saved.tree if hasattr(saved, "tree") else saved)
        except Exception as err:
            return f"its state metadata does not read ({_first_line(err)})"
        if not saved:
            return "its state holds no metadata (state/_METADATA is missing or empty)"
        wanted = _shapes(abstract_state)
        if saved != wanted:
            differ = sorted(
                k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k)
            )
            first = differ[0]
            raise ValueError(
                f"checkpoint {step} in {self.directory} holds a train state that does not match "
                f"this program's ({len(differ)} arrays differ; {first}: saved "
                f"{saved.get(first, 'none')}, expected {wanted.get(first, 'none')}); resume it "
                "with the code that wrote it, or use a fresh --workdir"
            )
        return None

    def _move_aside(self, step: int) -> str:
        aside = os.path.join(
            self.workdir, UNREADABLE_DIR, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        if distributed.is_process_0():
            _move_tree(os.path.join(self.directory, str(step)), aside)
        distributed.barrier(f"bt_jax:moved_aside_{step}")
        self._manager.reload()
        return aside

    def _refuse_if_all_unreadable(self) -> None:
        aside = epath.Path(self.workdir) / UNREADABLE_DIR
        if self._manager.all_steps() or not aside.exists() or not list(aside.iterdir()):
            return
        raise FileNotFoundError(
            f"no readable checkpoint in {self.directory}: the unreadable ones were moved to "
            f"{aside}. Restore a good copy into {self.directory} (or move one back) to resume, "
            "or pass a fresh --workdir to start a new run"
        )

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _first_line(err: Exception) -> str:
    text = (str(err).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _shapes(tree) -> dict:
    """{"params/backbone/conv1/kernel": ((3, 3, 3, 64), "float32"), ...} of a pytree of
    arrays, ShapeDtypeStructs or orbax ArrayMetadata."""

    def name(key) -> str:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(name(k) for k in path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
        for path, leaf in leaves
    }


def _move_tree(source: str, target: str) -> None:
    """Move a folder: a rename on a file system; on an object store (gs://), which has no
    renames, a copy of every object followed by the deletion of the originals."""
    if "://" not in source:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(source, target)
        return
    source_path, target_path = epath.Path(source), epath.Path(target)
    for item in source_path.rglob("*"):
        if item.is_file():
            destination = target_path / item.relative_to(source_path)
            destination.parent.mkdir(parents=True, exist_ok=True)
            item.copy(destination)
    source_path.rmtree()


def run_meta(
    config, step: int, plan: dict, streams: int, skipped_per_stream, wandb_run_id: str = ""
) -> dict:
    """What a pretraining checkpoint records besides the state: its step, its position in
    the data (with the undecodable images each stream skipped in steps 1..step, which
    shift it), the W&B run it continues and the whole config."""
    return {
        "step": step,
        # The W&B run a resumed run continues ("" = none): process 0's, whose meta orbax writes.
        "wandb_run_id": wandb_run_id,
        "epoch": step / plan["steps_per_epoch"],
        # The data position: the pipeline is a function of (seed, streams, batch, step).
        "data": {
            "next_step": step,
            "seed": config.seed,
            "global_batch": config.train.global_batch,
            "num_streams": config.data.num_streams,
            "streams": streams,  # the count actually read (num_streams 0 = the process count)
            "dataset": config.data.dataset,
            "skipped_per_stream": [int(n) for n in skipped_per_stream],
        },
        "skipped_images": int(sum(skipped_per_stream)),  # in steps 1..step, all processes
        "config": config.to_dict(),
    }


# The fields that shape the parameters or the data stream. model.dtype is not one: it is
# the compute dtype, parameters and optimizer state are float32 whatever it is (resuming a
# bf16 run in float32 after an overflow is legitimate). Optimizer and schedule settings
# may change on resume (a longer run, another learning rate): that is a new recipe, not a
# broken checkpoint.
_RESUME_FIELDS = (
    "model.arch",
    "model.width",
    "model.cifar_stem",
    "model.stage_sizes",
    "model.projector",
    "seed",
    "data.dataset",
    "data.train_split",
    "data.num_streams",
    "data.cache",
    "train.global_batch",
)
_STREAMED_FIELDS = ("data.shuffle_buffer", "data.file_cycle_length")  # order without cache


def check_resumable(meta: dict, config, *, streams: int) -> None:
    """A ValueError, one line per field, if the checkpoint comes from another model or data
    stream: the field, the value it was made with and the flag that resumes it."""
    fields = _RESUME_FIELDS + (() if config.data.cache else _STREAMED_FIELDS)
    problems = []
    for field in fields:
        old, new = _lookup(meta["config"], field), _lookup(config.to_dict(), field)
        if old is not _MISSING and _plain(old) != _plain(new):
            problems.append(
                f"config.{field}={_flag_value(new)} but the workdir's checkpoints were made "
                f"with {_flag_value(old)}: resume with --config.{field}={_flag_value(old)}, or "
                "start a new run in a fresh --workdir"
            )
    saved_streams = meta.get("data", {}).get("streams")
    if not problems and saved_streams is not None and saved_streams != streams:
        problems.append(
            f"config.data.num_streams={config.data.num_streams} reads {streams} stream(s) "
            f"({jax.process_count()} process(es)) but the workdir's checkpoints were made "
            f"reading {saved_streams}: resume with --config.data.num_streams={saved_streams}, "
            "or start a new run in a fresh --workdir"
        )
    if problems:
        raise ValueError("\n".join(problems))


_MISSING = object()


def _lookup(tree: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return _MISSING
        tree = tree[key]
    return tree


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _flag_value(value) -> str:
    """How the value is written on the command line."""
    if isinstance(value, (list, tuple)):
        return repr(str(tuple(value)))  # --config.model.stage_sizes='(1, 1)'
    return str(value)


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
