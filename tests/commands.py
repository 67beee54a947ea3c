"""Every command the documentation shows, collected by parsing it, and a checker for them.

Sources, parsed (so that commands added later are covered without editing this file):
- README.md and docs/*.md: fenced code blocks (every line), indented code blocks and inline
  code spans (the lines that start like a command: a program below, or VAR=value first);
- the docstrings of configs/*.py: their indented lines starting with `python`, and `...`
  lines, which continue the command above them;
- the commands that the launchers print with --dry-run, for every launcher command found
  above (tests/test_commands.py runs the launchers to get them).
Continuation lines ("\\") are joined, `a && b` is two commands, `# ...` is a comment.

Placeholders, substituted before a command runs (SUBSTITUTIONS; a dry run needs none of
them to exist): W -> a fresh workdir; $P -> the pretrained workdir that docs/benchmarks.md
defines as P; R (a node rank) -> 0; $TFDS_DIR, $TFDS_DATA_DIR, ../shared/tfds and
/work/shared/tfds -> $BT_JAX_TFDS_DIR when set. gs://BUCKET/..., /ckpt/..., /shared/...
stay: a dry run only builds the config, and no command that names them runs here.

`python tests/commands.py --serve` is a zygote for the checks: it imports jax, TensorFlow
and bt_jax once, then forks a fresh child per command (absl's global flags start unparsed
in each), which runs `python -m bt_jax.main ... --dry_run` through bt_jax.main's own
app.run, or another Python program up to its argparse parse_args() (which then exits 0).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
import re
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TFDS_ENV = "BT_JAX_TFDS_DIR"

# First words that make a line of an indented block or an inline span a command.
PROGRAMS = (
    "python", "python3", "bash", "sbatch", "srun", "pip", "tfds", "gcloud",
    "tensorboard", "ssh", "cd", "source", "git", "tar", "for", "until", "bt-jax",
)  # fmt: skip

# Commands that cannot run here, by first word (or "python -m <module>"), and why.
NOT_HERE = {
    "pip": "installs packages (CI runs the README's install commands)",
    "python -m pytest": "the test suite itself",
    "python -m venv": "creates an environment",
    "python3 -m venv": "creates an environment",
    "tfds": "builds a TFDS dataset from manual downloads (ImageNet)",
    "gcloud": "needs Google Cloud (its bt_jax.main command, if any, is checked)",
    "srun": "needs SLURM (its bt_jax.main command is checked)",
    "ssh": "needs the cluster's nodes",
    "for": "a shell loop over cluster nodes (the launcher command it wraps is shown too)",
    "until": "a retry loop around the launcher command shown before it",
    "tensorboard": "a viewer for a run's metrics",
    "cd": "changes directory",
    "source": "activates an environment",
    "git": "version control",
    "tar": "packs files",
    "template": "a usage template (<name>, DIR, [options]), not a command",
    "mention": "the program named in prose, without arguments",
}
LAUNCHERS = {
    "launch/tpu_pod.sh": ["bash", "launch/tpu_pod.sh"],
    "launch/multinode_gpu.sh": ["bash", "launch/multinode_gpu.sh"],
    "launch/slurm_gpu.sbatch": ["bash", "launch/slurm_gpu.sbatch"],
    "launch/local_multiprocess.py": [sys.executable, "launch/local_multiprocess.py"],
}
SUBSTITUTIONS = {
    "$P": "--config.pretrained_workdir=/tmp/bt_quickstart",  # docs/benchmarks.md's P=...
    "--node_rank=R": "--node_rank=0",
}
TFDS_PLACEHOLDERS = ("$TFDS_DIR", "$TFDS_DATA_DIR", "../shared/tfds", "/work/shared/tfds")
WORKDIR_PLACEHOLDER = "--workdir=W"


@dataclasses.dataclass(frozen=True)
class Command:
    where: str  # "docs/launching.md:42"
    text: str  # one line, continuations joined

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text, comments=True)


def collect() -> list[Command]:
    found = []
    for path in ["README.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT))]:
        found += _markdown_commands(path)
    for path in sorted(glob.glob("configs/*.py", root_dir=ROOT)):
        found += _docstring_commands(path)
    return found


def _markdown_commands(path: str) -> list[Command]:
    text = pathlib.Path(ROOT, path).read_text()
    commands, in_fence, block, block_start = [], False, [], 0
    lines = text.splitlines()
    for number, line in enumerate(lines + [""], 1):
        if line.startswith("```"):
            if in_fence:
                commands += _block_commands(path, block_start, block, every_line=True)
                block = []
            in_fence, block_start = not in_fence, number + 1
            continue
        if in_fence:
            block.append(line)
        elif line.startswith("    ") and (block or not lines[number - 2].strip()):
            block_start = block_start if block else number
            block.append(line[4:])
        else:
            if block:
                commands += _block_commands(path, block_start, block, every_line=False)
                block = []
            for span in re.findall(r"`([^`]+)`", line):
                if " " in span and _starts_like_a_command(span):
                    commands.append(Command(f"{path}:{number}", span.strip()))
    return commands


def _block_commands(path, first_line, block, *, every_line) -> list[Command]:
    text = "\n".join(block)
    if re.search(r"^\s*for .*;\s*do\b", text, flags=re.M):  # a loop is one command
        return [Command(f"{path}:{first_line}", " ".join(text.split()))]
    commands, pending = [], ""
    for offset, line in enumerate(block):
        pending += line
        if line.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        joined, pending = " ".join(pending.split()), ""
        if not joined or joined.startswith("#"):
            continue
        if every_line or _starts_like_a_command(joined):
            where = f"{path}:{first_line + offset}"
            commands += [Command(where, part) for part in _split_and(joined)]
    return commands


def _split_and(text: str) -> list[str]:
    """`a && b` -> ["a", "b"], leaving quoted `&&` alone."""
    parts, quote, start = [], None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif text.startswith(" && ", i):
            parts.append(text[start:i])
            start = i + 4
    return [p.strip() for p in [*parts, text[start:]] if p.strip()]


def _starts_like_a_command(text: str) -> bool:
    words = text.split()
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words = words[1:]
    if not words:
        return False
    first = words[0]
    launcher = first.startswith("launch/") and len(first) > len("launch/")
    return first in PROGRAMS or launcher or os.path.basename(first).startswith("python")


def _docstring_commands(path: str) -> list[Command]:
    source = pathlib.Path(ROOT, path).read_text()
    match = re.match(r'\s*r?"""(.*?)"""', source, flags=re.S)
    if not match:
        return []
    commands, pending, start, previous = [], "", 0, None
    for number, line in enumerate(match.group(1).splitlines(), 1):
        stripped = line.strip()
        if not pending and not (stripped.startswith(("python ", "... ")) and line[:2] == "  "):
            continue
        start = start if pending else number
        pending += stripped
        if stripped.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        text, pending = " ".join(pending.split()), ""
        if text.startswith("... ") and previous is not None:
            text = previous.text + text[3:]
        previous = Command(f"{path}:{start}", text)
        commands.append(previous)
    return commands


# ----------------------------------------------------------------------------- classifying


def env_and_argv(words: list[str]) -> tuple[dict, list[str]]:
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        key, _, value = words[0].partition("=")
        env[key], words = value, words[1:]
    return env, words


def kind(command: Command) -> str:
    """ "main", "launcher", "script" (another Python program) or a NOT_HERE key."""
    if re.search(r"<\w+>|\[--", command.text):
        return "template"
    _, argv = env_and_argv(command.words)
    first = argv[0]
    if first == "bash" and len(argv) > 1 and argv[1] in LAUNCHERS:
        return "launcher"
    if first == "sbatch":
        return "launcher"
    if first in LAUNCHERS or (_is_python(first) and len(argv) > 1 and argv[1] in LAUNCHERS):
        return "launcher"
    if first == "bt-jax" or (_is_python(first) and argv[1:3] == ["-m", "bt_jax.main"]):
        return "main" if len(argv) > (1 if first == "bt-jax" else 3) else "mention"
    if _is_python(first):
        key = f"{os.path.basename(first)} -m {argv[2]}" if argv[1] == "-m" else ""
        return key if key in NOT_HERE else "script"
    return first if first in NOT_HERE else "unknown"


def _is_python(word: str) -> bool:
    return re.fullmatch(r"python3?(\.\d+)?", os.path.basename(word)) is not None


def launcher_dry_run(command: Command, workdir: str) -> tuple[list[str], dict]:
    """The argv and environment that print what a launcher command would run."""
    env, argv = env_and_argv(substitute(command.words, workdir))
    if argv[0] == "sbatch":  # sbatch's own options come before the script
        argv = argv[[w.startswith("launch/") for w in argv].index(True) :]
    if _is_python(argv[0]) or argv[0] == "bash":
        argv = argv[1:]
    script, args = argv[0], argv[1:]
    args = [a for a in args if a not in ("--dry-run", "--dry_run")]
    if "--" in args:  # the launchers' own options end at "--"
        cut = args.index("--")
        args = [*args[:cut], "--dry-run", *args[cut:]]
    else:
        args = [*args, "--dry-run"]
    return [*LAUNCHERS[script], *args], env


def main_invocations(words: list[str]) -> list[list[str]]:
    """The arguments of every `python -m bt_jax.main` (or its `bt-jax` command) inside a
    command, at any depth: after env assignments, srun, exec or nohup, or inside gcloud's
    --command='...'."""
    found = []
    for i, word in enumerate(words):
        if word.startswith("--command="):
            found += main_invocations(shlex.split(word[len("--command=") :]))
        elif word == "bt-jax" or (
            _is_python(word) and words[i + 1 : i + 3] == ["-m", "bt_jax.main"]
        ):
            args = []
            for arg in words[i + (1 if word == "bt-jax" else 3) :]:
                if arg in (";", "&&", "||", "|", "&", "<", ">", ">>") or arg[:2] in ("2>",):
                    break
                args.append(arg)
            found.append(args)
    return found


def substitute(args: list[str], workdir: str) -> list[str]:
    tfds_dir = os.environ.get(TFDS_ENV, "")
    out = []
    for arg in args:
        if arg in SUBSTITUTIONS:
            out += shlex.split(SUBSTITUTIONS[arg])
            continue
        if arg == WORKDIR_PLACEHOLDER:
            arg = f"--workdir={workdir}"
        for placeholder in TFDS_PLACEHOLDERS:
            if tfds_dir and placeholder in arg:
                arg = arg.replace(placeholder, tfds_dir)
        out.append(arg)
    return out


def build_config(args: list[str]):
    """The config that `python -m bt_jax.main ARGS` builds (its --config and --config.*
    flags), parsed by ml_collections' flag parser in this process; run from ROOT."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["bt_jax.main"]
    for arg in args:
        if arg.startswith("--config="):  # main reads it relative to the repository root
            arg = f"--config={os.path.join(ROOT, arg[len('--config=') :])}"
        if arg.startswith("--config"):
            argv.append(arg)
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


# ------------------------------------------------------------------------------- the zygote


class Checker:
    """A client of the zygote: check(kind, argv) -> (exit code, stdout + stderr)."""

    def __init__(self, env: dict):
        import subprocess

        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def check(self, what: str, argv: list[str]) -> tuple[int, str]:
        self._proc.stdin.write(json.dumps({"kind": what, "argv": argv}) + "\n")
        self._proc.stdin.flush()
        reply = json.loads(self._proc.stdout.readline())
        return reply["rc"], reply["output"]

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait(timeout=60)


def _serve() -> None:
    import tempfile

    import jax  # noqa: F401  (imported once here, inherited by every child)
    import tensorflow  # noqa: F401

    import bt_jax.main  # noqa: F401
    from bt_jax import defaults, losses, models  # noqa: F401

    sys.path.insert(0, ROOT)
    for line in sys.stdin:
        request = json.loads(line)
        with tempfile.TemporaryFile("w+") as out:
            pid = os.fork()
            if pid == 0:
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                os._exit(_child(request["kind"], request["argv"]))
            _, status = os.waitpid(pid, 0)
            out.seek(0)
            reply = {"rc": os.waitstatus_to_exitcode(status), "output": out.read()}
        print(json.dumps(reply), flush=True)


def _child(what: str, argv: list[str]) -> int:
    import argparse
    import runpy

    try:
        if what == "main":
            from absl import app

            from bt_jax import main

            sys.argv = ["bt_jax.main", *argv, "--dry_run"]
            app.run(main.main, flags_parser=main.parse_flags)
            return 0
        parse_args = argparse.ArgumentParser.parse_args

        def parse_then_stop(self, *args, **kwargs):
            print(f"parsed: {parse_args(self, *args, **kwargs)}")
            raise SystemExit(0)

        argparse.ArgumentParser.parse_args = parse_then_stop
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
        print("the program ended without parsing its arguments with argparse")
        return 3
    except SystemExit as exit_:
        code = exit_.code
        if isinstance(code, str):
            print(code)
            return 1
        return code or 0
    except BaseException as err:  # report, never hang the zygote
        import traceback

        traceback.print_exception(err)
        return 4
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
