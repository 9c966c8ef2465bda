"""Multi-process runs: `eqxpar.distributed`, `python -m eqxpar.launch`, and the examples
and checkpoints as several processes of one JAX distributed job (gloo on CPU).

Every multi-process case runs its processes under a timeout and kills them (by their
own ids) if the test fails first.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import eqxpar as ep
from eqxpar import launch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
DIST_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def child_env(**extra: str) -> dict[str, str]:
    """This checkout first on the path, and no distributed settings of our own."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


class Launched:
    """`python -m eqxpar.launch ...` in its own session, its output collected."""

    def __init__(self, *args: str, cwd: Path = ROOT):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "eqxpar.launch", *args],
            cwd=cwd,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []

    def readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.lines.append(line)
        return line

    def finish(self, timeout: float) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines.append(out)
        return self.proc.returncode, "".join(self.lines)

    def kill(self) -> None:
        """The launcher's whole session (it and the processes it started)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def launched():
    started: list[Launched] = []

    def start(*args: str, cwd: Path = ROOT) -> Launched:
        run = Launched(*args, cwd=cwd)
        started.append(run)
        return run

    yield start
    for run in started:
        run.kill()


def run_launcher(launched, *args: str, timeout: float) -> tuple[int, str]:
    run = launched(*args)
    try:
        return run.finish(timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        raise AssertionError(f"eqxpar.launch {' '.join(args)} ran past {timeout}s") from None


# ------------------------------------------------------------------ one process


@pytest.fixture
def no_cluster(monkeypatch):
    for name in DIST_ENV:
        monkeypatch.delenv(name, raising=False)


def test_initialize_is_a_no_op_on_one_process(no_cluster, monkeypatch):
    assert ep.distributed.initialize() is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    assert ep.distributed.initialize() is False
    assert not jax.distributed.is_initialized()


def test_initialize_refuses_what_does_not_fit(no_cluster, monkeypatch):
    with pytest.raises(ValueError, match="process_id=1 in a run of one process"):
        ep.distributed.initialize(process_id=1)
    with pytest.raises(ValueError, match="ids run from 0 to 1"):
        ep.distributed.initialize("127.0.0.1:1", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match=r"no coordinator_address \(or JAX_COORDINATOR_ADDRESS\)"):
        ep.distributed.initialize(num_processes=2, process_id=0)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not a non-negative int"):
        ep.distributed.initialize()
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    jax.devices()  # the backend is running now: too late for the runtime
    with pytest.raises(RuntimeError, match="must start before it"):
        ep.distributed.initialize("127.0.0.1:1", num_processes=2, process_id=0)


def test_one_process_holds_the_whole_batch():
    mesh = ep.make_mesh(data=2, tensor=4)
    assert ep.distributed.layout(mesh) == (
        "1 process x 8 devices: every axis inside the process (data=2, tensor=4)"
    )
    assert ep.distributed.local_slices(mesh, P("data"), (6, 5)) == (slice(0, 6), slice(0, 5))
    x = np.arange(30.0, dtype=np.float32).reshape(6, 5)
    y = ep.distributed.global_array(x, mesh, P("data"), (6, 5))
    assert y.sharding.spec == P("data") and (np.asarray(y) == x).all()
    with pytest.raises(ValueError, match=r"block of shape \(3, 5\).*holds \[0:6, 0:5\]"):
        ep.distributed.global_array(x[:3], mesh, P("data"), (6, 5))


def test_reshape_restores_read_split_like_the_target():
    from eqxpar.train._checkpoint import _reshape_source_spec

    mesh = ep.make_mesh(pipeline=2, tensor=4)
    # (layers, out, in) <-> (stages, layers per stage, out, in): the weight dims keep
    # the target's split, the leading dim too where both divide by it.
    assert _reshape_source_spec(
        (4, 12, 8), (2, 2, 12, 8), P("pipeline", None, "tensor"), mesh
    ) == P("pipeline", "tensor", None)
    assert _reshape_source_spec((2, 2, 12, 8), (4, 12, 8), P(None, "tensor"), mesh) == P(
        None, None, "tensor", None
    )
    assert _reshape_source_spec((3, 12), (1, 3, 12), P("pipeline"), mesh) == P(None, None)
    # A size-1 leading dim: the stages are the first dim of size > 1.
    assert _reshape_source_spec((4, 72, 24), (1, 2, 2, 72, 24), P(None, "pipeline"), mesh) == P(
        "pipeline", None, None
    )


def test_launcher_flags(capsys):
    with pytest.raises(SystemExit) as e:
        launch.main(["--processes", "0", "--devices-per-process", "4", "x.py"])
    assert e.value.code == 2 and "'0' is not a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        launch.main(["--processes", "2", "--devices-per-process", "4", "/no/such/script.py"])
    assert e.value.code == 2 and "/no/such/script.py is not a file" in capsys.readouterr().err


def test_examples_refuse_devices_that_contradict_the_launcher(monkeypatch):
    import train_transformer

    monkeypatch.setenv(launch.DEVICES_ENV, "4")
    with pytest.raises(SystemExit, match="--devices: 8, but eqxpar.launch gives each process"):
        train_transformer.main(["--devices", "8", "--steps", "1"])


# ------------------------------------------------------------------ two processes

LAYOUT_SCRIPT = """
import os
import numpy as np
import eqxpar as ep

ep.distributed.initialize()
ep.simulate_cpu_devices(int(os.environ["EQXPAR_DEVICES_PER_PROCESS"]))
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

me = jax.process_index()
for sizes in ({"data": 2, "tensor": 4}, {"data": 2, "tensor": 2, "pipeline": 2}):
    mesh = ep.make_mesh(**sizes)
    print("layout", ep.distributed.layout(mesh))
mesh = ep.make_mesh(data=2, tensor=4)
block = ep.distributed.local_slices(mesh, P("data"), (6, 5))
print("block", block[0].start, block[0].stop)
x = np.arange(30.0, dtype=np.float32).reshape(6, 5)
g = ep.distributed.global_array(x[block], mesh, P("data"), (6, 5))
total = jax.jit(lambda g: g.sum(), out_shardings=NamedSharding(mesh, P()))(g)
print("sum", float(total))
try:
    ep.make_mesh(data=1, tensor=8)
except ValueError as e:
    print("tensor8", str(e).split(":")[0], "would span" in str(e))
raise SystemExit(3 if me == 1 and os.environ.get("FAIL") else 0)
"""


def test_two_processes_share_one_mesh(launched, tmp_path):
    script = tmp_path / "layout.py"
    script.write_text(LAYOUT_SCRIPT)
    code, out = run_launcher(
        launched, "--processes", "2", "--devices-per-process", "4", str(script), timeout=120
    )
    assert code == 0, out
    for rank in (0, 1):  # every line comes prefixed with its process
        assert (
            f"[{rank}] layout 2 processes x 4 devices: data spans processes (process 0: data "
            f"0; process 1: data 1); tensor=4 inside each process" in out
        )
        assert (
            f"[{rank}] layout 2 processes x 4 devices: pipeline spans processes (process 0: "
            f"pipeline 0; process 1: pipeline 1); data=2, tensor=2 inside each process" in out
        )
        assert f"[{rank}] sum 435.0" in out  # sum(range(30)): both halves arrived
        assert f"[{rank}] tensor8 make_mesh(tensor=8) True" in out
    assert "[0] block 0 3" in out and "[1] block 3 6" in out


def test_a_launched_script_runs_as_python_script_would_with_whole_lines(launched, tmp_path):
    """The script is `__main__` with its argv and directory, as under `python script.py`,
    and its stdout is line-buffered: under PYTHONUNBUFFERED each piece of a print is a write
    of its own, and gloo's C++ logging to the same stdout split lines (a CI failure)."""
    script = tmp_path / "whole.py"
    script.write_text(
        "import os, sys\n"
        "print('argv', sys.argv, 'main', __name__, 'file', __file__)\n"
        "print('path0', sys.path[0] == os.path.dirname(os.path.abspath(__file__)))\n"
        "print('buffered', sys.stdout.line_buffering, sys.stdout.write_through)\n"
    )
    code, out = run_launcher(
        launched,
        "--processes",
        "2",
        "--devices-per-process",
        "1",
        str(script),
        "-x",
        "1",
        timeout=60,
    )
    assert code == 0, out
    for rank in (0, 1):
        assert f"[{rank}] argv {[str(script), '-x', '1']} main __main__ file {script}" in out
        assert f"[{rank}] path0 True" in out
        assert f"[{rank}] buffered True False" in out


def test_a_failed_process_fails_the_launch(launched, tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(
        "import os, sys, time\n"
        "if os.environ['JAX_PROCESS_ID'] == '1':\n"
        "    sys.exit(3)\n"
        "time.sleep(120)\n"
    )
    begin = time.monotonic()
    code, out = run_launcher(
        launched, "--processes", "2", "--devices-per-process", "1", str(script), timeout=60
    )
    assert code == 3, out
    assert "[launch] process 1 exited with code 3; stopping the other process (0)" in out
    assert time.monotonic() - begin < 30


COLLECTIVE_LOOP = """
import os, time
import eqxpar as ep

ep.distributed.initialize()
ep.simulate_cpu_devices(2)
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

mesh = ep.make_mesh(data=4)
x = jax.device_put(jnp.ones(4), NamedSharding(mesh, P("data")))
total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))
print("ready", jax.process_index(), os.getpid(), flush=True)
for i in range(10_000):
    float(total(x + i))
    time.sleep(0.05)
"""


def test_a_killed_process_stops_the_others_naming_it(launched, tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(COLLECTIVE_LOOP)
    run = launched("--processes", "2", "--devices-per-process", "2", str(script))
    pids: dict[int, int] = {}
    deadline = time.monotonic() + 120
    while len(pids) < 2 and time.monotonic() < deadline:
        line = run.readline()
        assert line, "".join(run.lines)
        if match := re.match(r"\[\d\] ready (\d) (\d+)", line):
            pids[int(match[1])] = int(match[2])
    assert len(pids) == 2, "".join(run.lines)
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    code, out = run.finish(timeout=60)
    print(f"the launch exited {time.monotonic() - killed:.1f}s after the kill")
    assert time.monotonic() - killed < 60
    assert code != 0
    assert "[launch] process 1 was killed by SIGKILL; stopping the other process (0)" in out


@pytest.mark.slow
def test_a_lost_process_is_named_by_the_runtime_without_the_launcher(tmp_path):
    """Under a cluster launcher (srun, mpirun, a JobSet) nothing watches the processes:
    JAX's heartbeats (30 s, set by `initialize`) stop the survivor, naming the lost one."""
    from eqxpar.launch import free_port

    script = tmp_path / "loop.py"
    script.write_text(COLLECTIVE_LOOP)
    address = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env=child_env(
                JAX_COORDINATOR_ADDRESS=address,
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(rank),
                JAX_PLATFORMS="cpu",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        survivor, lost = procs
        assert lost.stdout is not None
        for line in iter(lost.stdout.readline, ""):
            if line.startswith("ready"):
                break
        time.sleep(1.0)
        lost.kill()
        killed = time.monotonic()
        out, _ = survivor.communicate(timeout=90)
        elapsed = time.monotonic() - killed
        print(f"the survivor exited {elapsed:.1f}s after the kill")
        assert survivor.returncode != 0, out
        assert elapsed < 60, f"the survivor took {elapsed:.0f}s to stop"
        assert re.search(r"tasks are unhealthy \(stopped sending heartbeats\):\s*1\b", out), out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


# ------------------------------------------------------------------ the example

TRANSFORMER = [
    "--layers",
    "2",
    "--dim",
    "64",
    "--seq-len",
    "32",
    "--eval-every",
    "2",
    "--sample-tokens",
    "8",
    "--checkpoint-every",
    "2",
    "--keep-checkpoints",
    "5",
]


def losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "step_time_s" in r}


def metric_rows(out: Path) -> list[dict]:
    text = (out / "transformer" / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def only_step(ckpt: Path, step: int, into: Path) -> Path:
    """A copy of checkpoint directory `ckpt` that holds step `step` alone."""
    shutil.copytree(ckpt, into)
    for path in into.iterdir():
        if path.name.isdigit() and int(path.name) != step:
            shutil.rmtree(path)
    return into


@pytest.fixture
def standard_promotion():
    # Optax's Adam mixes Python floats with int32 counts: the examples run with
    # JAX's default promotion, not the suite's strict one.
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.mark.slow
def test_two_processes_train_and_checkpoint_like_one(launched, tmp_path, standard_promotion):
    """2 processes x 4 devices on data=2, tensor=2, pipeline=2 (pipeline across the
    processes) give the 1-process 8-device losses; a checkpoint of either resumes in
    the other, on another mesh too, and continues with the same losses."""
    import train_transformer

    mesh = ["--mesh", "data=2,tensor=2,pipeline=2"]
    one = train_transformer.main(
        [*TRANSFORMER, *mesh, "--steps", "4", "--checkpoint-dir", str(tmp_path / "ck1"),
         "--out", str(tmp_path / "one")]
    )  # fmt: skip
    code, out = run_launcher(
        launched,
        *("--processes", "2", "--devices-per-process", "4", str(EXAMPLES / "train_transformer.py")),
        *(*TRANSFORMER, *mesh, "--steps", "4", "--checkpoint-dir", str(tmp_path / "ck2")),
        *("--out", str(tmp_path / "two")),
        timeout=400,
    )
    assert code == 0, out
    assert "[0] devices: 2 processes x 4 devices: pipeline spans processes" in out
    assert "[1] step" not in out  # progress from process 0 only
    want = losses(one["rows"])
    assert sorted(want) == [0, 1, 2, 3]
    got = losses(metric_rows(tmp_path / "two"))
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-5)

    # 2 processes -> 1 process, same mesh: resume at step 2 and go on.
    resumed = train_transformer.main(
        [*TRANSFORMER, *mesh, "--steps", "4", "--resume", "--out", str(tmp_path / "r1"),
         "--checkpoint-dir", str(only_step(tmp_path / "ck2", 2, tmp_path / "ck2at2"))]
    )  # fmt: skip
    got = losses(resumed["rows"])
    assert sorted(got) == [2, 3]
    np.testing.assert_allclose([got[2], got[3]], [want[2], want[3]], rtol=1e-5)

    # 1 process -> 2 processes, onto data=2, tensor=4 (no pipeline: the stacked layers
    # are reshaped on the devices of both processes).
    code, out = run_launcher(
        launched,
        *("--processes", "2", "--devices-per-process", "4", str(EXAMPLES / "train_transformer.py")),
        *(*TRANSFORMER, "--mesh", "data=2,tensor=4", "--steps", "4", "--resume"),
        *("--checkpoint-dir", str(only_step(tmp_path / "ck1", 2, tmp_path / "ck1at2"))),
        *("--out", str(tmp_path / "r2")),
        timeout=400,
    )
    assert code == 0, out
    assert "[0] resumed from step 2 (batch 2)" in out
    got = losses(metric_rows(tmp_path / "r2"))
    assert sorted(got) == [2, 3]
    np.testing.assert_allclose([got[2], got[3]], [want[2], want[3]], rtol=1e-5)


@pytest.mark.slow
def test_the_launched_example_prints_the_single_process_held_out_loss(launched, tmp_path):
    """The issue's command, against the same script as one process."""
    flags = ["--mesh", "data=2,tensor=4", "--steps", "20"]
    held_out = re.compile(r"held-out loss (\d+\.\d+) nats/byte")
    single = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_transformer.py"), *flags],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert single.returncode == 0, single.stdout + single.stderr
    code, out = run_launcher(
        launched,
        *("--processes", "2", "--devices-per-process", "4"),
        *(str(EXAMPLES / "train_transformer.py"), *flags, "--out", str(tmp_path / "runs2")),
        timeout=400,
    )
    assert code == 0, out
    want = held_out.search(single.stdout)
    got = held_out.search(out)
    assert want is not None and got is not None, out
    assert got[1] == want[1]
    assert re.search(r"^\[0\] done in .*held-out loss", out, re.M)
    assert not re.search(r"^\[1\] done in", out, re.M)  # printed by process 0 only


def test_docs_page_recipes_name_real_flags():
    """The launcher flags docs/multi-host.md uses exist (its python block runs in
    tests/test_docs.py)."""
    text = (ROOT / "docs" / "multi-host.md").read_text()
    flags = set(re.findall(r"python -m eqxpar\.launch((?: --[\w-]+(?: \d+)?)+)", text))
    assert flags, "the page shows no launcher command"
    known = {a for action in launch._parser()._actions for a in action.option_strings}
    for found in flags:
        for flag in re.findall(r"--[\w-]+", found):
            assert flag in known, f"docs/multi-host.md uses {flag}, not a launcher flag"


def test_api_reference_lists_the_distributed_names():
    text = (ROOT / "docs" / "api.md").read_text()
    for name in ep.distributed.__all__:
        assert f"::: eqxpar.distributed.{name}\n" in text, f"docs/api.md lacks {name}"
    assert "multi-host.md" in (ROOT / "mkdocs.yml").read_text()


@pytest.mark.slow
def test_a_terminated_launch_stops_within_its_grace(launched, tmp_path):
    """SIGTERM reaches every process, where JAX's preemption notifier catches it; the
    launcher kills what still runs after `TERM_GRACE_S`."""
    script = tmp_path / "loop.py"
    script.write_text(COLLECTIVE_LOOP)
    run = launched("--processes", "2", "--devices-per-process", "2", str(script))
    ready = 0
    while ready < 2:
        line = run.readline()
        assert line, "".join(run.lines)
        ready += bool(re.match(r"\[\d\] ready", line))
    run.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code, out = run.finish(timeout=launch.TERM_GRACE_S + 30)
    assert code != 0
    assert time.monotonic() - sent < launch.TERM_GRACE_S + 15
    assert f"still running {launch.TERM_GRACE_S:.0f}s after SIGTERM" in out
