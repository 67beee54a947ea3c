#!/usr/bin/env python3
r"""Run one bt_jax job as N processes on this machine: a real multi-host run over 127.0.0.1.

Each process gets M CPU devices and joins the others through jax.distributed (process 0
hosts the coordinator); collectives between processes go over gloo. Output lines are
prefixed with the process index. If any process fails, the others are stopped and the
first non-zero exit code is returned; SIGTERM/SIGINT are forwarded to every process.

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=4 -- \
      --config=configs/quickstart.py --workdir=/tmp/bt_quickstart_2proc

Everything after `--` is passed to `python -m bt_jax.main`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(num_processes: int, devices_per_process: int, port: int, job_args: list[str]):
    """(environment additions, argv) for every process."""
    coordinator = f"127.0.0.1:{port}"
    env = {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
    }
    return [
        (
            env,
            [
                sys.executable,
                "-m",
                "bt_jax.main",
                *job_args,
                f"--coordinator_address={coordinator}",
                f"--num_processes={num_processes}",
                f"--process_id={i}",
            ],
        )
        for i in range(num_processes)
    ]


def _pump(index: int, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"[p{index}] {line}")
        out.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--port", type=int, default=0, help="coordinator port; 0 = any free")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("job_args", nargs="*", help="arguments for python -m bt_jax.main")
    args = parser.parse_args(argv)
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be >= 1")
    port = args.port or free_port()
    plan = commands(args.num_processes, args.devices_per_process, port, args.job_args)
    if args.dry_run:
        for env, cmd in plan:
            prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
            print(f"{prefix} {shlex.join(cmd)}")
        return 0

    procs, pumps = [], []
    for index, (env, cmd) in enumerate(plan):
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        procs.append(proc)
        pump = threading.Thread(target=_pump, args=(index, proc.stdout, sys.stdout), daemon=True)
        pump.start()
        pumps.append(pump)

    def forward(signum, _frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    code = 0
    remaining = set(range(len(procs)))
    while remaining:
        for index in sorted(remaining):
            try:
                rc = procs[index].wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            remaining.discard(index)
            if rc != 0 and code == 0:
                code = rc
                print(
                    f"[launch] process {index} exited with {rc}; stopping the others",
                    file=sys.stderr,
                    flush=True,
                )
                for other in remaining:  # they may wait in a collective forever
                    procs[other].kill()
    for pump in pumps:
        pump.join(timeout=5)
    return code


if __name__ == "__main__":
    sys.exit(main())
