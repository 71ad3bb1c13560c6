"""The LM workflows the CLI runs (`salun-ext lm unlearn|evaluate`), written once in the library.

    unlearn_folder(source, config, options, out, ...)   load -> (evaluate) -> mask -> unlearn -> (evaluate) -> write
    evaluate_texts(model, tokenizer, texts, ...)         forget/retain loss and perplexity, verbatim completion
    evaluate_benchmark(model, spec, ...)                 TOFU / MUSE metrics on a local folder (lm/benchmarks.py)
Outputs (rank 0): out/model/ (save_pretrained), out/mask.safetensors (a computed mask), out/metrics.json,
out/checkpoints/ (Engine checkpoints: --resume continues from them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

from salun_ext.lm import benchmarks
from salun_ext.lm.data import TextExample, encode, load_texts
from salun_ext.lm.evaluate import evaluate_lm
from salun_ext.lm.model import load_causal_lm, save_causal_lm
from salun_ext.lm.unlearn import LMUnlearnConfig, unlearn_lm
from salun_ext.train import RunOptions
from salun_ext.utils import OutputFolder, UsageError, write_json

OUTPUTS = ("mask.safetensors", "metrics.json")  # files of out/ a run may write (model/ is a folder)


@dataclasses.dataclass
class TextSource:
    """The model and the texts of an LM run."""

    model: str  # local save_pretrained folder or hub id
    forget: str  # .jsonl / .json records or a text file (a line each)
    retain: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False

    def load(self, device: Any) -> tuple[Any, Any, list[TextExample], list[TextExample] | None]:
        forget = load_texts(self.forget)
        retain = load_texts(self.retain) if self.retain else None
        model, tokenizer = load_causal_lm(
            self.model,
            dtype=self.dtype,
            device=device,
            gradient_checkpointing=self.gradient_checkpointing,
            trust_remote_code=self.trust_remote_code,
        )
        return model, tokenizer, forget, retain


@dataclasses.dataclass
class Evaluation:
    """How texts are scored (evaluate_lm's options)."""

    batch_size: int = 8
    max_length: int = 256
    amp: str = "none"
    prompt_tokens: int = 32
    completion_tokens: int = 32


def evaluate_texts(model, tokenizer, forget, retain, spec: Evaluation) -> dict:
    """Forget (and retain) loss / perplexity and the verbatim completion of the forget texts."""
    return evaluate_lm(
        model,
        tokenizer,
        encode(forget, tokenizer, spec.max_length),
        encode(retain, tokenizer, spec.max_length) if retain else None,
        batch_size=spec.batch_size,
        amp=spec.amp,
        prompt_tokens=spec.prompt_tokens,
        completion_tokens=spec.completion_tokens,
    )


def _starting_mask(given: str | None, out: str, config: LMUnlearnConfig, options: RunOptions, model) -> Any:
    """A given mask file, or on --resume the interrupted run's own mask (computed on the same initial model)."""
    from salun_ext.distributed import load_mask

    if given:
        return load_mask(given, params=model.named_parameters())
    path = os.path.join(out, "mask.safetensors")
    if options.resume and config.mask_ratio is not None and os.path.exists(path):
        mask = load_mask(path)
        if mask.ratio != config.mask_ratio:
            raise UsageError(f"{path}: saved for mask ratio {mask.ratio}, but --mask-ratio is {config.mask_ratio}")
        return mask
    return None


def unlearn_folder(
    source: TextSource,
    config: LMUnlearnConfig,
    options: RunOptions,
    out: str,
    *,
    evaluation: Evaluation,
    mask_file: str | None = None,
    evaluate: str = "after",
    ctx: Any = None,
    report=print,
) -> dict:
    """Unlearn `source`'s forget texts and (rank 0) write out/; returns the metrics. evaluate: after|both|none."""
    is_main = ctx is None or ctx.is_main
    with OutputFolder(out, what="--out") if is_main else contextlib.nullcontext() as folder:
        model, tokenizer, forget, retain = source.load(options.device)
        mask = _starting_mask(mask_file, out, config, options, model)
        metrics: dict = {"config": dataclasses.asdict(config), "seed": options.seed, "amp": options.amp}
        metrics.update(model=source.model, world_size=1 if ctx is None else ctx.world_size)
        if evaluate == "both":
            metrics["before"] = evaluate_texts(model, tokenizer, forget, retain, evaluation)
            report("before unlearning:", metrics["before"])
        result = unlearn_lm(model, tokenizer, forget, retain, config, options, mask=mask)
        written = {"metrics.json"}
        if result.mask is not None:
            if mask is None:  # computed here
                from salun_ext.distributed import save_mask

                save_mask(result.mask, os.path.join(out, "mask.safetensors"))
            if mask_file is None:  # computed here, or the resumed run's own: out/mask.safetensors is this run's
                written.add("mask.safetensors")
            metrics["mask"] = {"ratio": result.mask.ratio, "k": result.mask.k, "seconds": result.mask_seconds}
        fit = result.fit  # seconds: every segment of a resumed run
        metrics["train"] = {"seconds": fit.seconds, "steps": fit.steps, "history": fit.history}
        metrics["train"].update(resumed=fit.resumed, segments_seconds=fit.segments)
        if evaluate != "none":
            metrics["after"] = evaluate_texts(model, tokenizer, forget, retain, evaluation)
            report("after unlearning:", metrics["after"])
        if is_main:
            save_causal_lm(model, tokenizer, os.path.join(out, "model"))
            write_json(metrics, os.path.join(out, "metrics.json"))
            folder.remove_stale(list(OUTPUTS), written=written)  # e.g. an earlier run's mask, in a reused folder
    if ctx is not None:
        ctx.barrier()
    return metrics


@dataclasses.dataclass
class BenchmarkSpec:
    """`salun-ext lm evaluate --benchmark`: which benchmark, its folder, and where the retain model's numbers are."""

    name: str  # "tofu" or "muse"
    data: str  # the folder of the benchmark's files (lm/benchmarks.py)
    forget_split: str = "forget10"  # TOFU: {forget_split}_perturbed
    retain_results: str | None = None  # JSON: the retain model's truth ratios (TOFU) / Min-K% AUC (MUSE)
    retain_model: str | None = None  # or the retain model itself (scored here on the same files)
    options: benchmarks.BenchmarkOptions = dataclasses.field(default_factory=benchmarks.BenchmarkOptions)


def evaluate_benchmark(
    model_path: str, spec: BenchmarkSpec, *, device: Any = "cpu", dtype: str = "auto", trust_remote_code: bool = False
) -> dict:
    """TOFU or MUSE metrics of the model at `model_path` (the files are read before any model is loaded)."""
    if spec.name not in ("tofu", "muse"):
        raise UsageError(f"--benchmark must be tofu or muse, got {spec.name!r}")
    if spec.retain_results and spec.retain_model:
        raise UsageError("give the retain model's numbers as --retain-results FILE or --retain-model DIR, not both")
    opts = spec.options

    def load(path: str):
        return load_causal_lm(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)

    if spec.name == "tofu":
        data = benchmarks.load_tofu(spec.data, forget_split=spec.forget_split)
        reference = benchmarks.load_retain_truth_ratios(spec.retain_results) if spec.retain_results else None
        if spec.retain_model:
            retain_model, retain_tokenizer = load(spec.retain_model)
            scored = benchmarks.tofu_truth_ratios(retain_model, retain_tokenizer, data["forget"], opts)
            reference = [float(r) for r in scored["ratios"]]
            del retain_model
        model, tokenizer = load(model_path)
        result = benchmarks.evaluate_tofu(model, tokenizer, data, retain_truth_ratios=reference, options=opts)
    else:
        data = benchmarks.load_muse(spec.data)
        retain_auc = benchmarks.load_retain_auc(spec.retain_results) if spec.retain_results else None
        if spec.retain_model:
            if "privleak_forget" not in data:
                raise UsageError("--retain-model: MUSE's retain model is used for privleak: give privleak files")
            retain_model, retain_tokenizer = load(spec.retain_model)
            privacy = {k: v for k, v in data.items() if k.startswith("privleak")}
            retain_auc = benchmarks.evaluate_muse(retain_model, retain_tokenizer, privacy, options=opts)["privleak"][
                "auc"
            ]
            del retain_model
        model, tokenizer = load(model_path)
        result = benchmarks.evaluate_muse(model, tokenizer, data, retain_auc=retain_auc, options=opts)
    result.update(model=model_path, data=spec.data)
    return result
