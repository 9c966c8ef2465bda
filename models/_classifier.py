"""MLP classifiers: a data-parallel baseline and a tensor-parallel residual MLP."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

import eqxpar as ep
from eqxpar.nn import ColumnParallelLinear, RowParallelLinear


class SimpleClassifier(eqx.Module):
    """A plain MLP, replicated on every device: the data-parallel baseline.

    Built from eqxpar linear layers with `axis_name=None` (not split), so it is the
    same model as `eqx.nn.MLP` and trains with the same code as the parallel models.
    """

    layers: list[ColumnParallelLinear]

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        width: int = 64,
        depth: int = 2,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_features`: input size.
        - `num_classes`: number of classes (output logits).
        - `width`: hidden size.
        - `depth`: number of hidden layers.
        - `key`: PRNG key.
        """
        sizes = [in_features] + [width] * depth + [num_classes]
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [
            ColumnParallelLinear(i, o, axis_name=None, key=k)  # type: ignore[arg-type]
            for i, o, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        ]

    def __call__(self, x: Float[Array, "batch in"]) -> Float[Array, "batch classes"]:
        """Logits `(batch, num_classes)` for inputs `(batch, in_features)`."""
        for layer in self.layers[:-1]:
            x = jax.nn.gelu(layer(x))
        return self.layers[-1](x)


class _Block(eqx.Module):
    norm: eqx.nn.LayerNorm
    up: ColumnParallelLinear
    down: RowParallelLinear

    def __init__(self, width: int, hidden: int, axis_name: str, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.norm = eqx.nn.LayerNorm(width)
        self.up = ColumnParallelLinear(width, hidden, axis_name=axis_name, key=k1)
        self.down = RowParallelLinear(hidden, width, axis_name=axis_name, key=k2)

    def __call__(self, x: Array) -> Array:
        h = jax.vmap(self.norm)(x)
        return x + self.down(jax.nn.gelu(self.up(h)))


class TPClassifier(eqx.Module):
    """A residual MLP whose blocks are Megatron Column -> Row pairs.

    `x -> ColumnParallelLinear(gather) -> [x + Row(gelu(Column(LayerNorm(x))))] * depth
    -> RowParallelLinear(head)`. Each block costs one all-reduce over `axis_name`
    forward and one backward; the head splits its input features so any number of
    classes works. Trains with DP x TP: shard the batch over `"data"`.
    """

    embed: ColumnParallelLinear
    blocks: list[_Block]
    norm: eqx.nn.LayerNorm
    head: RowParallelLinear

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        width: int = 64,
        hidden: int = 256,
        depth: int = 2,
        *,
        axis_name: str = ep.TENSOR,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_features`: input size.
        - `num_classes`: number of classes.
        - `width`: residual stream size (split over `axis_name` only inside the
          embedding and head).
        - `hidden`: MLP hidden size, split over `axis_name`.
        - `depth`: number of residual blocks.
        - `axis_name`: the tensor-parallel mesh axis.
        - `key`: PRNG key.
        """
        ke, kh, *kb = jax.random.split(key, depth + 2)
        self.embed = ColumnParallelLinear(
            in_features, width, gather_output=True, axis_name=axis_name, key=ke
        )
        self.blocks = [_Block(width, hidden, axis_name, key=k) for k in kb]
        self.norm = eqx.nn.LayerNorm(width)
        self.head = RowParallelLinear(
            width, num_classes, input_is_parallel=False, axis_name=axis_name, key=kh
        )

    def __call__(self, x: Float[Array, "batch in"]) -> Float[Array, "batch classes"]:
        """Logits `(batch, num_classes)`, identical on every device of a tensor group."""
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(jax.vmap(self.norm)(h))


def accuracy(logits: Array, labels: Array) -> Array:
    """Fraction of rows whose arg-max logit is the label."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)
