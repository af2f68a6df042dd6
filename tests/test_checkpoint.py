import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from cifarjax.checkpoint import load_variables
from cifarjax.errors import UserError
from cifarjax.loop import train_loop
from tests.test_train import fast, tiny_split

CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from cifarjax import loop
    from tests.test_train import fast, tiny_split

    kill_at = int(sys.argv[2])
    if kill_at:
        step, calls = loop.Trainer.step, [0]
        def counted(self, *args):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, *args)
        loop.Trainer.step = counted
    loop.train_loop(fast(n_epochs=3, eval_every=3, checkpoint_every=2), tiny_split(40), tiny_split(12, seed=1),
                    run=sys.argv[1])
""")


def run_child(tmp_path, run_dir, kill_at):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=os.getcwd()))
    return subprocess.run([sys.executable, str(script), str(run_dir), str(kill_at)],
                          capture_output=True, text=True)


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    settings = fast(n_epochs=3, eval_every=3, checkpoint_every=2), tiny_split(40), tiny_split(12, seed=1)
    train_loop(*settings, run=tmp_path / "straight")
    killed = run_child(tmp_path, tmp_path / "killed", 8)  # 5 steps per epoch: dies inside epoch 2
    assert killed.returncode == -signal.SIGKILL
    train_loop(*settings, run=tmp_path / "killed", resume=True)  # resumed here: only the kill needs a process
    a, b = load_variables(tmp_path / "straight"), load_variables(tmp_path / "killed")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    strip = lambda lines: [l.split('"wall_seconds"')[0] for l in lines]  # noqa: E731
    assert strip((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()) == strip(
        (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines())


def test_resume_in_process_equals_uninterrupted(two_epoch_runs, tmp_path):
    """A 1-epoch run resumed to 2 epochs ends as `two_epoch_runs`' uninterrupted 2-epoch run (the same config and
    data, trained once for this file)."""
    _, _, data, val, full = two_epoch_runs
    train_loop(fast(n_epochs=1), data, val, run=tmp_path / "b")
    resumed = train_loop(fast(n_epochs=2), data, val,
                         run=tmp_path / "b", resume=True)
    assert resumed.history.train_loss == full.history.train_loss
    assert resumed.history.epoch_val_accuracy == full.history.epoch_val_accuracy
    for x, y in zip(jax.tree.leaves(full.variables), jax.tree.leaves(resumed.variables)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("seconds, steps", [(3600, [15]), (1e-9, [5, 10, 15])])
def test_epochs_are_checkpointed_once_checkpoint_seconds_passed_and_the_last_always(tmp_path, seconds, steps):
    train_loop(fast(n_epochs=3, checkpoint_seconds=seconds), tiny_split(40), tiny_split(12, seed=1), run=tmp_path)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == steps  # 5 steps per epoch


def test_load_variables_returns_the_latest_params(tmp_path):
    result = train_loop(fast(n_epochs=2, keep_checkpoints=1), tiny_split(40), tiny_split(12, seed=1), run=tmp_path)
    loaded = load_variables(tmp_path)
    assert set(loaded) == {"params", "batch_stats"}
    for x, y in zip(jax.tree.leaves(result.variables["params"]), jax.tree.leaves(loaded["params"])):
        np.testing.assert_array_equal(x, y)
    assert len(list((tmp_path / "checkpoints").iterdir())) == 1


def test_load_variables_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_variables(tmp_path / "nope")
    with pytest.raises(UserError, match="holds no checkpoints"):
        load_variables(tmp_path)
    for name in ("epochs-1", "epochs-2"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="holds 2 runs"):
        load_variables(tmp_path)


# ------------------------------------------------------------------------------------------------ damage

def damage(run, step, how):
    """Truncate, delete or flip a byte of the largest array file of checkpoint `step`."""
    files = sorted((p for p in (run / "checkpoints" / str(step) / "variables").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    target = files[-1]
    data = bytearray(target.read_bytes())
    if how == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "delete":
        target.unlink()
    else:
        data[len(data) // 2] ^= 0x10
        target.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def two_epoch_runs(tmp_path_factory):
    """An uninterrupted 2-epoch run (checkpoints at steps 5 and 10) and its final variables."""
    data, val = tiny_split(40), tiny_split(12, seed=1)
    config = fast(n_epochs=2)
    folder = tmp_path_factory.mktemp("runs")
    full = train_loop(config, data, val, run=folder / "full")
    return folder, config, data, val, full


@pytest.mark.parametrize("how", ["truncate", "delete", "flip"])
def test_damaged_latest_checkpoint_falls_back_and_resume_still_ends_exactly(two_epoch_runs, tmp_path, capsys, how):
    folder, config, data, val, full = two_epoch_runs
    run = tmp_path / "run"
    shutil.copytree(folder / "full", run)
    damage(run, 10, how)
    fallback = load_variables(run)  # step 5, with one warning line naming the damaged step
    err = capsys.readouterr().err
    assert "checkpoint step 10" in err and "is damaged" in err and "using checkpoint step 5" in err
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fallback), jax.tree.leaves(full.variables)))
    resumed = train_loop(config, data, val, run=run, resume=True)
    for x, y in zip(jax.tree.leaves(full.variables), jax.tree.leaves(resumed.variables)):
        np.testing.assert_array_equal(x, y)
    assert resumed.history.records[-1]["val_accuracy"] == full.history.records[-1]["val_accuracy"]


def test_no_intact_checkpoint_is_one_clear_error(two_epoch_runs, tmp_path):
    folder = two_epoch_runs[0]
    run = tmp_path / "run"
    shutil.copytree(folder / "full", run)
    damage(run, 5, "truncate"), damage(run, 10, "delete")
    with pytest.raises(UserError, match=r"no intact checkpoint in .*damaged steps: 10, 5"):
        load_variables(run)


def test_evaluate_scores_the_newest_intact_checkpoint(two_epoch_runs, tmp_path, capsys):
    from experiments import evaluate
    from tests.helpers import make_image_folder
    folder, config = two_epoch_runs[:2]
    run = tmp_path / "run"
    shutil.copytree(folder / "full", run)
    (run / "config.json").write_text(json.dumps(config.replace(classes=("cat", "dog", "frog")).to_dict()))
    damage(run, 10, "truncate")
    data = make_image_folder(tmp_path / "data", n_train=0, n_test=2)
    evaluate.main([str(run), "--data-dir", str(data), "--json"])
    out, err = capsys.readouterr()
    assert json.loads(out)["n"] == 6 and "using checkpoint step 5" in err and "Traceback" not in err


def test_a_head_only_fine_tune_stores_the_frozen_backbone_once(tmp_path):
    """Checkpoints hold what trains (the head) and the statistics; the frozen backbone is written once, and
    load_variables returns the whole model."""
    import orbax.checkpoint as ocp
    from cifarjax.augment import AugmentSpec
    from cifarjax.inputs import ImageInputs
    from cifarjax.loop import fit
    from cifarjax.models import AXIS, Apply
    from tests.test_train import small_resnet, small_resnet_variables
    config = fast(model="resnet18", unfreeze="head", n_epochs=2, cache_features=False)
    model = small_resnet(frozen_bn_stages=5, axis_name=AXIS)
    variables = small_resnet_variables()  # initialize(model)'s values (init runs in eval mode, whatever the
    # frozen BatchNorm stages): one compiled init for the file
    result = fit(config, Apply(model), variables, tiny_split(40), tiny_split(12, seed=1),
                 ImageInputs(AugmentSpec()), run=tmp_path)
    manager = ocp.CheckpointManager(tmp_path / "checkpoints")
    stored = manager.restore(manager.latest_step(), args=ocp.args.Composite(variables=ocp.args.StandardRestore()))
    manager.close()
    assert set(stored.variables["params"]) == {"head"}
    with np.load(tmp_path / "frozen_params.npz") as frozen:
        assert len(frozen.files) == len(jax.tree.leaves(variables["params"]["backbone"]))
    loaded = load_variables(tmp_path)
    for a, b in zip(jax.tree.leaves(result.variables), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("platform", ["gpu", "cpu"])
def test_a_fine_tune_with_a_moving_average_resumes_bit_identically(tmp_path, monkeypatch, platform):
    """The GPU program (CIFARJAX_PLATFORM=gpu, built on this CPU) and the CPU's: layer4 and the head train, with a
    moving average and 2 steps per call; stopped after epoch 1 and resumed, it ends as the uninterrupted run, average
    included. The average keeps the frozen weights' own bits and evaluates with averaged train-mode statistics
    (layer4's), which `load_variables(average=True)` returns as the run did."""
    from cifarjax.augment import AugmentSpec
    from cifarjax.inputs import ImageInputs
    from cifarjax.loop import fit
    from cifarjax.models import AXIS, Apply
    from tests.test_train import small_resnet, small_resnet_variables
    monkeypatch.setenv("CIFARJAX_PLATFORM", platform)
    config = fast(model="resnet18", unfreeze="layer4", ema_decay=0.9, steps_per_call=2, n_epochs=2)
    model = small_resnet(frozen_bn_stages=4, axis_name=AXIS)  # layer4's BatchNorm trains, as `--unfreeze layer4`'s
    variables = small_resnet_variables()  # initialize(model)'s values (init runs in eval mode, whatever the
    # frozen BatchNorm stages): one compiled init for the file
    data, val = tiny_split(32), tiny_split(8, seed=1)  # 4 steps per epoch

    def run(out, epochs, resume=False):
        return fit(config.replace(n_epochs=epochs), Apply(model), variables, data, val, ImageInputs(AugmentSpec()),
                   run=out, resume=resume)
    full = run(tmp_path / "full", 2)
    run(tmp_path / "resumed", 1)
    resumed = run(tmp_path / "resumed", 2, resume=True)
    strip = lambda records: [{k: v for k, v in r.items() if k != "wall_seconds"} for r in records]  # noqa: E731
    assert strip(resumed.history.records) == strip(full.history.records)
    for a, b in zip(jax.tree.leaves((full.variables, full.average)), jax.tree.leaves((resumed.variables,
                                                                                     resumed.average))):
        np.testing.assert_array_equal(a, b)
    frozen, live = variables["params"]["backbone"]["layer3_block0"], full.variables["batch_stats"]["backbone"]
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(full.average["params"]["backbone"]["layer3_block0"])):
        np.testing.assert_array_equal(a, b)
    averaged = full.average["batch_stats"]["backbone"]
    assert not np.array_equal(averaged["layer4_block0"]["bn1"]["var"], live["layer4_block0"]["bn1"]["var"])
    np.testing.assert_array_equal(averaged["layer3_block0"]["bn1"]["var"], live["layer3_block0"]["bn1"]["var"])
    for a, b in zip(jax.tree.leaves(full.average), jax.tree.leaves(load_variables(tmp_path / "full", average=True))):
        np.testing.assert_array_equal(a, b)
