"""Utility metrics of generation: the CLIP score with a local model (and its refusal without one), FID reports that
name their implementation and version, FID of two local image folders."""

from __future__ import annotations

from importlib.metadata import version

import pytest
import torch

from salun_ext.diffusion.evaluation import clip_score, fid_report, frechet_distance, image_folder_fid
from salun_ext.diffusion.sd import save_images
from salun_ext.utils.errors import UsageError
from tests.diffusion_helpers import tiny_clip_folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return tiny_clip_folder(tmp_path_factory.mktemp("clip"))


def test_clip_score_refuses_without_a_local_model(tmp_path):
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(UsageError, match=r"clip_model \(--clip-model\): expected a local CLIP model folder"):
        clip_score(images, ["a", "b"], None)
    with pytest.raises(FileNotFoundError, match="not found"):
        clip_score(images, ["a", "b"], tmp_path / "missing")
    with pytest.raises(UsageError, match=r"no config\.json in it"):
        clip_score(images, ["a", "b"], tmp_path)


def _mean_cosine(model, processor, images, prompts) -> float:
    pixels = [(img * 255).round().to(torch.uint8) for img in images]
    with torch.no_grad():
        img = model.get_image_features(**processor(images=pixels, return_tensors="pt"))
        txt = model.get_text_features(**processor(text=prompts, return_tensors="pt", padding=True))
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    return float(torch.nn.functional.cosine_similarity(img, txt, dim=-1).mean())


def test_clip_score_is_100_times_the_mean_cosine(tiny_clip, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    gen = torch.Generator().manual_seed(1)
    images = torch.rand(5, 3, 24, 24, generator=gen)
    prompts = ["a handwritten digit three", "a cat", "the digit 7 written by hand", "a dog", "a photo"]
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    cosine = _mean_cosine(model, processor, images, prompts)
    if cosine < 0:  # the score is floored at 0: flip the text projection so that the floor hides nothing
        with torch.no_grad():
            model.text_projection.weight.neg_()
        model.save_pretrained(tmp_path / "clip")
        processor.save_pretrained(tmp_path / "clip")
        tiny_clip, cosine = tmp_path / "clip", _mean_cosine(model, processor, images, prompts)
    assert cosine > 0
    result = clip_score(images, prompts, tiny_clip, batch_size=2)  # batches accumulate
    assert result["clip_score"] == pytest.approx(100.0 * cosine, rel=1e-4)
    assert result["implementation_version"] == f"torchmetrics {version('torchmetrics')}"
    assert result["num_images"] == 5 and result["model"] == str(tiny_clip)
    with pytest.raises(UsageError, match="5 prompts"):
        clip_score(images[:3], prompts, tiny_clip)


class _Features(torch.nn.Module):
    """A classifier whose penultimate features are the image's mean and spread (a known feature map)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(2, 10)

    def forward(self, x):
        return self.head(torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], dim=1))


def test_fid_report_names_the_implementation_and_matches_the_distance():
    clf = _Features()
    real, fake = torch.rand(40, 3, 8, 8), torch.rand(30, 3, 8, 8) * 0.5
    report = fid_report(real, fake, classifier=clf)
    value, label = frechet_distance(real, fake, classifier=clf)
    assert report["value"] == pytest.approx(value) and report["label"] == label and "NOT FID" in label
    assert report["implementation"] == "torchmetrics.image.fid.FrechetInceptionDistance"
    assert report["implementation_version"] == f"torchmetrics {version('torchmetrics')}"
    assert (report["num_real"], report["num_fake"]) == (40, 30)
    # the Fréchet distance of 2-d Gaussians, from its definition on the same features
    f_real = torch.stack([real.mean((1, 2, 3)), real.std((1, 2, 3))], 1).double()
    f_fake = torch.stack([fake.mean((1, 2, 3)), fake.std((1, 2, 3))], 1).double()
    c1, c2 = torch.cov(f_real.T), torch.cov(f_fake.T)
    root = torch.linalg.eigvals(c1 @ c2).sqrt().real.sum()
    want = float((f_real.mean(0) - f_fake.mean(0)).pow(2).sum() + c1.trace() + c2.trace() - 2 * root)
    assert report["value"] == pytest.approx(want, rel=1e-3, abs=1e-6)


def test_fid_of_two_image_folders(tmp_path):
    clf = _Features()
    gen = torch.Generator().manual_seed(0)
    save_images(torch.rand(20, 3, 8, 8, generator=gen), tmp_path / "real")
    save_images(torch.rand(20, 3, 8, 8, generator=gen) * 0.3, tmp_path / "dark")
    same = image_folder_fid(tmp_path / "real", tmp_path / "real", 8, classifier=clf)
    far = image_folder_fid(tmp_path / "real", tmp_path / "dark", 8, classifier=clf)
    assert same["value"] == pytest.approx(0.0, abs=1e-6) and far["value"] > 1e-3
    assert far["real"] == str(tmp_path / "real") and far["num_fake"] == 20
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        image_folder_fid(tmp_path / "none", tmp_path / "real", 8, classifier=clf)
