#!/usr/bin/env bash
# The stand-in backbone (docs/results.md#the-stand-in-backbone): ImageNet weights cannot be had on these machines,
# so the transfer path is measured on a ResNet-18 that cifarjax pretrains on five CIFAR-10 classes and exports to
# torchvision, fine-tuned on the other five. Every output says its weights are not ImageNet's.
#   bash benchmarks/standin.sh DATA_DIR OUT        (DATA_DIR: the unpacked cifar10-jpeg folder; hours on 2 cores)
set -euo pipefail
D=${1:?data folder}; S=${2:?output folder}
SOURCE=airplane,automobile,bird,cat,deer; TARGET=dog,frog,horse,ship,truck
mkdir -p "$S"
python -m experiments.finetune --data-dir "$D" --classes $SOURCE --weights random --unfreeze all --epochs 15 \
    --crop-padding 4 --optimizer adamw --weight-decay 0.05 --schedule onecycle --lr 2e-3 --warmup-epochs 3 \
    --out "$S/pretrain"
python -m experiments.export "$S/pretrain" "$S/standin5.pth"
python - "$S" <<'PY'  # the exported file in torchvision against the run, on 1,000 of its validation images
import sys
import numpy as np, torch, torchvision
import cifarjax as cj
run = cj.load_run(f"{sys.argv[1]}/pretrain")
_, val = cj.train_val_split(cj.load_dataset(run.config.data_dir, classes=run.config.classes), run.config.val_fraction,
                            run.config.seed)
images, labels = val.images[:1000], val.labels[:1000]
model = torchvision.models.resnet18(num_classes=len(run.classes))
model.load_state_dict(torch.load(f"{sys.argv[1]}/standin5.pth", weights_only=True), strict=True)
with torch.no_grad():
    theirs = torch.softmax(model.eval()(torch.from_numpy((images / np.float32(255)).transpose(0, 3, 1, 2))), -1).numpy()
ours = run.predict(images)
print(f"max |probability difference| {np.abs(ours - theirs).max():.2g}; same top class "
      f"{(ours.argmax(1) == theirs.argmax(1)).mean():.3f}; accuracy {(ours.argmax(1) == labels).mean():.3f} "
      f"(cifarjax), {(theirs.argmax(1) == labels).mean():.3f} (torchvision)")
PY
for weights in "$S/standin5.pth" random; do
    name=$([ "$weights" = random ] && echo random || echo standin)
    python -m experiments.finetune --data-dir "$D" --classes $TARGET --weights "$weights" --recipe frozen-bn \
        --out "$S/${name}_frozenbn"
done
python -m experiments.finetune --data-dir "$D" --classes $TARGET --weights "$S/standin5.pth" --out "$S/standin_original"
python -m experiments.finetune --data-dir "$D" --classes $TARGET --weights random --epochs 20 --out "$S/random_original"
python -m experiments.study --data-dir "$D" --classes $TARGET --weights "$S/standin5.pth" --subset 2000 --epochs 4 \
    --out "$S/study"
