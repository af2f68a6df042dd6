"""Export a trained ResNet-18 run as a torchvision state_dict (.pth).

    python -m experiments.export RUN OUT.pth

`torchvision.models.resnet18(num_classes=N).load_state_dict(torch.load(OUT.pth, weights_only=True), strict=True)`
takes the file (N: the run's classes, printed), and in `model.eval()` gives the run's probabilities on the run's
preprocessed input (its image size, [0, 1] scaling and normalisation). The weights are those the run evaluates
with: its moving average where it kept one (`--no-average`: the final weights). A SimpleCNN run is refused.
"""
from __future__ import annotations

import argparse

from experiments import common
from cifarjax.errors import exit_on_user_error
from cifarjax.export import export_torchvision
from cifarjax.flags import Parser
from cifarjax.predictor import load_run


@exit_on_user_error
def main(argv=None) -> None:
    p = Parser(prog="python -m experiments.export", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a finished or interrupted ResNet-18 run (one epochs-N folder of a multi-length "
                                   "fine-tune)")
    p.add_argument("out", help="the .pth file to write (never an existing file)")
    p.add_argument("--average", action=argparse.BooleanOptionalAction, default=None,
                   help="export the moving average of the weights (default: when the run kept one)")
    args = p.parse_args(argv)
    run = load_run(args.run_dir, average=args.average)
    path = export_torchvision(run, args.out)
    classes = ",".join(map(str, run.classes))
    print(f"{path}: torchvision resnet18(num_classes={len(run.classes)}) state_dict, classes {classes} in this "
          f"order; {run.description}")


if __name__ == "__main__":
    common.launch(main)
