"""torch and torchvision, imported only where needed (`import cifarjax` stays light); a broken install is one line
with its fix, not torchvision's 30-line traceback (torchvision 0.N is built for torch 2.(N-15))."""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import re

from cifarjax.errors import UserError

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def load(module: str):
    """`import module` (torch, torchvision or one of their submodules), or one UserError with the fix."""
    try:
        return importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - a mismatched pair fails with RuntimeError, AttributeError, ...
        raise UserError(broken_install(module, error)) from None


def _version(package: str):
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(package)


def broken_install(module: str, error: Exception) -> str:
    """The one-line message for a torch/torchvision module that cannot be imported."""
    torch, vision = _version("torch"), _version("torchvision")
    cause = (str(error).strip().splitlines() or [""])[0][:150]
    m = re.match(r"2\.(\d+)\.", torch or "")
    wanted = f"0.{int(m[1]) + 15}" if m else None  # the torchvision series built for this torch
    fix = f"pip install 'torch=={torch.split('+')[0]}' 'torchvision=={wanted}.*'" if wanted else \
        "pip install torch torchvision"
    if torch is None or vision is None:
        what = f"{'torch' if torch is None else 'torchvision'} is not installed"
    elif wanted and not vision.startswith(wanted + "."):
        what = (f"torch {torch} and torchvision {vision} are not a matching pair (torch {torch} needs torchvision "
                f"{wanted})")
    else:
        what, fix = f"torch {torch} and torchvision {vision} are installed but broken", fix + " --force-reinstall"
    return (f"cannot import {module} ({type(error).__name__}: {cause}): {what}; fix: {fix} "
            f"(on a machine without a GPU, add --index-url {CPU_INDEX})")
