"""Port torchvision ResNet-18 weights (a state_dict, or a .pth read with `weights_only=True`) to `ResNet18` variables,
every file hashed (the .npz cache's key), checked against its name and CRCs, every tensor float32 or refused."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cifarjax import torchlib
from cifarjax.errors import UserError, best_effort, warn
from cifarjax.models import ResNet18, build_model, init_variables
from cifarjax.runs import atomic_write, cache_dir as default_cache

IMAGENET_FILE = "resnet18-f37072fd.pth"
IMAGENET_URL = f"https://download.pytorch.org/models/{IMAGENET_FILE}"
# torchvision's published IMAGENET1K_V1 file's full SHA-256 (its name and download check keep 8 hex digits)
IMAGENET_SHA256 = "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec"
IMAGENET_DESCRIPTION = "ImageNet weights (torchvision IMAGENET1K_V1, verified)"
_TORCH_MODULES = {"head": "fc", "downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_TORCH_FIELDS = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_TORCH_AXES = {4: (2, 3, 1, 0), 2: (1, 0), 1: (0,)}  # flax axis i is torch axis _TORCH_AXES[ndim][i] (OIHW → HWIO)


def _torch_key(flax_key: tuple) -> str:
    """('params', 'backbone', 'layer2_block0', 'conv1', 'kernel') → 'layer2.0.conv1.weight'."""
    _, *module, leaf = flax_key
    names = [_TORCH_MODULES.get(part, part) for part in module if part != "backbone"]
    return re.sub(r"_block(\d)", r".\1", ".".join(names + [_TORCH_FIELDS[leaf]]))


def _expected_shapes(num_classes: int):
    shapes = jax.eval_shape(lambda: ResNet18(num_classes).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    return {path: s.shape for path, s in traverse_util.flatten_dict(shapes).items()}  # ('params' or 'batch_stats', ...)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _verified_digest(path: Path) -> str:
    """The SHA-256 of the weights file at `path`, checked against a `resnet18-<hash>.pth` name (torchvision's)."""
    if path.is_dir():
        raise UserError(f"weights file {path} is a folder; pass the path of the .pth file itself, for example "
                        f"{path / IMAGENET_FILE}")
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; pass the path of a torchvision ResNet-18 "
                        f"state_dict (.pth), for example {IMAGENET_FILE} from {IMAGENET_URL}")
    digest = sha256_file(path)
    m = re.fullmatch(r"resnet18-([0-9a-f]{8,})\.pth", path.name)
    if m and not digest.startswith(m.group(1)):
        raise UserError(f"weights file {path} is corrupt or renamed: its SHA-256 starts {digest[:8]}, its name "
                        f"promises {m.group(1)}; download it again from {IMAGENET_URL}")
    return digest


def _load_state_dict(path: Path) -> Mapping[str, np.ndarray]:
    """The state_dict in a verified file, its zip archive's CRCs checked first."""
    if zipfile.is_zipfile(path):  # torch.save's format (torch.load checks the legacy one)
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            raise UserError(f"weights file {path} is damaged ({type(error).__name__}: {error}); download or copy "
                            "it again") from None
        if bad is not None:
            raise UserError(f"weights file {path} is damaged: its member {bad} fails its CRC check; download or "
                            "copy it again")
    torch = torchlib.load("torch")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means "not a state dict file"
        # why, without torch's advice to retry with weights_only=False
        blocked, first = re.search(r"GLOBAL (\S+)", str(error)), (str(error).strip().splitlines() or [""])[0]
        why = (f"it holds pickled code ({blocked.group(1)}), which cifarjax never runs" if blocked else
               f"{type(error).__name__}: {first}" if "weights_only" not in first else type(error).__name__)
        raise UserError(f"{path} is not a PyTorch state_dict file ({why}); "
                        "pass a file saved with torch.save(model.state_dict(), path)") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(hasattr(v, "shape") for v in obj.values()):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state_dict of tensors; "
                        "pass a file saved with torch.save(model.state_dict(), path)")
    return obj


def _numpy(key: str, value) -> np.ndarray:
    """A float32 copy of a tensor or array; a sparse, quantized, non-float or non-finite one is refused."""
    if hasattr(value, "detach"):
        import torch
        if value.layout != torch.strided:
            raise UserError(f"tensor {key} is stored as {str(value.layout).replace('torch.', '')}, not as a dense "
                            "tensor; save the weights with dense tensors (tensor.to_dense())")
        if value.is_quantized:
            raise UserError(f"tensor {key} is quantized ({str(value.dtype).replace('torch.', '')}); pass the "
                            "float weights the quantized model was made from")
        if not value.is_floating_point():  # before converting: numpy cannot hold every torch type
            raise UserError(f"tensor {key} holds {str(value.dtype).replace('torch.', '')} values where weights "
                            "are floating point; these are not ResNet-18 weights")
        value = value.detach().cpu().to(torch.float32).numpy()  # numpy has no bfloat16: convert in torch
    array = np.asarray(value)
    if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
        raise UserError(f"tensor {key} holds {array.dtype} values where weights are floating point; these are not "
                        "ResNet-18 weights")
    result = np.array(array, dtype=np.float32, copy=True)  # never alias the caller's tensors
    bad = int(result.size - np.count_nonzero(np.isfinite(result)))
    if bad:
        raise UserError(f"tensor {key} holds {bad} non-finite value(s) (NaN or infinity, or too large for float32); "
                        "the weights are damaged: pass an intact file")
    return result


def convert_state_dict(state_dict: Mapping) -> dict:
    """Convert a torchvision resnet18 state_dict (any fc size) to {'params', 'batch_stats'} numpy trees."""
    fc = state_dict.get("fc.weight")
    expected = _expected_shapes(int(fc.shape[0]) if fc is not None else 1000)
    paths = {_torch_key(path): path for path in expected}
    flat, unexpected = {}, [k for k in state_dict if k not in paths and k.split(".")[-1] != "num_batches_tracked"]
    for key in (k for k in state_dict if k in paths):
        array, want = _numpy(key, state_dict[key]), expected[paths[key]]
        axes = _TORCH_AXES[len(want)]
        needs = tuple(want[i] for i in np.argsort(axes))
        if array.shape != needs:
            raise UserError(f"tensor {key} has shape {array.shape}, a ResNet-18 needs {needs}; these are not "
                            "ResNet-18 weights")
        flat[paths[key]] = np.transpose(array, axes)
    missing = sorted(_torch_key(p) for p in expected if p not in flat)
    if missing or unexpected:
        raise UserError("this state_dict is not a torchvision ResNet-18: "
                        f"{len(missing)} missing keys ({', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}), "
                        f"{len(unexpected)} unexpected keys ({', '.join(sorted(unexpected)[:8])}"
                        f"{' ...' if len(unexpected) > 8 else ''}); pass resnet18 weights such as {IMAGENET_FILE}")
    return traverse_util.unflatten_dict(flat)  # {'params', 'batch_stats'}


def with_new_head(variables: dict, num_classes: int, seed: int = 0, keep_same_size: bool = True) -> dict:
    """Ported variables with a fresh seeded `num_classes` head, one of that size kept if `keep_same_size`. The head is
    initialised alone: flax keys each module's initialiser by its name, so it holds the whole model's values."""
    if keep_same_size and variables["params"]["head"]["bias"].shape[0] == num_classes:
        return variables
    model = ResNet18(num_classes)
    init_head = jax.jit(partial(model.init, method="classify"))
    head = init_head(jax.random.PRNGKey(seed), jnp.zeros((1, 8 * model.num_filters)))["params"]["head"]
    return {**variables, "params": {**variables["params"], "head": jax.device_get(head)}}


def resnet18_from_torchvision(state_dict_or_path, num_classes: int = 1000, seed: int = 0) -> dict:
    """`ResNet18(num_classes)` variables from a torchvision resnet18 state_dict or `.pth` (a new head if resized)."""
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        _verified_digest(Path(state_dict_or_path))
        state_dict_or_path = _load_state_dict(Path(state_dict_or_path))
    return with_new_head(convert_state_dict(state_dict_or_path), num_classes, seed)


@dataclass(frozen=True)
class Weights:
    """Where a run's starting weights came from: 'random', or a file and its SHA-256."""
    source: str
    sha256: Optional[str] = None

    @property
    def imagenet(self) -> bool:
        """torchvision's published ImageNet weights, byte for byte."""
        return self.sha256 == IMAGENET_SHA256

    @property
    def pretrained(self) -> bool:
        return self.source != "random"

    @property
    def description(self) -> str:
        """The one wording every output uses for a run's weights (ImageNet's recognised by their SHA-256 only)."""
        if not self.pretrained or self.sha256 is None:
            return "random initialisation, no pretraining"
        return IMAGENET_DESCRIPTION if self.imagenet else \
            f"weights from {self.source} (sha256 {self.sha256:.12}…), not torchvision's published ImageNet weights"


def weights_file(weights: str) -> Optional[Path]:
    """The file behind --weights: None for 'random'; 'imagenet' torchvision's in torch's cache (hash-checked)."""
    if weights != "imagenet":
        return None if weights == "random" else Path(weights)
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "torch")
    path = Path(home).expanduser() / "hub" / "checkpoints" / IMAGENET_FILE
    if path.is_file():
        return path
    ResNet18_Weights = torchlib.load("torchvision.models").ResNet18_Weights
    try:
        ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True)
    except Exception as error:  # noqa: BLE001 - network or hash failure
        raise UserError(f"could not fetch torchvision's ImageNet ResNet-18 weights ({type(error).__name__}); "
                        f"download {IMAGENET_FILE} from {IMAGENET_URL} on a machine with network access "
                        "and pass it with --weights PATH") from None
    return Path(torchlib.load("torch").hub.get_dir()) / "checkpoints" / IMAGENET_FILE  # where torch wrote it


def load_weights(path: Union[str, Path], cache_dir: Optional[Path] = None) -> tuple:
    """(variables, SHA-256) of a resnet18 .pth, hashed on every call before its .npz cache (rebuilt if damaged)."""
    path = Path(path)
    digest = _verified_digest(path)
    cached = (cache_dir or default_cache()) / "weights" / f"resnet18-{digest[:16]}.npz"
    if cached.is_file():
        with contextlib.suppress(Exception), np.load(cached) as data:  # a damaged cache file is rebuilt
            variables = traverse_util.unflatten_dict(dict(data), sep="/")
            expected = _expected_shapes(variables["params"]["head"]["bias"].shape[0])
            if {k: v.shape for k, v in traverse_util.flatten_dict(variables).items()} == expected:
                return variables, digest
        warn(f"cached converted weights {cached} are damaged; converting the weights again")
    variables = convert_state_dict(_load_state_dict(path))

    def save():
        with atomic_write(cached, "wb") as f:
            np.savez(f, **traverse_util.flatten_dict(variables, sep="/"))
    best_effort(save, f"writing converted weights to {cached}")
    return variables, digest


def imagenet_resnet18(num_classes: int = 10, weights: Optional[Union[str, Path]] = None, seed: int = 0,
                      cache_dir: Optional[Path] = None) -> dict:
    """ImageNet ResNet-18 variables, a fresh seeded head, from `weights` (a .pth) or torchvision's IMAGENET1K_V1."""
    variables, _ = load_weights(weights if weights is not None else weights_file("imagenet"), cache_dir)
    return with_new_head(variables, num_classes, seed)


def starting_weights(config) -> tuple:
    """(variables, `Weights`) of a run's starting weights from config.weights: 'imagenet', 'random' or a path."""
    if config.weights == "random":
        return init_variables(build_model(config), config), Weights("random")
    path = weights_file(config.weights)
    variables, digest = load_weights(path)
    source = str(path) if config.weights != "imagenet" else f"torchvision's {IMAGENET_FILE}"
    return with_new_head(variables, config.num_classes, config.seed, keep_same_size=False), Weights(source, digest)
