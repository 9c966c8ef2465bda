"""Runs a script as N local processes of one JAX distributed job, on CPU.

    python -m eqxpar.launch --processes 2 --devices-per-process 4 \\
        examples/train_transformer.py --mesh data=2,tensor=4 --steps 20

For tests and for trying a multi-host run on one machine: each process gets
`--devices-per-process` simulated CPU devices, the processes talk through JAX's
coordination service on `127.0.0.1:PORT` and run their collectives with gloo. The
script calls `eqxpar.distributed.initialize()` (the examples do), which reads what this
launcher sets: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, and
`EQXPAR_DEVICES_PER_PROCESS` (with `JAX_PLATFORMS=cpu`). Each process plays a host of
its own (`EQXPAR_HOST`), so `eqxpar.make_mesh` lays the mesh out as on a cluster.

Each line a process prints comes out prefixed with its id (`[1] step 10/20 ...`).
Ctrl-C and SIGTERM are forwarded to every process (a second Ctrl-C terminates them, a
third kills them; after a SIGTERM, processes still running 30 s later are killed, since
JAX's preemption notifier catches SIGTERM). When a process fails, the launcher says
which one and how, stops the others (SIGTERM, then SIGKILL after a grace period), and
exits non-zero with the failed process's code. Cluster launchers (srun, mpirun, a
JobSet) need nothing from it: see docs/multi-host.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from .distributed import HOST_ENV

__all__ = ["main"]

DEVICES_ENV = "EQXPAR_DEVICES_PER_PROCESS"
GRACE_S = 5.0  # between SIGTERM and SIGKILL when stopping the survivors
# After a SIGTERM to the launcher: JAX's preemption notifier catches it in each process
# (a script may checkpoint at `multihost_utils.reached_preemption_sync_point`), so the
# processes are killed if they are still running this long after.
TERM_GRACE_S = 30.0
# Runs the script with Python's streams line-buffered: a print reaches the pipe in one
# write, so a C++ library writing to the same stdout (gloo does) cannot split its line.
# (Under PYTHONUNBUFFERED, set here or inherited, each of print's pieces is a write.)
_RUN_LINE_BUFFERED = (
    "import os, runpy, sys\n"
    "sys.stdout.reconfigure(line_buffering=True, write_through=False)\n"
    "sys.stderr.reconfigure(line_buffering=True, write_through=False)\n"
    "sys.argv = sys.argv[1:]\n"
    "sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1 to 65535)")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eqxpar.launch",
        description="Run SCRIPT as N local processes of one JAX distributed job (CPU, gloo).",
    )
    p.add_argument("--processes", type=_positive, required=True, help="how many processes")
    p.add_argument(
        "--devices-per-process",
        type=_positive,
        required=True,
        help="simulated CPU devices in each process",
    )
    p.add_argument(
        "--port",
        type=_port,
        default=None,
        help="the coordinator's port on 127.0.0.1 (default: a free one)",
    )
    p.add_argument("script", help="the Python script to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return p


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _pump(source, sink, rank: int, lock: threading.Lock) -> None:
    """Copies one of a process's streams to ours, whole lines prefixed with its id (its
    stdout and stderr apart, so that a library's stderr cannot split a stdout line)."""
    for raw in iter(source.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
        with lock:
            sink.write(f"[{rank}] {line}\n")
            sink.flush()
    source.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the launcher with command-line `argv`; returns its exit code."""
    args = _parser().parse_args(argv)
    if not os.path.isfile(args.script):
        _parser().error(f"SCRIPT: {args.script} is not a file")
    port = args.port if args.port is not None else free_port()
    lock = threading.Lock()

    def say(text: str) -> None:
        with lock:
            sys.stdout.write(f"[launch] {text}\n")
            sys.stdout.flush()

    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    for rank in range(args.processes):
        env = dict(os.environ)
        env.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES=str(args.processes),
            JAX_PROCESS_ID=str(rank),
            JAX_PLATFORMS="cpu",
        )
        env[DEVICES_ENV] = str(args.devices_per_process)
        env[HOST_ENV] = f"{socket.gethostname()}/{rank}"  # each process plays a host
        proc = subprocess.Popen(
            [sys.executable, "-c", _RUN_LINE_BUFFERED, args.script, *args.args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # signals reach it only through us
        )
        procs.append(proc)
        for source, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
            pump = threading.Thread(target=_pump, args=(source, sink, rank, lock), daemon=True)
            pump.start()
            pumps.append(pump)
    say(
        f"{args.processes} processes x {args.devices_per_process} CPU devices, "
        f"coordinator 127.0.0.1:{port}: {args.script} {' '.join(args.args)}".rstrip()
    )

    interrupts = [0]
    kill_at = [float("inf")]  # after a SIGTERM: when to kill what is still running

    def forward(signum, frame):
        interrupts[0] += 1
        if signum == signal.SIGTERM:  # JAX's preemption notifier catches it: bound it
            kill_at[0] = min(kill_at[0], time.monotonic() + TERM_GRACE_S)
        sent = signum
        if signum == signal.SIGINT and interrupts[0] == 2:
            sent = signal.SIGTERM
        elif interrupts[0] >= 3:
            sent = signal.SIGKILL
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(sent)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failed: tuple[int, int] | None = None  # (rank, code) of the first failure
    try:
        while any(p.poll() is None for p in procs):
            for rank, proc in enumerate(procs):
                code = proc.poll()
                if code not in (None, 0) and failed is None:
                    failed = (rank, code)
                    alive = [r for r, p in enumerate(procs) if p.poll() is None]
                    say(
                        f"process {rank} {_describe_exit(code)}; stopping the other "
                        f"process{'es' if len(alive) != 1 else ''} "
                        f"({', '.join(map(str, alive)) or 'none left'})"
                    )
                    _stop(procs)
            if time.monotonic() > kill_at[0]:
                say(f"still running {TERM_GRACE_S:.0f}s after SIGTERM: killing the processes")
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()
            time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _stop(procs)
        for pump in pumps:
            pump.join(timeout=5)
    if failed is None:
        for rank, proc in enumerate(procs):
            if proc.returncode != 0:
                failed = (rank, proc.returncode)
                break
    if failed is None:
        return 0
    rank, code = failed
    say(f"failed: process {rank} {_describe_exit(code)}")
    return code if code > 0 else 128 - code


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to every live process, SIGKILL to any still alive after `GRACE_S`."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
