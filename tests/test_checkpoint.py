"""Restore falls back over real orbax checkpoints that a file system damaged.

Each case damages the latest of two real checkpoints the way issue 11 found it done (a
truncated array file, a lost state/_METADATA, manifest or meta item, a step folder without
the tmp suffix that holds no items): the restore says which step and why in one line, moves
that folder whole to <workdir>/checkpoints_unreadable/<step>-<time> (every file still
there) and returns the previous checkpoint. A readable checkpoint of another train state
is refused without moving anything; when nothing readable is left the error names the
folder, and a restart does not silently start from scratch. (The job-level test, resuming
bit for bit from the previous checkpoint, is in test_pretrain.py; two processes agreeing on
one move, too.)
"""

import glob
import os
import shutil
import types

import jax
import numpy as np
import pytest
from e2e import truncate_an_array_file

from bt_jax import checkpoint, distributed, models, optim, pretrain, reporting
from bt_jax.defaults import load_config


def _abstract_and_init(projector="64-64"):
    config = load_config("configs/quickstart.py:smoke")
    config.model.projector = projector
    tx, _ = optim.make_optimizer(config.optim, global_batch=32, warmup_steps=1, total_steps=10)
    mesh = distributed.make_mesh()
    replicated = distributed.replicated(mesh)
    init = lambda: pretrain.init_state(models.build_model(config.model), tx, config, 16)  # noqa: E731
    with jax.set_mesh(mesh):
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
            jax.eval_shape(init),
        )
        state = jax.jit(init, out_shardings=replicated)()
    return config, mesh, abstract, state


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with real checkpoints of steps 3 and 6 (their `step` leaves say which)."""
    workdir = tmp_path_factory.mktemp("saved")
    config, mesh, abstract, state = _abstract_and_init()
    ckpt = checkpoint.Checkpointer(str(workdir), async_save=False)
    plan = {"steps_per_epoch": 156}
    with jax.set_mesh(mesh):
        for step in (3, 6):
            meta = checkpoint.run_meta(config, step, plan, streams=1, skipped_per_stream=[step])
            ckpt.save(step, state.replace(step=state.step + step), meta, wait=True)
    ckpt.close()
    return workdir, mesh, abstract


def _files(folder) -> dict:
    return {
        os.path.relpath(p, folder): os.path.getsize(p)
        for p in glob.glob(os.path.join(folder, "**"), recursive=True)
        if os.path.isfile(p)
    }


DAMAGE = {
    "truncated array file": truncate_an_array_file,
    "state/_METADATA deleted": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "manifest deleted": lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
    "meta item deleted": lambda d: shutil.rmtree(os.path.join(d, "meta")),
}


def _restore(workdir, mesh, abstract):
    messages = []
    ckpt = checkpoint.Checkpointer(str(workdir), async_save=False)
    try:
        with jax.set_mesh(mesh):
            restored = ckpt.restore_latest(abstract, lambda meta: None, say=messages.append)
    finally:
        ckpt.close()
    return restored, messages


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_previous_restored(
    saved, tmp_path, damage
):
    source, mesh, abstract = saved
    workdir = tmp_path / "w"
    shutil.copytree(source, workdir)
    step_dir = workdir / "checkpoints" / "6"
    DAMAGE[damage](str(step_dir))
    files_after_damage = _files(step_dir)

    (state, meta), messages = _restore(workdir, mesh, abstract)

    assert int(state.step) == 3 and meta["step"] == 3 and meta["skipped_images"] == 3
    (message,) = messages
    (moved,) = glob.glob(str(workdir / "checkpoints_unreadable" / "6-*"))
    assert message.startswith("checkpoint 6 cannot be read: ")
    assert message.endswith(f"; moved it to {moved}") and "\n" not in message
    assert _files(moved) == files_after_damage  # moved whole: nothing deleted
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]


def test_a_step_folder_that_holds_no_items(saved, tmp_path):
    source, mesh, abstract = saved
    workdir = tmp_path / "w"
    shutil.copytree(source, workdir)
    os.makedirs(workdir / "checkpoints" / "9")  # no tmp suffix: orbax lists it as step 9
    (state, _), messages = _restore(workdir, mesh, abstract)
    assert int(state.step) == 6
    assert messages[0].startswith("checkpoint 9 cannot be read: its meta item does not read")
    assert len(glob.glob(str(workdir / "checkpoints_unreadable" / "9-*"))) == 1


def test_a_readable_checkpoint_of_another_train_state_is_refused_and_kept(saved, tmp_path):
    source, mesh, _ = saved
    workdir = tmp_path / "w"
    shutil.copytree(source, workdir)
    _, _, other, _ = _abstract_and_init(projector="32-32")
    with pytest.raises(ValueError, match="does not match this program's") as raised:
        _restore(workdir, mesh, other)
    assert "\n" not in str(raised.value)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    assert not (workdir / "checkpoints_unreadable").exists()


def test_nothing_readable_left_stops_with_the_folder_and_never_starts_afresh(saved, tmp_path):
    source, mesh, abstract = saved
    workdir = tmp_path / "w"
    shutil.copytree(source, workdir)
    for step in ("3", "6"):
        DAMAGE["state/_METADATA deleted"](str(workdir / "checkpoints" / step))
    aside = str(workdir / "checkpoints_unreadable")
    with pytest.raises(FileNotFoundError, match=f"moved to {aside}"):
        _restore(workdir, mesh, abstract)
    assert len(os.listdir(aside)) == 2
    with pytest.raises(FileNotFoundError, match="no readable checkpoint"):  # the restart
        _restore(workdir, mesh, abstract)


def test_a_fresh_workdir_has_nothing_to_restore(tmp_path):
    _, mesh, abstract, _ = _abstract_and_init()
    assert _restore(tmp_path, mesh, abstract) == (None, [])


def test_a_non_finite_loss_before_any_checkpoint_says_so(tmp_path):
    """The NaN stop used to end "last good checkpoint (step None)"."""
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    state = types.SimpleNamespace(first_bad_step=np.int32(0))  # the first update's loss
    with pytest.raises(FloatingPointError) as raised:
        pretrain._raise_if_non_finite(state, ckpt, reporting.MetricWriter("", enabled=False))
    assert str(raised.value).startswith(
        "the loss became non-finite at step 1; stopping. No checkpoint was written before it"
    )
