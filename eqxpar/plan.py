"""`python -m eqxpar.plan`: the planner's ranked layouts for a Transformer, with reasons.

`eqxpar.plan` stays the function `eqxpar.profile.plan` after this module is imported
(see `eqxpar._Package`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .profile._planner import plan


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eqxpar.plan",
        description="Rank the layouts (data, tensor, pipeline sizes; DP/ZeRO/FSDP; SP; "
        "remat; 1F1B microbatches) of a Transformer training step by the analytic cost "
        "model, dropping those that do not fit in memory.",
    )
    add = parser.add_argument
    add("--dim", type=int, required=True)
    add("--layers", type=int, required=True)
    add("--heads", type=int, required=True)
    add("--vocab", type=int, required=True)
    add("--seq", type=int, required=True)
    add("--batch", type=int, required=True, help="global batch, in sequences")
    add("--devices", type=int, required=True)
    add("--memory", required=True, help="memory per device, e.g. 80GB")
    add("--mlp-dim", type=int, default=None, help="default 4 * dim")
    add("--kv-heads", type=int, default=None)
    add("--swiglu", action="store_true", help="SwiGLU MLP (Llama) instead of GELU")
    add("--devices-per-host", type=int, default=8)
    add("--flops", type=float, default=989e12, help="FLOP/s per device")
    add("--intra-bandwidth", type=float, default=450e9, help="bytes/s inside a host")
    add("--inter-bandwidth", type=float, default=50e9, help="bytes/s across hosts")
    add("--top", type=int, default=5)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parses `argv` (default `sys.argv[1:]`) and prints the plan's table."""
    from models import TransformerConfig

    args = _parser().parse_args(argv)
    config = TransformerConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        mlp_dim=args.mlp_dim,
        max_seq_len=args.seq,
        activation="swiglu" if args.swiglu else "gelu",
        compute_dtype="bfloat16",
    )
    result = plan(
        config,
        devices=args.devices,
        memory_per_device=args.memory,
        batch=args.batch,
        seq=args.seq,
        devices_per_host=args.devices_per_host,
        flops=args.flops,
        intra_bandwidth=args.intra_bandwidth,
        inter_bandwidth=args.inter_bandwidth,
    )
    print(
        f"Transformer with {config.num_params / 1e9:.2f}e9 parameters, batch {args.batch} x "
        f"{args.seq} tokens"
    )
    print(result.table(top=args.top))


if __name__ == "__main__":
    main()
