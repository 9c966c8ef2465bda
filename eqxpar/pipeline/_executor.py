"""One executor for any tick table: runs a pipeline schedule inside `shard_map`.

Every device runs the same program, a `lax.scan` over the ticks of `table.split()`:
the schedule with every backward split into `B` (the input gradient) and `W` (the
weight gradient), so every action costs about one chunk forward and a tick costs what
the MPMD schedule's step costs (`TickTable.step_time`). At each tick a device looks up
its own action (forward, `B` or `W` of microbatch `i` on virtual chunk `v`, or nothing)
and runs it: each kind under its own conditional, which writes in place only the
buffers that kind changes (`_when`).

- A forward runs the chunk's layers one by one under `jax.vjp` and stores each layer's
  residuals (its activations; not its weights, which stay in the parameters) in the
  microbatch's buffer slot, as Megatron does. On the last chunk it also computes the
  loss and its gradient, which starts the backward.
- `B` runs the layers' input-gradient halves of their pullbacks in reverse, sends the
  result to the previous stage, and keeps in the slot what the weight gradient reuses
  (e.g. the gradient at each hidden pre-activation: `_Layers.split`).
- `W` runs the weight-gradient halves from the stored residuals and what `B` kept,
  without redoing `B`'s matmuls, and frees the slot.

A model that wants less memory checkpoints its layer function (`eqxpar.nn.remat`):
the residuals are then the layers' inputs, recomputed from in `B` and `W`.

Inside an action the chunk's layers are unrolled (`lax.scan(..., unroll=True)`): a loop
over them within each action's conditional, its per-layer outputs stacked into fresh
buffers, cost the 1F1B step about a tenth of its time on XLA:CPU
(`benchmarks/pipeline.py`). The price is compile time that grows with the layers per
chunk.

Collectives over the pipeline axis are at most one `ppermute` forward and one backward
per tick, each over only the stage pairs that carry data at that tick (a `lax.switch`
over the table's `send_pairs`, nothing on ticks where no device receives), and, at the
end, the sums of the loss and of the gradients of the first and last stage's parameters
(held on every stage).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.interpreters import partial_eval as pe  # dce_jaxpr: what a residual reads

from .._collectives import to_varying
from .._shard_map import varying_axes
from ._schedule import AbstractSchedule, Interleaved1F1B, OneFOneB, TickTable

FirstFn = Callable[[Any, Any], jax.Array]
LayerFn = Callable[[Any, jax.Array, Any], jax.Array]
LastFn = Callable[[Any, jax.Array, Any], jax.Array]


def _vary(tree: Any, axes: frozenset | tuple) -> Any:
    axes = tuple(axes)
    return jax.tree.map(lambda x: to_varying(x, axes) if axes else x, tree)


def _zeros(aval: Any, extra: tuple[str, ...] = (), lead: tuple[int, ...] = ()) -> jax.Array:
    """Zeros of `aval`'s shape (after `lead` dims) and dtype, varying where it varies."""
    zeros = jnp.zeros((*lead, *aval.shape), aval.dtype)
    axes = _axes(aval) if isinstance(aval, jax.ShapeDtypeStruct) else set(varying_axes(aval))
    return to_varying(zeros, tuple(sorted(axes | set(extra))))


class _Carry(NamedTuple):
    """What one tick hands the next. Buffers have one slot per microbatch in flight.

    The gradients of the three parameter groups are separate fields so that each
    action's conditional carries only what it writes (see `_when`)."""

    inputs: jax.Array  # (slots, *act): stage inputs that arrived
    grads_in: jax.Array  # (slots, *act): output gradients of the chunk
    residuals: list  # per residual leaf (slots, layers, *leaf): the layers' activations
    saved: Any  # per leaf (slots, layers, *leaf): what each layer's `B` keeps for `W`, or None
    send_f: jax.Array  # the activation this device sends forward at the next tick
    send_b: jax.Array  # the input gradient it sends backward at the next tick
    grad_first: Any  # gradients of the first, stage and last parameters, summed so far
    grad_stage: Any
    grad_last: Any
    loss: jax.Array  # the sum of the last chunk's microbatch losses so far


SCOPE = "eqxpar.pipeline."  # + the action: "F", "B", "W", or "first" / "last" (chunk)


def _when(
    pred: jax.Array, fn: Callable[[_Carry], _Carry], carry: _Carry, writes: tuple, scope: str
) -> _Carry:
    """`fn(carry)` where `pred` holds, else `carry`, updated in place, under the name
    scope `SCOPE + scope` (which `communication_report` counts its collectives by).

    `writes` names the fields `fn` changes; only those go through the conditional, and
    its untaken branch (branch 0) forwards them unchanged. XLA's copy insertion elides
    copies only for that shape of conditional: a field forwarded by the taken branch,
    or a passthrough in another branch position, costs a copy of the whole buffer on
    every tick (openxla/xla#46314). Everything else `fn` reads by closure."""

    def taken(values: tuple) -> tuple:
        with jax.named_scope(SCOPE + scope):
            new = fn(carry._replace(**dict(zip(writes, values, strict=True))))
        fields = [f for f in _Carry._fields if f not in writes]
        changed = [f for f in fields if getattr(new, f) is not getattr(carry, f)]
        if changed:
            raise RuntimeError(
                f"pipeline executor: {fn.__name__} changed {changed}, not in {writes}"
            )
        return tuple(getattr(new, f) for f in writes)

    values = lax.cond(pred, taken, lambda values: values, tuple(getattr(carry, f) for f in writes))
    return carry._replace(**dict(zip(writes, values, strict=True)))


class _Layers:
    """One layer's `jax.vjp`, with its residuals split into what depends on the layer's
    input (its activations: stored per slot) and what depends on its weights alone
    (the weights themselves, their transposes or casts: taken or recomputed from the
    parameters in `B` and `W`, never stored per microbatch)."""

    def __init__(self, layer_fn: LayerFn, w: Any, x: jax.Array, key: Any):
        self.layer_fn = layer_fn
        self.treedef, self.which, self.rebuild = None, None, None
        closed = jax.make_jaxpr(self._residuals)(w, x, key)
        y, residuals = jax.eval_shape(self._residuals, w, x, key)
        if (jnp.shape(y), y.dtype) != (x.shape, x.dtype):
            raise ValueError(
                f"pipeline_loss: a layer must map activations to the same shape and dtype: "
                f"its input is {x.dtype}{list(x.shape)}, it returns {y.dtype}{list(y.shape)}."
            )
        # Which residuals need the input? Dead-code elimination of the forward's jaxpr
        # for each residual says which inputs it reads.
        jaxpr = pe.convert_constvars_jaxpr(closed.jaxpr)
        n_fixed = len(closed.consts) + len(jax.tree.leaves(w))
        n_out = 1 + len(residuals)
        self.weight_only = []
        for j in range(len(residuals)):
            _, used = pe.dce_jaxpr(jaxpr, [k == 1 + j for k in range(n_out)])
            self.weight_only.append(not any(used[n_fixed:]))
        if any(self.weight_only):
            rebuild, used = pe.dce_jaxpr(jaxpr, [False, *self.weight_only])
            self.rebuild = (jax.extend.core.jaxpr_as_fun(jax.extend.core.ClosedJaxpr(rebuild, [])),
                            closed.consts, used[:n_fixed])  # fmt: skip
        self.stored = [r for r, fixed in zip(residuals, self.weight_only, strict=True) if not fixed]

    def _residuals(self, w: Any, x: jax.Array, key: Any) -> tuple[jax.Array, list]:
        """`(y, the residual leaves that are not the weights themselves)`."""
        y, pull = jax.vjp(lambda w, x: self.layer_fn(w, x, key), w, x)
        leaves, treedef = jax.tree.flatten(pull)
        weights = jax.tree.leaves(w)
        which = tuple(next((i for i, q in enumerate(weights) if r is q), -1) for r in leaves)
        if self.treedef is None:
            self.treedef, self.which = treedef, which
        elif which != self.which or treedef.num_leaves != self.treedef.num_leaves:
            raise RuntimeError(
                "pipeline_loss: a layer's residuals changed structure between two traces "
                "of the same layer; the executor cannot store them per slot."
            )
        return y, [r for r, i in zip(leaves, which, strict=True) if i < 0]

    def forward(self, w: Any, x: jax.Array, key: Any) -> tuple[jax.Array, list]:
        """`(y, the residuals to store)`."""
        y, residuals = self._residuals(w, x, key)
        return y, [r for r, fixed in zip(residuals, self.weight_only, strict=True) if not fixed]

    def pullback(self, w: Any, stored: list) -> Callable:
        weights = jax.tree.leaves(w)
        rebuilt = iter(())
        if self.rebuild is not None:
            fn, consts, used = self.rebuild
            args = [a for a, u in zip([*consts, *weights], used, strict=True) if u]
            rebuilt = iter(fn(*args))
        rest = iter(stored)
        residuals = [next(rebuilt) if fixed else next(rest) for fixed in self.weight_only]
        it = iter(residuals)
        leaves = [next(it) if i < 0 else weights[i] for i in self.which]  # pyright: ignore
        return jax.tree.unflatten(self.treedef, leaves)

    def split(self, w: Any, stored: list, dy: jax.Array) -> None:
        """Splits the pullback into `B` (the input gradient) and `W` (the weight
        gradient) so that `W` reuses what `B` computed rather than redoing it.

        Both come from one jaxpr of the pullback, each dead-code eliminated down to
        its outputs. `W` keeps only its equations that do not depend on `dy`
        (recomputing from the residuals and weights is cheap and keeps nothing per
        slot) and those `B` does not run; the values of `B` that depend on `dy` and
        that `W` still reads (e.g. the gradient at a hidden pre-activation, without
        which `W` would redo that matmul) become `B`'s extra outputs, `saved`."""
        closed = jax.make_jaxpr(lambda w, s, dy: self._pull_leaves(w, s, dy))(w, stored, dy)
        full = pe.convert_constvars_jaxpr(closed.jaxpr)
        n_dw = len(full.outvars) - 1
        b, _ = pe.dce_jaxpr(full, [False] * n_dw + [True])
        wj, _ = pe.dce_jaxpr(full, [True] * n_dw + [False])
        on_dy = {full.invars[-1]}  # the values that depend on dy (dy is the last input)
        for eqn in full.eqns:
            if any(isinstance(v, jax.extend.core.Var) and v in on_dy for v in eqn.invars):
                on_dy.update(eqn.outvars)
        in_b = {id(e) for e in b.eqns}
        kept = [e for e in wj.eqns if id(e) not in in_b or not on_dy.issuperset(e.outvars)]
        Var = jax.extend.core.Var
        reads = [
            v for v in (*(v for e in kept for v in e.invars), *wj.outvars) if isinstance(v, Var)
        ]
        made = {v for e in kept for v in e.outvars}
        saved = [v for v in dict.fromkeys(reads) if v in on_dy and v not in made]

        def fun(invars: list, outvars: list, eqns: list) -> Callable:
            info = full.debug_info.with_unknown_names()
            jaxpr = jax.extend.core.Jaxpr([], invars, outvars, eqns, full.effects, info)
            return jax.extend.core.jaxpr_as_fun(jax.extend.core.ClosedJaxpr(jaxpr, []))

        self.consts = closed.consts
        self.w_treedef = jax.tree.structure(w)
        self.b_fn = fun(full.invars, [*b.outvars, *saved], b.eqns)
        self.w_fn = fun([*full.invars[:-1], *saved], wj.outvars, kept)

    def _pull_leaves(self, w: Any, stored: list, dy: jax.Array) -> list:
        dw, dx = self.pullback(w, stored)(dy)
        return [*jax.tree.leaves(dw), dx]

    def input_grad(self, w: Any, stored: list, dy: jax.Array) -> tuple[jax.Array, list]:
        """`B`: `(dx, saved)`, the gradient at the layer's input and what `W` reuses."""
        dx, *saved = self.b_fn(*self.consts, *jax.tree.leaves(w), *stored, dy)
        return dx, saved

    def weight_grad(self, w: Any, stored: list, saved: list) -> Any:
        """`W`: the gradient of the layer's weights, from the residuals and `saved`."""
        return jax.tree.unflatten(
            self.w_treedef, self.w_fn(*self.consts, *jax.tree.leaves(w), *stored, *saved)
        )


class _Ticks:
    """The executor's tick bodies, for one table and one set of (per-shard) arguments.

    `tick` runs one row of the table on this device: it stores what arrived from the
    neighbours, then runs this device's action (`forward`, `input_grad` or
    `weight_grad`, or nothing), each under its own `_when`.
    """

    def __init__(self, fns: tuple, params: tuple, data: tuple, table: TickTable, axis: str):
        first_fn, layer_fn, last_fn = fns
        inputs, targets, key = data
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
        sp = jax.tree.map(
            lambda a: a[:, 0], sp
        )  # (virtual, 1, layers, ...) -> (virtual, layers, ...)
        self.params = (fp, sp, lp)
        self.depth = jax.tree.leaves(sp)[0].shape[1]  # layers per chunk
        self.key = key
        self.inputs, self.targets = _vary((inputs, targets), (axis,))
        x_aval = jax.eval_shape(first_fn, fp, _take(self.inputs, 0))
        self.x_aval = x_aval
        self.act_axes = tuple(sorted(_axes(x_aval) | {axis}))
        w0 = _take(_take(sp, 0), 0)
        k0 = None if key is None else self.chunk_keys({"mb": 0, "virt": 0})[0]
        self.layers = _Layers(layer_fn, w0, self.zero_act(), k0)
        _, stored = jax.eval_shape(self.layers.forward, w0, self.zero_act(), k0)
        stored = [_zeros(r, (axis,)) for r in stored]
        self.layers.split(w0, stored, self.zero_act())
        _, self.saved = jax.eval_shape(self.layers.input_grad, w0, stored, self.zero_act())
        y_aval = jax.ShapeDtypeStruct(x_aval.shape, x_aval.dtype)
        l_aval = jax.eval_shape(last_fn, lp, y_aval, _take(self.targets, 0))
        self.loss_axes = tuple(sorted(_axes(l_aval) | {axis}))
        self.program = {k: jnp.asarray(a) for k, a in table.as_arrays().items()}

    def act(self, x: jax.Array) -> jax.Array:
        return to_varying(x.astype(self.x_aval.dtype), self.act_axes)

    def zero_act(self) -> jax.Array:
        return self.act(jnp.zeros(self.x_aval.shape, self.x_aval.dtype))

    def zero_loss(self) -> jax.Array:
        return to_varying(jnp.zeros((), jnp.float32), self.loss_axes)

    def initial(self, backward: bool) -> _Carry:
        fp, sp, lp = self.params
        slots = (self.table.num_slots,)
        buffer = jnp.broadcast_to(self.zero_act(), (*slots, *self.x_aval.shape))
        gfp, gsp, glp = jax.tree.map(lambda x: _zeros(x), (fp, sp, lp))
        zero, loss = self.zero_act(), self.zero_loss()
        if not backward:
            return _Carry(buffer, buffer, [], None, zero, zero, gfp, gsp, glp, loss)
        residuals = [_zeros(r, (self.axis,), (*slots, self.depth)) for r in self.layers.stored]
        saved = [_zeros(r, (self.axis,), (*slots, self.depth)) for r in self.saved]
        return _Carry(buffer, buffer, residuals, saved, zero, zero, gfp, gsp, glp, loss)

    def chunk_keys(self, row: dict) -> Any:
        """This chunk's layer keys for this microbatch: `split(fold_in(key, mb),
        num_layers)` at the chunk's layers, as gradient accumulation over the same
        microbatches and `scan_layers` give them."""
        if self.key is None:
            return None
        n_layers = self.table.stages * self.table.virtual * self.depth
        keys = jax.random.split(jax.random.fold_in(self.key, row["mb"]), n_layers)
        g = row["virt"] * self.table.stages + self.me
        return lax.dynamic_slice_in_dim(keys, g * self.depth, self.depth)

    def forward(self, carry: _Carry, row: dict, backward: bool) -> _Carry:
        """The chunk's layers in order, keeping their residuals; on the last chunk the
        loss (and its gradient, which starts the backward)."""
        first_fn, layer_fn, _ = self.fns
        fp, sp, _ = self.params
        slot = row["slot"]

        def first() -> jax.Array:
            with jax.named_scope(SCOPE + "first"):
                return self.act(first_fn(fp, _take(self.inputs, row["mb"])))

        x = lax.cond(row["first_chunk"], first, lambda: _read(carry.inputs, slot))

        def layer(x: jax.Array, xs: tuple) -> tuple:
            w, k = xs
            if not backward:
                return self.act(layer_fn(w, x, k)), None
            y, stored = self.layers.forward(w, x, k)
            return self.act(y), [to_varying(r, (self.axis,)) for r in stored]

        xs = (_take(sp, row["virt"]), self.chunk_keys(row))
        y, residuals = lax.scan(layer, x, xs, unroll=True)
        carry = carry._replace(send_f=y)
        if backward:
            stored = [_write(b, slot, r) for b, r in zip(carry.residuals, residuals, strict=True)]
            carry = carry._replace(residuals=stored)

        def head(carry: _Carry) -> _Carry:
            return self.head(carry, y, row, backward)

        writes = ("grads_in", "grad_last", "loss") if backward else ("loss",)
        return _when(row["last_chunk"], head, carry, writes, "last")

    def head(self, carry: _Carry, y: jax.Array, row: dict, backward: bool) -> _Carry:
        """The last chunk's loss of this microbatch; differentiating, also the gradient
        of the mean loss at `y` (stored for this slot's `B`) and of the last params."""
        last_fn, lp = self.fns[2], self.params[2]
        targets = _take(self.targets, row["mb"])
        if not backward:
            return carry._replace(loss=carry.loss + self.loss_of(last_fn(lp, y, targets)))
        loss, (dlp, dy) = jax.value_and_grad(last_fn, argnums=(0, 1))(lp, y, targets)
        scale = 1.0 / self.m
        glp = jax.tree.map(lambda a, d: a + (d * scale).astype(a.dtype), carry.grad_last, dlp)
        grads_in = _write(carry.grads_in, row["slot"], self.act(dy * scale))
        return carry._replace(
            grads_in=grads_in, grad_last=glp, loss=carry.loss + self.loss_of(loss)
        )

    def loss_of(self, loss: jax.Array) -> jax.Array:
        return to_varying(loss.astype(jnp.float32), self.loss_axes)

    def input_grad(self, carry: _Carry, row: dict) -> _Carry:
        """`B`: the layers' pullbacks in reverse, for the input gradient only (sent to the
        previous chunk); stores the gradient at each layer's output for `W`. On chunk 0,
        also the input layers' gradient."""
        first_fn = self.fns[0]
        fp, sp, _ = self.params
        slot = row["slot"]
        stored = [_read(r, slot) for r in carry.residuals]

        def layer(dy: jax.Array, xs: tuple) -> tuple:
            w, res = xs
            dx, saved = self.layers.input_grad(w, res, dy)
            return self.act(dx), saved

        dy = _read(carry.grads_in, slot)
        xs = (_take(sp, row["virt"]), stored)
        dx, saved = lax.scan(layer, dy, xs, reverse=True, unroll=True)
        saved = [_write(b, slot, new) for b, new in zip(carry.saved, saved, strict=True)]
        carry = carry._replace(send_b=dx, saved=saved)

        def first_grad(carry: _Carry) -> _Carry:
            _, pull = jax.vjp(lambda f: self.act(first_fn(f, _take(self.inputs, row["mb"]))), fp)
            (dfp,) = pull(dx)
            gfp = jax.tree.map(lambda a, d: a + d.astype(a.dtype), carry.grad_first, dfp)
            return carry._replace(grad_first=gfp)

        return _when(row["first_chunk"], first_grad, carry, ("grad_first",), "first")

    def weight_grad(self, carry: _Carry, row: dict) -> _Carry:
        """`W`: the layers' pullbacks again, for their weight gradients only."""
        sp = self.params[1]
        slot, virt = row["slot"], row["virt"]
        stored = [_read(r, slot) for r in carry.residuals]
        saved = [_read(b, slot) for b in carry.saved]

        def layer(_: None, xs: tuple) -> tuple:
            w, res, sv = xs
            return None, self.layers.weight_grad(w, res, sv)

        _, dws = lax.scan(layer, None, (_take(sp, virt), stored, saved), unroll=True)
        gsp = jax.tree.map(lambda a, d: a.at[virt].add(d.astype(a.dtype)), carry.grad_stage, dws)
        return carry._replace(grad_stage=gsp)

    def permute(self, index: jax.Array, value: jax.Array, direction: str) -> jax.Array:
        """What arrives from the neighbouring stages at this tick: `value` sent over the
        stage pairs `table.send_pairs(direction)[index]` (zeros on the devices outside
        them). Index 0, the empty set, sends nothing."""

        def send(pairs: tuple) -> Callable[[], jax.Array]:
            return lambda: self.act(lax.ppermute(value, self.axis, list(pairs)))

        sets = self.table.send_pairs(direction)
        return lax.switch(index, [self.zero_act, *(send(x) for x in sets[1:])])

    def tick(self, carry: _Carry, t: jax.Array, backward: bool) -> _Carry:
        """Stores what arrived from the neighbours, then runs this device's action, each
        kind under its own `_when` (at most one of them is taken)."""
        row = {k: a[t, self.me] for k, a in self.program.items() if a.ndim == 2}
        arrived = self.permute(self.program["permute_f"][t], carry.send_f, "F")
        carry = carry._replace(inputs=_store(carry.inputs, row["recv_f"], arrived))
        kind = row["kind"]

        def forward(carry: _Carry) -> _Carry:
            return self.forward(carry, row, backward)

        if not backward:
            return _when(kind == 1, forward, carry, ("send_f", "loss"), "F")
        arrived = self.permute(self.program["permute_b"][t], carry.send_b, "B")
        carry = carry._replace(grads_in=_store(carry.grads_in, row["recv_b"], arrived))

        def input_grad(carry: _Carry) -> _Carry:
            return self.input_grad(carry, row)

        def weight_grad(carry: _Carry) -> _Carry:
            return self.weight_grad(carry, row)

        writes = ("send_f", "residuals", "grads_in", "grad_last", "loss")
        carry = _when(kind == 1, forward, carry, writes, "F")
        carry = _when(kind == 2, input_grad, carry, ("send_b", "saved", "grad_first"), "B")
        return _when(kind == 3, weight_grad, carry, ("grad_stage",), "W")


def _take(tree: Any, i: Any) -> Any:
    return jax.tree.map(lambda a: a[i], tree)


def _read(buffer: jax.Array, slot: Any) -> jax.Array:
    return lax.dynamic_index_in_dim(buffer, slot, keepdims=False)


def _write(buffer: jax.Array, slot: Any, value: jax.Array) -> jax.Array:
    """`buffer[slot] = value`."""
    value = to_varying(value.astype(buffer.dtype), tuple(varying_axes(buffer)))
    return lax.dynamic_update_index_in_dim(buffer, value, slot, 0)


def _store(buffer: jax.Array, slot: Any, value: jax.Array) -> jax.Array:
    """`buffer[slot] = value`, or `buffer` unchanged when `slot` is -1."""
    at = jnp.maximum(slot, 0)
    return _write(buffer, at, jnp.where(slot >= 0, value, _read(buffer, at)))


def _execute(
    fns: tuple,
    params: tuple,
    data: tuple,
    table: TickTable,
    axis: str,
    backward: bool,
) -> tuple[jax.Array, Any]:
    """Runs `table` on this device: the mean loss and (if `backward`) the gradients.
    Differentiating, it runs `table.split()`; the forward alone runs `table`'s forwards."""
    if backward:
        table = table.split()
    ticks = _Ticks(fns, params, data, table, axis)
    final, _ = lax.scan(
        lambda c, t: (ticks.tick(c, t, backward), None),
        ticks.initial(backward),
        jnp.arange(table.num_ticks),
    )
    loss = lax.psum(final.loss, axis) / table.microbatches
    gfp, gsp, glp = final.grad_first, final.grad_stage, final.grad_last
    gfp = jax.tree.map(lambda g: lax.psum(g, axis), gfp)
    glp = jax.tree.map(lambda g: lax.psum(g, axis), glp)
    gsp = jax.tree.map(lambda g: g[:, None], gsp)
    return loss, (gfp, gsp, glp)


def _axes(aval: Any) -> set[str]:
    mat = getattr(aval, "manual_axis_type", None)
    return set() if mat is None else set(mat.varying)


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
    layer_fn: LayerFn,
    last_fn: LastFn,
    first_params: Any,
    stage_params: Any,
    last_params: Any,
    inputs: Any,
    targets: Any,
    *,
    table: TickTable,
    axis_name: str = "pipeline",
    key: Any = None,
) -> jax.Array:
    """The mean loss over `m` microbatches, run through the pipeline by `table`.

    Per-shard code: call it inside `eqxpar.filter_shard_map` with the pipeline axis
    bound. Differentiable: its gradient was computed alongside the loss by the
    schedule's backward actions (a `custom_vjp`, running `table.split()`), so
    `jax.grad` of a loss built on it costs one schedule, not two.

    **Arguments:**

    - `first_fn(first_params, inputs_mb) -> x`: the input layers (e.g. the embedding),
      run only by the stage holding chunk 0.
    - `layer_fn(layer_params, x, key) -> x`: one layer; activations keep their shape.
      `key` is that layer's PRNG key (`None` without `key`). Checkpoint it
      (`eqxpar.nn.remat`) to store less and recompute in the backward.
    - `last_fn(last_params, x, targets_mb) -> scalar`: the output layers and the loss
      of one microbatch, run only by the stage holding the last chunk.
    - `first_params`, `last_params`: replicated over the pipeline axis.
    - `stage_params`: this device's layers, with leading dims `(virtual, 1, layers)`:
      globally `(virtual, stages, layers, ...)` with the stage dim split over
      `axis_name`. Chunk `v * stages + s` lives on stage `s` (Megatron's interleaved
      layout) and holds `layers` layers, run in order.
    - `inputs`, `targets`: pytrees whose arrays have a leading microbatch dim `m`.
    - `table`: the schedule's `TickTable` for `stages` = the axis size, `m`.
    - `axis_name`: the pipeline mesh axis.
    - `key`: a PRNG key for the layers (e.g. dropout), or `None`. Microbatch `i` gets
      `jax.random.fold_in(key, i)`, split into one key per global layer in layer order
      (`jax.random.split(..., num_layers)`, as `eqxpar.nn.scan_layers` does): the keys
      of gradient accumulation over the same microbatches
      (`eqxpar.train.make_train_step(accumulation_steps=m)`).

    **Returns:**

    The mean of `last_fn` over the microbatches, identical on every stage.
    """
    (fp, sp, lp), static = eqx.partition((first_params, stage_params, last_params), eqx.is_array)
    fns = _with_static(first_fn, layer_fn, last_fn, static)
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
    def loss_of(fp: Any, sp: Any, lp: Any, data: tuple) -> jax.Array:
        return run((fp, sp, lp), data, backward=False)[0]

    def fwd(fp, sp, lp, data):
        loss, grads = run((fp, sp, lp), data, backward=True)
        return loss, (grads, (fp, sp, lp), jax.tree.map(_zero_cotangent, data))

    def bwd(res, ct):
        grads, primals, zeros = res
        grads = jax.tree.map(lambda g, x: _match(g * ct.astype(g.dtype), x), grads, primals)
        return (*grads, zeros)

    loss_of.defvjp(fwd, bwd)
    return loss_of(fp, sp, lp, (inputs, targets, key))


def _check_stage_params(sp: Any, table: TickTable, axis: str) -> None:
    """This device's layers must be `(table.virtual, 1, layers, ...)`: as many chunks
    per stage as the table runs, the stage dim split over the pipeline axis, the same
    number of layers in every leaf."""
    depths = set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(sp):
        shape = tuple(leaf.shape)
        where = f"stage_params{jax.tree_util.keystr(path)}"
        if len(shape) < 3 or shape[0] != table.virtual:
            raise ValueError(
                f"pipeline_loss: {where} has shape {shape} on this device, so it holds "
                f"{shape[0] if shape else 0} chunks per stage, but the table runs "
                f"virtual={table.virtual} chunks per stage. Build the table with a schedule "
                f"for that many chunks (Interleaved1F1B(virtual) for virtual > 1, OneFOneB() "
                f"or GPipe() for 1), or stack the stage parameters as "
                f"(virtual, stages, layers, ...)."
            )
        if shape[1] != 1:
            raise ValueError(
                f"pipeline_loss: {where} has shape {shape} on this device: its stage dim "
                f"(dim 1) holds {shape[1]} stages, but each device must hold only its own. "
                f"Split dim 1 over mesh axis {axis!r} (pass the module with its declared "
                f"specs, in_specs=None in eqxpar.filter_shard_map)."
            )
        depths.add(shape[2])
    if len(depths) > 1:
        raise ValueError(
            f"pipeline_loss: the stage parameters hold different numbers of layers per "
            f"chunk (dim 2: {sorted(depths)}); stack every layer array as "
            f"(virtual, stages, layers, ...)."
        )


def batch_pipeline_loss(
    fns: tuple[FirstFn, LayerFn, LastFn],
    params: tuple[Any, Any, Any],
    inputs: Any,
    targets: Any,
    *,
    stages: int,
    virtual: int,
    microbatches: int,
    schedule: AbstractSchedule | None = None,
    axis_name: str = "pipeline",
    key: Any = None,
) -> jax.Array:
    """`pipeline_loss` of a whole batch: split into microbatches, default schedule.

    The one path from a model's `loss` to the executor (`Transformer.loss` and
    `PPClassifier.loss` both call it). Per-shard code, with `axis_name` bound.

    **Arguments:**

    - `fns`: `(first_fn, layer_fn, last_fn)`, as for `pipeline_loss`.
    - `params`: `(first_params, stage_params, last_params)`, as for `pipeline_loss`;
      `stage_params` stacked `(virtual, stages, layers, ...)` globally.
    - `inputs`, `targets`: pytrees of this device's batch, leading dim the batch.
    - `stages`, `virtual`: the model's pipeline stages and chunks per stage (its
      configuration, not read from shapes): `stages` must be the size of
      `axis_name`; `virtual` picks the default schedule and is checked against it.
    - `microbatches`: how many equal microbatches to split the batch into.
    - `schedule`: an `AbstractSchedule`; default `OneFOneB()`, or
      `Interleaved1F1B(virtual)` when `virtual > 1`.
    - `axis_name`: the pipeline mesh axis.
    - `key`: the layers' PRNG key, as for `pipeline_loss`.

    **Returns:**

    The mean loss over the batch, identical on every stage.
    """
    if schedule is None:
        schedule = OneFOneB() if virtual == 1 else Interleaved1F1B(virtual)
    table = schedule.table(stages, microbatches)
    if table.virtual != virtual:
        fits = (
            "OneFOneB(), GPipe() or ZeroBubbleH1()"
            if virtual == 1
            else f"Interleaved1F1B({virtual})"
        )
        raise ValueError(
            f"batch_pipeline_loss: the schedule {schedule} runs {table.virtual} chunk(s) per "
            f"stage but the model has virtual={virtual}; use "
            f"{fits}."
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
    return pipeline_loss(*fns, *params, inputs, targets, table=table, axis_name=axis_name, key=key)


def _with_static(first_fn: FirstFn, layer_fn: LayerFn, last_fn: LastFn, static: tuple):
    """The three functions taking only the array parts of their parameters (modules'
    functions and other non-array leaves are put back from `static`)."""
    fs, ss, ls = static

    def layer(w: Any, x: jax.Array, key: Any) -> jax.Array:
        # `w` is one layer: the stacked (virtual, stage, layer) dims are indexed away,
        # so the static part's structure (that of the whole stack) still fits.
        return layer_fn(eqx.combine(w, ss), x, key)

    return (
        lambda f, x: first_fn(eqx.combine(f, fs), x),
        layer,
        lambda lp, y, t: last_fn(eqx.combine(lp, ls), y, t),
    )


def _zero_cotangent(x: jax.Array) -> Any:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)
