"""Dataset loaders on small files in the real on-disk formats, the paper's splits, on-device batches."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

from salun_ext.data import (
    Augment,
    Batches,
    ImageDataset,
    dataset_key,
    load_dataset,
    make_unlearning_split,
    select_forget,
    train_val_split,
)
from salun_ext.utils.seeding import derive_seed

# ------------------------------------------------------------------------------------------- fake files


def _cifar_pickle(path, data, labels, label_key="labels", protocol=2):
    with open(path, "wb") as f:
        pickle.dump({"batch_label": "fake", label_key: list(labels), "data": data}, f, protocol=protocol)


@pytest.fixture
def fake_cifar10(tmp_path):
    """cifar-10-batches-py with 5 train batches of 4 images and a test batch of 3."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.RandomState(0)
    batches = []
    for i in range(1, 6):
        data = rng.randint(0, 256, (4, 3072)).astype(np.uint8)
        labels = [(i + j) % 10 for j in range(4)]
        _cifar_pickle(folder / f"data_batch_{i}", data, labels)
        batches.append((data, labels))
    test = rng.randint(0, 256, (3, 3072)).astype(np.uint8)
    _cifar_pickle(folder / "test_batch", test, [7, 8, 9])
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}, f, protocol=2)
    return tmp_path, batches, test


def test_cifar10_reads_the_python_batches(fake_cifar10):
    root, batches, test = fake_cifar10
    train = load_dataset("cifar10", root)
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    # row-major 3072 = R(1024) G(1024) B(1024): channel 1, pixel (0, 5) is element 1024 + 5
    assert train.images[0, 1, 0, 5].item() == batches[0][0][0, 1024 + 5]
    assert train.images[4, 2, 31, 31].item() == batches[1][0][0, 3071]
    assert train.labels.tolist() == [label for _, labels in batches for label in labels]
    assert train.classes[3] == "c3"
    held_out = load_dataset("CIFAR-10", root, train=False)
    assert held_out.labels.tolist() == [7, 8, 9] and held_out.images[2, 0, 1, 0].item() == test[2, 32]


def test_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    for split in ("train", "test"):
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": [42, 99], "coarse_labels": [1, 2]}, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, f, protocol=2)
    ds = load_dataset("cifar100", tmp_path)
    assert ds.labels.tolist() == [42, 99] and ds.num_classes == 100 and ds.images.shape == (2, 3, 32, 32)


def test_cifar_pickle_that_runs_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": Evil(), "labels": [0]}, f)
    with pytest.raises(ValueError, match=r"refusing to load builtins\.print"):
        load_dataset("cifar10", tmp_path)


def test_missing_cifar_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "cifar-10-batches-py" in message and "cifar-10-python.tar.gz" in message


def test_svhn_reads_mat_files_and_maps_label_10_to_0(tmp_path):
    import scipy.io

    x = np.random.RandomState(1).randint(0, 256, (32, 32, 3, 5)).astype(np.uint8)
    y = np.array([[10], [1], [2], [10], [9]], dtype=np.uint8)
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": x, "y": y})
    ds = load_dataset("svhn", tmp_path)
    assert ds.images.shape == (5, 3, 32, 32)
    assert ds.labels.tolist() == [0, 1, 2, 0, 9]
    assert ds.images[3, 2, 4, 7].item() == x[4, 7, 2, 3]  # X is H x W x C x N
    with pytest.raises(FileNotFoundError, match=r"test_32x32\.mat"):
        load_dataset("svhn", tmp_path, train=False)


def _png(path, color):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), color).save(path)


def test_tinyimagenet_train_folders_and_val_annotations(tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    (base).mkdir()
    (base / "wnids.txt").write_text("n002\nn001\n")
    _png(base / "train" / "n001" / "images" / "a.png", (255, 0, 0))
    _png(base / "train" / "n002" / "images" / "b.png", (0, 255, 0))
    _png(base / "train" / "n002" / "images" / "c.png", (0, 0, 255))
    _png(base / "val" / "images" / "val_0.png", (10, 20, 30))
    (base / "val" / "val_annotations.txt").write_text("val_0.png\tn001\t0\t0\t63\t63\n")
    train = load_dataset("tinyimagenet", tmp_path)
    assert train.classes == ["n002", "n001"]  # wnids.txt order defines the labels
    assert train.labels.tolist() == [0, 0, 1]
    assert train.images.shape == (3, 3, 64, 64)
    assert train.images[2, :, 0, 0].tolist() == [255, 0, 0]
    val = load_dataset("tiny-imagenet", tmp_path, train=False)
    assert val.labels.tolist() == [1] and val.images[0, :, 5, 5].tolist() == [10, 20, 30]


def test_fashion_mnist_torchvision_raw_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(3 * 28 * 28, dtype=np.int64).astype(np.uint8)
    header = np.array([2051, 3, 28, 28], dtype=">i4").tobytes()
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + images.tobytes())
    with open(raw / "train-labels-idx1-ubyte", "wb") as f:  # un-gzipped works too
        f.write(np.array([2049, 3], dtype=">i4").tobytes() + bytes([4, 0, 9]))
    ds = load_dataset("fashion-mnist", tmp_path)
    assert ds.images.shape == (3, 1, 28, 28) and ds.labels.tolist() == [4, 0, 9]
    assert ds.images[1, 0, 0, 3].item() == images[784 + 3]
    assert ds.classes[9] == "Ankle boot"


def test_digits_is_embedded_and_split_fixed():
    train, test = load_dataset("digits"), load_dataset("digits", train=False)
    assert len(train) + len(test) == 1797 and train.images.shape[1:] == (1, 8, 8)
    assert torch.equal(load_dataset("digits").labels, train.labels)


def test_unknown_dataset_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist3d'.*cifar10"):
        load_dataset("mnist3d")
    assert dataset_key("CIFAR-100") == "cifar100"


# ------------------------------------------------------------------------------------------- splits


def _labels(n_per_class=20, classes=5):
    return torch.arange(classes).repeat_interleave(n_per_class)


def test_train_val_split_is_per_class_seeded_and_disjoint():
    labels = _labels(20, 5)
    train, val = train_val_split(labels, 0.1, seed=2)
    assert len(val) == 10 and len(train) == 90
    assert torch.bincount(labels[val]).tolist() == [2] * 5  # floor(0.1 * 20) of every class
    assert set(train.tolist()).isdisjoint(val.tolist()) and len(set(train.tolist()) | set(val.tolist())) == 100
    again = train_val_split(labels, 0.1, seed=2)
    assert torch.equal(again[1], val)
    assert not torch.equal(train_val_split(labels, 0.1, seed=3)[1], val)


def test_random_forget_set_is_seeded_and_sized():
    labels = _labels(20, 5)
    a = select_forget(labels, ratio=0.1, seed=1)
    assert len(a) == 10 and torch.equal(a, a.sort().values)
    assert torch.equal(a, select_forget(labels, ratio=0.1, seed=1))
    assert not torch.equal(a, select_forget(labels, ratio=0.1, seed=2))
    assert len(select_forget(labels, ratio=0.29, seed=1)) == 29  # 0.29 * 100 is 29, not 28


def test_forget_set_bad_input():
    labels = _labels(2, 3)
    with pytest.raises(ValueError, match="forget set is empty"):
        select_forget(labels, ratio=0.01, seed=1)
    with pytest.raises(ValueError, match="whole training set"):
        select_forget(labels, ratio=1.0, seed=1)
    with pytest.raises(ValueError, match="exactly one"):
        select_forget(labels, ratio=0.5, classes=[1])
    with pytest.raises(ValueError, match=r"class\(es\) \[7\] have no training sample"):
        select_forget(labels, classes=[7])


def _dataset(n_per_class=20, classes=5, name="toy"):
    labels = _labels(n_per_class, classes)
    images = (torch.arange(len(labels)) % 256).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    return ImageDataset(images, labels, [str(c) for c in range(classes)], name)


def test_unlearning_split_random_and_class_wise():
    train, test = _dataset(20, 5), _dataset(4, 5)
    split = make_unlearning_split(train, test, ratio=0.2, forget_seed=3)
    assert len(split.train) == 90 and len(split.val) == 10 and len(split.forget) == 18 and len(split.retain) == 72
    assert set(split.forget_idx.tolist()).isdisjoint(split.retain_idx.tolist())
    assert len(split.test) == 20  # random forgetting keeps the whole test set
    classwise = make_unlearning_split(train, test, classes=[2])
    assert set(classwise.forget.labels.tolist()) == {2} and 2 not in classwise.retain.labels.tolist()
    assert 2 not in classwise.test.labels.tolist() and len(classwise.test) == 16
    with pytest.raises(ValueError, match="whole training set"):
        make_unlearning_split(train, test, forget_idx=torch.arange(90))
    with pytest.raises(ValueError, match=r"must lie in \[0, 90\)"):
        make_unlearning_split(train, test, forget_idx=[95])


def test_cifar10_sized_split_pins_the_paper_codes_indices():
    # 50k CIFAR-10-sized labels (label of sample i: 7 i mod 10). Expected indices computed once from the paper
    # code's definition (Classification/dataset.py, cifar10_dataloaders with seed 2 + replace_class with
    # class_to_replace=-1, num_indexes_to_replace=4500): val = per class RandomState(2).choice(10% of the class),
    # train = the remaining indices in order, forget = RandomState(seed - 1 = 1).choice(45000 train positions,
    # 4500, replace=False).
    labels = torch.from_numpy((np.arange(50_000) * 7) % 10)
    images = torch.zeros(50_000, 1, 1, 1, dtype=torch.uint8)
    full = ImageDataset(images, labels, [str(c) for c in range(10)], "cifar10-sized")
    split = make_unlearning_split(full, full.subset(torch.arange(10)), ratio=0.1, forget_seed=1, split_seed=2)
    assert (len(split.train), len(split.val), len(split.forget), len(split.retain)) == (45_000, 5_000, 4_500, 40_500)
    _, val = train_val_split(labels, 0.1, seed=2)
    assert val[:5].tolist() == [45, 57, 68, 77, 103] and val[-3:].tolist() == [49984, 49990, 49999]
    assert split.forget_idx[:5].tolist() == [10, 44, 45, 69, 85]  # positions in the 45k training split
    assert split.forget_idx[-3:].tolist() == [44992, 44995, 44996]
    train_idx, _ = train_val_split(labels, 0.1, seed=2)
    assert train_idx[split.forget_idx[:5]].tolist() == [10, 44, 46, 72, 89]  # the same samples in the 50k set


# ------------------------------------------------------------------------------------------- batches


def test_batches_are_seeded_per_epoch_and_cover_the_data():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    labels = torch.arange(10)
    batches = Batches(images, labels, batch_size=4, shuffle=True, seed=7)
    assert len(batches) == 3
    epoch0 = [y.tolist() for _, y in batches.epoch(0)]
    assert sorted(i for b in epoch0 for i in b) == list(range(10)) and [len(b) for b in epoch0] == [4, 4, 2]
    assert epoch0 == [y.tolist() for _, y in batches.epoch(0)]
    assert epoch0 != [y.tolist() for _, y in batches.epoch(1)]
    x, _ = next(iter(Batches(images, labels, batch_size=10, shuffle=False).epoch(0)))
    assert torch.allclose(x.flatten(), labels.float() / 255) and x.dtype == torch.float32


def test_augment_crops_and_flips_on_the_device():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    out = Augment(pad=1, flip=False)(x, gen)
    assert out.shape == x.shape
    # every output is the padded image shifted by (dy, dx) in {-1, 0, 1}^2: check a shift of each sample
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(64):
        assert any(torch.equal(out[i], padded[i, :, dy : dy + 4, dx : dx + 4]) for dy in range(3) for dx in range(3))
    assert len({tuple(o.flatten().tolist()) for o in out}) > 1  # the offsets differ between samples
    flipped = Augment(pad=0, flip=True)(x, torch.Generator().manual_seed(1))
    kinds = [torch.equal(f, x[0]) or torch.equal(f, x[0].flip(-1)) for f in flipped]
    assert all(kinds) and any(torch.equal(f, x[0].flip(-1)) for f in flipped)


def test_derive_seed_separates_streams():
    assert derive_seed(1, 2) == derive_seed(1, 2)
    assert len({derive_seed(1, 2), derive_seed(2, 1), derive_seed(1, 3)}) == 3


def test_class_balanced_subset_is_seeded_and_balanced():
    from salun_ext.data import class_balanced_subset

    labels = _labels(20, 5)
    subset = class_balanced_subset(labels, 25, seed=0)
    assert len(subset) == 25 and torch.bincount(labels[subset]).tolist() == [5] * 5
    assert torch.equal(subset, class_balanced_subset(labels, 25, seed=0))
    assert not torch.equal(subset, class_balanced_subset(labels, 25, seed=1))
    with pytest.raises(ValueError, match="fewer than"):
        class_balanced_subset(labels, 500)
