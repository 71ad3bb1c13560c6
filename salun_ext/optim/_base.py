"""Shared machinery of the masked optimizers: mask resolution, validation, compat mode, device buckets."""

from __future__ import annotations

from typing import Literal

import torch

from salun_ext import ops
from salun_ext.distributed.shards import is_dtensor, to_local
from salun_ext.optim._compact import DIGEST_KEY, PACKED_KEYS, StateLayout, mask_digest, pack
from salun_ext.optim._masks import FROZEN, TRAIN_ALL, MaskSpec, Unmasked, check_grad, dense_mask, resolve_param_masks
from salun_ext.optim._plan import Bucket, GroupPlan, Item, bucket_grads, buckets_of
from salun_ext.utils.errors import UsageError

Mode = Literal["strict", "compat"]


class MaskedOptimizerMixin:
    """Mixed into a torch.optim optimizer subclass (MaskedSGD(MaskedOptimizerMixin, torch.optim.SGD), ...).

    strict (default): only salient entries move; non-salient entries of the parameters and of every state tensor
        stay bit-identical (weight decay and momentum too). Runs the salun_ext masked step ops.
    compat: the paper code's recipe, for reproducing its numbers: grad *= mask, then the dense torch update (weight
        decay and momentum keep moving "frozen" weights).
    """

    @torch.no_grad()
    def step(self, closure=None):
        """One step: every check first (bad input loses nothing), then the paper's dense update on masked
        gradients (compat) or the fused masked kernels, group by group (strict)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.mode == "compat":
            self._validate()
            self._compat_prepare()
            super().step()  # the torch optimizer's own dense step
            return loss
        grad_scale, found_inf = self._amp_args(self)
        # 1. the groups whose kernel lists still hold give this step's gradients; the others are checked in full
        ready = [self._planned_grads(group) for group in self.param_groups]
        for group, grads in zip(self.param_groups, ready):
            if grads is None:
                self._validate_group(group)
        # 2. every list is (re)built before the first kernel runs; 3. the kernels
        launches = [self._group_lists(group, grads) for group, grads in zip(self.param_groups, ready)]
        for group, (buckets, grads) in zip(self.param_groups, launches):
            for bucket in buckets:
                self._launch(group, bucket, bucket_grads(bucket, grads), grad_scale, found_inf)
        return loss

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        """The state tensors a strict step of this group reads, in the order of Item.states."""
        raise NotImplementedError

    def _group_items(self, group: dict) -> list[Item]:
        """The checked, uncached kernel views of one group (state created on first use, layouts matched)."""
        raise NotImplementedError

    def _launch(self, group: dict, bucket: Bucket, grads: list[torch.Tensor], grad_scale, found_inf) -> None:
        """The strict update of one device's share of a group (each optimizer's own kernel call)."""
        raise NotImplementedError

    def _planned_grads(self, group: dict) -> list[torch.Tensor] | None:
        """This step's kernel gradients of the group when its cached lists still hold, else None."""
        plan = self._plans.get(id(group))
        if plan is None or plan.group is not group or torch.compiler.is_compiling():
            return None
        return plan.grads(self.state, self._state_keys(group))

    def _group_lists(self, group: dict, grads: list[torch.Tensor] | None) -> tuple[list[Bucket], list[torch.Tensor]]:
        """(device buckets, gradients) of a group: the cached plan's, or built now (and cached when it can be)."""
        if grads is not None:
            return self._plans[id(group)].buckets, grads
        items = self._group_items(group)
        live = [p for p in group["params"] if self._words_for(p) is not None]
        cacheable = not (
            torch.compiler.is_compiling()
            or any(it.first for it in items)  # SGD's new momentum buffers: the next step is not a first step
            or any(is_dtensor(p) or is_dtensor(p.grad) for p in live)
        )
        plan = GroupPlan(group, self.state, live, items, self._state_keys(group)) if cacheable else None
        if plan is not None:
            self._plan_built(plan)
        self._plans[id(group)] = plan
        return (plan.buckets if plan is not None else buckets_of(items)), [it.grad for it in items]

    def _plan_built(self, plan: GroupPlan) -> None:
        """Hook: an optimizer may rearrange its state once the lists are cached (then plan.record_state())."""

    def _item(self, p: torch.Tensor, states: tuple, words: torch.Tensor, first: bool = False) -> Item:
        """p's share of a step: kernel views of p and its gradient; `states`: the state tensors' kernel views."""
        grad = self._kernel_view(p, self._relayout(p, p.grad))
        return Item(p, self._kernel_view(p, p), grad, states, self._kernel_words_for(p, words), self._perm(p), first)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._plans.clear()  # (they would be rebuilt anyway; this frees the old state at once)
        if self.state_layout == "compact":
            self._adopt_loaded_state()

    def _init_masks(self, mask: MaskSpec | None, unmasked: Unmasked | None, mode: Mode, state: StateLayout) -> None:
        if mode not in ("strict", "compat"):
            raise UsageError(f"mode must be 'strict' or 'compat', got {mode!r}")
        if state not in ("dense", "compact"):
            raise UsageError(f"state must be 'dense' or 'compact', got {state!r}")
        if state == "compact" and mode != "strict":
            raise UsageError(
                f"state='compact' needs mode='strict' (compat mode moves non-salient entries and their state), got "
                f"mode={mode!r}"
            )
        self.mode = mode
        self.state_layout = state
        self.unmasked = unmasked
        self._masks = resolve_param_masks(self.param_groups, mask, unmasked)
        self._digests: dict[int, int] = {}
        self._empty_words: dict[torch.device, torch.Tensor] = {}
        self._dense_cache: dict[int, torch.Tensor] = {}
        self._perms: dict[int, tuple[int, ...] | None] = {}
        self._kernel_words: dict[int, torch.Tensor] = {}
        self._plans: dict[int, GroupPlan | None] = {}  # id(group) -> its cached kernel lists (_plan.py)
        # strict mode unscales gradients and honours found_inf itself (GradScaler sets grad_scale/found_inf)
        self._step_supports_amp_scaling = mode == "strict"
        if state == "compact":
            self._init_compact()

    def add_param_group(self, param_group) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_masks"):  # groups added after construction are trained densely or frozen, as told
            for p in self.param_groups[-1]["params"]:
                if id(p) not in self._masks:
                    if self.unmasked is None:
                        raise UsageError("a parameter group added later is not covered by the mask: set unmasked=")
                    self._masks[id(p)] = TRAIN_ALL if self.unmasked == "train" else FROZEN
            if self.state_layout == "compact":
                self._init_compact()

    # Compact state (state="compact", _compact.py): each per-entry state tensor holds the salient entries only,
    # packed in flat element order. The optimizer keeps its own copy of the mask words (a later in-place edit of the
    # caller's mask cannot move packed entries to other weights) and each parameter's mask digest, which every
    # compact state records and every load and uncached step checks. FSDP2 (DTensor) parameters: each rank packs
    # the entries of its local shard (plain local tensors; the digest is the shard's, so a resume needs the same
    # sharding).
    def _init_compact(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                words = self._words_for(p)
                if id(p) in self._digests or words is None:
                    continue
                if words.numel():
                    words = self._masks[id(p)] = words.clone()
                self._digests[id(p)] = mask_digest(words, to_local(p).numel())

    def _compact_count(self, p: torch.Tensor, words: torch.Tensor) -> int:
        return to_local(p).numel() if words.numel() == 0 else ops.popcount(words)

    def _new_state(self, p: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """A zero state tensor of p in this optimizer's layout (compact: of its local shard)."""
        if self.state_layout == "compact":
            return torch.zeros(self._compact_count(p, words), dtype=p.dtype, device=to_local(p).device)
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def _state_view(self, p: torch.Tensor, state: dict, key: str, name: str) -> torch.Tensor:
        """The kernel view of state[key] (dense: laid out like p, relayouted when not; compact: the tensor itself)."""
        if self.state_layout == "dense":
            state[key] = self._relayout(p, state[key])
            return self._kernel_view(p, state[key])
        self._check_compact(p, state, name)
        return state[key]

    def _check_compact(self, p: torch.Tensor, state: dict, name: str) -> None:
        """The compact state of p is the one its mask gives (else UsageError: nothing has changed yet)."""
        if self._perm(p) is not None:
            raise UsageError(
                f"state='compact' needs contiguous parameters; {name} has strides {to_local(p).stride()} (e.g. "
                "channels_last): use state='dense' or a contiguous model"
            )
        digest = state.setdefault(DIGEST_KEY, self._digests[id(p)])
        if digest != self._digests[id(p)]:
            raise UsageError(
                f"the compact optimizer state of {name} was packed under another mask (digest {digest}, this "
                f"optimizer's mask gives {self._digests[id(p)]}): compact state follows its mask bit for bit; convert "
                "it with compact_to_dense_state(state_dict, <optimizer of the old mask>) and load the dense state"
            )

    def _adopt_loaded_state(self) -> None:
        """After load_state_dict (compact): dense-layout state is packed under this mask (torch.optim's or
        state='dense' checkpoints load as they are); compact state must match this mask and its lengths."""
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                words, state = self._words_for(p), self.state.get(p)
                if words is None or not state:
                    continue
                name = self._param_name(group, i)
                count = self._compact_count(p, words)
                local_shape = to_local(p).shape
                for key in PACKED_KEYS:  # (a DTensor state of a dense-layout checkpoint: its local shard)
                    if isinstance(state.get(key), torch.Tensor):
                        state[key] = to_local(state[key])
                dense = [
                    k for k in PACKED_KEYS if isinstance(state.get(k), torch.Tensor) and state[k].shape == local_shape
                ]
                if dense and DIGEST_KEY not in state:
                    for key in dense:
                        state[key] = pack(state[key], words)
                self._check_compact(p, state, name)
                for key in PACKED_KEYS:
                    value = state.get(key)
                    if isinstance(value, torch.Tensor) and value.shape != (count,):
                        raise UsageError(
                            f"optimizer state {key!r} of {name} has shape {tuple(value.shape)}, expected ({count},) "
                            "(compact: one entry per salient element) or the parameter's shape (dense)"
                        )

    def _param_name(self, group, index: int) -> str:
        names = group.get("param_names")
        return names[index] if names is not None else f"params[{index}]"

    def _words_for(self, p: torch.Tensor):
        """int32 mask words of p (empty = every entry salient), or None when p is frozen."""
        spec = self._masks.get(id(p), FROZEN)
        if spec is FROZEN:
            return None
        if spec is TRAIN_ALL:
            if p.device not in self._empty_words:
                self._empty_words[p.device] = torch.empty(0, dtype=torch.int32, device=p.device)
            return self._empty_words[p.device]
        return spec

    # The step kernels walk tensors in memory order and masks are in logical (row-major) order. A parameter stored
    # in another dense layout (channels_last conv weights) is handed to the kernels as the permuted view that is
    # contiguous, with its mask bits repacked once in that order. FSDP2 parameters (DTensors) are stepped through
    # their local shards: the kernels see plain tensors, and the mask words are those of the local rows.
    def _perm(self, p: torch.Tensor) -> tuple[int, ...] | None:
        if id(p) not in self._perms:
            self._perms[id(p)] = memory_order(to_local(p))
        return self._perms[id(p)]

    def _kernel_view(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """t (p itself, its grad or a state tensor) as the contiguous view the kernels update in place."""
        perm = self._perm(p)
        t = to_local(t)
        view = t if perm is None else t.permute(perm)
        if not view.is_contiguous():
            raise RuntimeError("internal: tensor not laid out like its parameter (use _relayout first)")
        return view

    def _relayout(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A tensor laid out exactly like p (the same strides), copying t only when it is not."""
        if to_local(t).stride() == to_local(p).stride():
            return t
        return torch.empty_like(p).copy_(t)

    def _kernel_words_for(self, p: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        perm = self._perm(p)
        if perm is None or words.numel() == 0:
            return words
        if id(p) not in self._kernel_words:
            dense = dense_mask(p, words).permute(perm).contiguous().reshape(-1)
            self._kernel_words[id(p)] = ops.pack_bits(dense)
        return self._kernel_words[id(p)]

    def _validate(self) -> None:
        """Every check before any parameter changes: bad input loses nothing."""
        for group in self.param_groups:
            self._validate_group(group)

    def _validate_group(self, group: dict) -> None:
        for i, p in enumerate(group["params"]):
            if p.grad is not None and self._words_for(p) is not None:
                check_grad(p, self._param_name(group, i))

    def _compat_prepare(self) -> None:
        """grad *= mask (the paper's recipe); frozen parameters drop their gradient so torch skips them."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                words = self._words_for(p)
                if words is None:
                    p.grad = None
                elif words.numel():
                    if id(p) not in self._dense_cache:
                        self._dense_cache[id(p)] = dense_mask(p, words)
                    to_local(p.grad).mul_(self._dense_cache[id(p)])

    @staticmethod
    def _amp_args(optimizer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None)


def memory_order(t: torch.Tensor) -> tuple[int, ...] | None:
    """The dimension order in which t is contiguous (None when it already is); error for overlapping layouts."""
    if t.is_contiguous():
        return None
    perm = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d])))
    if not t.permute(perm).is_contiguous():
        raise RuntimeError(
            f"masked optimizers need dense, non-overlapping parameters; got shape {tuple(t.shape)} with strides "
            f"{t.stride()}"
        )
    return perm


def lr_args(lr) -> tuple[float, torch.Tensor | None]:
    if isinstance(lr, torch.Tensor):
        return 0.0, lr
    return float(lr), None


def on_device(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A scalar tensor argument (lr, grad_scale, found_inf) for the step kernels of `device`. A CPU tensor stays on
    the CPU: the kernels read its value on the host, where copying it to a GPU would be a pageable host-to-device
    copy (a stream sync on every step, and no CUDA graph can capture it; the CUDA kernels refuse a CPU tensor
    inside a capture). A copy to the CPU blocks: a non-blocking device-to-host copy could still be in flight when
    the CPU kernel reads the value."""
    if t is None or t.device == device or t.device.type == "cpu":
        return t
    return t.to(device, non_blocking=device.type != "cpu")
