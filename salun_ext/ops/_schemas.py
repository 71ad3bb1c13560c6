"""Operator schemas and fake (meta) kernels of the `salun_ext` torch.library namespace: one place for every op.

Each op has, in the obvious places:
  * its schema and fake kernel here,
  * a plain-PyTorch kernel in `_reference.py`, registered as the CompositeExplicitAutograd ("default") kernel by
    its `@reference` decorator:
    the readable spec, and the fallback on devices without a compiled kernel,
  * C++ CPU and CUDA kernels in `csrc/cpu/` and `csrc/cuda/`, registered from C++ with TORCH_LIBRARY_IMPL,
  * a typed keyword-only wrapper in `ops/__init__.py` (what every caller uses),
  * tests in `tests/ops/` (kernel == reference, opcheck) and a benchmark in `benchmarks/`.
"""

from __future__ import annotations

import torch

from salun_ext.ops import _mask_layout

LIBRARY = torch.library.Library("salun_ext", "DEF")

SCHEMAS: dict[str, str] = {
    # Histogram of one key digit, (key >> low_bit) & (2**num_bits - 1), over the elements whose higher digits
    # (key >> (low_bit + num_bits)) equal prefixes[r]; one int64 row per prefix. Keys: see csrc/include/key.h.
    "key_histogram": (
        "key_histogram(Tensor[] grads, int low_bit, int num_bits, int[] prefixes, bool nan_as_zero) -> Tensor"
    ),
    # Bit-packed mask words (layout: _mask_layout.py): key > threshold_key, plus ties at the threshold: all of
    # them when tie_limit < 0, else the first tie_limit in global index order (tensor order, then flat index).
    "mask_words": "mask_words(Tensor[] grads, int threshold_key, int tie_limit, bool nan_as_zero) -> Tensor",
    # Keys of the elements at global indices floor(i * N / num_samples), i < num_samples (all N when num_samples
    # >= N): a deterministic strided sample used to bracket the k-th largest key.
    "sample_keys": "sample_keys(Tensor[] grads, int num_samples, bool nan_as_zero) -> Tensor",
    # One pass for a bracketed threshold: mask words with the bits of key > hi_key set; counts = int64
    # [above (key > hi_key), in-window (lo_key <= key <= hi_key), NaN (when not nan_as_zero)]; the keys and
    # positions (word index * 32 + bit: global order) of the in-window elements, in unspecified order (the CUDA
    # kernel appends with atomics). When more than `capacity` fall in the window, which are stored is unspecified.
    "window_select": (
        "window_select(Tensor[] grads, int lo_key, int hi_key, int capacity, bool nan_as_zero) "
        "-> (Tensor words, Tensor counts, Tensor cand_keys, Tensor cand_pos)"
    ),
    # Masked optimizer steps (in place, multi-tensor). mask_words[i] holds the bit-packed mask of params[i] (an
    # empty tensor = every entry salient). Salient entries take the torch.optim update computed in fp32;
    # non-salient entries of params AND of every state tensor stay bit-identical. found_inf != 0 skips the step;
    # grads are divided by grad_scale when given (AMP). lr_tensor, when given, replaces lr.
    "masked_sgd_": (
        "masked_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor[] mask_words, "
        "float lr, Tensor? lr_tensor, float momentum, float dampening, float weight_decay, bool nesterov, "
        "bool maximize, bool first_step, Tensor? grad_scale, Tensor? found_inf) -> ()"
    ),
    # state_steps: the step count of each param, already incremented for this step (as torch's fused Adam).
    "masked_adam_": (
        "masked_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor[] state_steps, Tensor[] mask_words, float lr, Tensor? lr_tensor, "
        "float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, bool amsgrad, "
        "bool maximize, Tensor? grad_scale, Tensor? found_inf) -> ()"
    ),
    # Compact-state twins of the masked steps: the same arguments and the same update of every salient entry, but
    # each state tensor holds only the salient entries of its param, packed in flat element order (1-D, one entry
    # per set mask bit; p.numel() entries when mask_words[i] is empty). The mask is the index: no index tensors.
    "masked_sgd_compact_": (
        "masked_sgd_compact_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "Tensor[] mask_words, float lr, Tensor? lr_tensor, float momentum, float dampening, float weight_decay, "
        "bool nesterov, bool maximize, bool first_step, Tensor? grad_scale, Tensor? found_inf) -> ()"
    ),
    "masked_adam_compact_": (
        "masked_adam_compact_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor[] state_steps, Tensor[] mask_words, float lr, Tensor? lr_tensor, "
        "float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, bool amsgrad, "
        "bool maximize, Tensor? grad_scale, Tensor? found_inf) -> ()"
    ),
}

for _schema in SCHEMAS.values():
    LIBRARY.define(_schema)


@torch.library.register_fake("salun_ext::key_histogram")
def _key_histogram_fake(grads, low_bit, num_bits, prefixes, nan_as_zero):
    torch._check(len(grads) > 0, lambda: "salun_ext: argument 'grads' is an empty list")
    return grads[0].new_empty((len(prefixes), 1 << num_bits), dtype=torch.int64)


@torch.library.register_fake("salun_ext::mask_words")
def _mask_words_fake(grads, threshold_key, tie_limit, nan_as_zero):
    torch._check(len(grads) > 0, lambda: "salun_ext: argument 'grads' is an empty list")
    total = sum(_mask_layout.segment_words(g.numel()) for g in grads)
    return grads[0].new_empty((total,), dtype=torch.int32)


@torch.library.register_fake("salun_ext::sample_keys")
def _sample_keys_fake(grads, num_samples, nan_as_zero):
    torch._check(len(grads) > 0, lambda: "salun_ext: argument 'grads' is an empty list")
    total = sum(g.numel() for g in grads)
    return grads[0].new_empty((min(num_samples, total),), dtype=torch.int32)


@torch.library.register_fake("salun_ext::window_select")
def _window_select_fake(grads, lo_key, hi_key, capacity, nan_as_zero):
    torch._check(len(grads) > 0, lambda: "salun_ext: argument 'grads' is an empty list")
    total = sum(_mask_layout.segment_words(g.numel()) for g in grads)
    g0 = grads[0]
    return (
        g0.new_empty((total,), dtype=torch.int32),
        g0.new_empty((3,), dtype=torch.int64),
        g0.new_empty((capacity,), dtype=torch.int32),
        g0.new_empty((capacity,), dtype=torch.int64),
    )


def _in_place_fake(*args, **kwargs) -> None:
    """The masked steps update their inputs in place and return nothing: no output to describe."""
    return None


torch.library.register_fake("salun_ext::masked_sgd_")(_in_place_fake)
torch.library.register_fake("salun_ext::masked_adam_")(_in_place_fake)
torch.library.register_fake("salun_ext::masked_sgd_compact_")(_in_place_fake)
torch.library.register_fake("salun_ext::masked_adam_compact_")(_in_place_fake)


def op_names() -> list[str]:
    return [f"salun_ext::{name}" for name in SCHEMAS]
