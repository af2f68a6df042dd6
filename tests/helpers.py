"""Builders of tiny datasets and reference models, and runners of the commands, for the tests."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]  # the project's root


def make_image_folder(root: Path, classes=("cat", "dog", "frog"), n_train=12, n_test=4, size=32, seed=0,
                      learnable=False) -> Path:
    """Write DIR/train/<class>/*.png (and DIR/test/... when n_test) with random images.

    With `learnable`, each class has its own mean colour so a model can learn it.
    """
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(classes):
            if not n:
                continue
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image = rng.integers(0, 256, (size, size, 3))
                if learnable:
                    image = np.clip(image // 4 + 64 * c, 0, 255)
                Image.fromarray(image.astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


def randomized_torchvision_resnet18(num_classes=1000, seed=0):
    """A torchvision resnet18 whose parameters and BatchNorm running statistics are all random."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=num_classes)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "num_batches_tracked" in name:
                continue
            if "running_var" in name:
                tensor.copy_(torch.rand_like(tensor) + 0.5)
            elif "running_mean" in name or name.endswith("bias"):
                tensor.copy_(torch.randn_like(tensor) * 0.1)
            elif "bn" in name or "downsample.1" in name:
                tensor.copy_(torch.rand_like(tensor) + 0.5)
            else:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn_like(tensor) * (2.0 / fan_in) ** 0.5)
    return model


def start_module(module, *args, env=None, cwd=None) -> subprocess.Popen:
    """`python -m module args` started in a fresh process (the project's root on the path), its output piped;
    `env`: variables added to this process's."""
    full_env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd or ROOT, env=full_env)


def run_module(module, *args, env=None, cwd=None) -> subprocess.CompletedProcess:
    """`start_module`'s process, run to its end."""
    child = start_module(module, *args, env=env, cwd=cwd)
    out, err = child.communicate()
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def cnn_args(data_dir, out, *extra) -> list:
    """experiments.cnn's arguments for one quick epoch on `data_dir` (XLA's convolution: the fastest to compile)."""
    return ["--data-dir", str(data_dir), "--epochs", "1", "--batch-size", "8", "--conv-impl", "xla", "--out", str(out),
            *extra]


def fails(main, args, capsys, code=2) -> str:
    """Run a command's main, expect exit `code`; return its stderr, which must be one `error:` line."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def n_params(tree) -> int:
    """The number of parameters in a pytree of arrays (or shapes from `jax.eval_shape`)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def tree_bytes(folder: Path) -> dict:
    """{relative path: bytes} of every file below `folder`, to show nothing was touched."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def skip_unless_measured_xla_cpu(what: str) -> None:
    """Skip the calling test, with its reason, where XLA's CPU compiler is not the one its expectation was measured
    on (jaxlib 0.10 on x86-64, cifarjax.cpu.process.MEASURED_JAXLIB): `what` it checks (fusion choices, buffer
    sizes from `memory_analysis()`) is that compiler's behaviour, not cifarjax's arithmetic."""
    import platform

    import jaxlib
    from cifarjax.cpu.process import MEASURED_JAXLIB
    here = []
    if not jaxlib.__version__.startswith(MEASURED_JAXLIB):
        here.append(f"jaxlib {jaxlib.__version__}")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        here.append(f"a {platform.machine()} CPU")
    if jax.default_backend() != "cpu":
        here.append(f"the {jax.default_backend()} backend")
    if here:
        pytest.skip(f"{what} is XLA's CPU compiler's behaviour as measured on jaxlib "
                    f"{'/'.join(v + 'x' for v in MEASURED_JAXLIB)} on x86-64; here: {', '.join(here)}")


def temporary_bytes(compiled, what: str) -> int:
    """XLA's temporary-buffer bytes of a compiled program; skips the test where the backend does not report them."""
    analysis = compiled.memory_analysis()
    if analysis is None or getattr(analysis, "temp_size_in_bytes", None) is None:
        pytest.skip(f"{what}: this backend reports no memory analysis")
    return analysis.temp_size_in_bytes
