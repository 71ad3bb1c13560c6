"""Plain-PyTorch kernels of every op: the readable specification and the fallback.

Each is registered by `@reference("<op>")` as the CompositeExplicitAutograd ("default") kernel of its op, so every
device without a compiled kernel (or a process with SALUN_EXT_FORCE_REFERENCE=1) runs these. The compiled kernels
must equal them bit for bit; tests/ops call both and compare. Written for clarity, not speed: per tensor they
allocate int64 keys (8 bytes per element of that tensor), never a concatenation of the whole list.
"""

from __future__ import annotations

import math

import torch

from salun_ext.ops import _mask_layout
from salun_ext.ops._keys import KEY_BITS, KEY_DTYPES, NAN_KEY, keys
from salun_ext.ops._schemas import LIBRARY


def reference(op: str):
    """Register the decorated function as the plain-torch ("default") kernel of `salun_ext::<op>`."""

    def register(fn):
        LIBRARY.impl(op, fn, "CompositeExplicitAutograd")
        return fn

    return register


def check_grads(grads: list[torch.Tensor]) -> None:
    """The same validation as the C++ kernels (csrc/include/salun_ext/tensor_list.h), with the same messages."""
    if len(grads) == 0:
        raise RuntimeError("salun_ext: argument 'grads' is an empty list; expected at least one tensor")
    device = grads[0].device
    for i, g in enumerate(grads):
        if g.dtype not in KEY_DTYPES:
            raise RuntimeError(f"salun_ext: grads[{i}] has dtype {g.dtype}, expected float32, bfloat16 or float16")
        if g.device != device:
            raise RuntimeError(
                f"salun_ext: grads[{i}] is on {g.device}, expected {device} "
                "(all tensors of one list must share a device)"
            )
        if not g.is_contiguous():
            raise RuntimeError(f"salun_ext: grads[{i}] must be contiguous")


def _check_digit(low_bit: int, num_bits: int, prefixes: list[int]) -> None:
    if not 1 <= num_bits <= 16:
        raise RuntimeError(f"salun_ext: argument 'num_bits': expected 1..16, got {num_bits}")
    if low_bit < 0 or low_bit + num_bits > KEY_BITS:
        raise RuntimeError(
            "salun_ext: argument 'low_bit': expected 0 <= low_bit and low_bit + num_bits <= 31, "
            f"got low_bit={low_bit} num_bits={num_bits}"
        )
    if len(prefixes) == 0:
        raise RuntimeError("salun_ext: argument 'prefixes': expected at least one prefix (use [0] for the top digit)")
    limit = 1 << (KEY_BITS - low_bit - num_bits)
    for r, p in enumerate(prefixes):
        if not 0 <= p < limit:
            raise RuntimeError(
                f"salun_ext: argument 'prefixes': prefixes[{r}] = {p} is outside [0, {limit}) "
                f"for low_bit + num_bits = {low_bit + num_bits}"
            )
        if r > 0 and p <= prefixes[r - 1]:
            raise RuntimeError(
                f"salun_ext: argument 'prefixes': must be strictly increasing, got {prefixes[r - 1]} before {p}"
            )


@reference("key_histogram")
def key_histogram(
    grads: list[torch.Tensor], low_bit: int, num_bits: int, prefixes: list[int], nan_as_zero: bool
) -> torch.Tensor:
    check_grads(grads)
    _check_digit(low_bit, num_bits, prefixes)
    bins = 1 << num_bits
    out = torch.zeros((len(prefixes), bins), dtype=torch.int64, device=grads[0].device)
    for g in grads:
        k = keys(g, nan_as_zero)
        high = k >> (low_bit + num_bits)
        digit = (k >> low_bit) & (bins - 1)
        for row, prefix in enumerate(prefixes):
            out[row] += torch.bincount(digit[high == prefix], minlength=bins)
    return out


@reference("mask_words")
def mask_words(grads: list[torch.Tensor], threshold_key: int, tie_limit: int, nan_as_zero: bool) -> torch.Tensor:
    check_grads(grads)
    if not 0 <= threshold_key <= NAN_KEY:
        raise RuntimeError(
            f"salun_ext: argument 'threshold_key': expected a 31-bit key in [0, 0x7FFFFFFF], got {threshold_key}"
        )
    offsets, total = _mask_layout.word_offsets([g.numel() for g in grads])
    out = torch.zeros(total, dtype=torch.int32, device=grads[0].device)
    ties_seen = 0  # ties at the threshold met so far in global index order
    for g, offset in zip(grads, offsets):
        k = keys(g, nan_as_zero)
        take = k > threshold_key
        tie = k == threshold_key
        if tie_limit < 0:
            take |= tie
        elif tie_limit > 0:
            rank = torch.cumsum(tie.to(torch.int64), 0) - 1 + ties_seen
            take |= tie & (rank < tie_limit)
            ties_seen += int(tie.sum().item())
        words = _mask_layout.pack_bits(take)
        out[offset : offset + words.numel()] = words
    return out


def sample_indices(total: int, num_samples: int, device, block: int | None = None) -> torch.Tensor:
    """Global indices floor(i * total / num_samples) of the strided sample (all indices when it covers everything).

    Exact without a 128-bit product (the kernels use one): with total = q * count + r, the index is i * q +
    floor(i * r / count), and i * r is split into blocks of i (a Python-int base plus an int64 offset) so that no
    int64 product overflows, whatever count * total is (`block`: the block length; by default the largest safe).
    """
    count = min(num_samples, total)
    q, r = divmod(total, count)
    if block is None:
        block = max(1, 2**62 // count)  # base remainder + j * r < (block + 1) * count <= 2**62 + count
    parts = []
    for start in range(0, count, block):
        j = torch.arange(min(block, count - start), dtype=torch.int64, device=device)
        base_q, base_r = divmod(start * r, count)
        parts.append((start + j) * q + base_q + (base_r + j * r) // count)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@reference("sample_keys")
def sample_keys(grads: list[torch.Tensor], num_samples: int, nan_as_zero: bool) -> torch.Tensor:
    check_grads(grads)
    if num_samples < 1:
        raise RuntimeError(f"salun_ext: argument 'num_samples': expected >= 1, got {num_samples}")
    total = sum(g.numel() for g in grads)
    device = grads[0].device
    if total == 0:
        return torch.zeros(0, dtype=torch.int32, device=device)
    index = sample_indices(total, num_samples, device)
    out = torch.empty(index.numel(), dtype=torch.int32, device=device)
    start = 0
    for g in grads:
        n = g.numel()
        sel = (index >= start) & (index < start + n)
        if bool(sel.any()):
            out[sel] = keys(g, nan_as_zero)[index[sel] - start].to(torch.int32)
        start += n
    return out


@reference("window_select")
def window_select(
    grads: list[torch.Tensor], lo_key: int, hi_key: int, capacity: int, nan_as_zero: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_grads(grads)
    if not 0 <= lo_key <= hi_key <= NAN_KEY:
        raise RuntimeError(
            f"salun_ext: arguments 'lo_key', 'hi_key': expected 0 <= lo_key <= hi_key <= 0x7FFFFFFF, "
            f"got {lo_key}, {hi_key}"
        )
    if capacity < 0:
        raise RuntimeError(f"salun_ext: argument 'capacity': expected >= 0, got {capacity}")
    device = grads[0].device
    offsets, total = _mask_layout.word_offsets([g.numel() for g in grads])
    words = torch.zeros(total, dtype=torch.int32, device=device)
    counts = torch.zeros(3, dtype=torch.int64, device=device)
    found_keys, found_pos = [], []
    for g, offset in zip(grads, offsets):
        k = keys(g, nan_as_zero)
        above = k > hi_key
        inside = (k >= lo_key) & ~above
        packed = _mask_layout.pack_bits(above)
        words[offset : offset + packed.numel()] = packed
        counts[0] += above.sum()
        counts[1] += inside.sum()
        if not nan_as_zero:
            counts[2] += (k == NAN_KEY).sum()
        found_keys.append(k[inside].to(torch.int32))
        found_pos.append(torch.nonzero(inside).flatten() + offset * 32)
    cand_keys = torch.zeros(capacity, dtype=torch.int32, device=device)
    cand_pos = torch.zeros(capacity, dtype=torch.int64, device=device)
    all_keys, all_pos = torch.cat(found_keys)[:capacity], torch.cat(found_pos)[:capacity]
    cand_keys[: all_keys.numel()] = all_keys
    cand_pos[: all_pos.numel()] = all_pos
    return words, counts, cand_keys, cand_pos


# ---------------------------------------------------------------------------------------------------------------
# Masked optimizer steps


def _check_step_lists(name: str, params: list[torch.Tensor], packed: tuple[str, ...] = (), **lists) -> None:
    """The step ops' list checks; the lists named in `packed` hold compact state (one entry per salient element)."""
    for i, p in enumerate(params):
        if p.dtype not in KEY_DTYPES:
            raise RuntimeError(
                f"salun_ext: {name}: params[{i}] has dtype {p.dtype}, expected float32, bfloat16 or float16"
            )
        if not p.is_contiguous():
            raise RuntimeError(f"salun_ext: {name}: params[{i}] must be contiguous")
        if p.device != params[0].device:
            raise RuntimeError(f"salun_ext: {name}: params[{i}] is on {p.device}, expected {params[0].device}")
    for list_name, values in lists.items():
        if len(values) != len(params):
            raise RuntimeError(
                f"salun_ext: {name}: argument '{list_name}' has {len(values)} tensors, expected {len(params)}"
            )
    words = lists["mask_words"]
    for i, p in enumerate(params):
        expected = _mask_layout.segment_words(p.numel())
        if words[i].numel() not in (0, expected) or words[i].dtype != torch.int32:
            raise RuntimeError(
                f"salun_ext: {name}: mask_words[{i}] must be int32 with 0 or {expected} words, "
                f"got {words[i].dtype} with {words[i].numel()}"
            )
        for list_name, values in lists.items():
            t = values[i]
            if list_name == "state_steps":
                if t.numel() != 1:
                    raise RuntimeError(f"salun_ext: {name}: state_steps[{i}] must hold one value")
                continue
            if list_name in packed:
                count = salient_count(p, words[i])
                if t.shape != (count,):
                    raise RuntimeError(
                        f"salun_ext: {name}: {list_name}[{i}] has shape {tuple(t.shape)}, expected ({count},) (one "
                        f"entry per salient element of params[{i}])"
                    )
                _check_like_param(name, list_name, i, t, p)
            elif list_name != "mask_words":
                if t.shape != p.shape:
                    raise RuntimeError(
                        f"salun_ext: {name}: {list_name}[{i}] has shape {tuple(t.shape)}, expected {tuple(p.shape)}"
                    )
                _check_like_param(name, list_name, i, t, p)
            if t.device != p.device:
                raise RuntimeError(f"salun_ext: {name}: {list_name}[{i}] is on {t.device}, expected {p.device}")


def _check_like_param(name: str, list_name: str, i: int, t: torch.Tensor, p: torch.Tensor) -> None:
    if t.dtype != p.dtype:
        raise RuntimeError(
            f"salun_ext: {name}: {list_name}[{i}] has dtype {t.dtype}, expected {p.dtype} (the parameter's)"
        )
    if not t.is_contiguous():
        raise RuntimeError(f"salun_ext: {name}: {list_name}[{i}] must be contiguous")


def salient_count(p: torch.Tensor, words: torch.Tensor) -> int:
    """The number of salient entries of p: the length of its compact state (every entry when words is empty)."""
    return p.numel() if words.numel() == 0 else int(_mask_layout.unpack_bits(words, p.numel()).sum())


class _Entries:
    """The salient entries of one parameter under dense state: parameter-shaped tensors are read whole (fp32) and
    written where salient; every other entry keeps its exact bits. State tensors are parameter-shaped too."""

    def __init__(self, p: torch.Tensor, words: torch.Tensor) -> None:
        self.p = p
        self.salient = None if words.numel() == 0 else _mask_layout.unpack_bits(words, p.numel()).view(p.shape)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """A parameter-shaped tensor (the parameter, its gradient) as the fp32 values the update reads."""
        return t.float()

    def commit(self, target: torch.Tensor, new_fp32: torch.Tensor) -> None:
        """Write fp32 results into a parameter-shaped target where salient; elsewhere it keeps its exact bits."""
        new = new_fp32.to(target.dtype)
        target.copy_(new if self.salient is None else torch.where(self.salient, new, target))

    def commit_state(self, state: torch.Tensor, new_fp32: torch.Tensor) -> None:
        self.commit(state, new_fp32)


class _Packed(_Entries):
    """The salient entries of one parameter under compact state: gathered in flat element order, which is the
    order of the packed state tensors (one entry per salient element, all of them written)."""

    def __init__(self, p: torch.Tensor, words: torch.Tensor) -> None:
        self.p = p
        self.salient = None if words.numel() == 0 else _mask_layout.unpack_bits(words, p.numel())

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1)
        return (flat if self.salient is None else flat[self.salient]).float()

    def commit(self, target: torch.Tensor, new_fp32: torch.Tensor) -> None:
        flat = target.view(-1)
        if self.salient is None:
            flat.copy_(new_fp32.to(flat.dtype))
        else:
            flat[self.salient] = new_fp32.to(flat.dtype)

    def commit_state(self, state: torch.Tensor, new_fp32: torch.Tensor) -> None:
        state.copy_(new_fp32.to(state.dtype))


def _div(x: torch.Tensor, scalar: float) -> torch.Tensor:
    """IEEE fp32 division by a scalar. (torch computes `tensor / python_float` as a multiplication by the scalar's
    reciprocal, which can differ by an ulp; the kernels divide, so the spec divides too.)"""
    return x / torch.full_like(x, scalar)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root, as IEEE-754 (and the kernels' sqrtf) define it. (torch's vectorized CPU
    sqrt may be off by an ulp; the square root of an fp32 value taken in double and rounded once is exact.)"""
    return x.double().sqrt().float()


def _direction(grad: torch.Tensor, scale: float | None, maximize: bool) -> torch.Tensor:
    """The fp32 gradient, unscaled (AMP) and negated for maximize, as every masked step starts."""
    d = grad.float()
    if scale is not None:
        d = _div(d, scale)
    return -d if maximize else d


def _step_scalars(lr, lr_tensor, grad_scale, found_inf):
    """(skip, lr, inverse grad scale) with tensors read once, as the kernels do."""
    if found_inf is not None and float(found_inf.item()) != 0.0:
        return True, 0.0, None
    lr_value = float(lr_tensor.item()) if lr_tensor is not None else lr
    scale = float(grad_scale.item()) if grad_scale is not None else None
    return False, lr_value, scale


def _sgd_step(
    name,
    entries,
    params,
    grads,
    momentum_buffers,
    mask_words,
    lr,
    lr_tensor,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    maximize,
    first_step,
    grad_scale,
    found_inf,
) -> None:
    """masked_sgd_ (entries=_Entries: dense state) and masked_sgd_compact_ (entries=_Packed): one spec."""
    bufs = momentum_buffers if momentum != 0 else [None] * len(params)
    lists = {"grads": grads, "mask_words": mask_words}
    if momentum != 0:
        lists["momentum_buffers"] = momentum_buffers
    _check_step_lists(name, params, packed=("momentum_buffers",) if entries is _Packed else (), **lists)
    skip, lr, scale = _step_scalars(lr, lr_tensor, grad_scale, found_inf)
    if skip:
        return
    for p, g, buf, words in zip(params, grads, bufs, mask_words):
        e = entries(p, words)
        p32, d = e.gather(p), _direction(e.gather(g), scale, maximize)
        if weight_decay != 0:
            d = d + weight_decay * p32
        if momentum != 0:
            b = d if first_step else momentum * buf.float() + (1 - dampening) * d
            e.commit_state(buf, b)
            d = d + momentum * b if nesterov else b
        e.commit(p, p32 - lr * d)


@reference("masked_sgd_")
def masked_sgd_(*args) -> None:
    _sgd_step("masked_sgd_", _Entries, *args)


@reference("masked_sgd_compact_")
def masked_sgd_compact_(*args) -> None:
    _sgd_step("masked_sgd_compact_", _Packed, *args)


def _adam_step(
    name,
    entries,
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    state_steps,
    mask_words,
    lr,
    lr_tensor,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled_weight_decay,
    amsgrad,
    maximize,
    grad_scale,
    found_inf,
) -> None:
    """masked_adam_ (entries=_Entries: dense state) and masked_adam_compact_ (entries=_Packed): one spec."""
    lists = {
        "grads": grads,
        "exp_avgs": exp_avgs,
        "exp_avg_sqs": exp_avg_sqs,
        "state_steps": state_steps,
        "mask_words": mask_words,
    }
    if amsgrad:
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    packed = ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs") if entries is _Packed else ()
    _check_step_lists(name, params, packed=packed, **lists)
    skip, lr, scale = _step_scalars(lr, lr_tensor, grad_scale, found_inf)
    if skip:
        return
    maxes = max_exp_avg_sqs if amsgrad else [None] * len(params)
    for p, g, m, v, vmax, step_t, words in zip(params, grads, exp_avgs, exp_avg_sqs, maxes, state_steps, mask_words):
        e = entries(p, words)
        step = float(step_t.item())
        p32, d = e.gather(p), _direction(e.gather(g), scale, maximize)
        if weight_decay != 0:
            if decoupled_weight_decay:
                p32 = p32 * (1 - lr * weight_decay)
            else:
                d = d + weight_decay * p32
        m32 = m.float() + (1 - beta1) * (d - m.float())  # lerp, as torch
        v32 = beta2 * v.float() + (1 - beta2) * d * d
        e.commit_state(m, m32)
        e.commit_state(v, v32)
        bias1 = 1 - beta1**step
        bias2_sqrt = math.sqrt(1 - beta2**step)
        if amsgrad:
            vmax32 = torch.maximum(vmax.float(), v32)
            e.commit_state(vmax, vmax32)
            denom = _div(_sqrt(vmax32), bias2_sqrt) + eps
        else:
            denom = _div(_sqrt(v32), bias2_sqrt) + eps
        e.commit(p, p32 - (lr / bias1) * m32 / denom)


@reference("masked_adam_")
def masked_adam_(*args) -> None:
    _adam_step("masked_adam_", _Entries, *args)


@reference("masked_adam_compact_")
def masked_adam_compact_(*args) -> None:
    _adam_step("masked_adam_compact_", _Packed, *args)
