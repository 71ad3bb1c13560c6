"""End-to-end demonstration that SalUn makes a class-conditional DDPM forget a class (CPU, minutes).

    salun-ext diffusion demo --out docs/results/diffusion-digits

1. train the scoring classifier (small CNN) and a small class-conditional DDPM on digits (or Fashion-MNIST),
2. compute the SalUn mask (forget-class guided loss, top 50% of the UNet) and unlearn the class,
3. generate n images per class with guidance from the original and the unlearned model (the same noise) and
   classify them: UA on the forgotten class, the other classes' accuracy, FD, a before/after grid
   (evaluation.evaluate_class_forgetting, the same evaluation as `salun-ext diffusion evaluate`).
Writes results.json, results.md and before_after.png to the output folder.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from salun_ext.utils import write_json


@dataclasses.dataclass
class DemoConfig:
    dataset: str = "digits"
    forget_class: str = "3"
    image_size: int = 16
    preset: str = "tiny"
    train_epochs: int = 40
    train_lr: float = 1e-3
    train_batch_size: int = 64
    classifier_epochs: int = 30
    n_per_class: int = 50  # generated images per remaining class
    n_forget: int = 200  # generated images of the forgotten class (UA >= 99% needs >= 100 to mean anything)
    sample_steps: int = 25
    guidance_scale: float = 3.0  # the paper's w = 2.0
    mask_ratio: float = 0.5
    unlearn_steps: int = 200
    unlearn_batch_size: int = 32
    alpha: float | None = None  # None: the paper's 1e-3 rescaled to this image size (see paper_alpha)
    lr: float = 1e-4
    seed: int = 0
    device: str = "auto"
    reuse: bool = True  # reuse a trained original model / classifier found in the output folder
    subset: int | None = None  # train on the first N training images only (smoke tests)
    progress: bool = True


def paper_alpha(channels: int, image_size: int) -> float:
    """The DDPM recipe's alpha = 1e-3 was tuned with the retain loss summed over CIFAR's 3 x 32 x 32 = 3072
    elements per image; the same per-element balance between the forget and retain terms at another image size is
    1e-3 * 3072 / (C * H * W) (0.012 for 16 x 16 grey digits)."""
    return 1e-3 * 3072 / (channels * image_size * image_size)


def _log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


class _Clock:
    """Wall and CPU seconds of each phase (CPU seconds of this process: comparable across loaded / idle machines)."""

    def __init__(self) -> None:
        self.start, self.start_cpu = time.perf_counter(), time.process_time()
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._t, self._cpu = self.start, self.start_cpu

    def lap(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.wall[name], self.cpu[name] = round(now - self._t, 1), round(cpu - self._cpu, 1)
        self._t, self._cpu = now, cpu
        _log(f"{name}: {self.wall[name]} s wall, {self.cpu[name]} s CPU")


def _load_data(cfg: DemoConfig):
    from salun_ext.data import load_dataset

    train = load_dataset(cfg.dataset, train=True)
    if cfg.subset is not None:
        train = train.subset(torch.arange(min(cfg.subset, len(train))))
    return train, load_dataset(cfg.dataset, train=False)


def _classifier(cfg: DemoConfig, options, train, test, out: Path):
    """1a. the scoring classifier (trained on real images at the DDPM's resolution), reused when found."""
    from salun_ext.diffusion.data import resized_dataset
    from salun_ext.diffusion.evaluation import scoring_classifier
    from salun_ext.train.classifier import predict

    path = out / "classifier.pt"
    reuse = cfg.reuse and path.exists()
    clf = scoring_classifier(train, cfg.image_size, options, load=path if reuse else None,
                             save=None if reuse else path, epochs=cfg.classifier_epochs)  # fmt: skip
    real_test = resized_dataset(test, cfg.image_size)
    test_acc = 100.0 * float((predict(clf, real_test.float_images()) == test.labels).float().mean())
    _log(f"classifier accuracy on real test images: {test_acc:.2f}%")
    return clf, test_acc


def _original(cfg: DemoConfig, options, train, orig_dir: Path):
    """1b. the original DDPM, reused when found."""
    from salun_ext.diffusion.ddpm import PRESETS, ClassConditionalDDPM, dataset_to_set
    from salun_ext.diffusion.recipes import ddpm_training_recipe
    from salun_ext.diffusion.workflows import train_ddpm

    if cfg.reuse and (orig_dir / "salun_ddpm.json").exists():
        _log(f"reusing the original model in {orig_dir}")
        return ClassConditionalDDPM.from_pretrained(orig_dir, options.device)
    preset = dataclasses.replace(PRESETS[cfg.preset], image_size=cfg.image_size, channels=train.channels)
    model = ClassConditionalDDPM.from_config(preset, train.classes, dataset=cfg.dataset, seed=cfg.seed)
    recipe = ddpm_training_recipe(cfg.train_epochs, cfg.train_lr, warmup_steps=1)
    train_ddpm(model, dataset_to_set(model, train), recipe, options, batch_size=cfg.train_batch_size)
    model.save_pretrained(orig_dir)
    return model


def _unlearn(cfg: DemoConfig, options, model, train, forget_id: int, clock: _Clock):
    """3. SalUn: the mask (forget-class guided loss, top mask_ratio of the UNet), then masked unlearning."""
    from salun_ext.diffusion.ddpm import forget_retain_sets
    from salun_ext.diffusion.methods import unlearn
    from salun_ext.diffusion.saliency import diffusion_saliency

    forget, retain = forget_retain_sets(model, train, [forget_id])
    mask = diffusion_saliency(
        model.unet, model.spec, forget, ratio=cfg.mask_ratio, guidance_scale=cfg.guidance_scale, progress=False
    )
    clock.lap("mask")
    alpha = cfg.alpha if cfg.alpha is not None else paper_alpha(model.channels, model.image_size)
    task = dict(alpha=alpha, batch_size=cfg.unlearn_batch_size)
    fit = unlearn("salun", "ddpm", model.unet, model.spec, forget, retain, options=options, mask=mask, lr=cfg.lr,
                  max_steps=cfg.unlearn_steps, task_overrides=task)  # fmt: skip
    clock.lap("unlearn")
    return mask, fit, alpha


def run_demo(cfg: DemoConfig, out: str | Path) -> dict:
    """The phases of the module docstring; writes results.json, results.md, before_after.png into `out`."""
    from salun_ext.diffusion.ddpm import ClassConditionalDDPM
    from salun_ext.diffusion.evaluation import Sampling, evaluate_class_forgetting
    from salun_ext.train import RunOptions
    from salun_ext.utils import resolve_device

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    options = RunOptions(device=str(device), seed=cfg.seed, progress=cfg.progress)
    clock = _Clock()
    train, test = _load_data(cfg)
    clf, test_acc = _classifier(cfg, options, train, test, out)
    clock.lap("classifier")
    model = _original(cfg, options, train, out / "original")
    clock.lap("train_ddpm")
    forget_id = model.class_id(cfg.forget_class)
    mask, fit, alpha = _unlearn(cfg, options, model, train, forget_id, clock)
    model.save_pretrained(out / "unlearned")
    # 2 + 4. the original and the unlearned model generate from the same noise; UA, other classes, FD, grid
    sampling = Sampling(n_per_class=cfg.n_per_class, n_forget=cfg.n_forget, guidance_scale=cfg.guidance_scale,
                        num_inference_steps=cfg.sample_steps, seed=cfg.seed + 1, progress=cfg.progress)  # fmt: skip
    original = ClassConditionalDDPM.from_pretrained(out / "original", device)
    titles = ("original DDPM", f"after SalUn (forget class {model.classes[forget_id]})")
    evaluated = evaluate_class_forgetting(model, clf, test, [forget_id], sampling, reference=original, out=out,
                                          titles=titles)  # fmt: skip
    clock.lap("evaluate")
    before = evaluated.pop("reference")
    results = _results(cfg, device, clock, test_acc, model.classes[forget_id], alpha, mask, fit, before, evaluated)
    write_json(results, out / "results.json")
    (out / "results.md").write_text(render_markdown(results, model.classes), encoding="utf-8")
    _log(f"done in {results['total_s']} s: UA {evaluated['UA']:.1f}%, retain accuracy "
         f"{before['retain_accuracy']:.2f}% -> {evaluated['retain_accuracy']:.2f}%")  # fmt: skip
    return results


def _results(cfg, device, clock: _Clock, test_acc, forget_class, alpha, mask, fit, before, after) -> dict:
    drop = before["retain_accuracy"] - after["retain_accuracy"]
    label = after.pop("frechet_label")
    before.pop("frechet_label", None)
    return {
        "config": dataclasses.asdict(cfg),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
            "torch": torch.__version__,
        },
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "classifier_test_accuracy": test_acc,
        "forget_class": forget_class,
        "alpha": alpha,
        "mask": {"ratio": mask.ratio, "salient": mask.count(), "numel": mask.numel},
        "unlearn_history": fit.history,
        "before": before,
        "after": after,
        "frechet_label": label,
        "retain_accuracy_drop": drop,
        "targets_met": {"UA>=99": after["UA"] >= 99.0, "retain_within_2_points": drop <= 2.0},
        "timings_s": clock.wall,
        "cpu_timings_s": clock.cpu,
        "total_s": round(time.perf_counter() - clock.start, 1),
        "total_cpu_s": round(time.process_time() - clock.start_cpu, 1),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def render_markdown(r: dict, classes: list[str]) -> str:
    b, a, cfg, m = r["before"], r["after"], r["config"], r["machine"]
    rows = "\n".join(
        f"| {classes[int(c)]} | {b['per_class_accuracy'][c]:.1f} | {a['per_class_accuracy'][c]:.1f} |"
        for c in b["per_class_accuracy"]
    )
    met = {k: "met" if v else "NOT met" for k, v in r["targets_met"].items()}
    lines = [
        f"# SalUn on a class-conditional DDPM ({cfg['dataset']}, forget class {r['forget_class']})",
        "",
        f"Machine: {m['platform']} ({m['processor']}), {m['torch_threads']} torch thread(s), device {m['device']},",
        f"torch {m['torch']}. Date: {r['date']}. Wall time: {r['total_s']} s, phases {r['timings_s']}.",
        f"CPU time of the process: {r['total_cpu_s']} s, phases {r['cpu_timings_s']}.",
        f"Load average at the end: {r['load_average_at_end']} (other jobs shared the cores).",
        "",
        f"Setup: {cfg['image_size']}x{cfg['image_size']} DDPM ({cfg['preset']} preset, {r['mask']['numel']} parameters)"
        f" trained {cfg['train_epochs']} epochs (Adam {cfg['train_lr']}, batch {cfg['train_batch_size']}, cosine);",
        f"scoring classifier (small CNN) accuracy on real test images: {r['classifier_test_accuracy']:.2f}%.",
        f"SalUn: mask ratio {cfg['mask_ratio']} over the whole UNet, {cfg['unlearn_steps']} Adam steps",
        f"(lr {cfg['lr']}, batch {cfg['unlearn_batch_size']} forget + {cfg['unlearn_batch_size']} retain,",
        f"alpha {r['alpha']:.4g}, clip 1.0, c' = next class).",
        f"Sampling: {cfg['n_forget']} images of the forgotten class and {cfg['n_per_class']} of every other class,",
        f"DDIM {cfg['sample_steps']} steps, guidance s = {cfg['guidance_scale']}, the same noise before and after.",
        "",
        "| | original | after SalUn |",
        "|---|---|---|",
        f"| UA on the forgotten class (%) | {b['UA']:.1f} | {a['UA']:.1f} |",
        f"| accuracy on the other classes' generated images (%) | {b['retain_accuracy']:.2f} |"
        f" {a['retain_accuracy']:.2f} |",
        f"| {r['frechet_label']}, other classes vs real test images | {b['frechet']:.2f} | {a['frechet']:.2f} |",
        "",
        f"Targets: UA >= 99%: {met['UA>=99']}; other classes within 2 points: {met['retain_within_2_points']}"
        f" (change {-r['retain_accuracy_drop']:+.2f} points).",
        "",
        "Per-class accuracy of the classifier on generated images (%):",
        "",
        "| class | original | after SalUn |",
        "|---|---|---|",
        rows,
        "",
        "![before/after](before_after.png)",
        "",
    ]
    return "\n".join(lines)
