import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jaxtyping import Array

import eqxpar as ep
from eqxpar.nn import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


class Block(eqx.Module):
    up: ColumnParallelLinear
    down: RowParallelLinear
    norm: eqx.nn.LayerNorm

    def __init__(self, dim, hidden, *, key, axis_name="tensor"):
        k1, k2 = jax.random.split(key)
        self.up = ColumnParallelLinear(dim, hidden, axis_name=axis_name, key=k1)
        self.down = RowParallelLinear(hidden, dim, axis_name=axis_name, key=k2)
        self.norm = eqx.nn.LayerNorm(dim)


class Stack(eqx.Module):
    """Layers stacked on a leading dim (for scan), declared with `ep.stacked`."""

    layers: Block = eqx.field(metadata=ep.stacked(None))

    def __init__(self, n, dim, hidden, *, key):
        self.layers = eqx.filter_vmap(lambda k: Block(dim, hidden, key=k))(jax.random.split(key, n))


class Net(eqx.Module):
    embed: VocabParallelEmbedding
    blocks: list
    stack: Stack
    head: eqx.nn.Linear
    scale: Array
    act: object

    def __init__(self, key):
        ks = jax.random.split(key, 5)
        self.embed = VocabParallelEmbedding(16, 6, key=ks[0])
        self.blocks = [Block(6, 8, key=ks[1]), Block(6, 8, key=ks[2], axis_name="data")]
        self.stack = Stack(3, 6, 8, key=ks[3])
        self.head = eqx.nn.Linear(6, 5, key=ks[4])
        self.scale = jnp.ones(())
        self.act = jax.nn.gelu


def test_partition_specs_of_composed_module(getkey):
    specs = ep.partition_specs(Net(getkey()))
    assert specs.embed.weight == P("tensor")
    assert specs.blocks[0].up.weight == P("tensor") and specs.blocks[0].up.bias == P("tensor")
    assert specs.blocks[0].down.weight == P(None, "tensor") and specs.blocks[0].down.bias == P()
    # The axis name is per instance.
    assert specs.blocks[1].up.weight == P("data") and specs.blocks[1].down.weight == P(None, "data")
    # Plain Equinox layers are replicated; non-array leaves get None.
    assert specs.blocks[0].norm.weight == P() and specs.head.weight == P()
    assert specs.scale == P() and specs.act is None
    # Stacked layers get the leading dim prepended.
    assert specs.stack.layers.up.weight == P(None, "tensor")
    assert specs.stack.layers.down.weight == P(None, None, "tensor")
    assert specs.stack.layers.norm.weight == P()


def test_partition_specs_of_abstract_module(getkey):
    abstract = eqx.filter_eval_shape(Net, getkey())
    assert ep.partition_specs(abstract).stack.layers.down.weight == P(None, None, "tensor")


def test_declaration_on_missing_attribute():
    class Bad(eqx.Module):
        w: Array = eqx.field(metadata=ep.sharded("axis"))

    with pytest.raises(AttributeError, match="Bad.w declares a sharded dim on attribute 'axis'"):
        ep.partition_specs(Bad(jnp.ones(4)))


def test_shard_places_by_declaration(getkey):
    mesh = ep.make_mesh(data=2, tensor=4)
    block = ep.place(Block(6, 8, key=getkey()), mesh)
    assert block.up.weight.sharding.spec == P("tensor")
    assert {s.data.shape for s in block.up.weight.addressable_shards} == {(2, 6)}
    assert {s.data.shape for s in block.down.weight.addressable_shards} == {(6, 2)}


def test_shard_is_the_deprecated_name_of_place(getkey):
    mesh = ep.make_mesh(data=2, tensor=4)
    block = Block(6, 8, key=getkey())
    with pytest.warns(DeprecationWarning, match="use eqxpar.place"):
        old = ep.shard(block, mesh)
    assert old.up.weight.sharding == ep.place(block, mesh).up.weight.sharding


def test_shard_rejects_indivisible(getkey):
    mesh = ep.make_mesh(data=2, tensor=4)
    with pytest.raises(ValueError) as err:
        ep.place(Block(6, 10, key=getkey()), mesh)
    msg = str(err.value)
    assert "tree.up.weight" in msg and "size 10" in msg and "'tensor': 4" in msg
    assert "multiple of 4" in msg
    # Every offending array in one message, each with its layer, field and the sizes
    # that make the dim: the column layer's weight and bias, the row layer's weight.
    assert msg.startswith("place: 3 arrays cannot be placed on Mesh(")
    assert "tree.up.weight (ColumnParallelLinear.weight, out_features=10): dim 0" in msg
    assert "tree.up.bias (ColumnParallelLinear.bias, out_features=10): dim 0" in msg
    assert "tree.down.weight (RowParallelLinear.weight, in_features=10): dim 1" in msg


def test_construction_checks_divisibility_under_set_mesh(getkey):
    with jax.set_mesh(ep.make_mesh(data=2, tensor=4)):
        with pytest.raises(ValueError, match=r"out_features=10 cannot be split 4 ways"):
            ColumnParallelLinear(6, 10, key=getkey())
        with pytest.raises(ValueError, match=r"in_features=6 cannot be split 4 ways"):
            RowParallelLinear(6, 10, key=getkey())


@pytest.fixture(scope="module")
def dense_net():
    return Net(jax.random.key(42))


@pytest.mark.parametrize("data,tensor", [(1, 8), (2, 4), (8, 1)])
def test_sharded_init_is_mesh_invariant(dense_net, data, tensor):
    # Widths divisible by 8 so every mesh shape can shard them.
    def make(key):
        ks = jax.random.split(key, 2)
        return [ColumnParallelLinear(6, 16, key=ks[0]), VocabParallelEmbedding(24, 5, key=ks[1])]

    mesh = ep.make_mesh(data=data, tensor=tensor)
    built = ep.sharded_init(make, jax.random.key(7), mesh=mesh)
    dense = make(jax.random.key(7))
    for got, want in zip(jax.tree.leaves(built), jax.tree.leaves(dense), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # bit-identical
    # Each device holds only its own shard.
    weight = built[0].weight
    assert weight.sharding.spec == P("tensor")
    assert {s.data.shape for s in weight.addressable_shards} == {(16 // tensor, 6)}


def test_sharded_init_of_composed_model(dense_net):
    mesh = ep.make_mesh(data=2, tensor=4)
    built = ep.sharded_init(Net, jax.random.key(42), mesh=mesh)
    assert built.act is jax.nn.gelu
    assert built.stack.layers.down.weight.sharding.spec == P(None, None, "tensor")
    for got, want in zip(jax.tree.leaves(built), jax.tree.leaves(dense_net), strict=True):
        if eqx.is_array(got):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_sharded_init_never_materialises_whole_weight():
    mesh = ep.make_mesh(tensor=8)
    lowered = jax.jit(
        lambda k: ColumnParallelLinear(4, 64, key=k).weight,
        out_shardings=jax.sharding.NamedSharding(mesh, P("tensor")),
    )
    text = lowered.lower(jax.random.key(0)).compile().as_text()
    shapes = {tuple(int(d) for d in m.split(",")) for m in _shapes(text)}
    assert (8, 4) in shapes and (64, 4) not in shapes


def _shapes(text):
    import re

    return re.findall(r"f32\[([\d,]+)\]", text)
