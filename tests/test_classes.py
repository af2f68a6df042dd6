"""Class subsets as a setting: --classes on the commands, classes and num_classes kept together in a Config."""
import json

import pytest

from cifarjax.config import Config
from cifarjax.errors import UserError
from experiments import cnn, evaluate
from tests.helpers import cnn_args, fails, make_image_folder


def test_a_config_derives_num_classes_from_classes_and_refuses_a_mismatch():
    assert Config().num_classes == 10 and Config(classes=("a", "b", "c")).num_classes == 3
    assert Config().replace(classes=("bird", "cat", "dog")).num_classes == 3
    with pytest.raises(UserError, match=r"classes names 3 classes \(a, b, c\) but num_classes is 10"):
        Config(classes=("a", "b", "c"), num_classes=10).validate()


def test_classes_train_on_those_classes_and_bind_the_run(tmp_path, capsys):
    """Three of four classes: the run's programs are those of the other commands' runs on three classes."""
    data = make_image_folder(tmp_path / "data", classes=("bird", "cat", "dog", "frog"), n_train=20, n_test=6,
                             learnable=True)
    out = tmp_path / "run"
    cnn.main(cnn_args(data, out, "--classes", "frog,cat,dog"))
    config = json.loads((out / "config.json").read_text())
    assert config["classes"] == ["frog", "cat", "dog"] and config["num_classes"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] + summary["n_val"] == 60  # the bird images are not used
    capsys.readouterr()
    error = fails(cnn.main, ["--resume", "--out", str(out), "--classes", "cat,dog"], capsys)
    assert "classes: ('frog', 'cat', 'dog') → ('cat', 'dog')" in error
    evaluate.main([str(out), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and set(result["per_class"]) == {"frog", "cat", "dog"} and result["n"] == 18
    assert "no class 'cow' in this data" in fails(cnn.main, cnn_args(data, tmp_path / "r2", "--classes", "cat,cow"),
                                                  capsys)
    assert not (tmp_path / "r2").exists()
