"""Test set-up: two simulated CPU devices (before jax initialises), and shared tiny-data fixtures."""
import atexit
import functools
import os
import shutil
import tempfile
import traceback

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CPU's XLA flags, as a command running on the CPU adds them at its start (`cifarjax.cpu.process`).
from cifarjax.cpu.process import add_cpu_flags  # noqa: E402

add_cpu_flags()
from cifarjax.checkpoint import quiet_orbax  # noqa: E402 - and orbax quieted, as a command does at its start

quiet_orbax()
# One persistent compilation cache for the session, shared with the subprocesses tests start: the suite
# compiles each program once, not once per process.
# pytest-xdist's workers inherit the folder from the session that started them, which removes it at the end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cifarjax-test-jit-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")  # the programs worth sharing

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.register_assert_rewrite("tests.helpers")  # its asserts (`fails`) explain their failures as a test's do
from tests.helpers import make_image_folder  # noqa: E402


# The longest files first (their summed test times in the suite, 2026-12-07), so that with pytest-xdist (`-n 2 --dist
# loadfile --no-loadscope-reorder`, as .ci/run; by default xdist orders files by their number of tests, which put the
# 114 s of test_distributed's four last) no worker starts a long file while the other has nothing left: order changes
# nothing else, every test makes its own state.
LONGEST_FIRST = ("test_models.py", "test_distributed.py", "test_trust.py", "test_train.py", "test_standin.py",
                 "test_binding.py", "test_checkpoint.py", "test_experiments.py", "test_pretrained.py",
                 "test_reliability.py", "test_study.py", "test_precision.py", "test_recipes.py", "test_gpu_program.py",
                 "test_steps_per_call.py", "test_outputs.py", "test_predict.py", "test_api.py", "test_cpu_xla_flags.py",
                 "test_shard_map.py", "test_seeds.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files keep their own order


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cifarjax cache folder."""
    monkeypatch.setenv("CIFARJAX_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def image_folder(tmp_path):
    """A tiny ImageFolder tree: 3 classes x 12 train images, 3 x 4 test images, 32x32 RGB PNG."""
    return make_image_folder(tmp_path / "data", classes=("cat", "dog", "frog"), n_train=12, n_test=4)


@pytest.fixture
def data_dir(tmp_path):
    """A learnable ImageFolder tree for the commands: 3 classes x 20 train images, 3 x 6 test images."""
    return make_image_folder(tmp_path / "data", n_train=20, n_test=6, learnable=True)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Release each module's compiled programs after it, so memory stays flat over the suite (programs that
    later modules reuse come back from the persistent compilation cache)."""
    yield
    import ctypes
    import gc

    import jax

    from cifarjax import inputs, models, train
    for cached in (train._pmapped, inputs._extractor, models._jitted_init):
        cached.cache_clear()
    jax.clear_caches()
    gc.collect()
    try:  # hand freed memory back, so the suite's peak is its largest module, not their sum
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


@functools.lru_cache(maxsize=None)
def _broken_torch():
    """torchlib's one-line message when torch or torchvision cannot be imported (a mismatched pair), else None."""
    from cifarjax import torchlib
    from cifarjax.errors import UserError
    try:
        torchlib.load("torchvision")
    except UserError as error:
        return str(error)
    return None


def _skip_if_torch_is_broken(error: BaseException) -> None:
    """A test that failed inside an import of torch or torchvision, where that import is broken, skips with the
    fix instead of failing with the import's traceback."""
    frames = traceback.extract_tb(error.__traceback__)
    inside = any(f"{os.sep}torch" in frame.filename for frame in frames) or "cannot import torch" in str(error)
    if inside and _broken_torch():
        pytest.skip(f"needs torch and torchvision: {_broken_torch()}")


@pytest.hookimpl(wrapper=True)
def _skipping_where_torch_is_broken(item):
    try:
        return (yield)
    except Exception as error:  # noqa: BLE001 - re-raised unless torch's import is what broke
        _skip_if_torch_is_broken(error)
        raise


pytest_runtest_setup = pytest_runtest_call = _skipping_where_torch_is_broken  # a fixture's set-up and the test
