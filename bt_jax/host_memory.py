"""Transparent huge pages for malloc on CPU-only runs: one re-exec at start-up (Linux, glibc).

XLA:CPU allocates each execution's temporaries (about 300 MB for the quickstart's step) from
its worker threads. glibc serves an allocation that large with a fresh mmap and unmaps it on
free, so every step faults its temporaries in again 4 KiB at a time: on the 2-core machine of
docs/benchmarks.md ("Host memory") 78,000 page faults and ~0.18 CPU-s of kernel time per
0.3 s quickstart step. glibc's tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) madvises
those mappings for transparent huge pages: 2 MiB faults, 30x fewer, and the step runs 1.4x
faster at the same peak memory. glibc reads tunables once, when a process starts, so the
entry point re-executes itself with the tunable set (same PID, same arguments).

Only where it is measured to help: CPU-only runs (JAX_PLATFORMS=cpu, or no accelerator
plugin installed; accelerator hosts keep glibc's defaults for tf.data), with the kernel's
THP mode "madvise" ("always" needs nothing, "never" cannot use it). BT_JAX_HUGE_PAGES=0
turns it off, =1 forces it; a GLIBC_TUNABLES that already names hugetlb is left as it is.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
SWITCH = "BT_JAX_HUGE_PAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
# jax's accelerator plugins and libtpu: with one installed the run may not be CPU-only.
ACCELERATOR_MODULES = (
    "jax_cuda12_plugin",
    "jax_cuda13_plugin",
    "jax_rocm60_plugin",
    "jax_rocm7_plugin",
    "libtpu",
)


def _glibc_supports_hugetlb() -> bool:
    libc, version = platform.libc_ver()
    if sys.platform != "linux" or libc != "glibc":
        return False
    try:
        major, minor = (int(v) for v in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def _thp_mode() -> str:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), or ""."""
    try:
        with open(THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return ""
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else ""


def cpu_only(environ=os.environ) -> bool:
    """Whether jax will run on the CPU alone, judged without importing jax."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.strip().lower() == "cpu"
    return not any(importlib.util.find_spec(name) for name in ACCELERATOR_MODULES)


def wanted(environ=os.environ) -> bool:
    """Whether this process should run with the hugetlb tunable and does not yet."""
    if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return False  # set already (by us before the re-exec, or by the user)
    switch = environ.get(SWITCH, "")
    if switch == "0" or not _glibc_supports_hugetlb():
        return False
    if switch == "1":
        return True
    return _thp_mode() == "madvise" and cpu_only(environ)


def environment_with_huge_pages(environ=os.environ) -> dict:
    """`environ` with the tunable added to GLIBC_TUNABLES (colon-separated, as glibc reads it)."""
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), TUNABLE) if t)
    return env


def started_as_this_program() -> bool:
    """Whether sys.orig_argv (what the interpreter was started with) runs the program that
    sys.argv names: false when a host process rewrote sys.argv to run a program in-process
    (runpy), where re-executing the original command would start the host again."""
    orig, args = sys.orig_argv, sys.argv[1:]
    n = len(orig) - len(args)
    if n < 2 or orig[n:] != args:
        return False
    program, flag = orig[n - 1], orig[n - 2]
    if flag == "-m":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        return spec is not None and spec.name == program
    if flag == "-c":
        return sys.argv[0] == "-c"
    return program == sys.argv[0]


def reexec_with_huge_pages() -> None:
    """Replace this process by itself with the tunable set, if wanted(); else return.

    Call it first thing in an entry point, before any thread or heavy import: everything
    done before it is done twice.
    """
    if not wanted() or not started_as_this_program():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment_with_huge_pages())
