import jax
import pytest

import eqxpar as ep


def test_axes_and_sizes():
    mesh = ep.make_mesh(data=2, tensor=4)
    assert mesh.axis_names == ("pipeline", "data", "expert", "context", "tensor")
    assert dict(mesh.shape) == {"pipeline": 1, "data": 2, "expert": 1, "context": 1, "tensor": 4}
    # Tensor is innermost: one tensor group is four neighbouring devices.
    ids = [[d.id for d in row] for row in mesh.devices.reshape(2, 4)]
    assert ids == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize(
    "sizes", [dict(tensor=8), dict(data=8), dict(data=2, tensor=2, pipeline=2)]
)
def test_every_axis_present(sizes):
    mesh = ep.make_mesh(**sizes)
    assert set(mesh.axis_names) == {"data", "tensor", "pipeline", "context", "expert"}
    assert mesh.devices.size == 8


def test_explicit_axis_types():
    mesh = ep.make_mesh(data=8, axis_types="explicit")
    assert all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def test_too_few_devices_says_how_to_simulate():
    with pytest.raises(ValueError) as err:
        ep.make_mesh(data=4, tensor=4)
    msg = str(err.value)
    assert "needs 16 device(s)" in msg and "8 were given" in msg
    assert "simulate_cpu_devices(16)" in msg and "xla_force_host_platform_device_count" in msg


def test_too_many_devices_suggests_subset():
    with pytest.raises(ValueError, match=r"devices=jax.devices\(\)\[:3\]"):
        ep.make_mesh(tensor=3)
    assert ep.make_mesh(tensor=3, devices=jax.devices()[:3]).devices.size == 3


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_axis_size(bad):
    with pytest.raises(ValueError, match="tensor="):
        ep.make_mesh(tensor=bad)


def test_simulate_after_start():
    jax.devices()  # the backend is up with 8 CPU devices
    ep.simulate_cpu_devices(8)  # asking for what is there is fine
    with pytest.raises(RuntimeError, match="already started with 8 CPU") as err:
        ep.simulate_cpu_devices(16)
    assert "before anything touches a JAX array" in str(err.value)


def test_simulate_in_fresh_process(tmp_path):
    import subprocess
    import sys

    code = "import eqxpar as ep, jax; ep.simulate_cpu_devices(3); print(len(jax.devices()))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "3"
