"""Multi-process start-up, the device mesh, host-local <-> global arrays, and the lock that
lets one run (all its processes) write a workdir.

One idiom: a mesh over every device of every process, 1-D ("data") or, with a model axis of
M > 1, 2-D ("data", "model") of shape (devices / M, M); batches are sharded along their first
axis over every device (P("data"), or P(("data", "model"))), parameters replicated except
the projector's, which the model shards over "model" (bt_jax/models/parallel.py). Each
process feeds its own slice of the global batch; `host_to_global` stitches the slices into
one jax.Array without any host-to-host copy.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import importlib.util
import itertools
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS, MODEL_AXIS = "data", "model"

# Environment variables that mean "this is one process of a multi-process job".
_CLUSTER_ENV = ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
) -> None:
    """Start jax.distributed when the run spans several processes; no-op otherwise.

    Explicit arguments win; then the BT_JAX_COORDINATOR / BT_JAX_NUM_PROCESSES /
    BT_JAX_PROCESS_ID environment variables; then JAX's own detection (Cloud TPU, SLURM,
    Open MPI), triggered by the variables those clusters set. Must run before anything
    touches jax.devices().
    """
    coordinator_address = coordinator_address or os.environ.get("BT_JAX_COORDINATOR")
    if num_processes is None and "BT_JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["BT_JAX_NUM_PROCESSES"])
    if process_id is None and "BT_JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["BT_JAX_PROCESS_ID"])
    explicit = coordinator_address is not None or num_processes is not None
    if explicit:
        if coordinator_address is None or num_processes is None or process_id is None:
            raise ValueError(
                "a multi-process run needs all three of coordinator address, number of "
                "processes and process id (flags --coordinator_address/--num_processes/"
                "--process_id or BT_JAX_COORDINATOR/BT_JAX_NUM_PROCESSES/BT_JAX_PROCESS_ID); "
                f"got {coordinator_address!r}, {num_processes!r}, {process_id!r}"
            )
        if num_processes == 1:
            return
        # CPU devices talk across processes over gloo (no effect on GPU/TPU backends).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
        )
    elif any(v in os.environ for v in _CLUSTER_ENV) or _on_cloud_tpu_vm():
        jax.distributed.initialize()
    if jax.process_count() > 1:
        logging.info(
            "jax.distributed: process %d of %d, %d local / %d global devices",
            jax.process_index(),
            jax.process_count(),
            jax.local_device_count(),
            jax.device_count(),
        )


def _on_cloud_tpu_vm() -> bool:
    """A TPU VM created with gcloud sets no variable; its chips show on the PCI bus.

    jax.distributed.initialize() then reads the slice from the metadata server (and, even
    on one host, starts the preemption service that turns SIGTERM into a sync point).
    """
    if importlib.util.find_spec("libtpu") is None:
        return False
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        with contextlib.suppress(OSError), open(vendor) as f:
            if f.read().strip() == "0x1ae0":  # Google
                return True
    return False


def make_mesh(num_devices: int | None = None, model: int = 1) -> Mesh:
    """The mesh over the first num_devices devices (all of them by default): ("data",), or
    ("data", "model") of shape (num_devices / model, model) when model > 1.

    Explicit axis types (the JAX >= 0.9 default): shardings are part of array types and
    contractions over the batch must name their output sharding. Devices are laid out in
    order, so the model axis spans neighbouring devices (one host's, when model divides the
    devices per process).
    """
    devices = jax.devices()
    if num_devices is not None:
        if not 0 < num_devices <= len(devices):
            raise ValueError(f"asked for {num_devices} devices; {len(devices)} are available")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ValueError("a multi-process run must use every device of every process")
        devices = devices[:num_devices]
    count = len(devices)
    if model < 1 or count % model:
        divisors = ", ".join(str(m) for m in range(1, count + 1) if count % m == 0)
        raise ValueError(
            f"config.mesh.model={model} must divide the {count} devices into a data x model "
            f"mesh; use one of {divisors}"
        )
    if model == 1:
        return jax.make_mesh(
            (count,), (DATA_AXIS,), axis_types=(AxisType.Explicit,), devices=devices
        )
    return jax.make_mesh(
        (count // model, model),
        (DATA_AXIS, MODEL_AXIS),
        axis_types=(AxisType.Explicit,) * 2,
        devices=devices,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def has_model_axis(mesh) -> bool:
    return MODEL_AXIS in mesh.axis_names


def batch_spec(mesh) -> P:
    """A batch's rows over every device: P("data"), or P(("data", "model"))."""
    return P((DATA_AXIS, MODEL_AXIS)) if has_model_axis(mesh) else P(DATA_AXIS)


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Rows over every device of the mesh."""
    return NamedSharding(mesh, batch_spec(mesh))


def check_global_batch(global_batch: int, mesh: Mesh) -> int:
    """The per-process batch, after checking global_batch splits over devices and processes."""
    devices = mesh.devices.size
    if global_batch % devices:
        lower = global_batch - global_batch % devices
        raise ValueError(
            f"the global batch size {global_batch} is not divisible by the {devices} devices; "
            f"use a multiple of {devices}, e.g. {lower or devices} or {lower + devices}"
        )
    return global_batch // jax.process_count()


def host_to_global(batch, mesh: Mesh):
    """Per-process numpy batch (leading axis = this process's rows) -> global jax.Arrays."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


def global_to_host(tree):
    """Fully replicated or process-addressable global arrays -> numpy on every process."""

    def fetch(x):
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(fetch, tree)


def prefetch_to_mesh(batches: Iterable, mesh: Mesh, size: int = 2) -> Iterator:
    """Yields global arrays, keeping `size` batches already transferred to the devices."""
    queue = collections.deque()
    iterator = iter(batches)

    def enqueue(n):
        for batch in itertools.islice(iterator, n):
            queue.append(host_to_global(batch, mesh))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)


def is_process_0() -> bool:
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (a collective: all must call it)."""
    if jax.process_count() == 1:
        return flag
    flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.max(flags))


def process_sum(values: np.ndarray) -> np.ndarray:
    """The elementwise sum over processes of host-side counts below 2^31 (a collective: all
    must call it; jax without x64 moves int32)."""
    values = np.asarray(values, np.int64)
    if jax.process_count() == 1:
        return values
    gathered = multihost_utils.process_allgather(values.astype(np.int32))
    return np.asarray(gathered, np.int64).sum(0)


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def broadcast_text(text: str, size: int = 2048) -> str:
    """Process 0's `text` (UTF-8, cut to `size` bytes) on every process."""
    if jax.process_count() == 1:
        return text
    data = np.zeros(size, np.uint8)
    encoded = text.encode()[:size]
    data[: len(encoded)] = np.frombuffer(encoded, np.uint8)
    data = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return bytes(data).rstrip(b"\0").decode(errors="replace")


# ------------------------------------------------------------------- one run per workdir
#
# A pretraining run holds <workdir>/run.lock, JSON {host, pid, started, heartbeat, command,
# token}, from start-up to exit, so a second run on the workdir stops at once naming it.
# - Created atomically: written whole to a private file, then hard-linked to its name, which
#   fails if the name exists (atomic on local file systems and NFS, unlike O_EXCL there).
# - Released at exit: a normal end, an error, SIGTERM (the job returns), Ctrl-C.
# - A heartbeat thread refreshes it every HEARTBEAT_S; it is stale once its heartbeat is
#   STALE_AFTER_S old, or when it names this host and a pid that is gone (SIGKILL). A stale
#   lock is taken over and reported, so a requeued job resumes.
# - Multi-process runs share one: process 0 takes it, every process learns the outcome.
# - gs:// (no hard links, no create-if-absent through epath/tf.io.gfile): written only when
#   absent, then read back GCS_SETTLE_S later; of two racing runs the later writer wins and
#   the other stops. Two runs started within that second can both pass.
LOCK_NAME = "run.lock"
HEARTBEAT_S, STALE_AFTER_S, GCS_SETTLE_S = 30.0, 120.0, 1.0


class WorkdirBusy(ValueError):
    """Another live run holds the workdir."""


class WorkdirLock:
    def __init__(self, workdir: str, *, heartbeat_s=HEARTBEAT_S, stale_after_s=STALE_AFTER_S):
        self.path = os.path.join(workdir, LOCK_NAME)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._record = dict(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            heartbeat=time.time(),
            command=" ".join(sys.argv),
            token=uuid.uuid4().hex,
        )
        self._stop, self._thread = threading.Event(), None

    def acquire(self, say=print) -> None:
        """Take the lock, or raise WorkdirBusy naming the run that holds it."""
        for _ in range(3):  # a stale lock taken away can be won by a third run
            if self._create():
                self._thread = threading.Thread(target=self._beat, daemon=True)
                self._thread.start()
                return
            holder = _read_json(self.path)
            stale = self._why_stale(holder)
            if stale is None:
                age = time.time() - float(holder.get("heartbeat", 0)) if holder else float("nan")
                raise WorkdirBusy(
                    f"the workdir is in use by another run: {_describe(holder)} holds "
                    f"{self.path} (heartbeat {age:.0f} s ago). Use another --workdir, or wait "
                    f"for that run to end; if it is dead, its lock goes stale "
                    f"{self.stale_after_s:.0f} s after its last heartbeat (or delete {self.path})"
                )
            if self._take_away(holder):
                say(f"took over the stale lock {self.path} of {_describe(holder)}: {stale}")
        raise WorkdirBusy(f"could not take {self.path}: other runs keep taking it; retry")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._ours():
            with contextlib.suppress(FileNotFoundError):
                epath.Path(self.path).unlink()

    def _ours(self) -> bool:
        holder = _read_json(self.path)
        return bool(holder) and holder.get("token") == self._record["token"]

    def _why_stale(self, holder) -> str | None:
        if holder is None:  # unreadable: judge by the file's age
            age = time.time() - _mtime(self.path)
            return f"unreadable and {age:.0f} s old" if age > self.stale_after_s else None
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s"
        if holder.get("host") == self._record["host"] and not _pid_alive(holder.get("pid")):
            return f"pid {holder.get('pid')} is no longer running on this host"
        return None

    def _create(self) -> bool:
        text = json.dumps(self._record)
        if "://" in self.path:
            if epath.Path(self.path).exists():
                return False
            epath.Path(self.path).write_text(text)
            time.sleep(GCS_SETTLE_S)  # the later of two racing writers wins
            return self._ours()
        tmp = f"{self.path}.{self._record['token']}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _take_away(self, holder) -> bool:
        """Remove the stale lock `holder`; False if it changed meanwhile (another run's)."""
        if "://" in self.path:
            if _read_json(self.path) != holder:
                return False
            with contextlib.suppress(FileNotFoundError):
                epath.Path(self.path).unlink()
            return True
        aside = f"{self.path}.{self._record['token']}.stale"
        try:
            os.rename(self.path, aside)  # atomic: of two runs taking it away, one gets it
        except FileNotFoundError:
            return False
        if _read_json(aside) != holder:  # a fresh lock after all: put it back
            os.rename(aside, self.path)
            return False
        os.unlink(aside)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._ours():
                print(f"warning: lost the workdir lock {self.path}", file=sys.stderr)
                return
            self._record["heartbeat"] = time.time()
            text = json.dumps(self._record)
            if "://" in self.path:
                epath.Path(self.path).write_text(text)
                continue
            with open(f"{self.path}.{os.getpid()}.tmp", "w") as f:
                f.write(text)
            os.replace(f"{self.path}.{os.getpid()}.tmp", self.path)


@contextlib.contextmanager
def hold_workdir(workdir: str, say=print):
    """The workdir's lock for the duration of a run; process 0 holds it for all processes."""
    lock = WorkdirLock(workdir) if is_process_0() else None
    error = ""
    if lock is not None:
        try:
            lock.acquire(say)
        except WorkdirBusy as err:
            error = str(err)
    error = broadcast_text(error)
    if error:
        raise WorkdirBusy(error if lock is not None else f"(from process 0) {error}")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _describe(holder) -> str:
    if not holder:
        return "an unknown run (its lock does not read)"
    return (
        f"the run started {holder.get('started')} on host {holder.get('host')}, "
        f"pid {holder.get('pid')} ({holder.get('command')})"
    )


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # someone else's process, or no pid to judge by: assume it runs
    return True


def _read_json(path: str):
    try:
        return json.loads(epath.Path(path).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _mtime(path: str) -> float:
    try:
        return epath.Path(path).stat().mtime
    except FileNotFoundError:
        return time.time()
