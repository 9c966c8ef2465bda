"""Parity of every tensor-parallel layer with its dense Equinox twin, on several meshes.

Each case compiles one function returning the forward output and the gradients with
respect to the layer and the input (a VJP against a fixed random cotangent), and
compares them with the same computation done by `eqx.nn.Linear` / `eqx.nn.Embedding`
/ `optax` on one device with the same weights.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import assert_trees_close, mesh_of
from jax.sharding import PartitionSpec as P

import eqxpar as ep
from eqxpar.nn import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)

MESHES = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 4)]  # (data, tensor)
MESH_IDS = [f"data{d}-tensor{t}" for d, t in MESHES]
HIDDEN = 16  # divisible by every tensor size tried
VOCAB = 24


def eqx_linear(layer):
    """`eqx.nn.Linear` holding the same weights as a parallel linear layer."""
    dense = eqx.nn.Linear(layer.in_features, layer.out_features, key=jax.random.key(0))
    return eqx.tree_at(lambda m: (m.weight, m.bias), dense, (layer.weight, layer.bias))


def apply_linear(lin, x):
    return jnp.vectorize(lin, signature="(i)->(o)")(x)


def parity(model, x, mesh, in_spec, out_spec, parallel_fn, dense_model, dense_fn, *, key):
    """Forward and VJP of the sharded computation against the dense one."""
    sharded = ep.filter_shard_map(
        parallel_fn, mesh=mesh, in_specs=(None, in_spec), out_specs=out_spec
    )
    y_dense = dense_fn(dense_model, x)
    ct = jax.random.normal(key, y_dense.shape)

    @eqx.filter_jit
    def run(m, x):
        y = sharded(m, x)
        grads = eqx.filter_grad(lambda mx: jnp.sum(sharded(*mx) * ct))((m, x))
        return y, grads

    y, (g_model, g_x) = run(ep.place(model, mesh), x)
    want_model, want_x = eqx.filter_grad(lambda mx: jnp.sum(dense_fn(*mx) * ct))((dense_model, x))
    assert_trees_close(y, y_dense)
    if eqx.is_inexact_array(x):
        assert_trees_close(g_x, want_x)
    return g_model, want_model


@pytest.mark.parametrize("data,tensor", MESHES, ids=MESH_IDS)
@pytest.mark.parametrize("gather_output", [False, True])
def test_column_parallel_linear(data, tensor, gather_output, getkey):
    layer = ColumnParallelLinear(6, HIDDEN, gather_output=gather_output, key=getkey())
    x = jax.random.normal(getkey(), (4, 3, 6))
    out_spec = P("data") if gather_output else P("data", None, "tensor")
    mesh = mesh_of(data, tensor)
    g, want = parity(
        layer,
        x,
        mesh,
        P("data"),
        out_spec,
        lambda m, x: m(x),
        eqx_linear(layer),
        apply_linear,
        key=getkey(),
    )
    assert_trees_close((g.weight, g.bias), (want.weight, want.bias))


@pytest.mark.parametrize("data,tensor", MESHES, ids=MESH_IDS)
@pytest.mark.parametrize("input_is_parallel", [True, False])
def test_row_parallel_linear(data, tensor, input_is_parallel, getkey):
    layer = RowParallelLinear(HIDDEN, 5, input_is_parallel=input_is_parallel, key=getkey())
    x = jax.random.normal(getkey(), (4, 3, HIDDEN))
    in_spec = P("data", None, "tensor") if input_is_parallel else P("data")
    mesh = mesh_of(data, tensor)
    g, want = parity(
        layer,
        x,
        mesh,
        in_spec,
        P("data"),
        lambda m, x: m(x),
        eqx_linear(layer),
        apply_linear,
        key=getkey(),
    )
    # The bias is added once: its gradient is the plain sum over the batch.
    assert_trees_close((g.weight, g.bias), (want.weight, want.bias))


class MLP(eqx.Module):
    up: ColumnParallelLinear
    down: RowParallelLinear

    def __init__(self, dim, hidden, *, sequence_parallel=False, collective_matmul=None, key):
        k1, k2 = jax.random.split(key)
        kw = dict(sequence_parallel=sequence_parallel, collective_matmul=collective_matmul)
        self.up = ColumnParallelLinear(dim, hidden, **kw, key=k1)
        self.down = RowParallelLinear(hidden, dim, **kw, key=k2)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


def dense_mlp(mlp, x):
    return apply_linear(eqx_linear(mlp.down), jax.nn.gelu(apply_linear(eqx_linear(mlp.up), x)))


VARIANTS = {
    "sync": dict(),
    "sequence-parallel": dict(sequence_parallel=True),
    "async-unidirectional": dict(sequence_parallel=True, collective_matmul="unidirectional"),
    "async-bidirectional": dict(sequence_parallel=True, collective_matmul="bidirectional"),
}


@pytest.mark.parametrize("data,tensor", MESHES, ids=MESH_IDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mlp_block(data, tensor, variant, getkey):
    kw = VARIANTS[variant]
    mlp = MLP(6, HIDDEN, **kw, key=getkey())
    x = jax.random.normal(getkey(), (2, 16, 6))  # (batch, seq, dim); seq splits 16 ways
    spec = P("data", "tensor") if kw.get("sequence_parallel") else P("data")
    mesh = mesh_of(data, tensor)
    g, want = parity(mlp, x, mesh, spec, spec, lambda m, x: m(x), mlp, dense_mlp, key=getkey())
    assert_trees_close(g, want)


@pytest.mark.parametrize("data,tensor", MESHES, ids=MESH_IDS)
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_vocab_parallel_embedding(data, tensor, sequence_parallel, getkey):
    emb = VocabParallelEmbedding(VOCAB, 5, sequence_parallel=sequence_parallel, key=getkey())
    ids = jax.random.randint(getkey(), (2, 8), 0, VOCAB)
    dense = eqx.nn.Embedding(weight=emb.weight)
    out_spec = P("data", "tensor") if sequence_parallel else P("data")
    mesh = mesh_of(data, tensor)
    g, want = parity(
        emb,
        ids,
        mesh,
        P("data"),
        out_spec,
        lambda m, i: m(i),
        dense,
        lambda e, i: jax.vmap(jax.vmap(e))(i),
        key=getkey(),
    )
    assert_trees_close(g.weight, want.weight)


@pytest.mark.parametrize("data,tensor", MESHES, ids=MESH_IDS)
def test_parallel_embedding(data, tensor, getkey):
    emb = ParallelEmbedding(7, HIDDEN, key=getkey())
    ids = jax.random.randint(getkey(), (4, 3), 0, 7)
    dense = eqx.nn.Embedding(weight=emb.weight)
    mesh = mesh_of(data, tensor)
    g, want = parity(
        emb,
        ids,
        mesh,
        P("data"),
        P("data"),
        lambda m, i: m(i),
        dense,
        lambda e, i: jax.vmap(jax.vmap(e))(i),
        key=getkey(),
    )
    assert_trees_close(g.weight, want.weight)


def test_same_key_same_weights_as_equinox(getkey):
    key = getkey()
    col, lin = ColumnParallelLinear(6, 8, key=key), eqx.nn.Linear(6, 8, key=key)
    assert (col.weight == lin.weight).all() and (col.bias == lin.bias).all()
    emb, ref = VocabParallelEmbedding(9, 4, key=key), eqx.nn.Embedding(9, 4, key=key)
    assert (emb.weight == ref.weight).all()


LOSS_OPTIONS = {
    "plain": dict(),
    "smoothing": dict(label_smoothing=0.1),
    "ignore-and-mask": dict(ignore_index=3),
}


def dense_loss(logits, labels, mask, *, label_smoothing=0.0, ignore_index=None):
    target = optax.smooth_labels(jax.nn.one_hot(labels, VOCAB), label_smoothing)
    keep = mask if ignore_index is None else mask & (labels != ignore_index)
    return jnp.where(keep, optax.softmax_cross_entropy(logits, target), 0.0)


@pytest.mark.parametrize("data,tensor", MESHES, ids=MESH_IDS)
@pytest.mark.parametrize("option", list(LOSS_OPTIONS))
def test_vocab_parallel_cross_entropy(data, tensor, option, getkey):
    kw = LOSS_OPTIONS[option]
    logits = 3.0 * jax.random.normal(getkey(), (4, 3, VOCAB))
    labels = jax.random.randint(getkey(), (4, 3), 0, VOCAB).at[0, 0].set(3)
    mask = jnp.ones((4, 3), bool)
    if option == "ignore-and-mask":
        mask = mask.at[1, 2].set(False)
    ct = jax.random.normal(getkey(), (4, 3))
    sharded = ep.filter_shard_map(
        lambda lg, y, m: vocab_parallel_cross_entropy(lg, y, where=m, **kw),
        mesh=mesh_of(data, tensor),
        in_specs=(P("data", None, "tensor"), P("data"), P("data")),
        out_specs=P("data"),
    )
    got = jax.jit(jax.value_and_grad(lambda lg: jnp.sum(sharded(lg, labels, mask) * ct)))
    want = jax.value_and_grad(lambda lg: jnp.sum(dense_loss(lg, labels, mask, **kw) * ct))
    (value, grad), (want_value, want_grad) = got(logits), want(logits)
    assert_trees_close(value, want_value)
    assert_trees_close(grad, want_grad)
    if option == "ignore-and-mask":
        assert (grad[0, 0] == 0).all() and (grad[1, 2] == 0).all()


def test_loss_matches_optax_integer_labels(getkey):
    logits = jax.random.normal(getkey(), (5, VOCAB))
    labels = jax.random.randint(getkey(), (5,), 0, VOCAB)
    want = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    assert_trees_close(vocab_parallel_cross_entropy(logits, labels), want)


def test_loss_is_stable_for_huge_logits(getkey):
    mesh = mesh_of(tensor=4)
    logits = 1e4 * jax.random.normal(getkey(), (3, VOCAB))
    labels = jnp.array([0, 7, 23])
    fn = ep.filter_shard_map(
        vocab_parallel_cross_entropy, mesh=mesh, in_specs=(P(None, "tensor"), P()), out_specs=P()
    )
    got = fn(logits, labels)
    assert jnp.isfinite(got).all()
    assert_trees_close(
        got, optax.softmax_cross_entropy_with_integer_labels(logits, labels), rtol=1e-5, atol=1e-2
    )


def test_collective_matmul_needs_sequence_parallel(getkey):
    with pytest.raises(ValueError, match="needs sequence_parallel=True"):
        ColumnParallelLinear(4, 8, collective_matmul="bidirectional", key=getkey())
    with pytest.raises(ValueError, match="use one of"):
        RowParallelLinear(8, 4, sequence_parallel=True, collective_matmul="ring", key=getkey())
