"""Attention, MLP and norms inside `filter_shard_map` against independent dense twins.

Each twin is written here from the maths, or built from Equinox layers, and reads only
the eqxpar layer's arrays, never its methods: attention is plain softmax attention with
a causal mask, rotary positions written from the formula and grouped-query heads (and,
with as many KV heads as query heads, `eqx.nn.MultiheadAttention`); the MLP is
`eqx.nn.Linear` layers; the norms are `eqx.nn.RMSNorm` / `eqx.nn.LayerNorm`.

A twin takes the layer's arrays in the eqxpar layout (fused and interleaved rows
included) and slices them itself, so its gradients come back in that layout and are
compared array by array with the sharded layer's gradients, taken inside the shard_map
and returned global. Absent biases are passed to a twin as zeros, so each twin compiles
once for the whole file.

Random arrays come from NumPy: on CPU each `jax.random` draw of a new shape compiles a
threefry program, which cost more than all the layers' programs together.
"""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close, cotangent_loss, mesh_of
from jax.sharding import PartitionSpec as P

import eqxpar as ep
from eqxpar.nn import LayerNorm, ParallelAttention, ParallelMLP, RMSNorm

# Pairwise-distinct sizes: batch, sequence, model width, query heads, KV heads, group
# (query heads per KV head), head size, MLP hidden size. SEQ splits 4 ways (sequence
# parallelism), KV_HEADS and HIDDEN split 2 and 4 ways (tensor parallelism).
BATCH, SEQ, DIM = 2, 8, 10
HEADS, KV_HEADS, HEAD_DIM = 12, 4, 6
GROUP = HEADS // KV_HEADS  # 3
HIDDEN = 12
THETA = 100.0  # not the default, so a layer ignoring it fails; and larger angles
# XLA CPU backend at -O0: the programs here are tiny and compiling them is most of the
# file's time; this roughly halves it. Only LLVM codegen is affected, not the HLO passes.
FAST = {"xla_backend_optimization_level": 0}
KEY = functools.partial(jax.random.key, 0)  # only for abstract layers: arrays drawn below


def arrays_by_path(tree):
    """`{key path: array}` for every array of `tree` (a module, or its gradient)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): a for path, a in leaves if eqx.is_array(a)}


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def normal(rng, *shape, scale=1.0, mean=0.0):
    """A NumPy array: the jitted functions place it themselves, with no program to compile."""
    return (mean + scale * rng.standard_normal(shape)).astype(np.float32)


def random_layer(make, rng):
    """The layer `make()` builds, every array drawn from `rng` instead: a matrix
    `(out, in)` from `N(0, 1/in)`, a vector from `N(0, 1/4)`."""

    def draw(a):
        return normal(rng, *a.shape, scale=a.shape[-1] ** -0.5 if a.ndim == 2 else 0.5)

    return jax.tree.map(draw, eqx.filter_eval_shape(make))


def sharded_forward_and_grads(model, x, ct, mesh, x_spec):
    """Output and (model, input) gradients of `sum(model(x) * ct)`, taken inside the
    shard_map; the model enters, and its gradient leaves, with its declared specs. The
    output and `ct` are split like `x` along its leading dims."""

    def local(m, x, ct):
        apply = lambda mx: mx[0](mx[1])  # noqa: E731
        return apply((m, x)), eqx.filter_grad(cotangent_loss(apply, ct))((m, x))

    fn = ep.filter_shard_map(
        local, mesh=mesh, in_specs=(None, x_spec, x_spec), out_specs=(x_spec, (None, x_spec))
    )
    # `jax.jit`, not `eqx.filter_jit` (which takes no compiler options): these layers hold
    # only arrays.
    return jax.jit(fn, compiler_options=FAST)(model, x, ct)


@pytest.fixture(scope="module")
def reference():
    """`(twin, params, x, ct) -> (twin(params, x), (params grads, x grad))` on one device,
    for `sum(twin(params, x) * ct)`; compiled once per twin, shared by the whole file."""

    @functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
    def run(twin, params, x, ct):
        return twin(params, x), jax.grad(cotangent_loss(twin, ct), argnums=(0, 1))(params, x)

    return run


def check_twin(model, twin, params, x, mesh, x_spec, reference, rng, out_shape=None):
    """The sharded `model` and `twin(params, x)` agree: output, input gradient, and the
    gradient of every array of `model` (`params` holds them by key path). The output
    has `x`'s shape unless `out_shape` says otherwise."""
    ct = normal(rng, *(out_shape or x.shape))
    got_y, (got_model, got_x) = sharded_forward_and_grads(model, x, ct, mesh, x_spec)
    want_y, (want_params, want_x) = reference(twin, params, x, ct)
    got = arrays_by_path(got_model)
    assert set(got) == set(arrays_by_path(model))  # every array has a gradient
    assert_trees_close(got_y, want_y)
    assert_trees_close(got_x, want_x)
    assert_trees_close(got, {name: want_params[name] for name in got})
    for name, g in got.items():  # non-trivial ones: a dropped term cannot pass as zero
        assert np.abs(np.asarray(g)).max() > 1e-3, name


def with_zero_biases(model, *names):
    """`model`'s arrays by key path, with zeros for the biases `names` it lacks."""
    params = arrays_by_path(model)
    for name in names:
        if name not in params:
            weight = params[name.replace(".bias", ".weight")]
            params[name] = np.zeros(weight.shape[:1], np.float32)
    return params


# -- attention --------------------------------------------------------------------------


def rope(x, theta):
    """Rotary positions for `x: (batch, seq, heads, d)`: each pair `(x[..., i],
    x[..., i + d/2])`, as the complex number `x_i + j x_{i+d/2}`, is multiplied by
    `exp(j * position * theta^(-2i/d))`. Angles in float64 NumPy, positions `0..seq-1`."""
    seq, d = x.shape[1], x.shape[-1]
    i = np.arange(d // 2)
    angle = np.arange(seq)[:, None] * theta ** (-2.0 * i / d)[None, :]  # (seq, d/2)
    turn = jnp.asarray(np.exp(1j * angle)[None, :, None, :], jnp.complex64)
    z = jax.lax.complex(x[..., : d // 2], x[..., d // 2 :]) * turn
    return jnp.concatenate([jnp.real(z), jnp.imag(z)], axis=-1)


def dense_attention(p, x):
    """Causal grouped-query self-attention with RoPE, from the layer's arrays `p`.

    The fused QKV rows are grouped by KV head `j`: its GROUP query heads (global query
    head `j * GROUP + g`), then its key, then its value, HEAD_DIM rows each. Query head
    `n` reads KV head `n // GROUP`.
    """
    w = p[".qkv.weight"].reshape(KV_HEADS, GROUP + 2, HEAD_DIM, DIM)
    b = p[".qkv.bias"].reshape(KV_HEADS, GROUP + 2, HEAD_DIM)
    wq, wk, wv = w[:, :GROUP].reshape(HEADS, HEAD_DIM, DIM), w[:, GROUP], w[:, GROUP + 1]
    q = jnp.einsum("bsi,hdi->bshd", x, wq) + b[:, :GROUP].reshape(1, 1, HEADS, HEAD_DIM)
    k = jnp.einsum("bsi,hdi->bshd", x, wk) + b[None, None, :, GROUP]
    v = jnp.einsum("bsi,hdi->bshd", x, wv) + b[None, None, :, GROUP + 1]
    q, k = rope(q, THETA), rope(k, THETA)
    k, v = jnp.repeat(k, GROUP, axis=2), jnp.repeat(v, GROUP, axis=2)
    scores = jnp.einsum("bshd,bthd->bhst", q, k) / math.sqrt(HEAD_DIM)
    causal = np.tril(np.ones((SEQ, SEQ), bool))[None, None]
    probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    heads = jnp.einsum("bhst,bthd->bshd", probs, v).reshape(BATCH, SEQ, HEADS * HEAD_DIM)
    return heads @ p[".out.weight"].T + p[".out.bias"][None, None]


ATTENTION_CASES = {  # (data, tensor), use_bias, sequence_parallel
    "t2-bias": ((1, 2), True, False),  # two KV heads per device
    "d2t4-sp": ((2, 4), False, True),  # one KV head per device, batch over data
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_matches_dense_gqa_rope(case, reference, rng):
    (data, tensor), use_bias, sp = ATTENTION_CASES[case]
    make = functools.partial(
        ParallelAttention,
        DIM,
        HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        use_bias=use_bias,
        rope_theta=THETA,
        sequence_parallel=sp,
    )
    attn = random_layer(lambda: make(key=KEY()), rng)
    x = normal(rng, BATCH, SEQ, DIM)
    params = with_zero_biases(attn, ".qkv.bias", ".out.bias")
    x_spec = P("data", "tensor") if sp else P("data")
    mesh = mesh_of(data, tensor)
    check_twin(attn, dense_attention, params, x, mesh, x_spec, reference, rng)


MHA_HEADS = 4  # num_kv_heads == num_heads: KV head j's rows are its (q, k, v)


def equinox_attention(p, x):
    """`eqx.nn.MultiheadAttention` holding the layer's arrays `p`, with RoPE applied to
    the heads by `eqx.nn.RotaryPositionalEmbedding` (default theta) via `process_heads`."""
    make = functools.partial(
        eqx.nn.MultiheadAttention,
        MHA_HEADS,
        DIM,
        qk_size=HEAD_DIM,
        vo_size=HEAD_DIM,
        use_query_bias=True,
        use_key_bias=True,
        use_value_bias=True,
        use_output_bias=True,
    )
    mha = eqx.filter_eval_shape(lambda: make(key=KEY()))  # arrays set below
    w = p[".qkv.weight"].reshape(MHA_HEADS, 3, HEAD_DIM, DIM)
    b = p[".qkv.bias"].reshape(MHA_HEADS, 3, HEAD_DIM)
    projections = lambda m: (m.query_proj, m.key_proj, m.value_proj)  # noqa: E731
    mha = eqx.tree_at(
        lambda m: [
            *(lin.weight for lin in projections(m)),
            *(lin.bias for lin in projections(m)),
            *(m.output_proj.weight, m.output_proj.bias),
        ],
        mha,
        [
            *(w[:, r].reshape(MHA_HEADS * HEAD_DIM, DIM) for r in range(3)),
            *(b[:, r].reshape(MHA_HEADS * HEAD_DIM) for r in range(3)),
            *(p[".out.weight"], p[".out.bias"]),
        ],
    )
    rotate = jax.vmap(eqx.nn.RotaryPositionalEmbedding(HEAD_DIM), in_axes=1, out_axes=1)

    def process_heads(q, k, v):  # each (seq, heads, head_dim)
        return rotate(q), rotate(k), v

    mask = jnp.tril(jnp.ones((SEQ, SEQ), bool))
    return jax.vmap(lambda t: mha(t, t, t, mask=mask, process_heads=process_heads))(x)


def test_attention_matches_equinox_multihead_attention(reference, rng):
    # Default rope_theta, as eqx.nn.RotaryPositionalEmbedding's.
    make = functools.partial(ParallelAttention, DIM, MHA_HEADS, head_dim=HEAD_DIM, use_bias=True)
    attn = random_layer(lambda: make(key=KEY()), rng)
    x = normal(rng, BATCH, SEQ, DIM)
    params = arrays_by_path(attn)
    check_twin(attn, equinox_attention, params, x, mesh_of(2, 2), P("data"), reference, rng)


# -- MLP --------------------------------------------------------------------------------


def linear(weight, bias):
    """`eqx.nn.Linear` holding `weight: (out, in)` and `bias`, on `(batch, seq, in)`."""
    out_features, in_features = weight.shape
    lin = eqx.filter_eval_shape(lambda: eqx.nn.Linear(in_features, out_features, key=KEY()))
    lin = eqx.tree_at(lambda m: (m.weight, m.bias), lin, (weight, bias))
    return jax.vmap(jax.vmap(lin))


def dense_mlp_gelu(p, x):
    up = linear(p[".up.weight"], p[".up.bias"])
    return linear(p[".down.weight"], p[".down.bias"])(jax.nn.gelu(up(x), approximate=True))


def dense_mlp_swiglu(p, x):
    """De-interleaves the fused rows: row 2i is gate unit i, row 2i + 1 value unit i."""
    gate = linear(p[".up.weight"][0::2], p[".up.bias"][0::2])
    value = linear(p[".up.weight"][1::2], p[".up.bias"][1::2])
    return linear(p[".down.weight"], p[".down.bias"])(jax.nn.silu(gate(x)) * value(x))


MLP_TWINS = {"gelu": dense_mlp_gelu, "swiglu": dense_mlp_swiglu}
MLP_CASES = {  # (data, tensor), use_bias, sequence_parallel
    "t2-bias": ((1, 2), True, False),
    "d2t4-sp": ((2, 4), False, True),
}


@pytest.mark.parametrize("case", list(MLP_CASES))
@pytest.mark.parametrize("activation", list(MLP_TWINS))
def test_mlp_matches_equinox_linears(activation, case, reference, rng):
    (data, tensor), use_bias, sp = MLP_CASES[case]
    make = functools.partial(
        ParallelMLP, DIM, HIDDEN, activation=activation, use_bias=use_bias, sequence_parallel=sp
    )
    mlp = random_layer(lambda: make(key=KEY()), rng)
    x = normal(rng, BATCH, SEQ, DIM)
    params = with_zero_biases(mlp, ".up.bias", ".down.bias")
    x_spec = P("data", "tensor") if sp else P("data")
    mesh = mesh_of(data, tensor)
    check_twin(mlp, MLP_TWINS[activation], params, x, mesh, x_spec, reference, rng)


# -- norms ------------------------------------------------------------------------------

EPS = 0.05  # neither library's default (1e-6, 1e-5); large enough to change the output


def equinox_rmsnorm(p, x):
    norm = eqx.tree_at(lambda m: m.weight, eqx.nn.RMSNorm(DIM, EPS, use_bias=False), p[".weight"])
    return jax.vmap(jax.vmap(norm))(x)


def equinox_layernorm(p, x):
    norm = eqx.tree_at(
        lambda m: (m.weight, m.bias), eqx.nn.LayerNorm(DIM, EPS), (p[".weight"], p[".bias"])
    )
    return jax.vmap(jax.vmap(norm))(x)


NORM_TWINS = {"rmsnorm": (RMSNorm, equinox_rmsnorm), "layernorm": (LayerNorm, equinox_layernorm)}
NORM_CASES = {  # (data, tensor), sequence_parallel
    "d2t2": ((2, 2), False),
    "d2t4-sp": ((2, 4), True),
}


@pytest.mark.parametrize("case", list(NORM_CASES))
@pytest.mark.parametrize("kind", list(NORM_TWINS))
def test_norm_matches_equinox(kind, case, reference, rng):
    (data, tensor), sp = NORM_CASES[case]
    cls, twin = NORM_TWINS[kind]
    # Random weight (and bias), not ones (and zeros), so that an ignored one fails.
    norm = random_layer(lambda: cls(DIM, EPS, sequence_parallel=sp), rng)
    params = arrays_by_path(norm)
    # Shifted and scaled, so that LayerNorm's mean and both eps matter.
    x = normal(rng, BATCH, SEQ, DIM, scale=0.3, mean=0.5)
    x_spec = P("data", "tensor") if sp else P("data")
    mesh = mesh_of(data, tensor)
    check_twin(norm, twin, params, x, mesh, x_spec, reference, rng)


# -- the TP classifier (models.TPClassifier) ----------------------------------------------

# Pairwise-distinct: rows, features, classes, width, hidden, blocks. ROWS splits over
# data x tensor = 8 (sequence parallelism splits each data shard's rows over tensor).
ROWS, FEATURES, CLASSES, WIDTH, CLS_HIDDEN, BLOCKS = 16, 6, 5, 8, 12, 3


def equinox_classifier(p, x):
    """`TPClassifier` from `eqx.nn.Linear` and `eqx.nn.LayerNorm` with its arrays:
    embed, then `x + down(gelu(up(norm(x))))` per block, then norm and head."""

    def linear(name, a):
        w = p[f"{name}.weight"]
        layer = eqx.nn.Linear(w.shape[1], w.shape[0], key=KEY())
        return jax.vmap(eqx.tree_at(lambda m: (m.weight, m.bias), layer, (w, p[f"{name}.bias"])))(a)

    def norm(name, a):
        layer = eqx.tree_at(
            lambda m: (m.weight, m.bias),
            eqx.nn.LayerNorm(WIDTH),
            (p[f"{name}.weight"], p[f"{name}.bias"]),
        )
        return jax.vmap(layer)(a)

    h = linear(".embed", x)
    for i in range(BLOCKS):
        up = linear(f".blocks[{i}].up", norm(f".blocks[{i}].norm", h))
        h = h + linear(f".blocks[{i}].down", jax.nn.gelu(up))
    return linear(".head", norm(".norm", h))


CLASSIFIER_CASES = {  # (data, tensor), sequence_parallel
    "t2": ((1, 2), False),
    "d2t4-sp": ((2, 4), True),
    "d4t2-sp": ((4, 2), True),
}


@pytest.mark.parametrize("case", list(CLASSIFIER_CASES))
def test_tp_classifier_matches_equinox_layers(case, reference, rng):
    from models import TPClassifier

    (data, tensor), sp = CLASSIFIER_CASES[case]
    make = functools.partial(
        TPClassifier, FEATURES, CLASSES, WIDTH, CLS_HIDDEN, BLOCKS, sequence_parallel=sp
    )
    model = random_layer(lambda: make(key=KEY()), rng)
    x = normal(rng, ROWS, FEATURES)
    check_twin(
        model,
        equinox_classifier,
        arrays_by_path(model),
        x,
        mesh_of(data, tensor),
        P("data"),
        reference,
        rng,
        out_shape=(ROWS, CLASSES),
    )


def test_tp_classifier_refuses_rows_that_do_not_split_over_tensor(rng):
    from models import TPClassifier

    model = TPClassifier(FEATURES, CLASSES, WIDTH, CLS_HIDDEN, 1, sequence_parallel=True, key=KEY())
    x = normal(rng, 6, FEATURES)  # 6 rows on data=1, tensor=4
    fn = ep.filter_shard_map(
        lambda m, x: m(x), mesh=mesh_of(1, 4), in_specs=(None, P()), out_specs=P()
    )
    with pytest.raises(
        ValueError, match=r"size 6, which does not split over 'tensor' \(4 devices\)"
    ):
        fn(model, x)
