"""Compiled saliency kernels == the plain-PyTorch reference, bit for bit, on fuzzed and nasty inputs."""

from __future__ import annotations

import zlib

import pytest
import torch

import salun_ext
from salun_ext.ops import _reference
from salun_ext.ops._mask_layout import segment_words, unpack_bits, word_offsets
from salun_ext.saliency import DIGIT_WIDTHS, find_thresholds
from tests.helpers import DEVICES, REQUIRE_NATIVE, VALUE_KINDS, id_formatter, nasty_list, oracle_exact_mask

# Without the native library the ops dispatch to the reference kernels: the tests marked native_vs_reference are
# then skipped as vacuous (counted, with the reason; failed under SALUN_EXT_REQUIRE_NATIVE=1), every other test
# here (oracle exactness, error messages, found_inf, opcheck) runs on the reference (see tests/conftest.py).
NATIVE = pytest.mark.native_vs_reference

SIZE_SETS = {
    "odd": [1, 0, 33, 4097, 127, 1000, 65537],
    "tiny_many": [1, 2, 3, 5, 7] * 16,
    "one": [1],
}
DTYPE_SETS = {
    "fp32": [torch.float32],
    "bf16": [torch.bfloat16],
    "fp16": [torch.float16],
    "mixed": [torch.float32, torch.bfloat16, torch.float16],
}


def test_native_kernels_loaded():
    # `make test` sets SALUN_EXT_REQUIRE_NATIVE=1: a silently failed build must not pass as green
    if not REQUIRE_NATIVE and not salun_ext.native.loaded:
        pytest.skip(f"the native library salun_ext._C is not loaded ({salun_ext.native.reason})")
    assert salun_ext.native.loaded, salun_ext.native.reason


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["heavy", "zeros90", "ties", "signed_zero", "inf"])
def test_mask_words_equal_an_argsort_oracle(device, kind):
    # whichever kernel is active (native or reference): the top-k mask is a stable descending argsort of the keys
    tensors = nasty_list(SIZE_SETS["odd"], kind, DTYPE_SETS["mixed"], seed=11, device=device)
    total = sum(t.numel() for t in tensors)
    for k in (1, total // 3, total // 2, total - 1):
        th = find_thresholds(tensors, [k], nan_as_zero=True)[0]
        words = torch.ops.salun_ext.mask_words(tensors, th.key, th.k - th.greater, True).cpu()
        offsets, n_words = word_offsets([t.numel() for t in tensors])
        assert words.numel() == n_words
        got = torch.cat(
            [unpack_bits(words[o : o + segment_words(t.numel())], t.numel()) for o, t in zip(offsets, tensors)]
        )
        assert int(got.sum()) == k
        assert torch.equal(got, oracle_exact_mask(tensors, k)), k


def _digits(tensors, device):
    """Every (low_bit, num_bits, prefixes) the driver would use, plus a few arbitrary ones."""
    specs = [(31 - DIGIT_WIDTHS[0], DIGIT_WIDTHS[0], [0]), (15, 16, [0]), (0, 16, [0, 1, 5, 0x7F00]), (7, 3, [0, 2])]
    keys = torch.cat(
        [_reference.keys(t.cpu(), True) for t in tensors if t.numel()] or [torch.zeros(1, dtype=torch.long)]
    )
    sample = sorted(set(int(x) for x in keys[:: max(1, keys.numel() // 5)].tolist()))
    for low in (19, 9):
        width = 10 if low == 9 else 12
        prefixes = sorted({k >> (low + width) for k in sample})
        specs.append((low, width, prefixes))
    return specs


@NATIVE
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", VALUE_KINDS)
@pytest.mark.parametrize("dtypes", list(DTYPE_SETS), ids=id_formatter("dtypes"))
@pytest.mark.parametrize("sizes", list(SIZE_SETS), ids=id_formatter("sizes"))
def test_key_histogram_matches_reference(device, kind, dtypes, sizes):
    tensors = nasty_list(
        SIZE_SETS[sizes],
        kind,
        DTYPE_SETS[dtypes],
        seed=zlib.crc32(f"{kind}{dtypes}{sizes}".encode()) % 1000,
        device=device,
    )
    for nan_as_zero in (False, True):
        for low_bit, num_bits, prefixes in _digits(tensors, device):
            got = torch.ops.salun_ext.key_histogram(tensors, low_bit, num_bits, prefixes, nan_as_zero)
            want = _reference.key_histogram(tensors, low_bit, num_bits, prefixes, nan_as_zero)
            assert got.device == want.device
            assert torch.equal(got, want), (low_bit, num_bits, prefixes)


@NATIVE
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", VALUE_KINDS)
@pytest.mark.parametrize("dtypes", list(DTYPE_SETS), ids=id_formatter("dtypes"))
@pytest.mark.parametrize("sizes", list(SIZE_SETS), ids=id_formatter("sizes"))
def test_mask_words_matches_reference(device, kind, dtypes, sizes):
    tensors = nasty_list(SIZE_SETS[sizes], kind, DTYPE_SETS[dtypes], seed=7, device=device)
    total = sum(t.numel() for t in tensors)
    ks = sorted({0, 1, total // 3, total // 2, total - 1, total} - {0})
    for th in find_thresholds(tensors, ks, nan_as_zero=True):
        limits = {-1, 0, 1, th.k - th.greater, max(0, th.ties - 1), th.ties // 2}
        for tie_limit in sorted(limits):
            got = torch.ops.salun_ext.mask_words(tensors, th.key, tie_limit, True)
            want = _reference.mask_words(tensors, th.key, tie_limit, True)
            assert torch.equal(got, want), (th, tie_limit)


@NATIVE
@pytest.mark.parametrize("device", DEVICES)
def test_nan_keys_match_reference(device):
    t = torch.tensor([1.0, float("nan"), -float("nan"), float("inf"), 0.0], device=device)
    for nan_as_zero in (False, True):
        got = torch.ops.salun_ext.key_histogram([t], 19, 12, [0], nan_as_zero)
        assert torch.equal(got, _reference.key_histogram([t], 19, 12, [0], nan_as_zero))
        for key in (0, 0x3F800000, 0x7F800000, 0x7FFFFFFF):
            got = torch.ops.salun_ext.mask_words([t], key, -1, nan_as_zero)
            assert torch.equal(got, _reference.mask_words([t], key, -1, nan_as_zero))


@NATIVE
@pytest.mark.parametrize("device", DEVICES)
def test_thousands_of_tiny_tensors(device):
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(int(n), generator=gen).to(device) for n in torch.randint(1, 40, (3000,), generator=gen)]
    got = torch.ops.salun_ext.key_histogram(tensors, 19, 12, [0], False)
    assert torch.equal(got, _reference.key_histogram(tensors, 19, 12, [0], False))
    th = find_thresholds(tensors, [sum(t.numel() for t in tensors) // 2])[0]
    got = torch.ops.salun_ext.mask_words(tensors, th.key, 1, False)
    assert torch.equal(got, _reference.mask_words(tensors, th.key, 1, False))


@NATIVE
@pytest.mark.parametrize("device", DEVICES)
def test_partial_ties_across_chunk_and_tensor_boundaries(device):
    # all-equal values spread over tensors larger than a kernel chunk: the tie quota ends mid-chunk, at a chunk
    # boundary, and mid-tensor; ranks must follow global index order
    tensors = [torch.ones(70_000, device=device), torch.ones(5, device=device), torch.ones(131_072, device=device)]
    total = sum(t.numel() for t in tensors)
    for limit in (1, 31, 32, 65_536, 65_537, 70_000, 70_003, 70_005, 131_072, total - 1):
        got = torch.ops.salun_ext.mask_words(tensors, 0x3F800000, limit, False)
        want = _reference.mask_words(tensors, 0x3F800000, limit, False)
        assert torch.equal(got, want), limit


@NATIVE
@pytest.mark.parametrize("device", DEVICES)
def test_misaligned_views_use_scalar_path(device):
    # a contiguous view starting at an odd element offset is not 16-byte aligned
    base = torch.randn(10_001, device=device)
    view = base[1:]
    assert view.is_contiguous()
    got = torch.ops.salun_ext.key_histogram([view], 19, 12, [0], False)
    assert torch.equal(got, _reference.key_histogram([view], 19, 12, [0], False))
    got = torch.ops.salun_ext.mask_words([view], 0x3F000000, -1, False)
    assert torch.equal(got, _reference.mask_words([view], 0x3F000000, -1, False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda d: torch.ops.salun_ext.key_histogram([], 19, 12, [0], False), "empty list"),
        (
            lambda d: torch.ops.salun_ext.key_histogram(
                [torch.ones(3, dtype=torch.float64, device=d)], 19, 12, [0], False
            ),
            "dtype",
        ),
        (
            lambda d: torch.ops.salun_ext.key_histogram([torch.ones(3, 4, device=d).t()], 19, 12, [0], False),
            "contiguous",
        ),
        (lambda d: torch.ops.salun_ext.key_histogram([torch.ones(3, device=d)], 19, 13, [0], False), "low_bit"),
        (
            lambda d: torch.ops.salun_ext.key_histogram([torch.ones(3, device=d)], 9, 10, [5, 5], False),
            "strictly increasing",
        ),
        (
            lambda d: torch.ops.salun_ext.key_histogram([torch.ones(3, device=d)], 9, 10, [], False),
            "at least one prefix",
        ),
        (lambda d: torch.ops.salun_ext.mask_words([torch.ones(3, device=d)], -1, -1, False), "threshold_key"),
    ],
    ids=["empty", "fp64", "noncontiguous", "digit", "prefix_order", "no_prefix", "threshold"],
)
def test_bad_arguments_raise_the_same_error_as_reference(device, call, message):
    with pytest.raises(RuntimeError, match=message):
        call(device)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    tensors = [torch.randn(100, device=device), torch.randn(7, 3, device=device).to(torch.bfloat16)]
    torch.library.opcheck(torch.ops.salun_ext.key_histogram.default, (tensors, 19, 12, [0], False))
    torch.library.opcheck(torch.ops.salun_ext.key_histogram.default, (tensors, 9, 10, [0, 1000], True))
    torch.library.opcheck(torch.ops.salun_ext.mask_words.default, (tensors, 0x3F000000, -1, False))
    torch.library.opcheck(torch.ops.salun_ext.mask_words.default, (tensors, 0x3F000000, 3, False))
    torch.library.opcheck(torch.ops.salun_ext.sample_keys.default, (tensors, 50, False))
    if device == "cpu":  # the CUDA kernel appends candidates in a nondeterministic order
        torch.library.opcheck(torch.ops.salun_ext.window_select.default, (tensors, 0x3E000000, 0x3F800000, 64, False))


@NATIVE
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", VALUE_KINDS)
@pytest.mark.parametrize("dtypes", ["fp32", "mixed"], ids=id_formatter("dtypes"))
def test_sample_keys_matches_reference(device, kind, dtypes):
    tensors = nasty_list(SIZE_SETS["odd"], kind, DTYPE_SETS[dtypes], seed=5, device=device)
    total = sum(t.numel() for t in tensors)
    for samples in (1, 7, 1000, total, total + 5):
        for nan_as_zero in (False, True):
            got = torch.ops.salun_ext.sample_keys(tensors, samples, nan_as_zero)
            assert torch.equal(got, _reference.sample_keys(tensors, samples, nan_as_zero))


def _sorted_candidates(keys, pos, count):
    order = torch.argsort(pos[:count])
    return keys[:count][order], pos[:count][order]


@NATIVE
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", VALUE_KINDS)
@pytest.mark.parametrize("dtypes", list(DTYPE_SETS), ids=id_formatter("dtypes"))
def test_window_select_matches_reference(device, kind, dtypes):
    tensors = nasty_list(SIZE_SETS["odd"], kind, DTYPE_SETS[dtypes], seed=6, device=device)
    keys = torch.cat([_reference.keys(t.cpu(), False) for t in tensors])
    qs = torch.quantile(keys.double(), torch.tensor([0.0, 0.3, 0.5, 0.51, 0.9, 1.0], dtype=torch.double))
    windows = [
        (int(qs[1]), int(qs[2])),
        (int(qs[2]), int(qs[3])),
        (int(qs[0]), int(qs[5])),
        (0, 0),
        (int(qs[4]), _reference.NAN_KEY),
        (int(qs[3]), int(qs[3])),
    ]
    for lo, hi in windows:
        for nan_as_zero in (False, True):
            got = torch.ops.salun_ext.window_select(tensors, lo, hi, 200_000, nan_as_zero)
            want = _reference.window_select(tensors, lo, hi, 200_000, nan_as_zero)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (lo, hi)
            count = int(want[1][1])
            gk, gp = _sorted_candidates(got[2], got[3], count)
            wk, wp = _sorted_candidates(want[2], want[3], count)
            assert torch.equal(gk, wk) and torch.equal(gp, wp), (lo, hi)


@pytest.mark.parametrize("device", DEVICES)
def test_window_select_overflow_still_counts_everything(device):
    tensors = [torch.zeros(100_000, device=device), torch.ones(5, device=device)]
    words, counts, keys, pos = torch.ops.salun_ext.window_select(tensors, 0, 0, 1000, False)
    assert counts.tolist() == [5, 100_000, 0]
    assert keys.numel() == 1000 and bool((keys == 0).all())
    assert bool((pos < 100_000).all()), "only in-window (zero) elements are stored"
    assert salun_ext.ops._mask_layout.popcount(words) == 5


@pytest.mark.parametrize(
    "total, count, block",
    [(10_007, 1000, None), (2**62 + 12_345, 7, None), (2**63 - 25, 2_000, None), (2**62 + 12_345, 7, 3)],
)
def test_sample_indices_are_exact_when_i_times_total_overflows_int64(total, count, block):
    # sample positions floor(i * N / S) of a 6.7e9-element list with >= 1.4e9 samples overflow an int64 product;
    # the reference splits the product (the kernels take it in 128 bits). Block 3 covers the multi-block path.
    got = _reference.sample_indices(total, count, "cpu", block=block).tolist()
    assert got == [i * total // count for i in range(count)]
    if total > 2**62:
        assert (count - 1) * total >= 2**63  # the int64 product i * total really overflows here


@NATIVE
@pytest.mark.cuda
def test_cuda_kernels_on_empty_tensors_match_reference():
    # lists holding empty CUDA tensors (an all-empty one too) reach the CUDA kernels, which skip the empty tensors
    # (an empty list has no device and dispatches to the reference)
    for sizes in ([0], [0, 0, 3], [5, 0, 40, 0]):
        tensors = [torch.randn(n, device="cuda") for n in sizes]
        for got, want in (
            (
                torch.ops.salun_ext.key_histogram(tensors, 19, 12, [0], False),
                _reference.key_histogram(tensors, 19, 12, [0], False),
            ),
            (
                torch.ops.salun_ext.mask_words(tensors, 0x3F000000, 2, False),
                _reference.mask_words(tensors, 0x3F000000, 2, False),
            ),
            (torch.ops.salun_ext.sample_keys(tensors, 9, False), _reference.sample_keys(tensors, 9, False)),
        ):
            assert got.device.type == "cuda" and torch.equal(got, want), sizes
        got = torch.ops.salun_ext.window_select(tensors, 0, 0x3F800000, 64, False)
        want = _reference.window_select(tensors, 0, 0x3F800000, 64, False)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), sizes
        count = int(want[1][1])
        assert torch.equal(_sorted_candidates(got[2], got[3], count)[1], _sorted_candidates(want[2], want[3], count)[1])


@pytest.mark.cuda
def test_cuda_histogram_refuses_more_prefixes_than_its_rows():
    # the op's limit (shared-memory rows); find_thresholds splits larger prefix lists (tests/saliency/test_threshold)
    tensors = [torch.randn(100, device="cuda")]
    rows = list(range(salun_ext.ops.MAX_HISTOGRAM_PREFIXES))
    assert torch.ops.salun_ext.key_histogram(tensors, 9, 10, rows, False).shape == (len(rows), 1024)
    with pytest.raises(RuntimeError, match="prefixes per pass"):
        torch.ops.salun_ext.key_histogram(tensors, 9, 10, [*rows, len(rows)], False)


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["key_histogram", "mask_words", "sample_keys", "window_select"])
def test_cuda_saliency_ops_refuse_a_graph_capture(op):
    # each uploads a table of tensor pointers from a temporary host buffer: a graph would replay that copy
    tensors = [torch.randn(1000, device="cuda")]
    call = {
        "key_histogram": lambda: torch.ops.salun_ext.key_histogram(tensors, 19, 12, [0], False),
        "mask_words": lambda: torch.ops.salun_ext.mask_words(tensors, 0x3F000000, -1, False),
        "sample_keys": lambda: torch.ops.salun_ext.sample_keys(tensors, 10, False),
        "window_select": lambda: torch.ops.salun_ext.window_select(tensors, 0, 0x3F800000, 64, False),
    }[op]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=f"{op} cannot run inside a CUDA graph capture"), torch.cuda.graph(graph):
        call()
    assert call() is not None  # outside a capture it runs


@pytest.mark.slow
@pytest.mark.cuda
def test_cuda_sample_positions_exact_when_i_times_total_overflows_int64():
    # 2.4e9 samples of a 4e9-element bf16 list (8 GB + 9.6 GB of samples): i * total reaches 9.6e18 > 2^63
    total, count = 4_000_000_000, 2_400_000_000
    assert (count - 1) * total >= 2**63
    pattern = torch.arange(251, device="cuda").to(torch.bfloat16)  # 0..250 are exact in bf16
    grads = pattern.repeat(total // 251 + 1)[:total]  # element j is j % 251
    sample = torch.ops.salun_ext.sample_keys([grads], count, False)
    table = _reference.keys(pattern, False)
    q, r = divmod(total, count)  # here i * r < 2^63, so floor(i * total / count) = i * q + (i * r) // count in int64
    for start in range(0, count, 2**28):
        i = torch.arange(start, min(start + 2**28, count), dtype=torch.int64, device="cuda")
        index = i * q + (i * r) // count
        assert torch.equal(sample[start : start + i.numel()].long(), table[index % 251]), start
