"""Communication is part of correctness: count the collectives in the compiled HLO."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from helpers import mesh_of
from jax.sharding import PartitionSpec as P
from test_tp_layers import MLP

import eqxpar as ep
from eqxpar.nn import ColumnParallelLinear, vocab_parallel_cross_entropy
from eqxpar.profile import array_shapes, count_collectives

B, S, H = 2, 16, 6  # an activation is b*s*h floats


def compile_mlp(mesh, *, grad, **kw):
    mlp = ep.place(MLP(H, 24, **kw, key=jax.random.key(0)), mesh)
    spec = P("data", "tensor") if kw.get("sequence_parallel") else P("data")
    fn = ep.filter_shard_map(lambda m, x: m(x), mesh=mesh, in_specs=(None, spec), out_specs=spec)
    x = jnp.ones((B * mesh.shape["data"], S, H))
    if grad:  # gradients of the input and every weight
        step = eqx.filter_grad(lambda mx: jnp.sum(fn(*mx) ** 2))
        return count_collectives(eqx.filter_jit(step).lower((mlp, x)).compile(), mesh)
    return count_collectives(eqx.filter_jit(fn).lower(mlp, x).compile(), mesh)


@pytest.mark.parametrize("data,tensor", [(1, 4), (2, 4), (1, 8)])
def test_mlp_block_one_all_reduce_each_way(data, tensor):
    mesh = mesh_of(data, tensor)
    act_bytes = B * S * H * 4
    fwd = compile_mlp(mesh, grad=False)
    assert fwd.count("all-reduce", axis="tensor") == 1
    assert fwd.bytes("all-reduce", axis="tensor") == act_bytes
    assert fwd.count() == 1  # nothing else at all
    both = compile_mlp(mesh, grad=True)
    # Forward g after the row layer, backward f on the column layer's input gradient;
    # the weight gradients are local (plus the data-parallel weight-gradient reduction).
    assert both.count("all-reduce", axis="tensor") == 2
    assert both.bytes("all-reduce", axis="tensor") == 2 * act_bytes
    assert both.count("all-gather") == both.count("reduce-scatter") == 0


@pytest.mark.parametrize("tensor", [2, 4])
def test_sequence_parallel_gathers_and_scatters(tensor):
    mesh = mesh_of(1, tensor)
    act_bytes = B * S * H * 4
    fwd = compile_mlp(mesh, grad=False, sequence_parallel=True)
    assert fwd.count("all-gather", axis="tensor") == 1
    assert fwd.count("reduce-scatter", axis="tensor") == 1
    assert fwd.count("all-reduce") == 0
    both = compile_mlp(mesh, grad=True, sequence_parallel=True)
    assert both.count("all-gather", axis="tensor") == 2
    assert both.count("reduce-scatter", axis="tensor") == 2
    # The bias of the row layer is replicated while each device sees its sequence
    # block: its gradient is the one small all-reduce (out_features floats).
    assert both.count("all-reduce", axis="tensor") == 1
    assert both.bytes("all-reduce", axis="tensor") == H * 4
    # Same bytes as the all-reduces of plain TP: an all-gather's result is b*s*h, a
    # reduce-scatter's input is (its result is b*s*h/t).
    assert both.bytes("all-gather", axis="tensor") == 2 * act_bytes
    assert both.bytes("reduce-scatter", axis="tensor") == 2 * act_bytes // tensor


@pytest.mark.parametrize("direction,rings", [("unidirectional", 1), ("bidirectional", 2)])
@pytest.mark.parametrize("tensor", [2, 4])
def test_async_uses_only_collective_permutes(direction, rings, tensor):
    mesh = mesh_of(1, tensor)
    report = compile_mlp(mesh, grad=True, sequence_parallel=True, collective_matmul=direction)
    for kind in ("all-gather", "reduce-scatter"):
        assert report.count(kind) == 0
    # The only all-reduce left is the row layer's bias gradient (H floats), off the
    # activation path.
    assert report.count("all-reduce") == 1 and report.bytes("all-reduce") == H * 4
    # Four rings (gather-matmul and matmul-scatter, forward and backward), t - 1 hops.
    assert report.count("collective-permute", axis="tensor") == 4 * rings * (tensor - 1)
    fwd = compile_mlp(mesh, grad=False, sequence_parallel=True, collective_matmul=direction)
    assert fwd.count() == fwd.count("collective-permute") == 2 * rings * (tensor - 1)


def test_vocab_loss_never_builds_full_logits():
    vocab, batch, tensor = 40, 6, 4
    mesh = mesh_of(1, tensor)
    head = ep.place(ColumnParallelLinear(5, vocab, use_bias=False, key=jax.random.key(0)), mesh)

    def loss(head, x, y):
        return jnp.mean(vocab_parallel_cross_entropy(head(x), y))

    fn = ep.filter_shard_map(loss, mesh=mesh, in_specs=(None, P(), P()), out_specs=P())
    step = eqx.filter_jit(eqx.filter_value_and_grad(fn))
    compiled = step.lower(head, jnp.ones((batch, 5)), jnp.zeros((batch,), jnp.int32)).compile()
    dims = {d for _, shape in array_shapes(compiled) for d in shape}
    assert vocab // tensor in dims  # the per-shard logits are there...
    assert vocab not in dims  # ...and nothing of the full vocabulary size ever is
    report = count_collectives(compiled, mesh)
    assert report.count("all-gather") == 0
