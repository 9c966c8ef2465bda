"""Column- and row-parallel linear layers (Megatron-LM's tensor parallelism)."""

from __future__ import annotations

from typing import Any, Literal

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from .._collectives import (
    all_gather_matmul,
    copy_to_region,
    gather_from_region,
    gather_from_sequence,
    matmul_reduce_scatter,
    reduce_from_region,
    reduce_scatter_to_sequence,
    scatter_to_region,
    shard_count,
)
from .._sharding import sharded
from .._typecheck import check_shard, typechecked
from ._common import (
    check_collective_matmul,
    check_divisible,
    default_float,
    local_param,
    regather_in_backward,
    tp_block,
    uniform_init,
)

CollectiveMatmul = Literal["unidirectional", "bidirectional"] | None


def _rowvec(bias: jax.Array, ndim: int) -> jax.Array:
    """The bias shaped `(1, ..., 1, out)` to add to a rank-`ndim` output (no rank promotion,
    and no batch-sized bias gradient)."""
    return bias.reshape((1,) * (ndim - 1) + bias.shape)


def linear_matmul(x: Array, weight: Array) -> Array:
    """`x @ weight.T` as one `dot_general` contracting `x`'s last dim with `weight`'s
    dim 1, with no `transpose` of the weight in the jaxpr.

    Inside `shard_map` the weight is invariant over the data axes, so JAX inserts a
    `pvary` where it meets the data-varying `x`, and the backward pass a `psum` where
    the pvary was. With `x @ weight.T` that is after the transpose, so the weight
    gradient's dot and its transpose end up on either side of the data all-reduce; XLA
    cannot fold the transpose into the dot, and XLA:CPU runs a dot with a transposed
    left operand (no YNNPACK) plus a transposing copy. Contracting `weight` in place
    keeps the gradient's dot in one piece before the all-reduce.
    """
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    return jax.lax.dot_general(x, weight, dims)


def _init(in_features: int, out_features: int, use_bias: bool, dtype: Any, key: PRNGKeyArray):
    dtype = default_float(dtype)
    wkey, bkey = jax.random.split(key, 2)
    weight = uniform_init(wkey, (out_features, in_features), dtype, in_features)
    bias = uniform_init(bkey, (out_features,), dtype, in_features) if use_bias else None
    return weight, bias


def column_parallel_matmul(
    x: Array,
    weight: Array,
    *,
    axis_name: str | None,
    sequence_parallel: bool = False,
    collective_matmul: CollectiveMatmul = None,
) -> Array:
    """`x @ weight.T` with `weight` this device's block of output rows (no bias).

    The core of `ColumnParallelLinear`, also used where a weight is shared, as in a
    language-model head tied to the embedding table.

    **Arguments:**

    - `x`: `(*batch, in)`, replicated over `axis_name`; with `sequence_parallel`,
      `(*batch, seq_shard, in)`.
    - `weight`: per-shard `(out_shard, in)`.
    - `axis_name`: the mesh axis the rows are split over.
    - `sequence_parallel`: all-gather `x` along the sequence dim (-2) first.
    - `collective_matmul`: overlap that all-gather with the matmul (needs
      `sequence_parallel`).

    **Returns:**

    Per-shard `(*batch, out_shard)` (sequence dim whole). Forward: no collective, or
    the sequence all-gather; backward: all-reduce (or reduce-scatter) of the input
    gradient.
    """
    if sequence_parallel and x.ndim < 2:
        raise ValueError("sequence_parallel needs (*batch, seq, in) input.")
    if collective_matmul is not None:
        return all_gather_matmul(x, weight, axis_name, dim=-2, direction=collective_matmul)
    if sequence_parallel:
        return linear_matmul(gather_from_sequence(x, axis_name, dim=-2), weight)
    return linear_matmul(copy_to_region(x, axis_name), weight)


class ColumnParallelLinear(eqx.Module):
    """`y = x W^T + b` with the rows of `W` (the output features) split over an axis.

    Megatron's first half of an MLP or attention block: the input is replicated, each
    device computes its own block of output features, and no communication happens in
    the forward pass (Megatron's f: all-reduce of the input gradient backward).

    With `sequence_parallel=True` the input arrives split along the sequence (its
    second-to-last dim) and is all-gathered first; backward, the input gradient is
    reduce-scattered. `collective_matmul` overlaps that all-gather with the matmul as a
    ring of collective-permutes.

    Outside `shard_map` it is exactly `eqx.nn.Linear` (on any leading batch dims), and
    the same key gives the same weights as `eqx.nn.Linear`.
    """

    weight: Float[Array, "out_features in_features"] = eqx.field(
        metadata=sharded("axis_name", None, gathers_on_use=True)
    )
    bias: Float[Array, " out_features"] | None = eqx.field(
        metadata=sharded("axis_name", gathers_on_use=True)
    )
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    gather_output: bool = eqx.field(static=True)
    sequence_parallel: bool = eqx.field(static=True)
    collective_matmul: CollectiveMatmul = eqx.field(static=True)
    axis_name: str = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        collective_matmul: CollectiveMatmul = None,
        axis_name: str = "tensor",
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_features`: global input size.
        - `out_features`: global output size; split over `axis_name`.
        - `use_bias`: whether to add a bias (split like the output features).
        - `gather_output`: all-gather the output features, so every device returns the
          whole `(*batch, out_features)`. Default: return the per-shard block.
        - `sequence_parallel`: the input is split along its sequence dim (-2).
        - `collective_matmul`: `None`, `"unidirectional"` or `"bidirectional"`; needs
          `sequence_parallel`. The weights are the same whatever this is.
        - `axis_name`: the mesh axis to split over.
        - `dtype`: parameter dtype (default f32).
        - `key`: PRNG key for initialisation.
        """
        self.weight, self.bias = _init(in_features, out_features, use_bias, dtype, key)
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.collective_matmul = collective_matmul
        self.axis_name = axis_name

    def __check_init__(self):
        check_collective_matmul(
            "ColumnParallelLinear", self.collective_matmul, self.sequence_parallel
        )
        check_divisible("ColumnParallelLinear", "out_features", self.out_features, self.axis_name)

    @typechecked
    def __call__(self, x: Float[Array, "*batch in_features"]) -> Float[Array, "... out"]:
        """**Arguments:**

        - `x`: per-shard input `(*batch, in_features)`, replicated over `axis_name`; with
          `sequence_parallel`, `(*batch, seq_shard, in_features)`.

        **Returns:**

        Per-shard `(*batch, out_shard)`, `out_shard = out_features / t`; with
        `gather_output`, `(*batch, out_features)`; with `sequence_parallel`, the sequence
        dim is whole (`seq = seq_shard * t`).
        """
        name = "ColumnParallelLinear"
        with jax.named_scope(f"eqxpar.{name}"):
            axis = self.axis_name
            check_shard(name, "in_features", x.shape[-1], self.in_features, axis, 1)
            out = tp_block(self.out_features, axis)
            block = (out, self.in_features)
            y = regather_in_backward(
                lambda w, x: column_parallel_matmul(
                    x,
                    local_param(name, "weight", w, block),
                    axis_name=axis,
                    sequence_parallel=self.sequence_parallel,
                    collective_matmul=self.collective_matmul,
                ),
                self.weight,
                x,
            )
            if self.bias is not None:
                y = y + _rowvec(local_param(name, "bias", self.bias, (out,)), y.ndim)
            if self.gather_output:
                y = gather_from_region(y, axis)
            return y


class RowParallelLinear(eqx.Module):
    """`y = x W^T + b` with the columns of `W` (the input features) split over an axis.

    Megatron's second half of an MLP or attention block: each device multiplies its
    block of input features and the partial results are summed with one all-reduce
    (Megatron's g; identity backward). The bias is added once, after the reduction.

    With `sequence_parallel=True` the all-reduce becomes a reduce-scatter along the
    sequence dim (-2), and the output stays split along the sequence; the bias gradient
    is then summed over the sequence shards. `collective_matmul` overlaps that
    reduce-scatter with the matmul as a ring of collective-permutes.

    Outside `shard_map` it is exactly `eqx.nn.Linear`.
    """

    weight: Float[Array, "out_features in_features"] = eqx.field(
        metadata=sharded(None, "axis_name", gathers_on_use=True)
    )
    bias: Float[Array, " out_features"] | None = eqx.field(metadata=sharded(gathers_on_use=True))
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    input_is_parallel: bool = eqx.field(static=True)
    sequence_parallel: bool = eqx.field(static=True)
    collective_matmul: CollectiveMatmul = eqx.field(static=True)
    axis_name: str = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        collective_matmul: CollectiveMatmul = None,
        axis_name: str = "tensor",
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_features`: global input size; split over `axis_name`.
        - `out_features`: global output size.
        - `use_bias`: whether to add a (replicated) bias.
        - `input_is_parallel`: the input is already split along its features (e.g. it
          comes from a `ColumnParallelLinear`). If `False`, the whole input is given and
          each device takes its block.
        - `sequence_parallel`: reduce-scatter the output along the sequence dim (-2)
          instead of all-reducing it.
        - `collective_matmul`: `None`, `"unidirectional"` or `"bidirectional"`; needs
          `sequence_parallel`.
        - `axis_name`: the mesh axis to split over.
        - `dtype`: parameter dtype (default f32).
        - `key`: PRNG key for initialisation.
        """
        self.weight, self.bias = _init(in_features, out_features, use_bias, dtype, key)
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.collective_matmul = collective_matmul
        self.axis_name = axis_name

    def __check_init__(self):
        check_collective_matmul("RowParallelLinear", self.collective_matmul, self.sequence_parallel)
        check_divisible("RowParallelLinear", "in_features", self.in_features, self.axis_name)

    @typechecked
    def __call__(self, x: Float[Array, "*batch in"]) -> Float[Array, "... out_features"]:
        """**Arguments:**

        - `x`: per-shard `(*batch, in_shard)` with `in_shard = in_features / t` (or the
          whole `(*batch, in_features)` if `input_is_parallel=False`).

        **Returns:**

        `(*batch, out_features)`, identical on every device; with `sequence_parallel`,
        `(*batch, seq_shard, out_features)`, this device's sequence block.
        """
        name = "RowParallelLinear"
        with jax.named_scope(f"eqxpar.{name}"):
            axis = self.axis_name
            if not self.input_is_parallel:
                check_shard(name, "in_features", x.shape[-1], self.in_features, axis, 1)
                x = scatter_to_region(x, axis)
            parts = shard_count(axis)
            check_shard(name, "in_shard", x.shape[-1], self.in_features, axis, parts)
            block = (self.out_features, tp_block(self.in_features, axis))
            if self.sequence_parallel and x.ndim < 2:
                raise ValueError(f"{name}: sequence_parallel needs (*batch, seq, in) input.")
            if self.sequence_parallel and x.shape[-2] % parts:
                raise ValueError(
                    f"{name}: sequence length {x.shape[-2]} does not split {parts} ways "
                    f"over {axis!r}; make it a multiple of {parts}."
                )

            def matmul(w: Array, x: Array) -> Array:
                weight = local_param(name, "weight", w, block)
                if self.collective_matmul is not None:
                    return matmul_reduce_scatter(
                        x, weight, axis, dim=-2, direction=self.collective_matmul
                    )
                if self.sequence_parallel:
                    return reduce_scatter_to_sequence(linear_matmul(x, weight), axis, dim=-2)
                return reduce_from_region(linear_matmul(x, weight), axis)

            y = regather_in_backward(matmul, self.weight, x)
            if self.bias is not None:
                # Under SP each device adds the bias to its own sequence block, so the
                # bias gradient must be summed over the blocks: Megatron's f.
                bias = local_param(name, "bias", self.bias, (self.out_features,))
                bias = copy_to_region(bias, axis) if self.sequence_parallel else bias
                y = y + _rowvec(bias, y.ndim)
            return y
