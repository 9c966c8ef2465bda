"""Context parallelism: attention over a sequence split along a mesh axis.

One kernel does all the work: blockwise attention with an online (log-sum-exp)
softmax (Milakov & Gimelshein 2018; FlashAttention), with a hand-written backward
that recomputes each block's probabilities from the saved log-sum-exp, so memory
grows with the block, never with `seq^2`. Blocks lying wholly above the causal
diagonal are skipped (`lax.cond`).

- On one device (or outside `shard_map`) it is `blockwise_attention`.
- `ring_attention(strategy="ring")` (Liu et al. 2023): each device keeps its queries;
  K/V shards travel round a ring of `ppermute`s over the context axis, `c - 1` sends
  forward; the backward pass runs the ring again with K/V and their gradients
  travelling (`c - 1` sends of K/V, `c` of dK/dV, which end at their owner).
- `ring_attention(strategy="all_gather")` (MaxText's default): all-gather K/V over the
  context axis, attend locally; the backward pass reduce-scatters dK/dV.

Layouts (`context_order`): `"contiguous"` gives device `i` tokens
`[i*s/c, (i+1)*s/c)`, so with causal masking the last device does `c` times the
first one's work. `"load_balanced"` (Megatron-Core, MaxText's dual-chunk swap) cuts
the sequence into `2c` chunks and gives device `i` chunks `i` and `2c-1-i`: every
device then computes the same number of blocks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from .._collectives import shard_count, shard_index, to_varying
from .._shard_map import varying_axes
from .._typecheck import typechecked

Layout = Literal["load_balanced", "contiguous"]
ContextStrategy = Literal["ring", "all_gather"]
LAYOUTS: tuple[str, ...] = ("load_balanced", "contiguous")
STRATEGIES: tuple[str, ...] = ("ring", "all_gather")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; use one of {LAYOUTS}.")


def chunks_per_device(context_size: int, layout: Layout) -> int:
    """How many contiguous chunks of the sequence each device holds: 2 in the
    load-balanced layout (over more than one device), else 1."""
    _check_layout(layout)
    return 2 if layout == "load_balanced" and context_size > 1 else 1


def check_context_split(seq_len: int, context_size: int, layout: Layout, *, what: str) -> None:
    """Raises unless a sequence of `seq_len` splits into this layout's chunks."""
    parts = context_size * chunks_per_device(context_size, layout)
    if seq_len % parts:
        raise ValueError(
            f"{what}: sequence length {seq_len} does not split into {parts} chunks "
            f"({layout} layout over context={context_size}); use a multiple of {parts}."
        )


def shard_positions(
    shard_len: int, *, index: Array | int, context_size: int, layout: Layout
) -> Array | np.ndarray:
    """Global token positions `(shard_len,)` of device `index`'s sequence shard (a
    NumPy array for a Python `index`, so static positions stay constants)."""
    xp = np if isinstance(index, int) else jnp
    if chunks_per_device(context_size, layout) == 1:
        return index * shard_len + xp.arange(shard_len, dtype=np.int32)
    n = shard_len // 2
    first = index * n + xp.arange(n, dtype=np.int32)
    second = (2 * context_size - 1 - index) * n + xp.arange(n, dtype=np.int32)
    return xp.concatenate([first, second])


def context_order(
    seq_len: int, context_size: int, *, layout: Layout = "load_balanced", inverse: bool = False
) -> np.ndarray:
    """The permutation that puts a global sequence into a context layout.

    `tokens[:, context_order(s, c)]` is what to split over `"context"` (dim 1) so
    that device `i` holds the tokens the layout gives it; `outputs[:, context_order(s,
    c, inverse=True)]` puts per-token outputs gathered in that layout back in sequence
    order. `"contiguous"` is the identity. Positions (RoPE, dropout masks) stay those
    of the original tokens: the layers compute them from the layout.
    """
    check_context_split(seq_len, context_size, layout, what="context_order")
    shard = seq_len // context_size
    order = np.concatenate(
        [
            np.asarray(shard_positions(shard, index=i, context_size=context_size, layout=layout))
            for i in range(context_size)
        ]
    )
    return np.argsort(order) if inverse else order


def _block(chunk: int, block_size: int) -> int:
    """The largest divisor of `chunk` not above `block_size` (blocks never straddle a
    layout chunk, so each block's positions are one contiguous range)."""
    return max(d for d in range(1, min(chunk, block_size) + 1) if chunk % d == 0)


def _visible(q_pos: Array | np.ndarray, k_pos: Array | np.ndarray) -> Array | np.bool_:
    """Whether any query of a block sees any key of a block under causal masking
    (each block's positions are one increasing contiguous range)."""
    return k_pos[0] <= q_pos[-1]


def attention_blocks(
    seq_len: int,
    context_size: int,
    *,
    layout: Layout = "load_balanced",
    block_size: int = 512,
    causal: bool = True,
) -> list[int]:
    """The number of `(query block, key block)` pairs each device computes in
    `ring_attention` (the same rule the kernel uses to skip blocks): equal across
    devices in the load-balanced layout, growing with the device index in the
    contiguous one."""
    check_context_split(seq_len, context_size, layout, what="attention_blocks")
    shard = seq_len // context_size
    block = _block(shard // chunks_per_device(context_size, layout), block_size)
    pos = [
        np.asarray(shard_positions(shard, index=i, context_size=context_size, layout=layout))
        for i in range(context_size)
    ]
    q_blocks = [p.reshape(-1, block) for p in pos]
    return [
        sum(
            bool(not causal or _visible(qb, kb))
            for qb in q_blocks[i]
            for j in range(context_size)
            for kb in q_blocks[j]
        )
        for i in range(context_size)
    ]


# ---------------------------------------------------------------------------------------
# The kernel. Shapes: q (b, sq, kv, g, d); k, v (b, sk, kv, d); q_pos (sq,), k_pos (sk,);
# softmax statistics (b, kv, g, sq) in float32.


@dataclasses.dataclass(frozen=True)
class _Kernel:
    """Static settings of one attention call: causal masking, the block size, the
    score scale `1/sqrt(head_dim)`."""

    causal: bool
    block: int
    scale: float

    def pairs(self, sq: int, sk: int) -> tuple[int, int]:
        return sq // self.block, sk // self.block

    def _slice(self, x: Array, i: Array, axis: int) -> Array:
        return lax.dynamic_slice_in_dim(x, i * self.block, self.block, axis)

    def _scores(self, q, k, q_pos, k_pos):
        s = jnp.einsum("bqkgd,btkd->bkgqt", q, k, preferred_element_type=jnp.float32)
        s = s * self.scale
        if not self.causal:
            return s, None
        mask = k_pos[None, :] <= q_pos[:, None]
        return jnp.where(mask, s, -jnp.inf), mask

    def _over_pairs(self, carry, sq: int, sk: int, q_pos, k_pos, compute):
        """Runs `compute(carry, i, j)` for every visible (query block i, key block j)."""
        nq, nk = self.pairs(sq, sk)

        def step(carry, ij):
            i, j = ij // nk, ij % nk
            if not self.causal:
                return compute(carry, i, j), None
            seen = _visible(self._slice(q_pos, i, 0), self._slice(k_pos, j, 0))
            return lax.cond(seen, lambda c: compute(c, i, j), lambda c: c, carry), None

        if nq * nk == 1:  # one block, on the diagonal: always computed
            zero = jnp.zeros((), jnp.int32)
            return compute(carry, zero, zero)
        return lax.scan(step, carry, jnp.arange(nq * nk))[0]

    def forward(self, q, k, v, q_pos, k_pos, stats):
        """Adds the key/value shard `(k, v)` to the running `(acc, m, l)` of `q`."""

        def compute(stats, i, j):
            acc, m, norm = stats
            qb, kb, vb = self._slice(q, i, 1), self._slice(k, j, 1), self._slice(v, j, 1)
            s, _ = self._scores(qb, kb, self._slice(q_pos, i, 0), self._slice(k_pos, j, 0))
            mi, li, ai = self._slice(m, i, 3), self._slice(norm, i, 3), self._slice(acc, i, 1)
            m_new = jnp.maximum(mi, jnp.max(s, axis=-1))
            safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - safe[..., None])
            corr = jnp.exp(mi - safe)
            l_new = li * corr + jnp.sum(p, axis=-1)
            pv = jnp.einsum(
                "bkgqt,btkd->bqkgd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32
            )
            a_new = ai * jnp.moveaxis(corr, 3, 1)[..., None] + pv
            at = lax.dynamic_update_slice_in_dim
            b = self.block
            return (at(acc, a_new, i * b, 1), at(m, m_new, i * b, 3), at(norm, l_new, i * b, 3))

        return self._over_pairs(stats, q.shape[1], k.shape[1], q_pos, k_pos, compute)

    def backward(self, q, k, v, q_pos, k_pos, do, lse, delta, grads):
        """Adds this key/value shard's part of `(dq, dk, dv)`."""

        def compute(grads, i, j):
            dq, dk, dv = grads
            qb, kb, vb = self._slice(q, i, 1), self._slice(k, j, 1), self._slice(v, j, 1)
            dob = self._slice(do, i, 1)
            s, mask = self._scores(qb, kb, self._slice(q_pos, i, 0), self._slice(k_pos, j, 0))
            p = jnp.exp(s - self._slice(lse, i, 3)[..., None])
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            f32 = dict(preferred_element_type=jnp.float32)
            dv_j = jnp.einsum("bkgqt,bqkgd->btkd", p.astype(do.dtype), dob, **f32)
            dp = jnp.einsum("bqkgd,btkd->bkgqt", dob, vb, **f32)
            ds = p * (dp - self._slice(delta, i, 3)[..., None]) * self.scale
            dq_i = jnp.einsum("bkgqt,btkd->bqkgd", ds.astype(kb.dtype), kb, **f32)
            dk_j = jnp.einsum("bkgqt,bqkgd->btkd", ds.astype(qb.dtype), qb, **f32)
            b = self.block

            def add(x, part, idx):
                at = lax.dynamic_update_slice_in_dim
                return at(x, lax.dynamic_slice_in_dim(x, idx * b, b, 1) + part, idx * b, 1)

            return add(dq, dq_i, i), add(dk, dk_j, j), add(dv, dv_j, j)

        return self._over_pairs(grads, q.shape[1], k.shape[1], q_pos, k_pos, compute)


def _ring_perm(c: int) -> list[tuple[int, int]]:
    return [(i, (i + 1) % c) for i in range(c)]


def _varying_zeros(shape, like: tuple[Array, ...]) -> Array:
    axes = tuple(sorted(set().union(*(varying_axes(x) for x in like))))
    return to_varying(jnp.zeros(shape, jnp.float32), axes) if axes else jnp.zeros(shape)


def _tie(q: Array, q_pos: Array, k_pos_all: Array) -> tuple[Array, Array, Array]:
    """Ties the positions to `q` (an optimization barrier), so that inside a scan over
    layers JAX does not hoist the position-only part of the block loop (each block's
    causal mask) out of the layer loop and store it for every block: `heads * s^2`
    memory, the very thing the kernel avoids."""
    return lax.optimization_barrier((q, q_pos, k_pos_all))


def _attend_fwd(kernel, axis, q, k, v, q_pos, k_pos_all):
    """Forward over every key/value shard; `k_pos_all[j]`: positions of device j's keys
    (one row when nothing travels). Returns the output and the log-sum-exp."""
    q, q_pos, k_pos_all = _tie(q, q_pos, k_pos_all)
    b, sq, kvh, g, d = q.shape
    c = k_pos_all.shape[0]
    idx = shard_index(axis) if c > 1 else 0
    like = (q, k, v, q_pos)
    stats = (
        _varying_zeros((b, sq, kvh, g, d), like),
        _varying_zeros((b, kvh, g, sq), like) - jnp.inf,
        _varying_zeros((b, kvh, g, sq), like),
    )

    def visit(stats, k, v, t):
        return kernel.forward(q, k, v, q_pos, k_pos_all[(idx - t) % c], stats)

    def hop(carry, t):
        stats, k, v = carry
        stats = visit(stats, k, v, t)
        k, v = lax.ppermute((k, v), axis, _ring_perm(c))
        return (stats, k, v), None

    if c > 1:
        (stats, k, v), _ = lax.scan(hop, (stats, k, v), jnp.arange(c - 1))
    acc, m, norm = visit(stats, k, v, c - 1)
    out = acc / jnp.moveaxis(norm, 3, 1)[..., None]
    return out.astype(q.dtype), m + jnp.log(norm)


def _attend_bwd(kernel, axis, q, k, v, q_pos, k_pos_all, out, lse, do):
    q, q_pos, k_pos_all = _tie(q, q_pos, k_pos_all)
    c = k_pos_all.shape[0]
    idx = shard_index(axis) if c > 1 else 0
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", do.astype(jnp.float32), out.astype(jnp.float32))
    like = (q, k, v, q_pos, do)
    grads = (
        _varying_zeros(q.shape, like),
        _varying_zeros(k.shape, like),
        _varying_zeros(v.shape, like),
    )

    def visit(grads, k, v, t):
        return kernel.backward(q, k, v, q_pos, k_pos_all[(idx - t) % c], do, lse, delta, grads)

    def hop(carry, t):
        (dq, dk, dv), k, v = carry
        dq, dk, dv = visit((dq, dk, dv), k, v, t)
        k, v, dk, dv = lax.ppermute((k, v, dk, dv), axis, _ring_perm(c))
        return ((dq, dk, dv), k, v), None

    if c > 1:
        (grads, k, v), _ = lax.scan(hop, (grads, k, v), jnp.arange(c - 1))
    dq, dk, dv = visit(grads, k, v, c - 1)
    if c > 1:  # the last hop brings each shard's key/value gradients home
        dk, dv = lax.ppermute((dk, dv), axis, _ring_perm(c))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _attend_primal(kernel, axis, q, k, v, q_pos, k_pos_all):
    return _attend_fwd(kernel, axis, q, k, v, q_pos, k_pos_all)[0]


def _attend_vjp_fwd(kernel, axis, q, k, v, q_pos, k_pos_all):
    out, lse = _attend_fwd(kernel, axis, q, k, v, q_pos, k_pos_all)
    return out, (q, k, v, q_pos, k_pos_all, out, lse)


def _attend_vjp_bwd(kernel, axis, res, do):
    q, k, v, q_pos, k_pos_all, out, lse = res
    dq, dk, dv = _attend_bwd(kernel, axis, q, k, v, q_pos, k_pos_all, out, lse, do)
    return dq, dk, dv, None, None


_attend = jax.custom_vjp(_attend_primal, nondiff_argnums=(0, 1))
_attend.defvjp(_attend_vjp_fwd, _attend_vjp_bwd)


def _grouped(q: Array, k: Array, v: Array, what: str) -> Array:
    b, s, h, d = q.shape
    kvh = k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or h % kvh:
        raise ValueError(
            f"{what}: q {q.shape}, k {k.shape}, v {v.shape}: want q (batch, seq, heads, "
            f"head_dim) and k, v (batch, seq, kv_heads, head_dim) with kv_heads dividing heads."
        )
    return q.reshape(b, s, kvh, h // kvh, d)


@typechecked
def blockwise_attention(
    q: Float[Array, "batch seq heads head_dim"],
    k: Float[Array, "batch seq kv_heads head_dim"],
    v: Float[Array, "batch seq kv_heads head_dim"],
    *,
    causal: bool = True,
    positions: Array | None = None,
    block_size: int = 512,
) -> Float[Array, "batch seq heads head_dim"]:
    """Scaled dot-product attention, `block_size` x `block_size` scores at a time with
    an online softmax, and a backward pass that recomputes them: memory grows with
    the sequence, not its square. Grouped-query attention when `kv_heads < heads`
    (query head `h` uses KV head `h // (heads / kv_heads)`).

    `positions` (`(seq,)`, default `arange(seq)`): the tokens' positions for causal
    masking, for a sequence held out of order; each `block_size` run of them must be
    one increasing contiguous range (skipping relies on it).
    """
    qg = _grouped(q, k, v, "blockwise_attention")
    s = q.shape[1]
    pos = np.arange(s, dtype=np.int32) if positions is None else positions
    kernel = _Kernel(causal=causal, block=_block(s, block_size), scale=1 / math.sqrt(q.shape[3]))
    out = _attend(kernel, None, qg, k, v, jnp.asarray(pos), jnp.asarray(pos)[None])
    return out.reshape(q.shape)


@typechecked
def ring_attention(
    q: Float[Array, "batch seq_shard heads head_dim"],
    k: Float[Array, "batch seq_shard kv_heads head_dim"],
    v: Float[Array, "batch seq_shard kv_heads head_dim"],
    *,
    axis_name: str = "context",
    causal: bool = True,
    layout: Layout = "load_balanced",
    strategy: ContextStrategy = "ring",
    block_size: int = 512,
) -> Float[Array, "batch seq_shard heads head_dim"]:
    """Causal (or full) attention of a sequence split over the mesh axis `axis_name`.

    Per-shard `q: (batch, seq_shard, heads, head_dim)`, `k, v: (batch, seq_shard,
    kv_heads, head_dim)` in the `layout` of `context_order` (`"load_balanced"`:
    device `i` holds chunks `i` and `2c-1-i` of `2c`; `"contiguous"`: block `i`).

    - `strategy="ring"`: K/V shards travel round a ring of `ppermute`s (`c - 1` sends
      forward); each device accumulates its queries' attention with an online
      softmax, skipping blocks wholly above the causal diagonal; the backward pass
      runs the ring again with dK/dV travelling. Memory per device grows with
      `seq / c`.
    - `strategy="all_gather"`: all-gather K/V (MaxText's default), attend locally;
      dK/dV are reduce-scattered backward. K/V memory grows with `seq`.

    Outside `shard_map` (axis not bound) it is exact attention over the whole
    sequence in order (`blockwise_attention`).
    """
    _check_layout(layout)
    if strategy not in STRATEGIES:
        raise ValueError(f"ring_attention: strategy={strategy!r}; use one of {STRATEGIES}.")
    c = shard_count(axis_name)
    if c == 1:
        return blockwise_attention(q, k, v, causal=causal, block_size=block_size)
    qg = _grouped(q, k, v, "ring_attention")
    shard = q.shape[1]
    check_context_split(shard * c, c, layout, what=f"ring_attention over {axis_name!r}")
    block = _block(shard // chunks_per_device(c, layout), block_size)
    kernel = _Kernel(causal=causal, block=block, scale=1 / math.sqrt(q.shape[3]))
    k_pos_all = jnp.asarray(
        np.stack([shard_positions(shard, index=j, context_size=c, layout=layout) for j in range(c)])
    )
    q_pos = shard_positions(shard, index=shard_index(axis_name), context_size=c, layout=layout)
    if strategy == "ring":
        out = _attend(kernel, axis_name, qg, k, v, q_pos, k_pos_all)
    else:
        k_all = lax.all_gather(k, axis_name, axis=1, tiled=True)
        v_all = lax.all_gather(v, axis_name, axis=1, tiled=True)
        out = _attend(kernel, None, qg, k_all, v_all, q_pos, k_pos_all.reshape(1, -1))
    return out.reshape(q.shape)


def token_positions(
    length: int,
    *,
    context_axis: str | None = None,
    layout: Layout = "load_balanced",
    sequence_axis: str | None = None,
) -> Array:
    """Global positions `(length,)` of the tokens this device holds along dim 1.

    The sequence is split over `context_axis` in `layout` (when that axis is bound),
    and within a context shard over `sequence_axis` in contiguous blocks (Megatron
    sequence parallelism over the tensor axis). Outside `shard_map`: `arange(length)`.
    """
    t = shard_count(sequence_axis) if sequence_axis is not None else 1
    c = shard_count(context_axis) if context_axis is not None else 1
    index = shard_index(context_axis) if c > 1 else 0
    check_context_split(length * t * c, c, layout, what=f"the sequence split over {context_axis!r}")
    pos = jnp.asarray(shard_positions(length * t, index=index, context_size=c, layout=layout))
    if t == 1:
        return pos
    return lax.dynamic_slice_in_dim(pos, shard_index(sequence_axis) * length, length)
