"""Which steps (counted from 1) each compiled call of a fit runs and what follows it (evaluation, epoch end,
checkpoint); pure. All calls run as many steps, a divisor of the start step and of every event interval."""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple

from cifarjax.data import train_indices

# Auto (`--steps-per-call 0`) runs several steps a call only where dispatching a step costs about as much as running
# it: a head on cached features, or a GPU or TPU on images of at most SMALL_IMAGES pixels a side (a SimpleCNN or
# ResNet-18 at 32x32). Elsewhere (a CPU; 224x224 on a GPU) a step outlasts its dispatch: one a call compiles fastest.
CHEAP_STEPS_PER_CALL, ACCELERATOR_STEPS_PER_CALL, SMALL_IMAGES = 64, 8, 64


def most_steps_per_call(config, platform: str, cheap: bool) -> int:
    """`config.steps_per_call`, or when it is 0 (auto) the above for `platform` (`cheap`: a head on features)."""
    small_on_accelerator = platform != "cpu" and config.img_size <= SMALL_IMAGES
    auto = CHEAP_STEPS_PER_CALL if cheap else ACCELERATOR_STEPS_PER_CALL if small_on_accelerator else 1
    return config.steps_per_call or auto


def steps_per_call(most: int, start: int, intervals) -> int:
    """The largest number up to `most` that divides `start` and each event interval (0: none)."""
    every = math.gcd(start, *intervals)
    return max(d for d in range(1, min(most, every) + 1) if every % d == 0)


class Call(NamedTuple):
    """One compiled call: the `steps` steps after step `first`, and what follows it."""
    first: int
    steps: int = 1
    evaluate: bool = False  # every `eval_every` steps, and at each epoch end
    epoch_end: bool = False
    checkpoint: bool = False  # whatever the clock says: every `checkpoint_every` steps, and after the last step

    @property
    def end(self) -> int:
        """The last step it runs."""
        return self.first + self.steps


def batches(config, n_train: int, start: int, n_devices: int, platform: str, cheap: bool = False) -> Iterator[tuple]:
    """(call, its indices) from step `start` to the end of the last epoch: (devices, per_device) indices for one
    step a call, (steps, devices, per_device) for several, from each epoch's seeded permutation."""
    per_epoch, every = n_train // config.batch_size, lambda n, interval: bool(interval) and n % interval == 0
    steps = steps_per_call(most_steps_per_call(config, platform, cheap), start,
                           (per_epoch, config.eval_every, config.checkpoint_every))
    for epoch in range(start // per_epoch, config.n_epochs):
        order = train_indices(n_train, config.batch_size, n_devices, config.seed, epoch)
        for done in range(max(start - epoch * per_epoch, 0), per_epoch, steps):
            end, epoch_end = epoch * per_epoch + done + steps, done + steps == per_epoch
            call = Call(end - steps, steps, every(end, config.eval_every) or epoch_end, epoch_end,
                        every(end, config.checkpoint_every) or end == config.n_epochs * per_epoch)
            yield call, order[done] if steps == 1 else order[done:done + steps]
