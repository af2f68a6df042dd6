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


def runs_cleanly(program: str) -> None:
    """`program` in a fresh interpreter exits 0 (its failed assert's message shown otherwise)."""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_import_starts_neither_torch_nor_jax():
    program = ("import sys, cifarjax\n"
               "cifarjax.Config, cifarjax.recipe_config, cifarjax.UserError\n"
               "assert 'torch' not in sys.modules and 'jax' not in sys.modules, sorted(sys.modules)\n"
               "cifarjax.load_run, cifarjax.train_loop, cifarjax.fine_tune_study, cifarjax.imagenet_resnet18\n"
               "assert 'torch' not in sys.modules\n")
    runs_cleanly(program)


def test_importing_every_module_leaves_the_process_as_it_was():
    """Importing cifarjax changes no process-wide state: the asyncio policy and the logging configuration stay;
    the commands quiet orbax at their start (`cifarjax.checkpoint.quiet_orbax`)."""
    program = ("import asyncio, importlib, logging, pkgutil, cifarjax\n"
               "def state():\n"
               "    loggers = logging.root.manager.loggerDict.items()\n"
               "    return (type(asyncio.get_event_loop_policy()), {name: (log.level, list(log.filters))\n"
               "            for name, log in loggers if isinstance(log, logging.Logger)},\n"
               "            logging.root.level, list(logging.root.filters), list(logging.root.handlers))\n"
               "import jax, orbax.checkpoint, flax, optax\n"
               "before = state()\n"
               "for module in pkgutil.walk_packages(cifarjax.__path__, 'cifarjax.'):\n"
               "    importlib.import_module(module.name)\n"
               "after = state()\n"
               "changed = {k: (before[1].get(k), v) for k, v in after[1].items() if before[1].get(k, (0, [])) != v}\n"
               "assert before[0] == after[0] and not changed and before[2:] == after[2:], (after[0], changed)\n"
               "from cifarjax.checkpoint import quiet_orbax\n"
               "quiet_orbax()\n"
               "assert type(asyncio.get_event_loop_policy()) is not before[0] and logging.getLogger('absl').filters\n")
    runs_cleanly(program)


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
    data = make_image_folder(tmp_path / "data", n_train=120, n_test=0, learnable=True)
    image = tmp_path / "my_photo.jpg"
    Image.fromarray(np.full((50, 40, 3), (30, 200, 90), np.uint8)).save(image)  # not the data's size
    for name, value in (("CIFARJAX_DATA", data), ("CIFARJAX_SUBSET", 0), ("CIFARJAX_EPOCHS", 2),
                        ("CIFARJAX_IMAGE", image)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "docs" / "example.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert re.search(r"accuracy \d+\.\d\d% on 72 images", out)  # the validation split of 360 images
    assert re.search(rf"{re.escape(str(image))} \[\('(cat|dog|frog)', 0\.\d+", out)
    run = tmp_path / "runs" / "my-cnn"
    from cifarjax.runs import is_run
    assert (run / "my_training.png").is_file() and is_run(run)  # marked: --overwrite knows its files
    saved = json.loads((run / "config.json").read_text())  # what evaluate and --resume redraw the split from
    assert (saved["data_dir"], saved["subset"], saved["n_epochs"]) == (str(data.resolve()), 0, 2)
    assert len(cifarjax.load_run(run).records()) == 2
    with pytest.raises(cifarjax.UserError, match="already holds a run's checkpoints .* resume=True"):
        runpy.run_path(str(ROOT / "docs" / "example.py"), run_name="__main__")  # never two runs in one folder
