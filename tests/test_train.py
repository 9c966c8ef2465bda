"""The train step: DP, ZeRO-1/2 and FSDP (with TP) equal single-device training."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import assert_trees_close, mesh_of
from jax.sharding import PartitionSpec as P

import eqxpar as ep
from eqxpar.profile import count_collectives
from eqxpar.train import Strategy, init_state, make_train_step, memory_report
from models import Transformer, TransformerConfig

CONFIG = TransformerConfig(
    vocab_size=48, dim=32, num_layers=2, num_heads=4, mlp_dim=64, max_seq_len=16
)
BATCH, SEQ = 8, 8
OPTIMIZER = optax.sgd(0.5, momentum=0.9)  # linear in the gradients: exact comparisons


def loss_fn(model, x, y, key):
    return jnp.mean(model.per_token_loss(x, y))


@pytest.fixture(scope="module")
def batches():
    keys = jax.random.split(jax.random.key(1), 3)
    xs = [jax.random.randint(k, (BATCH, SEQ), 0, CONFIG.vocab_size) for k in keys]
    return [(x, jnp.roll(x, -1, axis=1)) for x in xs]


def reference(batches, steps, *, optimizer=OPTIMIZER, config=CONFIG, clip=None):
    """Plain single-device training with the same data."""
    model = Transformer(config, key=jax.random.key(0))
    optimizer = optax.chain(optax.clip_by_global_norm(clip), optimizer) if clip else optimizer
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    losses = []

    @eqx.filter_jit  # one compiled step, not hundreds of eagerly dispatched primitives
    def step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y, None)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    for x, y in batches[:steps]:
        model, opt_state, loss = step(model, opt_state, x, y)
        losses.append(loss)
    return model, losses


@pytest.fixture(scope="module")
def reference_run(batches):
    return {steps: reference(batches, steps) for steps in (1, 3)}


CASES = [
    ("dp", dict(data=8), CONFIG),
    ("zero1", dict(data=8), CONFIG),
    ("zero2", dict(data=8), CONFIG),
    ("fsdp", dict(data=8), CONFIG),
    ("fsdp", dict(data=2, tensor=4), CONFIG),
    ("zero2", dict(data=4, tensor=2), CONFIG.replace(sequence_parallel=True)),
]


@pytest.mark.parametrize(
    "kind,sizes,config", CASES, ids=[f"{k}-" + "x".join(map(str, s.values())) for k, s, _ in CASES]
)
def test_matches_single_device_training(batches, reference_run, kind, sizes, config):
    state, step = _state_and_step(kind, ep.make_mesh(**sizes), config)
    for i, (x, y) in enumerate(batches):
        state, metrics = step(state, x, y)
        want_model, want_losses = reference_run.get(i + 1, (None, None))
        if want_model is not None:
            assert_trees_close(metrics["loss"], want_losses[-1])
            got = eqx.filter(state.model.with_config(sequence_parallel=False), eqx.is_array)
            assert_trees_close(got, eqx.filter(want_model, eqx.is_array), atol=2e-5)
    assert int(state.step) == 3


@pytest.fixture
def optax_promotion():
    # Optax's Adam mixes Python floats with its int32 step count, which the suite's
    # strict promotion refuses; eqxpar's own code is exercised under strict promotion
    # by the SGD tests.
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.mark.slow
@pytest.mark.usefixtures("optax_promotion")
def test_adam_with_clipping_and_accumulation(batches):
    optimizer = optax.adam(3e-3)
    want, _ = reference(batches, 2, optimizer=optimizer, clip=0.5)
    mesh = mesh_of(data=2, tensor=2)
    state = init_state(
        Transformer, CONFIG, key=jax.random.key(0), optimizer=optimizer, mesh=mesh, strategy="fsdp"
    )
    step = make_train_step(
        loss_fn, optimizer, mesh=mesh, strategy="fsdp", clip_norm=0.5, accumulation_steps=2
    )
    for x, y in batches[:2]:
        state, metrics = step(state, x, y)
        assert float(metrics["grad_norm"]) > 0.5  # so clipping is really exercised
    assert_trees_close(
        eqx.filter(state.model, eqx.is_array), eqx.filter(want, eqx.is_array), rtol=1e-4, atol=1e-5
    )


def test_loss_scaling_skips_nonfinite_steps(batches):
    mesh = mesh_of(data=2)
    state = init_state(
        Transformer, CONFIG, key=jax.random.key(0), optimizer=OPTIMIZER, mesh=mesh, strategy="zero2"
    )
    step = make_train_step(loss_fn, OPTIMIZER, mesh=mesh, strategy="zero2", loss_scale=1024.0)
    x, y = batches[0]
    new, metrics = step(state, x, y)
    assert bool(metrics["finite"])
    want, _ = reference(batches, 1)
    assert_trees_close(
        eqx.filter(new.model, eqx.is_array), eqx.filter(want, eqx.is_array), atol=2e-5
    )
    overflow = make_train_step(
        lambda *a: loss_fn(*a) * jnp.inf, OPTIMIZER, mesh=mesh, strategy="zero2", loss_scale=1024.0
    )
    same, metrics = overflow(state, x, y)
    assert not bool(metrics["finite"])
    assert_trees_close(eqx.filter(same.model, eqx.is_array), eqx.filter(state.model, eqx.is_array))


def _state_and_step(kind, mesh, config=CONFIG):
    strategy = Strategy(kind, min_shard_size=256)
    state = init_state(
        Transformer,
        config,
        key=jax.random.key(0),
        optimizer=OPTIMIZER,
        mesh=mesh,
        strategy=strategy,
    )
    return state, make_train_step(loss_fn, OPTIMIZER, mesh=mesh, strategy=strategy)


def _compiled_step(kind, mesh, config=CONFIG):
    state, step = _state_and_step(kind, mesh, config)
    x = jnp.zeros((BATCH, SEQ), jnp.int32)
    return state, step.lower(state, x, x).compile()


def _tp_replica_bytes(model, mesh):
    return sum(
        sum(s.data.nbytes for s in leaf.addressable_shards) / len(mesh.devices.flat)
        for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array))
    )


def test_dp_all_reduces_the_gradient_bytes_once():
    mesh = mesh_of(data=8)
    state, compiled = _compiled_step("dp", mesh)
    report = count_collectives(compiled, mesh)
    param_bytes = _tp_replica_bytes(state.model, mesh)
    big = [r for r in report.records if r.kind == "all-reduce" and r.nbytes > 64]
    assert len(big) == 1 and big[0].axes == ("data",) and big[0].count == 1
    # Every gradient, in one bucketed all-reduce (XLA adds the f32 loss to the bucket).
    assert param_bytes <= big[0].nbytes <= param_bytes + 8
    assert report.count("all-gather") == report.count("reduce-scatter") == 0


def test_fsdp_gathers_per_layer_and_reduce_scatters():
    mesh = mesh_of(data=8)
    state, compiled = _compiled_step("fsdp", mesh)
    report = count_collectives(compiled, mesh)
    assert report.count("all-gather", axis="data") > 0
    assert report.count("reduce-scatter", axis="data") > 0
    # No gradient all-reduce of the split parameters over data: only the arrays under
    # min_shard_size (the norm weights) and a few scalars (loss, gradient norm).
    plans = ep.train.plan(state.model, Strategy("fsdp", min_shard_size=256), mesh)
    small = sum(
        leaf.nbytes
        for p, leaf in zip(
            jax.tree.leaves(plans, is_leaf=lambda x: isinstance(x, ep.train.LeafPlan)),
            jax.tree.leaves(eqx.filter(state.model, eqx.is_array)),
            strict=True,
        )
        if p.zero_dim is None
    )
    assert small < 1000 and report.bytes("all-reduce", axis="data") <= small + 16
    # The layer weights are gathered inside the scanned loop: one layer at a time.
    in_loop = [r for r in report.records if r.kind == "all-gather" and r.count > 1]
    assert in_loop and all(r.count % CONFIG.num_layers == 0 for r in in_loop)


def test_a_weight_split_over_data_by_mistake_is_refused():
    # FSDP is the train step's plan, never guessed from shapes: a column-parallel
    # weight passed with P("tensor", "data") is an error naming the layer, not an
    # all-gather.
    mesh = mesh_of(data=2, tensor=4)
    linear = ep.nn.ColumnParallelLinear(6, 12, use_bias=False, key=jax.random.key(0))
    wrong = eqx.tree_at(lambda m: m.weight, ep.partition_specs(linear), P("tensor", "data"))
    run = ep.filter_shard_map(
        lambda m, x: jax.lax.psum(jnp.sum(m(x)), "tensor"),
        mesh=mesh,
        in_specs=(wrong, P()),
        out_specs=P(),
    )
    with pytest.raises(
        ValueError,
        match=r"ColumnParallelLinear.weight: dim 1 has size 3 .* "
        r"block of it is 6 .* Pass the module with its declared specs",
    ):
        run(linear, jnp.ones((5, 6)))
    # The same weight, split by the train step's plan: wrapped in an FSDPShard.
    shard = eqx.tree_at(
        lambda m: m.weight, linear, replace_fn=lambda w: ep.nn.FSDPShard(w, "data", -1)
    )
    got = ep.filter_shard_map(
        lambda m, x: jax.lax.pmean(jax.lax.psum(jnp.sum(m(x)), "tensor"), "data"),
        mesh=mesh,
        in_specs=(
            eqx.tree_at(lambda m: m.weight, ep.partition_specs(shard), P("tensor", "data")),
            P(),
        ),
        out_specs=P(),
    )(shard, jnp.ones((5, 6)))
    assert jnp.allclose(got, jnp.sum(linear(jnp.ones((5, 6)))), rtol=1e-5)


@pytest.mark.usefixtures("optax_promotion")
def test_fsdp_memory_is_an_eighth():
    mesh = mesh_of(data=8)
    config = CONFIG.replace(dim=64, mlp_dim=256, vocab_size=256)
    strategy = Strategy("fsdp")
    state = init_state(
        Transformer,
        config,
        key=jax.random.key(0),
        optimizer=optax.adam(1e-3),
        mesh=mesh,
        strategy=strategy,
    )
    report = memory_report(state, strategy, mesh)
    total = sum(x.nbytes for x in jax.tree.leaves(eqx.filter(state.model, eqx.is_array)))
    opt_total = sum(x.nbytes for x in jax.tree.leaves(eqx.filter(state.opt_state, eqx.is_array)))
    assert report.params + report.opt_state <= 1.05 * (total + opt_total) / 8
    assert abs(report.params - report.theory_params) <= 0.05 * report.theory_params
    dp = memory_report(state, "dp", mesh)
    assert dp.theory_params == pytest.approx(8 * report.theory_params)


@pytest.mark.usefixtures("optax_promotion")
def test_init_state_never_builds_whole_arrays():
    mesh = mesh_of(data=2, tensor=4)
    state = init_state(
        Transformer,
        CONFIG,
        key=jax.random.key(0),
        optimizer=optax.adam(1e-3),
        mesh=mesh,
        strategy=Strategy("fsdp", min_shard_size=256),
    )
    up = state.model.layers.mlp.up.weight  # (layers, 64, 32): tensor on 64, data on 32
    assert {s.data.shape for s in up.addressable_shards} == {(2, 16, 16)}
    mu = state.opt_state[0].mu.layers.mlp.up.weight
    assert mu.sharding.spec == up.sharding.spec


def test_bad_arguments():
    mesh = mesh_of(data=2)
    with pytest.raises(ValueError, match="strategy='zero4'"):
        make_train_step(loss_fn, OPTIMIZER, mesh=mesh, strategy="zero4")
    with pytest.raises(ValueError, match="data_axis 'batch' is not an axis"):
        make_train_step(loss_fn, OPTIMIZER, mesh=mesh, strategy=Strategy(data_axis="batch"))
    state = init_state(Transformer, CONFIG, key=jax.random.key(0), optimizer=OPTIMIZER, mesh=mesh)
    step = make_train_step(loss_fn, OPTIMIZER, mesh=mesh, accumulation_steps=3)
    x = jnp.zeros((BATCH, SEQ), jnp.int32)
    with pytest.raises(ValueError, match="accumulation_steps=3 does not divide"):
        step(state, x, x)
