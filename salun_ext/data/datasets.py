"""Dataset loaders. Each returns an ImageDataset; missing files raise an error that says where they were looked
for and how to get them.

On-disk formats read (never executing code from a data file):
    cifar10       `cifar-10-batches-py/` (data_batch_1..5, test_batch, batches.meta): the python pickles
    cifar100      `cifar-100-python/` (train, test, meta)
    svhn          `train_32x32.mat`, `test_32x32.mat` (MATLAB v5, read with scipy.io)
    tinyimagenet  `tiny-imagenet-200/` (train/<wnid>/images/*.JPEG; val/ with val_annotations.txt, or
                  val/<wnid>/... as an ImageFolder)
    fashion_mnist the idx files (`train-images-idx3-ubyte[.gz]`, ...) in the root or torchvision's
                  `<root>/FashionMNIST/raw/` layout (Debian: /usr/share/datasets/fashion-mnist)
    digits        sklearn's embedded 8x8 digits (no files)

Roots: the `root` argument, else $SALUN_EXT_DATA, ./data and ~/datasets. Only `download=True` downloads (through
torchvision, into the root); by default nothing touches the network.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from salun_ext.utils.errors import MissingFileError, UsageError


@dataclasses.dataclass
class ImageDataset:
    """Images (uint8, N x C x H x W) and labels (int64, N), fully in memory."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise UsageError(
                f"{self.name}: images must be uint8 N x C x H x W, got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise UsageError(
                f"{self.name}: {self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def subset(self, index: torch.Tensor) -> ImageDataset:
        index = index.to(self.images.device) if isinstance(index, torch.Tensor) else index
        return ImageDataset(self.images[index], self.labels[index], self.classes, self.name)

    def to(self, device: torch.device | str) -> ImageDataset:
        """The same dataset with its tensors on `device` (no copy when already there)."""
        return ImageDataset(self.images.to(device), self.labels.to(device), self.classes, self.name)

    def float_images(self) -> torch.Tensor:
        """Images as float32 in [0, 1]."""
        return self.images.float().div_(255.0)


DATA_ENV = "SALUN_EXT_DATA"


def default_roots() -> list[Path]:
    """Where datasets are looked for when no root is given: $SALUN_EXT_DATA, ./data, ~/datasets."""
    roots = [Path(os.environ[DATA_ENV])] if os.environ.get(DATA_ENV) else []
    return [*roots, Path("data"), Path("~/datasets").expanduser()]


def _roots(root: str | None) -> list[Path]:
    return [Path(root).expanduser()] if root else default_roots()


def _find_folder(roots: list[Path], folder: str, marker: str) -> Path | None:
    """root/folder/marker or root/marker (the root is the folder itself)."""
    for root in roots:
        for candidate in (root / folder, root):
            if (candidate / marker).exists():
                return candidate
    return None


def _not_found(what: str, files: str, roots: list[Path], how: str) -> MissingFileError:
    return MissingFileError(
        f"{what} not found: looked for {files} in {[str(r) for r in roots]}. {how} "
        f"(pass root=... / --data-root, or set ${DATA_ENV})"
    )


# --------------------------------------------------------------------------------------------------- digits
def _digits(root: str | None, train: bool, download: bool = False) -> ImageDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    # no official split: a fixed, stratified 80/20 split (20% of every class, seeded) serves as the test set
    gen = torch.Generator().manual_seed(0)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        test[idx[: len(idx) // 5]] = True
    keep = ~test if train else test
    return ImageDataset(images[keep], labels[keep], [str(i) for i in range(10)], "digits")


# -------------------------------------------------------------------------------------------- Fashion-MNIST
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_DEFAULT_ROOTS = ["/usr/share/datasets/fashion-mnist"]


def _read_idx(path: Path, offset: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def _find_idx_file(roots: list[Path], stem: str) -> Path | None:
    for root in roots:
        for folder in (root, root / "FashionMNIST" / "raw"):
            for name in (stem, stem + ".gz"):
                if (folder / name).exists():
                    return folder / name
    return None


def _fashion_mnist(root: str | None, train: bool, download: bool = False) -> ImageDataset:
    roots = [Path(root)] if root else [Path(p) for p in FASHION_DEFAULT_ROOTS] + default_roots()
    prefix = "train" if train else "t10k"
    if download:
        import torchvision

        torchvision.datasets.FashionMNIST(os.fspath(roots[0]), train=train, download=True)
    img_path = _find_idx_file(roots, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find_idx_file(roots, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lbl_path is None:
        raise MissingFileError(
            f"Fashion-MNIST files ({prefix}-images-idx3-ubyte[.gz], {prefix}-labels-idx1-ubyte[.gz]) not found in "
            f"{[str(r) for r in roots]} (also looked in <root>/FashionMNIST/raw). Get them with "
            "`apt-get install dataset-fashion-mnist` (Debian) or torchvision.datasets.FashionMNIST(root, download=True)"
        )
    images = torch.from_numpy(_read_idx(img_path, 16).copy()).view(-1, 1, 28, 28)
    labels = torch.from_numpy(_read_idx(lbl_path, 8).astype(np.int64))
    return ImageDataset(images, labels, list(FASHION_CLASSES), "fashion_mnist")


# ------------------------------------------------------------------------------------------------ CIFAR
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a data file can never run code."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file (not plain data)")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        try:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise UsageError(f"{path}: not a readable CIFAR python batch file ({exc})") from exc
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _load_pickle(path)
    if "data" not in batch or label_key not in batch:
        raise UsageError(f"{path}: missing 'data' or '{label_key}' (found keys {sorted(batch)})")
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UsageError(f"{path}: 'data' must be N x 3072 uint8, got shape {data.shape}")
    labels = np.asarray(batch[label_key], dtype=np.int64)
    return data.reshape(-1, 3, 32, 32), labels


def _cifar(root: str | None, train: bool, download: bool, hundred: bool) -> ImageDataset:
    roots = _roots(root)
    if hundred:
        name, folder, url = "cifar100", "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
        files = ["train" if train else "test"]
        meta_name, label_key, names_key = "meta", "fine_labels", "fine_label_names"
    else:
        name, folder, url = "cifar10", "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        meta_name, label_key, names_key = "batches.meta", "labels", "label_names"
    if download:
        import torchvision

        cls = torchvision.datasets.CIFAR100 if hundred else torchvision.datasets.CIFAR10
        cls(os.fspath(roots[0]), train=train, download=True)
    base = _find_folder(roots, folder, files[0])
    if base is None or not all((base / f).exists() for f in files):
        raise _not_found(
            f"CIFAR-{'100' if hundred else '10'} ({'train' if train else 'test'})",
            f"{folder}/{{{', '.join(files)}}}",
            roots,
            f"Download {url} and extract it there, or pass download=True / --download",
        )
    parts = [_cifar_batch(base / f, label_key) for f in files]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    meta_path = base / meta_name
    if meta_path.exists():
        classes = [str(c) for c in _load_pickle(meta_path)[names_key]]
    else:
        classes = [str(i) for i in range(100 if hundred else 10)]
    return ImageDataset(images, labels, classes, name)


def _cifar10(root: str | None, train: bool, download: bool = False) -> ImageDataset:
    return _cifar(root, train, download, hundred=False)


def _cifar100(root: str | None, train: bool, download: bool = False) -> ImageDataset:
    return _cifar(root, train, download, hundred=True)


# ------------------------------------------------------------------------------------------------- SVHN
def _svhn(root: str | None, train: bool, download: bool = False) -> ImageDataset:
    import scipy.io

    roots = _roots(root)
    split = "train" if train else "test"
    filename = f"{split}_32x32.mat"
    if download:
        import torchvision

        torchvision.datasets.SVHN(os.fspath(roots[0] / "svhn"), split=split, download=True)
    base = _find_folder(roots, "svhn", filename)
    if base is None:
        raise _not_found(
            f"SVHN ({split})",
            f"[svhn/]{filename}",
            roots,
            f"Download http://ufldl.stanford.edu/housenumbers/{filename} there, or pass download=True / --download",
        )
    try:
        mat = scipy.io.loadmat(base / filename)
    except Exception as exc:  # scipy raises several types for corrupt files
        raise UsageError(f"{base / filename}: not a readable SVHN .mat file ({exc})") from exc
    if "X" not in mat or "y" not in mat:
        raise UsageError(f"{base / filename}: expected variables 'X' and 'y', found {sorted(mat)}")
    x = np.asarray(mat["X"], dtype=np.uint8)  # 32 x 32 x 3 x N
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
    labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    labels[labels == 10] = 0  # SVHN stores the digit 0 as label 10
    return ImageDataset(images, torch.from_numpy(labels), [str(i) for i in range(10)], "svhn")


# ------------------------------------------------------------------------------------------ TinyImageNet
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _read_images(paths: list[Path], size: int, desc: str) -> torch.Tensor:
    from PIL import Image
    from tqdm.auto import tqdm

    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for i, path in enumerate(tqdm(paths, desc=desc, leave=False, disable=len(paths) < 1000)):
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            out[i] = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return out


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _tinyimagenet(root: str | None, train: bool, download: bool = False) -> ImageDataset:
    roots = _roots(root)
    base = _find_folder(roots, "tiny-imagenet-200", "train")
    if download and base is None:
        raise UsageError(
            "TinyImageNet cannot be downloaded through torchvision: download "
            "http://cs231n.stanford.edu/tiny-imagenet-200.zip and extract it into the data root"
        )
    if base is None:
        raise _not_found(
            "TinyImageNet",
            "tiny-imagenet-200/train/<wnid>/images/*.JPEG",
            roots,
            "Download http://cs231n.stanford.edu/tiny-imagenet-200.zip and extract it there",
        )
    wnids_file = base / "wnids.txt"
    if wnids_file.exists():
        wnids = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
    else:
        wnids = sorted(p.name for p in (base / "train").iterdir() if p.is_dir())
    index = {w: i for i, w in enumerate(wnids)}
    paths: list[Path] = []
    labels: list[int] = []
    if train:
        for wnid in wnids:
            found = _images_under(base / "train" / wnid)
            paths += found
            labels += [index[wnid]] * len(found)
    else:
        val = base / "val"
        annotations = val / "val_annotations.txt"
        if annotations.exists():  # the official layout: val/images/*.JPEG + a file -> wnid table
            for line in annotations.read_text().splitlines():
                fields = line.split("\t")
                if len(fields) >= 2 and fields[1] in index:
                    paths.append(val / "images" / fields[0])
                    labels.append(index[fields[1]])
        else:  # ImageFolder layout val/<wnid>/...
            for wnid in wnids:
                found = _images_under(val / wnid)
                paths += found
                labels += [index[wnid]] * len(found)
    if not paths:
        raise MissingFileError(f"TinyImageNet: no {'train' if train else 'val'} images found under {base}")
    images = _read_images(paths, 64, f"tinyimagenet {'train' if train else 'val'}")
    return ImageDataset(images, torch.tensor(labels, dtype=torch.int64), wnids, "tinyimagenet")


# --------------------------------------------------------------------------------------------- registry
DATASETS: dict[str, Callable[..., ImageDataset]] = {
    "digits": _digits,
    "fashion_mnist": _fashion_mnist,
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "svhn": _svhn,
    "tinyimagenet": _tinyimagenet,
}


def dataset_key(name: str) -> str:
    """Canonical dataset name ('CIFAR-10' -> 'cifar10', 'fashion-mnist' -> 'fashion_mnist'); ValueError if unknown."""
    key = name.lower().replace("-", "_")
    aliases = {
        "cifar_10": "cifar10",
        "cifar_100": "cifar100",
        "tiny_imagenet": "tinyimagenet",
        "fmnist": "fashion_mnist",
    }
    key = aliases.get(key, key)
    if key not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; available: {sorted(DATASETS)}")
    return key


def load_dataset(
    name: str, root: str | os.PathLike | None = None, *, train: bool = True, download: bool = False
) -> ImageDataset:
    """Load a dataset by name ('digits', 'fashion_mnist', 'cifar10', 'cifar100', 'svhn', 'tinyimagenet').

    Reads from a local root; downloads (through torchvision, into the root) only with download=True.
    """
    key = dataset_key(name)
    return DATASETS[key](os.fspath(root) if root is not None else None, train, download)
