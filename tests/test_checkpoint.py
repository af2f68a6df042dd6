import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from cifarjax.checkpoint import load_variables
from cifarjax.config import Config
from cifarjax.errors import UserError
from cifarjax.loop import train_loop
from tests.test_train import tiny_split

CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from cifarjax import loop
    from cifarjax.config import Config
    from tests.test_train import tiny_split

    kill_at = int(sys.argv[2])
    if kill_at:
        step, calls = loop.Trainer.step, [0]
        def counted(self, *args):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, *args)
        loop.Trainer.step = counted
    config = Config(n_epochs=3, batch_size=8, eval_every=3, num_classes=3, checkpoint_every=2)
    loop.train_loop(config, tiny_split(40), tiny_split(12, seed=1), run=sys.argv[1], resume=bool(int(sys.argv[3])))
""")


def run_child(tmp_path, run_dir, kill_at, resume):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=os.getcwd()))
    return subprocess.run([sys.executable, str(script), str(run_dir), str(kill_at), str(int(resume))],
                          capture_output=True, text=True)


def test_kill_9_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight = run_child(tmp_path, tmp_path / "straight", 0, False)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run_child(tmp_path, tmp_path / "killed", 8, False)  # 5 steps per epoch: dies inside epoch 2
    assert killed.returncode == -signal.SIGKILL
    resumed = run_child(tmp_path, tmp_path / "killed", 0, True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_variables(tmp_path / "straight"), load_variables(tmp_path / "killed")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    strip = lambda lines: [l.split('"wall_seconds"')[0] for l in lines]  # noqa: E731
    assert strip((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()) == strip(
        (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines())


def test_resume_in_process_equals_uninterrupted(tmp_path):
    data, val = tiny_split(40), tiny_split(12, seed=1)
    full = train_loop(Config(n_epochs=2, batch_size=8, num_classes=3, eval_every=0), data, val, run=tmp_path / "a")
    train_loop(Config(n_epochs=1, batch_size=8, num_classes=3, eval_every=0), data, val, run=tmp_path / "b")
    resumed = train_loop(Config(n_epochs=2, batch_size=8, num_classes=3, eval_every=0), data, val,
                         run=tmp_path / "b", resume=True)
    assert resumed.history.train_loss == full.history.train_loss
    assert resumed.history.epoch_val_accuracy == full.history.epoch_val_accuracy
    for x, y in zip(jax.tree.leaves(full.variables), jax.tree.leaves(resumed.variables)):
        np.testing.assert_array_equal(x, y)


def test_load_variables_returns_the_latest_params(tmp_path):
    result = train_loop(Config(n_epochs=2, batch_size=8, num_classes=3, keep_checkpoints=1), tiny_split(24),
                        tiny_split(6), run=tmp_path)
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
