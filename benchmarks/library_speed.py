"""The library against the command: the same SimpleCNN run (real images, `--subset`, a few epochs) trained by
`python -m experiments.cnn` and by a script that calls `cj.tune_process()` then `cj.train_loop`, in alternating
pairs, each in a fresh process; prints each run's training images/s (compilation excluded, as summary.json's) and
the library's ratio to the command.

    python -m benchmarks.library_speed DATA_DIR [--pairs 2] [--subset 4000] [--epochs 2] [--untuned]

`--untuned` leaves out the script's `cj.tune_process()` (the library as it ran before it existed).
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = """import sys
import cifarjax as cj
if {tuned}:
    cj.tune_process()
config = cj.recipe_config("cnn", data_dir=sys.argv[1], subset=int(sys.argv[2]), n_epochs=int(sys.argv[3]))
data = cj.load_dataset(config.data_dir)
train, val = cj.train_val_split(data, config.val_fraction, config.seed, config.subset)
result = cj.train_loop(config.replace(classes=data.classes), train, val, run=sys.argv[4])
print("IMAGES_PER_SECOND", result.images_per_second)
"""


def command_rate(data: str, subset: int, epochs: int, out: Path) -> float:
    subprocess.run([sys.executable, "-m", "experiments.cnn", "--data-dir", data, "--subset", str(subset), "--epochs",
                    str(epochs), "--out", str(out)], check=True, capture_output=True)
    return json.loads((out / "summary.json").read_text())["images_per_second"]


def library_rate(script: Path, data: str, subset: int, epochs: int, out: Path) -> float:
    done = subprocess.run([sys.executable, str(script), data, str(subset), str(epochs), str(out)], check=True,
                          capture_output=True, text=True)
    return float(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("IMAGES_PER_SECOND")))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--subset", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--untuned", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        script = scratch / "library_run.py"
        script.write_text(SCRIPT.format(tuned=not args.untuned))
        for pair in range(args.pairs):
            command = command_rate(args.data_dir, args.subset, args.epochs, scratch / f"command-{pair}")
            library = library_rate(script, args.data_dir, args.subset, args.epochs, scratch / f"library-{pair}")
            print(json.dumps({"pair": pair, "command_images_per_second": round(command, 1),
                              "library_images_per_second": round(library, 1), "tuned": not args.untuned,
                              "library_to_command": round(library / command, 3)}), flush=True)


if __name__ == "__main__":
    main()
