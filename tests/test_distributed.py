"""Two local processes with JAX's distributed runtime (1 CPU device each, gloo collectives) against one process
with 2 CPU devices: the same parameters, bit for bit, and the same metrics."""
import json
import os
import signal
import socket
import time

import jax
import numpy as np
import pytest

from cifarjax import runs
from cifarjax.cpu import process as hugepages
from cifarjax.checkpoint import load_variables
from experiments import cnn
from tests.helpers import make_image_folder, start_module
EPOCHS = 3  # a checkpoint at each epoch end: a killed run resumes from one, mid-run
pytestmark = pytest.mark.slow  # several processes each; run with -m slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("dist") / "data", n_train=20, n_test=0, learnable=True)


def args(data_dir, out, *extra, epochs=(EPOCHS,)):
    """A checkpoint at every epoch end, each one decided by process 0's clock (`distributed.writer_decides`)."""
    return ["--data-dir", str(data_dir), "--epochs", *map(str, epochs), "--batch-size", "8", "--conv-impl", "xla",
            "--eval-every", "4", "--checkpoint-seconds", "1e-9", "--out", str(out), *map(str, extra)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(data_dir, outs, *extra, processes=2, devices_each=1, command="cnn", epochs=(EPOCHS,)):
    """Start `processes` processes of experiments.`command` (one --out each, or one shared), each with
    `devices_each` CPU devices."""
    port = free_port()
    outs = outs if isinstance(outs, list) else [outs] * processes
    children = []
    for i in range(processes):
        distributed = ["--coordinator", f"localhost:{port}", "--num-processes", processes, "--process-id", i] \
            if processes > 1 else []
        per_process = extra[i] if extra and isinstance(extra[0], list) else extra
        children.append(start_module(f"experiments.{command}",
                                     *args(data_dir, outs[i], *distributed, *per_process, epochs=epochs),
                                     env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}"}))
    return children


def finish(children, timeout=240):
    return [(c.wait(timeout), *c.communicate()) for c in children]


def metrics(run):
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in runs.read_metrics(run)]


def same_parameters(a, b) -> bool:
    return all(np.array_equal(x, y)
               for x, y in zip(jax.tree.leaves(load_variables(a)), jax.tree.leaves(load_variables(b))))


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    """The reference: this process, 2 CPU devices."""
    out = tmp_path_factory.mktemp("one") / "run"
    cnn.main(args(data_dir, out))
    return out


def test_negative_control_each_process_alone_differs(one_process, tmp_path):
    """What the old code did under jax.distributed: each process trained alone on its local device. The
    comparison below must be able to tell: a lone device's run differs. The reference's own settings and data,
    trained here on the first of this process's two devices (the program a process with one device runs, without
    starting one: its start, loading and plots are not what the control is about; the same call on both devices
    gives the reference's parameters bit for bit, checked first)."""
    from cifarjax.config import Config
    from cifarjax.data import load_dataset, train_val_split
    from cifarjax.loop import train_loop
    config = Config.from_dict(json.loads((one_process / runs.CONFIG).read_text()))
    dataset = load_dataset(config.data_dir, config.dataset, config.decode_size, config.classes)
    train, val = train_val_split(dataset, config.val_fraction, config.seed, config.subset)
    train_loop(config, train, val, run=tmp_path / "both", devices=jax.devices()[:2], report=False)
    assert same_parameters(one_process, tmp_path / "both")  # this path on both devices is the reference's, so
    train_loop(config, train, val, run=tmp_path / "alone", devices=jax.devices()[:1], report=False)
    assert not same_parameters(one_process, tmp_path / "alone")  # only the lone device differs


def test_a_killed_peer_ends_the_other_cleanly_and_resume_completes_exactly(data_dir, one_process, tmp_path):
    """Two processes, one killed mid-run and both resumed, end with one process's parameters and metrics: the
    arithmetic is the same (a 2-value pmean either way) before the kill and after the resume."""
    out = tmp_path / "run"
    children = launch(data_dir, out)
    deadline = time.time() + 180
    while time.time() < deadline and len(runs.read_metrics(out)) < 2:
        time.sleep(0.2)
    children[1].send_signal(signal.SIGKILL)
    code, _, err = finish(children[:1], timeout=90)[0]  # the timeout is the hang guard: no wall-clock assertion
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "another process of this distributed run stopped" in errors[0], err[-3000:]
    assert "Traceback" not in err and "Check failure" not in err
    children[1].communicate()
    results = finish(launch(data_dir, out, "--resume"))
    assert [r[0] for r in results] == [0, 0], results[1][2][-3000:] + results[0][2][-3000:]
    assert "validation accuracy" in results[0][1] and "validation accuracy" not in results[1][1]  # process 0 reports
    assert same_parameters(one_process, out)
    assert metrics(one_process) == metrics(out)
    summary = json.loads((out / runs.SUMMARY).read_text())
    assert (summary["process_count"], summary["device_count"]) == (2, 2)
    # Started as commands, the processes relaunched with huge pages where that changes something; this process
    # did not: the same numbers either way.
    assert summary["cpu_tuning"]["huge_pages"] == hugepages.in_effect(
        hugepages.relaunch_environ(os.environ, hugepages.kernel_mode()) or os.environ)


def test_mismatched_settings_and_unshared_folders_are_refused(data_dir, tmp_path):
    """One launch whose processes differ in a setting (the seed) and in their --out folder: every process names
    both differences (`distributed.agree` compares each key on its own, so either alone is refused as well) and
    nothing is written."""
    results = finish(launch(data_dir, [tmp_path / "a", tmp_path / "b"], ["--seed", "0"], ["--seed", "1"]))
    for code, _, err in results:
        assert code == 2 and "disagree on their settings: " in err and "Traceback" not in err, err[-2000:]
        # config and run, and data: the seed draws the validation split
        named = err.split("disagree on their settings: ")[1].split(" differ")[0].split(", ")
        assert {"config", "run"} <= set(named), err[-2000:]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_finetune_continues_its_shorter_run_across_processes(tmp_path):
    """Process 0 copies the shorter run's state while the other waits; both then resume it in the new folder.
    The copy and the waits are `loop.fit`'s, the same for every recipe and starting weights, so the cheapest to
    start serve: the frozen-bn recipe (the head trains on cached features: one forward program to compile in each
    process, not the original recipe's training step through the backbone; test_experiments continues the
    original's bit for bit) from a weights file converted here once (each process then reads the converted .npz
    from the cache folder this test's processes share, where --weights random compiled ResNet-18's initialisation
    in both at once). Half data_dir's images (24 training: 3 steps an epoch, still more than one): the copy does
    not depend on them."""
    import torch
    from cifarjax.pretrained import load_weights
    from tests.helpers import randomized_torchvision_resnet18
    data = make_image_folder(tmp_path / "data", n_train=10, n_test=0, learnable=True)
    weights = tmp_path / "resnet18.pth"
    torch.save(randomized_torchvision_resnet18(seed=3).state_dict(), weights)
    load_weights(weights)  # into $CIFARJAX_CACHE, which the processes inherit
    out = tmp_path / "ft"
    results = finish(launch(data, out, "--weights", weights, "--recipe", "frozen-bn", command="finetune",
                            epochs=(1, 2)))
    assert [r[0] for r in results] == [0, 0], results[1][2][-3000:] + results[0][2][-3000:]
    assert json.loads((out / "epochs-2" / runs.SUMMARY).read_text())["continues"] == "epochs-1"
    assert metrics(out / "epochs-2")[:len(metrics(out / "epochs-1"))] == metrics(out / "epochs-1")
