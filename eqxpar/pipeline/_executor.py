"""One executor for any tick table: runs a pipeline schedule inside `shard_map`.

Every device runs the same program, a `lax.scan` over the table's ticks. At each tick
a device looks up its own action (forward or backward of microbatch `i` on virtual
chunk `v`, or nothing) and runs it under `lax.switch`; then one `ppermute` passes
activations to the next stage and one passes input gradients to the previous one.

The backward of a microbatch is scheduled explicitly: it recomputes that chunk's
forward from the saved chunk input and applies its VJP, so a stage keeps only the
inputs of the microbatches in flight (`p` for 1F1B, `m` for GPipe) and no other
activation outlives its tick.

Collectives over the pipeline axis are only the two `ppermute`s per tick and, at the
end, the sums of the loss and of the gradients of the first and last stage's
parameters (held on every stage).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._collectives import to_varying
from .._shard_map import varying_axes
from ._schedule import TickTable

FirstFn = Callable[[Any, Any], jax.Array]
StageFn = Callable[[Any, jax.Array], jax.Array]
LastFn = Callable[[Any, jax.Array, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class _Program:
    """The table as per-(tick, stage) integer arrays, with buffer slots assigned."""

    kind: np.ndarray  # 0 idle, 1 forward, 2 backward
    mb: np.ndarray
    virt: np.ndarray
    first: np.ndarray
    last: np.ndarray
    slot: np.ndarray  # the slot holding this action's chunk input / output gradient
    recv_f: np.ndarray  # slot receiving the activation that arrives at this tick, or -1
    recv_b: np.ndarray  # slot receiving the gradient that arrives at this tick, or -1
    num_slots: int


def _program(table: TickTable) -> _Program:
    """Assigns each (microbatch, chunk) on each stage a buffer slot for its lifetime:
    from the arrival of its input (or its forward) to its backward."""
    p, v, ticks = table.stages, table.virtual, table.num_ticks
    when: dict[tuple[str, int, int, int], int] = {}  # (kind, stage, mb, virt) -> tick
    for t, row in enumerate(table.grid):
        for s, action in enumerate(row):
            if action is not None:
                when[(action.kind, s, action.microbatch, action.virtual)] = t
    chunks = p * v

    def place(g: int) -> tuple[int, int]:  # global chunk -> (stage, virtual)
        return g % p, g // p

    lifetimes: dict[int, list[tuple[int, int, int, int]]] = {s: [] for s in range(p)}
    for (kind, s, mb, vi), t in when.items():
        if kind != "F":
            continue
        g = vi * p + s
        if g == 0:
            start = t
        else:
            prev_s, prev_v = place(g - 1)
            start = when[("F", prev_s, mb, prev_v)] + 1
        lifetimes[s].append((start, when[("B", s, mb, vi)], mb, vi))
    slot_of: dict[tuple[int, int, int], int] = {}
    num_slots = 1
    for s, spans in lifetimes.items():
        free_at: list[int] = []  # per slot: the tick after which it is free
        for start, end, mb, vi in sorted(spans):
            slot = next((i for i, f in enumerate(free_at) if f < start), len(free_at))
            if slot == len(free_at):
                free_at.append(end)
            free_at[slot] = end
            slot_of[(s, mb, vi)] = slot
        num_slots = max(num_slots, len(free_at))

    arrays = {k: np.zeros((ticks, p), np.int32) for k in ("kind", "mb", "virt", "slot")}
    first = np.zeros((ticks, p), bool)
    last = np.zeros((ticks, p), bool)
    recv_f = np.full((ticks, p), -1, np.int32)
    recv_b = np.full((ticks, p), -1, np.int32)
    for t, row in enumerate(table.grid):
        for s, action in enumerate(row):
            if action is None:
                continue
            mb, vi = action.microbatch, action.virtual
            g = vi * p + s
            arrays["kind"][t, s] = 1 if action.kind == "F" else 2
            arrays["mb"][t, s], arrays["virt"][t, s] = mb, vi
            arrays["slot"][t, s] = slot_of[(s, mb, vi)]
            first[t, s], last[t, s] = g == 0, g == chunks - 1
            if t + 1 < ticks and action.kind == "F" and g < chunks - 1:
                ns, nv = place(g + 1)
                recv_f[t + 1, ns] = slot_of[(ns, mb, nv)]
            if t + 1 < ticks and action.kind == "B" and g > 0:
                ps, pv = place(g - 1)
                recv_b[t + 1, ps] = slot_of[(ps, mb, pv)]
    return _Program(
        arrays["kind"],
        arrays["mb"],
        arrays["virt"],
        first,
        last,
        arrays["slot"],
        recv_f,
        recv_b,
        num_slots,
    )


def _vary(tree: Any, axes: frozenset | tuple) -> Any:
    axes = tuple(axes)
    return jax.tree.map(lambda x: to_varying(x, axes) if axes else x, tree)


def _zeros_like(tree: Any, extra: tuple[str, ...]) -> Any:
    return jax.tree.map(
        lambda x: to_varying(jnp.zeros(x.shape, x.dtype), tuple(varying_axes(x) | set(extra))),
        tree,
    )


def _execute(
    first_fn: FirstFn,
    stage_fn: StageFn,
    last_fn: LastFn,
    params: tuple[Any, Any, Any],
    inputs: Any,
    targets: Any,
    table: TickTable,
    axis: str,
    backward: bool,
) -> tuple[jax.Array, Any]:
    prog = _program(table)
    p, m = table.stages, table.microbatches
    if lax.axis_size(axis) != p:
        raise ValueError(
            f"the schedule has {p} stages but mesh axis {axis!r} has size "
            f"{lax.axis_size(axis)}; build the table with stages={lax.axis_size(axis)}."
        )
    me = lax.axis_index(axis)
    # Everything the branches touch varies over the pipeline axis already, so no
    # implicit broadcast (whose transpose is a psum over the pipeline) happens inside
    # a branch that only some stages run.
    # Likewise over the axes the data varies over (e.g. "data"): each device's
    # gradients then come back unreduced, and `_match` sums them once.
    data_axes = set().union(*(varying_axes(x) for x in jax.tree.leaves((inputs, targets))))
    fp, sp, lp = _vary(params, tuple(sorted(data_axes | {axis})))
    inputs, targets = _vary((inputs, targets), (axis,))
    sp = jax.tree.map(lambda a: a[:, 0], sp)  # (virtual, 1, ...) -> (virtual, ...)

    def take(tree: Any, i: Any) -> Any:
        return jax.tree.map(lambda a: a[i], tree)

    x_aval = jax.eval_shape(first_fn, fp, take(inputs, 0))
    y_aval = jax.eval_shape(stage_fn, take(sp, 0), x_aval)
    if (x_aval.shape, x_aval.dtype) != (y_aval.shape, y_aval.dtype):
        raise ValueError(
            f"pipeline stages must map activations to the same shape and dtype: the first "
            f"stage's input is {x_aval.dtype}{list(x_aval.shape)}, a stage returns "
            f"{y_aval.dtype}{list(y_aval.shape)}."
        )
    l_aval = jax.eval_shape(last_fn, lp, y_aval, take(targets, 0))
    act_axes = tuple(_axes(x_aval) | _axes(y_aval) | {axis})
    loss_axes = tuple(_axes(l_aval) | {axis})

    def act(x: jax.Array) -> jax.Array:
        return to_varying(x.astype(x_aval.dtype), act_axes)

    zero_act = act(jnp.zeros(x_aval.shape, x_aval.dtype))
    buffer = jnp.broadcast_to(zero_act, (prog.num_slots, *x_aval.shape))
    table_arrays = {
        k: jnp.asarray(getattr(prog, k))
        for k in ("kind", "mb", "virt", "first", "last", "slot", "recv_f", "recv_b")
    }

    def chunk(fp: Any, cp: Any, lp: Any, x_in: jax.Array, mb: Any, first: Any, last: Any):
        x = lax.cond(first, lambda: act(first_fn(fp, take(inputs, mb))), lambda: x_in)
        y = act(stage_fn(cp, x))
        loss = lax.cond(
            last,
            lambda: to_varying(last_fn(lp, y, take(targets, mb)).astype(jnp.float32), loss_axes),
            lambda: to_varying(jnp.zeros((), jnp.float32), loss_axes),
        )
        return y, loss

    def store(buf: jax.Array, slot: Any, value: jax.Array) -> jax.Array:
        keep = lax.dynamic_index_in_dim(buf, jnp.maximum(slot, 0), keepdims=False)
        value = jnp.where(slot >= 0, value, keep)
        return lax.dynamic_update_index_in_dim(buf, value, jnp.maximum(slot, 0), 0)

    def tick(carry: tuple, t: jax.Array) -> tuple[tuple, None]:
        xs, dys, send_f, send_b, grads, loss_sum = carry
        row = {k: a[t, me] for k, a in table_arrays.items()}
        xs = store(xs, row["recv_f"], act(lax.ppermute(send_f, axis, _ring(p, +1))))
        if backward:
            dys = store(dys, row["recv_b"], act(lax.ppermute(send_b, axis, _ring(p, -1))))
        x_in = lax.dynamic_index_in_dim(xs, row["slot"], keepdims=False)
        cp = take(sp, row["virt"])

        def idle():
            return zero_act, zero_act, grads, to_varying(jnp.zeros((), jnp.float32), loss_axes)

        def forward():
            y, loss = chunk(fp, cp, lp, x_in, row["mb"], row["first"], row["last"])
            return y, zero_act, grads, loss

        def back():
            dy = lax.dynamic_index_in_dim(dys, row["slot"], keepdims=False)
            _, pull = jax.vjp(
                lambda f, c, last, x: chunk(f, c, last, x, row["mb"], row["first"], row["last"]),
                fp,
                cp,
                lp,
                x_in,
            )
            y_ct = jnp.where(row["last"], jnp.zeros_like(dy), dy)
            loss_ct = to_varying(
                jnp.where(row["last"], 1.0 / m, 0.0).astype(jnp.float32), loss_axes
            )
            dfp, dcp, dlp, dx = pull((act(y_ct), loss_ct))
            gfp, gsp, glp = grads
            gsp = jax.tree.map(
                lambda acc, d: acc.at[row["virt"]].add(d.astype(acc.dtype)), gsp, dcp
            )
            add = functools.partial(jax.tree.map, lambda a, d: a + d.astype(a.dtype))
            return (
                zero_act,
                act(dx),
                (add(gfp, dfp), gsp, add(glp, dlp)),
                to_varying(jnp.zeros((), jnp.float32), loss_axes),
            )

        branches = [idle, forward, back] if backward else [idle, forward, idle]
        send_f, send_b, grads, loss = lax.switch(row["kind"], branches)
        return (xs, dys, send_f, send_b, grads, loss_sum + loss), None

    grads0 = (_zeros_like(fp, ()), _zeros_like(sp, ()), _zeros_like(lp, ()))
    carry = (
        buffer,
        buffer,
        zero_act,
        zero_act,
        grads0,
        to_varying(jnp.zeros((), jnp.float32), loss_axes),
    )
    (_, _, _, _, grads, loss_sum), _ = lax.scan(tick, carry, jnp.arange(table.num_ticks))
    loss = lax.psum(loss_sum, axis) / m
    gfp, gsp, glp = grads
    gfp = jax.tree.map(lambda g: lax.psum(g, axis), gfp)
    glp = jax.tree.map(lambda g: lax.psum(g, axis), glp)
    gsp = jax.tree.map(lambda g: g[:, None], gsp)
    return loss, (gfp, gsp, glp)


def _axes(aval: Any) -> set[str]:
    mat = getattr(aval, "manual_axis_type", None)
    return set() if mat is None else set(mat.varying)


def _ring(p: int, step: int) -> list[tuple[int, int]]:
    return [(i, (i + step) % p) for i in range(p)]


def _match(grad: Any, primal: Any) -> Any:
    """Give a gradient its primal's varying axes, as JAX's own transposes would: sum it
    over axes the primal is replicated on (the transpose of the implicit broadcast),
    mark it varying where the primal is."""
    extra = tuple(sorted(varying_axes(grad) - varying_axes(primal)))
    if extra:
        grad = lax.psum(grad, extra)
    return to_varying(grad, tuple(varying_axes(primal) - varying_axes(grad)))


def pipeline_loss(
    first_fn: FirstFn,
    stage_fn: StageFn,
    last_fn: LastFn,
    first_params: Any,
    stage_params: Any,
    last_params: Any,
    inputs: Any,
    targets: Any,
    *,
    table: TickTable,
    axis_name: str = "pipeline",
) -> jax.Array:
    """The mean loss over `m` microbatches, run through the pipeline by `table`.

    Per-shard code: call it inside `eqxpar.filter_shard_map` with the pipeline axis
    bound. Differentiable: its gradient was computed alongside the loss by the
    schedule's backward actions (a `custom_vjp`), so `jax.grad` of a loss built on
    it costs one schedule, not two.

    **Arguments:**

    - `first_fn(first_params, inputs_mb) -> x`: the input layers (e.g. the embedding),
      run only by the stage holding chunk 0.
    - `stage_fn(chunk_params, x) -> x`: one chunk of layers; activations keep their
      shape.
    - `last_fn(last_params, x, targets_mb) -> scalar`: the output layers and the loss
      of one microbatch, run only by the stage holding the last chunk.
    - `first_params`, `last_params`: replicated over the pipeline axis.
    - `stage_params`: this device's chunks, with leading dims `(virtual, 1)`: globally
      `(virtual, stages, ...)` with the stage dim split over `axis_name`. Chunk
      `v * stages + s` lives on stage `s` (Megatron's interleaved layout).
    - `inputs`, `targets`: pytrees whose arrays have a leading microbatch dim `m`.
    - `table`: the schedule's `TickTable` for `stages` = the axis size, `m`.
    - `axis_name`: the pipeline mesh axis.

    **Returns:**

    The mean of `last_fn` over the microbatches, identical on every stage.
    """
    (fp, sp, lp), static = eqx.partition((first_params, stage_params, last_params), eqx.is_array)
    first_fn, stage_fn, last_fn = _with_static(first_fn, stage_fn, last_fn, static)
    leaves = jax.tree.leaves((inputs, targets))
    if leaves and leaves[0].shape[0] != table.microbatches:
        raise ValueError(
            f"inputs have {leaves[0].shape[0]} microbatches along their leading dim, but the "
            f"table was built for {table.microbatches}."
        )
    run = functools.partial(_execute, first_fn, stage_fn, last_fn, table=table, axis=axis_name)

    @jax.custom_vjp
    def loss_of(fp: Any, sp: Any, lp: Any, inputs: Any, targets: Any) -> jax.Array:
        return run((fp, sp, lp), inputs, targets, backward=False)[0]

    def fwd(fp, sp, lp, inputs, targets):
        loss, grads = run((fp, sp, lp), inputs, targets, backward=True)
        zeros = jax.tree.map(_zero_cotangent, (inputs, targets))
        return loss, (grads, (fp, sp, lp), zeros)

    def bwd(res, ct):
        grads, primals, zeros = res
        grads = jax.tree.map(lambda g, x: _match(g * ct.astype(g.dtype), x), grads, primals)
        return (*grads, *zeros)

    loss_of.defvjp(fwd, bwd)
    return loss_of(fp, sp, lp, inputs, targets)


def _with_static(first_fn: FirstFn, stage_fn: StageFn, last_fn: LastFn, static: tuple):
    """The three functions taking only the array parts of their parameters (modules'
    functions and other non-array leaves are put back from `static`)."""
    fs, ss, ls = static

    def stage(c: Any, x: jax.Array) -> jax.Array:
        # `c` is one chunk: the stacked (virtual, stage) dims are indexed away, so the
        # static part's structure (that of the whole stack) still fits.
        return stage_fn(eqx.combine(c, ss), x)

    return (
        lambda f, x: first_fn(eqx.combine(f, fs), x),
        stage,
        lambda lp, y, t: last_fn(eqx.combine(lp, ls), y, t),
    )


def _zero_cotangent(x: jax.Array) -> Any:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)
