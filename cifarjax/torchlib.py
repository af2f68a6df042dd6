"""torch and torchvision, imported only where they are needed (`import cifarjax` stays light), a broken install
reported in one line with its fix: a torch/torchvision pair that does not match (torchvision 0.N is built for
torch 2.(N-15)) otherwise ends in a 30-line traceback from torchvision's operator registration."""
from __future__ import annotations

import importlib
import importlib.metadata
import re
from typing import Optional

from cifarjax.errors import UserError

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def load(module: str):
    """`import module` (torch, torchvision or one of their submodules), or one UserError with the fix."""
    try:
        return importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - a mismatched pair fails with RuntimeError, AttributeError, ...
        raise UserError(broken_install(module, error)) from None


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def vision_for(torch_version: Optional[str]) -> Optional[str]:
    """The torchvision series ('0.29') built for a torch version ('2.14.1'), or None when it is not a 2.x."""
    m = re.match(r"2\.(\d+)\.", torch_version or "")
    return f"0.{int(m[1]) + 15}" if m else None


def broken_install(module: str, error: Exception) -> str:
    """The one-line message for a torch/torchvision module that cannot be imported."""
    torch, vision = _version("torch"), _version("torchvision")
    cause = (str(error).strip().splitlines() or [""])[0][:150]
    wanted = vision_for(torch)
    fix = f"pip install 'torch=={torch.split('+')[0]}' 'torchvision=={wanted}.*'" if wanted else \
        "pip install torch torchvision"
    if torch is None or vision is None:
        what = f"{'torch' if torch is None else 'torchvision'} is not installed"
    elif wanted and not vision.startswith(wanted + "."):
        what = f"torch {torch} and torchvision {vision} are not a matching pair (torch {torch} needs torchvision {wanted})"
    else:
        what, fix = f"torch {torch} and torchvision {vision} are installed but broken", fix + " --force-reinstall"
    return (f"cannot import {module} ({type(error).__name__}: {cause}): {what}; fix: {fix} "
            f"(on a machine without a GPU, add --index-url {CPU_INDEX})")
