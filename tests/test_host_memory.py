"""bt_jax.main.reexec_with_huge_pages: huge pages for malloc on CPU-only runs, one re-exec.

The page-fault test measures the mechanism with the kernel's own counter (ru_minflt) on this
machine: a worker thread mallocs, touches and frees 300 MB five times, as XLA:CPU does with a
step's temporaries, in a process started with and without the tunable.
"""

import os
import subprocess
import sys

import pytest

from bt_jax import main as entry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAULTS = r"""
import ctypes, resource, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 300 * 2**20

def work():
    for _ in range(5):
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)

before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _env(**changes):
    env = {
        k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", entry.HUGE_PAGES_SWITCH)
    }
    env.update(changes)
    return env


def test_wanted_follows_switch_platform_and_an_existing_tunable(monkeypatch):
    monkeypatch.setattr(entry, "_glibc_supports_hugetlb", lambda: True)
    monkeypatch.setattr(entry, "_thp_mode", lambda: "madvise")
    assert entry.huge_pages_wanted({"JAX_PLATFORMS": "cpu"})
    assert not entry.huge_pages_wanted({"JAX_PLATFORMS": "cuda"})  # accelerator hosts: defaults
    assert not entry.huge_pages_wanted({"JAX_PLATFORMS": "cpu", "BT_JAX_HUGE_PAGES": "0"})
    assert entry.huge_pages_wanted({"JAX_PLATFORMS": "cuda", "BT_JAX_HUGE_PAGES": "1"})
    # already set (by the re-exec itself, or by the user): never again, so no exec loop
    assert not entry.huge_pages_wanted(
        {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": entry.HUGE_PAGES_TUNABLE}
    )
    assert not entry.huge_pages_wanted(
        {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    )
    monkeypatch.setattr(entry, "_thp_mode", lambda: "always")  # nothing to ask for
    assert not entry.huge_pages_wanted({"JAX_PLATFORMS": "cpu"})
    monkeypatch.setattr(entry, "_glibc_supports_hugetlb", lambda: False)  # musl, macOS
    assert not entry.huge_pages_wanted({"JAX_PLATFORMS": "cpu", "BT_JAX_HUGE_PAGES": "1"})


def test_an_existing_tunable_list_is_extended_not_replaced():
    env = entry.environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert entry.environment_with_huge_pages({})["GLIBC_TUNABLES"] == entry.HUGE_PAGES_TUNABLE


@pytest.mark.skipif(
    not entry.huge_pages_wanted(_env(JAX_PLATFORMS="cpu")),
    reason="needs Linux with glibc >= 2.35 and the kernel's THP mode 'madvise'",
)
def test_the_tunable_cuts_page_faults_of_freed_and_reallocated_memory():
    def faults(env):
        out = subprocess.run(
            [sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True
        )
        return int(out.stdout)

    default = faults(_env())
    huge = faults(entry.environment_with_huge_pages(_env()))
    # 5 x 300 MB in 4 KiB pages is 384,000 faults; in 2 MiB pages 750 (plus a few small ones)
    assert default > 5 * 300 * 256 * 0.9
    assert huge < default / 20


PROBE = (
    "import os, sys\n"
    "from bt_jax import main\n"
    "main.reexec_with_huge_pages()\n"
    "print(os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:], sep='|')\n"
)


@pytest.mark.parametrize("form", ["-m", "script", "-c"])
@pytest.mark.parametrize("switch", ["", "0"])
def test_the_reexec_sets_the_tunable_and_keeps_the_command(form, switch, tmp_path):
    (tmp_path / "probe_reexec.py").write_text(PROBE)
    program = {
        "-m": ["-m", "probe_reexec"],
        "script": [str(tmp_path / "probe_reexec.py")],
        "-c": ["-c", PROBE],
    }[form]
    env = _env(
        JAX_PLATFORMS="cpu", PYTHONPATH=f"{ROOT}:{tmp_path}", **{entry.HUGE_PAGES_SWITCH: switch}
    )
    out = subprocess.run(
        [sys.executable, *program, "--a=1", "b"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    tunables, argv = out.stdout.strip().split("|")
    expect = entry.HUGE_PAGES_TUNABLE if switch != "0" and entry.huge_pages_wanted(env) else ""
    assert tunables == expect
    assert argv == "['--a=1', 'b']"


def test_no_reexec_when_sys_argv_was_rewritten_for_an_in_process_run(monkeypatch):
    """A host that runs a program in-process (runpy, as tests/commands.py) rewrites sys.argv;
    re-executing sys.orig_argv would then start the host again, not the program."""
    monkeypatch.setattr(sys, "orig_argv", ["python", "bench/train_step.py", "--synthetic"])
    monkeypatch.setattr(sys, "argv", ["bench/train_step.py", "--synthetic"])
    assert entry.started_as_this_program()
    monkeypatch.setattr(sys, "orig_argv", ["python", "-u", "tests/commands.py"])
    assert not entry.started_as_this_program()
    monkeypatch.setattr(sys, "argv", ["bench/train_step.py"])  # no arguments to compare
    assert not entry.started_as_this_program()
    monkeypatch.setattr(entry, "huge_pages_wanted", lambda: True)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-executed the host process"))
    entry.reexec_with_huge_pages()  # returns: nothing to re-execute
