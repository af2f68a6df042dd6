"""Transparent huge pages for a command's buffers (Linux, glibc 2.35+; 40-125x fewer page faults on XLA's buffers),
by relaunching it with glibc's tunable, read only at a process's start. `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` opts
out."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import re
import sys
from pathlib import Path
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
FIRST_GLIBC = (2, 35)  # the first glibc with the tunable


def kernel_mode(setting: Path = THP_SETTING) -> Optional[str]:
    """The kernel's transparent-huge-page mode ("always", "madvise" or "never"), None where there is none."""
    try:
        text = setting.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text and "]" in text else None


def _glibc_has_tunable(libc: str) -> bool:
    """Whether `libc` ("glibc 2.36") reads the tunable."""
    name, _, version = libc.partition(" ")
    return name == "glibc" and tuple(int(p) for p in re.findall(r"\d+", version)[:2]) >= FIRST_GLIBC


def relaunch_environ(environ: Mapping[str, str], mode: Optional[str], libc: Optional[str] = None) -> Optional[dict]:
    """`environ` plus the tunable, or None where relaunching changes nothing (the kernel's mode is not "madvise",
    no glibc with the tunable, or GLIBC_TUNABLES already sets it)."""
    current = environ.get("GLIBC_TUNABLES", "")
    if mode != "madvise" or f"{TUNABLE}=" in current or not _glibc_has_tunable(libc or " ".join(platform.libc_ver())):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [current, f"{TUNABLE}=1"]))}


def in_effect(environ: Mapping[str, str] = os.environ, mode: Optional[str] = None) -> bool:
    """Whether a process started with `environ` gets huge pages for its large buffers."""
    mode = kernel_mode() if mode is None else mode
    return mode == "always" or (mode == "madvise" and f"{TUNABLE}=1" in environ.get("GLIBC_TUNABLES", "").split(":"))


def _runs_the_main_script(argv: list) -> bool:
    """Whether executing `argv` again runs the script that is `__main__` now, not something that runs it in turn
    (pytest, runpy, a notebook's kernel)."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main is None or len(argv) < 2:
        return False
    first = next((i for i, a in enumerate(argv[1:], 1) if not a.startswith("-") or a == "-m"), None)
    if first is None or argv[first] == "-m" and first + 1 >= len(argv):
        return False
    if argv[first] == "-m":
        spec = importlib.util.find_spec(argv[first + 1])
        started = spec.origin if spec is not None else None
    else:
        started = argv[first]
    return started is not None and os.path.realpath(started) == os.path.realpath(main)


def relaunch_command(package: Optional[str]) -> None:
    """Exec this process again with huge pages where it was started as `python -m <package>.NAME` (`package` None:
    any script or module) and that changes something; otherwise (or if the exec fails) return."""
    argv = sys.orig_argv
    if package is None:
        launched = _runs_the_main_script(argv)
    else:
        launched = any(a == "-m" and b.startswith(f"{package}.") for a, b in zip(argv, argv[1:]))
    environ = relaunch_environ(os.environ, kernel_mode()) if launched else None
    if environ is not None:
        with contextlib.suppress(OSError):  # run as started
            os.execve(sys.executable, argv, environ)
