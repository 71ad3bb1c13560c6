"""The unlearning table of the text-to-image digits model: five methods forget one digit, each attacked.

    salun-ext diffusion text-digits-table --pipeline runs/text-digits --forget-images runs/real/three \\
        --retain-images runs/real/four --seeds 1 2 3 --work runs/td-table --out docs/results/text-digits-unlearning

For the original pipeline once, and for every seed and method (SalUn with its mask, ESD-x, FMN, UCE, GA):
1. unlearn through `workflows.unlearn_folder` (forget prompt "a handwritten digit three" with the real threes,
   retain / target prompt "a handwritten digit four" with the real fours; FMN re-steers the word "three"; UCE
   erases the forget prompt and preserves the other nine classes' prompts);
2. score it with the digits evaluation (`text_digits.evaluate_text_digits`: UA on the forgotten class, accuracy on
   the kept classes, the Fréchet proxy of the kept classes' images), from the same noise for every model;
3. attack it with UnlearnDiffAtk (`attack.run_attack`) on every phrasing of the forgotten class's caption x a few
   generation seeds, judged by the digits scoring classifier (`judges.ClassifierJudge.from_state_dict`): Pre-ASR
   and ASR.

Hyperparameters follow one rule for every trained method (`hyperparameters`): the method's SD recipe
(recipes.py), its learning rate times `lr_scale`, and a step budget above `max_steps` cut to `max_steps` with the
learning rate raised by the same factor (lr x steps kept). Everything is resumable: each finished mask, model,
evaluation and attacked prompt is skipped on a rerun (models and attack folders live in `work`, the small result
files in `out`). Writes out/<row>/result.json per row, out/summary.json (mean and sample std over seeds),
out/README.md (the tables, with out/notes.md included when present) and before/after grids in out/grids/.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from salun_ext.diffusion.attack import AttackConfig, AttackPrompt
from salun_ext.diffusion.data import ForgetData, ModelSource
from salun_ext.diffusion.text_digits import (
    NUMBER_WORDS,
    PHRASINGS,
    SAMPLE_GUIDANCE,
    TextDigitsEvaluation,
    caption,
    class_index,
    machine_record,
)
from salun_ext.train.options import RunOptions
from salun_ext.utils import write_json
from salun_ext.utils.errors import MissingFileError, usage_error

PathLike = str | os.PathLike

TABLE_METHODS = ("salun", "esd-x", "fmn", "uce", "ga")
LABELS = {"original": "original (not unlearned)", "salun": "SalUn", "esd-x": "ESD-x", "fmn": "FMN", "uce": "UCE",
          "ga": "GA"}  # fmt: skip
METRICS = ("UA", "retain_accuracy", "frechet", "pre_asr", "asr")


@dataclasses.dataclass
class TableConfig:
    """What the table runs (defaults: the committed page's settings, sized for a shared CPU)."""

    pipeline: str
    forget_images: str
    retain_images: str
    classifier: str | None = None  # the digits scoring classifier state_dict (None: <pipeline>/classifier.pt)
    forget_class: str = "three"
    retain_class: str = "four"
    seeds: Sequence[int] = (1, 2, 3)
    methods: Sequence[str] = TABLE_METHODS
    lr_scale: float = 3.0  # every trained method: the recipe's lr x this
    max_steps: int = 200  # recipes with more steps (ESD's 1000) are cut to this, lr raised by the same factor
    mask_ratio: float = 0.5
    n_per_class: int = 5  # evaluation: images per class and phrasing
    eval_steps: int = 25
    attack_seeds: Sequence[int] = (0, 1)  # generation seeds of the attacked prompts (x every phrasing)
    attack_timesteps: int = 10  # the published attack: 50
    attack_iterations: int = 10  # the published attack: 40
    attack_sampling_steps: int = 25  # the published attack: 50
    k: int = 3
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        from salun_ext.diffusion.methods import METHODS

        self.seeds, self.methods, self.attack_seeds = list(self.seeds), list(self.methods), list(self.attack_seeds)
        if not self.seeds:
            raise usage_error("seeds (--seeds)", "at least one seed", self.seeds)
        if len(set(self.seeds)) != len(self.seeds):
            raise usage_error("seeds (--seeds)", "distinct seeds", self.seeds)
        unknown = [m for m in self.methods if m not in METHODS or m == "retrain"]
        if not self.methods or unknown:
            raise usage_error("methods (--methods)", f"one or more of {', '.join(TABLE_METHODS)}", self.methods)
        if class_index(self.forget_class) == class_index(self.retain_class):
            raise usage_error("retain_class (--retain-class)", "a digit other than the forgotten one",
                              self.retain_class)  # fmt: skip
        for name in ("max_steps", "n_per_class", "eval_steps", "attack_timesteps", "attack_iterations",
                     "attack_sampling_steps", "k"):  # fmt: skip
            if getattr(self, name) < 1:
                raise usage_error(f"{name} (--{name.replace('_', '-')})", "an integer >= 1", getattr(self, name))
        if not self.lr_scale > 0:
            raise usage_error("lr_scale (--lr-scale)", "a number > 0", self.lr_scale)
        if not self.attack_seeds:
            raise usage_error("attack_seeds (--attack-seeds)", "at least one seed", self.attack_seeds)

    @property
    def forget_id(self) -> int:
        return class_index(self.forget_class)

    @property
    def classifier_path(self) -> Path:
        return Path(self.classifier) if self.classifier else Path(self.pipeline) / "classifier.pt"

    def attack_config(self) -> AttackConfig:
        """The attack, cut down to fit a CPU (weaker than the published 50 timesteps x 40 steps, 50 LMS steps)."""
        return AttackConfig(k=self.k, timesteps=self.attack_timesteps, iterations=self.attack_iterations,
                            sampling_steps=self.attack_sampling_steps, guidance_scale=SAMPLE_GUIDANCE,
                            target_steps=self.eval_steps, target_guidance=SAMPLE_GUIDANCE)  # fmt: skip

    def evaluation(self) -> TextDigitsEvaluation:
        return TextDigitsEvaluation(n_per_class=self.n_per_class, steps=self.eval_steps,
                                    forget_classes=[self.forget_id], seed=0)  # fmt: skip

    def forget_data(self) -> ForgetData:
        return ForgetData(forget_prompt=caption(self.forget_id), retain_prompt=caption(class_index(self.retain_class)),
                          forget_images=self.forget_images, retain_images=self.retain_images)  # fmt: skip


def attack_rows(cfg: TableConfig) -> list[AttackPrompt]:
    """Every phrasing of the forgotten class's caption with each attack seed, at the sampling guidance."""
    return [AttackPrompt(index=p * len(cfg.attack_seeds) + j, prompt=caption(cfg.forget_id, p), seed=s,
                         guidance_scale=SAMPLE_GUIDANCE)
            for p in range(len(PHRASINGS)) for j, s in enumerate(cfg.attack_seeds)]  # fmt: skip


def hyperparameters(method: str, cfg: TableConfig) -> dict[str, Any]:
    """The one rule of the table: the SD recipe's lr x lr_scale; a step budget over max_steps is cut to it with
    the lr raised by the same factor (lr x steps kept). UCE trains nothing: {}."""
    from salun_ext.diffusion.methods import METHODS
    from salun_ext.diffusion.recipes import recipe

    if METHODS.get_class(method).closed_form:
        return {}
    train = recipe("sd", method).train
    lr, steps = train.optimizer.lr * cfg.lr_scale, None
    if train.max_steps is not None and train.max_steps > cfg.max_steps:
        lr, steps = lr * train.max_steps / cfg.max_steps, cfg.max_steps
    return {"lr": lr, "steps": steps, "recipe_lr": train.optimizer.lr, "recipe_steps": train.max_steps,
            "recipe_epochs": train.epochs}  # fmt: skip


def unlearn_spec(method: str, cfg: TableConfig, mask: Path | None):
    """The `unlearn_folder` spec of one method (UCE's concepts: erase the forget prompt, keep the other nine)."""
    from salun_ext.diffusion.workflows import UnlearnSpec

    hp = hyperparameters(method, cfg)
    others = [caption(c) for c in range(len(NUMBER_WORDS)) if c != cfg.forget_id]
    return UnlearnSpec(method=method, setting="sd", mask=str(mask) if mask is not None else None, lr=hp.get("lr"),
                       steps=hp.get("steps"), fmn_concept=NUMBER_WORDS[cfg.forget_id] if method == "fmn" else None,
                       uce_erase=[caption(cfg.forget_id)] if method == "uce" else None,
                       uce_preserve=others if method == "uce" else None)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- one row


class _Table:
    """What every row shares: the configuration, the folders, the classifier, the judge, the targets."""

    def __init__(self, cfg: TableConfig, out: Path, work: Path) -> None:
        from salun_ext.data import load_dataset
        from salun_ext.diffusion.evaluation import scoring_classifier
        from salun_ext.diffusion.judges import ClassifierJudge

        self.cfg, self.out, self.work = cfg, out, work
        self.source = ModelSource(pipeline=cfg.pipeline)
        self.resolution = _pipeline_resolution(cfg.pipeline)
        self.test = load_dataset("digits", train=False)
        quiet = RunOptions(device=cfg.device, progress=False)
        self.classifier = scoring_classifier(load_dataset("digits", train=True), self.resolution, quiet,
                                             load=cfg.classifier_path)  # fmt: skip
        self.judge = ClassifierJudge.from_state_dict(cfg.classifier_path, cfg.forget_id, image_size=self.resolution)
        self.rows = attack_rows(cfg)
        self.config = cfg.attack_config()

    def options(self, seed: int) -> RunOptions:
        return RunOptions(device=self.cfg.device, seed=seed, amp="none", progress=self.cfg.progress)

    def targets(self):
        """targets(row): the original model's image of each attacked prompt (work/targets, made once)."""
        from salun_ext.diffusion import attack

        folder = self.work / "targets"
        missing = [r for r in self.rows if not (folder / f"{r.index:05d}.png").is_file()]
        if missing:
            attack.generate_targets(self.source.load(self.cfg.device), missing, folder, self.config, progress=False)
        return lambda row: attack.load_target_image(folder / f"{row.index:05d}.png")


def _pipeline_resolution(pipeline: str) -> int:
    unet, vae = Path(pipeline) / "unet" / "config.json", Path(pipeline) / "vae" / "config.json"
    if not unet.is_file() or not vae.is_file():
        raise MissingFileError(f"pipeline (--pipeline): expected a digits pipeline folder with unet/ and vae/, got "
                               f"{pipeline!r}")  # fmt: skip
    levels = len(json.loads(vae.read_text())["block_out_channels"])
    return int(json.loads(unet.read_text())["sample_size"]) * 2 ** (levels - 1)


def _evaluate(table: _Table, sd, name: str, seed: int | None) -> dict:
    """The digits evaluation of one model; the original's images are kept for the before/after grids, and the
    first seed's images of each method become out/grids/<method>.png."""
    from salun_ext.diffusion.evaluation import before_after_grid, first_per_class
    from salun_ext.diffusion.text_digits import evaluate_text_digits
    from salun_ext.utils import atomic_save

    report, gen = evaluate_text_digits(sd, table.classifier, table.test, table.cfg.evaluation())
    show = min(5, table.cfg.n_per_class)
    pick = first_per_class(gen.labels, range(len(NUMBER_WORDS)), show)  # the first phrasing of each class
    if name == "original":
        atomic_save(gen.images[pick], table.work / "original_images.pt")
    elif seed == table.cfg.seeds[0]:
        before = torch.load(table.work / "original_images.pt", weights_only=True)
        before_after_grid(before, gen.images[pick], table.out / "grids" / f"{name}.png", nrow=show,
                          row_labels=list(NUMBER_WORDS), titles=("original", f"{LABELS[name]} (seed {seed})"),
                          highlight_rows=[table.cfg.forget_id])  # fmt: skip
    keep = ("UA", "retain_accuracy", "mean_accuracy", "per_class_accuracy", "per_phrasing_accuracy")
    return {**{k: report[k] for k in keep}, "frechet": report["frechet"]["value"],
            "frechet_label": report["frechet"]["label"], "images": len(gen.images)}  # fmt: skip


def _attack(table: _Table, sd, folder: Path, seed: int) -> dict:
    from salun_ext.diffusion.attack import run_attack

    summary = run_attack(sd, table.rows, table.targets(), table.judge, folder, table.config, seed=seed,
                         progress=False)  # fmt: skip
    return {k: summary[k] for k in ("prompts", "pre_successes", "successes", "pre_asr", "asr", "per_prompt")}


def _unlearn(table: _Table, method: str, seed: int) -> tuple[Path, dict]:
    """The unlearned pipeline of (method, seed) in work/seed<s>/<method> (made unless it is there)."""
    from salun_ext.diffusion.methods import METHODS
    from salun_ext.diffusion.workflows import make_masks, unlearn_folder

    folder = table.work / f"seed{seed}" / method
    log = folder / "unlearn_log.json"
    mask_seconds = 0.0
    if not log.is_file():
        mask = None
        if method == "salun":
            mask = table.work / f"seed{seed}" / "mask.safetensors"
            if not mask.is_file():
                start = time.perf_counter()
                make_masks(table.source, table.cfg.forget_data(), [table.cfg.mask_ratio], str(mask),
                           dataclasses.replace(table.options(seed), progress=False))  # fmt: skip
                mask_seconds = time.perf_counter() - start
        spec = unlearn_spec(method, table.cfg, mask)
        unlearn_folder(table.source, table.cfg.forget_data(), spec, folder, table.options(seed))
    record = json.loads(log.read_text(encoding="utf-8"))
    closed = METHODS.get_class(method).closed_form
    return folder, {"seconds": record["seconds"], "mask_seconds": round(mask_seconds, 1), "closed_form": closed,
                    **hyperparameters(method, table.cfg)}  # fmt: skip


def _row(table: _Table, name: str, seed: int | None) -> dict:
    """One row (the original, or a method at a seed): reused from out/<row>/result.json when it is there."""
    key = "original" if name == "original" else f"seed{seed}/{name}"
    path = table.out / key / "result.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    start = time.perf_counter()
    if name == "original":
        pipeline, unlearned = Path(table.cfg.pipeline), None
    else:
        pipeline, unlearned = _unlearn(table, name, seed)
    after_unlearn = time.perf_counter()
    sd = ModelSource(pipeline=str(pipeline)).load(table.cfg.device)
    evaluation = _evaluate(table, sd, name, seed)
    after_eval = time.perf_counter()
    attacked = _attack(table, sd, table.work / key / "attack", 0 if seed is None else seed)
    end = time.perf_counter()
    result = {"row": key, "method": name, "seed": seed, "unlearn": unlearned, "evaluation": evaluation,
              "attack": attacked, "seconds": {"unlearn": round(after_unlearn - start, 1),
                                              "evaluate": round(after_eval - after_unlearn, 1),
                                              "attack": round(end - after_eval, 1), "total": round(end - start, 1)},
              "date": _now()}  # fmt: skip
    write_json(result, path)
    return result


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ---------------------------------------------------------------------------------------------------- the table


def run_text_digits_table(cfg: TableConfig, out: PathLike, work: PathLike) -> dict:
    """Every row (the original, then each seed x method), resumable; writes summary.json and README.md to `out`.
    Returns the summary."""
    from tqdm.auto import tqdm

    from salun_ext.utils import OutputFolder

    for what, folder in (("forget_images (--forget-images)", cfg.forget_images),
                         ("retain_images (--retain-images)", cfg.retain_images)):  # fmt: skip
        if not Path(folder).is_dir():
            raise MissingFileError(f"{what}: expected a folder of images, got {folder!r} (not found)")
    if not cfg.classifier_path.is_file():
        raise MissingFileError(f"classifier (--classifier): expected the digits scoring classifier's state_dict, "
                               f"got {str(cfg.classifier_path)!r} (not found)")  # fmt: skip
    out, work = Path(out), Path(work)
    start = time.perf_counter()
    with OutputFolder(out, what="--out"), OutputFolder(work, what="--work"):
        table = _Table(cfg, out, work)
        jobs = [("original", None)] + [(m, s) for s in cfg.seeds for m in cfg.methods]
        rows = [_row(table, name, seed) for name, seed in tqdm(jobs, desc="table", disable=not cfg.progress)]
        summary = table_summary(cfg, rows, time.perf_counter() - start)
        summary["command"] = table_command(cfg, out, work)
        write_json(summary, out / "summary.json")
        notes = out / "notes.md"
        text = render_table(summary, notes.read_text(encoding="utf-8") if notes.is_file() else "")
        _write_text(text, out / "README.md")
    return summary


def _write_text(text: str, path: Path) -> None:
    from salun_ext.utils import atomic_save

    def dump(value: str, target: str) -> None:
        Path(target).write_text(value, encoding="utf-8")

    atomic_save(text, path, saver=dump)


def _mean_std(values: list[float | None]) -> dict[str, float | None]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}


def _metrics(row: dict) -> dict[str, float | None]:
    ev, at = row["evaluation"], row["attack"]
    return {"UA": ev["UA"], "retain_accuracy": ev["retain_accuracy"], "frechet": ev["frechet"],
            "pre_asr": at["pre_asr"], "asr": at["asr"]}  # fmt: skip


def table_summary(cfg: TableConfig, rows: list[dict], seconds: float) -> dict:
    """Per method: the mean and sample std over seeds of UA, kept-class accuracy, Fréchet proxy, Pre-ASR, ASR;
    the rows; the seconds each step took (summed over the rows: the table's compute, resumed runs included)."""
    methods: dict[str, Any] = {}
    for name in ["original", *cfg.methods]:
        mine = [r for r in rows if r["method"] == name]
        per = [_metrics(r) for r in mine]
        methods[name] = {"label": LABELS.get(name, name), "seeds": [r["seed"] for r in mine],
                         **{m: _mean_std([p[m] for p in per]) for m in METRICS},
                         "seconds": round(sum(r["seconds"]["total"] for r in mine), 1),
                         "hyperparameters": hyperparameters(name, cfg) if name != "original" else None}  # fmt: skip
    steps = {k: round(sum(r["seconds"][k] for r in rows), 1) for k in ("unlearn", "evaluate", "attack", "total")}
    return {"config": dataclasses.asdict(cfg), "attack": dataclasses.asdict(cfg.attack_config()),
            "attack_prompts": [dataclasses.asdict(r) for r in attack_rows(cfg)], "methods": methods,
            "rows": rows, "compute_seconds": steps, "this_run_seconds": round(seconds, 1),
            "frechet_label": rows[0]["evaluation"]["frechet_label"], "machine": machine_record(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "date": _now(),
            "rows_dates": [min(r.get("date", "") for r in rows), max(r.get("date", "") for r in rows)]}  # fmt: skip


def table_command(cfg: TableConfig, out: PathLike, work: PathLike) -> str:
    """The shell command that makes (or resumes) this table: every setting of `cfg` spelled out."""
    flags = [f"--pipeline {cfg.pipeline}", f"--forget-images {cfg.forget_images}",
             f"--retain-images {cfg.retain_images}", f"--classifier {cfg.classifier_path}",
             f"--forget-class {cfg.forget_class}", f"--retain-class {cfg.retain_class}",
             "--seeds " + " ".join(map(str, cfg.seeds)), "--methods " + " ".join(cfg.methods),
             f"--lr-scale {cfg.lr_scale:g}", f"--max-steps {cfg.max_steps}", f"--n-per-class {cfg.n_per_class}",
             f"--eval-steps {cfg.eval_steps}", "--attack-seeds " + " ".join(map(str, cfg.attack_seeds)),
             f"--attack-timesteps {cfg.attack_timesteps}", f"--attack-iterations {cfg.attack_iterations}",
             f"--attack-sampling-steps {cfg.attack_sampling_steps}", f"--device {cfg.device}", f"--work {work}",
             f"--out {out}"]  # fmt: skip
    return "salun-ext diffusion text-digits-table \\\n    " + " \\\n    ".join(flags)


def _cell(stat: dict, digits: int = 1) -> str:
    if stat["mean"] is None:
        return "-"
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def render_table(summary: dict, notes: str = "") -> str:
    """The results page: the command, machine and times, the table, how it was measured, the per-seed rows, the
    grids, then `notes` (the hand-written reading of the table)."""
    cfg = summary["config"]
    grids = [f"![{LABELS[n]}: original (left) vs unlearned (right), rows zero..nine](grids/{n}.png)"
             for n in cfg["methods"]]  # fmt: skip
    lines = [*_header(summary), _table(summary), "", *_protocol(summary), "", _rows(summary), "", *grids, "",
             notes.strip()]  # fmt: skip
    return "\n".join(lines).rstrip() + "\n"


def _header(summary: dict) -> list[str]:
    cfg, m, sec = summary["config"], summary["machine"], summary["compute_seconds"]
    title = f'# Forgetting "{caption(class_index(cfg["forget_class"]))}" on the text-to-image digits model'
    return [f"{title}: five methods, attacked", "", "```bash", f"OMP_NUM_THREADS=1 {summary.get('command', '')}",
            "```", "", f"Rows computed {summary['rows_dates'][0]} to {summary['rows_dates'][1]}. Machine: "
            f"{m['platform']} ({m['processor']}), {m['torch_threads']} torch thread(s), device {cfg['device']}, torch "
            f"{m['torch']}; load average at the end {summary['load_average']}.",
            f"Compute: {sec['total']} s in all (unlearning {sec['unlearn']} s, evaluation {sec['evaluate']} s, "
            f"attack {sec['attack']} s), summed over the rows.", ""]  # fmt: skip


def _protocol(summary: dict) -> list[str]:
    cfg, at = summary["config"], summary["attack"]
    digit = class_index(cfg["forget_class"])
    return [f"Seeds {cfg['seeds']}; mean ± sample std over seeds. UA: % of generated '{cfg['forget_class']}' images "
            f"the digits classifier does not call {digit}; kept: its accuracy on the other nine classes; Fréchet: "
            f"{summary['frechet_label']}, the kept classes' images vs the real test digits ({cfg['n_per_class']} "
            f"images per class and phrasing, {cfg['eval_steps']} DDIM steps, guidance {SAMPLE_GUIDANCE}, the same "
            "noise for every model).",
            f"Attack: {len(summary['attack_prompts'])} prompts (each phrasing x generation seeds "
            f"{cfg['attack_seeds']}, guidance {SAMPLE_GUIDANCE}), k = {at['k']} tokens, {at['timesteps']} timesteps x "
            f"{at['iterations']} Adam steps, {at['sampling_steps']} LMS steps per judged image; the judge is the "
            f"digits classifier (success: top-1 = {digit})."]  # fmt: skip


def hyperparameter_cell(hp: dict | None) -> str:
    """A method's learning rate and budget as the table shows them ("-": the original; UCE: "closed form")."""
    if hp is None:
        return "-"
    if not hp:
        return "closed form"
    if hp["steps"] or hp["recipe_steps"]:
        budget = f"{hp['steps'] or hp['recipe_steps']} steps"
    else:
        budget = f"{hp['recipe_epochs']} epochs"
    return f"lr {hp['lr']:.3g}, {budget}"


def _table(summary: dict) -> str:
    head = ["| method | hyperparameters | UA (%) | kept classes (%) | Fréchet proxy | Pre-ASR (%) | ASR (%) | "
            "s, all seeds |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in summary["methods"].values():
        cells = [_cell(s[m]) for m in METRICS]
        head.append(f"| {s['label']} | {hyperparameter_cell(s['hyperparameters'])} | {' | '.join(cells)} | "
                    f"{s['seconds']} |")  # fmt: skip
    return "\n".join(head)


def _rows(summary: dict) -> str:
    lines = ["| row | UA | kept | Fréchet | Pre-ASR | ASR | unlearn / evaluate / attack s |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in summary["rows"]:
        v, s = _metrics(r), r["seconds"]
        lines.append(
            f"| {r['row']} | {v['UA']:.1f} | {v['retain_accuracy']:.1f} | {v['frechet']:.1f} | "
            f"{v['pre_asr']:.1f} | {v['asr']:.1f} | {s['unlearn']} / {s['evaluate']} / {s['attack']} |"
        )
    return "\n".join(lines)
