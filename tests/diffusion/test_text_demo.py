"""The digits text-to-image unlearning table (text_demo): the judge from the scoring classifier's state_dict, the
hyperparameter rule, the attacked prompts, the summary's statistics, and the whole table end to end on an untrained
tiny digits pipeline (files written; a rerun skips finished work; a removed row is redone without unlearning again)."""

from __future__ import annotations

import json

import pytest
import torch

from salun_ext.diffusion import text_demo
from salun_ext.diffusion.evaluation import GreyscaleInput
from salun_ext.diffusion.judges import ClassifierJudge
from salun_ext.diffusion.text_demo import TableConfig, attack_rows, hyperparameters, table_summary, unlearn_spec
from salun_ext.models import build_model
from salun_ext.utils.errors import MissingFileError, UsageError
from tests.diffusion_helpers import digits


def _scorer(path, seed: int = 0) -> torch.nn.Module:
    """A random digits scoring classifier (small_cnn, 1 channel, 10 classes, 16 px) saved as a plain state_dict,
    as `evaluation.scoring_classifier` writes classifier.pt."""
    torch.manual_seed(seed)
    net = build_model("small_cnn", 1, 10, 16).eval()
    torch.save(net.state_dict(), path)
    return net


def test_the_scoring_classifiers_state_dict_is_a_judge(tmp_path):
    net = _scorer(tmp_path / "classifier.pt")
    images = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = GreyscaleInput(net)(images).argmax(1)  # how evaluate-text-digits scores the same images
    for target in (int(want[0]), (int(want[0]) + 1) % 10):
        judge = ClassifierJudge.from_state_dict(tmp_path / "classifier.pt", target, image_size=16)
        verdicts = judge(images)
        assert [v.details["predicted"] for v in verdicts] == want.tolist()
        assert [v.success for v in verdicts] == (want == target).tolist()
    # images at another resolution are resized to the classifier's
    assert len(judge(torch.rand(2, 3, 32, 32))) == 2
    with pytest.raises(UsageError, match=r"classifier: expected .* weights for 1 channel"):
        ClassifierJudge.from_state_dict(tmp_path / "classifier.pt", 3, image_size=16, num_classes=5)
    with pytest.raises(MissingFileError, match="not found"):
        ClassifierJudge.from_state_dict(tmp_path / "none.pt", 3, image_size=16)


def _config(tmp_path, **kw) -> TableConfig:
    return TableConfig(pipeline=str(tmp_path / "pipe"), forget_images=str(tmp_path / "three"),
                       retain_images=str(tmp_path / "four"), **kw)  # fmt: skip


def test_one_hyperparameter_rule_for_every_method(tmp_path):
    cfg = _config(tmp_path, lr_scale=3.0, max_steps=200)
    salun, esd, fmn, ga = (hyperparameters(m, cfg) for m in ("salun", "esd-x", "fmn", "ga"))
    assert salun["lr"] == pytest.approx(3e-5) and salun["steps"] is None and salun["recipe_epochs"] == 5
    assert ga["lr"] == pytest.approx(3e-5) and ga["steps"] is None
    # ESD's 1000 iterations are cut to 200 with 5 x the lr: lr x steps is the recipe's x 3
    assert esd["steps"] == 200 and esd["lr"] == pytest.approx(1e-5 * 3 * 1000 / 200)
    assert fmn["steps"] is None and fmn["lr"] == pytest.approx(2e-6 * 3)  # 35 steps fit
    assert hyperparameters("uce", cfg) == {}
    cells = [text_demo.hyperparameter_cell(hp) for hp in (salun, esd, fmn, {}, None)]
    assert cells == ["lr 3e-05, 5 epochs", "lr 0.00015, 200 steps", "lr 6e-06, 35 steps", "closed form", "-"]
    uce = unlearn_spec("uce", cfg, None)
    assert uce.uce_erase == ["a handwritten digit three"] and len(uce.uce_preserve) == 9
    assert "a handwritten digit three" not in uce.uce_preserve and "a handwritten digit four" in uce.uce_preserve
    assert unlearn_spec("fmn", cfg, None).fmn_concept == "three"
    assert unlearn_spec("salun", cfg, tmp_path / "m.safetensors").mask == str(tmp_path / "m.safetensors")


def test_attacked_prompts_are_every_phrasing_times_each_seed(tmp_path):
    rows = attack_rows(_config(tmp_path, attack_seeds=[0, 1]))
    assert [r.index for r in rows] == list(range(6))
    three = "a handwritten digit three"
    assert [(r.prompt, r.seed) for r in rows[:2]] == [(three, 0), (three, 1)]
    assert rows[4].prompt == "the digit 3 written by hand" and all(r.guidance_scale == 3.0 for r in rows)


@pytest.mark.parametrize("bad, message", [({"seeds": [1, 1]}, "distinct seeds"), ({"seeds": []}, "at least one"),
                                          ({"retain_class": 3}, "other than the forgotten"),
                                          ({"methods": ["retrain"]}, "methods"), ({"lr_scale": 0}, "lr_scale"),
                                          ({"attack_timesteps": 0}, "attack_timesteps")])  # fmt: skip
def test_bad_configurations_name_the_argument(tmp_path, bad, message):
    with pytest.raises(UsageError, match=message):
        _config(tmp_path, **bad)


def _row(method, seed, ua, kept, fd, pre, asr):
    return {"row": f"seed{seed}/{method}", "method": method, "seed": seed,
            "evaluation": {"UA": ua, "retain_accuracy": kept, "frechet": fd, "frechet_label": "proxy"},
            "attack": {"pre_asr": pre, "asr": asr}, "seconds": {"unlearn": 1.0, "evaluate": 2.0, "attack": 3.0,
                                                                "total": 6.0}}  # fmt: skip


def test_summary_is_the_mean_and_sample_std_over_seeds(tmp_path):
    cfg = _config(tmp_path, seeds=[1, 2], methods=["salun", "uce"])
    rows = [
        _row("original", None, 0, 100, 50, 100, 100),
        _row("salun", 1, 100, 90, 60, 0, 50),
        _row("salun", 2, 80, 100, 80, 0, 0),
        _row("uce", 1, 100, 100, 55, 0, 100),
        _row("uce", 2, 100, 100, 55, 0, 100),
    ]
    s = table_summary(cfg, rows, 10.0)
    salun = s["methods"]["salun"]
    assert salun["UA"] == {"mean": 90.0, "std": pytest.approx(14.1421356), "n": 2}
    assert salun["asr"]["mean"] == 25.0 and salun["asr"]["std"] == pytest.approx(35.3553391)
    assert s["methods"]["uce"]["frechet"]["std"] == 0.0 and s["methods"]["original"]["UA"]["std"] is None
    assert s["compute_seconds"] == {"unlearn": 5.0, "evaluate": 10.0, "attack": 15.0, "total": 30.0}
    page = text_demo.render_table(s, "## Why\nbecause")
    assert "| SalUn | lr 3e-05, 5 epochs | 90.0 ± 14.1 | 95.0 ± 7.1 | 70.0 ± 14.1 | 0.0 ± 0.0 | 25.0 ± 35.4 |" in page
    assert page.rstrip().endswith("because") and "grids/uce.png" in page


@pytest.fixture(scope="module")
def tiny_table_inputs(tmp_path_factory):
    """An untrained digits pipeline (the real architecture and tokenizer), a random scoring classifier, 4 real
    threes and 4 real fours."""
    from salun_ext.diffusion.sd import StableDiffusion, save_images
    from salun_ext.diffusion.text_digits import build_text_digits_pipeline, digit_images

    root = tmp_path_factory.mktemp("table")
    StableDiffusion(build_text_digits_pipeline(seed=0)).save_pretrained(root / "pipe")
    _scorer(root / "pipe" / "classifier.pt")
    ds = digits()
    for c, word in ((3, "three"), (4, "four")):
        save_images(digit_images(ds.subset(torch.nonzero(ds.labels == c).flatten()[:4]), 16), root / word)
    return root


TINY = "--seeds 1 --n-per-class 1 --eval-steps 2 --attack-seeds 0 --attack-timesteps 1 --attack-iterations 1 " \
       "--attack-sampling-steps 2 --max-steps 1"  # fmt: skip


def _check_table(out, work, methods) -> None:
    """Every expected file, and the summary equal to the rows it summarises (one seed: the rows' values)."""
    for name in ["original/result.json", "summary.json", "README.md", *[f"seed1/{m}/result.json" for m in methods],
                 *[f"grids/{m}.png" for m in methods]]:  # fmt: skip
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["original", *methods]
    for m in methods:
        row = json.loads((out / "seed1" / m / "result.json").read_text())
        assert row["attack"]["prompts"] == 3 and row["evaluation"]["images"] == 30
        assert summary["methods"][m]["UA"]["mean"] == row["evaluation"]["UA"]
        assert summary["methods"][m]["asr"]["mean"] == row["attack"]["asr"]
        assert json.loads((work / "seed1" / m / "unlearn_log.json").read_text())["method"] == m
        assert f"| {text_demo.LABELS[m]} |" in (out / "README.md").read_text()
    page = (out / "README.md").read_text()
    assert "salun-ext diffusion text-digits-table" in page and f"--work {work}" in page and "--seeds 1 " in page


@pytest.mark.slow  # ~26 s: the whole table on tiny inputs (the pieces are tested above); make test-all runs it
def test_the_table_runs_end_to_end_and_a_rerun_skips_finished_work(tiny_table_inputs, tmp_path, monkeypatch, capsys):
    from tests.cli.test_diffusion_cli import fails, run

    root, out, work = tiny_table_inputs, tmp_path / "out", tmp_path / "work"
    base = (f"--pipeline {root}/pipe --forget-images {root}/three --retain-images {root}/four --work {work} "
            f"--methods salun uce {TINY}")  # fmt: skip
    assert run(f"text-digits-table {base} --out {out}") == 0
    _check_table(out, work, ["salun", "uce"])
    assert (work / "seed1" / "mask.safetensors").is_file() and (work / "targets" / "00002.png").is_file()
    # a rerun redoes nothing finished: neither unlearning nor evaluation nor the attack runs again
    (out / "notes.md").write_text("## Reading the table\nhand-written.\n")
    calls = []
    monkeypatch.setattr(text_demo, "_evaluate", lambda *a, **k: calls.append("evaluate") or 1 / 0)
    monkeypatch.setattr("salun_ext.diffusion.workflows.unlearn_folder", lambda *a, **k: 1 / 0)
    monkeypatch.setattr("salun_ext.diffusion.attack.attack_prompt", lambda *a, **k: 1 / 0)
    assert run(f"text-digits-table {base} --out {out}") == 0
    assert calls == [] and (out / "README.md").read_text().rstrip().endswith("hand-written.")
    # a row without its result is redone from its saved model and attack folder: evaluated, not unlearned again
    (out / "seed1" / "salun" / "result.json").unlink()
    monkeypatch.undo()
    monkeypatch.setattr("salun_ext.diffusion.workflows.unlearn_folder", lambda *a, **k: 1 / 0)
    monkeypatch.setattr("salun_ext.diffusion.attack.attack_prompt", lambda *a, **k: 1 / 0)
    assert run(f"text-digits-table {base} --out {out}") == 0
    assert json.loads((out / "seed1" / "salun" / "result.json").read_text())["evaluation"]["images"] == 30
    fails(capsys, f"text-digits-table {base} --forget-images {root}/none --out {out}", "forget_images")
    fails(capsys, f"text-digits-table {base} --seeds 2 2 --out {out}", "seeds (--seeds): expected distinct seeds")


@pytest.mark.slow
def test_every_method_of_the_table_runs(tiny_table_inputs, tmp_path):
    from tests.cli.test_diffusion_cli import run

    root, out, work = tiny_table_inputs, tmp_path / "out", tmp_path / "work"
    assert run(f"text-digits-table --pipeline {root}/pipe --forget-images {root}/three --retain-images "
               f"{root}/four --work {work} {TINY} --out {out}") == 0  # fmt: skip
    _check_table(out, work, list(text_demo.TABLE_METHODS))
