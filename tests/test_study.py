"""The study command: a tiny grid end to end, resume, honest labelling, and the default grid's definition."""
import json

import pytest

from cifarjax.recipes import recipe_config
from cifarjax.study import BASELINE, DEFAULT_GRID, cell_config, combined_changes, verdict
from experiments import study
from tests.helpers import make_image_folder

# The setting each default cell's name says it changes.
NAMED = {"img224": "img_size", "unfreeze_layer4": "unfreeze", "unfreeze_all": "unfreeze", "lr_1e-4": "lr",
         "lr_1e-2": "lr", "normalize": "normalize", "bn_frozen": "bn"}


def test_every_default_cell_changes_exactly_the_setting_it_names():
    base = recipe_config("finetune", **BASELINE, n_epochs=1).validate()
    assert (base.img_size, base.unfreeze, base.bn, base.normalize, base.lr, base.batch_size) == \
        (32, "head", "train", "none", 1e-3, 64)  # the original's setting
    for cell in DEFAULT_GRID:
        config = cell_config(cell, base).to_dict()
        differing = {k for k, v in base.to_dict().items() if config[k] != v}
        assert differing == (set() if cell.name == "baseline" else {NAMED[cell.name]}), cell.name


def test_verdicts_and_the_combination():
    assert [verdict(e, 1.0) for e in (3.0, -2.5, 1.5)] == ["supported", "refuted", "within noise"]
    cells = [{"name": "baseline", "changes": {}, "effect_points": 0},
             {"name": "unfreeze_layer4", "changes": {"unfreeze": "layer4"}, "effect_points": 5},
             {"name": "unfreeze_all", "changes": {"unfreeze": "all"}, "effect_points": 9},
             {"name": "lr_1e-2", "changes": {"lr": 1e-2}, "effect_points": -4},
             {"name": "normalize", "changes": {"normalize": "imagenet"}, "effect_points": 0.5}]
    assert combined_changes(cells, noise=1.0) == {"unfreeze": "all"}


@pytest.mark.slow
def test_a_tiny_study_end_to_end_then_resume_skips_finished_cells(tmp_path, capsys):
    # 24 training images (3 steps an epoch) and 6 validation images: each cell still trains and scores its epochs,
    # and nothing checked here depends on the number of images.
    data = make_image_folder(tmp_path / "data", n_train=10, n_test=4, learnable=True)
    out = tmp_path / "study"
    args = ["--data-dir", str(data), "--weights", "random", "--epochs", "2", "--batch-size", "8", "--conv-impl", "xla",
            "--cells", "bn_frozen", "simple_cnn", "--out", str(out)]
    study.main(args)
    printed = capsys.readouterr().out
    assert "estimated time per cell" in printed and "of which compilation" in printed and "no pretraining" in printed
    answer = json.loads((out / "study.json").read_text())
    assert {c["name"] for c in answer["cells"]} == {"baseline", "bn_frozen", "simple_cnn"}
    assert answer["pretrained"] is False and answer["answers_the_question"] is False
    for c in answer["cells"]:
        assert {"hypothesis", "settings", "val_accuracy_per_epoch", "val_accuracy", "best_val_accuracy",
                "effect_points", "test_accuracy", "wall_seconds", "images_per_second", "verdict"} <= set(c)
        assert (out / "cells" / c["name"] / "summary.json").is_file()
        assert c["images_per_second"] > 0  # each cell's own rate, also when one call trained every step
    markdown = (out / "study.md").read_text().splitlines()
    assert "NO PRETRAINING" in markdown[0] and "do not answer the original's question" in markdown[0]
    assert sum(line.startswith("| ") for line in markdown) == 4  # header and 3 cells
    assert any(line.startswith("- (5)") for line in markdown)
    for plot in ("study.png", "study_curves.png"):
        assert (out / "plots" / plot).stat().st_size > 10_000
    before = (out / "study.json").read_bytes()
    cell_files = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*") if p.is_file()}
    study.main(args + ["--resume"])
    assert "estimated time" not in capsys.readouterr().out  # nothing left to train
    assert (out / "study.json").read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*") if p.is_file()} == cell_files  # no cell ran


def test_unknown_cells_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        study.main(["--cells", "bigger_model", "--out", str(tmp_path / "s")])
    assert exit_info.value.code == 2 and "unknown cell(s) bigger_model" in capsys.readouterr().err


def test_a_cells_estimate_includes_its_compilation(monkeypatch):
    """The estimate said "total 5 s" for a run of 179 s: compilation, most of a small cell's time, was left
    out. A training step whose first call takes 0.5 s more (as compiling does) must add at least that."""
    import time

    import numpy as np

    from cifarjax.data import Dataset, Split
    from cifarjax import loop
    from cifarjax.study import REFERENCE, Study
    from cifarjax.train import DataParallel
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), np.arange(16, dtype=np.int32) % 3)
    base = recipe_config("finetune", **BASELINE, n_epochs=1, batch_size=8, conv_impl="xla", num_classes=3,
                         classes=("a", "b", "c")).validate()
    the_study = Study(None, Dataset("folder", base.classes, split, None), split, split, base, "random")
    calls = []

    class SlowFirstCall(DataParallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            real = self.train_step

            def train_step(*step_args):
                calls.append(1)
                if len(calls) == 1:
                    time.sleep(0.5)
                return real(*step_args)
            self.train_step = train_step
    monkeypatch.setattr(loop, "DataParallel", SlowFirstCall)  # the loop's Trainer builds the steps timed
    estimate = the_study.estimate_seconds(REFERENCE)
    assert set(estimate) == {"compilation", "training"} and estimate["compilation"] >= 0.5


def test_resume_runs_the_cells_the_study_was_started_with(tmp_path, capsys, monkeypatch):
    """`--cells lr_1e-4 lr_1e-2`, interrupted, then `--resume --out STUDY` ran the whole default grid and the
    combined cell: study.json records the grid from the start, and resume runs exactly it."""
    from types import SimpleNamespace

    from cifarjax import study as study_module
    ran = []

    class Interrupted(Exception):
        pass

    def interrupted(the_study, grid, reference, train_reference, combine, announce):
        ran.append(([c.name for c in grid], train_reference, combine))
        raise Interrupted
    monkeypatch.setattr(study_module, "run_study", interrupted)
    monkeypatch.setattr(study_module, "starting_weights",  # what the study records of its weights, not built
                        lambda config: (None, SimpleNamespace(sha256=None, pretrained=True)))
    data = make_image_folder(tmp_path / "data", n_train=4, n_test=0)
    out = tmp_path / "study"
    with pytest.raises(Interrupted):
        study.main(["--data-dir", str(data), "--weights", "random", "--epochs", "1", "--cells", "lr_1e-4", "lr_1e-2",
                    "--out", str(out)])
    with pytest.raises(Interrupted):
        study.main(["--resume", "--out", str(out)])
    assert ran == [(["baseline", "lr_1e-4", "lr_1e-2"], False, False)] * 2
    with pytest.raises(SystemExit) as exit_info:
        study.main(["--resume", "--out", str(out), "--cells", "bn_frozen"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--resume with the cells baseline, bn_frozen (no combined cell); the " \
        "study in" in err and "runs baseline, lr_1e-4, lr_1e-2 (no combined cell): resume without --cells" in err
