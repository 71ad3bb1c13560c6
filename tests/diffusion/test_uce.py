"""UCE: the closed form against an independent least-squares solve, the published inputs, the edit, the CLI."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
import torch.nn.functional as F

from salun_ext.cli import main
from salun_ext.diffusion.data import ForgetData
from salun_ext.diffusion.methods import METHODS, unlearn
from salun_ext.diffusion.sd import StableDiffusion
from salun_ext.diffusion.uce import UCEConfig, cross_attention_projections, erase_pairs, uce_edit, uce_solve
from salun_ext.diffusion.workflows import UnlearnSpec, uce_config
from salun_ext.utils.errors import UsageError
from tests.diffusion_helpers import load_tiny_sd, micro_ddpm, tiny_pipeline_folder


def lstsq_edit(w_old, c_e, g_e, c_p, s_e, s_p, lamb):
    """The UCE objective solved as one stacked least-squares problem in W^T (no normal equations, no inverse):
    rows sqrt(s_e) c_e -> sqrt(s_e) W_old g_e, sqrt(s_p) c_p -> sqrt(s_p) W_old c_p, sqrt(lam) I -> sqrt(lam) W_old^T.
    """
    a = torch.cat([s_e**0.5 * c_e, s_p**0.5 * c_p, lamb**0.5 * torch.eye(w_old.shape[1], dtype=w_old.dtype)])
    b = torch.cat([s_e**0.5 * g_e @ w_old.T, s_p**0.5 * c_p @ w_old.T, lamb**0.5 * w_old.T])
    return torch.linalg.lstsq(a, b).solution.T


@pytest.mark.parametrize("s_e, s_p, lamb", [(1.0, 0.5, 0.5), (3.0, 0.1, 0.01), (0.2, 2.0, 5.0)])
def test_closed_form_is_the_least_squares_minimiser(s_e, s_p, lamb):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 5, generator=g, dtype=torch.float64)
    c_e, g_e, c_p = (torch.randn(n, 5, generator=g, dtype=torch.float64) for n in (4, 4, 9))
    got = uce_solve(w, c_e, g_e, c_p, erase_scale=s_e, preserve_scale=s_p, lamb=lamb)
    expected = lstsq_edit(w, c_e, g_e, c_p, s_e, s_p, lamb)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert got.dtype == w.dtype and not torch.allclose(got, w)


def test_closed_form_keeps_the_weight_dtype_and_maps_the_concept_to_its_guide():
    """With a tiny ridge and no preserved text, an erased input's output becomes its guide's original output."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 8, generator=g)
    c_e, g_e = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    got = uce_solve(w, c_e, g_e, torch.zeros(0, 8), erase_scale=1.0, preserve_scale=1.0, lamb=1e-8)
    assert got.dtype == torch.float32
    torch.testing.assert_close(c_e @ got.T, g_e @ w.T, rtol=1e-4, atol=1e-4)


def test_config_defaults_and_refusals():
    config = UCEConfig(erase=["nudity", "gore"], preserve=["a", "b"])
    assert config.guide == ["", ""] and config.lamb == 0.5 and config.erase_scale == 1.0
    assert config.preserve_texts == ["", "a", "b"] and config.effective_preserve_scale == pytest.approx(1 / 3)
    assert UCEConfig(erase=["x"], preserve=[str(i) for i in range(20)]).effective_preserve_scale == 0.1
    with pytest.raises(UsageError, match=r"erase .*at least one non-empty concept"):
        UCEConfig(erase=[])
    with pytest.raises(UsageError, match=r"guide .*one guide concept or one per erased concept"):
        UCEConfig(erase=["a", "b", "c"], guide=["x", "y"])
    with pytest.raises(UsageError, match="lamb: expected a number > 0, got 0"):
        UCEConfig(erase=["a"], lamb=0)


def test_erase_pairs_start_at_the_last_word_token():
    """ "a cat" is [start, a, cat, end, pad...]: its rows start at position 2; "" (the guide) at 0, so the pairs
    are 77 - 2 positions long: erased positions 2..76 against the guide's 0..74."""
    sd = load_tiny_sd()
    erased, guide = erase_pairs(sd, ["a cat"], [""])
    states = sd.encode_prompts(["a cat", ""])
    assert erased.shape == guide.shape == (75, states.shape[-1])
    torch.testing.assert_close(erased, states[0, 2:77])
    torch.testing.assert_close(guide, states[1, 0:75])


def test_edit_changes_only_cross_attention_keys_and_values_and_erases():
    sd = load_tiny_sd()
    before = {n: t.clone() for n, t in sd.unet.state_dict().items()}
    text_before = {n: t.clone() for n, t in sd.pipe.text_encoder.state_dict().items()}
    erased, guide = erase_pairs(sd, ["a photo of a cat"], [""])
    kept = sd.encode_prompts(["a photo of a dog"])[0]
    result = uce_edit(sd, UCEConfig(erase=["a photo of a cat"], preserve=["a photo of a dog"]))
    after = sd.unet.state_dict()
    edited = {n for n in after if n.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))}
    assert set(result.edited) == {n.removesuffix(".weight") for n in edited} and len(edited) >= 2
    for name, tensor in after.items():
        assert torch.equal(tensor, before[name]) == (name not in edited), name
    assert all(torch.equal(t, text_before[n]) for n, t in sd.pipe.text_encoder.state_dict().items())
    for name in edited:  # the erased concept moved towards its guide; the preserved one barely moved
        w_old, w_new = before[name], after[name]
        gap_before = (F.linear(erased, w_old) - F.linear(guide, w_old)).norm()
        gap_after = (F.linear(erased, w_new) - F.linear(guide, w_old)).norm()
        kept_shift = (F.linear(kept, w_new) - F.linear(kept, w_old)).norm() / F.linear(kept, w_old).norm()
        assert gap_after < 0.5 * gap_before, name
        assert kept_shift < 0.25, name


def test_uce_refuses_a_unet_without_cross_attention_and_the_training_entry_point():
    ddpm = micro_ddpm()
    with pytest.raises(UsageError, match="no cross-attention projections"):
        cross_attention_projections(ddpm.unet)
    assert METHODS.get_class("uce").closed_form and not METHODS.get_class("uce").takes_mask
    with pytest.raises(UsageError, match="closed-form edit with no training Task"):
        unlearn("uce", "sd", ddpm.unet, ddpm.spec, None, None)


def test_config_from_the_forget_data(tmp_path):
    for c in ("church", "tench", "parachute"):
        (tmp_path / c).mkdir()
    classes = uce_config(UnlearnSpec("uce"), ForgetData(class_root=str(tmp_path), forget_class=["tench"]))
    assert classes.erase == ["tench"] and classes.preserve == ["church", "parachute"]
    concept = uce_config(UnlearnSpec("uce", uce_lambda=0.1), ForgetData(concept="nudity"))
    assert concept.erase == ["nudity"] and concept.preserve == [] and concept.lamb == 0.1
    given = uce_config(UnlearnSpec("uce", uce_erase=["x"], uce_guide=["y"], uce_preserve=[]),
                       ForgetData(class_root=str(tmp_path), forget_class=["tench"]))  # fmt: skip
    assert (given.erase, given.guide, given.preserve) == (["x"], ["y"], [])
    with pytest.raises(UsageError, match="uce_erase"):
        uce_config(UnlearnSpec("uce"), ForgetData())


def run(command: str) -> int:
    return main(["diffusion", *shlex.split(command), "--no-progress", "--device", "cpu"])


def test_cli_edits_a_pipeline_and_logs_it(tmp_path, capsys):
    pipe, out = tiny_pipeline_folder(), tmp_path / "uce"
    assert run(f"unlearn --method uce --pipeline {pipe} --concept nudity --uce-preserve 'a photo of a person' "
               f"--out {out}") == 0  # fmt: skip
    assert "uce: closed-form edit in" in capsys.readouterr().out
    log = json.loads((out / "unlearn_log.json").read_text())
    assert log["closed_form"] and log["config"]["erase"] == ["nudity"] and log["config"]["lamb"] == 0.5
    # CLIP's BPE splits "nudity" into "nu" + "dity": its rows run from position 2 to 76; "" and the preserved
    # prompt give 77 rows each, and the published preserve scale is max(0.1, 1 / 2)
    assert log["config"]["preserve_scale"] == 0.5 and log["erase_rows"] == 75 and log["preserve_rows"] == 2 * 77
    original, edited = (StableDiffusion.from_pretrained(p, device="cpu").unet.state_dict() for p in (pipe, out))
    changed = {n for n in original if not torch.equal(original[n], edited[n])}
    assert changed == {f"{n}.weight" for n in log["edited"]}


def test_cli_refuses_a_mask_and_a_ddpm(tmp_path, capsys):
    pipe = tiny_pipeline_folder()
    assert run(f"unlearn --method uce --pipeline {pipe} --concept nudity --mask m.safetensors --out {tmp_path}/a") == 2
    assert "--mask: expected none (uce is a closed-form edit" in capsys.readouterr().err
    ddpm = tmp_path / "ddpm"
    micro_ddpm().save_pretrained(ddpm)
    assert run(f"unlearn --method uce --model {ddpm} --forget-class 3 --out {tmp_path}/b") == 2
    assert "--pipeline: expected a Stable Diffusion pipeline" in capsys.readouterr().err
