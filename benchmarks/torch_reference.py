"""PyTorch references measured beside cifarjax: eager SimpleCNN/ResNet-18 steps, and the original
project's end-to-end recipe (albumentations per image, DataLoader with 4 workers, Adam, batch 64)."""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn


def simple_cnn(num_classes: int = 10) -> nn.Module:
    """The original SimpleCNNModel."""
    return nn.Sequential(
        nn.Conv2d(3, 128, 3), nn.ReLU(), nn.Dropout(0.3), nn.MaxPool2d(2),
        nn.Conv2d(128, 256, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.3),
        nn.Conv2d(256, 256, 3), nn.ReLU(), nn.MaxPool2d(4), nn.Dropout(0.3),
        nn.Flatten(), nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, num_classes))


def resnet18(num_classes: int = 10, trains: str = "all") -> nn.Module:
    """torchvision's ResNet-18 with a new head; `trains`: 'all', 'layer4' (and the head) or 'head' (the original's
    ModifiedResNet18). Frozen parameters get requires_grad=False, as cifarjax's freezing policy."""
    import torchvision
    model = torchvision.models.resnet18()
    model.fc = nn.Linear(512, num_classes)
    for name, p in model.named_parameters():
        p.requires_grad = (trains == "all" or name.startswith("fc.")
                           or (trains == "layer4" and name.startswith("layer4.")))
    return model


def frozen_resnet18(num_classes: int = 10) -> nn.Module:
    """The original ModifiedResNet18: frozen backbone, new fc."""
    return resnet18(num_classes, "head")


def freeze_batchnorm(model: nn.Module, modules=None) -> None:
    """Put the BatchNorm layers of `modules` (default: all) in eval mode: cifarjax's frozen BatchNorm."""
    for m in (modules or model).modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def _time_steps(step, n_steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    _sync()
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    _sync()
    return time.perf_counter() - start


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    """What the references run on, for labels: the GPU's name (cuDNN convolutions in TF32 there, PyTorch's
    default), or 'CPU'."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_step_rate(model: nn.Module, batch: int, n_steps: int, size: int = 32, frozen_bn=False) -> float:
    """Images per second of eager Adam steps on random data held in memory. `frozen_bn`: True (every
    BatchNorm in eval mode) or a list of modules whose BatchNorm is (cifarjax's frozen stages)."""
    model = model.to(device())
    model.train()
    if frozen_bn is True:
        freeze_batchnorm(model)
    elif frozen_bn:
        for module in frozen_bn:
            freeze_batchnorm(module)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-3)
    x, y = torch.rand(batch, 3, size, size, device=device()), torch.randint(0, 10, (batch,), device=device())

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return batch * n_steps / _time_steps(step, n_steps)


def eval_rate(model: nn.Module, batch: int, n_batches: int, size: int = 32) -> float:
    model = model.to(device()).eval()
    x = torch.rand(batch, 3, size, size, device=device())
    with torch.no_grad():
        return batch * n_batches / _time_steps(lambda: model(x), n_batches, warmup=1)


class AlbumentationsDataset(torch.utils.data.Dataset):
    """The original dataset.py: uint8 images through Resize + HorizontalFlip + ToFloat(255), per image."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, train: bool, img_size: int = 32):
        import albumentations as A
        ops = [A.Resize(img_size, img_size)] + ([A.HorizontalFlip(p=0.5)] if train else []) + [A.ToFloat(max_value=255)]
        self.transform, self.images, self.labels = A.Compose(ops), images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.transform(image=self.images[i])["image"]
        return torch.from_numpy(image.transpose(2, 0, 1).copy()), int(self.labels[i])


def original_training(train_images, train_labels, val_images, val_labels, epochs: int = 1, seed: int = 0,
                      batch_size: int = 64, workers: int = 4, on_epoch=None) -> dict:
    """The original train_loop: `epochs` epochs, validation accuracy after each; returns timings and accuracies.

    `on_epoch(epoch, val_accuracy, seconds)` is called after each epoch's evaluation.
    """
    torch.manual_seed(seed)
    dev = device()
    model = simple_cnn().to(dev)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loader = torch.utils.data.DataLoader(AlbumentationsDataset(train_images, train_labels, True), batch_size,
                                         shuffle=True, num_workers=workers)
    val_loader = torch.utils.data.DataLoader(AlbumentationsDataset(val_images, val_labels, False), batch_size,
                                             num_workers=workers)
    start = time.perf_counter()
    train_seconds, accuracies = 0.0, []
    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        for x, y in loader:
            x, y = x.to(dev), y.to(dev)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        _sync()
        train_seconds += time.perf_counter() - epoch_start
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                x, y = x.to(dev), y.to(dev)
                correct += int((model(x).argmax(1) == y).sum())
        accuracies.append(correct / len(val_labels))
        if on_epoch:
            on_epoch(epoch, accuracies[-1], time.perf_counter() - start)
    return {"seconds": time.perf_counter() - start, "train_seconds": train_seconds,
            "val_accuracy": accuracies[-1], "val_accuracies": accuracies}

