"""The platform seam: which platform a run's programs are built for, whether a process runs on the CPU, and that
the CPU's process settings are a command's start, never an import's."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cifarjax import target
from cifarjax.cpu import process

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("cifarjax", "experiments", "experiments.common", "experiments.cnn", "experiments.finetune",
           "experiments.evaluate", "experiments.study", "experiments.compare", "cifarjax.loop", "cifarjax.cpu.conv",
           "cifarjax.cpu.process")


def test_importing_the_packages_changes_no_environment_variable_and_runs_once():
    """In a fresh process: `import cifarjax, experiments` leaves os.environ as it was, and so does importing the
    commands and the CPU modules (after JAX, which sets two variables of its own when imported); nothing
    re-executes the process (it prints once)."""
    program = ("import os\ne = dict(os.environ)\nimport cifarjax, experiments\nassert dict(os.environ) == e, 'packages'\n"
               "import jax\ne = dict(os.environ)\n"
               f"import {', '.join(MODULES)}\n"
               "changed = {k for k in set(e) | set(os.environ) if e.get(k) != os.environ.get(k)}\n"
               "assert not changed, changed\nprint('imported', os.getpid())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NO_ALBUMENTATIONS_UPDATE",
                                                            "GLIBC_TUNABLES")}
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT,
                            env={**env, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["imported"]


@pytest.mark.parametrize("value, on_cpu", [("cpu", True), ("cpu,cuda", True), ("cuda", False), ("cuda,cpu", False),
                                           ("tpu", False)])
def test_jax_platforms_decides_where_a_process_runs(value, on_cpu):
    assert target.runs_on_cpu({"JAX_PLATFORMS": value}) is on_cpu


def test_without_jax_platforms_an_installed_accelerator_plugin_decides(monkeypatch):
    monkeypatch.setattr(target, "ACCELERATOR_PLUGINS", ("json",))  # a module every Python has: "installed"
    assert not target.runs_on_cpu({})
    monkeypatch.setattr(target, "ACCELERATOR_PLUGINS", ("no_such_plugin_cifarjax",))
    assert target.runs_on_cpu({})


def test_the_platform_resolves_once_from_the_argument_the_environment_or_the_backend():
    assert target.resolve("gpu") == "gpu" and target.resolve("cpu", {target.ENV: "gpu"}) == "cpu"
    assert target.resolve(None, {target.ENV: "gpu"}) == "gpu"
    assert target.resolve(None, {}) == "cpu"  # the tests' backend (JAX_PLATFORMS=cpu)
    with pytest.raises(ValueError, match="platform"):
        target.resolve("cuda")


def test_auto_convolutions_are_the_platforms_choice():
    assert target.conv_impl("auto", "cpu") == "winograd" and target.conv_impl("auto", "gpu") == "xla"
    assert [target.conv_impl(i, "gpu") for i in ("winograd", "im2col", "xla")] == ["winograd", "im2col", "xla"]
    with pytest.raises(ValueError, match="conv impl"):
        target.conv_impl("cudnn", "gpu")


def test_only_the_builders_know_the_platform_and_pass_its_pieces_in():
    """The layers and the steps never name a platform nor import the CPU's package, which imports no model
    module; the builders inject the CPU's pieces, one object per choice (models built alike compare equal, so
    their compiled steps are reused)."""
    from cifarjax.config import Config
    from cifarjax.cpu import conv, donation, fusion
    from cifarjax.models import Formulations, build_model
    from cifarjax.train import donate_state
    for name in ("layers", "train"):
        text = (ROOT / "cifarjax" / f"{name}.py").read_text()
        assert "platform" not in text and "cifarjax.cpu" not in text, name
    for path in (ROOT / "cifarjax" / "cpu").glob("*.py"):
        for line in path.read_text().splitlines():
            module, _, names = line.strip().removeprefix("from ").partition(" import ")
            if line.strip().startswith("from cifarjax") and not module.startswith("cifarjax.cpu"):
                assert module.split(".")[-1] not in ("cifarjax", "layers", "models", "freezing"), (path, line)
                assert not any(n.strip().startswith("_") for n in names.split(",")), (path, line)
    cpu, gpu = (build_model(Config(), platform) for platform in ("cpu", "gpu"))
    assert cpu == build_model(Config(), "cpu") and gpu.formulations == Formulations()
    assert (cpu.formulations.convolve.func, cpu.formulations.conv_pool) == (conv.conv2d, conv.ConvReluMaxPool)
    assert (cpu.formulations.linear, cpu.formulations.keep) == (fusion.dense_transposed_backward, fusion.materialize)
    assert (target.step_factory("cpu"), target.step_factory("gpu")) == (donation.frozen_apart, donate_state)


def test_the_cpu_settings_apply_only_where_the_run_executes_on_the_cpu():
    gpu = {"JAX_PLATFORMS": "cuda"}
    assert not process.tune(environ=gpu) and gpu == {"JAX_PLATFORMS": "cuda"} and process.applied(gpu) is None
    cpu = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert process.tune(environ=cpu)  # started by pytest, not as a command: no relaunch
    applied = process.applied(cpu)
    added = [f"--{k}={v}" for k, v in process.CPU_FLAGS.items()]
    if added[0] in cpu["XLA_FLAGS"]:  # jaxlib versions the flags were measured on
        assert applied["xla_flags"] == added
    assert applied["xla_cpu_scheduler"] == "default" and applied["malloc_trim"] in (True, False)
    assert set(applied) == {"xla_flags", "xla_cpu_scheduler", "huge_pages", "malloc_trim"}


def test_summary_says_what_the_run_was_built_for_and_which_cpu_settings_applied():
    from experiments import common
    env = common.environment()
    assert env["program_platform"] == "cpu" and env["platform"] == "cpu"
    assert env["cpu_tuning"] == process.applied()


def test_deterministic_asks_xla_for_deterministic_gpu_kernels_before_the_backend_starts(monkeypatch, image_folder,
                                                                                        tmp_path):
    """`--deterministic` (a Config field, so config.json records it) adds XLA's flag where the run is on a GPU,
    once, leaving a value the user set alone; on a CPU, nothing."""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    target.deterministic(env), target.deterministic(env)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 --xla_gpu_deterministic_ops=true"
    mine = {"XLA_FLAGS": "--xla_gpu_deterministic_ops=false"}
    target.deterministic(mine)
    assert mine == {"XLA_FLAGS": "--xla_gpu_deterministic_ops=false"}
    from experiments import common
    calls = []
    monkeypatch.setattr(common, "deterministic", lambda: calls.append("deterministic"))
    for on_cpu in (True, False):
        monkeypatch.setattr(common, "runs_on_cpu", lambda: on_cpu)
        args = common.parse("cnn", "test", ["--data-dir", str(image_folder), "--deterministic", "--batch-size", "4",
                                            "--out", str(tmp_path / "run")])
        s = common.start("cnn", args, model="simple_cnn")
        assert s.config.to_dict()["deterministic"] is True
    assert calls == ["deterministic"]
