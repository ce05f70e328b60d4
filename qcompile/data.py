"""Image data for calibration, evaluation and training: ImageFolder directories and the CIFAR-10 archive.

JPEG decoding is the slow part (about a minute for CIFAR-10), so each split is decoded once with Pillow and
cached as a uint8 ``.npy`` array keyed by the source's path, size and modification time.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qcompile.errors import DataError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass(frozen=True)
class ImageSet:
    """Decoded images (N, H, W, 3) uint8 with integer labels and the class names they index."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None, seed: int = 0) -> ImageSet:
        """A fixed, class-mixed subset of ``n`` images (all of them when ``n`` is None or too large)."""
        if n is None or n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return ImageSet(self.images[idx], self.labels[idx], self.classes)


def cache_dir() -> Path:
    """Where decoded splits are cached: ``$QCOMPILE_CACHE`` or ``~/.cache/qcompile``."""
    return Path(os.environ.get("QCOMPILE_CACHE", Path.home() / ".cache" / "qcompile"))


def _source_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _stack(images: list[np.ndarray], labels: list[int], classes: tuple[str, ...], where: str) -> ImageSet:
    if not images:
        raise DataError(f"no images found in {where}")
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DataError(f"images in {where} have different sizes {sorted(shapes)[:3]}; resize them to one size")
    return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64), classes)


def _read_archive(path: Path) -> dict[str, ImageSet]:
    """Decode every split of an ImageFolder-layout tar archive (``root/<split>/<class>/<image>``) in one pass."""
    from tqdm import tqdm

    found: dict[str, list[tuple[str, str, np.ndarray]]] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tqdm(tar, desc=f"decode {path.name}", unit="file", disable=None, leave=False):
                parts = Path(member.name).parts
                if not member.isfile() or len(parts) < 4 or not member.name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                split, cls = parts[-3], parts[-2]
                fh = tar.extractfile(member)
                assert fh is not None
                found.setdefault(split, []).append((cls, member.name, _decode(fh.read())))
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"cannot read archive {path}: {exc}") from None
    out = {}
    for split, items in found.items():
        items.sort(key=lambda t: t[1])
        classes = tuple(sorted({c for c, _, _ in items}))
        index = {c: i for i, c in enumerate(classes)}
        out[split] = _stack([im for _, _, im in items], [index[c] for c, _, _ in items], classes, f"{path}:{split}")
    return out


def _read_folder(root: Path) -> ImageSet:
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    images, labels = [], []
    for i, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                images.append(_decode(f.read_bytes()))
                labels.append(i)
    return _stack(images, labels, classes, str(root))


def _cached(path: Path, split: str) -> ImageSet | None:
    f = cache_dir() / f"{path.name}-{_source_key(path)}-{split}.npz"
    if not f.exists():
        return None
    with np.load(f) as z:
        return ImageSet(z["images"], z["labels"], tuple(str(c) for c in z["classes"]))


def _store(path: Path, split: str, data: ImageSet) -> None:
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"{path.name}-{_source_key(path)}-{split}.npz"
    tmp = final.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, images=data.images, labels=data.labels, classes=np.asarray(data.classes))
    os.replace(tmp, final)


def load_split(path: str | os.PathLike[str], split: str) -> ImageSet:
    """Load ``split`` ("train" or "test") from a tar archive, or from ``DIR/<split>/<class>/*`` or ``DIR/<class>/*``."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {p} does not exist")
    hit = _cached(p, split)
    if hit is not None:
        return hit
    if p.is_file():
        splits = _read_archive(p)
        for name, data in splits.items():
            _store(p, name, data)
        if split not in splits:
            raise DataError(f"archive {p} has no '{split}' split (found: {', '.join(sorted(splits)) or 'none'})")
        return splits[split]
    candidates = [c for c in (p / split, *(q / split for q in p.iterdir() if q.is_dir())) if c.is_dir()]
    data = _read_folder(candidates[0] if candidates else p)
    _store(p, split, data)
    return data


def normalize(images: np.ndarray, mean: tuple[float, ...] = CIFAR_MEAN, std: tuple[float, ...] = CIFAR_STD) -> torch.Tensor:
    """uint8 NHWC → float32 NCHW, scaled to [0, 1] and standardised per channel."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


def iterate_batches(
    data: ImageSet, batch_size: int = 256, shuffle: bool = False, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised ``(inputs, labels)`` batches in order, or shuffled with a fixed seed."""
    order = np.random.default_rng(seed).permutation(len(data)) if shuffle else np.arange(len(data))
    for start in range(0, len(data), batch_size):
        idx = order[start : start + batch_size]
        yield normalize(data.images[idx]), torch.from_numpy(data.labels[idx])


class Batches:
    """A re-iterable view of :func:`iterate_batches`, so a model file can return it from ``eval_data()``."""

    def __init__(self, data: ImageSet, batch_size: int = 256) -> None:
        self.data = data
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iterate_batches(self.data, self.batch_size)

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)
