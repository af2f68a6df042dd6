"""The experiment commands: `python -m experiments.NAME`. Imported, they change nothing in the process. Started as a
command, one applies its process-wide settings first (`experiments.common.launch`), and on the CPU the process starts
again with huge pages here, before JAX loads (`cifarjax.cpu.process.relaunch_command`).

One exception, which only mends an import: where a `cifarjax/` folder in the working directory (the clone itself,
seen from its parent) would be taken for the package as a namespace package, ahead of an editable install's import
hook, the package beside this one is put first on sys.path (installs made since pyproject.toml's `package-dir`
need no mending)."""
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path

_found = None if "cifarjax" in _sys.modules else _util.find_spec("cifarjax")
if _found is not None and _found.origin is None:  # a namespace package: a folder without __init__.py
    _sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))
if _sys.argv[:1] == ["-m"]:  # Python locating a `python -m` module: perhaps experiments.NAME, `_relaunch` checks
    from cifarjax.cpu.process import relaunch_command as _relaunch
    from cifarjax.target import runs_on_cpu as _runs_on_cpu
    if _runs_on_cpu():
        _relaunch(__name__)
