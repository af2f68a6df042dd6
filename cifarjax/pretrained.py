"""Port torchvision ResNet-18 weights (a state_dict or a .pth file) to `ResNet18` Flax variables.

Conv kernels OIHW → HWIO, fc weight transposed, BatchNorm weight/bias/running_mean/running_var →
scale/bias/mean/var. Files are read with `torch.load(weights_only=True)`: no pickled code runs.
ImageNet weights come from torchvision's weights API (downloaded and hash-checked into torch's cache)
or from a local file; the converted variables are cached as .npz so later runs need no torch at all (a
damaged or unwritable cache is rebuilt or skipped, never a blocker). Ported weights are merged into a fresh
initialisation, so a new head of any size keeps its own seeded initialisation (`merge`).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cifarjax import torchlib
from cifarjax.errors import UserError, warn
from cifarjax.files import atomic_write, best_effort
from cifarjax.files import cache_dir as default_cache
from cifarjax.models import ResNet18, build_model, init_variables, initialize

IMAGENET_FILE = "resnet18-f37072fd.pth"
IMAGENET_URL = f"https://download.pytorch.org/models/{IMAGENET_FILE}"
_BN_FIELDS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def _flax_path(torch_key: str):
    """Map a torchvision key to (collection, flax path tuple, kind), or None if it has no Flax counterpart."""
    parts = torch_key.split(".")
    if parts[-1] == "num_batches_tracked":
        return None
    if parts[0] == "fc":
        return "params", ("head", {"weight": "kernel", "bias": "bias"}[parts[1]]), "fc"
    if parts[0] in ("conv1", "bn1"):
        module, field = ("backbone", parts[0]), parts[1]
    elif re.fullmatch(r"layer[1-4]", parts[0]):
        block = f"{parts[0]}_block{parts[1]}"
        if parts[2] == "downsample":
            module, field = ("backbone", block, {"0": "downsample_conv", "1": "downsample_bn"}[parts[3]]), parts[4]
        else:
            module, field = ("backbone", block, parts[2]), parts[3]
    else:
        raise KeyError(torch_key)
    if "conv" in module[-1]:
        return "params", module + ("kernel",), "conv"
    collection, name = _BN_FIELDS[field]
    return collection, module + (name,), "bn"


def _torch_key(flax_key: tuple) -> str:
    """Inverse of `_flax_path`: ('params', 'backbone', 'layer2_block0', 'conv1', 'kernel') → 'layer2.0.conv1.weight'."""
    _, *module, leaf = flax_key
    if module == ["head"]:
        return {"kernel": "fc.weight", "bias": "fc.bias"}[leaf]
    names = []
    for part in module[1:]:
        m = re.fullmatch(r"(layer[1-4])_block(\d)", part)
        names += [m.group(1), m.group(2)] if m else [{"downsample_conv": "downsample.0",
                                                      "downsample_bn": "downsample.1"}.get(part, part)]
    field = {v[1]: k for k, v in _BN_FIELDS.items()}.get(leaf, "weight") if leaf != "kernel" else "weight"
    return ".".join(names + [field])


def _to_flax(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return np.transpose(array, (2, 3, 1, 0))
    if kind == "fc" and array.ndim == 2:
        return array.T
    return array


def _expected_shapes(num_classes: int):
    shapes = jax.eval_shape(lambda: ResNet18(num_classes).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    return {(col,) + path: s.shape for col in ("params", "batch_stats")
            for path, s in traverse_util.flatten_dict(shapes[col]).items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_state_dict(path: Union[str, Path]) -> Mapping[str, np.ndarray]:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"weights file {path} is a folder; pass the path of the .pth file itself, for example "
                        f"{path / IMAGENET_FILE}")
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; pass the path of a torchvision ResNet-18 "
                        f"state_dict (.pth), for example {IMAGENET_FILE} from {IMAGENET_URL}")
    m = re.fullmatch(r"resnet18-([0-9a-f]{8,})\.pth", path.name)
    if m:
        digest = _sha256(path)
        if not digest.startswith(m.group(1)):
            raise UserError(f"weights file {path} is corrupt: its SHA-256 starts {digest[:8]}, its name promises "
                            f"{m.group(1)}; download it again from {IMAGENET_URL}")
    torch = torchlib.load("torch")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means "not a state dict file"
        raise UserError(f"{path} is not a PyTorch state_dict file ({_load_failure(error)}); "
                        "pass a file saved with torch.save(model.state_dict(), path)") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(hasattr(v, "shape") for v in obj.values()):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state_dict of tensors; "
                        "pass a file saved with torch.save(model.state_dict(), path)")
    return obj


def _load_failure(error: Exception) -> str:
    """Why torch.load refused a file, without torch's advice to retry with weights_only=False."""
    blocked = re.search(r"GLOBAL (\S+)", str(error))
    if blocked:
        return f"it holds pickled code ({blocked.group(1)}), which cifarjax never runs"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}" if "weights_only" not in first else type(error).__name__


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.array(value, dtype=np.float32, copy=True)  # never alias the caller's tensors


def convert_state_dict(state_dict: Mapping) -> dict:
    """Convert a torchvision resnet18 state_dict (any fc size) to {'params', 'batch_stats'} numpy trees."""
    fc = state_dict.get("fc.weight")
    num_classes = int(fc.shape[0]) if fc is not None else 1000
    expected = _expected_shapes(num_classes)
    flat, unexpected = {}, []
    for key, value in state_dict.items():
        try:
            target = _flax_path(key)
        except (KeyError, IndexError):
            unexpected.append(key)
            continue
        if target is None:
            continue
        collection, path, kind = target
        if (collection,) + path not in expected:
            unexpected.append(key)
            continue
        array = _to_flax(_numpy(value), kind)
        want = expected[(collection,) + path]
        if array.shape != tuple(want):
            raise UserError(f"tensor {key} has shape {tuple(value.shape)}, a ResNet-18 needs "
                            f"{tuple(_from_flax_shape(want, kind))}; these are not ResNet-18 weights")
        flat[(collection,) + path] = array
    missing = sorted(_torch_key(p) for p in expected if p not in flat)
    if missing or unexpected:
        raise UserError("this state_dict is not a torchvision ResNet-18: "
                        f"{len(missing)} missing keys ({', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}), "
                        f"{len(unexpected)} unexpected keys ({', '.join(sorted(unexpected)[:8])}"
                        f"{' ...' if len(unexpected) > 8 else ''}); pass resnet18 weights such as {IMAGENET_FILE}")
    nested = traverse_util.unflatten_dict(flat)
    return {"params": nested["params"], "batch_stats": nested["batch_stats"]}


def _from_flax_shape(shape, kind):
    if kind == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape)) if kind == "fc" else shape


def merge(fresh: dict, loaded: dict, dont_load=()) -> dict:
    """`loaded` variables merged into a `fresh` initialisation: every leaf whose '/'-joined path (collection
    first) fully matches a pattern of `dont_load` keeps its fresh value (big_vision's `load(..., dont_load=...)`).

    Both trees must have the same structure apart from those leaves; a shape mismatch names the leaf.
    """
    fresh_flat, loaded_flat = traverse_util.flatten_dict(fresh), traverse_util.flatten_dict(loaded)
    merged = {}
    for key, value in fresh_flat.items():
        name = "/".join(key)
        if any(re.fullmatch(p, name) for p in dont_load) or key not in loaded_flat:
            merged[key] = value
        elif np.shape(loaded_flat[key]) != np.shape(value):
            raise UserError(f"weights for {name} have shape {np.shape(loaded_flat[key])}, the model needs "
                            f"{np.shape(value)}")
        else:
            merged[key] = loaded_flat[key]
    return traverse_util.unflatten_dict(merged)


def with_new_head(variables: dict, num_classes: int, seed: int = 0) -> dict:
    """Ported ResNet-18 variables with their head replaced by a fresh, seeded `num_classes` head (the same
    initialisation `--weights random` gives, PyTorch's Linear init)."""
    if variables["params"]["head"]["bias"].shape[0] == num_classes:
        return variables
    return merge(initialize(ResNet18(num_classes), seed), variables, dont_load=(r"params/head/.*",))


def resnet18_from_torchvision(state_dict_or_path, num_classes: int = 1000, seed: int = 0) -> dict:
    """Variables for `ResNet18(num_classes)` from a torchvision resnet18 state_dict or `.pth` path.

    With num_classes == 1000 the ImageNet head is kept; otherwise a new seeded head replaces it.
    """
    state_dict = state_dict_or_path
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state_dict = _load_state_dict(state_dict_or_path)
    return with_new_head(convert_state_dict(state_dict), num_classes, seed)


def save_variables_npz(variables: dict, path: Path) -> None:
    """Write variables to a flat .npz (keys joined with '/'), atomically."""
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(variables).items()}
    with atomic_write(path, "wb") as f:
        np.savez(f, **flat)


def load_variables_npz(path: Path) -> dict:
    with np.load(path) as data:
        return traverse_util.unflatten_dict({tuple(k.split("/")): data[k] for k in data.files})


def _cached_conversion(cached: Path, load_state_dict) -> dict:
    """Converted variables from the .npz cache, or converted now (needs torch) and cached.

    A cache file that cannot be read or does not hold a whole ResNet-18 is converted again and rewritten.
    """
    if cached.is_file():
        try:
            variables = load_variables_npz(cached)
            expected = _expected_shapes(variables["params"]["head"]["bias"].shape[0])
            flat = {k: v.shape for k, v in traverse_util.flatten_dict(variables).items()}
            if flat == expected:
                return variables
        except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt
            pass
        warn(f"cached converted weights {cached} are damaged; converting the weights again")
    variables = convert_state_dict(load_state_dict())
    best_effort(lambda: save_variables_npz(variables, cached), f"writing converted weights to {cached}")
    return variables


def _fetch_imagenet_state_dict():
    ResNet18_Weights = torchlib.load("torchvision.models").ResNet18_Weights
    try:
        return ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True)
    except Exception as error:  # noqa: BLE001 - network or hash failure
        raise UserError(f"could not fetch torchvision's ImageNet ResNet-18 weights ({type(error).__name__}); "
                        f"download {IMAGENET_FILE} from {IMAGENET_URL} on a machine with network access "
                        "and pass it with --weights PATH") from None


def imagenet_resnet18(num_classes: int = 10, weights: Optional[Union[str, Path]] = None, seed: int = 0,
                      cache_dir: Optional[Path] = None) -> dict:
    """ImageNet ResNet-18 variables with a fresh seeded `num_classes` head.

    `weights`: a local torchvision `.pth`; otherwise torchvision's `ResNet18_Weights.IMAGENET1K_V1`
    (downloaded with a hash check into torch's cache). Either way the converted variables are cached
    (a local file keyed by its SHA-256), so later runs need no torch.
    """
    cache = (cache_dir or default_cache()) / "weights"
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            _load_state_dict(path)  # raises the missing-file message
        digest = _sha256(path)
        variables = _cached_conversion(cache / f"resnet18-{digest[:16]}.npz", lambda: _load_state_dict(path))
    else:
        variables = _cached_conversion(cache / "resnet18_imagenet1k_v1.npz", _fetch_imagenet_state_dict)
    return with_new_head(variables, num_classes, seed)


def starting_weights(config) -> tuple:
    """(variables, label) of a run's starting weights from config.weights: 'imagenet', 'random' or a .pth path."""
    if config.weights == "random":
        return init_variables(build_model(config), config), "random initialisation (no pretraining)"
    if config.weights == "imagenet":
        return imagenet_resnet18(config.num_classes, seed=config.seed), "ImageNet (torchvision IMAGENET1K_V1)"
    return (imagenet_resnet18(config.num_classes, weights=config.weights, seed=config.seed),
            f"torchvision file {config.weights}")
