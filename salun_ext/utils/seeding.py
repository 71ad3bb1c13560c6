"""Seeds and random streams: every random draw of a run comes from (seed, stream name, epoch).

A method that draws from several sources (the forget loader, the retain loader, random labels, ...) takes each
from its own named stream, so adding a draw to one never shifts another. `epoch_generator(seed, epoch, stream)` is
the one way to get the generator of one epoch of one stream: resuming a run at any epoch replays it exactly.

The numbers behind the names are frozen: changing one changes every published result that used it (the digits
and Fashion-MNIST tables of docs/results/). A new stream gets a new name and a new number here.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from salun_ext.utils.errors import UsageError

STREAMS: dict[str, int] = {
    # classification (values predate the names; docs/results/ were produced with them)
    "retain": 1,  # retain-set batches: original training, Retrain, FT, l1-sparse
    "rl.forget": 11,
    "rl.retain": 12,
    "rl.mixed": 13,
    "rl.labels": 14,  # RL / SalUn's random labels
    "ga.forget": 21,
    "ga.retain": 22,  # NegGrad+'s retain batches
    "be.forget": 31,  # BE / BS forget batches
    "iu": 41,  # IU's gradient batches
    "scrub.forget": 51,
    "scrub.retain": 52,
    "ssd": 61,
    "init": 0xC0FFEE,  # the initial weights of original training and Retrain
    "batches": 2,  # data.Batches without a named stream
    # generation and language models
    "diffusion": 101,  # every diffusion Task's batches, t, noise, dropped labels; the saliency batches (epoch 0)
    "classifier": 102,  # the scoring classifier of generation evaluation
    "lm": 103,  # language-model unlearning batches
    "attack": 104,  # UnlearnDiffAtk: token draws and noise of each prompt (epoch = the prompt's index)
    "autoencoder": 110,  # the text-to-image digits VAE's batches and posterior noise
}


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (seed, epoch, stream, ...), well mixed (NumPy SeedSequence)."""
    state = np.random.SeedSequence([int(p) % (2**63) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def stream_seed(seed: int, stream: str) -> int:
    """The seed of one named stream of a run."""
    if stream not in STREAMS:
        raise UsageError(f"stream: expected one of {', '.join(STREAMS)}; got {stream!r} (add it to STREAMS)")
    return derive_seed(seed, STREAMS[stream])


def epoch_generator(seed: int, epoch: int, stream: str) -> torch.Generator:
    """The CPU generator of one epoch of one named stream of the run seeded by `seed`."""
    return torch.Generator().manual_seed(derive_seed(stream_seed(seed, stream), epoch))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
