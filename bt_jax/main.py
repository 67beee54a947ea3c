"""Entry point: `python -m bt_jax.main --config=configs/imagenet.py --workdir=DIR` (or `bt-jax`).

Starts jax.distributed when the run spans several processes (automatic on Cloud TPU and
SLURM; --coordinator_address/--num_processes/--process_id or BT_JAX_* variables otherwise)
and runs the job the config names (config.job: a key of JOBS). The jobs are imported by
name, so this module depends on none of them.
"""

from __future__ import annotations

import importlib
import os
import sys

from bt_jax import host_memory

if __name__ == "__main__":  # python -m: re-exec before jax is imported (nothing runs twice)
    host_memory.reexec_with_huge_pages()

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
    host_memory.reexec_with_huge_pages()  # CPU-only runs: 1.4x faster steps (its docstring)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
