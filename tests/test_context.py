"""Context parallelism: ring (and all-gather) attention over a sequence split over the
"context" axis, in both layouts, against dense causal attention; the Transformer and
the train step with the sequence split; the collectives that cross the context axis."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, mesh_of
from jax.sharding import PartitionSpec as P

import eqxpar as ep
from eqxpar.nn import attention_blocks, blockwise_attention, context_order, ring_attention
from eqxpar.profile import count_collectives
from eqxpar.train import Strategy, init_state, make_train_step
from models import Transformer, TransformerConfig

# Pairwise-distinct sizes: batch, sequence, heads, KV heads, head_dim.
B, S, H, KV, D = 2, 48, 6, 3, 8


def dense_attention(q, k, v, causal=True):
    """The textbook reference: the whole score matrix, a masked softmax."""
    b, s, h, d = q.shape
    g = h // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    scores = jnp.einsum("bqhd,bthd->bhqt", q, k) / np.sqrt(d)
    if causal:
        scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -jnp.inf)
    return jnp.einsum("bhqt,bthd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def qkv_and_cotangent(seed=0, heads=H, kv_heads=KV, seq=S):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, seq, heads, D))
    k = jax.random.normal(ks[1], (B, seq, kv_heads, D))
    v = jax.random.normal(ks[2], (B, seq, kv_heads, D))
    return (q, k, v), jax.random.normal(ks[3], (B, seq, heads, D))


def value_and_vjp(fn, args, ct):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(ct)


@functools.cache
def dense_result(heads=H, kv_heads=KV, causal=True):
    args, ct = qkv_and_cotangent(heads=heads, kv_heads=kv_heads)
    fn = functools.partial(dense_attention, causal=causal)
    return jax.jit(functools.partial(value_and_vjp, fn))(args, ct)


def test_the_dense_reference_is_jax_dot_product_attention():
    (q, k, v), _ = qkv_and_cotangent()
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(dense_attention(q, k, v), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "block_size,causal",
    [(48, True), (5, True), (8, False), pytest.param(8, True, marks=pytest.mark.slow)],
)
def test_blockwise_attention_matches_dense(block_size, causal):
    args, ct = qkv_and_cotangent()
    fn = functools.partial(blockwise_attention, causal=causal, block_size=block_size)
    got = jax.jit(functools.partial(value_and_vjp, fn))(args, ct)
    assert_trees_close(got, dense_result(causal=causal), rtol=1e-5, atol=2e-5)


def _scanned_temporaries(attention, seq):
    """Compiled temporaries of the gradient of two attention layers run by a scan (as
    the Transformer runs its layers)."""
    x = jnp.ones((1, seq, 4, 16))

    def loss(x, scales):
        layer = lambda h, w: (attention(h * w, h, h), None)  # noqa: E731
        return jnp.sum(jax.lax.scan(layer, x, scales)[0])

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, jnp.ones(2)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_with_the_sequence_not_its_square():
    blockwise = functools.partial(blockwise_attention, block_size=128)
    dense = functools.partial(jax.nn.dot_product_attention, is_causal=True)
    grow = [
        _scanned_temporaries(f, 1024) / _scanned_temporaries(f, 512) for f in (blockwise, dense)
    ]
    # Doubling the sequence: the dense scores quadruple; the blockwise kernel's memory
    # at most doubles (nothing of size seq^2 is kept, not even the causal masks that a
    # scan over layers would otherwise hoist and store per block).
    assert grow[0] < 2.05 and grow[1] > 3.5, grow


def sharded(fn, mesh, *, layout):
    """`fn` on per-shard (q, k, v), wrapped to take and return the global sequence in
    order: permute into the layout, split over "context", and permute back."""
    c = mesh.shape["context"]
    order = context_order(S, c, layout=layout)
    inverse = context_order(S, c, layout=layout, inverse=True)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=P(None, "context"), out_specs=P(None, "context"))
    return lambda q, k, v: mapped(q[:, order], k[:, order], v[:, order])[:, inverse]


RING_CASES = [
    (c, layout, strategy, heads, kv)
    for c in (2, 4, 8)
    for layout in ("load_balanced", "contiguous")
    for strategy in ("ring", "all_gather")
    for heads, kv in [(H, KV)]
    if strategy == "ring" or c == 4
] + [(2, "load_balanced", "ring", H, H), (8, "load_balanced", "ring", H, 1)]
# The fast suite: each context size, layout and strategy once, and the widest GQA.
FAST = {
    (2, "load_balanced", "ring", H, KV),
    (4, "contiguous", "ring", H, KV),
    (4, "load_balanced", "all_gather", H, KV),
    (8, "load_balanced", "ring", H, 1),
}


@pytest.mark.parametrize(
    "c,layout,strategy,heads,kv",
    [pytest.param(*case, marks=[] if case in FAST else [pytest.mark.slow]) for case in RING_CASES],
    ids=[f"c{c}-{layout}-{strategy}-h{h}kv{kv}" for c, layout, strategy, h, kv in RING_CASES],
)
def test_ring_attention_matches_dense(c, layout, strategy, heads, kv):
    mesh = mesh_of(context=c)
    args, ct = qkv_and_cotangent(heads=heads, kv_heads=kv)
    fn = functools.partial(ring_attention, layout=layout, strategy=strategy, block_size=4)
    got = jax.jit(functools.partial(value_and_vjp, sharded(fn, mesh, layout=layout)))(args, ct)
    assert_trees_close(got, dense_result(heads, kv), rtol=1e-5, atol=2e-5)


def test_outside_shard_map_ring_attention_is_dense_attention():
    args, ct = qkv_and_cotangent()
    got = jax.jit(functools.partial(value_and_vjp, ring_attention))(args, ct)
    assert_trees_close(got, dense_result(), rtol=1e-5, atol=2e-5)


def test_context_order_and_its_inverse():
    order = context_order(16, 4)
    # Device i holds chunks i and 2c-1-i of 8 chunks of 2 tokens.
    assert order.reshape(4, 4).tolist() == [
        [0, 1, 14, 15],
        [2, 3, 12, 13],
        [4, 5, 10, 11],
        [6, 7, 8, 9],
    ]
    inverse = context_order(16, 4, inverse=True)
    np.testing.assert_array_equal(order[inverse], np.arange(16))
    np.testing.assert_array_equal(context_order(12, 4, layout="contiguous"), np.arange(12))
    with pytest.raises(ValueError, match="does not split into 8 chunks"):
        context_order(12, 4)


def test_load_balanced_layout_equalises_the_causal_work():
    balanced = attention_blocks(S, 4, layout="load_balanced", block_size=6)
    contiguous = attention_blocks(S, 4, layout="contiguous", block_size=6)
    # 8 blocks of 6 tokens: 36 visible (query, key) block pairs of 64 in all.
    assert balanced == [9, 9, 9, 9]
    assert contiguous == [3, 7, 11, 15]
    assert attention_blocks(S, 4, block_size=6, causal=False) == [16] * 4


@functools.cache
def _attention_collectives(strategy):
    """The collectives of one attention forward and backward on context=4, per shard
    (inputs already split, so only attention's own communication shows)."""
    mesh = mesh_of(context=4)
    args, ct = qkv_and_cotangent()
    fn = functools.partial(ring_attention, strategy=strategy)
    spec = P(None, "context")
    mapped = jax.shard_map(
        lambda q, k, v, ct: value_and_vjp(fn, (q, k, v), ct),
        mesh=mesh,
        in_specs=spec,
        out_specs=spec,
    )
    compiled = jax.jit(mapped).lower(*args, ct).compile()
    return count_collectives(compiled, mesh)


def test_ring_crosses_the_context_axis_only_with_permutes():
    report = _attention_collectives("ring")
    c = 4
    # Forward: K and V, c-1 hops. Backward: K, V, dK, dV, c-1 hops, plus dK, dV home.
    assert report.count(axis="context") == report.count("collective-permute", "context")
    kv = B * (S // c) * KV * D * 4
    assert report.bytes("collective-permute", "context") == (2 * (c - 1) + 4 * (c - 1) + 2) * kv


def test_all_gather_strategy_gathers_forward_and_reduce_scatters_backward():
    report = _attention_collectives("all_gather")
    assert report.count("collective-permute", "context") == 0
    assert report.count("all-gather", "context") == 2  # K and V
    assert report.count("reduce-scatter", "context") == 2  # dK and dV
    assert report.count(axis="context") == 4


# ---------------------------------------------------------------------------------------
# The Transformer and the train step with the sequence split over "context".

CONFIG = TransformerConfig(
    vocab_size=40, dim=24, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=36, max_seq_len=32
)
T_BATCH, T_SEQ = 4, 16


def lm_data(seed=0, batch=T_BATCH):
    x = jax.random.randint(jax.random.key(seed), (batch, T_SEQ + 1), 0, CONFIG.vocab_size)
    return x[:, :-1], x[:, 1:]


def dense_loss(model, x, y, key=None):
    return jnp.mean(model.per_token_loss(x, y, key=key))


TRANSFORMER_CASES = [
    # Slow (whole-model compiles; CI runs them): the fast suite checks the attention
    # they are built on, and positions, in the tests above.
    pytest.param(
        dict(data=2, context=2, tensor=2),
        dict(context_parallel="ring", sequence_parallel=True),
        id="d2c2t2-ring-sp",
        marks=pytest.mark.slow,
    ),
    # Residual dropout: masks follow the tokens' global positions, so they match the
    # dense model's (one data shard: masks are drawn per position for the local rows).
    pytest.param(
        dict(context=4, tensor=2),
        dict(context_parallel="ring", sequence_parallel=True, dropout=0.2),
        id="c4t2-ring-sp-dropout",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        dict(context=8), dict(context_parallel="ring"), id="c8-ring", marks=pytest.mark.slow
    ),
    pytest.param(
        dict(data=2, context=4),
        dict(context_parallel="all_gather", context_layout="contiguous"),
        id="d2c4-allgather-contiguous",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("sizes,changes", TRANSFORMER_CASES)
def test_transformer_loss_and_gradients_equal_the_dense_model(sizes, changes):
    config = CONFIG.replace(**changes)
    model = Transformer(config, key=jax.random.key(1))
    mesh = mesh_of(**sizes)
    c, layout = mesh.shape["context"], config.context_layout
    order = context_order(T_SEQ, c, layout=layout)
    inverse = context_order(T_SEQ, c, layout=layout, inverse=True)
    x, y = lm_data()
    key = jax.random.key(7) if config.dropout else None

    def local(m, x, y):
        logits = m(x)
        loss = jax.lax.pmean(jnp.mean(m.per_token_loss(x, y, key=key)), ("data", "context"))
        return logits, loss

    mapped = ep.filter_shard_map(
        local,
        mesh=mesh,
        in_specs=(None, P("data", "context"), P("data", "context")),
        out_specs=(P("data", "context", "tensor"), P()),
    )

    @eqx.filter_jit
    def run(m, x, y):
        x, y = x[:, order], y[:, order]
        loss, grads = eqx.filter_value_and_grad(lambda m: mapped(m, x, y)[1])(m)
        return mapped(m, x, y)[0], loss, grads

    logits, loss, grads = run(ep.place(model, mesh), x, y)
    dense = model.with_config(context_parallel=None, sequence_parallel=False)
    want_loss, want_grads = eqx.filter_jit(eqx.filter_value_and_grad(dense_loss))(
        dense, x, y, key=key
    )
    np.testing.assert_allclose(logits[:, inverse], eqx.filter_jit(dense)(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    grads = grads.with_config(context_parallel=None, sequence_parallel=False)
    assert_trees_close(
        eqx.filter(grads, eqx.is_array), eqx.filter(want_grads, eqx.is_array), atol=1e-6
    )


OPTIMIZER = optax.sgd(0.5, momentum=0.9)  # linear in the gradients: exact comparisons


def lm_loss(model, x, y, key):
    return jnp.mean(model.per_token_loss(x, y))


@functools.cache
def context_step(kind, strategy="ring"):
    """The state and the compiled train step on data=2, context=4 (shared by the
    training and the communication tests)."""
    config = CONFIG.replace(context_parallel=strategy)
    mesh = mesh_of(data=2, context=4)
    plan = Strategy(kind, min_shard_size=256)  # splits the large arrays only
    state = init_state(
        Transformer, config, key=jax.random.key(2), optimizer=OPTIMIZER, mesh=mesh, strategy=plan
    )
    step = make_train_step(
        lm_loss, OPTIMIZER, mesh=mesh, strategy=plan, batch_specs=(P("data", "context"),) * 2
    )
    x, _ = lm_data()
    return state, step.lower(state, x, x).compile(), mesh


# Slow (a train step to compile; CI runs them), as is docs/context-parallel.md, which
# checks each step's loss on data=2, context=4.
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["zero2", "fsdp"])
def test_two_train_steps_on_data_and_context_equal_single_device_training(kind):
    state, step, _ = context_step(kind)
    order = context_order(T_SEQ, 4)
    # The dense twin: plain Optax on the unsplit model.
    model = Transformer(CONFIG, key=jax.random.key(2))
    opt_state = OPTIMIZER.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def dense_step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(dense_loss)(model, x, y)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    for x, y in [lm_data(seed) for seed in (3, 4)]:
        state, metrics = step(state, x[:, order], y[:, order])
        model, opt_state, loss = dense_step(model, opt_state, x, y)
        np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    got = eqx.filter(state.model.with_config(context_parallel=None), eqx.is_array)
    assert_trees_close(got, eqx.filter(model, eqx.is_array), atol=2e-6)
    assert int(state.step) == 2


def _over_context(report):
    """(kind, axes) -> executions, for the collectives whose group crosses "context"."""
    rows = {}
    for r in report.records:
        if "context" in r.axes:
            rows[r.kind, r.axes] = rows.get((r.kind, r.axes), 0) + r.count
    return rows


@pytest.mark.slow  # attention's own permutes are counted fast above
def test_train_step_crosses_context_with_permutes_and_the_gradient_reduction():
    _, step, mesh = context_step("zero2")
    rows = _over_context(count_collectives(step, mesh))
    c, layers = 4, CONFIG.num_layers
    # Per layer: K, V forward c-1 hops; backward K, V, dK, dV c-1 hops and dK, dV home.
    assert rows.pop(("collective-permute", ("context",))) == layers * (6 * (c - 1) + 2)
    # What is left reduces gradients (and the loss) over data and context together, or,
    # for ZeRO-2's reduce-scattered blocks, over context after the data reduce-scatter.
    assert set(rows) <= {("all-reduce", ("data", "context")), ("all-reduce", ("context",))}


@pytest.mark.slow
def test_all_gather_train_step_gathers_and_reduce_scatters_over_context():
    _, step, mesh = context_step("dp", "all_gather")
    rows = _over_context(count_collectives(step, mesh))
    layers = CONFIG.num_layers
    assert rows.pop(("all-gather", ("context",))) == 2 * layers  # K and V
    assert rows.pop(("reduce-scatter", ("context",))) == 2 * layers  # dK and dV
    assert set(rows) == {("all-reduce", ("data", "context"))}


def test_misconfigurations_raise_naming_the_fix():
    with pytest.raises(ValueError, match="attention_dropout"):
        CONFIG.replace(context_parallel="ring", attention_dropout=0.1)
    with pytest.raises(ValueError, match="context_layout"):
        CONFIG.replace(context_parallel="ring", context_layout="striped")
    model = Transformer(CONFIG, key=jax.random.key(0))
    mesh = mesh_of(context=2)
    x, y = lm_data()
    # The sequence split over "context" but the model not told: each shard would
    # attend only to itself.
    fn = ep.filter_shard_map(
        lambda m, x: m(x), mesh=mesh, in_specs=(None, P(None, "context")), out_specs=P()
    )
    with pytest.raises(ValueError, match="context_parallel=None"):
        eqx.filter_eval_shape(fn, model, x)
    # The model told, but the sequence not split: every device would hold all of it.
    whole = ep.filter_shard_map(
        lambda m, x: m(x), mesh=mesh, in_specs=(None, P()), out_specs=P(None, None, "tensor")
    )
    with pytest.raises(ValueError, match="is not split"):
        eqx.filter_eval_shape(whole, model.with_config(context_parallel="ring"), x)
    # Replicated tokens on a model without context parallelism are fine (generation).
    eqx.filter_eval_shape(whole, model, x)
    # A shard that the load-balanced layout cannot halve.
    ring = ep.filter_shard_map(
        lambda m, x: m(x),
        mesh=mesh,
        in_specs=(None, P(None, "context")),
        out_specs=P(None, "context"),
    )
    with pytest.raises(ValueError, match="does not split into 4 chunks"):
        eqx.filter_eval_shape(ring, model.with_config(context_parallel="ring"), x[:, :14])
