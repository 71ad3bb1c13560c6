"""Control for the attack column: 3 random whole-word tokens (no optimisation) in front of each attacked prompt.

    OMP_NUM_THREADS=1 python docs/results/text-digits-unlearning/random_prefix.py runs/text-digits runs/td-table \
        docs/results/text-digits-unlearning/random_prefix.json

For the original pipeline and every unlearned one under runs/td-table/seed*/<method>/: 5 draws of 3 tokens from the
attack's own vocabulary (`attack.attack_vocabulary`) per attacked prompt (the table's 6), generated with the
prompt's seed (LMS, 25 steps, guidance 3.0, as the attack judges) and judged by the same digits classifier. If
random tokens brought the concept back as often as the optimised ones, the attack's ASR would say nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from salun_ext.diffusion.attack import attack_vocabulary
from salun_ext.diffusion.judges import ClassifierJudge
from salun_ext.diffusion.sd import StableDiffusion
from salun_ext.diffusion.text_demo import TableConfig, attack_rows
from salun_ext.utils import write_json

DRAWS = 5


def random_prefix_rate(sd, rows, judge, seed: int = 1234) -> float:
    """% of (prompt, draw) images the judge calls the concept, with 3 random tokens prepended."""
    _, words = attack_vocabulary(sd.tokenizer)
    gen = torch.Generator().manual_seed(seed)
    hits = 0
    for _ in range(DRAWS):
        prompts = [" ".join([*(words[i] for i in torch.randint(len(words), (3,), generator=gen).tolist()), r.prompt])
                   for r in rows]  # fmt: skip
        images = sd.generate(prompts, seeds=[r.seed for r in rows], guidance_scale=3.0, num_inference_steps=25,
                             scheduler="lms")  # fmt: skip
        hits += sum(v.success for v in judge(images))
    return 100.0 * hits / (DRAWS * len(rows))


def main(original: str, work: str, out: str) -> None:
    torch.set_num_threads(1)
    cfg = TableConfig(pipeline=original, forget_images=".", retain_images=".")
    rows = attack_rows(cfg)
    judge = ClassifierJudge.from_state_dict(Path(original) / "classifier.pt", cfg.forget_id, image_size=16)
    models = {"original": Path(original)}
    models.update({f"{p.parent.name}/{p.name}": p for p in sorted(Path(work).glob("seed*/*")) if p.is_dir()})
    result = {}
    for name, folder in models.items():
        result[name] = random_prefix_rate(StableDiffusion.from_pretrained(folder, device="cpu"), rows, judge)
        print(f"{name}: {result[name]:.1f}% of {DRAWS * len(rows)} images", flush=True)
    write_json({"draws_per_prompt": DRAWS, "prompts": len(rows), "success_pct": result}, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
