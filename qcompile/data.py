"""Image data for calibration, evaluation and training: ImageFolder directories and the CIFAR-10 archive.

JPEG decoding is the slow part (about a minute for CIFAR-10), so each split is decoded once with Pillow and
cached as a uint8 ``.npz`` array keyed by the source's path, size and modification time. A split whose images
share one size is cached as decoded and resized to the model's input only where its images are read
(:class:`ResizedImages`): CIFAR-10 for a 224x224 model is its 180 MB of pixels, not 9 GB of resized ones, and
taking 512 calibration images resizes 512. A split of mixed sizes is resized as it is decoded and cached per
target size. Entries are :mod:`qcompile.cache` entries: one that is damaged, changed or of another format
version is deleted and decoded again.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import tarfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from qcompile import cache
from qcompile.errors import DataError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = {"cifar": (CIFAR_MEAN, CIFAR_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
CROP_FRACTION = 0.875  # torchvision's evaluation transform: Resize(size / 0.875), CenterCrop(size)
SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val", "valid", "validation")}
"""The folders a split is read from, the first present: evaluation images are as often in ``val/`` (ImageNet's
layout, Imagenette) or ``valid/`` (fastai's) as in ``test/``."""
LAYOUT = "train/<class>/<image> and test/<class>/<image> (or val/<class>/<image>)"
CACHE_KIND = "images"
CACHE_VERSION = 2  # 2: qcompile.cache header (version, content hash); 1 had none

Size = tuple[int, int]  # (height, width)
Stats = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel (mean, std)


class ResizedImages:
    """Images (N, H, W, 3) uint8 resized from same-sized source pixels by :func:`resize_center_crop` when they
    are read: indexing gives numpy arrays, as indexing the resized array would, at the cost of the images read.

    It stands in for the array of a split loaded at another size than its images', whose resized pixels would
    otherwise all be held (50,000 CIFAR-10 images at 224x224: 7.5 GB) to calibrate on a few hundred.
    """

    def __init__(self, source: np.ndarray, size: Size) -> None:
        _cover(source.shape[2], source.shape[1], size)  # a size the images cannot cover fails now, not when read
        self.source = source
        self.size = size
        self.shape = (len(source), *size, source.shape[3])
        self.dtype = source.dtype
        self.ndim = 4

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: object) -> np.ndarray:
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        picked = self.source[first]
        if picked.ndim == 3:
            return _resize_pixels(picked, self.size)[rest]
        out = np.empty((len(picked), *self.shape[1:]), self.dtype)
        for i, pixels in enumerate(picked):
            out[i] = _resize_pixels(pixels, self.size)
        return out[(slice(None), *rest)]

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


@dataclass(frozen=True)
class ImageSet:
    """Decoded images (N, H, W, 3) uint8 with integer labels and the class names they index.

    ``source_size`` is the (H, W) all source images had before any resizing (None when they differ): it
    tells CIFAR-sized data from other data when choosing a normalisation. ``images`` is a
    :class:`ResizedImages` when the split was loaded at another size than its images'.
    """

    images: np.ndarray | ResizedImages
    labels: np.ndarray
    classes: tuple[str, ...]
    source_size: Size | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None, seed: int = 0) -> ImageSet:
        """A fixed, class-mixed subset of ``n`` images (all of them when ``n`` is None or too large)."""
        if n is None or n >= len(self):
            return self
        idx = _draw(len(self), n, seed)
        return ImageSet(self.images[idx], self.labels[idx], self.classes, self.source_size)


def _draw(total: int, n: int, seed: int) -> np.ndarray:
    """Which ``n`` of ``total`` images a seeded, class-mixed subset holds, in their order."""
    return np.sort(np.random.default_rng(seed).permutation(total)[:n])


def _source_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def resize_center_crop(im: PILImage, size: Size) -> PILImage:
    """torchvision's evaluation transform: the shorter side to round(min(size) / 0.875), bilinear (Pillow
    antialiases when shrinking), then the centre (H, W), placed as ``transforms.CenterCrop`` places it."""
    from PIL import Image

    h, w = size
    new_w, new_h = _cover(im.width, im.height, size)
    resized = im.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = int(round((new_h - h) / 2.0)), int(round((new_w - w) / 2.0))
    return resized.crop((left, top, left + w, top + h))


def _cover(width: int, height: int, size: Size) -> tuple[int, int]:
    """The (width, height) :func:`resize_center_crop` resizes a ``width`` x ``height`` image to, or the one-line
    error when that does not cover ``size``."""
    h, w = size
    short = round(min(h, w) / CROP_FRACTION)
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    if new_h < h or new_w < w:
        raise DataError(f"a {width}x{height} image resized to {new_w}x{new_h} does not cover the model's "
                        f"{w}x{h} input; resize the images to its aspect ratio")
    return new_w, new_h


def _resize_pixels(pixels: np.ndarray, size: Size) -> np.ndarray:
    """:func:`resize_center_crop` of decoded RGB pixels (the image Pillow decoded them from, pixel for pixel)."""
    from PIL import Image

    return np.asarray(resize_center_crop(Image.fromarray(pixels), size), dtype=np.uint8)


def _decode(data: bytes, where: str) -> np.ndarray:
    """RGB pixels as decoded; ``where`` names the image in the one-line error a file Pillow cannot decode gets."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # PIL raises all of these
        raise DataError(f"cannot decode image {where}: {cache.first_line(exc)}") from None
    return np.asarray(rgb, dtype=np.uint8)


class _Decoded:
    """A split's images as they are decoded: kept as decoded while they share one size (:func:`load_split` resizes
    such a split when it is read, and caches it once for every size), else each resized to ``size`` as it comes,
    so that a split of mixed sizes (ImageNet's) never holds its full-size images at once."""

    def __init__(self, size: Size | None, where: str) -> None:
        self.size, self.where = size, where
        self.images: list[np.ndarray] = []
        self.mixed = False

    def add(self, pixels: np.ndarray) -> None:
        if not self.mixed and self.images and pixels.shape[:2] != self.images[0].shape[:2]:
            if self.size is None:
                shapes = sorted({self.images[0].shape, pixels.shape})
                raise DataError(f"images in {self.where} have different sizes {shapes}; resize them to one size")
            self.mixed = True
            self.images = [self._resized(im) for im in self.images]
        self.images.append(self._resized(pixels) if self.mixed else pixels)

    def _resized(self, pixels: np.ndarray) -> np.ndarray:
        assert self.size is not None
        return pixels if pixels.shape[:2] == self.size else _resize_pixels(pixels, self.size)

    def image_set(self, labels: Sequence[int], classes: tuple[str, ...],
                  order: Sequence[int] | None = None) -> ImageSet:
        """The images (in ``order`` of their decoding, when given) with their labels."""
        if not self.images:
            raise DataError(f"no images found in {self.where}")
        images = self.images if order is None else [self.images[i] for i in order]
        source_size = None if self.mixed else self.images[0].shape[:2]
        return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64), classes, source_size)


def _open_archive(path: Path) -> tarfile.TarFile:
    """The tar archive at ``path``, or a one-line error saying what --data takes instead."""
    try:
        return tarfile.open(path)
    except tarfile.ReadError:
        what = "a zip archive" if zipfile.is_zipfile(path) else "not a tar archive"
        raise DataError(f"data file {path} is {what}; expected a tar archive (.tar, .tar.gz, .tgz, .tar.bz2, "
                        f".tar.xz) or a directory holding {LAYOUT}") from None
    except OSError as exc:
        raise DataError(f"cannot read archive {path}: {cache.first_line(exc)}") from None


def _read_archive(path: Path, size: Size | None) -> dict[str, ImageSet]:
    """Decode every split of an ImageFolder-layout tar archive (``root/<split>/<class>/<image>``) in one pass."""
    from tqdm import tqdm

    decoded: dict[str, _Decoded] = {}
    members: dict[str, list[tuple[str, str]]] = {}  # split -> (member name, class) in the order decoded
    try:
        with _open_archive(path) as tar:
            for member in tqdm(tar, desc=f"decode {path.name}", unit="file", disable=None, leave=False):
                parts = Path(member.name).parts
                if not member.isfile() or len(parts) < 4 or not member.name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                split, cls = parts[-3], parts[-2]
                fh = tar.extractfile(member)
                assert fh is not None
                pixels = _decode(fh.read(), f"{path}:{member.name}")
                decoded.setdefault(split, _Decoded(size, f"{path}:{split}")).add(pixels)
                members.setdefault(split, []).append((member.name, cls))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:  # a damaged or truncated archive
        raise DataError(f"cannot read archive {path}: {cache.first_line(exc)}") from None
    out = {}
    for split, items in members.items():
        order = sorted(range(len(items)), key=lambda i: items[i][0])
        classes = tuple(sorted({c for _, c in items}))
        index = {c: i for i, c in enumerate(classes)}
        out[split] = decoded[split].image_set([index[items[i][1]] for i in order], classes, order)
    return out


def _split_dir(root: Path, split: str) -> Path | None:
    """``root/<split>``, or ``root/<one folder>/<split>`` (a directory an archive was unpacked into)."""
    candidates = [root / split, *(q / split for q in sorted(root.iterdir()) if q.is_dir())]
    return next((c for c in candidates if c.is_dir()), None)


def _read_folder(root: Path, size: Size | None, limit: int | None = None, seed: int = 0) -> ImageSet:
    """``root/<class>/<image>``; with ``limit``, only the images :meth:`ImageSet.subset` would draw are decoded
    (the same ones: 512 calibration images of ImageNet's 1.28 million, not all of them)."""
    from tqdm import tqdm

    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    files = [(f, i) for i, cls in enumerate(classes) for f in sorted((root / cls).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"no images found in {root}")
    if limit is not None and limit < len(files):
        files = [files[i] for i in _draw(len(files), limit, seed)]
    if not files:  # --calib-size 0: the classes alone
        return ImageSet(np.zeros((0, *(size or (1, 1)), 3), np.uint8), np.zeros(0, np.int64), classes, size)
    decoded = _Decoded(size, str(root))
    for f, _ in tqdm(files, desc=f"decode {root.name}", unit="file", disable=None, leave=False):
        decoded.add(_decode(f.read_bytes(), str(f)))
    return decoded.image_set([label for _, label in files], classes)


def _cache_file(path: Path, split: str, size: Size | None) -> Path:
    resized = f"-{size[0]}x{size[1]}" if size is not None else ""
    return cache.cache_dir() / f"{path.name}-{_source_key(path)}-{split}{resized}.npz"


def _cached(path: Path, split: str, size: Size | None) -> ImageSet | None:
    """The split as cached, or None when it is not (or was unusable: then it is deleted with a warning)."""
    arrays = cache.load_arrays(_cache_file(path, split, size), CACHE_KIND, CACHE_VERSION)
    if arrays is None:
        return None
    source = tuple(int(v) for v in arrays["source_size"])
    return ImageSet(arrays["images"], arrays["labels"], tuple(str(c) for c in arrays["classes"]), source or None)


def _store(path: Path, split: str, size: Size | None, data: ImageSet) -> None:
    """Cache a split as :func:`_stack` made it: as decoded (keyed without a size) or, of mixed sizes, at ``size``."""
    arrays = {"images": np.asarray(data.images), "labels": data.labels, "classes": np.asarray(data.classes),
              "source_size": np.asarray(data.source_size or (), dtype=np.int64)}
    cache.store_arrays(_cache_file(path, split, None if data.source_size else size), CACHE_KIND, CACHE_VERSION,
                       arrays)


def _at_size(data: ImageSet, size: Size | None) -> ImageSet:
    """``data`` with images of ``size``: a split as decoded is resized where it is read."""
    if size is None or data.images.shape[1:3] == size:
        return data
    return ImageSet(ResizedImages(np.asarray(data.images), size), data.labels, data.classes, data.source_size)


def _split_folder(root: Path, split: str) -> Path | None:
    """The folder ``split`` is read from (see :data:`SPLIT_FOLDERS`), or None."""
    return next((d for name in SPLIT_FOLDERS.get(split, (split,)) if (d := _split_dir(root, name)) is not None), None)


def _by_split(found: dict[str, ImageSet]) -> dict[str, ImageSet]:
    """An archive's splits by the name they are loaded as: its ``val/`` is the test split when it has no ``test/``."""
    named = {split: next((found[f] for f in folders if f in found), None) for split, folders in SPLIT_FOLDERS.items()}
    return {split: data for split, data in named.items() if data is not None}


def _missing_splits(root: Path, split: str) -> str:
    """A one-line error for a directory without ``split``, naming every standard split it lacks."""
    missing = [s for s in dict.fromkeys((split, *SPLIT_FOLDERS)) if _split_folder(root, s) is None]
    names = " and no ".join(f"{s}/" for s in missing)
    return f"data directory {root} has no {names} subdirectory; expected {LAYOUT} inside it"


def load_split(path: str | os.PathLike[str], split: str, size: Size | None = None, limit: int | None = None,
               seed: int = 0) -> ImageSet:
    """Load ``split`` ("train" or "test") from a tar archive, or from ``DIR/<split>/<class>/*`` (the test split
    from ``val/`` where there is no ``test/``: :data:`SPLIT_FOLDERS`); with ``limit``, its seeded class-mixed
    subset of that many images (:meth:`ImageSet.subset`), of which a directory decodes only those.

    With ``size`` (H, W), images of another size go through :func:`resize_center_crop` (when they are read, for
    a split whose images share one size). A directory without the split is an error rather than a fallback to the
    directory's own images: calibrating and evaluating on the same images would report an accuracy that means
    nothing.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {p} does not exist")
    where = _split_folder(p, split) if p.is_dir() else None
    if p.is_dir() and where is None:
        raise DataError(_missing_splits(p, split))
    drawn = split if where is None or limit is None else f"{split}-draw{limit}-seed{seed}"
    for name in dict.fromkeys((split, drawn)):
        hit = _cached(p, name, None) or (_cached(p, name, size) if size is not None else None)
        if hit is not None:
            return _at_size(hit.subset(limit, seed), size)
    if where is not None:
        data = _read_folder(where, size, limit, seed)
        _store(p, drawn, size, data)
        return _at_size(data, size)
    found = _read_archive(p, size)
    splits = _by_split(found)
    for name, data in splits.items():
        _store(p, name, size, data)
    if split not in splits:
        raise DataError(f"archive {p} has no '{split}' split (found: {', '.join(sorted(found)) or 'none'}; "
                        f"expected {LAYOUT})")
    return _at_size(splits[split].subset(limit, seed), size)


def load_train_test(path: str | os.PathLike[str], size: Size | None = None, train_size: int | None = None,
                    test_size: int | None = None, train_seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """The train and test splits of one data set (see :func:`load_split`; ``train_size`` and ``test_size``
    images of them), whose labels must mean the same classes: a label is its class folder's position in sorted
    order, so a class that one split lacks shifts the labels of every class after it, and a model trained or
    calibrated on one split would be scored against different classes on the other."""
    train, test = load_split(path, "train", size, train_size, train_seed), load_split(path, "test", size, test_size)
    if train.classes != test.classes:
        only = {"train": set(train.classes) - set(test.classes), "test": set(test.classes) - set(train.classes)}
        sides = [f"{split} only: {_some(sorted(names))}" for split, names in only.items() if names]
        raise DataError(f"data {path}: the train and test splits have different classes ({'; '.join(sides)}); "
                        "labels are the classes' positions in sorted order, so they would name different classes")
    return train, test


def _some(names: Sequence[str], shown: int = 5) -> str:
    """The first few names, and how many more: a split of 1,000 ImageNet classes would not fit on one line."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def parse_normalization(text: str) -> Stats:
    """``cifar``, ``imagenet`` or ``MEAN,MEAN,MEAN,STD,STD,STD`` (six numbers: RGB means, then RGB stds)."""
    if text.strip().lower() in NORMALIZATIONS:
        return NORMALIZATIONS[text.strip().lower()]
    hint = ("expected cifar, imagenet or six comma-separated numbers (three RGB means, then three standard "
            "deviations), e.g. 0.5,0.5,0.5,0.25,0.25,0.25")
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise DataError.with_parameters(f"{{normalize}} {text!r}: {hint}") from None
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        raise DataError.with_parameters(f"{{normalize}} {text!r}: {hint}")
    if min(values[3:]) <= 0:
        raise DataError.with_parameters(f"{{normalize}} {text!r}: the standard deviations (the last three numbers) "
                                        "must be positive")
    return tuple(values[:3]), tuple(values[3:])


def default_normalization(*splits: ImageSet) -> Stats:
    """CIFAR statistics for 32x32 source images (CIFAR's own size), ImageNet statistics otherwise."""
    cifar = all(s.source_size == (32, 32) for s in splits)
    return NORMALIZATIONS["cifar" if cifar else "imagenet"]


def normalize(images: np.ndarray, mean: tuple[float, ...] = CIFAR_MEAN, std: tuple[float, ...] = CIFAR_STD) -> torch.Tensor:
    """uint8 NHWC → float32 NCHW (contiguous: a model's ``x.view(-1, n)`` after its convs needs that, and a
    permuted view would make PyTorch's convs return channels-last tensors), scaled to [0, 1] and standardised per
    channel."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


def iterate_batches(
    data: ImageSet, batch_size: int = 256, shuffle: bool = False, seed: int = 0,
    stats: Stats = (CIFAR_MEAN, CIFAR_STD),
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised ``(inputs, labels)`` batches in order, or shuffled with a fixed seed."""
    order = np.random.default_rng(seed).permutation(len(data)) if shuffle else np.arange(len(data))
    for start in range(0, len(data), batch_size):
        idx = order[start : start + batch_size]
        yield normalize(data.images[idx], *stats), torch.from_numpy(data.labels[idx])


class Batches:
    """A re-iterable view of :func:`iterate_batches`, so a model file can return it from ``eval_data()`` and the
    CLI can evaluate several times without holding every normalised (and resized) batch: 10,000 images at
    224x224 are 6 GB as float32."""

    def __init__(self, data: ImageSet, batch_size: int = 256, shuffle: bool = False, seed: int = 0,
                 stats: Stats = (CIFAR_MEAN, CIFAR_STD)) -> None:
        self.data = data
        self.batch_size = batch_size
        self.shuffle, self.seed, self.stats = shuffle, seed, stats

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iterate_batches(self.data, self.batch_size, self.shuffle, self.seed, self.stats)

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)
