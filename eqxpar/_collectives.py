"""Megatron's region mappings and collective matmuls, over named mesh axes.

Each mapping is a `jax.custom_vjp` whose forward and backward are the collectives
Megatron-LM pairs (Shoeybi et al. 2019, "f" and "g"; Korthikanti et al. 2022 for the
sequence-parallel pair). Writing the backward explicitly keeps gradients right whether
or not `shard_map` tracks varying values (`check_vma`).

Outside `shard_map`, where the axis is not bound, every function here is the identity
(or a plain matmul): a parallel layer then computes its dense twin.

| mapping | forward | backward |
| --- | --- | --- |
| `copy_to_region` (Megatron's f) | identity | all-reduce |
| `reduce_from_region` (Megatron's g) | all-reduce | identity |
| `gather_from_region` | all-gather, last dim | split, last dim |
| `scatter_to_region` | split, last dim | all-gather, last dim |
| `gather_from_sequence` | all-gather, sequence dim | reduce-scatter, sequence dim |
| `reduce_scatter_to_sequence` | reduce-scatter, sequence dim | all-gather, sequence dim |
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from ._shard_map import varying_axes

AxisName = str | tuple[str, ...] | None
Direction = Literal["unidirectional", "bidirectional"]

COLLECTIVE_OUTPUT = "eqxpar.collective"
"""The `checkpoint_name` of every region mapping's output, so a remat policy can save
collective results instead of communicating again during the backward pass."""


def _names(axis: AxisName | None) -> tuple[str, ...]:
    if axis is None:
        return ()
    return (axis,) if isinstance(axis, str) else tuple(axis)


def axis_size(axis_name: AxisName | None) -> int | None:
    """The size of `axis_name` (a name or tuple of names), or `None` outside `shard_map`.

    `axis_name=None` (a layer that is not split) is never bound.
    """
    if not _names(axis_name):
        return None
    try:
        return math.prod(lax.axis_size(a) for a in _names(axis_name))
    except NameError:
        return None


def shard_count(axis_name: AxisName) -> int:
    """How many shards `axis_name` makes here: its size, or 1 outside `shard_map`."""
    return axis_size(axis_name) or 1


def shard_index(axis_name: AxisName) -> jax.Array | int:
    """This device's index along `axis_name` (0 outside `shard_map`)."""
    return 0 if axis_size(axis_name) is None else lax.axis_index(axis_name)


def to_varying(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """Marks `x` as varying along `axis_name` (no communication); a no-op if it already is."""
    missing = tuple(a for a in _names(axis_name) if a not in varying_axes(x))
    return lax.pcast(x, missing, to="varying") if missing else x


def _is_varying(x: jax.Array, axis: AxisName) -> bool:
    return all(a in varying_axes(x) for a in _names(axis))


# -- f and g ---------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _copy(x, axis, was_varying):
    return to_varying(x, axis)


def _copy_fwd(x, axis, was_varying):
    return to_varying(x, axis), None


def _copy_bwd(axis, was_varying, _, g):
    g = lax.psum(g, axis)
    return (to_varying(g, axis) if was_varying else g,)


_copy.defvjp(_copy_fwd, _copy_bwd)


def copy_to_region(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """Megatron's f: identity forward, all-reduce (sum) over `axis_name` backward."""
    if axis_size(axis_name) is None:
        return x
    return checkpoint_name(_copy(x, axis_name, _is_varying(x, axis_name)), COLLECTIVE_OUTPUT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _reduce(x, axis):
    return lax.psum(to_varying(x, axis), axis)


def _reduce_fwd(x, axis):
    return _reduce(x, axis), None


def _reduce_bwd(axis, _, g):
    return (to_varying(g, axis),)


_reduce.defvjp(_reduce_fwd, _reduce_bwd)


def reduce_from_region(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """Megatron's g: all-reduce (sum) over `axis_name` forward, identity backward."""
    if axis_size(axis_name) is None:
        return x
    return checkpoint_name(_reduce(to_varying(x, axis_name), axis_name), COLLECTIVE_OUTPUT)


# -- gather / split along a dim ---------------------------------------------------------


def _split(x: jax.Array, axis: AxisName, dim: int) -> jax.Array:
    n = shard_count(axis)
    if x.shape[dim] % n:
        raise ValueError(
            f"scatter_to_region: dim {dim} has size {x.shape[dim]}, which does not split "
            f"over {axis!r} ({n} devices); make it a multiple of {n}."
        )
    size = x.shape[dim] // n
    return lax.dynamic_slice_in_dim(x, shard_index(axis) * size, size, axis=dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather(x, axis, dim):
    return lax.all_gather(x, axis, axis=dim, tiled=True, to="invarying")


def _gather_fwd(x, axis, dim):
    return _gather(x, axis, dim), None


def _gather_bwd(axis, dim, _, g):
    return (_split(g, axis, dim),)


_gather.defvjp(_gather_fwd, _gather_bwd)


def gather_from_region(x: jax.Array, axis_name: AxisName, dim: int = -1) -> jax.Array:
    """All-gather along `dim` (result identical on every device); backward: split."""
    if axis_size(axis_name) is None:
        return x
    return checkpoint_name(
        _gather(to_varying(x, axis_name), axis_name, dim % x.ndim), COLLECTIVE_OUTPUT
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _scatter(x, axis, dim, was_varying):
    return _split(x, axis, dim)


def _scatter_fwd(x, axis, dim, was_varying):
    return _split(x, axis, dim), None


def _scatter_bwd(axis, dim, was_varying, _, g):
    g = lax.all_gather(g, axis, axis=dim, tiled=True, to="invarying")
    return (to_varying(g, axis) if was_varying else g,)


_scatter.defvjp(_scatter_fwd, _scatter_bwd)


def scatter_to_region(x: jax.Array, axis_name: AxisName, dim: int = -1) -> jax.Array:
    """Keep this device's block of `dim`; backward: all-gather along `dim`."""
    if axis_size(axis_name) is None:
        return x
    return checkpoint_name(
        _scatter(x, axis_name, dim % x.ndim, _is_varying(x, axis_name)), COLLECTIVE_OUTPUT
    )


# -- sequence parallelism ---------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _seq_gather(x, axis, dim):
    return lax.all_gather(x, axis, axis=dim, tiled=True)


def _seq_gather_fwd(x, axis, dim):
    return _seq_gather(x, axis, dim), None


def _seq_gather_bwd(axis, dim, _, g):
    return (lax.psum_scatter(to_varying(g, axis), axis, scatter_dimension=dim, tiled=True),)


_seq_gather.defvjp(_seq_gather_fwd, _seq_gather_bwd)


def gather_from_sequence(x: jax.Array, axis_name: AxisName, dim: int = -2) -> jax.Array:
    """All-gather sequence shards along `dim`; backward: reduce-scatter along `dim`."""
    if axis_size(axis_name) is None:
        return x
    return checkpoint_name(
        _seq_gather(to_varying(x, axis_name), axis_name, dim % x.ndim), COLLECTIVE_OUTPUT
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _seq_scatter(x, axis, dim):
    return lax.psum_scatter(x, axis, scatter_dimension=dim, tiled=True)


def _seq_scatter_fwd(x, axis, dim):
    return _seq_scatter(x, axis, dim), None


def _seq_scatter_bwd(axis, dim, _, g):
    return (lax.all_gather(to_varying(g, axis), axis, axis=dim, tiled=True),)


_seq_scatter.defvjp(_seq_scatter_fwd, _seq_scatter_bwd)


def reduce_scatter_to_sequence(x: jax.Array, axis_name: AxisName, dim: int = -2) -> jax.Array:
    """Sum partial results and keep this device's sequence block of `dim`; backward:
    all-gather along `dim`."""
    if axis_size(axis_name) is None:
        return x
    return checkpoint_name(
        _seq_scatter(to_varying(x, axis_name), axis_name, dim % x.ndim), COLLECTIVE_OUTPUT
    )


# -- collective matmuls -----------------------------------------------------------------


def _shift(x: jax.Array, axis: AxisName, step: int) -> jax.Array:
    n = shard_count(axis)
    return lax.ppermute(x, axis, perm=[(j, (j + step) % n) for j in range(n)])


def _vary_like(weight: jax.Array, x: jax.Array) -> jax.Array:
    """Marks `weight` varying wherever `x` is (e.g. over "data") once, before a ring.

    Otherwise every ring step's matmul broadcasts the weight implicitly, and the
    backward pass all-reduces one weight-sized gradient per step instead of their sum.
    """
    missing = tuple(a for a in varying_axes(x) if a not in varying_axes(weight))
    return to_varying(weight, missing) if missing else weight


def _check_even(block: int) -> None:
    if block % 2:
        raise ValueError(
            f"bidirectional collective matmul splits each sequence block in two, but the "
            f"block has odd length {block}; use an even per-device sequence length or "
            f"collective_matmul='unidirectional'."
        )


def _halves(x: jax.Array, dim: int) -> tuple[jax.Array, jax.Array]:
    _check_even(x.shape[dim])
    half = x.shape[dim] // 2
    return (
        lax.slice_in_dim(x, 0, half, axis=dim),
        lax.slice_in_dim(x, half, 2 * half, axis=dim),
    )


def all_gather_matmul(
    x: jax.Array, weight: jax.Array, axis_name: AxisName, *, dim: int = -2, direction: Direction
) -> jax.Array:
    """`all_gather(x, dim) @ weight.T` as a ring of `ppermute`s overlapped with matmuls.

    Each step multiplies the block it holds while passing it on to the next device, so
    no device waits for the whole gather. `"bidirectional"` sends half of each block
    each way round the ring, halving the bytes per link per step.

    **Arguments:**

    - `x`: per-shard `(*batch, seq_shard, in)`, the sequence block along `dim`.
    - `weight`: per-shard `(out_shard, in)`, the dense layout of `eqx.nn.Linear`.
    - `axis_name`: the mesh axis the sequence is split over.
    - `dim`: the sequence dim of `x` (negative, counted from the end).
    - `direction`: `"unidirectional"` or `"bidirectional"`.

    **Returns:**

    Per-shard `(*batch, seq, out_shard)`. Issues `t - 1` collective-permutes per ring
    and no all-gather.
    """
    n = axis_size(axis_name)
    if n is None:
        return x @ weight.T
    weight = _vary_like(weight, x)
    me = lax.axis_index(axis_name)
    dim = dim % x.ndim
    block = x.shape[dim]
    out = jnp.zeros((*x.shape[:dim], block * n, *x.shape[dim + 1 : -1], weight.shape[0]), x.dtype)
    out = to_varying(out, axis_name)
    rings = (
        [(x, 1, 0)]
        if direction == "unidirectional"
        else [(h, step, off) for h, step, off in zip(_halves(x, dim), (1, -1), (0, block // 2))]
    )
    for i in range(n):
        for r, (chunk, step, offset) in enumerate(rings):
            nxt = _shift(chunk, axis_name, step) if i < n - 1 else chunk
            source = (me - step * i) % n
            out = lax.dynamic_update_slice_in_dim(
                out, chunk @ weight.T, source * block + offset, axis=dim
            )
            rings[r] = (nxt, step, offset)
    return out


def matmul_reduce_scatter(
    x: jax.Array, weight: jax.Array, axis_name: AxisName, *, dim: int = -2, direction: Direction
) -> jax.Array:
    """`psum_scatter(x @ weight.T, dim)` as a ring of `ppermute`s overlapped with matmuls.

    Each step computes the partial product for one sequence block and adds it to the
    running sum arriving from the neighbour; after `t` steps every device holds the
    full sum for its own block.

    **Arguments:**

    - `x`: per-shard `(*batch, seq, in_shard)`, the full sequence.
    - `weight`: per-shard `(out, in_shard)`.
    - `axis_name`: the mesh axis the sequence is split over.
    - `dim`: the sequence dim of `x` (negative, counted from the end).
    - `direction`: `"unidirectional"` or `"bidirectional"`.

    **Returns:**

    Per-shard `(*batch, seq_shard, out)`. Issues `t - 1` collective-permutes per ring
    and no reduce-scatter or all-reduce.
    """
    n = axis_size(axis_name)
    if n is None:
        return x @ weight.T
    weight = _vary_like(weight, x)
    me = lax.axis_index(axis_name)
    dim = dim % x.ndim
    block = x.shape[dim] // n
    halves = direction == "bidirectional"
    if halves:
        _check_even(block)
    width = block // 2 if halves else block
    rings = [(1, 0)] if not halves else [(1, 0), (-1, width)]
    results = []
    for step, offset in rings:
        acc = None
        for i in range(n):
            target = (me - step * (i + 1)) % n
            part = lax.dynamic_slice_in_dim(x, target * block + offset, width, axis=dim)
            part = part @ weight.T
            acc = part if acc is None else _shift(acc, axis_name, step) + part
        results.append(acc)
    return results[0] if len(results) == 1 else jnp.concatenate(results, axis=dim)
