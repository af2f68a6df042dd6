"""Classify your own images with a finished run: each image's most probable classes.

    python -m experiments.predict RUN IMAGE_OR_FOLDER ... [--top K] [--json]

Images are read as the run's data was (any mode to 8-bit RGB, resized to its decode size) and seen through its
evaluation view (its img_size, normalisation and test-time flips), with the weights it is scored with (the
moving average where it kept one). Folders are searched, subfolders included, for image files. An image that
cannot be read is reported in one `warning:` line on stderr and the others are still classified; the exit status
is 0 when at least one image was classified (--json lists the unreadable ones), 2 when none was.
"""
from __future__ import annotations

import json
import os

from experiments import common
from cifarjax.errors import UserError, exit_on_user_error, warn
from cifarjax.flags import Parser
from cifarjax.predictor import image_files, load_run
from cifarjax.sources import IMAGE_EXTENSIONS
from cifarjax.text import printable

CHUNK = 2048  # images decoded and classified at a time, so a large folder needs little memory


def parser() -> Parser:
    p = Parser(prog="python -m experiments.predict", description=__doc__.splitlines()[0])
    p.add_argument("run", metavar="RUN",
                   help="the --out folder of a cnn or finetune run (one sub-run of a multi-length finetune)")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders holding them")
    p.add_argument("--top", type=int, default=3, metavar="K", help="how many classes to show per image (default: 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def table(rows, k: int) -> str:
    """One line per image: its path, then its `k` most probable classes with their probabilities."""
    cells = [[path] + [f"{name} {100 * p:5.1f}%" for name, p in top] for path, top in rows]
    header = ["image"] + [f"top {i + 1}" for i in range(k)]
    widths = [max(len(row[i]) for row in [header] + cells) for i in range(k + 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header] + cells)


@exit_on_user_error
def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    run = load_run(args.run)
    skipped = []
    files = image_files(args.images, report=skipped.append)
    if not files:  # one error line, no warnings before it
        if not any(os.path.exists(path) for path in args.images):
            raise UserError(f"{', '.join(args.images)}: no such file or folder; pass image files or folders")
        raise UserError(f"no images to classify in {', '.join(args.images)}; pass image files or folders holding "
                        f"{', '.join(IMAGE_EXTENSIONS)} files")
    for message in skipped:
        warn(message)
    k = min(args.top, len(run.classes))
    rows, unreadable = [], []
    for start in range(0, len(files), CHUNK):
        chunk = [str(f) for f in files[start:start + CHUNK]]
        predicted = run.predict_files(chunk, skip_unreadable=True)
        rows += [(printable(path), run.top(p, k)) for path, p in predicted.items()]  # names not UTF-8: escaped
        unreadable += [printable(path) for path in chunk if path not in predicted]
    if not rows:
        raise UserError(f"none of the {len(files)} image(s) could be read (see the warnings above); pass image files "
                        "Pillow can open")
    if args.json:
        print(json.dumps({"run": str(run.path), "weights": run.weights, "epochs_trained": run.epochs,
                          "started_from": run.started_from, "tta_flip": run.config.tta_flip,
                          "predictions": [{"path": path, "top": [{"class": c, "probability": p} for c, p in top]}
                                          for path, top in rows],
                          "unreadable": unreadable}))
        return
    print(f"{run.path} ({run.description}{', test-time flips' if run.config.tta_flip else ''})\n{table(rows, k)}")


if __name__ == "__main__":
    common.launch(main)
