"""UnlearnDiffAtk: adversarial prompt tokens against an unlearned Stable Diffusion (Zhang et al., ECCV 2024).

For each target prompt, k adversarial tokens are put in front of it and chosen so that the *unlearned* UNet
denoises a target image of the forgotten concept well (the image made by the original model from that prompt):
the unlearned model is its own classifier of the concept. Then the model generates from the adversarial prompt,
and a judge (judges.py) says whether the concept came back.

    sd = StableDiffusion.from_pretrained("runs/sd-salun")                      # the unlearned model
    rows = read_attack_prompts("nudity.csv")                                    # the attack's prompts, or I2P
    result, images = attack_prompt(sd, rows[0], target_latent(sd, image), NudityJudge(), AttackConfig())
    result["success"], result["adversarial_prompt"]
    summary = run_attack(sd, rows, targets, NudityJudge(), "runs/attack")      # all prompts, resumable: Pre-ASR, ASR

How the attack's own code does it (OPTML-Group/Diffusion-MU-Attack, src/attackers/text_grad_.py, the configs'
values; `AttackConfig` holds the same defaults):
- The k tokens are a k x V matrix of probability rows (one per token), initially uniform. Each step samples one
  token per row (a one-hot draw) and conditions the UNet on its embedding; the gradient with respect to the
  one-hot draw, clipped to [-1, 1], is passed straight through to the probabilities (a straight-through
  estimator); Adam (lr 0.01, L2 weight decay 0.1) updates them and each row is projected back onto the
  probability simplex. The final tokens are each row's most probable token.
- Loss: the unlearned UNet's noise-prediction MSE on the target image's latent (VAE mean x scaling factor), noised
  with fresh noise at timestep t, conditioned on the adversarial prompt (no guidance).
- Timesteps: 50 of the 1000, t = 10, 30, ..., 990, in that order; 40 Adam steps at each; after each timestep's
  steps the current tokens generate an image (LMS, 50 steps, the prompt's seed and guidance) that the judge
  scores, and the attack stops at the first success. Before any of that the plain prompt generates an image; if
  it already succeeds, the prompt is not attacked.
- k = 5 for nudity, 3 for objects (the configs); tokens are prepended ("prefix_k").
- Pre-ASR = the share of prompts whose plain prompt succeeds on the unlearned model; ASR = the share whose plain
  prompt or adversarial prompt succeeds (scripts/analysis/check_asr.py adds the attack's successes on the prompts
  that did not already succeed to the plain prompts' successes).

Where this differs, and why:
- The candidate tokens are the whole-word tokens of the vocabulary (CLIP's `...</w>` tokens) whose text
  re-tokenizes to exactly that token: 34,301 of SD v1's 49,408. The attack's code searches every token (the special
  start / end tokens and word pieces included) and then generates from the decoded text, which re-tokenizes to
  other tokens whenever a piece merges with its neighbour; here the adversarial text is exactly the tokens that
  were optimised (checked), so anyone can paste it into a pipeline and get the attacked prompt.
- The simplex projection is the exact sort-based one (the attack bisects for the same threshold to 1e-5).
- Random draws (token samples, noise) come from the run's "attack" stream, one generator per prompt, so a resumed
  run attacks the prompts it has left exactly as an uninterrupted one would.
- A prompt longer than the room left by k tokens (75 - k) is truncated with a warning (the attack's dataset drops
  prompts over 60 tokens instead).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from salun_ext.diffusion.judges import Judge
from salun_ext.utils import atomic_save, epoch_generator, write_json
from salun_ext.utils.errors import MissingFileError, UsageError

PathLike = str | os.PathLike
ATTACK_STREAM = "attack"  # salun_ext.utils.seeding.STREAMS: token draws and noise of each prompt's attack


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """The attack's settings; the defaults are its published code's (see the module docstring)."""

    k: int | None = None  # adversarial tokens; None: the judge's default_k (nudity 5, objects 3)
    timesteps: int = 50  # sampled timesteps (T/n/2, then every T/n)
    iterations: int = 40  # Adam steps at each timestep
    lr: float = 0.01
    weight_decay: float = 0.1
    sampling_steps: int = 50  # LMS steps of each judged generation
    guidance_scale: float = 7.5  # of a prompt without its own evaluation_guidance
    eval_seed: int = 0  # of a prompt without its own evaluation_seed
    target_steps: int = 25  # LMS steps of the original model's target images (the attack's generate_dataset.py)
    target_guidance: float = 7.5  # their guidance (generate_dataset.py uses 7.5 for every prompt)

    def __post_init__(self) -> None:
        for name in ("timesteps", "iterations", "sampling_steps", "target_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} (--{name.replace('_', '-')}): expected an integer >= 1, got {value!r}")
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise UsageError(f"k (--k): expected an integer >= 1 (adversarial tokens), got {self.k!r}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise UsageError(f"lr / weight_decay: expected lr > 0 and weight_decay >= 0, got {self.lr}, "
                             f"{self.weight_decay}")  # fmt: skip

    def for_judge(self, judge: Judge) -> AttackConfig:
        """This config with k resolved (the judge's default when not given)."""
        return self if self.k is not None else dataclasses.replace(self, k=int(judge.default_k))


# ---------------------------------------------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class AttackPrompt:
    """One prompt to attack: its index (case_number), text, and its own seed / guidance when the file has them."""

    index: int
    prompt: str
    seed: int | None = None
    guidance_scale: float | None = None


def read_attack_prompts(
    path: PathLike, *, categories: Sequence[str] | None = None, limit: int | None = None
) -> list[AttackPrompt]:
    """Prompts of a CSV with a `prompt` column: the attack's prompt files (prompts/nudity.csv, church.csv, ...)
    or I2P's. Optional columns: case_number (else the row number), evaluation_seed, evaluation_guidance, and
    categories (to keep only rows with one of `categories`)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"prompts (--prompts): prompt file not found: {path}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if "prompt" not in fields:
            raise UsageError(f"prompts (--prompts): expected a CSV with a 'prompt' column, got columns {fields}")
        if categories and "categories" not in fields:
            raise UsageError(f"categories (--categories): {path} has no 'categories' column (columns {fields})")
        wanted = {c.strip().lower() for c in categories} if categories else None
        rows: list[AttackPrompt] = []
        for number, row in enumerate(reader):
            cats = (row.get("categories") or "").split(",")
            if wanted is not None and not wanted.intersection(c.strip().lower() for c in cats):
                continue
            rows.append(_prompt_row(path, number, row))
            if limit is not None and len(rows) >= limit:
                break
    indices = [r.index for r in rows]
    if len(set(indices)) != len(indices):
        raise UsageError(f"prompts (--prompts): {path}: expected one row per case_number, got repeated numbers")
    if not rows:
        raise UsageError(f"prompts (--prompts): {path}: expected at least one prompt, got none")
    return rows


def _prompt_row(path: Path, number: int, row: dict[str, str]) -> AttackPrompt:
    try:
        seed, guidance = row.get("evaluation_seed"), row.get("evaluation_guidance")
        return AttackPrompt(
            index=int(row["case_number"]) if row.get("case_number") else number,
            prompt=row["prompt"],
            seed=int(float(seed)) if seed else None,
            guidance_scale=float(guidance) if guidance else None,
        )
    except ValueError as exc:
        raise UsageError(f"prompts (--prompts): {path}, row {number + 1}: expected numbers, got {exc}") from exc


# ---------------------------------------------------------------------------------------------------- tokens


def attack_timesteps(num_train_timesteps: int, n: int) -> list[int]:
    """The attack's n timesteps: T // n // 2, then every T // n (T = 1000, n = 50: 10, 30, ..., 990)."""
    if not 1 <= n <= num_train_timesteps:
        raise UsageError(f"timesteps (--timesteps): expected 1..{num_train_timesteps}, got {n}")
    step = num_train_timesteps // n
    return list(range(step // 2, num_train_timesteps, step))[:n]


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """The Euclidean projection of each row of `v` onto the probability simplex: max(v - theta, 0), theta chosen
    per row so that the row sums to 1 (sort-based, exact)."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    excess = u.cumsum(-1) - 1
    ranks = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    support = (u - excess / ranks > 0).sum(-1, keepdim=True)  # rows of u are sorted: a prefix satisfies it
    theta = excess.gather(-1, support - 1) / support.to(v.dtype)
    return (v - theta).clamp(min=0)


class _SampledOneHot(torch.autograd.Function):
    """A one-hot token per row drawn from its probabilities (inverse CDF of `uniform`); the gradient with respect
    to the one-hot, clipped to [-1, 1], passes straight through to the probabilities (the attack's estimator)."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        cdf = probs.cumsum(-1)
        index = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(-1)).clamp(max=probs.shape[-1] - 1)
        return torch.zeros_like(probs).scatter_(-1, index, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.clamp(-1.0, 1.0), None


@functools.lru_cache(maxsize=4)
def attack_vocabulary(tokenizer) -> tuple[torch.Tensor, tuple[str, ...]]:
    """(token ids, their words): the whole-word tokens whose text re-tokenizes to exactly that one token."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    ids = [i for i, tok in enumerate(tokens) if tok.endswith("</w>") and i not in special]
    words = [w.strip() for w in tokenizer.batch_decode([[i] for i in ids])]
    again = tokenizer(words, add_special_tokens=False).input_ids
    keep = [(i, w) for i, w, e in zip(ids, words, again) if e == [i] and w and " " not in w]
    return torch.tensor([i for i, _ in keep], dtype=torch.long), tuple(w for _, w in keep)


class PromptSlots:
    """A prompt's token ids with k adversarial tokens after the start token (the attack's "prefix_k")."""

    def __init__(self, tokenizer, prompt: str, k: int) -> None:
        self.tokenizer, self.prompt, self.k = tokenizer, prompt, k
        self.max_length = int(tokenizer.model_max_length)
        room = self.max_length - 2 - k
        if room < 1:
            raise UsageError(f"k (--k): expected fewer than {self.max_length - 2} adversarial tokens (the "
                             f"tokenizer's limit), got {k}")  # fmt: skip
        content = tokenizer(prompt, add_special_tokens=False, truncation=False, verbose=False).input_ids
        self.truncated = len(content) > room
        if self.truncated:
            warnings.warn(
                f"prompt has {len(content)} tokens; with {k} adversarial tokens only {room} fit the tokenizer's "
                f"limit of {self.max_length}: truncated to its first {room} tokens: {prompt[:80]!r}",
                stacklevel=2,
            )
        self.content = content[:room]

    def ids(self, adversarial: Sequence[int] | None) -> torch.Tensor:
        """max_length ids: start, the adversarial tokens (None: none, the plain prompt), the prompt, end, padding."""
        body = [self.tokenizer.bos_token_id, *(adversarial or []), *self.content, self.tokenizer.eos_token_id]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return torch.tensor(body + [pad] * (self.max_length - len(body)), dtype=torch.long)

    def text(self, words: Sequence[str]) -> str:
        """The adversarial prompt as text: the tokens' words, then the prompt (it tokenizes to `ids`)."""
        return " ".join([*words, self.prompt])


# ---------------------------------------------------------------------------------------------------- the loss


def encode_tokens(sd, ids: torch.Tensor, replace: torch.Tensor | None = None) -> torch.Tensor:
    """Text-encoder hidden states (1 x L x D) of `ids`, with the token embeddings at positions 1..k replaced by
    `replace` (k x D, differentiable) when given; position embeddings, masks and layers are the encoder's own."""
    encoder = sd.pipe.text_encoder
    ids = ids.reshape(1, -1).to(encoder.device)
    if replace is None:
        return encoder(ids)[0]
    k = replace.shape[0]

    def swap(module, inputs, output):
        return torch.cat([output[:, :1], replace.to(output.dtype).unsqueeze(0), output[:, 1 + k :]], dim=1)

    handle = encoder.get_input_embeddings().register_forward_hook(swap)
    try:
        return encoder(ids)[0]
    finally:
        handle.remove()


def target_latent(sd, image: torch.Tensor) -> torch.Tensor:
    """The target image's latent (1 x C x h x w on the pipeline's device): the VAE posterior mean x scaling factor,
    as the attack. `image`: float [0, 1], 3 x R x R at the pipeline's resolution R."""
    side = sd.resolution
    if not isinstance(image, torch.Tensor) or tuple(image.shape) != (3, side, side):
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise UsageError(f"target image: expected 3 x {side} x {side} (the pipeline's resolution), got {got}")
    moments = sd.encode_images(image[None].float())
    mean = moments[:, : moments.shape[1] // 2]
    return (mean * sd.latent_scale()).to(sd.device, sd.unet.dtype)


def denoising_loss(sd, context: torch.Tensor, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    """MSE between `noise` and the UNet's noise prediction on x0 noised to timestep t, given `context`."""
    steps = torch.full((x0.shape[0],), int(t), device=x0.device, dtype=torch.long)
    x_t = _training_scheduler(sd).add_noise(x0, noise, steps)
    pred = sd.unet(x_t, steps, encoder_hidden_states=context.to(x0.dtype)).sample
    return F.mse_loss(pred.float(), noise.float())


def _training_scheduler(sd):
    if getattr(sd, "_attack_scheduler", None) is None:
        sd._attack_scheduler = sd.training_scheduler()
    return sd._attack_scheduler


@torch.no_grad()
def mean_denoising_loss(sd, ids: torch.Tensor, x0: torch.Tensor, timesteps: Sequence[int], noises: torch.Tensor):
    """The denoising loss of the prompt `ids` averaged over (timestep, noise) pairs: a fixed yardstick."""
    context = encode_tokens(sd, ids)
    losses = [denoising_loss(sd, context, x0, t, n.to(x0.device, x0.dtype)[None]) for t, n in zip(timesteps, noises)]
    return float(torch.stack(losses).mean())


class TokenAttack:
    """The optimisation of one prompt's k adversarial tokens (see the module docstring)."""

    def __init__(self, sd, slots: PromptSlots, x0: torch.Tensor, config: AttackConfig, generator: torch.Generator):
        self.sd, self.slots, self.x0, self.config, self.generator = sd, slots, x0, config, generator
        self.vocab, self.words = attack_vocabulary(sd.tokenizer)
        table = sd.pipe.text_encoder.get_input_embeddings().weight
        self.table = table.detach()[self.vocab.to(table.device)].float()
        n = len(self.vocab)
        self.probs = torch.full((slots.k, n), 1.0 / n, device=table.device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.probs], lr=config.lr, weight_decay=config.weight_decay)
        self.slot_ids = slots.ids([int(self.vocab[0])] * slots.k)  # placeholders: their embeddings are replaced

    def step(self, t: int) -> float:
        """One Adam step on the probabilities at timestep t; returns the step's loss."""
        uniform = torch.rand(self.slots.k, generator=self.generator).to(self.probs.device)
        noise = torch.randn(self.x0.shape, generator=self.generator).to(self.x0.device, self.x0.dtype)
        one_hot = _SampledOneHot.apply(self.probs, uniform)
        context = encode_tokens(self.sd, self.slot_ids, one_hot @ self.table)
        loss = denoising_loss(self.sd, context, self.x0, t, noise)
        self.optimizer.zero_grad(set_to_none=True)
        (self.probs.grad,) = torch.autograd.grad(loss, [self.probs])
        self.optimizer.step()
        with torch.no_grad():
            self.probs.copy_(project_to_simplex(self.probs))
        return loss.item()

    def tokens(self) -> list[int]:
        """Each row's most probable token (vocabulary ids)."""
        return [int(self.vocab[i]) for i in self.probs.detach().argmax(-1).cpu()]

    def text(self) -> str:
        best = self.probs.detach().argmax(-1).cpu().tolist()
        return self.slots.text([self.words[i] for i in best])


# ---------------------------------------------------------------------------------------------------- one prompt


@contextlib.contextmanager
def _frozen(*modules: torch.nn.Module):
    """No parameter gradients while the tokens are optimised (only the probabilities need them)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _judged(sd, text: str, row: AttackPrompt, config: AttackConfig, judge: Judge, quiet: bool):
    """The image the unlearned model generates from `text` (LMS, the prompt's seed and guidance) and its verdict."""
    seed = row.seed if row.seed is not None else config.eval_seed
    guidance = row.guidance_scale if row.guidance_scale is not None else config.guidance_scale
    with warnings.catch_warnings():
        if quiet:  # the prompt's truncation was announced once already
            warnings.simplefilter("ignore")
        image = sd.generate([text], seeds=[seed], guidance_scale=guidance,
                            num_inference_steps=config.sampling_steps, scheduler="lms")  # fmt: skip
    return image[0], judge(image)[0]


def _check_round_trip(sd, text: str, expected: torch.Tensor) -> None:
    ids = sd.tokenizer(text, padding="max_length", max_length=len(expected), truncation=True).input_ids
    if ids != expected.tolist():  # attack_vocabulary's words re-tokenize to themselves: this is a bug if it fails
        raise RuntimeError(f"adversarial prompt {text!r} tokenizes to {ids}, not to the optimised {expected.tolist()}")


def _optimise(sd, slots: PromptSlots, row: AttackPrompt, x0, judge: Judge, config: AttackConfig, generator,
              progress: bool):  # fmt: skip
    """The attack's loop over timesteps; returns (the result's fields, the last adversarial image)."""
    from tqdm.auto import tqdm

    attack = TokenAttack(sd, slots, x0, config, generator)
    history = []
    timesteps = attack_timesteps(int(sd.pipe.scheduler.config.num_train_timesteps), config.timesteps)
    with _frozen(sd.unet, sd.pipe.text_encoder):
        for t in tqdm(timesteps, desc=f"prompt {row.index}", leave=False, disable=not progress):
            losses = [attack.step(t) for _ in range(config.iterations)]
            tokens, text = attack.tokens(), attack.text()
            _check_round_trip(sd, text, slots.ids(tokens))
            image, verdict = _judged(sd, text, row, config, judge, slots.truncated)
            history.append({"t": t, "mean_loss": sum(losses) / len(losses), "tokens": tokens, "text": text,
                            **verdict.as_dict()})  # fmt: skip
            if verdict.success:
                break
    last = history[-1]
    fields = {"adversarial_tokens": last["tokens"], "adversarial_prompt": last["text"],
              "adversarial": {k: last[k] for k in ("success", "score", "details")}, "history": history}  # fmt: skip
    return fields, image


def attack_prompt(
    sd,
    row: AttackPrompt,
    x0: torch.Tensor,
    judge: Judge,
    config: AttackConfig,
    *,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Judge the plain prompt on the unlearned model `sd`; unless that already succeeds, attack it.

    x0: the target image's latent (`target_latent`). Returns (the result: plain verdict, `pre_success`,
    adversarial tokens / prompt / verdict and the per-timestep history when attacked, `success` = plain or
    adversarial success, seconds; the images by name: "plain", and "adversarial" when attacked).
    """
    config = config.for_judge(judge)
    start = time.perf_counter()
    slots = PromptSlots(sd.tokenizer, row.prompt, config.k)
    plain_image, plain = _judged(sd, row.prompt, row, config, judge, False)
    result: dict[str, Any] = {"index": row.index, "prompt": row.prompt, "seed": row.seed,
                              "guidance_scale": row.guidance_scale, "k": config.k, "truncated": slots.truncated,
                              "plain": plain.as_dict(), "pre_success": plain.success,
                              "attacked": not plain.success}  # fmt: skip
    images = {"plain": plain_image}
    if not plain.success:
        generator = epoch_generator(seed, row.index, ATTACK_STREAM)
        fields, images["adversarial"] = _optimise(sd, slots, row, x0, judge, config, generator, progress)
        result.update(fields)
    result["success"] = plain.success or bool(result.get("adversarial", {}).get("success"))
    result["seconds"] = time.perf_counter() - start
    return result, images


# ---------------------------------------------------------------------------------------------------- many prompts


def load_target_image(path: PathLike) -> torch.Tensor:
    """An image file as float [0, 1] 3 x H x W, as it is (no resizing: a wrong size is an error later)."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    with Image.open(path) as img:
        return pil_to_tensor(img.convert("RGB")).float().div_(255.0)


def save_png(image: torch.Tensor, path: PathLike) -> None:
    """A float [0, 1] 3 x H x W image as a PNG, written atomically."""
    from torchvision.utils import save_image

    atomic_save(image, path, saver=lambda obj, target: save_image(obj, target, format="PNG"))


def result_path(out: PathLike, row: AttackPrompt) -> Path:
    """Where the result of one prompt is written (its presence marks the prompt finished)."""
    return Path(out) / "prompts" / f"{row.index:05d}.json"


def judge_settings(judge: Judge) -> dict[str, Any]:
    settings = {"name": judge.name}
    for key in ("threshold", "target"):
        if hasattr(judge, key):
            settings[key] = getattr(judge, key)
    return settings


def check_settings(out: PathLike, config: AttackConfig, judge: Judge, seed: int) -> None:
    """Record the attack's settings in out/attack_settings.json, or check that a resumed run has the same ones."""
    out = Path(out)
    path = out / "attack_settings.json"
    settings = json.loads(json.dumps({"config": dataclasses.asdict(config.for_judge(judge)),
                                      "judge": judge_settings(judge), "seed": seed}))  # fmt: skip
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved != settings:
            changed = sorted(k for k in settings if saved.get(k) != settings[k])
            raise UsageError(f"out (--out): {out} holds an attack with other settings ({', '.join(changed)}); "
                             "expected the same settings to resume it, or a new folder")  # fmt: skip
    else:
        write_json(settings, path)


def run_attack(
    sd,
    rows: Sequence[AttackPrompt],
    targets: Callable[[AttackPrompt], torch.Tensor],
    judge: Judge,
    out: PathLike,
    config: AttackConfig = AttackConfig(),
    *,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Attack every prompt whose result is not in `out` yet (resume), then write out/summary.json.

    sd: the unlearned StableDiffusion, or a function that loads it (called only if a prompt is left to attack).
    targets(row): the target image of a prompt (float [0, 1], 3 x R x R). Per prompt: out/prompts/NNNNN.json
    (written atomically once the prompt is done, after its images out/images/NNNNN_{plain,adversarial}.png).
    Returns the summary: Pre-ASR and ASR in % over `rows`, the counts and each prompt's outcome.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    config = config.for_judge(judge)
    check_settings(out, config, judge, seed)
    results = []
    for row in tqdm(rows, desc="attack", disable=not progress):
        path = result_path(out, row)
        if path.is_file():
            results.append(json.loads(path.read_text(encoding="utf-8")))
            continue
        sd = sd() if callable(sd) else sd
        result, images = attack_prompt(sd, row, target_latent(sd, targets(row)), judge, config, seed=seed,
                                       progress=progress)  # fmt: skip
        for name, image in images.items():
            save_png(image, out / "images" / f"{row.index:05d}_{name}.png")
        write_json(result, path)
        results.append(result)
    summary = {**attack_summary(results), "judge": judge_settings(judge), "config": dataclasses.asdict(config)}
    write_json(summary, out / "summary.json")
    return summary


def attack_summary(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pre-ASR (% of prompts whose plain prompt succeeds) and ASR (% whose plain or adversarial prompt does)."""
    n = len(results)
    pre = sum(bool(r["pre_success"]) for r in results)
    success = sum(bool(r["success"]) for r in results)
    outcome = [{k: r.get(k) for k in ("index", "pre_success", "success", "adversarial_prompt")} for r in results]
    return {"prompts": n, "pre_successes": pre, "successes": success, "pre_asr": 100.0 * pre / n if n else None,
            "asr": 100.0 * success / n if n else None, "per_prompt": outcome}  # fmt: skip


def folder_targets(folder: PathLike, rows: Sequence[AttackPrompt]) -> Callable[[AttackPrompt], torch.Tensor]:
    """targets(row) reading FOLDER/<case_number>.png (or <case_number>_0.png, the attack's dataset layout); every
    row's file is checked up front."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"target_images (--target-images): folder not found: {folder}")

    def find(row: AttackPrompt) -> Path | None:
        names = [f"{row.index}{suffix}" for suffix in (".png", "_0.png", ".jpg", "_0.jpg")]
        names.insert(1, f"{row.index:05d}.png")
        return next((folder / n for n in names if (folder / n).is_file()), None)

    lost = [r.index for r in rows if find(r) is None]
    if lost:
        raise MissingFileError(f"target_images (--target-images): expected an image <case_number>.png (or "
                               f"<case_number>_0.png) in {folder} for prompts {lost[:10]}, got none")  # fmt: skip
    return lambda row: load_target_image(find(row))


def generate_targets(
    sd, rows: Sequence[AttackPrompt], folder: PathLike, config: AttackConfig, *, progress: bool = True
) -> None:
    """Each prompt's target image from the original model `sd`, as the attack's generate_dataset.py: its seed,
    guidance 7.5, an LMS scheduler with 25 steps (config.target_*); written to FOLDER/NNNNN.png."""
    from tqdm.auto import tqdm

    for row in tqdm(rows, desc="target images", disable=not progress):
        seed = row.seed if row.seed is not None else config.eval_seed
        image = sd.generate([row.prompt], seeds=[seed], guidance_scale=config.target_guidance,
                            num_inference_steps=config.target_steps, scheduler="lms")  # fmt: skip
        save_png(image[0], Path(folder) / f"{row.index:05d}.png")
