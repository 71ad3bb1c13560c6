"""End-to-end demonstration that SalUn makes a class-conditional DDPM forget a class (CPU, minutes).

    salun-ext diffusion demo --out docs/results/diffusion-digits

1. train the scoring classifier (small CNN) and a small class-conditional DDPM on digits (or Fashion-MNIST),
2. generate n images per class with guidance and classify them (the original model's accuracies),
3. compute the SalUn mask (forget-class guided loss, top 50% of the UNet) and unlearn the class,
4. generate again from the same noise: UA on the forgotten class, the other classes' accuracy, FD, a grid.
Writes results.json, results.md and before_after.png to the output folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


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


def run_demo(cfg: DemoConfig, out: str | Path) -> dict:
    from salun_ext.data import load_dataset
    from salun_ext.diffusion.ddpm import (
        PRESETS,
        ClassConditionalDDPM,
        dataset_to_set,
        forget_retain_sets,
        resize_images,
    )
    from salun_ext.diffusion.evaluation import (
        before_after_grid,
        class_accuracies,
        class_wise_report,
        first_per_class,
        frechet_distance,
        predict,
        train_classifier,
    )
    from salun_ext.diffusion.methods import EpsTask, SalUnTask, recipe, run_task
    from salun_ext.diffusion.saliency import diffusion_saliency
    from salun_ext.train.engine import EngineConfig, OptimConfig
    from salun_ext.utils import resolve_device

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    start, start_cpu = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    cpu_timings: dict[str, float] = {}  # CPU seconds of this process: comparable across loaded / idle machines
    last_cpu = [start_cpu]

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 1)
        cpu_timings[name] = round(time.process_time() - last_cpu[0], 1)
        last_cpu[0] = time.process_time()
        _log(f"{name}: {timings[name]} s wall, {cpu_timings[name]} s CPU")
        return time.perf_counter()

    train = load_dataset(cfg.dataset, train=True)
    if cfg.subset is not None:
        train = train.subset(torch.arange(min(cfg.subset, len(train))))
    test = load_dataset(cfg.dataset, train=False)
    t = time.perf_counter()

    # 1a. scoring classifier (trained on real images at the DDPM's resolution)
    clf_path = out / "classifier.pt"
    clf = train_classifier(
        resize_images(train.images, cfg.image_size),
        train.labels,
        train.num_classes,
        epochs=0 if (cfg.reuse and clf_path.exists()) else cfg.classifier_epochs,
        seed=cfg.seed,
        device=str(device),
    )
    if cfg.reuse and clf_path.exists():
        clf.load_state_dict(torch.load(clf_path, map_location=device, weights_only=True))
    else:
        torch.save(clf.state_dict(), clf_path)
    real_test = resize_images(test.images, cfg.image_size)
    test_acc = 100.0 * float((predict(clf, real_test) == test.labels).float().mean())
    t = lap("classifier", t)
    _log(f"classifier accuracy on real test images: {test_acc:.2f}%")

    # 1b. original DDPM
    preset = dataclasses.replace(PRESETS[cfg.preset], image_size=cfg.image_size, channels=train.channels)
    orig_dir = out / "original"
    if cfg.reuse and (orig_dir / "salun_ddpm.json").exists():
        model = ClassConditionalDDPM.from_pretrained(orig_dir, device)
        _log(f"reusing the original model in {orig_dir}")
    else:
        model = ClassConditionalDDPM.from_config(preset, train.classes, dataset=cfg.dataset, seed=cfg.seed)
        config = EngineConfig(
            epochs=cfg.train_epochs,
            optimizer=OptimConfig("adam", lr=cfg.train_lr, weight_decay=0.0),
            schedule="cosine",
            warmup_steps=1,
            grad_clip=1.0,
            seed=cfg.seed,
            device=str(device),
            progress=cfg.progress,
            desc="ddpm",
        )
        task = EpsTask(model.spec, dataset_to_set(model, train), batch_size=cfg.train_batch_size, seed=cfg.seed)
        run_task(model.unet, task, config)
        model.save_pretrained(orig_dir)
    t = lap("train_ddpm", t)

    forget_id = model.class_id(cfg.forget_class)
    counts = {c: (cfg.n_forget if c == forget_id else cfg.n_per_class) for c in range(model.num_classes)}
    sample_kw = dict(
        n_per_class=counts,
        guidance_scale=cfg.guidance_scale,
        num_inference_steps=cfg.sample_steps,
        seed=cfg.seed + 1,
        progress=cfg.progress,
    )
    acc_before, images_before, labels = class_accuracies(model, clf, **sample_kw)
    before = class_wise_report(acc_before, [forget_id])
    t = lap("evaluate_original", t)
    _log(f"original: per-class accuracy {acc_before}")

    # 3. SalUn: mask + masked unlearning
    forget, retain = forget_retain_sets(model, train, [forget_id])
    mask = diffusion_saliency(
        model.unet, model.spec, forget, ratio=cfg.mask_ratio, guidance_scale=cfg.guidance_scale, progress=False
    )
    t = lap("mask", t)
    r = recipe("ddpm", "salun")
    r.engine.max_steps = cfg.unlearn_steps
    r.engine.optimizer.lr = cfg.lr
    r.engine.seed, r.engine.device, r.engine.progress, r.engine.desc = cfg.seed, str(device), cfg.progress, "salun"
    alpha = cfg.alpha if cfg.alpha is not None else paper_alpha(model.channels, model.image_size)
    r.task.update(alpha=alpha, batch_size=cfg.unlearn_batch_size, seed=cfg.seed)
    fit = run_task(model.unet, SalUnTask(model.spec, forget, retain, **r.task), r.engine, mask=mask)
    model.save_pretrained(out / "unlearned")
    t = lap("unlearn", t)

    acc_after, images_after, _ = class_accuracies(model, clf, **sample_kw)
    after = class_wise_report(acc_after, [forget_id])
    t = lap("evaluate_unlearned", t)

    # Fréchet distance of the retained classes' generated images to the real test images of those classes
    keep = labels != forget_id
    real_keep = real_test[test.labels != forget_id]
    fd_before, fd_label = frechet_distance(real_keep, images_before[keep], classifier=clf)
    fd_after, _ = frechet_distance(real_keep, images_after[keep], classifier=clf)
    t = lap("frechet", t)

    show = min(10, cfg.n_per_class, cfg.n_forget)
    pick = first_per_class(labels, range(model.num_classes), show)
    before_after_grid(
        images_before[pick],
        images_after[pick],
        out / "before_after.png",
        nrow=show,
        row_labels=model.classes,
        titles=("original DDPM", f"after SalUn (forget class {model.classes[forget_id]})"),
        highlight_rows=[forget_id],
    )
    total = round(time.perf_counter() - start, 1)
    results = {
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
        "forget_class": model.classes[forget_id],
        "alpha": alpha,
        "mask": {"ratio": mask.ratio, "salient": mask.count(), "numel": mask.numel},
        "unlearn_history": fit.history,
        "before": {"per_class_accuracy": acc_before, **before, "frechet": fd_before},
        "after": {"per_class_accuracy": acc_after, **after, "frechet": fd_after},
        "frechet_label": fd_label,
        "retain_accuracy_drop": before["retain_accuracy"] - after["retain_accuracy"],
        "targets_met": {
            "UA>=99": after["UA"] >= 99.0,
            "retain_within_2_points": before["retain_accuracy"] - after["retain_accuracy"] <= 2.0,
        },
        "timings_s": timings,
        "cpu_timings_s": cpu_timings,
        "total_s": total,
        "total_cpu_s": round(time.process_time() - start_cpu, 1),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    (out / "results.md").write_text(render_markdown(results, model.classes), encoding="utf-8")
    _log(
        f"done in {total} s: UA {after['UA']:.1f}%, retain accuracy {before['retain_accuracy']:.2f}% -> "
        f"{after['retain_accuracy']:.2f}%"
    )
    return results


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
