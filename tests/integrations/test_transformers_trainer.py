"""SalUnTrainer: a Hugging Face Trainer run (gradient accumulation, clipping, fp32 and bf16) that moves only the
salient weights, bit for bit, with the mask computed on the forget set."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from salun_ext import SaliencyMask  # noqa: E402
from salun_ext.integrations.transformers import SalUnTrainer  # noqa: E402
from salun_ext.utils import UsageError  # noqa: E402
from tests.lm_fixtures import FORGET, RETAIN, build_tiny_lm  # noqa: E402


class _Texts(torch.utils.data.Dataset):
    def __init__(self, tokenizer, texts):
        self.items = [tokenizer(t, truncation=True, max_length=48)["input_ids"] for t in texts]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ids = torch.tensor(self.items[i])
        return {"input_ids": ids, "labels": ids.clone()}


def _collate(pad_id):
    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def _train(folder, out, bf16: bool, **trainer_kw):
    """3 Trainer steps of gradient ascent on the forget texts (accumulation 2, clipping, weight decay)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    forget = _Texts(tokenizer, [r["question"] + " " + r["answer"] for r in FORGET])
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, per_device_eval_batch_size=2,
        gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2, weight_decay=0.1, max_grad_norm=1.0,
        bf16=bf16, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", seed=0,
    )  # fmt: skip
    trainer = SalUnTrainer(
        model=model, args=args, train_dataset=forget, forget_dataset=forget, mask_ratio=0.3, ascent=True,
        data_collator=_collate(tokenizer.pad_token_id), **trainer_kw,
    )  # fmt: skip
    trainer.train()
    return model, trainer


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_only_salient_weights_move_under_the_trainer(tmp_path, bf16):
    from transformers import AutoModelForCausalLM

    folder = build_tiny_lm(tmp_path / "lm")
    before = {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(folder).named_parameters()}
    model, trainer = _train(folder, tmp_path / "out", bf16)
    mask = trainer.mask
    assert isinstance(mask, SaliencyMask) and mask.k == int(0.3 * sum(p.numel() for p in model.parameters()))
    moved = 0
    for name, p in model.named_parameters():
        frozen = ~mask.dense(name)
        assert torch.equal(p.detach()[frozen], before[name][frozen]), f"{name}: a non-salient weight moved"
        moved += int((p.detach() != before[name]).sum())
    assert 0 < moved <= mask.k
    state = trainer.optimizer.state
    for group in trainer.optimizer.param_groups:  # non-salient Adam moments stay 0 (strict masked AdamW)
        for name, p in zip(group["param_names"], group["params"]):
            if p in state:
                assert torch.count_nonzero(state[p]["exp_avg"][~mask.dense(name)]) == 0


def test_compact_optimizer_state_trains_the_same_weights(tmp_path):
    """optimizer_state="compact": AdamW's moments hold the salient entries only, and every weight ends bit for bit
    where the dense-state run puts it."""
    folder = build_tiny_lm(tmp_path / "lm")
    dense, _ = _train(folder, tmp_path / "dense", False)
    compact, trainer = _train(folder, tmp_path / "compact", False, optimizer_state="compact")
    for (name, a), (_, b) in zip(dense.named_parameters(), compact.named_parameters()):
        assert torch.equal(a, b), name
    sizes = {}
    for group in trainer.optimizer.param_groups:
        for name, p in zip(group["param_names"], group["params"]):
            if p in trainer.optimizer.state:
                sizes[name] = trainer.optimizer.state[p]["exp_avg"].numel()
    assert sizes and all(n == int(trainer.mask.dense(name).sum()) for name, n in sizes.items())
    with pytest.raises(UsageError, match="optimizer_state: expected 'dense' or 'compact', got 'packed'"):
        SalUnTrainer(model=compact, args=trainer.args, mask=trainer.mask, optimizer_state="packed")


def test_a_given_mask_and_bad_input(tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    folder = build_tiny_lm(tmp_path / "lm")
    model = AutoModelForCausalLM.from_pretrained(folder)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to=[], max_steps=1)
    with pytest.raises(UsageError, match="forget_dataset: SalUnTrainer needs the forget set"):
        SalUnTrainer(model=model, args=args)
    with pytest.raises(UsageError, match=r"mask_ratio: expected a fraction in \(0, 1\]"):
        SalUnTrainer(model=model, args=args, forget_dataset=[1], mask_ratio=1.5)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    import salun_ext

    given = salun_ext.saliency_masks(grads, 0.1)
    trainer = SalUnTrainer(model=model, args=args, mask=given)
    assert trainer.create_optimizer().__class__.__name__ == "MaskedAdamW" and trainer.mask is given
    assert len(RETAIN) > 0


def test_the_docs_example_runs(tmp_path):
    """docs/lm.md's SalUnTrainer example, on the tiny Llama (paths and step count swapped in)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "lm.md").read_text()
    section = text[text.index("## Hugging Face `Trainer` drop-in") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    folder = build_tiny_lm(tmp_path / "lm")
    (tmp_path / "forget.txt").write_text("\n".join(r["question"] + " " + r["answer"] for r in FORGET))
    code = code.replace("path/to/model", str(folder)).replace('open("forget.txt")', f'open("{tmp_path}/forget.txt")')
    code = code.replace("runs/hf-salun", str(tmp_path / "run")).replace("max_steps=100", "max_steps=2")
    code = code.replace("bf16=True,", "bf16=True, use_cpu=True,")  # no GPU here
    namespace: dict = {}
    exec(compile(code, "docs/lm.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert (tmp_path / "run" / "mask.safetensors").exists() and trainer.state.global_step == 2
