"""The schedule of a fit (`cifarjax.schedule`): which steps each compiled call runs, where the events fall, and the
indices each call receives. Pure: no devices, no training."""
import numpy as np

from cifarjax.data import train_indices
from cifarjax.config import Config
from cifarjax.schedule import ACCELERATOR_STEPS_PER_CALL, CHEAP_STEPS_PER_CALL, Call, batches, most_steps_per_call, \
    steps_per_call

CPU, GPU = "cpu", "gpu"  # the platform a run is built for, over two devices


def settings(**changes) -> Config:
    return Config(**{"batch_size": 8, "num_classes": 3, "eval_every": 0, **changes})


def calls(config, n_train: int, start: int = 0, platform=CPU, cheap: bool = False) -> list:
    return [call for call, _ in batches(config, n_train, start, 2, platform, cheap)]


def spans(config, n_train: int, most: int, start: int = 0) -> list:
    """[(last step, steps)] of each call with at most `most` steps a call."""
    return [(c.end, c.steps) for c in calls(config.replace(steps_per_call=most), n_train, start)]


def test_every_call_runs_as_many_steps_and_ends_on_every_event():
    config = settings(n_epochs=2, eval_every=4, checkpoint_every=0, batch_size=8)  # events at 4, 8, 12, 16
    assert spans(config, 64, 8) == [(4, 4), (8, 4), (12, 4), (16, 4)]
    assert spans(config, 64, 3) == [(s, 2) for s in range(2, 17, 2)]  # up to 3: 2 divides every interval
    assert spans(config, 64, 1) == [(s, 1) for s in range(1, 17)]
    assert spans(config.replace(eval_every=0, checkpoint_every=3), 48, 8, start=3) == [(6, 3), (9, 3), (12, 3)]
    assert spans(config.replace(eval_every=0), 64, 8, start=4) == [(8, 4), (12, 4), (16, 4)]  # resumed at 4
    assert spans(config.replace(eval_every=0), 64, 8, start=5) == [(s, 1) for s in range(6, 17)]
    assert spans(config, 64, 8, start=16) == []  # nothing left to train
    assert steps_per_call(8, 0, (625, 2000, 0)) == 5 and steps_per_call(64, 0, (625, 0, 0)) == 25
    assert steps_per_call(8, 0, (625, 7, 0)) == 1


def test_events_fall_after_the_calls_that_end_on_them():
    """Evaluations every `eval_every` steps and at epoch ends; checkpoints due whatever the clock says every
    `checkpoint_every` steps and after the last step (the clock's, at the other epoch ends, are the loop's)."""
    config = settings(n_epochs=2, eval_every=3, checkpoint_every=4, batch_size=8)  # 5 steps per epoch
    got = calls(config, 40)
    assert [c.end for c in got if c.evaluate] == [3, 5, 6, 9, 10]
    assert [c.end for c in got if c.epoch_end] == [5, 10]
    assert [c.end for c in got if c.checkpoint] == [4, 8, 10]
    assert got[0] == Call(0, 1, False, False, False) and got[-1] == Call(9, 1, True, True, True)
    assert [c.end for c in calls(config.replace(eval_every=0, checkpoint_every=0), 40) if c.evaluate] == [5, 10]


def test_each_call_gets_its_steps_indices_from_its_epochs_permutation():
    """One step a call: (devices, per_device) indices; several: (steps, devices, per_device), the same rows; and a
    run resumed mid-epoch gets the rest of that epoch's order."""
    config = settings(n_epochs=2, eval_every=0, batch_size=8, seed=3)  # 5 steps per epoch, 4 images each device
    single = [(c, idx) for c, idx in batches(config.replace(steps_per_call=1), 43, 0, 2, CPU)]
    epochs = [train_indices(43, 8, 2, 3, e) for e in range(2)]
    assert all(idx.shape == (2, 4) for _, idx in single)
    np.testing.assert_array_equal(np.stack([idx for _, idx in single]), np.concatenate(epochs))
    several = list(batches(config.replace(steps_per_call=5), 43, 0, 2, CPU))
    assert [(c.first, idx.shape) for c, idx in several] == [(0, (5, 2, 4)), (5, (5, 2, 4))]
    np.testing.assert_array_equal(np.concatenate([idx for _, idx in several]), np.concatenate(epochs))
    resumed = list(batches(config.replace(steps_per_call=1), 43, 7, 2, CPU))
    assert [c.first for c, _ in resumed] == [7, 8, 9]
    np.testing.assert_array_equal(np.stack([idx for _, idx in resumed]), epochs[1][2:])


def test_auto_runs_several_steps_only_where_dispatch_dominates():
    config = settings()
    assert most_steps_per_call(config, "cpu", cheap=False) == 1
    assert most_steps_per_call(config, "gpu", cheap=False) == ACCELERATOR_STEPS_PER_CALL > 1  # 32x32
    assert most_steps_per_call(config.replace(model="resnet18", img_size=224), "gpu", cheap=False) == 1
    assert most_steps_per_call(config, "cpu", cheap=True) == CHEAP_STEPS_PER_CALL  # a head on cached features
    assert most_steps_per_call(config.replace(steps_per_call=3), "cpu", cheap=False) == 3
    auto = settings(n_epochs=1, eval_every=0, batch_size=2, steps_per_call=0)  # 64 steps per epoch
    assert {c.steps for c in calls(auto, 128, platform=CPU)} == {1}  # the run's platform decides
    assert {c.steps for c in calls(auto, 128, platform=GPU)} == {ACCELERATOR_STEPS_PER_CALL}
    assert {c.steps for c in calls(auto, 128, platform=CPU, cheap=True)} == {64}
