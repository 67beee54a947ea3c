"""Helpers shared by the benchmarks: device set-up, machine description, JSON results.

`set_devices` must run before anything imports jax: XLA reads the host device count from
XLA_FLAGS once, when the CPU backend starts.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")

if ROOT not in sys.path:  # `python bench/x.py` from anywhere imports the package
    sys.path.insert(0, ROOT)


def set_devices(count: int) -> None:
    """Ask XLA for `count` host (CPU) devices; no effect once jax's backend has started."""
    flag = f"--xla_force_host_platform_device_count={count}"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "jax" in sys.modules:
        import jax

        if jax.device_count() != count and jax.default_backend() == "cpu":
            print(
                f"warning: jax was already imported with {jax.device_count()} devices; "
                f"--devices={count} ignored",
                file=sys.stderr,
            )


def run_as_the_job(main) -> None:
    """main() under the host set-up of `python -m bt_jax.main`, so that a benchmark measures
    what the job runs: CPU-only runs re-execute once with huge pages for malloc
    (bt_jax.main.reexec_with_huge_pages; BT_JAX_HUGE_PAGES=0 measures without)."""
    from bt_jax import main as entry

    entry.reexec_with_huge_pages()
    main()


def command_line() -> str:
    """The command that ran this benchmark, as a copy-pastable string."""
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv])


def machine() -> dict:
    """What the numbers were measured on."""
    import jax

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            mem_kb = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip()
    except OSError:
        return ""


def envelope(**fields) -> dict:
    """The common header of every result file: date, command, machine, commit, and the
    malloc tunables the process ran with (they change CPU steps: bt_jax.main's
    reexec_with_huge_pages)."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(),
        "commit": git_commit(),
        "machine": machine(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        **fields,
    }


def write_json(path: str, data: dict, quiet: bool = False) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    if not quiet:
        print(f"wrote {path}")


def table(rows: list[list], header: list[str]) -> str:
    """A GitHub-markdown table (also readable on a terminal)."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(x) -> str:
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 1:
            return f"{x:.2f}"
        return f"{x:.3g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def repeat_median(fn, repeats: int) -> tuple[float, list[float]]:
    """Median and all wall times (seconds) of `repeats` calls of fn()."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


# Dense bf16 peaks per chip, TFLOP/s (public spec sheets; sparsity not counted), matched
# against jax's device_kind in this order (TPU v5e reports "TPU v5 lite", v5p "TPU v5").
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0),
)


def peak_flops(device_kind: str, override_tflops: float = 0.0) -> float | None:
    """The chip's dense bf16 peak in FLOP/s (override_tflops wins), or None if unknown."""
    if override_tflops:
        return override_tflops * 1e12
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops * 1e12
    return None
