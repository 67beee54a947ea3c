"""Every command the documentation shows is executed: README.md, docs/*.md, the config
docstrings (configs/*.py) and what the launchers print with --dry-run (tests/commands.py
collects them by parsing those files and documents the placeholder substitutions).

- `python -m bt_jax.main ...`: flag parsing, config construction and the job's config
  checks, through main's own --dry_run (all of them, wherever they appear: inside gcloud's
  --command, after srun or an environment, in a launcher's printout);
- pretraining commands whose data is here (the embedded set, or $BT_JAX_TFDS_DIR for the
  offline copies) then run one real step (at a global batch of 16 where theirs is above 64:
  the same model, data and code, at a step size a 2-core CPU runs in seconds);
- other Python programs (bench/, bt_jax.export, launch/local_multiprocess.py, new tools):
  their own argparse parsing of the documented arguments;
- launcher commands: the launcher runs with --dry-run and every bt_jax.main command it
  prints is checked as above;
- the rest (pip, tfds build, gcloud, ssh loops, ...) cannot run here; commands.NOT_HERE
  says why for each, and a command of a kind nobody classified fails the test.

Evaluation commands are checked through --dry_run only here: the README's run for real in
tests/test_readme.py, the jobs themselves in tests/test_eval_jobs.py.
"""

import os
import shlex
import subprocess
import sys

import pytest
from commands import (
    NOT_HERE,
    ROOT,
    TFDS_ENV,
    Checker,
    build_config,
    collect,
    env_and_argv,
    kind,
    launcher_dry_run,
    main_invocations,
    substitute,
)
from e2e import cpu_env

from bt_jax.data.config import EMBEDDED_DATASETS

COMMANDS = collect()


def _of_kind(*kinds):
    chosen = [c for c in COMMANDS if kind(c) in kinds]
    return pytest.mark.parametrize("command", chosen, ids=[c.where for c in chosen])


@pytest.fixture(scope="module")
def checker():
    checker = Checker(cpu_env(8))
    yield checker
    checker.close()


def _check_main(checker, args, workdir):
    rc, output = checker.check("main", substitute(args, str(workdir)))
    assert rc == 0, f"python -m bt_jax.main {shlex.join(args)} --dry_run:\n{output[-3000:]}"
    assert "config OK; nothing was run" in output


def test_every_command_has_a_known_kind():
    unknown = [f"{c.where}: {c.text}" for c in COMMANDS if kind(c) == "unknown"]
    assert not unknown, (
        "commands of a kind tests/commands.py does not know: run them in "
        "tests/test_commands.py or add their first word to commands.NOT_HERE with the reason:\n"
        + "\n".join(unknown)
    )


def test_the_parser_finds_the_documented_commands():
    kinds = [kind(c) for c in COMMANDS]
    assert kinds.count("main") >= 20 and kinds.count("launcher") >= 6, kinds
    assert kinds.count("script") >= 5, kinds
    wheres = {c.where.split(":")[0] for c in COMMANDS}
    assert {"README.md", "docs/launching.md", "configs/cifar10.py"} <= wheres


@_of_kind("main")
def test_main_command_parses_and_builds_its_config(command, checker, tmp_path):
    (args,) = main_invocations(command.words)
    _check_main(checker, args, tmp_path)


@_of_kind(*(k for k in NOT_HERE if k not in ("template", "mention")))
def test_main_commands_inside_other_commands_parse(command, checker, tmp_path):
    for args in main_invocations(command.words):
        _check_main(checker, args, tmp_path)


@_of_kind("script")
def test_python_program_parses_its_documented_arguments(command, checker):
    _, argv = env_and_argv(command.words)
    rc, output = checker.check("script", argv[1:])
    assert rc == 0 and "parsed: Namespace(" in output, f"{command.text}:\n{output[-3000:]}"


@_of_kind("launcher")
def test_launcher_prints_bt_jax_commands_that_parse(command, checker, tmp_path):
    argv, env = launcher_dry_run(command, str(tmp_path))
    launcher_env = {  # what the launchers read comes from the command only
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_") and k not in ("CONFIG", "WORKDIR", "DATA_DIR", "PYTHON")
    }
    result = subprocess.run(
        argv, cwd=ROOT, env={**launcher_env, **env}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    printed = [
        args
        for line in result.stdout.splitlines()
        if line and not line.startswith("#")
        for args in main_invocations(shlex.split(line))
    ]
    assert printed, f"{shlex.join(argv)} printed no bt_jax.main command:\n{result.stdout}"
    for args in printed:
        _check_main(checker, args, tmp_path)


def test_dry_run_flag_from_a_shell(tmp_path):
    """--dry_run as a user runs it: prints the config, runs nothing, creates nothing."""
    workdir = tmp_path / "w"
    base = [sys.executable, "-m", "bt_jax.main", "--config=configs/quickstart.py"]
    ok = subprocess.run(
        [*base, f"--workdir={workdir}", "--dry_run", "--coordinator_address=h:1",
         "--num_processes=4", "--process_id=2"],
        cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "projector: 512-512-512" in ok.stdout and "config OK; nothing was run" in ok.stdout
    assert not workdir.exists()  # nor did it wait for the 4-process coordinator
    bad = subprocess.run(
        [*base, f"--workdir={workdir}", "--dry_run", "--config.train.epochs=0"],
        cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == (
        "bt_jax: error: config.train.epochs=0: must be > 0, e.g. 1000"
    )


# ----------------------------------------------------------------------- one real step


def _pretrain_commands():
    """Documented pretraining commands, each once (workdirs aside). The processes of a
    multi-process run (--coordinator_address) only run together: with their launcher."""
    seen, chosen = set(), []
    for command in COMMANDS:
        if kind(command) != "main":
            continue
        (args,) = main_invocations(command.words)
        key = tuple(a for a in args if not a.startswith("--workdir"))
        one_of_many = any(a.startswith("--coordinator_address") for a in args)
        if key not in seen and not one_of_many and build_config(args).job == "pretrain":
            seen.add(key)
            chosen.append(pytest.param(args, id=command.where))
    return chosen


def _missing_data(config) -> str | None:
    data = config.data
    if not data.data_dir and data.dataset in EMBEDDED_DATASETS:
        return None
    if data.data_dir and os.path.isdir(os.path.join(data.data_dir, data.dataset)):
        return None
    where = data.data_dir or "TFDS's default data_dir"
    return f"needs TFDS {data.dataset} prepared in {where} (offline copies: set {TFDS_ENV})"


@pytest.mark.slow
@pytest.mark.usefixtures("compilation_cache")
@pytest.mark.parametrize("args", _pretrain_commands())
def test_pretrain_command_runs_one_step(args, tmp_path):
    args = substitute(args, str(tmp_path))
    config = build_config(args)
    missing = _missing_data(config)
    if missing:
        pytest.skip(missing)
    workdir = tmp_path / "run"
    one_step = [f"--workdir={workdir}", "--config.train.stop_after_steps=1"]
    if config.train.global_batch > 64:  # the same model, data and code; a CPU-sized step
        one_step.append("--config.train.global_batch=16")
    one_step += ["--config.knn.at_end=False", "--config.knn.every_epochs=0"]
    args = [a for a in args if not a.startswith("--workdir")] + one_step
    result = subprocess.run(
        [sys.executable, "-m", "bt_jax.main", *args],
        cwd=ROOT,
        env=cpu_env(8),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"{shlex.join(args)}\n{result.stdout}\n{result.stderr[-3000:]}"
    assert "step 1/1 (100.0%)" in result.stdout
    assert os.listdir(workdir / "checkpoints") == ["1"]
