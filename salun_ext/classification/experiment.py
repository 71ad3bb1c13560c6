"""`reproduce`: methods x seeds x forgetting scenarios -> the paper's Table 1 and Figure 1 for any dataset.

    config = ExperimentConfig(dataset="digits", ratios=[0.1, 0.5], seeds=[1, 2, 3])
    summary = reproduce(config)            # writes runs/..., prints the table

Per seed: one original model (trained on the training split), then per scenario (random p% or class-wise) the
seeded forget set, Retrain, and every method started from the original weights. Every finished piece is a file
(original/seed*/model.safetensors, runs/<scenario>/seed*/<method>/result.json) carrying a fingerprint of what
produced it; `resume=True` reuses the pieces whose fingerprint matches and continues an interrupted training from
its Engine checkpoint. Hyperparameter sweeps (`sweeps=`) run on `tune_seeds` only, which must differ from the
evaluation seeds; the best value per scenario (lowest Avg. Gap to Retrain) is then used for the evaluation.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from salun_ext.classification.evaluation import extra_mia_table, markdown_table, plot_gaps, summarize
from salun_ext.classification.methods.base import UnlearnData
from salun_ext.classification.methods.finetune import OriginalTrainConfig
from salun_ext.classification.presets import preset_for
from salun_ext.classification.protocols import get_protocol
from salun_ext.classification.registry import PAPER_METHODS, get_method, method_key
from salun_ext.classification.workflows import OriginalData, train_original, unlearn_and_evaluate
from salun_ext.data import UnlearningSplit, class_balanced_subset, dataset_key, load_dataset, resolve_augment
from salun_ext.data.splits import make_unlearning_split
from salun_ext.models import ModelSpec, load_classifier, save_classifier
from salun_ext.train import RunOptions
from salun_ext.utils import OutputFolder, UsageError, resolve_device, write_json


@dataclasses.dataclass
class ExperimentConfig:
    """Everything `reproduce` does.

    Hyperparameters: method defaults (the paper) < preset < method_overrides < values tuned by `sweeps`.
    """

    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    model: str | None = None  # None: the preset's (small_cnn for digits / Fashion-MNIST, resnet18 otherwise)
    model_options: dict[str, Any] | None = None
    methods: list[str] = dataclasses.field(default_factory=lambda: list(PAPER_METHODS))
    ratios: list[float] = dataclasses.field(default_factory=lambda: [0.1, 0.5])
    forget_classes: list[int] | None = None  # adds a class-wise scenario
    seeds: list[int] = dataclasses.field(default_factory=lambda: [1])
    split_seed: int = 2
    val_fraction: float = 0.1
    train_subset: int | None = None  # a class-balanced subset of the official training set (None: all of it)
    subset_seed: int = 0
    batch_size: int | None = None  # None: the preset's (256 otherwise)
    augment: str = "auto"  # "auto" (the dataset's default), "none", "crop_flip"
    original: dict[str, Any] = dataclasses.field(default_factory=dict)  # OriginalTrainConfig overrides
    method_overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    preset: str | None = "auto"  # "auto": the dataset's preset; a preset name; None / "none": the paper's values
    tune_seeds: list[int] = dataclasses.field(default_factory=list)
    sweeps: dict[str, dict[str, list[Any]]] = dataclasses.field(default_factory=dict)  # method -> {param: values}
    mia_shadow_size: int | None = None
    save_models: bool = False
    protocol: str = "default"  # "paper": the paper code's behaviours (salun_ext/classification/protocols.py)
    out_dir: str | None = None  # None: runs/reproduce-<dataset>-<timestamp>
    # how every piece runs (device, precision, progress, resume); each run's seed and checkpoints are set per piece
    run: RunOptions = dataclasses.field(default_factory=RunOptions)
    verbose: bool = True


# ------------------------------------------------------------------------------------------------ helpers
def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def scenario_name(ratio: float | None = None, classes: Sequence[int] | None = None) -> str:
    if classes is not None:
        return f"class {','.join(str(c) for c in classes)}"
    return f"random {100 * ratio:g}%"


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_")


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{platform.machine()} CPU, {os.cpu_count()} core(s), {torch.get_num_threads()} torch thread(s)"


@dataclasses.dataclass(frozen=True)
class Scenario:
    ratio: float | None = None
    classes: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        return scenario_name(self.ratio, self.classes)


class Experiment:
    """The pieces of a reproduction (original models, splits, runs), each computed once and cached on disk."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.dataset = dataset_key(config.dataset)
        preset = preset_for(self.dataset, config.preset)
        self.preset = preset
        self.device = resolve_device(config.run.device)
        self.out = Path(
            config.out_dir or f"runs/reproduce-{self.dataset}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        )
        self.methods = [method_key(m) for m in config.methods]
        self.batch_size = config.batch_size or preset.get("batch_size", 256)
        self.augment = resolve_augment(config.augment, self.dataset)
        self.protocol = get_protocol(config.protocol)
        original = {**preset.get("original", {}), **self.protocol.original_overrides, **config.original}
        self.original_config = OriginalTrainConfig(**{"batch_size": self.batch_size, **original})
        for name in list(config.method_overrides) + list(config.sweeps):
            method_key(name)  # unknown names fail before any work
        # load the data once, onto the device
        train_full = load_dataset(self.dataset, config.data_root, train=True, download=config.download)
        self.train_subset = config.train_subset or preset.get("train_subset")
        if self.train_subset:
            train_full = train_full.subset(
                class_balanced_subset(train_full.labels, self.train_subset, config.subset_seed)
            )
        self.mia_shadow_size = config.mia_shadow_size or preset.get("mia_shadow_size")
        self.test_full = load_dataset(self.dataset, config.data_root, train=False, download=config.download)
        self.train_full = train_full
        model_name = config.model or preset.get("model", "resnet18")
        options = config.model_options if config.model_options is not None else preset.get("model_options", {})
        options = {**self.protocol.model_options(self.dataset), **options}
        self.spec = ModelSpec(model_name, train_full.channels, train_full.num_classes, train_full.image_size, options)
        self._splits: dict[tuple[Scenario, int], UnlearningSplit] = {}
        self._originals: dict[int, dict[str, torch.Tensor]] = {}
        self.records: list[dict[str, Any]] = []
        self.tuning: list[dict[str, Any]] = []
        self._tuned: dict[tuple[str, Scenario], dict[str, Any]] = {}

    def log(self, text: str) -> None:
        if self.config.verbose:
            print(text, flush=True)

    @property
    def scenarios(self) -> list[Scenario]:
        out = [Scenario(ratio=float(r)) for r in self.config.ratios]
        if self.config.forget_classes:
            out.append(Scenario(classes=tuple(int(c) for c in self.config.forget_classes)))
        if not out:
            raise UsageError("nothing to forget: give ratios and/or forget_classes")
        return out

    def options(self, seed: int, checkpoint_dir: Path | None) -> RunOptions:
        """The run options of one piece: the experiment's, with the piece's seed and checkpoint folder."""
        folder = str(checkpoint_dir) if checkpoint_dir is not None else None
        return dataclasses.replace(self.config.run, device=str(self.device), seed=seed, checkpoint_dir=folder)

    # ------------------------------------------------------------------------------------------- pieces
    def split(self, scenario: Scenario, seed: int, split_seed: int | None = None) -> UnlearningSplit:
        split_seed = self.config.split_seed if split_seed is None else split_seed
        key = (scenario, seed, split_seed)
        if key not in self._splits:
            split = make_unlearning_split(
                self.train_full,
                self.test_full,
                ratio=scenario.ratio,
                classes=scenario.classes,
                forget_seed=seed,
                split_seed=split_seed,
                val_fraction=self.config.val_fraction,
            )
            self._splits[key] = dataclasses.replace(
                split, train=split.train.to(self.device), val=split.val.to(self.device), test=split.test.to(self.device)
            )
        return self._splits[key]

    def original(self, seed: int) -> nn.Module:
        """A fresh copy of the seed's original model (trained on the training split once, then cached)."""
        if seed not in self._originals:
            self._originals[seed] = self._load_or_train_original(seed)
        model = self.spec.build()
        model.load_state_dict(self._originals[seed])
        return model.to(self.device)

    def _original_fingerprint(self, seed: int) -> str:
        return _fingerprint(
            {
                "dataset": self.dataset,
                "spec": dataclasses.asdict(self.spec),
                "train": dataclasses.asdict(self.original_config),
                "augment": repr(self.augment),
                "split": [self.config.split_seed, self.config.val_fraction, self.train_subset, self.config.subset_seed],
                "protocol": self.protocol.describe(),
                "seed": seed,
            }
        )

    def _load_or_train_original(self, seed: int) -> dict[str, torch.Tensor]:
        folder = self.out / "original" / f"seed{seed}"
        path = folder / "model.safetensors"
        fingerprint = self._original_fingerprint(seed)
        if self.config.run.resume and path.exists() and (folder / "original.json").exists():
            model, _, extra = load_classifier(path, expect=self.spec)
            if extra.get("fingerprint") == fingerprint:
                self.log(f"original model (seed {seed}): reusing {path}")
                return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            self.log(f"original model (seed {seed}): {path} was trained with other settings; retraining")
        # the paper protocol trains the original on the paper code's seed-1 split (its unlearning uses seed 2)
        split = self.split(self.scenarios[0], seed, self.protocol.original_split_seed)
        self.log(f"original model (seed {seed}): {self.original_config.epochs} epochs on {len(split.train)} images")
        model, trained = train_original(
            self.spec,
            OriginalData(split.train, split.val, split.test),
            self.original_config,
            self.options(seed, folder / "ckpt"),
            augment=self.augment,
        )
        record = {"seed": seed, "fingerprint": fingerprint, **trained, "split": split.describe()}
        save_classifier(path, model, self.spec, extra={"fingerprint": fingerprint, "dataset": self.dataset})
        write_json(record, folder / "original.json")
        shutil.rmtree(folder / "ckpt", ignore_errors=True)
        self.log(
            f"  train {record['train_accuracy']:.2f}%  test {record['test_accuracy']:.2f}%  ({record['seconds']:.1f} s)"
        )
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def method_config(self, method: str, scenario: Scenario | None = None, extra: dict[str, Any] | None = None) -> dict:
        """Hyperparameter overrides of a method: preset < protocol < user overrides < tuned values < `extra`.

        A preset may hold per-scenario values under "<method>@<ratio>" (e.g. "ga@0.5").
        """
        preset = self.preset.get("methods", {})
        merged = dict(preset.get(method, {}))
        if scenario is not None and scenario.ratio is not None:
            merged.update(preset.get(f"{method}@{scenario.ratio:g}", {}))
        merged.update(self.protocol.for_method(method))
        merged.update(self.config.method_overrides.get(method, {}))
        if scenario is not None:
            merged.update(self._tuned.get((method, scenario), {}))
        merged.update(extra or {})
        return merged

    def run(
        self,
        method: str,
        scenario: Scenario,
        seed: int,
        *,
        overrides: dict[str, Any] | None = None,
        folder: Path | None = None,
        tag: str = "eval",
    ) -> dict[str, Any]:
        """Run one method on one (scenario, seed), evaluate it, write and return its record."""
        method = method_key(method)
        params = self.method_config(method, scenario, overrides)
        unlearner = get_method(method, **params)
        split = self.split(scenario, seed)
        folder = folder or self.out / "runs" / _slug(scenario.name) / f"seed{seed}" / method
        fingerprint = _fingerprint(
            {
                "method": method,
                "config": dataclasses.asdict(unlearner.config),
                "scenario": dataclasses.asdict(scenario),
                "seed": seed,
                "batch_size": self.batch_size,
                "augment": repr(self.augment),
                "original": None if unlearner.trains_from_scratch else self._original_fingerprint(seed),
                "spec": dataclasses.asdict(self.spec),
                "mia": self.mia_shadow_size,
                "protocol": self.protocol.name,
            }
        )
        result_path = folder / "result.json"
        if self.config.run.resume and result_path.exists():
            record = json.loads(result_path.read_text())
            if record.get("fingerprint") == fingerprint:
                self._log_record(record, cached=True)
                return record
        model = self.original(seed) if not unlearner.trains_from_scratch else self.spec.build().to(self.device)
        data = UnlearnData(
            split.forget,
            split.retain,
            num_classes=self.spec.num_classes,
            batch_size=self.batch_size,
            augment=self.augment,
        )
        _, outcome = unlearn_and_evaluate(
            unlearner, model, split, data, self.options(seed, folder / "ckpt"), mia_shadow_size=self.mia_shadow_size
        )
        record = {
            "tag": tag,
            "scenario": scenario.name,
            "ratio": scenario.ratio,
            "classes": list(scenario.classes) if scenario.classes else None,
            "seed": seed,
            **outcome,
            "model": dataclasses.asdict(self.spec),
            "device": machine_description(self.device),
            "fingerprint": fingerprint,
        }
        if self.config.save_models:
            save_classifier(folder / "model.safetensors", model, self.spec, extra={"method": method, "seed": seed})
        write_json(record, result_path)
        shutil.rmtree(folder / "ckpt", ignore_errors=True)
        self._log_record(record)
        return record

    def _log_record(self, record: dict[str, Any], cached: bool = False) -> None:
        m = record["metrics"]
        self.log(
            f"  [{record['scenario']}, seed {record['seed']}] {record['label']:<10s} UA {m['UA']:6.2f}"
            f"  RA {m['RA']:6.2f}  TA {m['TA']:6.2f}  MIA {m['MIA']:6.2f}  RTE {record['rte_seconds']:7.2f} s"
            + ("  (cached)" if cached else "")
        )

    # ------------------------------------------------------------------------------------------- tuning
    def tune(self) -> list[dict[str, Any]]:
        """Grid-search the configured sweeps on the tuning seeds; remember the best value per (method, scenario)."""
        c = self.config
        if not c.sweeps:
            return []
        if not c.tune_seeds:
            raise UsageError("sweeps need tune_seeds (seeds used only for tuning, never for the evaluation)")
        overlap = sorted(set(c.tune_seeds) & set(c.seeds))
        if overlap:
            raise UsageError(f"tuning seeds {overlap} are also evaluation seeds: tune on separate seeds")
        results = []
        for scenario in self.scenarios:
            refs = [
                self.run("retrain", scenario, s, folder=self._tune_folder(scenario, s, "retrain"), tag="tune")
                for s in c.tune_seeds
            ]
            for method, grid in c.sweeps.items():
                method = method_key(method)
                if len(grid) != 1:
                    raise UsageError(f"sweep of {method}: one hyperparameter per sweep, got {sorted(grid)}")
                ((param, values),) = grid.items()
                scores = []
                for value in values:
                    runs = [
                        self.run(
                            method,
                            scenario,
                            s,
                            overrides={param: value},
                            folder=self._tune_folder(scenario, s, f"{method}_{param}_{value}"),
                            tag="tune",
                        )
                        for s in c.tune_seeds
                    ]
                    summary = summarize(refs + runs)["scenarios"][0]["methods"][method]
                    scores.append({"value": value, "avg_gap": summary["avg_gap"], "mean": summary["mean"]})
                best = min(scores, key=lambda r: r["avg_gap"])
                self._tuned[(method, scenario)] = {**self._tuned.get((method, scenario), {}), param: best["value"]}
                self.log(
                    f"tuned {method}.{param} for {scenario.name} on seeds {c.tune_seeds}: {best['value']} "
                    f"(Avg. Gap {best['avg_gap']:.2f})"
                )
                results.append(
                    {
                        "scenario": scenario.name,
                        "method": method,
                        "param": param,
                        "tune_seeds": list(c.tune_seeds),
                        "scores": scores,
                        "best": best["value"],
                    }
                )
        self.tuning = results
        return results

    def _tune_folder(self, scenario: Scenario, seed: int, name: str) -> Path:
        return self.out / "tune" / _slug(scenario.name) / f"seed{seed}" / _slug(name)

    # ------------------------------------------------------------------------------------------- all
    def run_all(self) -> dict[str, Any]:
        with OutputFolder(self.out, what="--out"):  # checked before any work, held until the tables are written
            return self._run_all()

    def _run_all(self) -> dict[str, Any]:
        start = time.perf_counter()
        self.log(
            f"reproduce: {self.dataset}, {self.spec.describe()}, methods {', '.join(self.methods)}, "
            f"scenarios {[s.name for s in self.scenarios]}, seeds {self.config.seeds} -> {self.out}"
        )
        self.tune()
        methods = ["retrain", *[m for m in self.methods if m != "retrain"]]
        for seed in self.config.seeds:
            for scenario in self.scenarios:
                for method in methods:
                    self.records.append(self.run(method, scenario, seed))
        summary = summarize(self.records)
        protocol = "" if self.protocol.name == "default" else f", {self.protocol.name} protocol"
        summary.update(
            {
                "title": f"{self.dataset}, {self.spec.arch}{protocol}",
                "protocol": self.protocol.describe(),
                "dataset": self.dataset,
                "model": dataclasses.asdict(self.spec),
                "seeds": list(self.config.seeds),
                "methods": methods,
                "original": [
                    json.loads((self.out / "original" / f"seed{s}" / "original.json").read_text())
                    for s in self.config.seeds
                ],
                "tuning": self.tuning,
                "config": dataclasses.asdict(self.config),
                "machine": machine_description(self.device),
                "torch": torch.__version__,
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "wall_seconds": time.perf_counter() - start,
            }
        )
        self.write_reports(summary, methods)
        return summary

    def write_reports(self, summary: dict[str, Any], methods: list[str]) -> None:
        write_json(summary, self.out / "summary.json")
        table = markdown_table(summary, methods)
        lines = [
            f"# Unlearning table: {summary['title']}",
            "",
            f"{len(self.config.seeds)} trial(s) (seeds {', '.join(map(str, self.config.seeds))}); mean ± std "
            "(gap to Retrain); Avg. Gap = mean gap over UA, RA, TA, MIA; RTE = wall-clock minutes of the unlearning.",
            f"Machine: {summary['machine']}, torch {summary['torch']}, {summary['date']}; "
            f"whole run {summary['wall_seconds'] / 60:.1f} min.",
            "",
            table,
        ]
        originals = summary["original"]
        if originals:
            acc = ", ".join(
                f"seed {o['seed']}: train {o['train_accuracy']:.2f}%, test {o['test_accuracy']:.2f}%" for o in originals
            )
            lines += [f"Original model: {acc}.", ""]
        lines += ["MIA-Efficacy by attack feature:", "", extra_mia_table(summary)]
        if self.tuning:
            lines += ["Tuning (on seeds never used for evaluation):", ""]
            for t in self.tuning:
                scores = ", ".join(f"{s['value']}: {s['avg_gap']:.2f}" for s in t["scores"])
                lines.append(
                    f"- {t['scenario']}, {t['method']}.{t['param']} (seeds {t['tune_seeds']}): {scores} -> {t['best']}"
                )
            lines.append("")
        (self.out / "table.md").write_text("\n".join(lines))
        plot_gaps(summary, self.out / "gaps.png")


def reproduce(config: ExperimentConfig) -> dict[str, Any]:
    """Run the whole experiment (see the module docstring); returns the summary (also written to config.out_dir)."""
    experiment = Experiment(config)
    summary = experiment.run_all()
    if config.verbose:
        print()
        print(markdown_table(summary, summary["methods"]))
        print(f"wrote {experiment.out}/table.md, summary.json, gaps.png ({summary['wall_seconds']:.0f} s)")
    summary["out_dir"] = str(experiment.out)
    return summary
