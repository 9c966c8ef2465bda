"""The pipeline executor: loss and gradients of every schedule equal the model run
without a pipeline; only collective-permutes (and final sums) cross stages."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import assert_trees_close
from jax.sharding import PartitionSpec as P

import eqxpar as ep
from eqxpar.pipeline import GPipe, Interleaved1F1B, OneFOneB, ZeroBubbleH1, pipeline_loss
from eqxpar.profile import count_collectives
from models import PPClassifier, Transformer, TransformerConfig

BATCH = 32
# The unpipelined reference, compiled once per model structure.
dense_value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(lambda m, x, y: m.loss(x, y)))


def data():
    x = jax.random.normal(jax.random.key(1), (BATCH, 12))
    return x, jax.random.randint(jax.random.key(2), (BATCH,), 0, 5)


def run(sizes, schedule, microbatches, *, virtual=1, compile_only=False):
    p = sizes["pipeline"]
    model = PPClassifier(
        12, 5, width=16, hidden=32, depth=8, stages=p, virtual=virtual, key=jax.random.key(0)
    )
    n = 1
    for size in sizes.values():
        n *= size
    mesh = ep.make_mesh(**sizes, devices=jax.devices()[:n])
    loss = ep.filter_shard_map(
        lambda mod, x, y: jax.lax.pmean(
            mod.loss(x, y, schedule=schedule, microbatches=microbatches), "data"
        ),
        mesh=mesh,
        in_specs=(None, P("data"), P("data")),
        out_specs=P(),
    )
    step = eqx.filter_jit(eqx.filter_value_and_grad(loss))
    x, y = data()
    if compile_only:
        return mesh, step.lower(ep.place(model, mesh), x, y).compile()
    got = step(ep.place(model, mesh), x, y)
    want = dense_value_and_grad(model, x, y)
    return got, want


CASES = [
    pytest.param(
        p,
        m,
        schedule,
        v,
        marks=[pytest.mark.slow] if m == 4 * p else [],
        id=f"{type(schedule).__name__}-p{p}-m{m}",
    )
    for p in (2, 4)
    for m in (p, 2 * p, 4 * p)
    for schedule, v in ((GPipe(), 1), (OneFOneB(), 1), (Interleaved1F1B(2), 2))
    if not (p == 4 and v == 2)  # 4 stages x 2 chunks: test_interleaved_on_four_stages
]


@pytest.mark.parametrize("p,m,schedule,v", CASES)
def test_schedules_match_the_unpipelined_model(p, m, schedule, v):
    (loss, grads), (want_loss, want_grads) = run(dict(pipeline=p), schedule, m, virtual=v)
    assert_trees_close(loss, want_loss)
    assert_trees_close(grads, want_grads)


def test_interleaved_on_four_stages():
    (loss, grads), (want_loss, want_grads) = run(dict(pipeline=4), Interleaved1F1B(2), 8, virtual=2)
    assert_trees_close(loss, want_loss)
    assert_trees_close(grads, want_grads)


@pytest.mark.parametrize(
    "schedule,v", [(OneFOneB(), 1), (Interleaved1F1B(2), 2)], ids=["1f1b", "interleaved"]
)
def test_three_dimensional_mesh(schedule, v):
    (loss, grads), (want_loss, want_grads) = run(
        dict(data=2, tensor=2, pipeline=2), schedule, 4, virtual=v
    )
    assert_trees_close(loss, want_loss)
    assert_trees_close(grads, want_grads)


def test_zero_bubble_matches_the_unpipelined_model():
    (loss, grads), (want_loss, want_grads) = run(dict(data=2, pipeline=4), ZeroBubbleH1(), 8)
    assert_trees_close(loss, want_loss)
    assert_trees_close(grads, want_grads)


def test_only_permutes_and_final_sums_cross_stages():
    m = 4
    mesh, compiled = run(dict(pipeline=2, data=2), OneFOneB(), m, compile_only=True)
    report = count_collectives(compiled, mesh)
    table = OneFOneB().table(2, m).split()  # what the executor runs
    pipeline_ops = [r for r in report.records if "pipeline" in r.axes]
    kinds = {r.kind for r in pipeline_ops}
    assert kinds <= {"collective-permute", "all-reduce"}
    # In the tick loop, one permute per set of stage pairs the table sends over (here
    # stage 0 to 1 forward, 1 to 0 backward), each in a branch of a per-tick switch
    # that selects it only on the ticks where that set receives something (the counter
    # counts a branch once per tick: an upper bound).
    assert table.send_pairs("F") == ((), ((0, 1),)) and table.send_pairs("B") == ((), ((1, 0),))
    permutes = [r for r in pipeline_ops if r.kind == "collective-permute"]
    assert sorted(len(r.pairs) for r in permutes) == [2, 2]  # one pair per data shard
    assert report.count("collective-permute", axis="pipeline") == 2 * table.num_ticks
    arrays = table.as_arrays()
    sends = int((arrays["permute_f"] > 0).sum() + (arrays["permute_b"] > 0).sum())
    assert sends == 2 * m  # one activation and one gradient per microbatch cross the boundary
    assert sends < 2 * table.num_ticks
    # All-reduces over the pipeline only after the loop: the loss and the gradients of
    # the first and last stage's parameters (no loop multiplicity).
    assert all(r.count == 1 for r in pipeline_ops if r.kind == "all-reduce")


@pytest.mark.parametrize("m", [4, 8, 16])
def test_activation_slots_bounded_by_schedule(m):
    p = 4
    assert GPipe().table(p, m).num_slots >= m
    assert OneFOneB().table(p, m).num_slots <= p + 1


def test_interleaved_model_runs_the_interleaved_schedule_by_default():
    # Two chunks per stage: the default schedule must run both (it once ran only the
    # first, and the loss silently differed from the model's).
    (got_loss, got), (want_loss, want) = run(dict(pipeline=2), None, 4, virtual=2)
    assert_trees_close(got_loss, want_loss)
    assert_trees_close(got, want, rtol=1e-4, atol=1e-6)


def test_schedule_must_match_the_chunks_per_stage():
    with pytest.raises(
        ValueError, match=r"runs 1 chunk\(s\) per stage but the model has virtual=2"
    ):
        run(dict(pipeline=2), OneFOneB(), 4, virtual=2)
    # pipeline_loss itself checks the stacked stage parameters against the table.
    mesh = ep.make_mesh(pipeline=2, devices=jax.devices()[:2])
    stacked = jnp.ones((2, 2, 1, 3))  # (virtual=2, stages=2, layers=1, width)

    def loss(w, x):
        return pipeline_loss(
            lambda _, x: x,
            lambda c, h, key: h * c,
            lambda _, h, t: jnp.sum(h),
            None,
            w,
            None,
            x,
            x,
            table=OneFOneB().table(2, 2),
        )

    mapped = ep.filter_shard_map(
        loss, mesh=mesh, in_specs=(P(None, "pipeline"), P()), out_specs=P()
    )
    with pytest.raises(ValueError, match=r"holds 2 chunks per stage, but the table runs virtual=1"):
        mapped(stacked, jnp.ones((2, 3)))
    # A stage dim that is not split over the pipeline axis would run stage 0's chunk
    # everywhere.
    whole = ep.filter_shard_map(loss, mesh=mesh, in_specs=(P(), P()), out_specs=P())
    with pytest.raises(ValueError, match=r"stage dim \(dim 1\) holds 2 stages"):
        whole(stacked[:1], jnp.ones((2, 3)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="do not split into stages x virtual"):
        PPClassifier(12, 5, depth=6, stages=4, key=jax.random.key(0))
    model = PPClassifier(12, 5, depth=4, stages=2, key=jax.random.key(0))
    mesh = ep.make_mesh(pipeline=4, devices=jax.devices()[:4])
    x, y = data()
    bad_stages = ep.filter_shard_map(
        lambda mod, x, y: mod.loss(x, y, microbatches=4),
        mesh=mesh,
        in_specs=(P(), P(), P()),
        out_specs=P(),
    )
    with pytest.raises(ValueError, match="the schedule has 2 stages but mesh axis 'pipeline'"):
        bad_stages(model, x, y)
    mesh = ep.make_mesh(pipeline=2, devices=jax.devices()[:2])
    odd = ep.filter_shard_map(
        lambda mod, x, y: mod.loss(x, y, microbatches=5),
        mesh=mesh,
        in_specs=(None, P(), P()),
        out_specs=P(),
    )
    with pytest.raises(ValueError, match="does not split into 5 microbatches"):
        odd(ep.place(model, mesh), x, y)


TRANSFORMER = TransformerConfig(
    vocab_size=40, dim=24, num_layers=4, num_heads=4, mlp_dim=32, max_seq_len=16
)


def tokens():
    x = jax.random.randint(jax.random.key(1), (8, 8), 0, 40)
    return x, jnp.roll(x, -1, axis=1)


@pytest.mark.parametrize(
    "changes,sizes,m",
    [
        (dict(pipeline_stages=2), dict(data=2, tensor=2, pipeline=2), 2),
        pytest.param(  # interleaving itself is tested fast on PPClassifier
            dict(pipeline_stages=2, virtual_stages=2, sequence_parallel=True, tie_embeddings=True),
            dict(tensor=2, pipeline=2),
            4,
            marks=pytest.mark.slow,
        ),
    ],
    ids=["3d-1f1b", "interleaved-sp-tied"],
)
def test_transformer_on_pipeline_meshes(changes, sizes, m):
    config = TRANSFORMER.replace(**changes)
    model = Transformer(config, key=jax.random.key(0))
    x, y = tokens()
    n = 1
    for size in sizes.values():
        n *= size
    mesh = ep.make_mesh(**sizes, devices=jax.devices()[:n])
    loss = ep.filter_shard_map(
        lambda mod, a, b: jax.lax.pmean(mod.loss(a, b, microbatches=m), "data"),
        mesh=mesh,
        in_specs=(None, P("data"), P("data")),
        out_specs=P(),
    )
    got_loss, got = eqx.filter_jit(eqx.filter_value_and_grad(loss))(ep.place(model, mesh), x, y)
    want_loss, want = dense_value_and_grad(model, x, y)
    assert_trees_close(got_loss, want_loss)
    assert_trees_close(got, want, rtol=1e-4, atol=1e-6)
    # The same weights without pipelining: the layer layout is a reshape.
    plain = model.with_config(pipeline_stages=1, virtual_stages=1, sequence_parallel=False)
    assert plain.layers.mlp.up.weight.shape == (4, 32, 24)
    assert_trees_close(plain.loss(x, y), want_loss)


def test_transformer_trains_with_fsdp_and_pipeline():
    config = TRANSFORMER.replace(pipeline_stages=2)
    mesh = ep.make_mesh(data=2, tensor=2, pipeline=2)
    optimizer = optax.sgd(0.5, momentum=0.9)
    state = ep.train.init_state(
        Transformer,
        config,
        key=jax.random.key(0),
        optimizer=optimizer,
        mesh=mesh,
        strategy=ep.train.Strategy("fsdp", min_shard_size=64),
    )
    step = ep.train.make_train_step(
        lambda mod, a, b, key: mod.loss(a, b, schedule=GPipe(), microbatches=2),
        optimizer,
        mesh=mesh,
        strategy=ep.train.Strategy("fsdp", min_shard_size=64),
    )
    x, y = tokens()
    state, metrics = step(state, x, y)
    model = Transformer(config, key=jax.random.key(0))
    loss, grads = dense_value_and_grad(model, x, y)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    updates, _ = optimizer.update(grads, opt_state)
    want = eqx.apply_updates(model, updates)
    assert_trees_close(metrics["loss"], loss)
    assert_trees_close(
        eqx.filter(state.model, eqx.is_array), eqx.filter(want, eqx.is_array), atol=2e-5
    )
    assert "pipeline" in state.model.layers.mlp.up.weight.sharding.spec


def accumulated_reference(model, x, y, key, shards, m):
    """The unpipelined model over each data shard's microbatches, microbatch `i` with
    `fold_in(key, i)` (gradient accumulation's keys): the mean loss and its gradient."""

    def loss(model):
        rows = x.shape[0] // (shards * m)
        total = 0.0
        for d in range(shards):
            for i in range(m):
                at = slice((d * m + i) * rows, (d * m + i + 1) * rows)
                total += model.loss(x[at], y[at], key=jax.random.fold_in(key, i))
        return total / (shards * m)

    return eqx.filter_jit(eqx.filter_value_and_grad(loss))(model)


@pytest.mark.parametrize(
    "schedule,changes,m",
    [
        (ZeroBubbleH1(), dict(pipeline_stages=2), 4),
        pytest.param(None, dict(pipeline_stages=2, virtual_stages=2), 2, marks=pytest.mark.slow),
    ],
    ids=["zero-bubble", "interleaved"],
)
def test_transformer_pipeline_with_dropout_equals_the_dense_model(schedule, changes, m):
    # data=2 x pipeline=2 x tensor=2; dropout on the residuals and the attention
    # probabilities: microbatch i runs with fold_in(key, i), as gradient accumulation
    # does, and every layer gets the key the unpipelined model gives it, so the
    # pipelined loss and gradients are the accumulated dense model's.
    config = TRANSFORMER.replace(dropout=0.3, attention_dropout=0.2, **changes)
    model = Transformer(config, key=jax.random.key(0))
    x, y = tokens()
    key = jax.random.key(7)
    mesh = ep.make_mesh(data=2, tensor=2, pipeline=2)
    loss = ep.filter_shard_map(
        lambda mod, a, b, k: jax.lax.pmean(
            mod.loss(a, b, key=k, schedule=schedule, microbatches=m), "data"
        ),
        mesh=mesh,
        in_specs=(None, P("data"), P("data"), P()),
        out_specs=P(),
    )
    got_loss, got = eqx.filter_jit(eqx.filter_value_and_grad(loss))(
        ep.place(model, mesh), x, y, key
    )
    want_loss, want = accumulated_reference(model, x, y, key, 2, m)
    no_dropout, _ = dense_value_and_grad(model, x, y)
    assert abs(float(want_loss) - float(no_dropout)) > 1e-3  # the masks matter
    assert_trees_close(got_loss, want_loss)
    assert_trees_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("policy", ["none", "full"])
def test_a_forward_stores_activations_not_weights(policy):
    # The executor keeps each layer's vjp residuals per slot, except the ones that are
    # the layer's own weights or depend on them alone (transposes, casts): those are
    # taken or recomputed from the parameters in B and W.
    from eqxpar.pipeline._executor import _Layers
    from models._block import TransformerBlock

    block = TransformerBlock(TRANSFORMER, key=jax.random.key(0))
    dyn, static = eqx.partition(block, eqx.is_array)
    fn = ep.nn.remat(lambda w, x, k: ep.nn.apply_layer(eqx.combine(w, static), x, k), policy)
    x = jnp.ones((3, 8, TRANSFORMER.dim))
    layers = _Layers(fn, dyn, x, None)
    weights = jax.tree.leaves(dyn)
    stored = [tuple(r.shape) for r in layers.stored]
    assert stored and not {tuple(w.shape) for w in weights} & set(stored)
    assert layers.which is not None
    assert any(i >= 0 for i in layers.which) or any(layers.weight_only)
    if policy == "full":  # a checkpointed layer keeps only its input
        assert stored == [x.shape]
    else:
        assert len(stored) > 3
