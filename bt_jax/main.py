"""Entry point: `python -m bt_jax.main --config=configs/imagenet.py --workdir=DIR` (or `bt-jax`).

Starts jax.distributed when the run spans several processes (automatic on Cloud TPU and
SLURM; --coordinator_address/--num_processes/--process_id or BT_JAX_* variables otherwise)
and runs the job the config names (config.job: a key of JOBS). The jobs are imported by
name, so this module depends on none of them.

On CPU-only Linux runs the process first re-executes itself once, before jax is imported,
with huge pages for malloc (reexec_with_huge_pages: why, and how to turn it off).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import sys

# ---------------------------------------------------------------------- host memory
# Defined before the imports below, which the re-exec would otherwise pay twice.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES_SWITCH = "BT_JAX_HUGE_PAGES"
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


def huge_pages_wanted(environ=os.environ) -> bool:
    """Whether this process should run with the hugetlb tunable and does not yet."""
    if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return False  # set already (by us before the re-exec, or by the user)
    switch = environ.get(HUGE_PAGES_SWITCH, "")
    if switch == "0" or not _glibc_supports_hugetlb():
        return False
    if switch == "1":
        return True
    return _thp_mode() == "madvise" and cpu_only(environ)


def environment_with_huge_pages(environ=os.environ) -> dict:
    """`environ` with the tunable added to GLIBC_TUNABLES (colon-separated, as glibc reads it)."""
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(
        t for t in (env.get("GLIBC_TUNABLES", ""), HUGE_PAGES_TUNABLE) if t
    )
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

    Call it first thing in an entry point, before any thread or heavy import: everything
    done before it is done twice. Nothing happens unless huge_pages_wanted().
    """
    if not huge_pages_wanted() or not started_as_this_program():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment_with_huge_pages())


if __name__ == "__main__":  # python -m: re-exec before jax is imported (nothing runs twice)
    reexec_with_huge_pages()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bt_jax import defaults, distributed  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/imagenet.py; override with --config.a.b=v."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and results go here.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs off SLURM/TPU."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show tracebacks of configuration errors.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run",
    False,
    "Parse the flags, build and check the config, print it and exit: nothing is run and "
    "jax.distributed is not started (check a command before submitting it).",
)

# config.job -> the module whose run(config, workdir) it is
JOBS = {
    "pretrain": "bt_jax.pretrain",
    "knn": "bt_jax.knn_eval",
    "linear_eval": "bt_jax.linear_eval",
    "semi_supervised": "bt_jax.semi_supervised",
    "transfer": "bt_jax.transfer",
}


def _job_module(config) -> str:
    if config.job not in JOBS:
        raise ValueError(f"unknown job {config.job!r}; choose one of {sorted(JOBS)}")
    return JOBS[config.job]


def run(config, workdir: str):
    job = importlib.import_module(_job_module(config))
    return job.run(config, workdir)


def dry_run(config, workdir: str) -> None:
    """--dry_run: the config a command would run, checked as its job checks it, printed."""
    _job_module(config)
    if not workdir:
        raise ValueError("--workdir is required: the folder for checkpoints and metrics")
    if config.job == "pretrain":
        defaults.validate_pretrain_config(config)
        config = defaults.resolve_pretrain_config(config)  # what the job will run
    print(config, end="")
    print(f"bt_jax: dry run: job {config.job}, workdir {workdir}: config OK; nothing was run")


def _one_line_each(err: Exception) -> str:
    return "\n".join(f"bt_jax: error: {line}" for line in str(err).splitlines())


def _explain_override_error(argv, err) -> str:
    """Name the override that failed and, for an unknown key, the keys that exist."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    try:
        config = defaults.load_config(spec)
    except Exception:  # the file itself is broken: absl's message is all we have
        return f"bt_jax: error: cannot load --config={spec}: {err}"
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node, path = config, arg[len("--config.") :].split("=", 1)[0].split(".")
        for depth, key in enumerate(path):
            if not hasattr(node, "keys") or key not in node:
                where = ".".join(["config", *path[:depth]])
                known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
                return f"bt_jax: error: {arg}: {where} has no field {key!r}; its fields: {known}"
            node = node[key]
    return f"bt_jax: error: bad config override: {err}"


def parse_flags(argv):
    """absl's parser, with config errors (unknown key, bad value) as one line, no traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        sys.exit(f"bt_jax: error: {err}")
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        sys.exit(_explain_override_error(argv, err))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/quickstart.py")
    if _DRY_RUN.value:
        try:
            return dry_run(config, _WORKDIR.value)
        except ValueError as err:
            sys.exit(_one_line_each(err))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not flags.FLAGS["verbosity"].present:  # orbax and TF log every save at INFO
        logging.set_verbosity(logging.WARNING)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    logging.info("config:\n%s", config)
    try:
        run(config, _WORKDIR.value)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        if _TRACEBACK.value:
            raise
        print(_one_line_each(err), file=sys.stderr, flush=True)
        sys.exit(1)


def cli() -> None:
    """The `bt-jax` console script (setup.cfg): the same as `python -m bt_jax.main`."""
    reexec_with_huge_pages()  # CPU-only runs: faster steps (its docstring)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
