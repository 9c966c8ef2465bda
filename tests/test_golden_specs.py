"""Golden snapshots of every model's parameter specs: a change of sharding is a diff.

Regenerate after an intended change with `EQXPAR_UPDATE_GOLDEN=1 make test` and review
the JSON diff.
"""

import json
import os
from pathlib import Path

import equinox as eqx
import jax
import pytest
from jax.sharding import PartitionSpec as P

import eqxpar as ep
from models import PPClassifier, SimpleClassifier, TPClassifier, Transformer, TransformerConfig

GOLDEN = Path(__file__).parent / "golden"
SMALL = TransformerConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, max_seq_len=32)

MODELS = {
    "simple_classifier": lambda k: SimpleClassifier(64, 10, key=k),
    "tp_classifier": lambda k: TPClassifier(64, 10, key=k),
    "transformer": lambda k: Transformer(SMALL, key=k),
    "transformer_llama": lambda k: Transformer(
        SMALL.replace(activation="swiglu", num_kv_heads=2, tie_embeddings=True), key=k
    ),
    "transformer_pipelined": lambda k: Transformer(
        SMALL.replace(pipeline_stages=2, virtual_stages=1), key=k
    ),
    "pp_classifier": lambda k: PPClassifier(64, 10, depth=4, stages=2, virtual=2, key=k),
    "transformer_gpt_sp": lambda k: Transformer(
        SMALL.replace(norm="layernorm", use_bias=True, sequence_parallel=True), key=k
    ),
}


def snapshot(model) -> dict:
    specs = ep.partition_specs(model)
    out = {}
    for (path, leaf), spec in zip(
        jax.tree_util.tree_leaves_with_path(model),
        jax.tree.structure(model).flatten_up_to(specs),
        strict=True,
    ):
        if isinstance(spec, P):
            out[jax.tree_util.keystr(path)] = {
                "shape": list(leaf.shape),
                "dtype": str(leaf.dtype),
                "spec": [e if e is None or isinstance(e, str) else list(e) for e in spec],
            }
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_parameter_specs_match_golden(name):
    got = snapshot(eqx.filter_eval_shape(MODELS[name], jax.random.key(0)))
    path = GOLDEN / f"{name}.json"
    if os.environ.get("EQXPAR_UPDATE_GOLDEN") == "1":
        rows = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in got.items()]
        path.write_text("{\n" + ",\n".join(rows) + "\n}\n")  # one parameter per line
    assert path.exists(), f"{path} is missing; create it with EQXPAR_UPDATE_GOLDEN=1"
    want = json.loads(path.read_text())
    assert got == want, f"parameter specs of {name} changed; see {path}"
