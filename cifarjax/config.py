"""Experiment configuration as code: `Config`, every knob once, each field's metadata (`option`) its help, allowed
values, flag and resume rule, read by `cifarjax.flags`, validation and resume; named presets: `cifarjax.recipes`."""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

from cifarjax.errors import UserError

TRAINING, FINETUNE = ("cnn", "finetune", "study"), ("finetune", "study")
SOURCES = ("auto", "cifar10", "folder", "fake")


def option(default, help: str, *, commands=TRAINING, flag: Optional[str] = None, choices=None, minimum=None,
           maximum=None, positive: bool = False, resumable: bool = False):
    """A Config field; `commands`: those offering it as a flag (none: the code sets it); `flag`: its other name."""
    meta = dict(help=help, commands=tuple(commands), flag=flag, choices=choices, minimum=minimum,
                maximum=maximum, positive=positive, resumable=resumable)
    return field(default=default, metadata=meta)


internal = functools.partial(option, commands=())  # a field the code sets (from the data or a resolved setting)


@dataclass(frozen=True)
class Config:
    """Every setting of a run, each with its help, range and flag; `recipe_config` gives a named preset."""
    # The original project's settings.
    seed: int = option(0, "seed of the split, initialisation, data order, augmentation and dropout", minimum=0,
                       maximum=2**32 - 1)
    batch_size: int = option(64, "global batch size, split evenly over all devices", minimum=1, maximum=2**20)
    n_epochs: int = option(20, "training epochs", flag="epochs", minimum=1, maximum=100_000, resumable=True)
    lr: float = option(1e-3, "(peak) learning rate", positive=True, maximum=1e30, resumable=True)
    eval_every: int = option(2000, "also evaluate every N steps (0: only at epoch ends)", minimum=0,
                             maximum=10**9, resumable=True)
    img_size: int = option(32, "size the network sees; images are resized on the device", minimum=8, maximum=1024)
    # Model and what trains.
    model: str = internal("simple_cnn", "network (set by the command)", choices=("simple_cnn", "resnet18"))
    num_classes: int = internal(0, "number of classes (0: from `classes`, else 10; a run sets it from its data)")
    classes: tuple = option((), "train, validate and test on these classes only, labels renumbered in the order "
                            "given (comma-separated names, e.g. cat,dog); default: every class of the data",
                            flag="classes")
    weights: str = option("random", "starting weights: 'imagenet' (torchvision's, downloaded or cached), a "
                          "torchvision resnet18 .pth file, or 'random' (no pretraining)", commands=FINETUNE)
    unfreeze: str = option("all", "what trains: the head (the original), head + layer4, or all", commands=FINETUNE,
                           choices=("head", "layer4", "all"))
    bn: str = option("frozen", "frozen layers' BatchNorm: 'frozen' (inference mode) or 'train' (batch statistics "
                     "and running-statistics updates, PyTorch's behaviour in the original)", commands=FINETUNE,
                     choices=("frozen", "train"))
    cache_features: bool = option(True, "train the head on cached backbone features when only the head trains "
                                  "and BatchNorm is frozen", commands=FINETUNE, flag="feature-cache")
    conv_impl: str = option("auto", "convolution formulation (auto: on a CPU 'winograd', the CPU's fused blocks, "
                            "Winograd, im2col or XLA's per shape; on a GPU 'xla', XLA/cuDNN)",
                            choices=("auto", "winograd", "im2col", "xla"))
    precision: str = option("fp32", "arithmetic of convolutions and matrix products: fp32 (the original's; TF32 on "
                            "Ampere/Hopper GPUs) or bf16 (bfloat16 operands and activations; parameters, optimizer "
                            "state, BatchNorm statistics, softmax and loss stay float32)", choices=("fp32", "bf16"))
    steps_per_call: int = option(0, "at most N training steps per dispatch, as one rolled lax.scan: the largest N "
                                 "dividing the epoch, the evaluation and checkpoint intervals and the resumed step "
                                 "(0: auto: up to 8 on a GPU or TPU for images up to 64 pixels, 64 for a head on "
                                 "cached features, else 1); equal to one step a call within float32 rounding",
                                 minimum=0, resumable=True)
    deterministic: bool = option(False, "on a GPU, XLA's deterministic kernels (--xla_gpu_deterministic_ops; maybe "
                                 "slower), for repeatable bits and bit-identical resumes (a CPU's already are)",
                                 resumable=True)
    dropout: float = option(0.3, "SimpleCNN's training-time dropout rate (0.3 in the original)", commands=("cnn",),
                            minimum=0.0, maximum=0.9)
    # Optimisation.
    optimizer: str = option("adam", "optimizer", choices=("adam", "adamw", "sgd"))
    momentum: float = option(0.9, "SGD momentum (Nesterov); Adam's b1 is fixed at 0.9", minimum=0.0, maximum=0.999)
    weight_decay: float = option(0.0, "decoupled weight decay (adamw), or L2 added to the gradient (sgd)",
                                 minimum=0.0, maximum=10.0)
    schedule: str = option("constant", "learning-rate schedule over the whole run",
                           choices=("constant", "cosine", "onecycle"))
    warmup_epochs: float = option(0.0, "linear warm-up from 0 over this many epochs (cosine); one-cycle's rise; "
                                  "shorter than the run (a recipe's warm-up scales with --epochs)", minimum=0.0,
                                  maximum=100_000)
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy target", minimum=0.0, maximum=0.5)
    ema_decay: float = option(0.0, "keep an exponential moving average of the weights that train (and of the "
                              "BatchNorm statistics that train) with this decay and evaluate it (0: off)",
                              minimum=0.0, maximum=0.99999)
    # Data and augmentation.
    dataset: str = option("auto", "data source: auto (--data-dir's contents, or CIFAR-10 downloaded), cifar10, "
                          "folder or fake", choices=SOURCES)
    data_dir: Optional[str] = option(None, "a folder holding cifar-10-batches-py or DIR/train/<class>/*.jpg "
                                     "(+ optional DIR/test/...)", resumable=True)
    decode_size: int = option(32, "images are decoded and stored at this size", minimum=8, maximum=1024)
    val_fraction: float = option(0.2, "fraction of the training images held out for validation", positive=True,
                                 maximum=0.9)
    subset: int = option(0, "use a seeded, class-balanced subset of N training and N/4 validation images "
                         "(0: all)", minimum=0, maximum=10**9)
    flip: bool = option(True, "random horizontal flips")
    crop_padding: int = option(0, "pad-and-random-crop by N pixels (0: off, as in the original; at most half the "
                               "image)", minimum=0, maximum=512)
    cutout: int = option(0, "zero a random N x N square of each training image (0: off)", minimum=0, maximum=1024)
    normalize: str = option("none", "per-channel normalisation after scaling to [0, 1]",
                            choices=("none", "imagenet", "dataset"))
    norm_mean: Optional[tuple] = internal(None, "resolved from `normalize` when training starts")
    norm_std: Optional[tuple] = internal(None, "resolved from `normalize` when training starts")
    augment_backend: str = option("device", "where augmentation runs: jitted on the device, or albumentations "
                                  "per image on the host", flag="augment",
                                  choices=("device", "albumentations"))
    tta_flip: bool = option(False, "evaluate on the mean of each image's and its mirror image's logits")
    eval_batch_size: int = option(500, "evaluation batch size", minimum=1, maximum=2**20, resumable=True)
    # Checkpoints.
    checkpoint_every: int = option(0, "also checkpoint every N steps (0: only at epoch ends)", minimum=0,
                                   maximum=10**9, resumable=True)
    checkpoint_seconds: float = option(30.0, "checkpoint at an epoch end once this many seconds passed since the "
                                       "last checkpoint (0: at every epoch end); the last epoch and Ctrl-C always "
                                       "checkpoint", minimum=0, maximum=10**7, resumable=True)
    keep_checkpoints: int = option(3, "checkpoints kept", minimum=1, maximum=10_000, resumable=True)
    recipe: str = internal("original", "the named preset the values started from (cifarjax.recipes)")

    def __post_init__(self):
        if isinstance(self.classes, list):  # read back from JSON
            object.__setattr__(self, "classes", tuple(self.classes))
        if self.num_classes == 0:  # derived: one output per named class
            object.__setattr__(self, "num_classes", len(self.classes) if self.classes else 10)

    def replace(self, **changes) -> "Config":
        """A new Config with `changes`; new `classes` without a `num_classes` bring their own count."""
        if changes.get("classes") and "num_classes" not in changes:
            changes["num_classes"] = len(changes["classes"])
        return dataclasses.replace(self, **changes)

    def validate(self) -> "Config":
        """Check every field against its metadata, then the combinations; raise UserError naming the field."""
        for f in dataclasses.fields(self):
            m, name, value = f.metadata, flag_name(f).lstrip("-"), getattr(self, f.name)
            _check_type(f, value)
            if m["choices"] is not None and value not in m["choices"]:
                raise UserError(f"{name} must be one of {', '.join(m['choices'])}; got {value!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            for broken, rule in ((not math.isfinite(value), "a finite number"),
                                 (m["positive"] and not value > 0, "positive"),
                                 (m["minimum"] is not None and value < m["minimum"], f"at least {m['minimum']}"),
                                 (m["maximum"] is not None and value > m["maximum"], f"at most {m['maximum']}")):
                if broken:
                    raise UserError(f"{name} must be {rule}, got {value}")
        half, names = min(self.img_size, self.decode_size) // 2, ", ".join(map(str, self.classes))
        for broken, message in (
                (self.model == "simple_cnn" and self.img_size < 30,
                 f"SimpleCNN needs img_size >= 30 (three unpadded convolutions and pools), got {self.img_size}"),
                (self.model != "resnet18" and self.unfreeze != "all",
                 f"--unfreeze {self.unfreeze} needs a backbone: only resnet18 has one"),
                (self.classes and len(self.classes) != self.num_classes,
                 f"classes names {len(self.classes)} classes ({names}) but num_classes is {self.num_classes}"),
                (len(set(self.classes)) != len(self.classes), f"classes names a class twice: {names}"),
                (self.num_classes < 2, f"a classifier needs at least 2 classes, and the data has {self.num_classes}"
                 f"{f' ({names})' if names else ''}: give a data folder with one subfolder of images per class"),
                (self.cutout > self.img_size, f"cutout {self.cutout} is larger than the {self.img_size}-pixel image"),
                (self.crop_padding > half, f"crop-padding {self.crop_padding} is more than half the {2 * half}-pixel "
                 f"image; pass --crop-padding {half} or less"),
                (self.schedule != "constant" and self.warmup_epochs >= self.n_epochs,
                 f"--warmup-epochs {self.warmup_epochs:g} is not shorter than --epochs {self.n_epochs}: the "
                 f"{self.schedule} schedule would rise for the whole run; pass --warmup-epochs below {self.n_epochs} "
                 "or more --epochs")):
            if broken:
                raise UserError(message)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "the settings") -> "Config":
        """A Config from a config.json (unknown keys ignored); a value of the wrong type is refused naming `source`."""
        if not isinstance(values, dict):
            raise UserError(f"{source} holds a JSON {type(values).__name__}, not an object of settings; restore it "
                            "or start the run again")
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) and "tuple" in known[k].type else v) for k, v in values.items()
                  if k in known}  # JSON has lists where a Config has tuples
        try:
            for name, value in values.items():
                _check_type(known[name], value)
        except UserError as error:
            raise UserError(f"{source}: {error}; correct it or start the run again") from None
        return cls(**values)


def fields_for(command: str):
    """The Config fields offered as flags by `command`."""
    return [f for f in dataclasses.fields(Config) if command in f.metadata["commands"]]


def flag_name(f) -> str:
    return "--" + (f.metadata["flag"] or f.name).replace("_", "-")


# What each annotation accepts (bool is an int to Python, never a count or a rate here).
KINDS = {"int": ("an integer", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)),
         "float": ("a number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)),
         "bool": ("true or false", lambda v: isinstance(v, bool)),
         "str": ("a string", lambda v: isinstance(v, str)),
         "tuple": ("a list", lambda v: isinstance(v, tuple) and all(isinstance(x, (str, numbers.Real)) for x in v))}


def _check_type(f, value) -> None:
    """Raise a UserError naming the field unless `value` has the field's type (None where it is Optional)."""
    what, fits = KINDS[f.type.removeprefix("Optional[").removesuffix("]")]
    if not (fits(value) or (value is None and f.type.startswith("Optional["))):
        named = f.name if f.metadata["flag"] in (None, f.name) else f"{f.name} ({flag_name(f)})"
        raise UserError(f"{named} must be {what}, got {value!r}")

