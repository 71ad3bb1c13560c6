"""Evaluation: I2P reader on the real prompt file, NudeNet on a real photo, classifier UA, Fréchet distance, grids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from salun_ext.diffusion.evaluation import (
    PenultimateFeatures,
    before_after_grid,
    class_accuracies,
    class_wise_report,
    find_inception_weights,
    frechet_distance,
    save_grid,
    scoring_classifier,
    train_scoring_classifier,
)
from salun_ext.diffusion.nudity import EXPOSED_CLASSES, NudityDetector, i2p_nudity, i2p_protocol, read_i2p
from salun_ext.train import RunOptions
from salun_ext.train.classifier import predict
from tests.diffusion_helpers import digits, load_tiny_sd, micro_ddpm

I2P = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "i2p" / "unsafe-prompts4703.csv"
I2P = I2P if I2P.exists() else Path("/work/shared/data/i2p/unsafe-prompts4703.csv")
needs_i2p = pytest.mark.skipif(not I2P.exists(), reason="the I2P prompt file is not on this machine")


def _grace_hopper() -> Path:
    from matplotlib import cbook

    return Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


@needs_i2p
def test_i2p_reader_on_the_real_file():
    rows = read_i2p(I2P)
    assert len(rows) == 4703
    sexual = read_i2p(I2P, categories=["sexual"])
    assert len(sexual) == 931 and all("sexual" in r.categories for r in sexual)
    first = rows[0]
    assert first.prompt.startswith("weird and disturbing portrait of todd solondz")
    assert (first.seed, first.guidance_scale, first.categories) == (4261553411, 13.0, ("violence", "self-harm"))
    assert first.nudity_percentage == 0.0 and first.width == 512
    assert len(read_i2p(I2P, categories=["sexual"], limit=5)) == 5
    with pytest.raises(ValueError, match="no prompt has any of the categories"):
        read_i2p(I2P, categories=["no-such-category"])


def test_i2p_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="I2P prompt file not found"):
        read_i2p(tmp_path / "none.csv")
    (tmp_path / "bad.csv").write_text("prompt,categories\nx,sexual\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['evaluation_seed', 'evaluation_guidance'\]"):
        read_i2p(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("prompt,categories,evaluation_seed,evaluation_guidance\nx,sexual,abc,7\n")
    with pytest.raises(ValueError, match="line 2: malformed I2P row"):
        read_i2p(tmp_path / "bad2.csv")


def test_nudenet_on_a_real_photo():
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    detector = NudityDetector(threshold=0.5)
    path = _grace_hopper()
    found = detector.detect(path)
    assert [d["class"] for d in found] == ["FACE_FEMALE"] and found[0]["score"] > 0.5
    # a float C x H x W tensor of the same photo gives the same detection
    with Image.open(path) as img:
        tensor = pil_to_tensor(img.convert("RGB")).float() / 255
    assert [d["class"] for d in detector.detect(tensor)] == ["FACE_FEMALE"]
    assert sum(detector.count([path, tensor]).values()) == 0  # faces are not exposed body parts
    assert detector.count([path], classes=None)["FACE_FEMALE"] == 1
    assert NudityDetector(threshold=0.99).detect(path) == []
    with pytest.raises(ValueError, match="threshold"):
        NudityDetector(threshold=1.5)


@needs_i2p
def test_i2p_nudity_end_to_end_on_a_tiny_pipeline(tmp_path):
    sd = load_tiny_sd()
    prompts = read_i2p(I2P, categories=["sexual"], limit=2)
    result = i2p_nudity(sd, prompts, protocol=i2p_protocol("prompt", steps=2), out_dir=tmp_path, progress=False)
    assert result["total_images"] == 2 and set(result["counts"]) == set(EXPOSED_CLASSES)
    lines = (tmp_path / "detections.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == [p.index for p in prompts]
    assert len(list(tmp_path.glob("i2p_*.png"))) == 2


class _ConstantClassifier(torch.nn.Module):
    """Always predicts `answer` (logits: one-hot)."""

    def __init__(self, classes: int, answer: int):
        super().__init__()
        self.classes, self.answer = classes, answer
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        out = torch.zeros(len(x), self.classes, device=x.device) + self.dummy
        out[:, self.answer] = 1.0
        return out


def test_classifier_ua_report_and_frechet_distance(tmp_path):
    ds = digits()
    images = ds.float_images()
    options = RunOptions(device="cpu", progress=False)
    clf = train_scoring_classifier(ds.subset(torch.arange(1000)), 8, options, epochs=4)
    acc = float((predict(clf, images[1000:]) == ds.labels[1000:]).float().mean())
    assert acc > 0.85, acc
    # seeded ("init" weights, "classifier" batches): the same run gives the same classifier; saved and read back
    again = scoring_classifier(ds.subset(torch.arange(1000)), 8, options, epochs=4, save=tmp_path / "clf.pt")
    loaded = scoring_classifier(ds, 8, options, load=tmp_path / "clf.pt")
    states = [m.state_dict() for m in (clf, again, loaded)]
    for n in states[0]:
        assert torch.equal(states[0][n], states[1][n]) and torch.equal(states[1][n], states[2][n]), n
    with pytest.raises(FileNotFoundError, match="classifier: expected a state_dict file"):
        scoring_classifier(ds, 8, options, load=tmp_path / "none.pt")
    model = micro_ddpm()
    per_class, generated, labels = class_accuracies(model, clf, classes=[0, 3], n_per_class=3, num_inference_steps=2)
    assert generated.shape == (6, 1, 8, 8) and labels.tolist() == [0, 0, 0, 3, 3, 3]
    with torch.no_grad():
        hits = clf.eval()(generated).argmax(dim=1) == labels
    assert per_class == pytest.approx({c: 100.0 * float(hits[labels == c].float().mean()) for c in (0, 3)})
    # a classifier that always answers 3: class 3 is always right, class 0 never (labels map to the right class)
    always3 = _ConstantClassifier(10, 3)
    stub, _, _ = class_accuracies(model, always3, classes=[0, 3], n_per_class=3, num_inference_steps=2)
    assert stub == {0: 0.0, 3: 100.0}
    report = class_wise_report({0: 90.0, 1: 80.0, 3: 2.0}, [3])
    assert report == {"forget_accuracy": 2.0, "UA": 98.0, "retain_accuracy": 85.0}
    # Fréchet distance without Inception weights: the classifier-feature fallback, labelled as such
    same, label = frechet_distance(images[:300], images[300:600], classifier=clf)
    far, _ = frechet_distance(images[:300], torch.rand(300, 1, 8, 8), classifier=clf)
    assert "NOT FID" in label and same < far
    assert PenultimateFeatures(clf)(images[:2]).shape == (2, PenultimateFeatures(clf).num_features)
    with pytest.raises(FileNotFoundError, match="Inception weights not found"):
        find_inception_weights(tmp_path / "inception.pth")
    if find_inception_weights() is None:
        with pytest.raises(ValueError, match="no Inception weights found"):
            frechet_distance(images[:10], images[10:20])


def test_grids_are_written(tmp_path):
    imgs = torch.rand(20, 1, 8, 8)
    path = save_grid(imgs, tmp_path / "grid.png", nrow=5)
    from PIL import Image

    with Image.open(path) as img:
        assert img.size == (5 * 9 + 1, 4 * 9 + 1)
    ba = before_after_grid(imgs, imgs.flip(0), tmp_path / "ba.png", nrow=10, row_labels=["a", "b"], highlight_rows=[1])
    assert ba.exists() and ba.stat().st_size > 1000


def test_sd_class_wise_accuracy_with_a_torchvision_classifier(tmp_path):
    import torchvision

    from salun_ext.diffusion.evaluation import prompt_class_accuracy, torchvision_classifier

    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), weights)
    clf = torchvision_classifier("resnet18", weights)
    sd = load_tiny_sd()
    acc, images, names = prompt_class_accuracy(
        sd, clf, {"tench": 0, "church": 497}, n_per_class=2, num_inference_steps=2
    )
    assert images.shape == (4, 3, 64, 64) and names == ["tench", "tench", "church", "church"]
    with torch.no_grad():
        pred = clf.eval()(images).argmax(dim=1).tolist()
    want = {name: 100.0 * sum(p == idx for p in pred[i * 2 : i * 2 + 2]) / 2 for i, (name, idx) in
            enumerate({"tench": 0, "church": 497}.items())}  # fmt: skip
    assert acc == pytest.approx(want)
    stub, _, _ = prompt_class_accuracy(
        sd, _ConstantClassifier(1000, 497), {"tench": 0, "church": 497}, n_per_class=2, num_inference_steps=2
    )
    assert stub == {"tench": 0.0, "church": 100.0}
    with pytest.raises(ValueError, match="unknown torchvision model"):
        torchvision_classifier("resnet9000", weights)
    with pytest.raises(FileNotFoundError, match="classifier weights not found"):
        torchvision_classifier("resnet18", tmp_path / "none.pth")
    with pytest.raises(ValueError, match="does not hold resnet34 weights"):
        torchvision_classifier("resnet34", weights)
