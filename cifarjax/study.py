"""The study of the original's question: why did the fine-tuned ResNet-18 do worse than the small CNN? A grid is
data, `Cell`s of Config changes to the baseline (the original's setting), each a resumable run folder in out/cells/::

    answer = study("DIR", "imagenet", DEFAULT_GRID + (Cell("crop", "augmentation", {"crop_padding": 4}),), epochs=5)

Cells with a fixed backbone share cached features. study.json records from the start the settings every cell shares
and the grid; a resume with others is refused, naming them.
"""
from __future__ import annotations

import json
import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from cifarjax import plots, runs
from cifarjax.augment import AugmentSpec, with_normalization
from cifarjax.checkpoint import find_run
from cifarjax.config import Config
from cifarjax.data import Dataset, Split, fingerprint, load_dataset, train_val_split
from cifarjax.errors import UserError, set_interrupt_advice
from cifarjax.runs import write_json, write_text
from cifarjax.inputs import ImageInputs, backbone_features, cacheable
from cifarjax.loop import Trainer, fine_tune_loop, train_loop
from cifarjax.models import Apply, build_model, init_variables
from cifarjax.phases import Phases
from cifarjax.predictor import evaluate
from cifarjax.pretrained import Weights, starting_weights
from cifarjax.recipes import FrozenChanges, recipe_config
from cifarjax.text import duration, plural

BASELINE = {"bn": "train"}  # the finetune recipe with PyTorch's BatchNorm behaviour: the original's setting
DEFAULT_EPOCHS = 10
STUDY_JSON = "study.json"
# What every cell shares (study.json records it with the weights' SHA-256 and the data's fingerprint), and what the
# SimpleCNN reference shares with the cells: the split it is scored on, and its length.
SHARED = ("n_epochs", "subset", "batch_size", "seed", "weights", "dataset", "decode_size", "val_fraction",
          "eval_batch_size", "classes")
REFERENCE_SHARES = ("n_epochs", "subset", "seed", "val_fraction", "decode_size")


@dataclass(frozen=True)
class Cell(FrozenChanges):
    """One run of a study: a name, the hypothesis it tests, and its Config changes to the baseline."""
    name: str
    hypothesis: str
    changes: Mapping = field(default_factory=dict)  # Config changes relative to the baseline
    model: str = "resnet18"  # 'simple_cnn': the reference, trained with the cnn command's original recipe


H1, H2, H3 = "(1) 32x32 inputs where ImageNet used 224", "(2) only the head trains", "(3) untuned hyperparameters"
H4, H5 = "(4) no ImageNet mean/std normalisation", "(5) the frozen backbone's BatchNorm updates in train mode"
DEFAULT_GRID = (
    Cell("baseline", "the original's setting: 32x32, head only, BatchNorm in train mode, no normalisation, Adam 1e-3"),
    Cell("img224", H1, {"img_size": 224}),
    Cell("unfreeze_layer4", H2, {"unfreeze": "layer4"}),
    Cell("unfreeze_all", H2, {"unfreeze": "all"}),
    Cell("lr_1e-4", H3, {"lr": 1e-4}),
    Cell("lr_1e-2", H3, {"lr": 1e-2}),
    Cell("normalize", H4, {"normalize": "imagenet"}),
    Cell("bn_frozen", H5, {"bn": "frozen"}),
)
REFERENCE = Cell("simple_cnn", "reference: the original's SimpleCNN from scratch", model="simple_cnn")
COMBINED = "combined"


def cell_config(cell: Cell, base: Config) -> Config:
    """The cell's configuration: the baseline with the cell's changes (the reference: the cnn recipe)."""
    if cell.model == "simple_cnn":
        return recipe_config("cnn", "original", **{k: getattr(base, k) for k in (
            "seed", "n_epochs", "batch_size", "eval_batch_size", "data_dir", "dataset", "decode_size", "subset",
            "num_classes", "classes", "conv_impl", "eval_every")}).replace(**cell.changes).validate()
    return base.replace(**cell.changes, norm_mean=None, norm_std=None).validate()


def noise_points(results: Sequence[dict], n_val: int) -> float:
    """Accuracy noise in points: the larger of a difference's sampling error and the last epochs' pooled spread."""
    accs = [r["val_accuracy"] for r in results]
    p = float(np.mean(accs)) if accs else 0.5
    sampling = math.sqrt(2 * p * (1 - p) / max(n_val, 1))
    tails = [np.asarray(r["val_accuracy_per_epoch"][-max(2, len(r["val_accuracy_per_epoch"]) // 4):])
             for r in results if len(r["val_accuracy_per_epoch"]) >= 2]
    spread = float(np.sqrt(np.mean([np.var(t, ddof=1) for t in tails]))) if tails else 0.0
    return 100 * max(sampling, spread)


def verdict(effect: float, noise: float) -> str:
    return "supported" if effect > 2 * noise else "refuted" if effect < -2 * noise else "within noise"


def combined_changes(results: Sequence[dict], noise: float) -> dict:
    """Every single change that helped beyond noise; of alternatives for one setting, the best (the first of ties)."""
    best = {}
    for r in results:
        if r["name"] in ("baseline", COMBINED) or r.get("model") == "simple_cnn" or r["effect_points"] <= 2 * noise:
            continue
        for key, value in r["changes"].items():
            if key not in best or r["effect_points"] > best[key][0]:
                best[key] = (r["effect_points"], value)
    return {k: v for k, (_, v) in best.items()}


@dataclass
class Study:
    """One study: its data, the baseline config, the weights, and where it writes."""
    out: Path
    dataset: Dataset
    train: Split
    val: Split
    base: Config
    weights: Weights
    resume: bool = False
    phases: Phases = field(default_factory=Phases)
    features: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)  # study.json from the start: settings, grid, data_dir, cnn_run

    @property
    def resume_hint(self) -> str:
        """The command that resumes the study, which a Ctrl-C and its cells' errors name."""
        return f"python -m experiments.study --resume --out {shlex.quote(str(self.out))}"

    def advise_resume(self) -> None:
        """What a Ctrl-C between cells' checkpoints leaves: the study, whose finished cells are kept."""
        set_interrupt_advice(f"the study's finished cells are kept: resume it with {self.resume_hint}")

    def folder(self, cell: Cell) -> Path:
        return self.out / "cells" / cell.name

    def finished(self, cell: Cell) -> Optional[dict]:
        path = self.folder(cell) / runs.SUMMARY
        return runs.read_json(path) if self.resume and path.is_file() else None

    def variables(self, cell: Cell, config: Config) -> dict:
        return init_variables(build_model(config), config) if cell.model == "simple_cnn" else \
            starting_weights(config)[0]

    def estimate_seconds(self, cell: Cell, steps: int = 3) -> dict:
        """The cell's {'compilation', 'training'} seconds from each program's first call and `steps` more."""
        config = with_normalization(cell_config(cell, self.base), self.train.images)
        trainer = Trainer(config, Apply(build_model(config)), self.variables(cell, config), self.train, self.val,
                          ImageInputs(AugmentSpec.from_config(config)), run=None, devices=None, host_augment=None,
                          phases=self.phases, resume_hint=self.resume_hint)  # the loop's own program
        parallel, state = trainer.parallel, trainer.parallel.replicate(trainer.state)
        batch = min(config.batch_size, len(self.train) - len(self.train) % parallel.n_devices)
        data = parallel.replicate((self.train.images[:batch], self.train.labels[:batch]))
        idx = parallel.mine(np.arange(batch, dtype=np.int32).reshape(parallel.n_devices, -1))
        seconds = []
        for step in [parallel.train_step] * (steps + 1) + [parallel.eval_step]:  # first calls compile
            start = time.perf_counter()
            out = jax.block_until_ready(step(state, data, idx))
            state = out[0] if len(seconds) <= steps else state  # a training step's new state
            seconds.append(time.perf_counter() - start)
        train_compile, eval_compile, per_image = seconds[0], seconds[-1], sum(seconds[1:-1]) / (steps * batch)
        scorings = 1 + (self.dataset.test is not None)
        if cacheable(config):  # the head then trains on cached features in a negligible time: extraction counts
            return {"compilation": eval_compile * (1 + scorings),
                    "training": per_image * (2 * len(self.train) + len(self.val))}
        return {"compilation": train_compile + eval_compile * scorings,
                "training": per_image * len(self.train) * config.n_epochs}

    def run_cell(self, cell: Cell) -> dict:
        """Train one cell in its own run folder (resuming it when asked) and summarise it."""
        done = self.finished(cell)
        if done is not None:
            return done
        self.advise_resume()  # not the checkpoint of the cell before
        config = with_normalization(cell_config(cell, self.base), self.train.images)
        folder = self.folder(cell)
        if not (self.resume and runs.is_run(folder)):
            runs.RunFolder(folder, "study").create(replace=runs.is_run(folder))
        write_json(folder / runs.CONFIG, config.to_dict())
        start = time.perf_counter()
        variables = self.variables(cell, config)
        common = dict(run=folder, resume=self.resume, phases=self.phases, resume_hint=self.resume_hint, report=False)
        if cell.model == "simple_cnn":
            result = train_loop(config, self.train, self.val, variables, **common)
        else:
            result = fine_tune_loop(config, variables, self.train, self.val,
                                    features=self.shared_features(config, variables), **common)
        summary = {"name": cell.name, "hypothesis": cell.hypothesis, "model": cell.model, "changes": dict(cell.changes),
                   "settings": {k: getattr(config, k) for k in ("img_size", "unfreeze", "bn", "normalize", "lr",
                                                                 "batch_size", "n_epochs", "optimizer")},
                   **result.history.readings(), "val_accuracy_per_epoch": result.history.epoch_val_accuracy,
                   "wall_seconds": round(time.perf_counter() - start, 2),
                   "images_per_second": round(result.images_per_second, 1)}
        if self.dataset.test is not None:
            summary["test_accuracy"] = evaluate(config, result.eval_variables, self.dataset.test)["accuracy"]
        write_json(folder / runs.SUMMARY, summary)
        self.advise_resume()
        return summary

    def shared_features(self, config: Config, variables: dict):
        """Cells whose backbone is fixed and sees the same inputs share one feature extraction."""
        if not cacheable(config):
            return None
        key = (config.img_size, config.norm_mean, config.norm_std, config.weights, config.tta_flip, config.precision)
        if key not in self.features:
            with self.phases("feature_extraction", "extracting backbone features"):
                self.features[key] = backbone_features(config, build_model(config), variables, self.train, self.val)
        return self.features[key]


def run_study(study: Study, grid: Sequence[Cell] = DEFAULT_GRID, reference: Optional[dict] = None,
              train_reference: bool = True, combine: bool = True, announce: Callable = print) -> dict:
    """Run the cells (and the SimpleCNN reference, unless `reference` gives one), then the helpful changes together."""
    cells = list(grid) + ([REFERENCE] if train_reference and reference is None else [])
    estimates = {c.name: study.estimate_seconds(c) for c in cells if study.finished(c) is None}
    if estimates:
        compiling = sum(e["compilation"] for e in estimates.values())
        announce("estimated time per cell (from a short warm-up; training and compilation, evaluation "
                 "excluded): " + ", ".join(f"{k} {duration(sum(v.values()))}" for k, v in estimates.items()) +
                 f"; total {duration(compiling + sum(e['training'] for e in estimates.values()))}, of which "
                 f"compilation {duration(compiling)}")
    results = [study.run_cell(c) for c in cells]
    if reference is not None:
        results.append({**reference, "name": REFERENCE.name, "hypothesis": REFERENCE.hypothesis, "model": "simple_cnn"})
    answer = summarise(study, results)
    extra = combined_changes(answer["cells"], answer["noise_points"]) if combine else {}
    if extra:
        answer = summarise(study, results + [study.run_cell(Cell(COMBINED, "every change that helped, together",
                                                                   extra))])
    if combine:
        answer["combined_changes"] = extra  # empty: no change helped beyond the noise, so nothing to combine
    write_json(study.out / STUDY_JSON, answer)
    write_text(study.out / "study.md", markdown(answer))
    title = f"ResNet-18 fine-tuning study ({answer['weights']})"
    plots.plot_study_effects(answer, study.out / runs.PLOTS / "study.png", title)
    plots.plot_runs({c["name"]: {"val": c["val_accuracy_per_epoch"]} for c in answer["cells"]},
                    study.out / runs.PLOTS / "study_curves.png", f"Validation accuracy per epoch: {title}")
    return answer


def study(data_dir, weights: str = "imagenet", grid: Sequence[Cell] = DEFAULT_GRID, *, epochs: int = DEFAULT_EPOCHS,
          subset: int = 0, out=None, resume: bool = False, overwrite: bool = False, cnn_run=None,
          train_reference: bool = True, combine: bool = True, announce: Callable = print, **baseline) -> dict:
    """A study in one call; `baseline`: Config changes to the baseline, `cnn_run`: an experiments.cnn reference."""
    folder = runs.RunFolder.check(out, "study", overwrite, resume)
    out = folder.path
    phases = Phases(announce=True)
    base = recipe_config("finetune", **{**BASELINE, **baseline}, n_epochs=epochs, subset=subset,
                         **runs.absolute_paths({"data_dir": data_dir, "weights": weights})).validate()  # before loading
    folder.check_outside(base.data_dir)
    with phases("data_loading", "loading the data"):
        dataset = load_dataset(base.data_dir, base.dataset, base.decode_size, base.classes)
        train, val = train_val_split(dataset, base.val_fraction, base.seed, base.subset)
    base = base.replace(classes=tuple(dataset.classes), num_classes=len(dataset.classes)).validate()
    with phases("weights", f"loading weights ({weights})"):
        loaded = starting_weights(base)[1]
    data = fingerprint(dataset)
    settings = {**{k: getattr(base, k) for k in SHARED}, "weights_sha256": loaded.sha256,
                "data_fingerprint": data["sha256"], "data_images": data["images"]}
    cells = [{"name": c.name, "hypothesis": c.hypothesis, "changes": dict(c.changes), "model": c.model} for c in grid]
    settings, planned = json.loads(json.dumps([settings, {"cells": cells, "train_reference": train_reference,
                                                          "combine": combine}]))  # as read back: tuples as lists
    if resume:
        cnn_run = check_resume(out, settings, planned, cnn_run)
    reference_run = None if cnn_run is None else str(find_run(cnn_run).resolve())
    reference = None if reference_run is None else reference_summary(Path(reference_run), base, settings)
    folder.create(replace=overwrite, take_lock=True)  # resuming: only the lock is new
    record = {"settings": settings, "grid": planned, "data_dir": base.data_dir, "cnn_run": reference_run}
    if not (out / STUDY_JSON).is_file():
        write_json(out / STUDY_JSON, record)
    the_study = Study(out, dataset, train, val, base, loaded, resume=resume, phases=phases, record=record)
    the_study.advise_resume()
    if not loaded.pretrained:
        announce("note: --weights random uses no pretraining; the study then tests the pipeline, not the original's "
                 "question")
    return run_study(the_study, grid, reference, train_reference, combine, announce)


def recorded(out) -> dict:
    """study.json's content ({} before it is written)."""
    path = Path(out) / STUDY_JSON
    return runs.read_json(path) if path.is_file() else {}


def check_resume(out: Path, settings: dict, planned: dict, cnn_run) -> Optional[str]:
    """Refuse a resume with other shared settings, cells or reference run than study.json's; returns the reference."""
    record = recorded(out)
    then = record.get("settings") or {}
    differing = [k for k in settings if k in then and k != "data_images" and then[k] != settings[k]]
    if differing:
        shown = {"weights_sha256": lambda v: v[:12] if v else None, "data_fingerprint": lambda v: v[:12]}
        details = ", ".join(f"{k}: {shown.get(k, repr)(then[k])} → {shown.get(k, repr)(settings[k])}"
                            for k in differing)
        if "data_fingerprint" in differing:
            details += (f" ({sum(settings['data_images'].values())} images now, "
                        f"{sum(then.get('data_images', {}).values())} when the study started)")
        raise UserError(f"--resume with settings that differ from the study in {out} ({details}); its cells must "
                        "share them: resume with the study's own settings and data, or start a new study with "
                        "another --out")
    if record.get("grid") and record["grid"] != planned:
        def shown_grid(grid):
            names = [c["name"] for c in grid["cells"]] + (["simple_cnn"] if grid["train_reference"] else [])
            return ", ".join(names) + ("" if grid["combine"] else " (no combined cell)")
        raise UserError(f"--resume with the cells {shown_grid(planned)}; the study in {out} runs "
                        f"{shown_grid(record['grid'])}: resume without --cells (it runs its own), or start a new "
                        "study with another --out")
    if "cnn_run" in record and cnn_run is not None and (now := str(find_run(cnn_run).resolve())) != record["cnn_run"]:
        raise UserError(f"--cnn-run {now} on resume: the study in {out} took its SimpleCNN reference from "
                        f"{record['cnn_run'] or 'a cell it trains itself'}; resume without --cnn-run, or start a new "
                        "study with another --out")
    return record.get("cnn_run", cnn_run)


def reference_summary(run: Path, base: Config, settings: dict) -> dict:
    """The summary of `--cnn-run`, refused unless a SimpleCNN trained on the study's split for as many epochs."""
    config = runs.read_config(run)
    if config.get("model") != "simple_cnn":
        raise UserError(f"--cnn-run {run} is a {config.get('model')} run; the reference is a SimpleCNN: pass the "
                        "--out of an experiments.cnn run, or leave --cnn-run out to train the reference")
    differing = [f"{k}: {config[k]!r} there, {getattr(base, k)!r} here" for k in REFERENCE_SHARES
                 if k in config and config[k] != getattr(base, k)]
    data = (config.get("data_fingerprint") or {}).get("sha256")
    if data and data != settings["data_fingerprint"]:
        differing.append(f"data fingerprint: {data[:12]} there, {settings['data_fingerprint'][:12]} here")
    if differing:
        raise UserError(f"--cnn-run {run} was trained otherwise than the study's cells ({'; '.join(differing)}); "
                        "pass an experiments.cnn run with the study's data, split and --epochs, or leave --cnn-run "
                        "out to train the reference")
    return runs.read_json(run / runs.SUMMARY)


def summarise(study: Study, results: Sequence[dict]) -> dict:
    """study.json's content: each cell with its change against the baseline, the noise, and the verdicts."""
    baseline = next(r for r in results if r["name"] == "baseline")
    noise = noise_points([r for r in results if r.get("model") != "simple_cnn"], len(study.val))
    cells = [{**r, "effect_points": round(100 * (r["val_accuracy"] - baseline["val_accuracy"]), 2)} for r in results]
    for c in cells:
        c["verdict"] = "baseline" if c["name"] == "baseline" else "reference" if c.get("model") == "simple_cnn" else \
            verdict(c["effect_points"], noise)
    return {"folder": str(study.out), "weights": study.weights.description, "pretrained": study.weights.pretrained,
            "imagenet": study.weights.imagenet, "answers_the_question": study.weights.imagenet, **study.record,
            "epochs": study.base.n_epochs, "subset": study.base.subset, "n_train": len(study.train),
            "n_val": len(study.val), "noise_points": round(noise, 2), "cells": cells}


def markdown(answer: dict) -> str:
    """study.md: the weights first, then the table sorted by effect, then one sentence per hypothesis."""
    caveat = "." if answer.get("imagenet", answer["pretrained"]) else (
        ": the original's question is about ImageNet features, so these numbers answer it only as far as these "
        "weights stand in for them." if answer["pretrained"] else ": NO PRETRAINING was used, so these numbers do "
        "not answer the original's question (which is about ImageNet features); they only show the pipeline works.")
    lines = [f"Weights: {answer['weights']}{caveat}", "",
             f"{plural(answer['epochs'], 'epoch')} per cell; {answer['n_train']} training and {answer['n_val']} "
             f"validation images; noise ±{answer['noise_points']:.2f} points (changes beyond twice that count).", "",
             "| cell | tests | validation accuracy | change (points) | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {c['name']} | {c['hypothesis']} | {100 * c['val_accuracy']:.2f}% | {c['effect_points']:+.2f} | "
              f"{c['verdict']} |" for c in sorted(answer["cells"], key=lambda c: -c["effect_points"])]
    lines += ["", "What the numbers say:", ""]
    tested = [c for c in answer["cells"] if c["verdict"] not in ("baseline", "reference") and c["name"] != COMBINED]
    for hypothesis in dict.fromkeys(c["hypothesis"] for c in tested):  # in the cells' order
        cs = [c for c in tested if c["hypothesis"] == hypothesis]
        parts = "; ".join(f"{c['name']} {c['effect_points']:+.2f} points ({c['verdict']})" for c in cs)
        best = max(cs, key=lambda c: c["effect_points"])
        lines.append(f"- {hypothesis}: {parts}. The hypothesis is {best['verdict']}"
                     f"{'' if answer['pretrained'] else ' for these random weights'}.")
    if answer.get("combined_changes") == {}:
        lines.append(f"- No change helped by more than twice the noise, so no `{COMBINED}` cell was run.")
    return "\n".join(lines) + "\n"
