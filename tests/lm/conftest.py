"""Shared fixtures of the LM tests: the tiny Llama, the text files, a model that memorised the forget set."""

from __future__ import annotations

import pytest

from salun_ext.lm.data import collate
from tests.lm_fixtures import FORGET, RETAIN, build_tiny_lm, write_text_sets


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def text_files(tmp_path_factory):
    return write_text_sets(tmp_path_factory.mktemp("texts"))


class Memorize:
    """Engine task that trains the tiny LM on forget + retain until it reproduces them (the test's "before")."""

    def __init__(self, examples, pad_id):
        self.examples, self.pad_id = examples, pad_id

    def batches(self, epoch):
        return [collate(self.examples, self.pad_id)]

    def loss(self, model, batch):
        return model(**batch).loss


@pytest.fixture(scope="session")
def memorized(lm_dir, tmp_path_factory):
    """The tiny LM after memorising the forget set: its answers are reproduced verbatim."""
    from salun_ext.lm import TextExample, encode, load_causal_lm, verbatim_completion
    from salun_ext.train.engine import Engine, EngineConfig, OptimConfig

    model, tokenizer = load_causal_lm(str(lm_dir), dtype="fp32")
    forget = [TextExample(r["answer"], r["question"]) for r in FORGET]
    retain = [TextExample(t) for t in RETAIN]
    examples = encode(forget, tokenizer, 64)
    config = EngineConfig(epochs=40, optimizer=OptimConfig("adamw", lr=2e-2, weight_decay=0.0), progress=False, seed=0)
    for _ in range(8):  # rounds of 40 epochs until the answers come back verbatim (robust to kernel numerics)
        Engine(model, config).fit(Memorize(examples, tokenizer.pad_token_id))
        if verbatim_completion(model, tokenizer, examples)["token_accuracy"] > 0.95:
            break
    folder = tmp_path_factory.mktemp("memorized")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, forget, retain
