"""Named device meshes and simulated CPU devices."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DATA = "data"
TENSOR = "tensor"
PIPELINE = "pipeline"
CONTEXT = "context"
EXPERT = "expert"

# Outermost (slowest varying) to innermost, as Megatron orders its groups
# ("tp-cp-ep-dp-pp": tensor innermost, so a tensor group is neighbouring devices).
AXIS_ORDER: tuple[str, ...] = (PIPELINE, DATA, EXPERT, CONTEXT, TENSOR)


def simulate_cpu_devices(n: int) -> None:
    """Makes JAX expose `n` CPU devices, so that meshes can be tried on one machine.

    Call it before anything starts a JAX backend (the first array, `jax.devices()`, ...).
    It also sets JAX's platform to CPU.

    **Arguments:**

    - `n`: the number of simulated CPU devices, at least 1.

    **Returns:**

    Nothing. Raises `RuntimeError` if JAX has already started with a different number
    of CPU devices; the message says how to fix it.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"simulate_cpu_devices(n={n!r}): n must be a positive int.")
    if _backend_started():
        have = len(jax.devices("cpu"))
        if have == n:
            return
        raise RuntimeError(
            f"simulate_cpu_devices({n}): JAX has already started with {have} CPU "
            f"device(s), and the device count cannot change after start-up. Call "
            f"`eqxpar.simulate_cpu_devices({n})` before anything touches a JAX array, or "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} in the environment "
            f"before starting Python."
        )
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


def _backend_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def make_mesh(
    data: int = 1,
    tensor: int = 1,
    pipeline: int = 1,
    context: int = 1,
    expert: int = 1,
    *,
    devices: Sequence[Any] | None = None,
    axis_types: Literal["auto", "explicit"] = "auto",
) -> Mesh:
    """Builds a `jax.sharding.Mesh` with the five named axes eqxpar uses.

    Every axis is always present (size 1 when unused), so layers can name `"tensor"`
    on any eqxpar mesh. Axes are laid out as `("pipeline", "data", "expert", "context",
    "tensor")`, outermost first: a tensor-parallel group is neighbouring devices.

    **Arguments:**

    - `data`, `tensor`, `pipeline`, `context`, `expert`: the size of each axis.
    - `devices`: the devices to use, exactly `data * tensor * ... ` of them, laid out
      in the order given; defaults to `jax.devices()`. Pass `jax.devices()[:n]` to use
      fewer.
    - `axis_types`: `"auto"` (default) or `"explicit"` sharding mode for every axis.

    **Returns:**

    A `jax.sharding.Mesh` whose `shape` maps each axis name to its size.

    **Several processes** (after `eqxpar.distributed.initialize`): by default the mesh
    spans every process's devices, ordered by host and then by process, so the
    outermost axes of size > 1 (pipeline, then data, ...) go across hosts and the
    tensor axis stays inside a host, where devices are fastest to reach (inside one
    process too when each process holds a whole host). A `tensor` size that does not
    divide the devices of one host raises (pass `devices=` to lay the mesh out
    yourself). The layout is logged (logger `"eqxpar"`, level INFO); get it as text with
    `eqxpar.distributed.layout(mesh)`.
    """
    sizes = {DATA: data, TENSOR: tensor, PIPELINE: pipeline, CONTEXT: context, EXPERT: expert}
    for name, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"make_mesh({name}={size!r}): every axis size must be an int >= 1.")
    if axis_types not in ("auto", "explicit"):
        raise ValueError(f"make_mesh(axis_types={axis_types!r}): use 'auto' or 'explicit'.")
    shape = tuple(sizes[name] for name in AXIS_ORDER)
    needed = math.prod(shape)
    devs = list(jax.devices() if devices is None else devices)
    spread = devices is None and jax.process_count() > 1
    if spread:
        devs = _by_process(devs, sizes)
    if len(devs) != needed:
        asked = " x ".join(f"{k}={v}" for k, v in sizes.items() if v > 1) or "all axes 1"
        hint = (
            f"pass `devices=jax.devices()[:{needed}]` to use a subset"
            if len(devs) > needed
            else (
                f"on CPU, simulate more with `eqxpar.simulate_cpu_devices({needed})` before "
                f"JAX starts (or XLA_FLAGS=--xla_force_host_platform_device_count={needed})"
            )
        )
        raise ValueError(
            f"make_mesh({asked}) needs {needed} device(s), but {len(devs)} "
            f"{'were' if len(devs) != 1 else 'was'} given "
            f"({'jax.devices()' if devices is None else 'devices='}). Either change the "
            f"axis sizes so their product is {len(devs)}, or {hint}."
        )
    kind = AxisType.Auto if axis_types == "auto" else AxisType.Explicit
    mesh = Mesh(
        np.asarray(devs, dtype=object).reshape(shape),
        AXIS_ORDER,
        axis_types=(kind,) * len(AXIS_ORDER),
    )
    if spread:
        from .distributed import layout

        logging.getLogger("eqxpar").info("make_mesh: %s", layout(mesh))
    return mesh


def _by_process(devices: list[Any], sizes: dict[str, int]) -> list[Any]:
    """`devices` ordered by host, then process, then id, after checking that every
    process has as many and that a tensor group fits inside one host."""
    from .distributed import hosts

    per: dict[int, int] = {}
    for d in devices:
        per[d.process_index] = per.get(d.process_index, 0) + 1
    if len(set(per.values())) > 1:
        counts = ", ".join(f"process {p}: {n}" for p, n in sorted(per.items()))
        raise ValueError(
            f"make_mesh: the processes have different numbers of devices ({counts}); a "
            f"mesh over all of them needs the same number on each. Start every process "
            f"with the same devices, or pass `devices=` to choose them."
        )
    host_of = hosts()
    first = {}  # a host's rank: its first process
    for p in sorted(host_of):
        first.setdefault(host_of[p], p)
    on_host: dict[str, int] = {}
    for d in devices:
        on_host[host_of[d.process_index]] = on_host.get(host_of[d.process_index], 0) + 1
    local = min(on_host.values())
    tensor = sizes[TENSOR]
    if tensor > 1 and any(n % tensor for n in on_host.values()):
        counts = ", ".join(f"{h}: {n}" for h, n in on_host.items())
        raise ValueError(
            f"make_mesh(tensor={tensor}): a tensor group of {tensor} devices would span "
            f"hosts, which hold {counts} device(s) (tensor parallelism communicates at "
            f"every layer, so eqxpar keeps it inside one host). Use a tensor size that "
            f"divides {local}, or pass `devices=` to lay the mesh out yourself."
        )
    return sorted(devices, key=lambda d: (first[host_of[d.process_index]], d.process_index, d.id))


def describe_mesh(mesh) -> str:
    """`Mesh('data': 2, 'tensor': 4)`: the axes of size > 1 (all of them if none)."""
    shape = dict(mesh.shape)
    shown = {k: v for k, v in shape.items() if v > 1} or shape
    inner = ", ".join(f"{k!r}: {v}" for k, v in shown.items())
    return f"Mesh({inner})"
