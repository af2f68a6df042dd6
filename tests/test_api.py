"""The public API (`import cifarjax as cj`), its page docs/api.md, and the research example docs/example.py."""
import inspect
import json
import re
import runpy
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import cifarjax
from tests.helpers import ROOT, make_image_folder


# One fresh interpreter for the two import tests (starting one and importing JAX costs about 2 s of CPU), each
# check recorded under its test's name. The order keeps each check's own: `import cifarjax` first, while neither
# torch nor JAX is loaded; then JAX and the libraries that set up their own logging, the state taken, and only then
# the cifarjax modules they import (the lazy names, then every module) - so each of those is still seen.
FRESH = """import asyncio, importlib, json, logging, pkgutil, sys
failed = {}
def check(name, holds, detail):
    if not holds:
        failed.setdefault(name, repr(detail))
import cifarjax
cifarjax.Config, cifarjax.recipe_config, cifarjax.UserError
check('torch_nor_jax', 'torch' not in sys.modules and 'jax' not in sys.modules, sorted(sys.modules))
def state():
    loggers = logging.root.manager.loggerDict.items()
    return (type(asyncio.get_event_loop_policy()), {name: (log.level, list(log.filters))
            for name, log in loggers if isinstance(log, logging.Logger)},
            logging.root.level, list(logging.root.filters), list(logging.root.handlers))
import jax, orbax.checkpoint, flax, optax
before = state()
cifarjax.load_run, cifarjax.train_loop, cifarjax.fine_tune_study, cifarjax.imagenet_resnet18
check('torch_nor_jax', 'torch' not in sys.modules, 'torch')
for module in pkgutil.walk_packages(cifarjax.__path__, 'cifarjax.'):
    importlib.import_module(module.name)
after = state()
changed = {k: (before[1].get(k), v) for k, v in after[1].items() if before[1].get(k, (0, [])) != v}
check('process_state', before[0] == after[0] and not changed and before[2:] == after[2:], (after[0], changed))
from cifarjax.checkpoint import quiet_orbax
quiet_orbax()
check('process_state', type(asyncio.get_event_loop_policy()) is not before[0] and logging.getLogger('absl').filters,
      'quiet_orbax changed nothing')
print(json.dumps(failed))
"""


@pytest.fixture(scope="module")
def fresh_interpreter() -> dict:
    """FRESH's failed checks (name -> what was found), from a fresh interpreter that must exit 0."""
    done = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_import_starts_neither_torch_nor_jax(fresh_interpreter):
    """`import cifarjax` and its light names load neither torch nor JAX; the names that need JAX load no torch."""
    assert "torch_nor_jax" not in fresh_interpreter, fresh_interpreter["torch_nor_jax"]


def test_importing_every_module_leaves_the_process_as_it_was(fresh_interpreter):
    """Importing cifarjax changes no process-wide state: the asyncio policy and the logging configuration stay;
    the commands quiet orbax at their start (`cifarjax.checkpoint.quiet_orbax`)."""
    assert "process_state" not in fresh_interpreter, fresh_interpreter["process_state"]


def test_every_public_name_resolves_with_its_own_docstring():
    modules = {p.stem for p in (ROOT / "cifarjax").glob("*.py")}
    assert not set(cifarjax.__all__) & modules  # importing a submodule would replace such a name by the module
    assert len(set(cifarjax.__all__)) == len(cifarjax.__all__)
    for name in cifarjax.__all__:
        value = getattr(cifarjax, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            doc = value.__dict__.get("__doc__") if inspect.isclass(value) else value.__doc__
            assert doc and not doc.startswith(f"{value.__name__}("), name  # not a dataclass's generated one
    assert cifarjax.fine_tune_study is __import__("cifarjax.study").study.study
    assert "Config" in dir(cifarjax)
    try:
        cifarjax.no_such_name
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


def test_api_page_lists_exactly_the_public_names_in_order():
    page = (ROOT / "docs" / "api.md").read_text()
    listed = re.findall(r"^- `(\w+)` — \S", page, re.M)
    assert listed == cifarjax.__all__


def test_readme_shows_the_research_example():
    readme = (ROOT / "README.md").read_text()
    shown = re.search(r"<!-- research-example -->\s*```python\n(.*?)```", readme, re.S).group(1)
    example = (ROOT / "docs" / "example.py").read_text()
    assert shown == example
    code = [line for line in example.splitlines() if line.strip()]
    assert len(example.splitlines()) <= 20
    imports = [line for line in code if line.startswith(("import", "from"))]
    assert imports == ["import os", "import cifarjax as cj"]  # only `cj.` names
    assert not re.search(r"\bcifarjax\.", example)


@pytest.mark.slow  # compiles SimpleCNN's steps at batch 64
def test_research_example_runs(tmp_path, monkeypatch, capsys):
    """docs/example.py as written, its recipe on XLA's convolution (the example is not about the formulation, and
    the CPU's compiles several times slower)."""
    recipe_config = cifarjax.recipe_config
    monkeypatch.setattr(cifarjax, "recipe_config", lambda *args, **changes: recipe_config(*args, conv_impl="xla",
                                                                                          **changes))
    # 96 training images: one step of the example's batch of 64 an epoch (what is tested is that it runs as written)
    data = make_image_folder(tmp_path / "data", n_train=40, n_test=0, learnable=True)
    image = tmp_path / "my_photo.jpg"
    Image.fromarray(np.full((50, 40, 3), (30, 200, 90), np.uint8)).save(image)  # not the data's size
    for name, value in (("CIFARJAX_DATA", data), ("CIFARJAX_SUBSET", 0), ("CIFARJAX_EPOCHS", 2),
                        ("CIFARJAX_IMAGE", image)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "docs" / "example.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert re.search(r"accuracy \d+\.\d\d% on 24 images", out)  # the validation split of 120 images
    assert re.search(rf"{re.escape(str(image))} \[\('(cat|dog|frog)', 0\.\d+", out)
    run = tmp_path / "runs" / "my-cnn"
    from cifarjax.runs import is_run
    assert (run / "my_training.png").is_file() and is_run(run)  # marked: --overwrite knows its files
    saved = json.loads((run / "config.json").read_text())  # what evaluate and --resume redraw the split from
    assert (saved["data_dir"], saved["subset"], saved["n_epochs"]) == (str(data.resolve()), 0, 2)
    assert len(cifarjax.load_run(run).records()) == 2
    with pytest.raises(cifarjax.UserError, match="already holds a run's checkpoints .* resume=True"):
        runpy.run_path(str(ROOT / "docs" / "example.py"), run_name="__main__")  # never two runs in one folder
