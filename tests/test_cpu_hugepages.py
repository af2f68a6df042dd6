"""When a command relaunches itself with huge pages, and with what environment."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cifarjax.cpu import process as hugepages

GLIBC = "glibc 2.36"
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"), ("[always] madvise never\n", "always"),
                                        ("always madvise [never]\n", "never"), ("", None)])
def test_kernel_mode_is_the_bracketed_one(tmp_path, text, mode):
    setting = tmp_path / "enabled"
    setting.write_text(text)
    assert hugepages.kernel_mode(setting) == mode
    assert hugepages.kernel_mode(tmp_path / "missing") is None


def test_relaunch_adds_the_tunable_to_the_users_own():
    env = hugepages.relaunch_environ({"A": "1"}, "madvise", GLIBC)
    assert env == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = hugepages.relaunch_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hugepages.in_effect(env, "madvise")


@pytest.mark.parametrize("environ, mode, libc", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC),  # the user's choice
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "madvise", GLIBC),  # already relaunched: no loop
    ({}, "always", GLIBC), ({}, "never", GLIBC), ({}, None, GLIBC),  # the kernel decides for every mapping
    ({}, "madvise", "glibc 2.34"), ({}, "madvise", "musl"),  # no such tunable
])
def test_no_relaunch_where_it_changes_nothing(environ, mode, libc):
    assert hugepages.relaunch_environ(environ, mode, libc) is None


def probe_package(folder: Path) -> Path:
    """A package whose import relaunches as `experiments` does, and a module that reports its process."""
    (folder / "probe").mkdir()
    (folder / "probe" / "__init__.py").write_text(
        "print('started', flush=True)\nfrom cifarjax.cpu.process import relaunch_command\nrelaunch_command(__name__)\n")
    (folder / "probe" / "show.py").write_text(
        "import os, sys\nfrom cifarjax.cpu import process\nprint(os.getpid(), sys.argv[1:], process.in_effect())\n")
    return folder


@pytest.mark.parametrize("tunables", ["", "glibc.malloc.hugetlb=0"])
def test_a_command_relaunches_as_the_same_process_with_its_arguments(tmp_path, tunables):
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLIBC_TUNABLES=tunables)
    relaunched = hugepages.relaunch_environ(env, hugepages.kernel_mode())
    child = subprocess.Popen([sys.executable, "-m", "probe.show", "a b", "c"], cwd=probe_package(tmp_path), env=env,
                             stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0
    assert out.splitlines() == ["started"] * (2 if relaunched else 1) + [
        f"{child.pid} ['a b', 'c'] {hugepages.in_effect(relaunched or env)}"]
    if tunables:  # the user's choice stands
        assert relaunched is None and "False" in out


def test_only_a_command_of_the_package_relaunches(tmp_path):
    """Imported elsewhere (a test, a notebook), the package runs on as it was started."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLIBC_TUNABLES="")
    program = "import probe, os; print(os.environ['GLIBC_TUNABLES'] == '')"
    out = subprocess.run([sys.executable, "-c", program], cwd=probe_package(tmp_path), env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.splitlines() == ["started", "True"]


def test_a_command_relaunches_before_jax_loads():
    """`python -m experiments.NAME` relaunches from `experiments/__init__.py`, before the command's imports: JAX loads
    once, in the relaunched process (the relaunch after them cost every command 1.7 s)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLIBC_TUNABLES="")
    if hugepages.relaunch_environ(env, hugepages.kernel_mode()) is None:
        pytest.skip("no relaunch here: the kernel does not grant huge pages on request, or glibc has no tunable")
    err = subprocess.run([sys.executable, "-X", "importtime", "-m", "experiments.cnn", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if line.startswith("import time:")]
    assert imported.count("cifarjax.cpu.process") == 2 and imported.count("jax") == 1
