"""The typed wrappers of salun_ext.ops: keyword-only after the tensor lists, and the same results as the raw ops."""

from __future__ import annotations

import inspect

import pytest
import torch

import salun_ext
from salun_ext import ops
from tests.helpers import nasty_list

# each wrapper -> the number of leading tensor lists (the only positional parameters)
WRAPPERS = {
    "key_histogram": 1,
    "mask_words": 1,
    "sample_keys": 1,
    "window_select": 1,
    "masked_sgd_": 4,
    "masked_adam_": 7,
    "masked_sgd_compact_": 4,
    "masked_adam_compact_": 7,
}


def test_every_op_has_a_wrapper():
    assert sorted(WRAPPERS) == sorted(name.split("::")[1] for name in ops.op_names())


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_wrapper_is_keyword_only_after_its_tensor_lists(name):
    params = list(inspect.signature(getattr(ops, name)).parameters.values())
    lists = WRAPPERS[name]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params[:lists]), params[:lists]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[lists:]), params[lists:]
    schema = ops._schemas.SCHEMAS[name]
    # the wrapper names every argument of the schema, in the schema's order
    schema_args = [a.strip().split(" ")[-1] for a in schema.split("(", 1)[1].rsplit(") ->", 1)[0].split(",")]
    assert [p.name for p in params] == schema_args


def _grads():
    return nasty_list([300, 1, 0, 77, 4097], "ties", [torch.float32, torch.bfloat16, torch.float16], seed=3)


def test_positional_scalars_are_a_type_error():
    g = _grads()
    calls = {
        "key_histogram": lambda: ops.key_histogram(g, 19, 12, [0]),
        "mask_words": lambda: ops.mask_words(g, 0, -1),
        "sample_keys": lambda: ops.sample_keys(g, 16),
        "window_select": lambda: ops.window_select(g, 0, 1, 8),
        "masked_sgd_": lambda: ops.masked_sgd_([], [], [], [], 0.1),
        "masked_adam_": lambda: ops.masked_adam_([], [], [], [], [], [], [], 0.1),
        "masked_sgd_compact_": lambda: ops.masked_sgd_compact_([], [], [], [], 0.1),
        "masked_adam_compact_": lambda: ops.masked_adam_compact_([], [], [], [], [], [], [], 0.1),
    }
    assert sorted(calls) == sorted(WRAPPERS)
    for call in calls.values():
        with pytest.raises(TypeError, match="positional argument"):
            call()


@pytest.mark.parametrize("nan_as_zero", [False, True])
def test_saliency_wrappers_equal_the_raw_ops(nan_as_zero):
    g = _grads()
    g[0][5] = float("nan")
    raw = torch.ops.salun_ext
    for low_bit, num_bits, prefixes in [(19, 12, [0]), (9, 10, [0, 3, 1000]), (0, 9, [5])]:
        got = ops.key_histogram(g, low_bit=low_bit, num_bits=num_bits, prefixes=prefixes, nan_as_zero=nan_as_zero)
        assert torch.equal(got, raw.key_histogram(g, low_bit, num_bits, prefixes, nan_as_zero))
    keys = torch.cat([ops.keys(t, nan_as_zero) for t in g])
    threshold = int(keys.sort().values[keys.numel() // 2])
    for tie_limit in (-1, 0, 3):
        got = ops.mask_words(g, threshold_key=threshold, tie_limit=tie_limit, nan_as_zero=nan_as_zero)
        assert torch.equal(got, raw.mask_words(g, threshold, tie_limit, nan_as_zero))
    for num_samples in (1, 100, 10_000):
        got = ops.sample_keys(g, num_samples=num_samples, nan_as_zero=nan_as_zero)
        assert torch.equal(got, raw.sample_keys(g, num_samples, nan_as_zero))
    got = ops.window_select(g, lo_key=threshold // 2, hi_key=threshold, capacity=6000, nan_as_zero=nan_as_zero)
    expected = raw.window_select(g, threshold // 2, threshold, 6000, nan_as_zero)
    words, counts, inside = got[0], got[1], int(got[1][1])
    assert torch.equal(words, expected[0]) and torch.equal(counts, expected[1])
    # candidates come in unspecified order: compare them as (position, key) sets
    assert torch.equal(got[3][:inside].sort().values, expected[3][:inside].sort().values)
    assert torch.equal(got[2][:inside].sort().values, expected[2][:inside].sort().values)


def _step_lists(n_state: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sizes = [1, 33, 300]
    params = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    states = [[torch.randn(n, generator=gen).abs() for n in sizes] for _ in range(n_state)]
    words = [ops.pack_bits(torch.rand(n, generator=gen) < 0.5) for n in sizes]
    return params, grads, states, words


def _clone(lists):
    return [[t.clone() for t in ts] for ts in lists]


def test_masked_sgd_wrapper_equals_the_raw_op():
    params, grads, (bufs,), words = _step_lists(1)
    a_params, a_bufs = _clone([params, bufs])
    ops.masked_sgd_(
        a_params, grads, a_bufs, words, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=True
    )
    b_params, b_bufs = _clone([params, bufs])
    torch.ops.salun_ext.masked_sgd_(
        b_params, grads, b_bufs, words, 0.1, None, 0.9, 0.1, 0.01, True, False, False, None, None
    )
    for a, b in zip(a_params + a_bufs, b_params + b_bufs):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, p) for a, p in zip(a_params, params)), "the step changed nothing"


def test_masked_adam_wrapper_equals_the_raw_op():
    params, grads, (m, v, vmax), words = _step_lists(3, seed=1)
    steps = [torch.tensor(3.0) for _ in params]
    a = _clone([params, m, v, vmax])
    ops.masked_adam_(
        a[0], grads, a[1], a[2], a[3], steps, words,
        lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True,
    )  # fmt: skip
    b = _clone([params, m, v, vmax])
    torch.ops.salun_ext.masked_adam_(
        b[0], grads, b[1], b[2], b[3], steps, words, 0.01, None, 0.8, 0.99, 1e-6, 0.1, True, True, False, None, None
    )
    for xs, ys in zip(a, b):
        for x, y in zip(xs, ys):
            assert torch.equal(x, y)


def test_env_command_reports_kernels(capsys):
    from salun_ext.cli import main

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "salun_ext::key_histogram" in out and "salun_ext::mask_words" in out
    assert ("compiled: CPU" in out) == salun_ext.native.loaded
