"""--seeds: one experiment once per seed into one folder, reported as mean ± sd; resumed and compared as one."""
import json
import statistics

import pytest

from cifarjax import runs
from experiments import cnn, compare, seeds
from tests.helpers import make_image_folder


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A SimpleCNN run with --seeds 0 1 (one epoch each, the plain convolution: what is tested is the seeding)."""
    root = tmp_path_factory.mktemp("seeds")
    data = make_image_folder(root / "data", n_train=20, n_test=0, learnable=True)
    out = root / "run"
    cnn.main(["--data-dir", str(data), "--epochs", "1", "--batch-size", "8", "--conv-impl", "xla", "--seeds", "0", "1",
              "--out", str(out)])
    return out


def test_each_seed_is_a_whole_run_and_the_summary_is_their_mean_and_sd(seeded):
    summaries = [json.loads((seeded / f"seed-{s}" / runs.SUMMARY).read_text()) for s in (0, 1)]
    assert [runs.read_config(seeded / f"seed-{s}")["seed"] for s in (0, 1)] == [0, 1]
    assert all(s["command"].endswith(f"--seed {i} --out {seeded / f'seed-{i}'}") and "--seeds" not in s["command"]
               for i, s in enumerate(summaries))
    summary = json.loads((seeded / runs.SUMMARY).read_text())
    values = [s["val_accuracy"] for s in summaries]
    stats = summary["mean_sd"]["1 epochs"]["val_accuracy"]
    assert stats == {"mean": statistics.fmean(values), "sd": statistics.stdev(values), "n": 2}
    assert (seeded / runs.PLOTS / "seeds.png").is_file() and runs.is_run(seeded)


def test_resume_continues_every_seed_and_keeps_the_commands(seeded, capsys):
    cnn.main(["--resume", "--out", str(seeded)])
    out = capsys.readouterr().out
    assert "2 seeds: 1 epochs: validation accuracy" in out and "(mean ± sd over the seeds)" in out
    commands = json.loads((seeded / runs.SUMMARY).read_text())["commands"]
    assert "--seeds 0 1" in commands[0] and commands[1].endswith(f"--resume --out {seeded}")


def test_compare_shows_the_seeds_as_one_row_of_mean_and_sd(seeded, tmp_path, capsys):
    compare.main([str(seeded), str(seeded / "seed-0"), "--out", str(tmp_path / "cmp.png")])
    rows = capsys.readouterr().out.splitlines()
    assert rows[2].startswith("run (2 seeds)") and "±" in rows[2] and "±" not in rows[3]
    assert (tmp_path / "cmp.png").is_file()


def test_one_seed_command_and_refusals(capsys):
    line = seeds.one_seed_command("python -m experiments.cnn --seeds 0 1 2 --epochs 3 --out=x --seed=9", 1, "x/seed-1")
    assert line == "python -m experiments.cnn --epochs 3 --seed 1 --out x/seed-1"
    for extra, message in ((["--seeds", "0", "--seed", "3"], "--seed and --seeds contradict"),
                           (["--seeds", "1", "1"], "--seeds takes distinct seeds")):
        with pytest.raises(SystemExit):
            cnn.main(["--dataset", "fake", *extra])
        assert message in capsys.readouterr().err


def test_the_library_runs_over_seeds_and_reports_mean_and_sd():
    import cifarjax as cj
    from cifarjax.loop import History

    class Result:
        def __init__(self, seed):
            self.history = History([{"epoch": 1.0, "epoch_end": True, "val_accuracy": 0.5 + seed / 10}])
    summary = cj.over_seeds(Result, [0, 1, 2])
    assert sorted(summary["results"]) == [0, 1, 2]
    assert summary["mean_sd"]["val_accuracy"] == pytest.approx({"mean": 0.6, "sd": 0.1, "n": 3})
    assert cj.mean_sd([2.0]) == {"mean": 2.0, "sd": 0.0, "n": 1}
