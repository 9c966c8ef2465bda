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

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._collectives import to_varying
from .._shard_map import varying_axes
from ._schedule import AbstractSchedule, Interleaved1F1B, OneFOneB, TickTable

FirstFn = Callable[[Any, Any], jax.Array]
StageFn = Callable[[Any, jax.Array], jax.Array]
LastFn = Callable[[Any, jax.Array, Any], jax.Array]


def _vary(tree: Any, axes: frozenset | tuple) -> Any:
    axes = tuple(axes)
    return jax.tree.map(lambda x: to_varying(x, axes) if axes else x, tree)


def _zeros_like(tree: Any, extra: tuple[str, ...]) -> Any:
    return jax.tree.map(
        lambda x: to_varying(jnp.zeros(x.shape, x.dtype), tuple(varying_axes(x) | set(extra))),
        tree,
    )


class _Carry(NamedTuple):
    """What one tick hands the next."""

    inputs: jax.Array  # (num_slots, *act): stage inputs of the microbatches in flight
    grads_in: jax.Array  # (num_slots, *act): their output gradients, once arrived
    send_f: jax.Array  # the activation this device sends forward at the next tick
    send_b: jax.Array  # the input gradient it sends backward at the next tick
    grads: tuple  # gradients of (first, stage, last) parameters, summed so far
    loss: jax.Array  # the sum of the last chunk's microbatch losses so far


class _Ticks:
    """The executor's tick bodies, for one table and one set of (per-shard) arguments.

    `tick` runs one row of the table on this device: it stores what arrived from the
    neighbours, then runs this device's action (`idle`, `forward` or `backward`)
    under `lax.switch`.
    """

    def __init__(self, fns: tuple, params: tuple, inputs: Any, targets: Any, table, axis: str):
        first_fn, stage_fn, last_fn = fns
        self.fns, self.table, self.axis = fns, table, axis
        self.m = table.microbatches
        self.me = lax.axis_index(axis)
        # Everything the branches touch varies over the pipeline axis already, so no
        # implicit broadcast (whose transpose is a psum over the pipeline) happens inside
        # a branch that only some stages run. Likewise over the axes the data varies
        # over (e.g. "data"): each device's gradients then come back unreduced, and
        # `_match` sums them once.
        data_axes = set().union(*(varying_axes(x) for x in jax.tree.leaves((inputs, targets))))
        fp, sp, lp = _vary(params, tuple(sorted(data_axes | {axis})))
        sp = jax.tree.map(lambda a: a[:, 0], sp)  # (virtual, 1, ...) -> (virtual, ...)
        self.params = (fp, sp, lp)
        self.inputs, self.targets = _vary((inputs, targets), (axis,))
        x_aval = jax.eval_shape(first_fn, fp, _take(self.inputs, 0))
        y_aval = jax.eval_shape(stage_fn, _take(sp, 0), x_aval)
        if (x_aval.shape, x_aval.dtype) != (y_aval.shape, y_aval.dtype):
            raise ValueError(
                f"pipeline stages must map activations to the same shape and dtype: the "
                f"first stage's input is {x_aval.dtype}{list(x_aval.shape)}, a stage returns "
                f"{y_aval.dtype}{list(y_aval.shape)}."
            )
        l_aval = jax.eval_shape(last_fn, lp, y_aval, _take(self.targets, 0))
        self.x_aval = x_aval
        self.act_axes = tuple(_axes(x_aval) | _axes(y_aval) | {axis})
        self.loss_axes = tuple(_axes(l_aval) | {axis})
        self.program = {k: jnp.asarray(a) for k, a in table.as_arrays().items()}

    def act(self, x: jax.Array) -> jax.Array:
        return to_varying(x.astype(self.x_aval.dtype), self.act_axes)

    def zero_act(self) -> jax.Array:
        return self.act(jnp.zeros(self.x_aval.shape, self.x_aval.dtype))

    def zero_loss(self) -> jax.Array:
        return to_varying(jnp.zeros((), jnp.float32), self.loss_axes)

    def initial(self) -> _Carry:
        fp, sp, lp = self.params
        buffer = jnp.broadcast_to(self.zero_act(), (self.table.num_slots, *self.x_aval.shape))
        grads = (_zeros_like(fp, ()), _zeros_like(sp, ()), _zeros_like(lp, ()))
        zero = self.zero_act()
        return _Carry(buffer, buffer, zero, zero, grads, self.zero_loss())

    def chunk(self, fp: Any, cp: Any, lp: Any, x_in: jax.Array, row: dict) -> tuple:
        """One chunk's forward for one microbatch: `(output, loss or 0)`."""
        first_fn, stage_fn, last_fn = self.fns
        mb = row["mb"]
        x = lax.cond(
            row["first_chunk"], lambda: self.act(first_fn(fp, _take(self.inputs, mb))), lambda: x_in
        )
        y = self.act(stage_fn(cp, x))
        loss = lax.cond(
            row["last_chunk"],
            lambda: to_varying(
                last_fn(lp, y, _take(self.targets, mb)).astype(jnp.float32), self.loss_axes
            ),
            self.zero_loss,
        )
        return y, loss

    def idle(self, carry: _Carry, row: dict) -> tuple:
        return self.zero_act(), self.zero_act(), carry.grads, self.zero_loss()

    def forward(self, carry: _Carry, row: dict) -> tuple:
        fp, sp, lp = self.params
        x_in = _read(carry.inputs, row["slot"])
        y, loss = self.chunk(fp, _take(sp, row["virt"]), lp, x_in, row)
        return y, self.zero_act(), carry.grads, loss

    def backward(self, carry: _Carry, row: dict) -> tuple:
        """Recomputes the chunk's forward from its saved input and applies its VJP."""
        fp, sp, lp = self.params
        x_in = _read(carry.inputs, row["slot"])
        dy = _read(carry.grads_in, row["slot"])
        _, pull = jax.vjp(
            lambda f, c, last, x: self.chunk(f, c, last, x, row),
            fp,
            _take(sp, row["virt"]),
            lp,
            x_in,
        )
        last = row["last_chunk"]
        y_ct = self.act(jnp.where(last, jnp.zeros_like(dy), dy))
        loss_ct = to_varying(jnp.where(last, 1.0 / self.m, 0.0).astype(jnp.float32), self.loss_axes)
        dfp, dcp, dlp, dx = pull((y_ct, loss_ct))
        gfp, gsp, glp = carry.grads
        gsp = jax.tree.map(lambda acc, d: acc.at[row["virt"]].add(d.astype(acc.dtype)), gsp, dcp)
        add = functools.partial(jax.tree.map, lambda a, d: a + d.astype(a.dtype))
        grads = (add(gfp, dfp), gsp, add(glp, dlp))
        return self.zero_act(), self.act(dx), grads, self.zero_loss()

    def tick(self, carry: _Carry, t: jax.Array, backward: bool) -> _Carry:
        p, axis = self.table.stages, self.axis
        row = {k: a[t, self.me] for k, a in self.program.items()}
        inputs = _store(
            carry.inputs, row["recv_f"], self.act(lax.ppermute(carry.send_f, axis, _ring(p, +1)))
        )
        grads_in = carry.grads_in
        if backward:
            arrived = self.act(lax.ppermute(carry.send_b, axis, _ring(p, -1)))
            grads_in = _store(grads_in, row["recv_b"], arrived)
        carry = carry._replace(inputs=inputs, grads_in=grads_in)
        branches = [self.idle, self.forward, self.backward if backward else self.idle]
        send_f, send_b, grads, loss = lax.switch(
            row["kind"], [functools.partial(b, carry, row) for b in branches]
        )
        return _Carry(inputs, grads_in, send_f, send_b, grads, carry.loss + loss)


def _take(tree: Any, i: Any) -> Any:
    return jax.tree.map(lambda a: a[i], tree)


def _read(buffer: jax.Array, slot: Any) -> jax.Array:
    return lax.dynamic_index_in_dim(buffer, slot, keepdims=False)


def _store(buffer: jax.Array, slot: Any, value: jax.Array) -> jax.Array:
    """`buffer[slot] = value`, or `buffer` unchanged when `slot` is -1."""
    keep = _read(buffer, jnp.maximum(slot, 0))
    value = jnp.where(slot >= 0, value, keep)
    return lax.dynamic_update_index_in_dim(buffer, value, jnp.maximum(slot, 0), 0)


def _execute(
    fns: tuple,
    params: tuple,
    inputs: Any,
    targets: Any,
    table: TickTable,
    axis: str,
    backward: bool,
) -> tuple[jax.Array, Any]:
    """Runs `table` on this device: the mean loss and (if `backward`) the gradients."""
    ticks = _Ticks(fns, params, inputs, targets, table, axis)
    final, _ = lax.scan(
        lambda c, t: (ticks.tick(c, t, backward), None),
        ticks.initial(),
        jnp.arange(table.num_ticks),
    )
    loss = lax.psum(final.loss, axis) / table.microbatches
    gfp, gsp, glp = final.grads
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
    fns = _with_static(first_fn, stage_fn, last_fn, static)
    leaves = jax.tree.leaves((inputs, targets))
    if leaves and leaves[0].shape[0] != table.microbatches:
        raise ValueError(
            f"pipeline_loss: inputs have {leaves[0].shape[0]} microbatches along their "
            f"leading dim, but the table was built for microbatches={table.microbatches}."
        )
    if lax.axis_size(axis_name) != table.stages:
        raise ValueError(
            f"pipeline_loss: the schedule has {table.stages} stages but mesh axis "
            f"{axis_name!r} has size {lax.axis_size(axis_name)}; build the table (and the "
            f"model) with stages={lax.axis_size(axis_name)}."
        )
    _check_stage_params(sp, table, axis_name)
    run = functools.partial(_execute, fns, table=table, axis=axis_name)

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


def _check_stage_params(sp: Any, table: TickTable, axis: str) -> None:
    """This device's chunks must be `(table.virtual, 1, ...)`: as many chunks per stage
    as the table runs, the stage dim split over the pipeline axis."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(sp):
        shape = tuple(leaf.shape)
        where = f"stage_params{jax.tree_util.keystr(path)}"
        if len(shape) < 2 or shape[0] != table.virtual:
            raise ValueError(
                f"pipeline_loss: {where} has shape {shape} on this device, so it holds "
                f"{shape[0] if shape else 0} chunks per stage, but the table runs "
                f"virtual={table.virtual} chunks per stage. Build the table with a schedule "
                f"for that many chunks (Interleaved1F1B(virtual) for virtual > 1, OneFOneB() "
                f"or GPipe() for 1), or stack the stage parameters as (virtual, stages, ...)."
            )
        if shape[1] != 1:
            raise ValueError(
                f"pipeline_loss: {where} has shape {shape} on this device: its stage dim "
                f"(dim 1) holds {shape[1]} stages, but each device must hold only its own. "
                f"Split dim 1 over mesh axis {axis!r} (pass the module with its declared "
                f"specs, in_specs=None in eqxpar.filter_shard_map)."
            )


def batch_pipeline_loss(
    fns: tuple[FirstFn, StageFn, LastFn],
    params: tuple[Any, Any, Any],
    inputs: Any,
    targets: Any,
    *,
    stages: int,
    virtual: int,
    microbatches: int,
    schedule: AbstractSchedule | None = None,
    axis_name: str = "pipeline",
) -> jax.Array:
    """`pipeline_loss` of a whole batch: split into microbatches, default schedule.

    The one path from a model's `loss` to the executor (`Transformer.loss` and
    `PPClassifier.loss` both call it). Per-shard code, with `axis_name` bound.

    **Arguments:**

    - `fns`: `(first_fn, stage_fn, last_fn)`, as for `pipeline_loss`.
    - `params`: `(first_params, stage_params, last_params)`, as for `pipeline_loss`;
      `stage_params` stacked `(virtual, stages, ...)` globally.
    - `inputs`, `targets`: pytrees of this device's batch, leading dim the batch.
    - `stages`, `virtual`: the model's pipeline stages and chunks per stage (its
      configuration, not read from shapes): `stages` must be the size of
      `axis_name`; `virtual` picks the default schedule and is checked against it.
    - `microbatches`: how many equal microbatches to split the batch into.
    - `schedule`: an `AbstractSchedule`; default `OneFOneB()`, or
      `Interleaved1F1B(virtual)` when `virtual > 1`.
    - `axis_name`: the pipeline mesh axis.

    **Returns:**

    The mean loss over the batch, identical on every stage.
    """
    if schedule is None:
        schedule = OneFOneB() if virtual == 1 else Interleaved1F1B(virtual)
    table = schedule.table(stages, microbatches)
    if table.virtual != virtual:
        raise ValueError(
            f"batch_pipeline_loss: the schedule {schedule} runs {table.virtual} chunk(s) per "
            f"stage but the model has virtual={virtual}; use "
            f"{'OneFOneB() or GPipe()' if virtual == 1 else f'Interleaved1F1B({virtual})'}."
        )

    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % microbatches:
            raise ValueError(
                f"batch_pipeline_loss: this device's batch of {x.shape[0]} does not split "
                f"into {microbatches} microbatches; use a per-device batch that is a "
                f"multiple of {microbatches}."
            )
        return x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:])

    inputs, targets = jax.tree.map(split, (inputs, targets))
    return pipeline_loss(*fns, *params, inputs, targets, table=table, axis_name=axis_name)


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
