import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close, mesh_of
from jax.sharding import PartitionSpec as P
from jaxtyping import Array

import eqxpar as ep


class Scaled(eqx.Module):
    """Holds a sharded weight, a static field and a function leaf."""

    weight: Array = eqx.field(metadata=ep.sharded("axis_name", None))
    activation: object
    power: int = eqx.field(static=True)
    axis_name: str = eqx.field(static=True)

    def __init__(self, key, rows=8, cols=5, axis_name="tensor"):
        self.weight = jax.random.normal(key, (rows, cols))
        self.activation = jnp.tanh
        self.power = 3
        self.axis_name = axis_name

    def __call__(self, x):
        # x: (batch, cols); each device computes its rows of the output, then gathers.
        h = self.activation(x @ self.weight.T) ** self.power
        return ep.collectives.gather_from_region(h, self.axis_name)


def dense_call(module, x):
    return module.activation(x @ module.weight.T) ** module.power


@pytest.fixture(scope="module")
def module():
    return Scaled(jax.random.key(0))


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(1), (6, 5))


@pytest.mark.parametrize("data,tensor", [(1, 2), (2, 4), (1, 8)])
def test_static_and_function_leaves(module, x, data, tensor):
    mesh = mesh_of(data=data, tensor=tensor)
    fn = ep.filter_shard_map(
        lambda m, x: m(x), mesh=mesh, in_specs=(None, P("data")), out_specs=P("data")
    )
    np.testing.assert_allclose(fn(module, x), dense_call(module, x), rtol=1e-5, atol=1e-6)


def test_returns_module_with_declared_sharding(module, x):
    mesh = mesh_of(data=2, tensor=4)

    def step(m, x):
        # With check_vma, the gradient of the data-replicated weight is already summed
        # over "data": the implicit broadcast of the weight transposes to a psum.
        grads = eqx.filter_grad(lambda m: jnp.sum(m(x) ** 2))(m)
        return jnp.ones(()), grads  # a replicated scalar and a module

    fn = eqx.filter_jit(
        ep.filter_shard_map(step, mesh=mesh, in_specs=(None, P("data")), out_specs=(P(), None))
    )
    one, grads = fn(module, x)
    assert grads.activation is None and grads.power == 3  # non-array leaves pass through
    assert grads.weight.sharding.spec == P("tensor")
    want = eqx.filter_grad(lambda m: jnp.sum(dense_call(m, x) ** 2))(module)
    assert_trees_close(grads.weight, want.weight, rtol=1e-4)


def test_prefix_specs_cover_subtrees(x):
    mesh = mesh_of(data=2, tensor=4)
    pair = {"a": x, "b": x * 2}
    fn = ep.filter_shard_map(
        lambda p: p["a"] + p["b"], mesh=mesh, in_specs=P("data"), out_specs=P("data")
    )
    np.testing.assert_allclose(fn(pair), 3 * x, rtol=1e-6)


def test_decorator_and_set_mesh(module, x):
    mesh = mesh_of(data=2, tensor=4)

    @ep.filter_shard_map(in_specs=(None, P("data")), out_specs=P("data"))
    def apply(m, x):
        return m(x)

    with jax.set_mesh(mesh):
        got = apply(module, x)
    np.testing.assert_allclose(got, dense_call(module, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no mesh"):
        apply(module, x)


def test_explicit_axes(module, x):
    mesh = ep.make_mesh(data=2, tensor=4, axis_types="explicit")
    fn = eqx.filter_jit(
        ep.filter_shard_map(
            lambda m, x: m(x), mesh=mesh, in_specs=(None, P("data")), out_specs=P("data")
        )
    )
    with jax.set_mesh(mesh):
        got = fn(ep.place(module, mesh), x)
    np.testing.assert_allclose(got, dense_call(module, x), rtol=1e-5, atol=1e-6)


def test_under_filter_grad_and_vmap(module, x):
    mesh = mesh_of(data=2, tensor=4)
    fn = ep.filter_shard_map(
        lambda m, x: m(x), mesh=mesh, in_specs=(None, P("data")), out_specs=P("data")
    )

    def loss(m, x):
        return jnp.sum(fn(m, x) ** 2)

    got = eqx.filter_jit(eqx.filter_grad(loss))(module, x)
    want = eqx.filter_grad(lambda m, x: jnp.sum(dense_call(m, x) ** 2))(module, x)
    assert_trees_close(got.weight, want.weight, rtol=1e-4)
    # vmap over a new leading dim of x.
    xs = jnp.stack([x, 2 * x, -x])
    got = jax.jit(jax.vmap(lambda x: fn(module, x)))(xs)
    np.testing.assert_allclose(
        got, jax.vmap(lambda x: dense_call(module, x))(xs), rtol=1e-5, atol=1e-6
    )


def test_error_names_leaf_mesh_and_fix(module, x):
    mesh = mesh_of(data=2, tensor=4)
    fn = ep.filter_shard_map(lambda m, x: m(x), mesh=mesh, in_specs=(None, P("dta")))
    with pytest.raises(ValueError) as err:
        fn(module, x)
    msg = str(err.value)
    assert msg.startswith("in_specs[1]:") and "did you mean 'data'?" in msg
    assert "'data': 2, 'tensor': 4" in msg

    odd = Scaled(jax.random.key(0), rows=6)
    with pytest.raises(ValueError) as err:
        ep.filter_shard_map(lambda m, x: m(x), mesh=mesh, in_specs=(None, P()))(odd, x)
    msg = str(err.value)
    assert msg.startswith("in_specs[0].weight (Scaled.weight): dim 0 has size 6")
    assert "multiple of 4" in msg


def test_error_on_spec_rank_and_count(module, x):
    mesh = mesh_of(data=2, tensor=4)
    with pytest.raises(ValueError, match=r"in_specs\[1\]: spec .* has 3 entries"):
        ep.filter_shard_map(lambda m, x: x, mesh=mesh, in_specs=(None, P("data", None, None)))(
            module, x
        )
    with pytest.raises(ValueError, match="in_specs has 3 entries but .* 2 positional"):
        ep.filter_shard_map(lambda m, x: x, mesh=mesh, in_specs=(None, None, None))(module, x)
    with pytest.raises(TypeError, match=r"in_specs\[1\]: expected a jax.sharding.PartitionSpec"):
        ep.filter_shard_map(lambda m, x: x, mesh=mesh, in_specs=(None, "data"))(module, x)
    with pytest.raises(ValueError, match=r"out_specs\[1\]: spec .* names mesh axis 'tensr'"):
        ep.filter_shard_map(
            lambda m, x: (x, x), mesh=mesh, in_specs=(None, P()), out_specs=(P(), P("tensr"))
        )(module, x)
