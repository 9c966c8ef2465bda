"""The TP layers' weight-gradient dots stay whole: no transpose between a dot and the
data-parallel all-reduce of its result.

`x @ W.T` inside `shard_map` puts the `pvary` of the (data-invariant) weight after its
transpose, so the backward pass runs dot -> transpose -> psum(data) -> transpose. XLA
cannot cancel the two transposes across the all-reduce, folds the first into the dot
(its left operand then contracts dim 0) and turns the second into a copy; XLA:CPU runs
such a dot outside YNNPACK at about twice the time (benchmarks/tp_mlp.py --hlo-diff).
"""

import re
from collections.abc import Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from helpers import mesh_of
from jax.extend.core import ClosedJaxpr, Jaxpr
from jax.sharding import PartitionSpec as P
from test_tp_layers import MLP, VARIANTS

import eqxpar as ep

B, S, H = 2, 16, 8


def grad_step(mesh, **kw):
    """The jitted gradient of `sum(mlp(x) ** 2)` for the TP MLP, and its argument `(mlp, x)`."""
    mlp = ep.place(MLP(H, 32, **kw, key=jax.random.key(0)), mesh)
    spec = P("data", "tensor") if kw.get("sequence_parallel") else P("data")
    fn = ep.filter_shard_map(lambda m, x: m(x), mesh=mesh, in_specs=(None, spec), out_specs=spec)
    x = jnp.ones((B * mesh.shape["data"], S, H))
    step = eqx.filter_grad(lambda mx: jnp.sum(fn(*mx) ** 2))
    return eqx.filter_jit(step), (mlp, x)


def primitives(jaxpr) -> Iterator[str]:
    """The names of every primitive in a jaxpr, its sub-jaxprs (shard_map's body) too."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if isinstance(sub, ClosedJaxpr):
                    yield from primitives(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    yield from primitives(sub)


@pytest.mark.parametrize("variant", ["sync", "sequence-parallel"])
def test_no_weight_transpose_in_the_step(variant):
    step, arg = grad_step(mesh_of(2, 4), **VARIANTS[variant])
    names = list(primitives(jax.make_jaxpr(step)(arg).jaxpr))
    assert names.count("dot_general") == 6  # two forward, four backward
    assert "transpose" not in names


def test_weight_gradient_dots_canonical_in_hlo():
    """Every dot of the compiled step contracts its left operand's last dim."""
    step, arg = grad_step(mesh_of(2, 4))
    text = step.lower(arg).compile().compiled.as_text()
    shapes = dict(re.findall(r"%(\S+) = \w+\[([\d,]*)\]", text))
    dots = re.findall(r"dot\(%(\S+), %\S+\), lhs_contracting_dims=\{([\d,]*)\}", text)
    assert len(dots) == 6
    for lhs, contracting in dots:
        rank = len(shapes[lhs].split(","))
        assert contracting == str(rank - 1), f"dot of %{lhs} contracts dims {{{contracting}}}"
