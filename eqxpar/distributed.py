"""Multi-process runs on JAX's distributed runtime: start-up, device layout, data.

One script, N processes (one per host, or per GPU): each calls `initialize()` before
anything touches a JAX array, builds the same mesh with `eqxpar.make_mesh` (which then
spans every process's devices), loads only the rows of each batch its own devices hold
(`local_slices`, `global_array`), and prints only where `is_main_process()`. The engine
is JAX's own multi-controller runtime (`jax.distributed`: its coordination service,
gloo collectives on CPU, NCCL on GPU); nothing here replaces it.

    import eqxpar as ep

    ep.distributed.initialize()          # a no-op on one process
    mesh = ep.make_mesh(data=2, tensor=4)  # data across processes, tensor inside one
    if ep.distributed.is_main_process():
        print(ep.distributed.layout(mesh))

Importing this module does not start a JAX backend.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "global_array",
    "hosts",
    "initialize",
    "is_main_process",
    "layout",
    "local_slices",
]

_log = logging.getLogger("eqxpar")

# What `eqxpar.launch` (and a cluster job script) sets, besides JAX's own
# `JAX_COORDINATOR_ADDRESS`: JAX reads the coordinator from the environment but not the
# process count and id.
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
HOST_ENV = "EQXPAR_HOST"


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    heartbeat_timeout_s: int = 30,
    shutdown_timeout_s: int = 60,
    initialization_timeout_s: int = 300,
) -> bool:
    """Starts JAX's distributed runtime if this process is one of several; else nothing.

    Call it first, before anything starts a JAX backend (the first array,
    `jax.devices()`, ...), in every process, with the same arguments.

    Each argument left `None` is read as `jax.distributed.initialize` reads it: the
    coordinator from `JAX_COORDINATOR_ADDRESS`, and all of them from the cluster's own
    environment (SLURM, Open MPI, Cloud TPU and GKE TPU pods, Kubernetes). The process
    count and id are also read from `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, which
    `python -m eqxpar.launch` sets (and a job script may set, e.g. a Kubernetes JobSet
    from `JOB_COMPLETION_INDEX`).

    When the run turns out to have one process (nothing set, no cluster detected, or a
    count of 1) it does nothing, so the same script runs unchanged on one machine.

    On CPU, collectives between processes use gloo (`jax_cpu_collectives_implementation`).

    **Arguments:**

    - `coordinator_address`: `host:port` of process 0's coordination service.
    - `num_processes`, `process_id`: the process count, and this process's id in
      `0 .. num_processes - 1`.
    - `local_device_ids`: restrict this process to these local devices (e.g. one GPU
      per process); by default what JAX or the cluster chooses.
    - `heartbeat_timeout_s`: a process that has sent no heartbeat for this long is
      declared dead, and every other process then exits with an error naming it,
      instead of hanging in a collective. JAX's default is 100 s; 30 s here.
    - `shutdown_timeout_s`: how long a finished process waits at exit for the others.
    - `initialization_timeout_s`: how long to wait for every process to connect.

    **Returns:**

    `True` if it started the distributed runtime (or it was already running), `False`
    on a single process.

    **Raises:**

    `RuntimeError` if a JAX backend has already started (the runtime must come first);
    `ValueError` for a count or id that does not fit, or a multi-process run without a
    coordinator address.
    """
    if jax.distributed.is_initialized():
        return True
    num_processes = _env_int(num_processes, NUM_PROCESSES_ENV)
    process_id = _env_int(process_id, PROCESS_ID_ENV)
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    count = num_processes if num_processes is not None else _detected_process_count()
    if count is None or count == 1:
        if process_id not in (None, 0):
            raise ValueError(
                f"eqxpar.distributed.initialize: process_id={process_id} in a run of one "
                f"process; set num_processes (or {NUM_PROCESSES_ENV}) to the process count."
            )
        return False
    if count < 1:
        raise ValueError(f"eqxpar.distributed.initialize: num_processes={count}; it must be >= 1.")
    if process_id is not None and not 0 <= process_id < count:
        raise ValueError(
            f"eqxpar.distributed.initialize: process_id={process_id} with "
            f"num_processes={count}; ids run from 0 to {count - 1}."
        )
    if num_processes is not None and (coordinator_address is None or process_id is None):
        missing = [
            name
            for name, value in (
                ("coordinator_address (or JAX_COORDINATOR_ADDRESS)", coordinator_address),
                (f"process_id (or {PROCESS_ID_ENV})", process_id),
            )
            if value is None
        ]
        if _detected_process_count() is None:
            raise ValueError(
                f"eqxpar.distributed.initialize: num_processes={count} but no "
                f"{' and no '.join(missing)}, and no cluster environment (SLURM, Open MPI, "
                f"TPU, Kubernetes) to read them from: set them too (every process the same "
                f"coordinator address, each its own id)."
            )
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "eqxpar.distributed.initialize: a JAX backend has already started, and the "
            "distributed runtime must start before it. Call initialize() first thing, "
            "before creating any array or calling jax.devices()."
        )
    if getattr(jax.config, "jax_cpu_collectives_implementation", None) in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
        shutdown_timeout_seconds=shutdown_timeout_s,
    )
    return True


def _env_int(value: int | None, name: str) -> int | None:
    if value is not None:
        return value
    text = os.environ.get(name)
    if text is None or not text.strip():
        return None
    if not text.strip().isdigit():
        raise ValueError(f"the environment variable {name}={text!r} is not a non-negative int.")
    return int(text)


def _detected_process_count() -> int | None:
    """The process count of the cluster environment JAX would detect, or `None`."""
    from jax._src import clusters

    for env in clusters.ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if env.is_env_present():
                return int(env.get_process_count())
        except Exception:  # an environment that is present but cannot say: let JAX try
            return None
    return None


_HOSTS: dict[int, str] = {}


def hosts() -> dict[int, str]:
    """Each process's host name, by process index (exchanged once through JAX's
    coordination service); `{0: this host}` on a single process.

    A process's name is the environment variable `EQXPAR_HOST` if set, else its
    machine's host name. `python -m eqxpar.launch` gives each process a host of its
    own (`EQXPAR_HOST=<machine>/<id>`), so one machine plays a cluster of hosts.
    """
    if _HOSTS:
        return dict(_HOSTS)
    me = jax.process_index()
    name = os.environ.get(HOST_ENV) or socket.gethostname()
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None or jax.process_count() == 1:
        _HOSTS.update({me: name})
        return dict(_HOSTS)
    client.key_value_set(f"eqxpar/hosts/{me}", name)
    for p in range(jax.process_count()):
        _HOSTS[p] = client.blocking_key_value_get(f"eqxpar/hosts/{p}", 300_000)
    return dict(_HOSTS)


def is_main_process() -> bool:
    """Whether this is process 0, the one that prints, writes metrics and plots.

    Always `True` on a single process. Starts the JAX backend (call `initialize` first).
    """
    return jax.process_index() == 0


def layout(mesh: Mesh) -> str:
    """Says how `mesh`'s devices are spread over processes: which axes span processes
    (and which block of each a process holds) and which stay inside every process.

    **Arguments:**

    - `mesh`: any `jax.sharding.Mesh`, e.g. from `eqxpar.make_mesh`.

    **Returns:**

    One line, e.g. `2 processes x 4 devices: data spans processes (process 0: data 0,
    process 1: data 1); tensor=4 inside each process`.
    """
    devices = np.asarray(mesh.devices)
    procs = np.vectorize(lambda d: d.process_index)(devices)
    count = len(np.unique(procs))
    per = devices.size // count
    shown = [(i, name) for i, name in enumerate(mesh.axis_names) if devices.shape[i] > 1]
    spans = [(i, name) for i, name in shown if not (np.diff(procs, axis=i) == 0).all()]
    inside = [f"{name}={devices.shape[i]}" for i, name in shown if (i, name) not in spans]
    head = f"{count} process{'es' if count > 1 else ''} x {per} device{'s' if per > 1 else ''}"
    if count == 1:
        return f"{head}: every axis inside the process ({', '.join(inside) or 'all axes 1'})"
    held = []
    for p in sorted(np.unique(procs).tolist()):
        where = np.argwhere(procs == p)
        parts = []
        for i, name in spans:
            lo, hi = int(where[:, i].min()), int(where[:, i].max())
            parts.append(f"{name} {lo}" if lo == hi else f"{name} {lo}-{hi}")
        held.append(f"process {p}: {', '.join(parts)}")
    across = " and ".join(name for _, name in spans)
    verb = "span" if len(spans) > 1 else "spans"
    tail = f"; {', '.join(inside)} inside each process" if inside else ""
    return f"{head}: {across} {verb} processes ({'; '.join(held)}){tail}"


def local_slices(mesh: Mesh, spec: PartitionSpec, global_shape: Sequence[int]) -> tuple[slice, ...]:
    """The block of a global array that this process's devices hold.

    A global array of `global_shape` split as `spec` over `mesh`: each process loads
    only `data[local_slices(...)]` (e.g. its rows of the batch) and `global_array`
    assembles the global array from those blocks. On one process it is the whole array.

    **Arguments:**

    - `mesh`: the mesh.
    - `spec`: how the array is split over the mesh's axes.
    - `global_shape`: the global array's shape.

    **Returns:**

    One `slice` per dim, with explicit `start` and `stop`.

    **Raises:**

    `ValueError` if this process's devices do not hold one contiguous block of the
    array (the mesh puts a split axis's devices of one process apart).
    """
    shape = tuple(int(s) for s in global_shape)
    sharding = NamedSharding(mesh, spec)
    pieces = {
        tuple(_bounds(s, size) for s, size in zip(index or (), shape, strict=True))
        for index in sharding.addressable_devices_indices_map(shape).values()
    }
    box = [(min(p[d][0] for p in pieces), max(p[d][1] for p in pieces)) for d in range(len(shape))]
    volume = sum(int(np.prod([b - a for a, b in p])) for p in pieces)
    if volume != int(np.prod([b - a for a, b in box])):
        raise ValueError(
            f"local_slices: process {jax.process_index()} holds the pieces "
            f"{sorted(pieces)} of an array of shape {shape} split as {spec} over mesh "
            f"{dict(mesh.shape)}; they are not one contiguous block, so it cannot load "
            f"them as one. Build the mesh with eqxpar.make_mesh (devices ordered by "
            f"process), or split those dims over axes that stay inside a process."
        )
    return tuple(slice(a, b) for a, b in box)


def _bounds(index: slice, size: int) -> tuple[int, int]:
    start, stop, _ = index.indices(size)
    return start, stop


def global_array(
    local: Any, mesh: Mesh, spec: PartitionSpec, global_shape: Sequence[int]
) -> jax.Array:
    """Assembles a global array from each process's own block
    (`jax.make_array_from_process_local_data`); no process holds the whole of it.

    **Arguments:**

    - `local`: this process's block, `global[local_slices(mesh, spec, global_shape)]`
      (a NumPy array; on one process the whole array).
    - `mesh`, `spec`: how the global array is split.
    - `global_shape`: the global array's shape.

    **Returns:**

    A `jax.Array` of `global_shape` with sharding `NamedSharding(mesh, spec)`.

    **Raises:**

    `ValueError` if `local` does not have the shape of this process's block; the
    message gives both shapes and the block's slices.
    """
    shape = tuple(int(s) for s in global_shape)
    block = local_slices(mesh, spec, shape)
    want = tuple(s.stop - s.start for s in block)
    local = np.asarray(local)
    if tuple(local.shape) != want:
        where = ", ".join(f"{s.start}:{s.stop}" for s in block)
        raise ValueError(
            f"global_array: process {jax.process_index()} passed a block of shape "
            f"{tuple(local.shape)}, but it holds [{where}] of the global {shape} array "
            f"split as {spec} (shape {want}). Pass global[local_slices(mesh, spec, "
            f"global_shape)]."
        )
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local, shape)
