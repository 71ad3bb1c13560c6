"""The kernel tensor lists of one parameter group, built once and reused while nothing they depend on changes.

Building the lists a masked step hands to its kernel (relayouts, permuted views, mask words, state tensors, device
buckets) costs a few Python calls per tensor; at SD-UNet tensor counts (~700) that is several times the kernel's
own time on small tensors. A GroupPlan keeps them, and each step only re-reads what can change from one step to
the next: the gradients (zero_grad(set_to_none=True) allocates new ones every step). A step reuses the plan only
when, checked with one C-level pass per property over the list:

  * the group, its params list, the optimizer's state dict and every parameter's identity and storage
    (data_ptr: `p.data = ...`, `model.to(...)`) are the ones the plan was built from;
  * each parameter's state dict and its state tensors are the same objects (load_state_dict, a replaced buffer);
  * the gradients are present / absent (None) exactly as when it was built, of the same Python type (a DTensor
    is never planned), and have the parameter's shape, strides, dtype and device (a sparse gradient has no
    strides: it fails the check).

Anything else rebuilds the lists through the full, checked path (so every bad-input error is the uncached one).
Groups holding DTensors are never planned (their local shards are re-read every step).
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter, is_, itemgetter

import torch

_GRAD = attrgetter("grad")
_SHAPE = attrgetter("shape")
_DTYPE = attrgetter("dtype")
_DEVICE = attrgetter("device")
_STRIDE = torch.Tensor.stride
_PTR = torch.Tensor.data_ptr


class Item:
    """One parameter's share of a masked step: the contiguous kernel views and its mask words."""

    __slots__ = ("first", "grad", "param", "perm", "source", "states", "words")

    def __init__(self, source, param, grad, states, words, perm, first=False):
        self.source = source  # the parameter itself (group["params"][i])
        self.param = param  # its kernel view
        self.grad = grad  # its gradient's kernel view (this step)
        self.states = states  # kernel views of its state tensors, in the optimizer's state-key order
        self.words = words
        self.perm = perm  # dimension order of the kernel view (None: the tensor itself)
        self.first = first  # SGD: the momentum buffer is new this step


class Bucket:
    """The lists of one device's kernel call (grads filled in per step)."""

    __slots__ = ("device", "first", "flat_step", "index", "params", "sources", "states", "words")

    def __init__(self, device, items: list[Item], index: list[int] | None):
        self.device = device
        self.index = index  # positions in the group's gradient list (None: all of them)
        self.sources = [it.source for it in items]
        self.flat_step: torch.Tensor | None = None  # Adam: every step count of the bucket is a view of this
        self.params = [it.param for it in items]
        self.states = [list(column) for column in zip(*(it.states for it in items))] if items else []
        self.words = [it.words for it in items]
        self.first = [it.first for it in items]


def buckets_of(items: list[Item]) -> list[Bucket]:
    """Items split by device, in order (one bucket, index None, in the usual one-device case)."""
    if not items:
        return []
    devices: dict[torch.device, list[int]] = {}
    for i, it in enumerate(items):
        devices.setdefault(it.param.device, []).append(i)
    if len(devices) == 1:
        return [Bucket(next(iter(devices)), items, None)]
    return [Bucket(device, [items[i] for i in index], index) for device, index in devices.items()]


class GroupPlan:
    """What a step of one group reuses; `grads()` says whether it still holds (and gives this step's grads)."""

    def __init__(self, group: dict, state, live: list[torch.Tensor], items: list[Item], state_keys: tuple):
        self.group = group
        self.params = group["params"]
        self.param_ids = list(map(id, self.params))
        self.param_ptrs = list(map(_PTR, self.params))
        self.state = state
        self.state_keys = state_keys
        self.live = live  # the parameters the step may update (not frozen), in group order
        self.grad_types = list(map(type, map(_GRAD, live)))
        present = [i for i, t in enumerate(self.grad_types) if t is not type(None)]
        self.pick: Callable | None = None
        if not present:
            self.pick = lambda g: []
        elif len(present) == 1:
            self.pick = lambda g, i=present[0]: [g[i]]
        elif len(present) != len(live):
            self.pick = itemgetter(*present)
        sources = [it.source for it in items]
        self.sources = sources
        self.shapes = list(map(_SHAPE, sources))
        self.strides = list(map(_STRIDE, sources))
        self.dtypes = list(map(_DTYPE, sources))
        self.devices = list(map(_DEVICE, sources))
        self.perms = [(i, it.perm) for i, it in enumerate(items) if it.perm is not None]
        self.buckets = buckets_of(items)
        self.record_state()

    def record_state(self) -> None:
        """Remember the state dicts and tensors the lists were built from (again after an optimizer edits them)."""
        # (no state dict is created for a parameter whose optimizer keeps none: torch's state_dict layout)
        self.states = [self.state[p] for p in self.sources] if self.state_keys else []
        self.state_tensors = [list(map(itemgetter(key), self.states)) for key in self.state_keys]

    def grads(self, state, state_keys: tuple) -> list[torch.Tensor] | None:
        """This step's kernel gradients when the plan still holds, else None (rebuild)."""
        params = self.params
        if state is not self.state or self.group["params"] is not params or state_keys != self.state_keys:
            return None
        if list(map(id, params)) != self.param_ids or list(map(_PTR, params)) != self.param_ptrs:
            return None
        grads = list(map(_GRAD, self.live))
        if list(map(type, grads)) != self.grad_types:
            return None
        if self.pick is not None:
            grads = list(self.pick(grads))
        try:
            if (
                list(map(_SHAPE, grads)) != self.shapes
                or list(map(_STRIDE, grads)) != self.strides
                or list(map(_DTYPE, grads)) != self.dtypes
                or list(map(_DEVICE, grads)) != self.devices
            ):
                return None
        except RuntimeError:  # no strides: a sparse (or other non-strided) gradient
            return None
        if self.states and not all(map(is_, map(state.__getitem__, self.sources), self.states)):
            return None
        for key, tensors in zip(self.state_keys, self.state_tensors):
            if not all(map(is_, map(itemgetter(key), self.states), tensors)):
                return None
        for i, perm in self.perms:
            grads[i] = grads[i].permute(perm)
        return grads


def bucket_grads(bucket: Bucket, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return grads if bucket.index is None else [grads[i] for i in bucket.index]
