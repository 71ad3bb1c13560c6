"""Masked step kernels == the plain-PyTorch reference, bit for bit (CPU; CUDA on a GPU machine)."""

from __future__ import annotations

import itertools

import pytest
import torch

from salun_ext.ops import _mask_layout, _reference
from tests.helpers import DEVICES, id_formatter

# Without the native library the ops dispatch to the reference kernels: the tests marked native_vs_reference are
# then skipped as vacuous (counted, with the reason; failed under SALUN_EXT_REQUIRE_NATIVE=1), every other test
# here (oracle exactness, error messages, found_inf, opcheck) runs on the reference (see tests/conftest.py).
NATIVE = pytest.mark.native_vs_reference

SIZES = [1, 31, 4097, 65_537, 7]  # 65_537 straddles a CPU work chunk; 4097 is not a multiple of 32
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# (CPU: at density 0.001 nearly every mask word of a work item is empty, so the loop skips the empty words; at 0.01
# and above it updates and blends every word: both paths are compared with the reference)
def _words(n: int, density: float, gen: torch.Generator, device) -> torch.Tensor:
    if density >= 1.0:
        return torch.empty(0, dtype=torch.int32, device=device)  # dense: every entry salient
    bits = torch.rand(n, generator=gen) < density
    return _mask_layout.pack_bits(bits).to(device)


def _lists(dtype, density, device, seed=0, n_state=1):
    gen = torch.Generator().manual_seed(seed)
    params = [(torch.randn(n, generator=gen) * 2).to(dtype).to(device) for n in SIZES]
    grads = [(torch.randn(n, generator=gen) * 0.3).to(dtype).to(device) for n in SIZES]
    states = [[(torch.randn(n, generator=gen).abs() * 0.1).to(dtype).to(device) for n in SIZES] for _ in range(n_state)]
    words = [_words(n, density, gen, device) for n in SIZES]
    return params, grads, states, words


def _clone(lists):
    return [t.clone() for t in lists]


SGD_CASES = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, first_step=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False, maximize=False, first_step=True),
    dict(momentum=0.9, dampening=0.1, weight_decay=5e-4, nesterov=False, maximize=True, first_step=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False, first_step=False),
]


@NATIVE
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=id_formatter("dtype"))
@pytest.mark.parametrize("density", [0.0, 0.001, 0.01, 0.5, 1.0], ids=id_formatter("density"))
@pytest.mark.parametrize("case", range(len(SGD_CASES)), ids=id_formatter("case"))
@pytest.mark.parametrize("amp", ["none", "scale", "lr_tensor"])
def test_masked_sgd_matches_reference(device, dtype, density, case, amp):
    kw = SGD_CASES[case]
    params, grads, (bufs,), words = _lists(dtype, density, device, seed=case)
    scale = torch.tensor(1024.0, device=device) if amp == "scale" else None
    lr_tensor = torch.tensor(0.05, device=device) if amp == "lr_tensor" else None
    ref_p, ref_b = _clone(params), _clone(bufs)
    args = (
        0.1,
        lr_tensor,
        kw["momentum"],
        kw["dampening"],
        kw["weight_decay"],
        kw["nesterov"],
        kw["maximize"],
        kw["first_step"],
        scale,
        None,
    )
    bufs_arg = bufs if kw["momentum"] else []
    torch.ops.salun_ext.masked_sgd_(params, grads, bufs_arg, words, *args)
    _reference.masked_sgd_(ref_p, grads, ref_b if kw["momentum"] else [], words, *args)
    for got, want in itertools.chain(zip(params, ref_p), zip(bufs, ref_b)):
        assert torch.equal(got, want)


ADAM_CASES = [
    dict(weight_decay=0.0, decoupled=False, amsgrad=False, maximize=False),
    dict(weight_decay=1e-2, decoupled=True, amsgrad=False, maximize=False),
    dict(weight_decay=1e-2, decoupled=False, amsgrad=True, maximize=True),
    dict(weight_decay=0.1, decoupled=True, amsgrad=True, maximize=False),
]


@NATIVE
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=id_formatter("dtype"))
@pytest.mark.parametrize("density", [0.0, 0.001, 0.01, 0.5, 1.0], ids=id_formatter("density"))
@pytest.mark.parametrize("case", range(len(ADAM_CASES)), ids=id_formatter("case"))
@pytest.mark.parametrize("amp", ["none", "scale", "lr_tensor"])
def test_masked_adam_matches_reference(device, dtype, density, case, amp):
    kw = ADAM_CASES[case]
    params, grads, (m, v, vmax), words = _lists(dtype, density, device, seed=10 + case, n_state=3)
    steps = [torch.tensor(float(s), device=device) for s in (1, 2, 5, 100, 3)]  # per-tensor step counts
    scale = torch.tensor(512.0, device=device) if amp == "scale" else None
    lr_tensor = torch.tensor(3e-3, device=device) if amp == "lr_tensor" else None
    ref = [_clone(x) for x in (params, m, v, vmax)]
    args = (
        1e-3,
        lr_tensor,
        0.9,
        0.999,
        1e-8,
        kw["weight_decay"],
        kw["decoupled"],
        kw["amsgrad"],
        kw["maximize"],
        scale,
        None,
    )
    torch.ops.salun_ext.masked_adam_(params, grads, m, v, vmax if kw["amsgrad"] else [], steps, words, *args)
    _reference.masked_adam_(ref[0], grads, ref[1], ref[2], ref[3] if kw["amsgrad"] else [], steps, words, *args)
    for got, want in zip(itertools.chain(params, m, v, vmax), itertools.chain(*ref)):
        # bit for bit on every device and dtype, fp32 included (an FMA contraction would show here). On CUDA the
        # bias corrections come from the device's double pow; a float32 scalar derived from it could only differ
        # from the host's if pow's last-bit error crossed a float rounding boundary (docs/kernels.md)
        assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("device", DEVICES)
def test_found_inf_skips_the_step(device):
    params, grads, (bufs,), words = _lists(torch.float32, 0.5, device)
    before = _clone(params) + _clone(bufs)
    found = torch.tensor(1.0, device=device)
    torch.ops.salun_ext.masked_sgd_(
        params, grads, bufs, words, 0.1, None, 0.9, 0.0, 0.0, False, False, False, None, found
    )
    steps = [torch.tensor(1.0, device=device) for _ in params]
    torch.ops.salun_ext.masked_adam_(
        params,
        grads,
        bufs,
        _clone(bufs),
        [],
        steps,
        words,
        0.1,
        None,
        0.9,
        0.999,
        1e-8,
        0.0,
        True,
        False,
        False,
        None,
        found,
    )
    for got, want in zip(params + bufs, before):
        assert torch.equal(got, want)


@NATIVE
@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_values_follow_the_reference(device):
    p = torch.tensor([1.0, float("nan"), float("inf"), -0.0, 2.0], device=device)
    g = torch.tensor([float("inf"), 1.0, 1.0, 0.0, float("nan")], device=device)
    m, v, vmax = torch.zeros_like(p), torch.zeros_like(p), torch.full_like(p, float("nan"))
    words = [torch.empty(0, dtype=torch.int32, device=device)]
    steps = [torch.tensor(1.0, device=device)]
    ref = [x.clone() for x in (p, m, v, vmax)]
    args = (1e-3, None, 0.9, 0.999, 1e-8, 0.1, False, True, False, None, None)
    torch.ops.salun_ext.masked_adam_([p], [g], [m], [v], [vmax], steps, words, *args)
    _reference.masked_adam_([ref[0]], [g], [ref[1]], [ref[2]], [ref[3]], steps, words, *args)
    for got, want in zip((p, m, v, vmax), ref):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got[~got.isnan()], want[~want.isnan()])


@NATIVE
@pytest.mark.parametrize("device", DEVICES)
def test_thousands_of_tensors(device):
    gen = torch.Generator().manual_seed(4)
    sizes = torch.randint(1, 50, (2000,), generator=gen).tolist()
    params = [torch.randn(n, generator=gen).to(device) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(device) for n in sizes]
    bufs = [torch.zeros(n, device=device) for n in sizes]
    words = [_words(n, 0.3, gen, device) for n in sizes]
    ref_p, ref_b = _clone(params), _clone(bufs)
    args = (0.1, None, 0.9, 0.0, 5e-4, False, False, True, None, None)
    torch.ops.salun_ext.masked_sgd_(params, grads, bufs, words, *args)
    _reference.masked_sgd_(ref_p, grads, ref_b, words, *args)
    assert all(torch.equal(a, b) for a, b in zip(params + bufs, ref_p + ref_b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(grads=a["grads"][:-1]), "'grads' has"),
        (lambda a: a.update(grads=[g.double() for g in a["grads"]]), "dtype"),
        (lambda a: a.update(words=[torch.zeros(3, dtype=torch.int32, device=w.device) for w in a["words"]]), "words"),
        (lambda a: a.update(bufs=[b[:-1] if b.numel() > 1 else b.reshape(1, 1) for b in a["bufs"]]), "shape"),
    ],
    ids=["length", "dtype", "words", "shape"],
)
def test_step_op_errors(device, mutate, message):
    params, grads, (bufs,), words = _lists(torch.float32, 0.5, device)
    args = dict(grads=grads, bufs=bufs, words=words)
    mutate(args)
    before = _clone(params)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.salun_ext.masked_sgd_(
            params,
            args["grads"],
            args["bufs"],
            args["words"],
            0.1,
            None,
            0.9,
            0.0,
            0.0,
            False,
            False,
            False,
            None,
            None,
        )
    assert all(torch.equal(a, b) for a, b in zip(params, before)), "a rejected call must not change anything"


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    params, grads, (m, v), words = _lists(torch.float32, 0.5, device, n_state=2)
    steps = [torch.tensor(2.0, device=device) for _ in params]
    torch.library.opcheck(
        torch.ops.salun_ext.masked_sgd_.default,
        (params, grads, m, words, 0.1, None, 0.9, 0.0, 1e-4, True, False, False, None, None),
    )
    torch.library.opcheck(
        torch.ops.salun_ext.masked_adam_.default,
        (params, grads, m, v, [], steps, words, 1e-3, None, 0.9, 0.999, 1e-8, 1e-2, True, False, False, None, None),
    )


# ------------------------------------------------------------------------------------------ compact state
# masked_*_compact_ hold each state tensor packed: one entry per salient element, in flat element order. Their
# oracles: the compact reference, and the dense kernels run on the unpacked state (the same update per entry).


def _pack(t: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """The salient entries of t in flat order, written out independently of the code under test."""
    flat = t.reshape(-1)
    if words.numel() == 0:
        return flat.clone()
    shifts = torch.arange(32, device=words.device, dtype=torch.int64)
    bits = ((words.to(torch.int64).unsqueeze(1) >> shifts) & 1).reshape(-1)[
        : flat.numel()
    ]  # bit i % 32 of word i // 32
    return flat[bits.to(torch.bool)].clone()


COMPACT_SIZES = [1, 31, 4097, 65_537, 7, 0]


def _compact_lists(dtype, density, device, seed, n_state):
    """Dense params / grads, mask words, and state tensors zero at non-salient entries (as strict steps keep them)."""
    gen = torch.Generator().manual_seed(seed)
    params = [(torch.randn(n, generator=gen) * 2).to(dtype).to(device) for n in COMPACT_SIZES]
    grads = [(torch.randn(n, generator=gen) * 0.3).to(dtype).to(device) for n in COMPACT_SIZES]
    words = [_words(n, density, gen, device) for n in COMPACT_SIZES]
    states = []
    for _ in range(n_state):
        column = []
        for n, w in zip(COMPACT_SIZES, words):
            t = (torch.randn(n, generator=gen).abs() * 0.1).to(dtype)
            if w.numel():
                t[~_mask_layout.unpack_bits(w.cpu(), n)] = 0
            column.append(t.to(device))
        states.append(column)
    return params, grads, states, words


@NATIVE
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=id_formatter("dtype"))
@pytest.mark.parametrize("density", [0.0, 0.001, 0.1, 0.7, 1.0], ids=id_formatter("density"))
@pytest.mark.parametrize("case", range(len(ADAM_CASES)), ids=id_formatter("case"))
@pytest.mark.parametrize("amp", ["none", "scale"])
def test_masked_adam_compact_matches_reference_and_dense(device, dtype, density, case, amp):
    kw = ADAM_CASES[case]
    params, grads, dense_states, words = _compact_lists(dtype, density, device, 20 + case, 3)
    packed = [[_pack(t, w) for t, w in zip(column, words)] for column in dense_states]
    steps = [torch.tensor(float(s), device=device) for s in (1, 2, 5, 100, 3, 7)]
    scale = torch.tensor(512.0, device=device) if amp == "scale" else None
    lr_tensor = torch.tensor(3e-3, device=device) if amp == "scale" else None  # (lr_tensor rides with the scale)
    args = (1e-3, lr_tensor, 0.9, 0.999, 1e-8, kw["weight_decay"], kw["decoupled"], kw["amsgrad"], kw["maximize"])
    args = (*args, scale, None)

    def run(fn, state_lists):
        p, (m, v, x) = _clone(params), [_clone(c) for c in state_lists]
        fn(p, grads, m, v, x if kw["amsgrad"] else [], steps, words, *args)
        return p, m, v, x

    got = run(torch.ops.salun_ext.masked_adam_compact_, packed)
    want = run(_reference.masked_adam_compact_, packed)
    dense = run(torch.ops.salun_ext.masked_adam_, dense_states)
    dense = (dense[0], *[[_pack(t, w) for t, w in zip(column, words)] for column in dense[1:]])
    for a, b, c in zip(itertools.chain(*got), itertools.chain(*want), itertools.chain(*dense)):
        if device == "cuda" and dtype == torch.float32:  # device pow vs host pow (see the dense test)
            torch.testing.assert_close(a, b, rtol=2e-7, atol=1e-12)
        else:
            assert torch.equal(a, b)
        assert torch.equal(a, c), "the compact step must give every salient entry the dense step's bits"


@NATIVE
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=id_formatter("dtype"))
@pytest.mark.parametrize("density", [0.0, 0.001, 0.1, 0.7, 1.0], ids=id_formatter("density"))
@pytest.mark.parametrize("case", range(len(SGD_CASES)), ids=id_formatter("case"))
@pytest.mark.parametrize("amp", ["none", "scale"])
def test_masked_sgd_compact_matches_reference_and_dense(device, dtype, density, case, amp):
    kw = SGD_CASES[case]
    params, grads, (dense_bufs,), words = _compact_lists(dtype, density, device, 30 + case, 1)
    packed = [_pack(t, w) for t, w in zip(dense_bufs, words)]
    scale = torch.tensor(1024.0, device=device) if amp == "scale" else None
    lr_tensor = torch.tensor(0.05, device=device) if amp == "scale" else None  # (lr_tensor rides with the scale)
    args = (0.1, lr_tensor, kw["momentum"], kw["dampening"], kw["weight_decay"], kw["nesterov"], kw["maximize"])
    args = (*args, kw["first_step"], scale, None)

    def run(fn, bufs):
        p, b = _clone(params), _clone(bufs)
        fn(p, grads, b if kw["momentum"] else [], words, *args)
        return p, b

    got = run(torch.ops.salun_ext.masked_sgd_compact_, packed)
    want = run(_reference.masked_sgd_compact_, packed)
    dense_p, dense_b = run(torch.ops.salun_ext.masked_sgd_, dense_bufs)
    dense = (dense_p, [_pack(t, w) for t, w in zip(dense_b, words)])
    for a, b, c in zip(itertools.chain(*got), itertools.chain(*want), itertools.chain(*dense)):
        assert torch.equal(a, b)
        assert torch.equal(a, c), "the compact step must give every salient entry the dense step's bits"


@NATIVE
@pytest.mark.parametrize("device", DEVICES)
def test_compact_non_finite_values_follow_the_reference(device):
    p = torch.tensor([1.0, float("nan"), float("inf"), -0.0, 2.0, 3.0, float("-inf")], device=device)
    g = torch.tensor([float("inf"), 1.0, 1.0, 0.0, float("nan"), -1.0, 1.0], device=device)
    words = [_mask_layout.pack_bits(torch.tensor([1, 1, 1, 1, 1, 0, 1], dtype=torch.bool)).to(device)]
    m, v, vmax = torch.zeros(6, device=device), torch.zeros(6, device=device), torch.full((6,), float("nan"))
    vmax = vmax.to(device)
    steps = [torch.tensor(1.0, device=device)]
    ref = [x.clone() for x in (p, m, v, vmax)]
    args = (1e-3, None, 0.9, 0.999, 1e-8, 0.1, False, True, False, None, None)
    torch.ops.salun_ext.masked_adam_compact_([p], [g], [m], [v], [vmax], steps, words, *args)
    _reference.masked_adam_compact_([ref[0]], [g], [ref[1]], [ref[2]], [ref[3]], steps, words, *args)
    for got, want in zip((p, m, v, vmax), ref):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got[~got.isnan()], want[~want.isnan()])
    assert p[5].item() == 3.0, "a non-salient entry is never written"


@pytest.mark.parametrize("device", DEVICES)
def test_compact_found_inf_skips_the_step(device):
    params, grads, (bufs,), words = _compact_lists(torch.float32, 0.5, device, 3, 1)
    packed = [_pack(t, w) for t, w in zip(bufs, words)]
    before = _clone(params) + _clone(packed)
    found = torch.tensor(1.0, device=device)
    torch.ops.salun_ext.masked_sgd_compact_(
        params, grads, packed, words, 0.1, None, 0.9, 0.0, 0.0, False, False, False, None, found
    )
    for got, want in zip(params + packed, before):
        assert torch.equal(got, want)


@pytest.mark.parametrize("op", ["masked_sgd_compact_", "masked_adam_compact_"])
def test_compact_state_of_the_wrong_length_is_refused(op):
    params, grads, (m, v), words = _compact_lists(torch.float32, 0.5, "cpu", 4, 2)
    packed = [_pack(t, w) for t, w in zip(m, words)]
    packed[2] = packed[2][:-1]  # one entry short
    before = _clone(params)
    with pytest.raises(RuntimeError, match=r"\[2\] has shape .*one entry per salient element of params\[2\]"):
        if op == "masked_sgd_compact_":
            torch.ops.salun_ext.masked_sgd_compact_(
                params, grads, packed, words, 0.1, None, 0.9, 0.0, 0.0, False, False, False, None, None
            )
        else:
            steps = [torch.tensor(1.0) for _ in params]
            full = [_pack(t, w) for t, w in zip(v, words)]
            torch.ops.salun_ext.masked_adam_compact_(
                params, grads, packed, full, [], steps, words, 1e-3, None, 0.9, 0.999, 1e-8, 0.0, True, False,
                False, None, None,
            )  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(params, before)), "a rejected call must not change anything"
    dense = [t.clone() for t in m]  # a dense-shaped state is not a compact one
    with pytest.raises(RuntimeError, match="one entry per salient element"):
        torch.ops.salun_ext.masked_sgd_compact_(
            params, grads, dense, words, 0.1, None, 0.9, 0.0, 0.0, False, False, False, None, None
        )


@pytest.mark.parametrize("device", DEVICES)
def test_compact_opcheck(device):
    params, grads, (m, v), words = _compact_lists(torch.float32, 0.5, device, 5, 2)
    m, v = [_pack(t, w) for t, w in zip(m, words)], [_pack(t, w) for t, w in zip(v, words)]
    steps = [torch.tensor(2.0, device=device) for _ in params]
    torch.library.opcheck(
        torch.ops.salun_ext.masked_sgd_compact_.default,
        (params, grads, m, words, 0.1, None, 0.9, 0.0, 1e-4, True, False, False, None, None),
    )
    torch.library.opcheck(
        torch.ops.salun_ext.masked_adam_compact_.default,
        (params, grads, m, v, [], steps, words, 1e-3, None, 0.9, 0.999, 1e-8, 1e-2, True, False, False, None, None),
    )


@pytest.mark.cuda
def test_compact_cuda_refuses_packed_states_of_unequal_length():
    # (CUDA cannot count mask bits without a host sync: it bounds packed indices by exp_avgs' length instead)
    params, grads, (m, v), words = _compact_lists(torch.float32, 0.5, "cuda", 6, 2)
    m, v = [_pack(t, w) for t, w in zip(m, words)], [_pack(t, w) for t, w in zip(v, words)]
    v[2] = v[2][:-1]
    steps = [torch.tensor(1.0, device="cuda") for _ in params]
    with pytest.raises(RuntimeError, match="must have the same length"):
        torch.ops.salun_ext.masked_adam_compact_(
            params, grads, m, v, [], steps, words, 1e-3, None, 0.9, 0.999, 1e-8, 0.0, True, False, False, None, None
        )
