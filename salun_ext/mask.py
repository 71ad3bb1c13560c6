"""SaliencyMask: the one mask type of the library (bit-packed, 1 bit per parameter).

mask = 1 marks a salient (trainable) weight, as in the paper. The bits of every tensor live in one flat int32
word buffer (layout: `_mask_layout.py`), so a mask of 1e9 parameters takes 125 MB on the device where it was
computed, and the masked optimizers read it directly. Dense bool tensors exist only at the edges (`dense`,
`to_dense`, the paper code's int64 format).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from salun_ext import ops
from salun_ext.utils.errors import MissingFileError, UsageError
from salun_ext.utils.files import write_safetensors

FORMAT_NAME = "salun_ext.saliency_mask"
FORMAT_VERSION = 1
_WORDS_KEY = "words"

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class MaskShard:
    """Where one process's mask lies in the global mask (None on a SaliencyMask = the mask is global).

    layout "boxes": every rank covers the same global tensors; tensor i of this rank's mask is the box of shape
        `mask.shapes[i]` at `offsets[i]` of the global tensor of shape `global_shapes[i]` (DTensor / FSDP2 shards).
    layout "per_rank": each rank covers its own tensors (global order: rank order, then list order); offsets are
        zero and global shapes equal the local ones.
    `salun_ext.distributed.gather_mask` consolidates the shards; `shard_mask` cuts a global mask to a rank's boxes.
    """

    rank: int
    world_size: int
    global_shapes: tuple[torch.Size, ...]
    offsets: tuple[tuple[int, ...], ...]
    layout: str = "boxes"

    def to_json(self) -> str:
        return json.dumps(
            {
                "rank": self.rank,
                "world_size": self.world_size,
                "global_shapes": [list(s) for s in self.global_shapes],
                "offsets": [list(o) for o in self.offsets],
                "layout": self.layout,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> MaskShard:
        d = json.loads(text)
        return cls(
            rank=int(d["rank"]),
            world_size=int(d["world_size"]),
            global_shapes=tuple(torch.Size(s) for s in d["global_shapes"]),
            offsets=tuple(tuple(int(x) for x in o) for o in d["offsets"]),
            layout=str(d["layout"]),
        )


class SaliencyMask:
    """Bit-packed saliency mask over a named list of tensors.

    Attributes:
        names: tensor names in ranking (global index) order.
        shapes: the tensors' shapes.
        ratio: the requested ratio (None for masks built from dense/upstream dicts).
        k: the number of salient entries requested (exact-k masks hold exactly k).
        threshold: the k-th largest |g| (float; +inf when k = 0; None when unknown).
        exact_k: whether ties at the threshold were broken by global index (True) or all kept (False).
        words: the int32 word buffer.
        shard: None for a global mask; for one process's part of a distributed mask, where it lies (MaskShard:
            `shapes` are then the local shapes, `k` and `threshold` the global ones).
    """

    def __init__(
        self,
        words: torch.Tensor,
        names: Iterable[str],
        shapes: Iterable[Iterable[int]],
        *,
        ratio: float | None = None,
        k: int | None = None,
        threshold: float | None = None,
        exact_k: bool = True,
        shard: MaskShard | None = None,
    ) -> None:
        names = tuple(names)
        shapes = tuple(shapes)
        if set(map(type, shapes)) != {torch.Size}:
            shapes = tuple(map(torch.Size, shapes))
        if len(names) != len(shapes):
            raise UsageError(f"SaliencyMask: got {len(names)} names but {len(shapes)} shapes")
        if len(set(names)) != len(names):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            raise UsageError(f"SaliencyMask: duplicate tensor names {duplicates}")
        if not isinstance(words, torch.Tensor) or words.dtype != torch.int32 or words.dim() != 1:
            raise TypeError("SaliencyMask: 'words' must be a 1-D int32 tensor")
        offsets, total = ops.word_offsets(list(map(math.prod, shapes)))
        if words.numel() != total:
            raise UsageError(
                f"SaliencyMask: 'words' has {words.numel()} words but the shapes need {total} "
                f"({len(shapes)} tensors, {sum(math.prod(s) for s in shapes)} elements)"
            )
        self.words = words
        self.names = names
        self.shapes = shapes
        self.ratio = ratio
        self.k = k
        self.threshold = threshold
        self.exact_k = exact_k
        if shard is not None and (len(shard.global_shapes) != len(shapes) or len(shard.offsets) != len(shapes)):
            raise UsageError(
                f"SaliencyMask: shard describes {len(shard.global_shapes)} tensors but the mask has {len(shapes)}"
            )
        self.shard = shard
        self._offsets = offsets
        self._index = dict(zip(names, range(len(names))))

    # ------------------------------------------------------------------ structure
    @property
    def numel(self) -> int:
        """Total number of parameters covered by the mask."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def device(self) -> torch.device:
        return self.words.device

    @property
    def density(self) -> float:
        """Fraction of salient entries (count / numel)."""
        n = self.numel
        return self.count() / n if n else 0.0

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self):
        return iter(self.names)

    def count(self, name: str | None = None) -> int:
        """Number of salient entries, in total or of one tensor."""
        return ops.popcount(self.segment(name) if name is not None else self.words)

    def segment(self, name: str) -> torch.Tensor:
        """The int32 words of one tensor (a view into `words`; padded to 128 bits)."""
        i = self._lookup(name)
        n = math.prod(self.shapes[i])
        return self.words[self._offsets[i] : self._offsets[i] + ops.segment_words(n)]

    def word_offset(self, name: str) -> int:
        return self._offsets[self._lookup(name)]

    def dense(self, name: str) -> torch.Tensor:
        """Bool tensor of the parameter's shape: True = salient (trainable)."""
        i = self._lookup(name)
        shape = self.shapes[i]
        return ops.unpack_bits(self.segment(name), math.prod(shape)).view(shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.dense(name)

    def to_dense(self) -> dict[str, torch.Tensor]:
        return {n: self.dense(n) for n in self.names}

    def to(self, device: torch.device | str) -> SaliencyMask:
        return self._replace(words=self.words.to(device))

    def subset(self, names: Iterable[str]) -> SaliencyMask:
        """The mask of some tensors only, in the given order (e.g. the parameters a method trains).

        Segments are padded per tensor, so this copies words and never unpacks bits. ratio/threshold are kept
        (they describe the global ranking the bits came from); k becomes the subset's salient count.
        """
        names = list(names)
        if names == list(self.names):
            return self
        for n in names:
            self._lookup(n)
        words = (
            torch.cat([self.segment(n) for n in names])
            if names
            else torch.zeros(0, dtype=torch.int32, device=self.device)
        )
        idx = [self._index[n] for n in names]
        shard = self.shard
        if shard is not None:  # a shard's boxes follow the tensors; its global salient count is unknown here
            shard = dataclasses.replace(
                shard,
                global_shapes=tuple(shard.global_shapes[i] for i in idx),
                offsets=tuple(shard.offsets[i] for i in idx),
            )
        out = self._replace(words=words, names=names, shapes=[self.shapes[i] for i in idx], shard=shard)
        out.k = out.count() if shard is None else None
        return out

    def _replace(self, **changes: Any) -> SaliencyMask:
        fields = dict(
            words=self.words,
            names=self.names,
            shapes=self.shapes,
            ratio=self.ratio,
            k=self.k,
            threshold=self.threshold,
            exact_k=self.exact_k,
            shard=self.shard,
        )
        fields.update(changes)
        words = fields.pop("words")
        names = fields.pop("names")
        shapes = fields.pop("shapes")
        return SaliencyMask(words, names, shapes, **fields)

    def _lookup(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"SaliencyMask has no tensor named {name!r} (it covers {len(self.names)} tensors)") from None

    def equal(self, other: SaliencyMask) -> bool:
        """Same tensors (names, shapes) and the same bits."""
        return (
            self.names == other.names
            and self.shapes == other.shapes
            and torch.equal(self.words.cpu(), other.words.cpu())
        )

    def __repr__(self) -> str:
        ratio = "None" if self.ratio is None else f"{self.ratio:g}"
        return (
            f"SaliencyMask(tensors={len(self.names)}, numel={self.numel}, ratio={ratio}, k={self.k}, "
            f"threshold={self.threshold}, exact_k={self.exact_k}, device={self.device}"
            + (f", shard={self.shard.rank}/{self.shard.world_size}" if self.shard is not None else "")
            + ")"
        )

    # ------------------------------------------------------------------ compatibility
    def check_compatible(
        self,
        params: Mapping[str, Any] | Iterable[tuple[str, Any]] | torch.nn.Module,
        *,
        what: str = "model",
        require_all: bool = True,
    ) -> None:
        """Raise ValueError unless every masked tensor exists in `params` with the same shape.

        `params`: a module, or name -> tensor/shape pairs. With require_all=False, tensors of `params` that the
        mask does not cover are allowed (the caller decides whether they train or stay frozen).
        """
        if isinstance(params, torch.nn.Module):
            params = params.named_parameters()
        items = params.items() if isinstance(params, Mapping) else params
        found: dict[str, torch.Size] = {}
        for name, value in items:
            shape = value.shape if isinstance(value, torch.Tensor) else torch.Size(value)
            found[name] = torch.Size(shape)
        missing = [n for n in self.names if n not in found]
        # a shard of a distributed mask is checked against the global shapes (DTensor .shape is global)
        shapes = self.shard.global_shapes if self.shard is not None else self.shapes
        mismatched = [
            f"{n}: mask {tuple(s)} vs {what} {tuple(found[n])}"
            for n, s in zip(self.names, shapes)
            if n in found and found[n] != s
        ]
        extra = [n for n in found if n not in self._index] if require_all else []
        problems = []
        if missing:
            problems.append(f"{len(missing)} masked tensor(s) missing from the {what}: {_preview(missing)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatch(es): {_preview(mismatched)}")
        if extra:
            problems.append(f"{len(extra)} {what} tensor(s) not covered by the mask: {_preview(extra)}")
        if problems:
            raise UsageError("the saliency mask does not match the " + what + ": " + "; ".join(problems))

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_dense(
        cls,
        dense: Mapping[str, torch.Tensor],
        *,
        ratio: float | None = None,
        threshold: float | None = None,
        exact_k: bool = True,
    ) -> SaliencyMask:
        """Pack a dict name -> 0/1 tensor (any dtype; nonzero = salient, values must be 0 or 1)."""
        if len(dense) == 0:
            raise UsageError("SaliencyMask.from_dense: the dict is empty")
        names, shapes, segments = [], [], []
        device = None
        for name, value in dense.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"mask entry {name!r} is a {type(value).__name__}, expected a tensor")
            if value.is_complex():
                raise TypeError(f"mask entry {name!r} is complex")
            if value.dtype != torch.bool:
                bad = (value != 0) & (value != 1)
                if bool(bad.any()):
                    raise UsageError(
                        f"mask entry {name!r} holds values other than 0 and 1 "
                        f"(e.g. {value[bad].reshape(-1)[0].item()}); not a saliency mask"
                    )
            device = device or value.device
            names.append(name)
            shapes.append(value.shape)
            segments.append(ops.pack_bits(value.detach().to(device).reshape(-1) != 0))
        words = torch.cat(segments)
        mask = cls(words, names, shapes, ratio=ratio, threshold=threshold, exact_k=exact_k)
        mask.k = mask.count()
        return mask

    @classmethod
    def from_upstream(
        cls, source: Mapping[str, torch.Tensor] | PathLike, *, ratio: float | None = None
    ) -> SaliencyMask:
        """Read the paper code's mask format: a dict name -> 0/1 tensor, or a `with_0.5.pt` file of one.

        Files are read with `torch.load(weights_only=True)`: they can hold tensors only, never code.
        """
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if not os.path.exists(path):
                raise MissingFileError(f"mask file not found: {path}")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise UsageError(f"{path}: not a readable PyTorch mask file ({exc})") from exc
            if ratio is None:
                ratio = _ratio_from_upstream_name(path)
        else:
            obj = source
        if not isinstance(obj, Mapping):
            raise UsageError(f"an upstream mask is a dict name -> tensor, got {type(obj).__name__}")
        return cls.from_dense(obj, ratio=ratio)

    def to_upstream(self, dtype: torch.dtype = torch.int64) -> dict[str, torch.Tensor]:
        """The paper code's format: dict name -> 0/1 tensor of the parameter's shape (int64 by default)."""
        return {n: self.dense(n).to(dtype) for n in self.names}

    # ------------------------------------------------------------------ files
    def save(self, path: PathLike) -> None:
        """Write a safetensors file (atomically, byte-reproducibly): the words plus JSON metadata (no pickle)."""
        metadata = {
            "format": FORMAT_NAME,
            "version": str(FORMAT_VERSION),
            "names": json.dumps(list(self.names)),
            "shapes": json.dumps([list(s) for s in self.shapes]),
            "ratio": json.dumps(self.ratio),
            "k": json.dumps(self.k),
            "threshold": json.dumps(_float_to_json(self.threshold)),
            "exact_k": json.dumps(self.exact_k),
        }
        if self.shard is not None:
            metadata["shard"] = self.shard.to_json()
        write_safetensors({_WORDS_KEY: self.words.detach().cpu().contiguous()}, path, metadata=metadata)

    @classmethod
    def load(cls, path: PathLike, device: torch.device | str = "cpu") -> SaliencyMask:
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        if not os.path.exists(path):
            raise MissingFileError(f"mask file not found: {path}")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                keys = list(f.keys())
                words = f.get_tensor(_WORDS_KEY) if _WORDS_KEY in keys else None
        except (SafetensorError, OSError, ValueError) as exc:
            raise UsageError(f"{path}: not a readable safetensors file ({exc})") from exc
        if metadata.get("format") != FORMAT_NAME:
            raise UsageError(
                f"{path}: not a salun_ext saliency mask (format={metadata.get('format')!r}); "
                "for the paper code's .pt masks use SaliencyMask.from_upstream"
            )
        version = metadata.get("version")
        if version != str(FORMAT_VERSION):
            raise UsageError(
                f"{path}: unsupported mask format version {version!r} (this library reads {FORMAT_VERSION})"
            )
        if words is None:
            raise UsageError(f"{path}: the mask file has no '{_WORDS_KEY}' tensor (found {keys})")
        try:
            names = json.loads(metadata["names"])
            shapes = json.loads(metadata["shapes"])
            ratio = json.loads(metadata["ratio"])
            k = json.loads(metadata["k"])
            threshold = _float_from_json(json.loads(metadata["threshold"]))
            exact_k = json.loads(metadata["exact_k"])
            shard = MaskShard.from_json(metadata["shard"]) if "shard" in metadata else None
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise UsageError(f"{path}: corrupted mask metadata ({exc})") from exc
        try:
            mask = cls(
                words.to(device), names, shapes, ratio=ratio, k=k, threshold=threshold, exact_k=exact_k, shard=shard
            )
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{path}: corrupted mask ({exc})") from exc
        # a shard holds only its part of the k salient entries (gather_mask checks the total)
        if mask.k is not None and mask.exact_k and mask.shard is None and mask.count() != mask.k:
            raise UsageError(f"{path}: corrupted mask: {mask.count()} salient entries but k = {mask.k}")
        _check_padding_zero(mask, path)
        return mask


def _check_padding_zero(mask: SaliencyMask, path: str) -> None:
    """Padding bits must be 0: checked on the packed words (no unpacking: memory ~ one word per tensor)."""
    for name, shape in zip(mask.names, mask.shapes):
        n = math.prod(shape)
        seg = mask.segment(name)
        full, rest = divmod(n, 32)
        tail = seg[full + (1 if rest else 0) :]  # words holding padding bits only
        partial = (int(seg[full].item()) & 0xFFFFFFFF) >> rest if rest else 0  # padding bits of the last word
        if partial or bool(tail.any()):
            raise UsageError(f"{path}: corrupted mask: padding bits set in the segment of {name!r}")


def _ratio_from_upstream_name(path: str) -> float | None:
    # upstream files are named with_{ratio}.pt
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem.startswith("with_"):
        try:
            return float(stem[len("with_") :])
        except ValueError:
            return None
    return None


def _float_to_json(x: float | None):
    if x is None or math.isfinite(x):
        return x
    return "inf" if x > 0 else ("-inf" if x < 0 else "nan")


def _float_from_json(x):
    return float(x) if isinstance(x, str) else x


def _preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
