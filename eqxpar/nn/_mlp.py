"""Megatron's parallel MLP: a column-parallel up projection and a row-parallel down."""

from __future__ import annotations

from typing import Any, Literal

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from .._typecheck import typechecked
from ._linear import CollectiveMatmul, ColumnParallelLinear, RowParallelLinear

Activation = Literal["gelu", "swiglu"]


class ParallelMLP(eqx.Module):
    """`down(act(up(x)))` with the hidden features split over the tensor axis.

    One all-reduce forward (after `down`) and one backward (before `up`), or with
    sequence parallelism one all-gather and one reduce-scatter each way.

    With `activation="swiglu"`, `up` is one fused column-parallel layer producing the
    gate and the value, its rows interleaved: row `2i` is gate unit `i`, row `2i + 1`
    value unit `i`. Any split of the rows over devices then keeps each pair together,
    so the weights do not depend on the mesh.
    """

    up: ColumnParallelLinear
    down: RowParallelLinear
    activation: Activation = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        activation: Activation = "gelu",
        use_bias: bool = True,
        sequence_parallel: bool = False,
        collective_matmul: CollectiveMatmul = None,
        axis_name: str = "tensor",
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`: input and output size.
        - `hidden`: hidden size (per branch for SwiGLU); split over `axis_name`.
        - `activation`: `"gelu"` or `"swiglu"`.
        - `use_bias`: biases in both projections.
        - `sequence_parallel`, `collective_matmul`, `axis_name`, `dtype`: passed to the
          two linear layers.
        - `key`: PRNG key.
        """
        if activation not in ("gelu", "swiglu"):
            raise ValueError(f"ParallelMLP: activation={activation!r}; use 'gelu' or 'swiglu'.")
        k1, k2 = jax.random.split(key)
        width = 2 * hidden if activation == "swiglu" else hidden
        kw: dict[str, Any] = dict(
            use_bias=use_bias,
            sequence_parallel=sequence_parallel,
            collective_matmul=collective_matmul,
            axis_name=axis_name,
            dtype=dtype,
        )
        self.up = ColumnParallelLinear(dim, width, **kw, key=k1)
        self.down = RowParallelLinear(hidden, dim, **kw, key=k2)
        self.activation = activation

    @typechecked
    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "... dim"]:
        """**Arguments:**

        - `x`: `(*batch, dim)` replicated over the tensor axis, or with sequence
          parallelism `(*batch, seq_shard, dim)`.

        **Returns:**

        The same shape as `x`.
        """
        with jax.named_scope("eqxpar.ParallelMLP"):
            h = self.up(x)
            if self.activation == "swiglu":
                pairs = h.reshape(*h.shape[:-1], h.shape[-1] // 2, 2)
                h = jax.nn.silu(pairs[..., 0]) * pairs[..., 1]
            else:
                h = jax.nn.gelu(h)
            return self.down(h)
