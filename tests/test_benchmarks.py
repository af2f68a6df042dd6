"""The PyTorch reference the benchmarks and the accuracy verdict rest on runs the original's loop."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import make_image_folder


@pytest.mark.slow
def test_reference_accuracy_prints_one_line_per_epoch(tmp_path, capsys):
    from benchmarks import reference_accuracy
    folder = make_image_folder(tmp_path / "data", n_train=10, n_test=0, learnable=True)
    # No worker processes: forking a process that has started jax can deadlock.
    reference_accuracy.main(["--data-dir", str(folder), "--epochs", "2", "--workers", "0"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (lines[0]["train"], lines[0]["val"]) == (24, 6)  # the 80/20 split cifarjax trains on
    assert [line["epoch"] for line in lines[1:]] == [1, 2]
    assert all(line["val_accuracy"] in [round(k / 6, 4) for k in range(7)] for line in lines[1:])  # of 6 images


@pytest.mark.slow
def test_original_training_learns_a_learnable_set(tmp_path):
    from benchmarks import torch_reference as ref
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(2), 64)
    images = np.clip(rng.integers(0, 256, (128, 32, 32, 3)) // 4 + 128 * labels[:, None, None, None], 0, 255)
    result = ref.original_training(images.astype(np.uint8), labels, images[::4].astype(np.uint8), labels[::4],
                                   epochs=3, workers=0)
    assert len(result["val_accuracies"]) == 3 and result["val_accuracy"] == 1.0


def test_reference_accuracy_rejects_zero_epochs(capsys):
    from benchmarks import reference_accuracy
    with pytest.raises(SystemExit) as exit_info:
        reference_accuracy.main(["--epochs", "0"])
    assert exit_info.value.code == 2 and "--epochs must be at least 1" in capsys.readouterr().err


def test_reference_accuracy_names_a_missing_folder(tmp_path, capsys):
    from benchmarks import reference_accuracy
    with pytest.raises(SystemExit) as exit_info:
        reference_accuracy.main(["--data-dir", str(tmp_path / "nowhere"), "--epochs", "1", "--workers", "0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and "nowhere" in err and "Traceback" not in err


def test_profile_sorts_operations_by_the_model_code_they_came_from():
    from benchmarks.profile import kind_of
    assert kind_of("jit(_fun)/transpose(jvp(ResNet))/backbone/layer1_block0/conv2/dot_general") == \
        ("backward", "convolution")
    assert kind_of("jit(_fun)/jvp(ResNet)/backbone/layer2_block1/bn2/sub") == ("forward", "BatchNorm")
    assert kind_of("jit(_fun)/jvp(ResNet)/backbone/max") == ("forward", "max pool")
    assert kind_of("jit(_fun)/transpose(jvp(ResNet))/backbone/select_n") == ("backward", "max pool")
    assert kind_of("jit(_fun)/jvp(ResNet)/backbone/layer1_block1/jit(relu)/max") == \
        ("forward", "ReLU, residual add, other")
    assert kind_of("jit(_fun)/add") == ("forward", "optimizer and other")


def test_profile_counts_asynchronous_operations_until_their_completion_runs():
    """As XLA's CPU runtime traces them: 'sync' runs inside an Execute that began before it and its marker follows
    it; 'conv' and 'dot' launch (1 ns each), run unseen on the pool, and are done when the Execute that runs what
    waited for them starts (30 and 50: 'dot''s marker is on the other thread). Both in flight 11-30, so they share
    those 19 ns; 'dot' alone 30-50."""
    from benchmarks.profile import op_times, shared_time, threads_busy
    lines = {"a": [("ThunkExecutor::Execute", 0, 12), ("sync", 2, 8), ("end: sync", 8, 8), ("conv", 9, 10),
                   ("dot", 10, 11), ("ThunkExecutor::Execute", 30, 40), ("after_conv", 31, 39),
                   ("end: conv", 40, 40)],
             "b": [("ThunkExecutor::Execute", 50, 60), ("after_dot", 51, 59), ("end: dot", 60, 60)]}
    times, spans = op_times(lines)
    assert times == {"sync": 6, "conv": 1 + 1 + 19 / 2, "dot": 1 + 19 / 2 + 20, "after_conv": 8, "after_dot": 8}
    assert sorted(spans["in flight"]) == [(10, 30), (11, 50)]
    # one lane busy: 'sync', 'conv''s launch, the flights alone, 'after_dot'; two: 'dot''s launch and 'after_conv'
    # while 'dot' is in flight; none: 8-9 and 50-51
    assert threads_busy(spans) == {1: 6 + 1 + 20 + 11 + 8, 2: 1 + 8, 0: 1 + 1}
    assert shared_time([(0, 4, "x"), (2, 6, "y"), (2, 6, "y")]) == \
        {"x": 2 + 2 / 3, "y": 2 * (2 / 3) + 2}  # the union: 6


def test_profile_splits_wall_time_by_busy_threads():
    """Thread a: 0-10 and a nested 2-4 (once); thread b: 5-15; then a gap; a: 20-30."""
    from benchmarks.profile import threads_busy
    busy = threads_busy({"a": [(0, 10), (2, 4), (20, 30)], "b": [(5, 15)]})
    assert busy == {1: 10 + 10, 2: 5, 0: 5}


def test_benchmark_names_the_cpu_and_its_widest_vector_instructions():
    """The ratios against PyTorch depend on AVX-512 (docs/results.md), so a result says which CPU it ran on."""
    from benchmarks.throughput import cpu_description
    zen4 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx avx2 avx512f avx512bw\n\nprocessor\t: 1\n"
    assert cpu_description(zen4) == "AMD EPYC, AVX-512"
    assert cpu_description("model name : Xeon\nflags : sse4_2 avx avx2 fma\n") == "Xeon, AVX2"
    assert cpu_description("model name : Old\nflags : sse2\n") == "Old"
    assert cpu_description("processor : 0\nflags : avx\n").endswith(", AVX")  # no model name: the architecture's


def test_benchmark_times_every_measurement_for_at_least_its_minimum():
    """A 32x32 row's three steps took 0.1 s: the steps are raised until a timing lasts `MIN_SECONDS`."""
    from benchmarks.throughput import steps_lasting
    assert steps_lasting(1.0, batch=64, rate=1920.0, at_least=3) == 30
    assert steps_lasting(1.0, batch=32, rate=13.0, at_least=3) == 3  # 224x224: three steps already take 7 s


def test_benchmark_ratio_pairs_each_rounds_two_sides():
    """Rounds at different machine speeds move both of their sides: three of five rounds at 2.0 make the ratio 2.0,
    where the ratio of the medians would say 1.0."""
    from benchmarks.throughput import paired_ratio
    result = paired_ratio([(200.0, 100.0), (400.0, 200.0), (100.0, 50.0), (90.0, 300.0), (200.0, 400.0)])
    assert result["cifarjax"] == 200.0 and result["pytorch"] == 200.0
    assert result["ratio"] == 2.0 and result["ratio_range"] == [0.3, 2.0]


def test_gpu_sh_part_limits_fit_its_deadline():
    """Every part of benchmarks/gpu.sh can run to its limit and the script still ends within its deadline."""
    script = (Path(__file__).parents[1] / "benchmarks" / "gpu.sh").read_text()
    deadline = int(re.search(r"GPU_SH_SECONDS:-(\d+)", script).group(1))
    limits = [int(cap) for cap in re.findall(r"^(?:part|ft224) \S+ (\d+) ", script, re.MULTILINE)]
    assert len(limits) == 12 and sum(limits) < deadline, (limits, sum(limits), deadline)
