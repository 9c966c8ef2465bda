"""Layer-level cases: the TP MLP block (`tp_mlp.py`'s builders) side by side.

The baseline is `tp_mlp`'s GSPMD variant: the dense `eqx.nn.Linear` block under
`jax.jit`, its weights placed Megatron-style with `NamedSharding` on a mesh of Auto
axes; against it eqxpar's `ColumnParallelLinear -> RowParallelLinear`, without and with
sequence parallelism. The step is the loss `sum(mlp(x) ** 2)` and its gradients.
"""

from __future__ import annotations

from typing import Any

import jax
import tp_mlp
from _harness import Built, Case, Variant, compile_timed

import eqxpar as ep

F32 = 4
SIZES = {"full": (8, 256, 512), "smoke": (4, 16, 32)}  # batch, seq, h
MESH = {"data": 2, "tensor": 4}


def theory(batch: int, seq: int, h: int, *, sequence_parallel: bool) -> float:
    """Collective bytes per device as `count_collectives` counts them (output bytes):
    per direction one `(b/d, s, h)` all-reduce over `tensor` (with SP an all-gather of
    it and a reduce-scatter to `1/t` of it, each way), and the data all-reduce of the
    device's weight and bias gradients."""
    d, t = MESH["data"], MESH["tensor"]
    act = batch // d * seq * h * F32
    tensor = 2 * (act + act / t) if sequence_parallel else 2 * act
    grads = (2 * 4 * h * h / t + 4 * h / t + h) * F32
    return tensor + grads


def mlp_case(sizes: str) -> Built:
    batch, seq, h = SIZES["smoke" if "smoke" in sizes else "full"]
    mesh = ep.make_mesh(**MESH, devices=jax.devices()[:8])
    params = tp_mlp.init_params(h, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (batch, seq, h))
    builders = {
        "jit auto (megatron)": (tp_mlp._gspmd, False),
        "eqxpar TP": (tp_mlp._eqxpar(), False),
        "eqxpar TP+SP": (tp_mlp._eqxpar(sequence_parallel=True), True),
    }
    variants = {}
    for name, (build, sp) in builders.items():
        step, args = build(params, x, mesh)
        compiled, seconds = compile_timed(step, *args)

        def probe(compiled: Any = compiled, args: tuple = args) -> tuple[Any, Any]:
            return compiled(*args)

        bytes_ = theory(batch, seq, h, sequence_parallel=sp)
        variants[name] = Variant(compiled, args, compiled, mesh, seconds, probe, bytes_)
    return Built(
        title=f"TP MLP block h={h}, batch={batch}, seq={seq}, {ep_text()}",
        variants=variants,
        flops=tp_mlp.step_flops(batch, seq, h),
        tokens=batch * seq,
        baselines=("jit auto (megatron)",),
        rtol=1e-4,
    )


def ep_text() -> str:
    return ",".join(f"{k}={v}" for k, v in MESH.items())


CASES = {"tp-mlp-d2t4": Case(8, mlp_case, "TP MLP block h -> 4h -> h (tp_mlp.py's builders)")}
