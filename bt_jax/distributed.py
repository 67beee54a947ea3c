"""Multi-process start-up, the device mesh, and host-local <-> global arrays.

One idiom: a 1-D mesh with axis "data" over every device of every process; parameters are
replicated (P()), batches are sharded along their first axis (P("data")). Each process
feeds its own slice of the global batch; `host_to_global` stitches the slices into one
jax.Array without any host-to-host copy.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import importlib.util
import itertools
import os
from collections.abc import Iterable, Iterator

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

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


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D "data" mesh over the first num_devices devices (all of them by default).

    Explicit axis types (the JAX >= 0.9 default): shardings are part of array types and
    contractions over the batch must name their output sharding.
    """
    devices = jax.devices()
    if num_devices is not None:
        if not 0 < num_devices <= len(devices):
            raise ValueError(f"asked for {num_devices} devices; {len(devices)} are available")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ValueError("a multi-process run must use every device of every process")
        devices = devices[:num_devices]
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(AxisType.Explicit,), devices=devices
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


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
