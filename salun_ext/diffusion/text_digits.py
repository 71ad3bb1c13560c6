"""A text-to-image Stable Diffusion pipeline that trains on a CPU in minutes: captioned handwritten digits.

    pipe = build_text_digits_pipeline(TextDigitsArch(), seed=0)          # random UNet / VAE / text encoder
    sd, fits = train_text_digits(pipe, TextDigitsTraining(), RunOptions(device="cpu"))
    sd.save_pretrained("runs/text-digits")   # a plain StableDiffusionPipeline folder
    images = sd.generate(["a handwritten digit three"], seeds=[0], guidance_scale=3.0)

The pipeline is a normal diffusers `StableDiffusionPipeline`: a `UNet2DConditionModel` with cross-attention on a
small `CLIPTextModel` behind the real CLIP BPE tokenizer of SD v1 (built offline from open_clip's
vocabulary), a 2-level `AutoencoderKL` (16x16 RGB images <-> 8x8x4 latents) and a DDIM scheduler with SD v1's
noise schedule. Everything the suite does on real Stable Diffusion (the SD adapter `sd.StableDiffusion`, masks,
SalUn / GA / ESD / FMN, sampling, evaluation) runs on it unchanged.

Training, through `salun_ext.train.fit` only (resumable with RunOptions.checkpoint_dir: phases in vae/, text/,
unet/):
1. the VAE as an autoencoder on the digits (reconstruction MSE + a small KL term), then its `scaling_factor` set
   to 1 / std of the latents (so the latent diffusion sees unit-variance inputs, as SD's 0.18215 does);
2. the text encoder as a caption classifier (`CaptionTask`): the stand-in for CLIP's pretraining;
3. the UNet with the SD adapter's own data path: images encoded once to VAE posterior moments, captions encoded
   once by the frozen text encoder into a PromptConditioner, and `EpsTask` (eps-MSE, captions dropped to "" with
   probability 0.1 for classifier-free guidance) on the adapter's training scheduler.
Each class has a few caption phrasings (`PHRASINGS`); every image is trained with each of them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from salun_ext.data import ImageDataset
from salun_ext.diffusion.core import DiffusionSet
from salun_ext.diffusion.ddpm import resize_images
from salun_ext.diffusion.methods import run_task
from salun_ext.diffusion.recipes import ddpm_training_recipe
from salun_ext.diffusion.tasks import EpsTask
from salun_ext.train.engine import FitResult
from salun_ext.train.options import RunOptions
from salun_ext.utils.errors import UsageError, usage_error
from salun_ext.utils.seeding import epoch_generator

PathLike = str | os.PathLike

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# (template, the word that fills it for each class): three phrasings per class
PHRASINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a handwritten digit {}", NUMBER_WORDS),
    ("a picture of the number {}", NUMBER_WORDS),
    ("the digit {} written by hand", tuple(str(i) for i in range(10))),
)
AUTOENCODER_STREAM = "autoencoder"  # the VAE's batches and posterior noise (salun_ext.utils.seeding.STREAMS)
# the results page's guidance; at SD's 7.5 the classes stay right but the samples lose diversity (Fréchet proxy 383
# vs 267 at 3.0, 150 images each)
SAMPLE_GUIDANCE = 3.0


def caption(class_id: int, phrasing: int = 0) -> str:
    """The caption of digit `class_id` in phrasing `phrasing` (e.g. 3, 0 -> "a handwritten digit three")."""
    if not 0 <= class_id < len(NUMBER_WORDS):
        raise usage_error("class_id", f"a digit 0..{len(NUMBER_WORDS) - 1}", class_id)
    if not 0 <= phrasing < len(PHRASINGS):
        raise usage_error("phrasing", f"an index 0..{len(PHRASINGS) - 1}", phrasing)
    template, words = PHRASINGS[phrasing]
    return template.format(words[class_id])


def class_captions(class_id: int) -> list[str]:
    """Every phrasing of one class's caption."""
    return [caption(class_id, p) for p in range(len(PHRASINGS))]


# ---------------------------------------------------------------------------------------------------- the model


@dataclasses.dataclass
class TextDigitsArch:
    """Sizes of the pipeline's components (defaults: a 0.8M-parameter UNet, 16x16 images)."""

    image_size: int = 16
    unet_channels: tuple[int, ...] = (32, 64)
    text_width: int = 32  # the text encoder's hidden size = the UNet's cross-attention width
    text_layers: int = 2
    vae_channels: tuple[int, ...] = (16, 32)  # 2 levels: one 2x downsampling (16x16 -> 8x8 latents)
    latent_channels: int = 4

    def __post_init__(self) -> None:
        factor = 2 ** (len(self.vae_channels) - 1)
        if self.image_size % factor or (self.image_size // factor) % 2 ** (len(self.unet_channels) - 1):
            raise usage_error("image_size", f"a multiple of {factor * 2 ** (len(self.unet_channels) - 1)} "
                              "(the VAE's and the UNet's downsampling)", self.image_size)  # fmt: skip

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def _unet(arch: TextDigitsArch):
    from diffusers import UNet2DConditionModel

    levels = len(arch.unet_channels)
    return UNet2DConditionModel(
        sample_size=arch.latent_size,
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        block_out_channels=tuple(arch.unet_channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=arch.text_width,
        attention_head_dim=2,  # diffusers reads it as the number of heads: 2 (CPU attention is slow with many)
        norm_num_groups=8,
    )


def _vae(arch: TextDigitsArch):
    from diffusers import AutoencoderKL

    levels = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(arch.vae_channels),
        layers_per_block=1,
        latent_channels=arch.latent_channels,
        norm_num_groups=8,
        sample_size=arch.image_size,
    )


def _text_encoder(arch: TextDigitsArch):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=arch.text_width, intermediate_size=2 * arch.text_width,
                            num_hidden_layers=arch.text_layers, num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)  # fmt: skip
    return CLIPTextModel(config)


def build_text_digits_pipeline(arch: TextDigitsArch | None = None, *, seed: int = 0):
    """An untrained StableDiffusionPipeline of the digits model (seeded: the same seed, the same weights)."""
    import tempfile

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from salun_ext.diffusion.clip_tokenizer import write_clip_tokenizer

    arch = arch or TextDigitsArch()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet, vae, text_encoder = _unet(arch), _vae(arch), _text_encoder(arch)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp))
    # SD v1's noise schedule; DDIM sampling (diffusers' training scripts derive the DDPM training scheduler from it)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip


def digit_images(dataset: ImageDataset, size: int) -> torch.Tensor:
    """Grey digits as the pipeline's RGB images: float [0, 1], N x 3 x size x size (bilinear upscaling)."""
    if dataset.channels != 1:
        raise usage_error("dataset", "a single-channel digits dataset", f"{dataset.channels} channels")
    return resize_images(dataset.images, size).repeat(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------------------- training


class AutoencoderTask:
    """VAE training: MSE(decode(z), x) with z ~ q(z | x) + kl_weight * KL(q(z | x) || N(0, I)) per latent element.

    x: float images in [-1, 1]; latent_shape: C x h x w of the VAE's latents. Batches and the posterior noise come
    from the "autoencoder" stream of (seed, epoch), so a resumed run draws the same ones.
    """

    def __init__(self, images: torch.Tensor, latent_shape: Sequence[int], *, batch_size: int = 64,
                 kl_weight: float = 1e-3, seed: int = 0) -> None:  # fmt: skip
        if images.dim() != 4 or len(images) == 0:
            raise usage_error("images", "a non-empty N x C x H x W tensor", tuple(images.shape))
        self.images, self.latent_shape = images, tuple(latent_shape)
        self.batch_size, self.kl_weight, self.seed = batch_size, kl_weight, seed

    def num_batches(self, epoch: int) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def batches(self, epoch: int) -> Iterator[dict]:
        gen = epoch_generator(self.seed, epoch, AUTOENCODER_STREAM)
        for index in torch.randperm(len(self.images), generator=gen).split(self.batch_size):
            yield {"x": self.images[index], "noise": torch.randn((len(index), *self.latent_shape), generator=gen)}

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        x = batch["x"]
        posterior = model.encode(x).latent_dist
        recon = model.decode(posterior.mean + posterior.std * batch["noise"]).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # diffusers' kl() sums over C, h, w
        return F.mse_loss(recon, x) + self.kl_weight * kl


class CaptionClassifier(torch.nn.Module):
    """The text encoder with a linear head on its mean token state: trained to tell the captions' classes apart."""

    def __init__(self, text_encoder: torch.nn.Module, num_classes: int = len(NUMBER_WORDS)) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.head = torch.nn.Linear(int(text_encoder.config.hidden_size), num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.text_encoder(ids)[0].mean(dim=1))


class CaptionTask:
    """Cross-entropy of `CaptionClassifier` on every caption (token ids, class labels): one batch per step.

    Stands in for CLIP's pretraining: a random text encoder's states differ between "three" and "four" only in a
    few directions, and cross-attention then learns the condition slowly; after this phase every token state
    (the padding after the end of text too, which sees the whole caption) carries the class.
    """

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor, *, steps_per_epoch: int = 25) -> None:
        self.ids, self.labels, self.steps_per_epoch = ids, labels, steps_per_epoch

    def num_batches(self, epoch: int) -> int:
        return self.steps_per_epoch

    def batches(self, epoch: int) -> Iterator[dict]:
        for _ in range(self.steps_per_epoch):
            yield {"ids": self.ids, "labels": self.labels}

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return F.cross_entropy(model(batch["ids"]), batch["labels"])


@dataclasses.dataclass
class TextDigitsTraining:
    """What training the digits pipeline does (defaults: the results page's run, a few CPU minutes)."""

    vae_epochs: int = 10
    vae_lr: float = 2e-3
    kl_weight: float = 1e-3
    text_epochs: int = 4  # of 25 full-batch steps each
    text_lr: float = 1e-3
    epochs: int = 10  # UNet epochs; one epoch = every (image, phrasing) pair once
    lr: float = 1e-3
    batch_size: int = 64
    cond_drop: float = 0.1
    subset: int | None = None  # the first N training images only (quick runs)

    def __post_init__(self) -> None:
        for name in ("vae_epochs", "text_epochs", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise usage_error(name, "an integer >= 1", getattr(self, name))
        if self.subset is not None and self.subset < 1:
            raise usage_error("subset", "a number of images >= 1", self.subset)


def _phase(options: RunOptions, name: str) -> RunOptions:
    folder = None if options.checkpoint_dir is None else str(Path(options.checkpoint_dir) / name)
    return dataclasses.replace(options, checkpoint_dir=folder)


def train_vae(vae, images: torch.Tensor, training: TextDigitsTraining, options: RunOptions) -> FitResult:
    """Train the AutoencoderKL on [0, 1] images, then set its scaling_factor to 1 / std of the latent means."""
    x = images * 2 - 1
    side = images.shape[-1] // 2 ** (len(vae.config.block_out_channels) - 1)
    latent = (int(vae.config.latent_channels), side, side)
    task = AutoencoderTask(x, latent, batch_size=training.batch_size, kl_weight=training.kl_weight, seed=options.seed)
    recipe = ddpm_training_recipe(training.vae_epochs, training.vae_lr)
    fingerprint = {"task": ["vae", training.batch_size, training.kl_weight], "images": list(images.shape)}
    fit = run_task(vae, task, recipe, _phase(options, "vae"), desc="vae", fingerprint=fingerprint)
    vae.eval()
    with torch.no_grad():
        device = next(vae.parameters()).device
        means = torch.cat([vae.encode(chunk.to(device)).latent_dist.mean.cpu() for chunk in x.split(256)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return fit


def train_text_encoder(pipe, training: TextDigitsTraining, options: RunOptions) -> FitResult:
    """Train the pipeline's text encoder to tell the captions' classes apart (CaptionTask), every phrasing."""
    from salun_ext.train.engine import OptimConfig
    from salun_ext.train.options import TrainRecipe

    prompts = [caption(c, p) for p in range(len(PHRASINGS)) for c in range(len(NUMBER_WORDS))]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids  # fmt: skip
    labels = torch.arange(len(NUMBER_WORDS)).repeat(len(PHRASINGS))
    with torch.random.fork_rng():
        torch.manual_seed(options.seed)
        model = CaptionClassifier(pipe.text_encoder).to(pipe.text_encoder.device)
    recipe = TrainRecipe(epochs=training.text_epochs, optimizer=OptimConfig("adam", lr=training.text_lr,
                         weight_decay=0.0))  # fmt: skip
    task, fingerprint = CaptionTask(ids, labels), {"task": ["captions", prompts]}
    fit = run_task(model, task, recipe, _phase(options, "text"), desc="text", fingerprint=fingerprint)
    pipe.text_encoder.eval()
    return fit


def caption_set(sd, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 64):
    """(DiffusionSpec, DiffusionSet): every image with every phrasing of its class's caption, in the SD adapter's
    form (VAE posterior moments, prompt-table ids, the VAE's latent scale)."""
    prompts = [caption(int(c), p) for p in range(len(PHRASINGS)) for c in labels]
    spec = sd.spec(prompts)
    moments = sd.encode_images(images, batch_size)
    ids = torch.tensor([spec.conditioner.id_of(p) for p in prompts], dtype=torch.long)
    x0 = moments.repeat(len(PHRASINGS), 1, 1, 1)
    return spec, DiffusionSet(x0, ids, latent_scale=sd.latent_scale())


def train_text_digits(pipe, training: TextDigitsTraining, options: RunOptions, *, dataset: ImageDataset | None = None):
    """Train the pipeline's VAE, its text encoder, then its UNet, on captioned digits (module docstring); returns
    (StableDiffusion, {"vae" | "text" | "unet": FitResult}). `dataset`: default the digits training split."""
    from salun_ext.data import load_dataset
    from salun_ext.diffusion.sd import StableDiffusion
    from salun_ext.utils import resolve_device

    dataset = dataset if dataset is not None else load_dataset("digits", train=True)
    if training.subset is not None:
        dataset = dataset.subset(torch.arange(min(training.subset, len(dataset))))
    if dataset.num_classes != len(NUMBER_WORDS):
        raise UsageError(f"dataset: expected the 10 digit classes, got {dataset.num_classes} classes")
    pipe.to(resolve_device(options.device))
    size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    images = digit_images(dataset, size)
    fits = {"vae": train_vae(pipe.vae, images, training, options)}
    fits["text"] = train_text_encoder(pipe, training, options)
    sd = StableDiffusion(pipe)  # freezes the VAE and the text encoder
    spec, data = caption_set(sd, images, dataset.labels)
    task = EpsTask(spec, data, batch_size=training.batch_size, cond_drop=training.cond_drop, seed=options.seed)
    fingerprint = {"task": ["eps", training.batch_size, training.cond_drop], "data": data.digest()}
    recipe = ddpm_training_recipe(training.epochs, training.lr, warmup_steps=1)
    fits["unet"] = run_task(sd.unet, task, recipe, _phase(options, "unet"), desc="unet", fingerprint=fingerprint)
    sd.unet.eval()
    return sd, fits


def class_prompt_sets(phrasings: Sequence[int] | None = None) -> list[tuple[str, dict[str, int]]]:
    """(template, {fill word: class id}) per phrasing: the form `evaluation.prompt_class_accuracy` takes."""
    chosen = range(len(PHRASINGS)) if phrasings is None else phrasings
    out = []
    for p in chosen:
        caption(0, p)  # validates the index
        template, words = PHRASINGS[p]
        out.append((template, {w: c for c, w in enumerate(words)}))
    return out


def class_index(value: int | str) -> int:
    """A digit class given as 3, "3" or "three"."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in NUMBER_WORDS:
            return NUMBER_WORDS.index(word)
        value = int(word) if word.isdigit() else -1
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(NUMBER_WORDS):
        raise usage_error("forget_class (--forget-class)", "a digit 0..9 or its word (zero..nine)", value)
    return value


# ---------------------------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class TextDigitsEvaluation:
    """How the digits pipeline is scored: n images per class and phrasing, classified by the digits classifier."""

    n_per_class: int = 20  # per phrasing
    guidance_scale: float = SAMPLE_GUIDANCE
    steps: int = 25
    phrasings: Sequence[int] | None = None  # None: every phrasing
    forget_classes: Sequence[int | str] = ()  # UA on these, "kept classes" accuracy on the others
    classifier_epochs: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_per_class < 1:
            raise usage_error("n_per_class (--n-per-class)", "an integer >= 1", self.n_per_class)


@dataclasses.dataclass
class Generated:
    """What an evaluation generated: float [0, 1] RGB images, their class ids and prompts."""

    images: torch.Tensor
    labels: torch.Tensor
    prompts: list[str]


def evaluate_text_digits(
    sd,
    classifier: torch.nn.Module,
    real: ImageDataset,
    ev: TextDigitsEvaluation,
    *,
    inception_weights: PathLike | None = None,
    progress: bool = False,
) -> tuple[dict, Generated]:
    """Class accuracy of the digits classifier on images generated for every class caption (per class, per
    phrasing), UA / kept-class accuracy when `ev.forget_classes` is given, and the Fréchet distance of the kept
    classes' images to `real` (test) images in the classifier's features (a proxy, NOT FID, unless Inception
    weights are given). Returns (report, what was generated)."""
    from salun_ext.diffusion.evaluation import GreyscaleInput, class_wise_report, fid_report, prompt_class_accuracy

    forget = sorted({class_index(c) for c in ev.forget_classes})
    scorer = GreyscaleInput(classifier).eval()
    sums, per_phrasing, shown = dict.fromkeys(range(len(NUMBER_WORDS)), 0.0), {}, []
    for template, words in (sets := class_prompt_sets(ev.phrasings)):
        acc, images, names = prompt_class_accuracy(sd, scorer, words, template=template, n_per_class=ev.n_per_class,
                                                   guidance_scale=ev.guidance_scale, num_inference_steps=ev.steps,
                                                   seed=ev.seed, progress=progress)  # fmt: skip
        per_phrasing[template] = {str(words[w]): a for w, a in acc.items()}
        for w, a in acc.items():
            sums[words[w]] += a / len(sets)
        shown.append(Generated(images, torch.tensor([words[n] for n in names]), [template.format(n) for n in names]))
    gen = Generated(torch.cat([g.images for g in shown]), torch.cat([g.labels for g in shown]),
                    [p for g in shown for p in g.prompts])  # fmt: skip
    kept = ~torch.isin(gen.labels, torch.tensor(forget, dtype=torch.long))
    real_kept = ~torch.isin(real.labels, torch.tensor(forget, dtype=torch.long))
    size = gen.images.shape[-1]
    frechet = fid_report(digit_images(real, size)[real_kept], gen.images[kept], inception_weights=inception_weights,
                         classifier=scorer)  # fmt: skip
    report = {
        "per_class_accuracy": {str(c): a for c, a in sums.items()},
        "mean_accuracy": sum(sums.values()) / len(sums),
        "chance_accuracy": 100.0 / len(NUMBER_WORDS),
        "per_phrasing_accuracy": per_phrasing,
        **class_wise_report({str(c): a for c, a in sums.items()}, [str(c) for c in forget]),
        "forget_classes": [str(c) for c in forget],
        "frechet": frechet,
        "sampling": dataclasses.asdict(ev) | {"forget_classes": [str(c) for c in forget]},
    }
    return report, gen


# ---------------------------------------------------------------------------------------------------- workflows


def machine_record() -> dict:
    """The platform, processor, torch threads and torch version of this run (results pages)."""
    import platform

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}  # fmt: skip


def _score_folder(sd, out: Path, ev: TextDigitsEvaluation, options: RunOptions, *, classifier: PathLike | None,
                  inception_weights: PathLike | None, clip_model: PathLike | None) -> dict:  # fmt: skip
    """Train (or read) the scoring classifier, evaluate, write samples.png (a row per class: the first phrasing)."""
    from salun_ext.data import load_dataset
    from salun_ext.diffusion.evaluation import clip_score, first_per_class, save_grid, scoring_classifier

    train, test = load_dataset("digits", train=True), load_dataset("digits", train=False)
    size = sd.resolution
    quiet = dataclasses.replace(options, progress=False)
    clf = scoring_classifier(train, size, quiet, load=classifier, save=None if classifier else out / "classifier.pt",
                             epochs=ev.classifier_epochs)  # fmt: skip
    report, gen = evaluate_text_digits(sd, clf, test, ev, inception_weights=inception_weights,
                                       progress=options.progress)  # fmt: skip
    if clip_model is not None:
        report["clip"] = clip_score(gen.images, gen.prompts, clip_model)
    show = min(10, ev.n_per_class)
    save_grid(gen.images[first_per_class(gen.labels, range(10), show)], out / "samples.png", nrow=show)
    return report


def train_text_digits_folder(out: PathLike, options: RunOptions, *, arch: TextDigitsArch | None = None,
                             training: TextDigitsTraining | None = None,
                             evaluation: TextDigitsEvaluation | None = None) -> dict:  # fmt: skip
    """`salun-ext diffusion train-text-digits`: build and train the pipeline, save it to `out` (save_pretrained:
    a StableDiffusionPipeline folder), score it when `evaluation` is given (samples.png, classifier.pt) and write
    text_digits.json (configuration, losses, wall times, machine, evaluation). Returns that summary."""
    import time
    from datetime import datetime, timezone

    from salun_ext.utils import OutputFolder, write_json

    arch, training = arch or TextDigitsArch(), training or TextDigitsTraining()
    out = Path(out)
    with OutputFolder(out, what="--out"):
        start = time.perf_counter()
        sd, fits = train_text_digits(build_text_digits_pipeline(arch, seed=options.seed), training, options)
        sd.save_pretrained(out)
        trained = time.perf_counter() - start
        summary = {"arch": dataclasses.asdict(arch), "training": dataclasses.asdict(training), "seed": options.seed,
                   "phrasings": [t for t, _ in PHRASINGS],
                   "unet_parameters": sum(p.numel() for p in sd.unet.parameters()),
                   "vae_scaling_factor": sd.latent_scale(), "train_seconds": round(trained, 1),
                   "history": {k: f.history for k, f in fits.items()},
                   "fit_seconds": {k: round(f.seconds, 1) for k, f in fits.items()},
                   "resumed": {k: f.resumed for k, f in fits.items()}, "machine": machine_record(),
                   "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}  # fmt: skip
        if evaluation is not None:
            summary["evaluation"] = _score_folder(sd, out, evaluation, options, classifier=None,
                                                  inception_weights=None, clip_model=None)  # fmt: skip
            summary["evaluate_seconds"] = round(time.perf_counter() - start - trained, 1)
        summary["total_seconds"] = round(time.perf_counter() - start, 1)
        write_json(summary, out / "text_digits.json")
    return summary


def evaluate_text_digits_folder(pipeline: PathLike, out: PathLike, options: RunOptions, ev: TextDigitsEvaluation,
                                *, classifier: PathLike | None = None, inception_weights: PathLike | None = None,
                                clip_model: PathLike | None = None) -> dict:  # fmt: skip
    """`salun-ext diffusion evaluate-text-digits`: score a digits pipeline folder (e.g. after unlearning a class):
    per-class accuracy, UA / kept-class accuracy, the Fréchet proxy, the CLIP score with a local CLIP model;
    writes results.json and samples.png (classifier.pt when it trains one)."""
    from salun_ext.diffusion.evaluation import check_clip_model
    from salun_ext.diffusion.sd import StableDiffusion
    from salun_ext.utils import write_json

    if clip_model is not None:
        check_clip_model(clip_model)  # before any image is generated
    sd = StableDiffusion.from_pretrained(pipeline, device=options.device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = _score_folder(sd, out, ev, options, classifier=classifier, inception_weights=inception_weights,
                           clip_model=clip_model)  # fmt: skip
    report["pipeline"] = str(pipeline)
    write_json(report, out / "results.json")
    return report
