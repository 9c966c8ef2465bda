"""Transformer training steps: eqxpar's `make_train_step` against plain Equinox + jit.

The baseline is the same model as a JAX user writes it without eqxpar: `PlainTransformer`
below, built from `eqx.nn.Embedding`, `eqx.nn.RMSNorm` and `eqx.nn.Linear` (its blocks
stacked and run by `jax.lax.scan`, attention by `jax.nn.dot_product_attention`), loaded
with the very weights of the `models.Transformer` it is compared with, so the losses
and gradients must match. Its step is `eqx.filter_jit` of `filter_value_and_grad`, the
same AdamW update, on global arrays placed with `NamedSharding` on a mesh whose axes
are all `AxisType.Auto`: XLA's SPMD partitioner inserts the collectives.

Gradients are compared through the optimizer state: after one AdamW step from zero
moments, the first moment is exactly `(1 - b1) * grad`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _harness import Built, Case, Variant, compile_timed
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PRNGKeyArray

import eqxpar as ep
from eqxpar.profile import communication_report
from eqxpar.train import init_state, make_train_step
from models import Transformer, TransformerConfig, flops_per_token

B1 = 0.9
LR = 1e-3


@dataclasses.dataclass(frozen=True)
class Sizes:
    config: TransformerConfig
    batch: int
    seq: int


SIZES = {
    "full": Sizes(
        TransformerConfig(vocab_size=4096, dim=512, num_layers=4, num_heads=8, max_seq_len=256),
        batch=8,
        seq=256,
    ),
    "smoke": Sizes(
        TransformerConfig(vocab_size=64, dim=32, num_layers=2, num_heads=8, max_seq_len=16),
        batch=8,
        seq=16,
    ),
    # --gpu: about 1B parameters (0.94e9), bf16 compute, f32 weights and Adam state.
    "gpu": Sizes(
        TransformerConfig(
            vocab_size=32000, dim=2048, num_layers=16, num_heads=16, max_seq_len=2048,
            compute_dtype="bfloat16",
        ),
        batch=2,
        seq=2048,
    ),
    "gpu-smoke": Sizes(
        TransformerConfig(
            vocab_size=64, dim=32, num_layers=2, num_heads=4, max_seq_len=16,
            compute_dtype="bfloat16",
        ),
        batch=8,
        seq=16,
    ),
}  # fmt: skip
MICROBATCHES = 4  # the pipeline case's, per data shard


def optimizer() -> optax.GradientTransformation:
    return optax.adamw(LR, b1=B1, weight_decay=0.01)


# -- the plain-Equinox twin ---------------------------------------------------------------


def rotary(x: Array, theta: float) -> Array:
    """RoFormer rotary embedding of `x: (b, s, heads, d)` at positions `0..s-1`."""
    d, s = x.shape[-1], x.shape[1]
    freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
    angle = jnp.arange(s, dtype=jnp.float32)[:, None] * freq[None, :]
    cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _per_token(layer: Callable, x: Array) -> Array:
    """An Equinox layer of one vector, applied to every `(b, s)` position."""
    return jax.vmap(jax.vmap(layer))(x)


def _linear(layer: eqx.nn.Linear, x: Array, batched: bool) -> Array:
    """`layer` at every position: `vmap`ped, as Equinox layers are used (`False`), or as
    one matmul `x @ weight.T` on the whole `(b, s, in)` array (`True`, a diagnostic)."""
    return x @ layer.weight.T if batched else _per_token(layer, x)


def attention_residual(
    block: Any, x: Float[Array, "b s h"], shape: tuple, attention: str | None, batched: bool
) -> Float[Array, "b s h"]:
    """`x + out(attention(qkv(attn_norm(x))))` with `block`'s `attn_norm`, `qkv` and `out`
    (the fused QKV rows grouped by KV head), causal and rotary; `shape` is
    `(heads, kv_heads, rope_theta)`, `attention` and `batched` as for `PlainBlock`."""
    heads, kv_heads, theta = shape
    b, s, _ = x.shape
    group = heads // kv_heads
    qkv = _linear(block.qkv, _per_token(block.attn_norm, x), batched)
    qkv = qkv.reshape(b, s, kv_heads, group + 2, -1)
    q = rotary(qkv[..., :group, :].reshape(b, s, heads, -1), theta)
    k, v = rotary(qkv[..., group, :], theta), qkv[..., group + 1, :]
    if attention == "blockwise":  # a diagnostic: eqxpar's attention kernel
        a = ep.nn.blockwise_attention(q, k, v)
    else:
        a = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=attention)
    return x + _linear(block.out, a.reshape(b, s, -1), batched)


class PlainBlock(eqx.Module):
    """One pre-norm block of plain Equinox layers (the fused QKV rows grouped by KV
    head, as in `models.Transformer`)."""

    attn_norm: eqx.nn.RMSNorm
    qkv: eqx.nn.Linear
    out: eqx.nn.Linear
    mlp_norm: eqx.nn.RMSNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear
    heads: int = eqx.field(static=True)
    kv_heads: int = eqx.field(static=True)
    theta: float = eqx.field(static=True)
    attention: str | None = eqx.field(static=True)
    batched: bool = eqx.field(static=True)

    def __init__(
        self,
        c: TransformerConfig,
        attention: str | None = None,
        batched: bool = False,
        *,
        key: PRNGKeyArray,
    ):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        d, h = c.head_dim, c.dim
        self.attn_norm = eqx.nn.RMSNorm(h, eps=1e-6, use_bias=False)
        self.qkv = eqx.nn.Linear(h, (c.num_heads + 2 * c.kv_heads) * d, use_bias=False, key=k1)
        self.out = eqx.nn.Linear(c.num_heads * d, h, use_bias=False, key=k2)
        self.mlp_norm = eqx.nn.RMSNorm(h, eps=1e-6, use_bias=False)
        self.up = eqx.nn.Linear(h, c.hidden, use_bias=False, key=k3)
        self.down = eqx.nn.Linear(c.hidden, h, use_bias=False, key=k4)
        self.heads, self.kv_heads, self.theta = c.num_heads, c.kv_heads, c.rope_theta
        self.attention, self.batched = attention, batched

    def __call__(self, x: Float[Array, "b s h"]) -> Float[Array, "b s h"]:
        x = attention_residual(
            self, x, (self.heads, self.kv_heads, self.theta), self.attention, self.batched
        )
        h = jax.nn.gelu(_linear(self.up, _per_token(self.mlp_norm, x), self.batched))
        return x + _linear(self.down, h, self.batched)


class PlainTransformer(eqx.Module):
    """`models.Transformer` (GELU MLP, RMSNorm, untied head, no bias) in plain Equinox."""

    embed: eqx.nn.Embedding
    layers: PlainBlock
    norm: eqx.nn.RMSNorm
    head: eqx.nn.Linear
    dtype: str = eqx.field(static=True)
    batched: bool = eqx.field(static=True)
    gather: NamedSharding | None = eqx.field(static=True)

    def __init__(
        self,
        c: TransformerConfig,
        attention: str | None = None,
        batched: bool = False,
        gather: NamedSharding | None = None,
        *,
        key: PRNGKeyArray,
    ):
        """`attention`: `jax.nn.dot_product_attention`'s `implementation`, or
        `"blockwise"` (eqxpar's kernel); `batched`: the linear layers as one matmul
        each (see `_linear`); `gather`: a replicated sharding each layer's weights are
        constrained to where they are used (pure FSDP: every weight all-gathered,
        never the activations moved). All are diagnostics; the baseline takes the
        defaults."""
        ke, kl, kh = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(c.vocab_size, c.dim, key=ke)
        keys = jax.random.split(kl, c.num_layers)
        self.layers = eqx.filter_vmap(lambda k: PlainBlock(c, attention, batched, key=k))(keys)
        self.norm = eqx.nn.RMSNorm(c.dim, eps=1e-6, use_bias=False)
        self.head = eqx.nn.Linear(c.dim, c.vocab_size, use_bias=False, key=kh)
        self.dtype, self.batched, self.gather = c.compute_dtype, batched, gather

    def _gathered(self, tree: Any) -> Any:
        if self.gather is None:
            return tree
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, self.gather), tree)

    def __call__(self, tokens: Int[Array, "b s"]) -> Float[Array, "b s vocab"]:
        model = jax.tree.map(lambda p: p.astype(self.dtype) if eqx.is_inexact_array(p) else p, self)
        params, static = eqx.partition(model.layers, eqx.is_array)
        model = eqx.tree_at(lambda m: (m.embed, m.norm, m.head), model, self._gathered(
            (model.embed, model.norm, model.head)))  # fmt: skip
        x = jax.vmap(jax.vmap(model.embed))(tokens)

        def body(x, p):
            return eqx.combine(self._gathered(p), static)(x), None

        x, _ = jax.lax.scan(body, x, params)
        logits = _linear(model.head, _per_token(model.norm, x), self.batched)
        return logits.astype(jnp.float32)


def plain_loss(model: PlainTransformer, x: Array, y: Array) -> Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def plain_like(template: PlainTransformer, model: Any) -> PlainTransformer:
    """`template` with the arrays of `model` (a `Transformer`, or a tree shaped like one,
    such as its gradients or Adam moments), layer stacks flattened to `(L, ...)`."""
    layers = model.flat_layers()
    pairs = {
        "embed.weight": model.embed.weight,
        "norm.weight": model.norm.weight,
        "head.weight": model.head.weight,
        "layers.attn_norm.weight": layers.attn_norm.weight,
        "layers.qkv.weight": layers.attn.qkv.weight,
        "layers.out.weight": layers.attn.out.weight,
        "layers.mlp_norm.weight": layers.mlp_norm.weight,
        "layers.up.weight": layers.mlp.up.weight,
        "layers.down.weight": layers.mlp.down.weight,
    }

    def get(path: str) -> Callable:
        def at(tree: Any) -> Any:
            for part in path.split("."):
                tree = getattr(tree, part)
            return tree

        return at

    for path, array in pairs.items():
        template = eqx.tree_at(get(path), template, array)
    return template


# -- shardings of the plain model ---------------------------------------------------------

ROW_SPLIT = ("qkv.weight", "up.weight", "head.weight", "embed.weight")  # output rows
COLUMN_SPLIT = ("out.weight", "down.weight")  # input columns


def plain_spec(path: str, shape: tuple[int, ...], layout: str, mesh: Mesh) -> P:
    """The `PartitionSpec` a user gives each weight: `"replicated"`, `"megatron"` (the
    Megatron split over `tensor`) or `"fsdp"` (the largest dim divisible by `data`)."""
    spec: list[str | None] = [None] * len(shape)
    if layout == "megatron" and mesh.shape.get("tensor", 1) > 1:
        if path.endswith(ROW_SPLIT):
            spec[-2] = "tensor"
        elif path.endswith(COLUMN_SPLIT):
            spec[-1] = "tensor"
    elif layout == "fsdp":
        n = mesh.shape["data"]
        dims = [i for i, d in enumerate(shape) if d % n == 0]
        if dims:
            spec[max(dims, key=lambda i: shape[i])] = "data"
    return P(*spec)


def place_plain(model: PlainTransformer, mesh: Mesh, layout: str) -> tuple[Any, Any]:
    """`(arrays, static)` of the model, its arrays placed by `plain_spec`."""
    params, static = eqx.partition(model, eqx.is_array)

    def place(path: Any, a: Array) -> Array:
        key = jax.tree_util.keystr(path, simple=True, separator=".")
        return jax.device_put(a, NamedSharding(mesh, plain_spec(key, a.shape, layout, mesh)))

    return jax.tree_util.tree_map_with_path(place, params), static


def place_opt_state(state: Any, params: Any, mesh: Mesh) -> Any:
    """Adam's moments placed like the parameters, everything else replicated."""
    shardings = jax.tree.map(lambda a: a.sharding, params)
    shaped = jax.tree.structure(params)

    def like_params(x: Any) -> bool:
        return jax.tree.structure(x) == shaped

    def place(x: Any) -> Any:
        if like_params(x):
            return jax.device_put(x, shardings)
        return jax.device_put(x, NamedSharding(mesh, P()))

    return jax.tree.map(place, state, is_leaf=like_params)


def first_moment(opt_state: Any) -> Any:
    """The `mu` of the Adam state in an Optax state."""
    adam = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    return adam[0].mu


def auto_mesh(sizes: dict[str, int]) -> Mesh:
    """A `jax.sharding.Mesh` with every axis `AxisType.Auto`, on the first devices."""
    n = int(np.prod(list(sizes.values())))
    devices = np.array(jax.devices()[:n]).reshape(tuple(sizes.values()))
    return Mesh(devices, tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))


def plain_variant(
    template: PlainTransformer, model: Transformer, mesh_sizes: dict[str, int], layout: str,
    x: np.ndarray, y: np.ndarray, batch_spec: P | None = None,
) -> Variant:  # fmt: skip
    """The baseline: the plain model's AdamW step under `eqx.filter_jit`, on a mesh of
    Auto axes, weights placed by `layout`, the batch over `data`."""
    mesh = auto_mesh(mesh_sizes)
    params, static = place_plain(plain_like(template, jax.device_get(model)), mesh, layout)
    if batch_spec is None:
        batch_spec = P("data") if "data" in mesh_sizes else P()
    return jit_variant(plain_loss, params, static, mesh, x, y, batch_spec)


def jit_variant(
    loss_fn: Callable, params: Any, static: Any, mesh: Mesh, x: np.ndarray, y: np.ndarray,
    batch_spec: P,
) -> Variant:  # fmt: skip
    """A plain model's AdamW step under `eqx.filter_jit`: `params` placed already (Adam's
    moments placed like them), the batch placed by `batch_spec`, `loss_fn(model, x, y)`;
    its probe gives the loss and the gradients (the bias-corrected first moments)."""
    opt = optimizer()
    opt_state = place_opt_state(opt.init(params), params, mesh)
    shardings = jax.tree.map(lambda a: a.sharding, (params, opt_state))
    batch = NamedSharding(mesh, batch_spec)
    xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)

    @eqx.filter_jit
    def step(params, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(lambda p: loss_fn(eqx.combine(p, static), x, y))(
            params
        )
        updates, opt_state = opt.update(grads, opt_state, params)
        new = jax.lax.with_sharding_constraint(
            (eqx.apply_updates(params, updates), opt_state), shardings
        )
        return new, loss

    compiled, seconds = compile_timed(step, params, opt_state, xs, ys)
    args = (params, opt_state, xs, ys)

    def probe() -> tuple[Any, Any]:
        (_, state), loss = compiled(*args)
        return loss, jax.tree.map(lambda m: m / (1 - B1), first_moment(state))

    return Variant(compiled, args, compiled, mesh, seconds, probe)


def eqxpar_variant(
    template: PlainTransformer, config: TransformerConfig, mesh_sizes: dict[str, int],
    strategy: str, x: np.ndarray, y: np.ndarray, loss_fn: Callable | None = None,
    batch_spec: P | None = None, pipeline: dict[str, Any] | None = None,
) -> tuple[Variant, Transformer]:  # fmt: skip
    """eqxpar's `make_train_step` on an eqxpar mesh; also returns the model (global
    arrays) the baselines copy. `pipeline`: the step's `schedule` and `microbatches`
    (for `communication_report`, whose count of the executor's permutes, the ones its
    ticks run, then replaces the counter's upper bound)."""
    mesh = ep.make_mesh(
        **mesh_sizes, devices=jax.devices()[: int(np.prod(list(mesh_sizes.values())))]
    )
    opt = optimizer()
    state = init_state(
        Transformer, config, key=jax.random.key(0), optimizer=opt, mesh=mesh, strategy=strategy
    )
    loss_fn = loss_fn or (lambda model, x, y, key: model.loss(x, y))
    batch_spec = P("data") if batch_spec is None else batch_spec
    step = make_train_step(
        loss_fn, opt, mesh=mesh, strategy=strategy, batch_specs=(batch_spec, batch_spec)
    )
    batch = NamedSharding(mesh, batch_spec)
    xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
    compiled, seconds = compile_timed(step, state, xs, ys)

    def probe() -> tuple[Any, Any]:
        new, metrics = compiled(state, xs, ys)
        mu = first_moment(new.opt_state)
        return metrics["loss"], plain_like(template, jax.tree.map(lambda m: m / (1 - B1), mu))

    variant = Variant(compiled, (state, xs, ys), compiled, mesh, seconds, probe)
    if "context" not in mesh_sizes:  # the cost model has no context axis
        report = communication_report(
            compiled, mesh, config, batch=x.shape[0], seq=x.shape[1], strategy=strategy,
            **(pipeline or {}),
        )  # fmt: skip
        variant.theory_bytes = sum(r.theory or 0.0 for r in report.rows)
        if pipeline:
            variant.collectives = (
                sum(r.count for r in report.rows),
                sum(r.measured for r in report.rows),
            )
    return variant, state.model


def tokens(s: Sizes) -> tuple[np.ndarray, np.ndarray]:
    data = np.random.default_rng(0).integers(0, s.config.vocab_size, (s.batch, s.seq + 1))
    return data[:, :-1].astype(np.int32), data[:, 1:].astype(np.int32)


def side_by_side(mesh_sizes: dict[str, int], layout: str, strategy: str = "dp") -> Callable:
    """A case: eqxpar with `strategy` against the plain model placed by `layout`, both
    on `mesh_sizes`."""

    def build(sizes: str) -> Built:
        s = SIZES["smoke" if "smoke" in sizes else "full"]
        x, y = tokens(s)
        template = PlainTransformer(s.config, key=jax.random.key(1))
        ours, model = eqxpar_variant(template, s.config, mesh_sizes, strategy, x, y)
        plain = plain_variant(template, model, mesh_sizes, layout, x, y)
        plain.theory_bytes = ours.theory_bytes  # the layout's minimum, for both
        name = {"dp": "eqxpar", "fsdp": "eqxpar FSDP"}[strategy]
        variants = {f"jit auto ({layout})": plain, name: ours}
        if strategy == "fsdp":  # a diagnostic: GSPMD made to gather every weight
            whole = NamedSharding(auto_mesh(mesh_sizes), P())
            gathered = PlainTransformer(s.config, gather=whole, key=jax.random.key(1))
            variants["jit, weights gathered where used"] = plain_variant(
                gathered, model, mesh_sizes, layout, x, y
            )
            variants["jit, weights gathered where used"].theory_bytes = ours.theory_bytes
        return Built(
            title=f"Transformer train step, {ep_mesh_text(mesh_sizes)}",
            variants=variants,
            flops=flops_per_token(s.config, s.seq) * s.batch * s.seq,
            tokens=s.batch * s.seq,
            baselines=(f"jit auto ({layout})",),
        )

    return build


def one_device_case(sizes: str) -> Built:
    """`side_by_side` on one device, plus two diagnostic variants of the plain model,
    which split the gap between the two: with eqxpar's blockwise attention kernel in
    place of `jax.nn.dot_product_attention`, and with each `eqx.nn.Linear` applied as
    one matmul `x @ W.T` (as eqxpar's layers do) instead of `vmap`ped per token."""
    built = side_by_side({"data": 1}, "replicated")(sizes)
    s = SIZES["smoke" if "smoke" in sizes else "full"]
    x, y = tokens(s)
    ours = built.variants["eqxpar"]
    model = ours.args[0].model
    for name, attention, batched in (
        ("jit plain + blockwise attention", "blockwise", False),
        ("jit plain, Linear as x @ W.T", None, True),
    ):
        template = PlainTransformer(s.config, attention, batched, key=jax.random.key(1))
        diagnostic = plain_variant(template, model, {"data": 1}, "replicated", x, y)
        diagnostic.theory_bytes = ours.theory_bytes
        built.variants[name] = diagnostic
    return built


def ep_mesh_text(sizes: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def pipeline_case(sizes: str) -> Built:
    """The 1F1B pipelined Transformer on data=2,tensor=2,pipeline=2 against the GSPMD
    layouts of the same 8 devices (the ratio is against the fastest)."""
    from eqxpar.pipeline import OneFOneB

    s = SIZES["smoke" if "smoke" in sizes else "full"]
    x, y = tokens(s)
    config = s.config.replace(pipeline_stages=2)
    template = PlainTransformer(s.config, key=jax.random.key(1))

    def loss_fn(model, x, y, key):
        return model.loss(x, y, schedule=OneFOneB(), microbatches=MICROBATCHES)

    mesh = {"data": 2, "tensor": 2, "pipeline": 2}
    pipeline = dict(schedule="1f1b", microbatches=MICROBATCHES)
    ours, model = eqxpar_variant(template, config, mesh, "dp", x, y, loss_fn, pipeline=pipeline)
    layouts = {
        "jit auto data=8": ({"data": 8}, "replicated"),
        "jit auto data=2,tensor=4": ({"data": 2, "tensor": 4}, "megatron"),
        "jit auto data=4,tensor=2": ({"data": 4, "tensor": 2}, "megatron"),
    }
    variants = {n: plain_variant(template, model, m, lay, x, y) for n, (m, lay) in layouts.items()}
    return Built(
        title=f"pipelined Transformer (1F1B, {MICROBATCHES} microbatches), {ep_mesh_text(mesh)}",
        variants={**variants, "eqxpar 1F1B": ours},
        flops=flops_per_token(s.config, s.seq) * s.batch * s.seq,
        tokens=s.batch * s.seq,
        baselines=tuple(layouts),
    )


RING = {
    "full": Sizes(
        TransformerConfig(vocab_size=4096, dim=512, num_layers=2, num_heads=8, max_seq_len=2048),
        batch=1,
        seq=2048,
    ),
    "smoke": Sizes(
        TransformerConfig(vocab_size=64, dim=32, num_layers=2, num_heads=8, max_seq_len=64),
        batch=1,
        seq=64,
    ),
}


def ring_case(sizes: str) -> Built:
    """Context parallelism at a long sequence on context=8: eqxpar's ring (and
    all-gather) attention, tokens in `context_order`, against the plain model with
    full attention under `jit`, its tokens split over the sequence by `NamedSharding`
    (XLA partitions the attention). The loss is a mean over tokens, so the permuted
    order computes the same loss and gradients."""
    s = RING["smoke" if "smoke" in sizes else "full"]
    x, y = tokens(s)
    order = ep.nn.context_order(s.seq, 8)
    template = PlainTransformer(s.config, key=jax.random.key(1))
    mesh = {"data": 1, "context": 8}
    spec = P("data", "context")
    variants, model = {}, None
    for strategy in ("ring", "all_gather"):
        config = s.config.replace(context_parallel=strategy)
        v, model = eqxpar_variant(
            template, config, mesh, "dp", x[:, order], y[:, order], batch_spec=spec
        )
        variants[f"eqxpar {strategy}"] = v
    plain = plain_variant(template, model, {"context": 8}, "replicated", x, y, P(None, "context"))
    return Built(
        title=f"Transformer, context parallelism, seq {s.seq}, batch {s.batch}, context=8",
        variants={"jit auto (sequence split)": plain, **variants},
        flops=flops_per_token(s.config, s.seq) * s.batch * s.seq,
        tokens=s.batch * s.seq,
        baselines=("jit auto (sequence split)",),
    )


def gpu_case(sizes: str) -> Built:
    """`--gpu`: one device, bf16 compute; the plain model with XLA's attention and with
    cuDNN's (`jax.nn.dot_product_attention(implementation="cudnn")`, XLA's on CPU),
    and eqxpar's step (which takes cuDNN's kernel itself on GPU in half precision)."""
    s = SIZES[sizes]
    x, y = tokens(s)
    fused = "cudnn" if jax.default_backend() == "gpu" else "xla"
    fused_name = f"jit plain, attention {fused}" + ("" if fused == "cudnn" else " (cudnn on GPU)")
    template = PlainTransformer(s.config, key=jax.random.key(1))
    ours, model = eqxpar_variant(template, s.config, {"data": 1}, "dp", x, y)
    plain = plain_variant(template, model, {"data": 1}, "replicated", x, y)
    fast = PlainTransformer(s.config, fused, key=jax.random.key(1))
    fused_plain = plain_variant(fast, model, {"data": 1}, "replicated", x, y)
    del model
    return Built(
        title=f"Transformer {s.config.num_params / 1e9:.2f}B, bf16, 1 device",
        variants={"jit plain, attention xla": plain, fused_name: fused_plain,
                  "eqxpar": ours},
        flops=flops_per_token(s.config, s.seq) * s.batch * s.seq,
        tokens=s.batch * s.seq,
        baselines=("jit plain, attention xla", fused_name),
        rtol=5e-2,  # bf16: the two models round in different places
    )  # fmt: skip


CASES = {
    "transformer-1dev": Case(1, one_device_case, "1 device"),
    "transformer-data8": Case(8, side_by_side({"data": 8}, "replicated"), "data parallel"),
    "transformer-d2t4": Case(8, side_by_side({"data": 2, "tensor": 4}, "megatron"), "DP x TP"),
    "transformer-t8": Case(8, side_by_side({"data": 1, "tensor": 8}, "megatron"), "TP"),
    "fsdp-data8": Case(8, side_by_side({"data": 8}, "fsdp", "fsdp"), "FSDP data=8"),
    "pipeline-d2t2p2": Case(8, pipeline_case, "1F1B pipeline vs the GSPMD layouts of 8 devices"),
    "ring-c8": Case(8, ring_case, "ring attention vs full attention, seq 2048, context=8"),
    "gpu-1b": Case(1, gpu_case, "--gpu: ~1B Transformer, bf16, cuDNN attention", gpu=True),
}
