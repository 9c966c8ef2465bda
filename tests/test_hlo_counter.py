"""Tests for `eqxpar.profile`: collective counts, bytes, mesh axes and array shapes."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from eqxpar.profile import CollectiveReport, array_shapes, count_collectives
from eqxpar.profile._hlo import _groups

F32 = 4


def _mesh(shape, names=("data", "tensor")):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _compile(f, mesh, x, out_specs):
    in_specs = P(*mesh.axis_names)
    g = jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=True)
    return jax.jit(g).lower(x).compile()


def _scan_psum(x):
    def body(carry, _):
        return carry + jax.lax.psum(jnp.sin(carry), "tensor"), None

    return jax.lax.scan(body, x, None, length=5)[0]


def test_psum_in_scan_counts_trip_count():
    mesh = _mesh((2, 4))
    compiled = _compile(_scan_psum, mesh, jnp.ones((2 * 3, 4 * 5)), P("data", "tensor"))
    report = count_collectives(compiled, mesh)
    assert isinstance(report, CollectiveReport)
    assert report.count("all-reduce") == 5
    assert report.count("all-reduce", axis="tensor") == 5
    assert report.count(axis="data") == 0
    assert report.count() == 5
    (record,) = report.records
    assert record.nbytes == 3 * 5 * F32
    assert report.bytes("all-reduce") == 5 * 3 * 5 * F32
    assert report.unknown_trip_counts == 0
    assert count_collectives(compiled).count("all-reduce", axis="groups of 4") == 5
    assert "all-reduce" in str(report) and "tensor" in report.table()


def test_trip_count_inferred_without_backend_config():
    mesh = _mesh((2, 4))
    text = _compile(_scan_psum, mesh, jnp.ones((2 * 3, 4 * 5)), P("data", "tensor")).as_text()
    stripped = re.sub(r", backend_config=\{.*\}", "", text)
    assert "known_trip_count" in text and "known_trip_count" not in stripped
    report = count_collectives(stripped, mesh)
    assert report.count("all-reduce", axis="tensor") == 5
    assert report.unknown_trip_counts == 0


def test_nested_scans_multiply():
    def f(x):
        def outer(carry, _):
            def inner(c, _):
                return c + jax.lax.psum(jnp.sin(c), "tensor"), None

            return jax.lax.scan(inner, carry, None, length=4)[0], None

        return jax.lax.scan(outer, x, None, length=3)[0]

    mesh = _mesh((2, 4))
    compiled = _compile(f, mesh, jnp.ones((2 * 7, 4 * 11)), P("data", "tensor"))
    report = count_collectives(compiled, mesh)
    assert report.count("all-reduce", axis="tensor") == 12
    assert report.bytes() == 12 * 7 * 11 * F32


def _three_psums(x):
    return (
        jax.lax.psum(x[:1], "tensor"),
        jax.lax.psum(x[:2], "data"),
        jax.lax.psum(x, ("data", "tensor")),
    )


@pytest.mark.parametrize("shape", [(2, 4), (4, 2)])
@pytest.mark.parametrize("permute_devices", [False, True])
def test_psum_axes_attribution(shape, permute_devices):
    mesh = _mesh(shape)
    if permute_devices:  # Groups hold positions in `mesh.devices.flat`, not device ids.
        devices = np.array(jax.devices())[[5, 2, 7, 0, 3, 6, 1, 4]].reshape(shape)
        mesh = jax.sharding.Mesh(devices, mesh.axis_names, axis_types=mesh.axis_types)
    x = jnp.ones((shape[0] * 3, shape[1] * 5))
    compiled = _compile(_three_psums, mesh, x, (P("data"), P(None, "tensor"), P()))
    report = count_collectives(compiled, mesh)
    assert report.count("all-reduce") == 3
    assert report.bytes("all-reduce", axis="tensor") == 1 * 5 * F32
    assert report.bytes("all-reduce", axis="data") == 2 * 5 * F32
    assert report.bytes("all-reduce", axis=("data", "tensor")) == 3 * 5 * F32
    unmeshed = count_collectives(compiled)
    assert unmeshed.bytes(axis=f"groups of {shape[1]}") == 1 * 5 * F32
    assert unmeshed.bytes(axis="groups of 8") == 3 * 5 * F32


def test_other_collectives():
    def f(x):
        tensor_perm = [(i, (i + 1) % 4) for i in range(4)]
        return (
            jax.lax.ppermute(x, "tensor", tensor_perm),
            jax.lax.ppermute(x[:1], "data", [(0, 1), (1, 0)]),
            jax.lax.all_gather(x, "tensor", tiled=True),
            jax.lax.psum_scatter(x, "tensor", scatter_dimension=1, tiled=True),
            jax.lax.all_to_all(x, "tensor", 1, 1, tiled=True),
        )

    mesh = _mesh((2, 4))
    local = 3 * 20 * F32
    spec = P("data", "tensor")
    compiled = _compile(f, mesh, jnp.ones((2 * 3, 4 * 20)), (spec,) * 5)
    report = count_collectives(compiled, mesh)
    assert report.count("collective-permute", axis="tensor") == 1
    assert report.bytes("collective-permute", axis="tensor") == local
    assert report.bytes("collective-permute", axis="data") == 20 * F32
    assert report.count("all-gather", axis="tensor") == 1
    assert report.bytes("all-gather") == 4 * local
    assert report.count("reduce-scatter", axis="tensor") == 1
    assert report.bytes("reduce-scatter") == local // 4
    assert report.count("all-to-all", axis="tensor") == 1
    assert report.bytes("all-to-all") == local
    assert report.count() == 5
    unmeshed = count_collectives(compiled)
    assert unmeshed.bytes("collective-permute", axis="groups of 4") == local
    assert unmeshed.bytes("collective-permute", axis="groups of 2") == 20 * F32


def test_equinox_compiled_and_lowered():
    mesh = _mesh((2, 4))
    g = jax.shard_map(
        _scan_psum, mesh=mesh, in_specs=P("data", "tensor"), out_specs=P("data", "tensor")
    )
    lowered = eqx.filter_jit(g).lower(jnp.ones((2 * 3, 4 * 5)))
    report = count_collectives(lowered.compile(), mesh)
    assert report.count("all-reduce", axis="tensor") == 5
    with pytest.raises(TypeError):
        count_collectives(lowered)
    with pytest.raises(TypeError):
        count_collectives(jax.jit(g).lower(jnp.ones((2 * 3, 4 * 5))))
    with pytest.raises(ValueError):
        report.count("all_reduce")


_SNIPPET = """HloModule snippet, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {{
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}}

ENTRY %main (x: f32[4]) -> f32[4] {{
  %x = f32[4]{{0}} parameter(0)
  ROOT %all-reduce.3 = f32[4]{{0}} all-reduce(%x), channel_id=1, {groups}, to_apply=%add
}}
"""

_TENSOR, _DATA = ("tensor",), ("data",)


@pytest.mark.parametrize(
    "groups,expected,axes",
    [
        ("{{0,1,2,3},{4,5,6,7}}", [[0, 1, 2, 3], [4, 5, 6, 7]], _TENSOR),
        ("[2,4]<=[8]", [[0, 1, 2, 3], [4, 5, 6, 7]], _TENSOR),
        ("mesh[x=8] {x:(2)4}", [[0, 1, 2, 3], [4, 5, 6, 7]], _TENSOR),
        ("{{0,4},{1,5},{2,6},{3,7}}", [[0, 4], [1, 5], [2, 6], [3, 7]], _DATA),
        ("[4,2]<=[2,4]T(1,0)", [[0, 4], [1, 5], [2, 6], [3, 7]], _DATA),
        ("mesh['axis_0'=2,'axis_1'=4] {'axis_0'}", [[0, 4], [1, 5], [2, 6], [3, 7]], _DATA),
        ("mesh[x=8] {x:(1)2}", [[0, 4], [1, 5], [2, 6], [3, 7]], _DATA),
        ("mesh[a=2,b=4], device_ids=([4,2]T(1,0)) {a}", [[0, 1], [2, 3], [4, 5], [6, 7]], _TENSOR),
        ("{{0,2},{1,3},{4,6},{5,7}}", [[0, 2], [1, 3], [4, 6], [5, 7]], _TENSOR),
        ("[4,2]<=[2,2,2]T(0,2,1)", [[0, 2], [1, 3], [4, 6], [5, 7]], _TENSOR),
        ("mesh[a=2,b=4] {b:(1)2}", [[0, 2], [1, 3], [4, 6], [5, 7]], _TENSOR),
        ("{}", [list(range(8))], ("data", "tensor")),
        ("[1,8]<=[8]", [list(range(8))], ("data", "tensor")),
    ],
)
def test_replica_group_syntaxes(groups, expected, axes):
    attrs = f", replica_groups={groups}, to_apply=%add"
    assert _groups(attrs, 8) == expected
    report = count_collectives(_SNIPPET.format(groups=f"replica_groups={groups}"), _mesh((2, 4)))
    assert report.count("all-reduce", axis=axes) == 1
    assert report.bytes() == 4 * F32


_ASYNC = """HloModule async, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%wrapped_rs (p: f32[8]) -> f32[2] {
  %p = f32[8]{0} parameter(0)
  ROOT %rs = f32[2]{0} reduce-scatter(%p), replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
}

%branch (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %ar = f32[4]{0} all-reduce(%p), replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4]{0} get-tuple-element(%p), index=1
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %c1 = f32[4]{0} call(%x), to_apply=%branch
  %c2 = f32[4]{0} call(%c1), to_apply=%branch
  ROOT %t = (s32[], f32[4]{0}) tuple(%next, %c2)
}

%cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[4], y: f32[8], k: s32[]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %y = f32[8]{0} parameter(1)
  %k = s32[] parameter(2)
  %ars = (f32[4]{0}, f32[8]{0}) all-reduce-start(%x, %y), replica_groups={}, to_apply=%add
  %ard = (f32[4]{0}, f32[8]{0}) all-reduce-done(%ars)
  %ags = (f32[4]{0}, f32[16]{0}) all-gather-start(%x), replica_groups=[2,4]<=[8], dimensions={0}
  %agd = f32[16]{0} all-gather-done(%ags)
  %cps = (f32[4], f32[4], u32[], u32[]) collective-permute-start(%x), source_target_pairs={{0,4}}
  %cpd = f32[4]{0} collective-permute-done(%cps)
  %rss = ((f32[8]{0}), f32[2]{0}) async-start(%y), calls=%wrapped_rs
  %rsd = f32[2]{0} async-done(%rss), calls=%wrapped_rs
  %uses = f32[4]{0} add(%cpd, %all-reduce.3), metadata={op_name="all-reduce(x)"}
  %branched = f32[4]{0} conditional(%k, %x, %x), branch_computations={%branch, %branch}
  %zero = s32[] constant(0)
  %init = (s32[], f32[4]{0}) tuple(%zero, %branched)
  %loop = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[4]{0} get-tuple-element(%loop), index=1
}
"""


def test_async_call_graph_and_multiplicities():
    report = count_collectives(_ASYNC, _mesh((2, 4)))
    assert report.count("all-reduce", axis=("data", "tensor")) == 1
    assert report.bytes("all-reduce", axis=("data", "tensor")) == (4 + 8) * F32
    assert report.count("all-gather", axis="tensor") == 1
    assert report.bytes("all-gather") == 16 * F32
    assert report.count("collective-permute", axis="data") == 1
    assert report.bytes("collective-permute") == 4 * F32
    assert report.count("reduce-scatter", axis="tensor") == 1
    assert report.bytes("reduce-scatter") == 2 * F32
    # `%branch`: once per conditional branch (2) plus twice per loop iteration (2 * 3).
    assert report.count("all-reduce", axis="data") == 2 + 2 * 3
    assert report.count() == 1 + 1 + 1 + 1 + 8
    assert report.unknown_trip_counts == 0


_LOOP_HLO = """HloModule loop, num_partitions=8

add {{
  a = f32[] parameter(0)
  b = f32[] parameter(1)
  ROOT s = f32[] add(a, b)
}}

cond {{
  p = (s32[], f32[4], s32[]) parameter(0)
  i = s32[] get-tuple-element(p), index=0
  n = s32[] {bound}
  ROOT lt = pred[] compare(n, i), direction=GT
}}

body {{
  p = (s32[], f32[4], s32[]) parameter(0)
  i = s32[] get-tuple-element(p), index=0
  x = f32[4] get-tuple-element(p), index=1
  n = s32[] get-tuple-element(p), index=2
  two = s32[] constant(2)
  j = s32[] add(two, i)
  y = f32[4] all-reduce(x), replica_groups={{{{0,1,2,3}},{{4,5,6,7}}}}, to_apply=add
  ROOT t = (s32[], f32[4], s32[]) tuple(j, y, n)
}}

ENTRY main {{
  x = f32[4] parameter(0)
  n = s32[] parameter(1)
  one = s32[] constant(1)
  t = (s32[], f32[4], s32[]) tuple(one, x, n)
  w = (s32[], f32[4], s32[]) while(t), condition=cond, body=body
  ROOT r = f32[4] get-tuple-element(w), index=1
}}
"""


def test_trip_count_inference_and_unknown():
    known = count_collectives(_LOOP_HLO.format(bound="constant(10)"))
    assert known.count("all-reduce", axis="groups of 4") == 5  # i = 1, 3, 5, 7, 9.
    assert known.unknown_trip_counts == 0
    unknown = count_collectives(_LOOP_HLO.format(bound="get-tuple-element(p), index=2"))
    assert unknown.count("all-reduce") == 1
    assert unknown.unknown_trip_counts == 1
    assert "unknown trip count" in unknown.table()


def test_array_shapes():
    mesh = _mesh((2, 4))
    compiled = _compile(
        _three_psums, mesh, jnp.ones((2 * 7, 4 * 11)), (P("data"), P(None, "tensor"), P())
    )
    shapes = array_shapes(compiled)
    assert ("f32", (7, 11)) in shapes
    assert ("f32", (2, 11)) in shapes
    assert ("f32", (14, 44)) not in shapes
    assert ("f32", ()) in shapes
    assert array_shapes(_ASYNC).count(("u32", ())) == 2
