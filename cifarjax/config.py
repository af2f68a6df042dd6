"""Experiment configuration as code: the original's fields and defaults plus what cifarjax adds."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from cifarjax.errors import UserError

NORMALIZATIONS = ("none", "imagenet", "dataset")
UNFREEZE_CHOICES = ("head", "layer4", "all")
BN_MODES = ("frozen", "train")
AUGMENT_BACKENDS = ("device", "albumentations")


@dataclass
class Config:
    # The original project's fields and defaults.
    seed: int = 0
    batch_size: int = 64
    img_size: int = 32
    n_epochs: int = 20
    eval_every: int = 2000  # steps (0: only at epoch ends); evaluation also runs at every epoch end
    lr: float = 1e-3
    # Model and what is trained.
    model: str = "simple_cnn"  # 'simple_cnn' or 'resnet18'
    num_classes: int = 10
    unfreeze: str = "all"  # ResNet-18: 'head' (the original), 'layer4' (head + layer4) or 'all'
    bn: str = "frozen"  # frozen layers' BatchNorm: 'frozen' (inference mode) or 'train' (PyTorch's behaviour)
    conv_impl: str = "auto"  # "auto" (winograd on CPU, XLA/cuDNN on GPU), "winograd", "im2col" or "xla"
    cache_features: bool = True  # train the head on cached backbone features when everything else is frozen
    # Data and augmentation.
    dataset: str = "auto"  # see cifarjax.data
    data_dir: Optional[str] = None
    decode_size: int = 32  # images are stored at this size and resized to img_size on the device
    val_fraction: float = 0.2
    flip: bool = True
    crop_padding: int = 0  # >0: pad-and-random-crop by this many pixels
    normalize: str = "none"  # 'none' (the original), 'imagenet' or 'dataset' mean/std
    norm_mean: Optional[tuple] = None  # resolved from `normalize` when training starts
    norm_std: Optional[tuple] = None
    augment_backend: str = "device"  # 'device' (jitted, on the accelerator) or 'albumentations' (host, per image)
    eval_batch_size: int = 500
    # Checkpoints.
    checkpoint_every: int = 0  # steps; 0 means only at epoch ends
    keep_checkpoints: int = 3
    classes: tuple = field(default_factory=tuple)  # filled from the dataset

    def validate(self) -> "Config":
        """Check every field; raise UserError naming the bad one and its allowed values."""
        def need(ok, message):
            if not ok:
                raise UserError(message)
        need(self.batch_size >= 1, f"batch size must be a positive integer, got {self.batch_size}")
        need(self.eval_batch_size >= 1, f"evaluation batch size must be positive, got {self.eval_batch_size}")
        need(8 <= self.img_size <= 1024, f"img_size must be between 8 and 1024 pixels, got {self.img_size}")
        if self.model == "simple_cnn":
            need(self.img_size >= 30, f"SimpleCNN needs img_size >= 30 (three unpadded convolutions and pools), "
                 f"got {self.img_size}")
        need(self.n_epochs >= 1, f"epochs must be at least 1, got {self.n_epochs}")
        need(self.eval_every >= 0, f"eval_every must be >= 0 steps (0: epoch ends only), got {self.eval_every}")
        need(8 <= self.decode_size <= 1024, f"decode size must be between 8 and 1024, got {self.decode_size}")
        need(self.lr > 0, f"learning rate must be positive, got {self.lr}")
        need(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        need(self.crop_padding >= 0, f"crop padding must be >= 0, got {self.crop_padding}")
        need(self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        for name, value, allowed in (("model", self.model, ("simple_cnn", "resnet18")),
                                     ("normalize", self.normalize, NORMALIZATIONS),
                                     ("unfreeze", self.unfreeze, UNFREEZE_CHOICES), ("bn", self.bn, BN_MODES),
                                     ("conv_impl", self.conv_impl, ("auto", "winograd", "im2col", "xla")),
                                     ("augment_backend", self.augment_backend, AUGMENT_BACKENDS)):
            need(value in allowed, f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        need(self.model == "resnet18" or self.unfreeze == "all",
             f"--unfreeze {self.unfreeze} needs a backbone: only resnet18 has one")
        return self

    @property
    def frozen_bn_stages(self) -> int:
        """How many ResNet-18 stages (stem, layer1..4) run BatchNorm in inference mode during training."""
        if self.bn == "train":
            return 0
        return {"head": 5, "layer4": 4, "all": 0}[self.unfreeze]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in known}
        return cls(**values)
