import jax
import jax.numpy as jnp
import pytest
from helpers import mesh_of
from jax.sharding import PartitionSpec as P

import eqxpar as ep
from eqxpar.nn import ColumnParallelLinear, RowParallelLinear


def test_wrong_per_shard_shape_names_the_dim(getkey):
    mesh = mesh_of(tensor=4)
    row = RowParallelLinear(12, 5, key=getkey())
    # The input is given whole (12 features) where each device expects its 3.
    fn = ep.filter_shard_map(lambda m, x: m(x), mesh=mesh, in_specs=(None, P()), out_specs=P())
    with pytest.raises(ep.ShardShapeError) as err:
        fn(row, jnp.ones((2, 12)))
    msg = str(err.value)
    assert "RowParallelLinear" in msg and "'in_shard'" in msg and "size 12" in msg
    assert "each shard must have 3" in msg


def test_wrong_global_shape_is_a_type_error(getkey):
    col = ColumnParallelLinear(6, 8, key=getkey())
    with pytest.raises(TypeError, match="in_features"):
        col(jnp.ones((2, 7)))
    with pytest.raises(TypeError):  # an int array is not Float
        col(jnp.ones((2, 6), jnp.int32))


def test_replicated_weight_inside_shard_map_is_caught(getkey):
    mesh = mesh_of(tensor=4)
    col = ColumnParallelLinear(6, 8, key=getkey())
    fn = ep.filter_shard_map(lambda m, x: m(x), mesh=mesh, in_specs=(P(), P()), out_specs=P())
    with pytest.raises(
        ValueError, match=r"ColumnParallelLinear.weight: dim 0 has size 8 on this device"
    ):
        fn(col, jnp.ones((2, 6)))


def test_switch_turns_checks_off(getkey):
    col = ColumnParallelLinear(6, 8, key=getkey())
    assert ep.typecheck_enabled()
    with ep.set_typecheck(False):
        assert not ep.typecheck_enabled()
        # Without the check, the matmul's own shape error is what the user sees.
        with pytest.raises(TypeError, match="dot_general"):
            col(jnp.ones((2, 7)))
    assert ep.typecheck_enabled()
    # A plain call switches at once, for the rest of the process.
    ep.set_typecheck(False)
    try:
        assert not ep.typecheck_enabled()
    finally:
        ep.set_typecheck(True)
    assert ep.typecheck_enabled()


def test_checks_run_only_at_trace_time(getkey, monkeypatch):
    import eqxpar._typecheck as tc

    calls = []
    original = tc.check_shard
    monkeypatch.setattr(tc, "check_shard", lambda *a: calls.append(a) or original(*a))
    import eqxpar.nn._linear as lin

    monkeypatch.setattr(lin, "check_shard", tc.check_shard)
    col = ColumnParallelLinear(6, 8, key=getkey())
    f = jax.jit(lambda x: col(x))
    for _ in range(3):
        f(jnp.ones((2, 6)))
    assert len(calls) == 1
