"""--data images are resized to the model's input (torchvision's evaluation transform) and normalised as asked;
CIFAR-sized data at a 32x32 model is exactly what it was before either existed. A cache entry that is damaged,
changed or of another format version is decoded again; data qcompile cannot use is a one-line error."""

import json
import shutil
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qcompile import cache as qcache
from qcompile import data as data_module
from qcompile.cli import build_parser, main, resolve_data
from qcompile.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ResizedImages,
    default_normalization,
    iterate_batches,
    load_split,
    load_train_test,
    parse_normalization,
)
from qcompile.errors import DataError
from qcompile.frontend.model_file import load_model_file

ROOT = Path(__file__).resolve().parents[1]
R20 = str(ROOT / "examples" / "resnet20_cifar.py")
SAMPLE = str(ROOT / "examples" / "data" / "cifar10-sample.tar.gz")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def image_folder(root: Path, width: int = 50, height: int = 40) -> Path:
    """train/ (2 PNG per class) and test/ (1 JPEG per class) of random RGB images, 2 classes."""
    rng = np.random.default_rng(0)
    for split, n, suffix in (("train", 2, "png"), ("test", 1, "jpg")):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.{suffix}")
    return root


@pytest.mark.parametrize(
    ("width", "height", "resized", "box"),
    [
        (50, 40, (46, 37), (7, 2, 39, 34)),  # shorter side 40 -> round(32 / 0.875) = 37, 50 -> int(37 * 50 / 40)
        (40, 50, (37, 46), (2, 7, 34, 39)),  # portrait; torchvision rounds the centre offset 2.5 to 2
    ],
)
def test_resize_matches_pillow_resize_and_centre_crop(width, height, resized, box, tmp_path):
    root = image_folder(tmp_path / "imgs", width, height)
    train, test = load_split(root, "train", (32, 32)), load_split(root, "test", (32, 32))
    assert train.images.shape == (4, 32, 32, 3) and test.images.shape == (2, 32, 32, 3)
    assert train.source_size == (height, width) and list(train.labels) == [0, 0, 1, 1]
    with Image.open(root / "train" / "cat" / "0.png") as im:
        expected = np.asarray(im.convert("RGB").resize(resized, Image.Resampling.BILINEAR).crop(box))
    np.testing.assert_array_equal(train.images[0], expected)


def test_a_split_of_one_size_is_cached_once_and_resized_where_it_is_read(tmp_path, cache, monkeypatch):
    root = image_folder(tmp_path / "imgs")
    assert load_split(root, "train", (32, 32)).images.shape[1:3] == (32, 32)
    assert load_split(root, "train", (24, 24)).images.shape[1:3] == (24, 24)
    assert load_split(root, "train").images.shape[1:3] == (40, 50)
    assert sorted(p.name.split("-", 2)[2] for p in cache.iterdir()) == ["train.npz"]  # the pixels as decoded
    again = load_split(root, "train", (32, 32))
    assert isinstance(again.images, ResizedImages) and again.source_size == (40, 50)
    resized = []
    monkeypatch.setattr(data_module, "_resize_pixels", lambda px, size: resized.append(px) or
                        np.zeros((*size, 3), np.uint8))
    assert again.subset(1).images.shape == (1, 32, 32, 3) and len(resized) == 1  # only the images taken


def test_resized_images_index_as_the_resized_array_would(tmp_path):
    lazy = load_split(image_folder(tmp_path / "imgs"), "train", (32, 32)).images
    eager = np.asarray(lazy)
    assert eager.shape == lazy.shape == (4, 32, 32, 3) and eager.dtype == lazy.dtype == np.uint8
    for key in (2, -1, slice(1, 3), np.array([3, 0]), (1, 5), (np.array([0, 2]), 0, slice(None), 1)):
        np.testing.assert_array_equal(lazy[key], eager[key])
    assert lazy[np.array([], dtype=np.int64)].shape == (0, 32, 32, 3)


def test_a_split_of_mixed_sizes_is_resized_as_decoded_and_cached_per_size(tmp_path, cache):
    root = image_folder(tmp_path / "imgs")
    Image.fromarray(np.zeros((60, 44, 3), np.uint8)).save(root / "train" / "dog" / "2.png")
    for size in ((32, 32), (24, 24)):
        data = load_split(root, "train", size)
        assert isinstance(data.images, np.ndarray) and data.images.shape == (5, *size, 3)
        assert data.source_size is None
    assert sorted(p.name.split("-", 2)[2] for p in cache.iterdir()) == ["train-24x24.npz", "train-32x32.npz"]
    with pytest.raises(DataError, match="have different sizes"):
        load_split(root, "train")


def test_a_crop_the_resized_image_cannot_cover_is_refused(tmp_path):
    with pytest.raises(DataError, match="does not cover the model's 16x64 input"):
        load_split(image_folder(tmp_path / "imgs"), "train", (64, 16))


def test_cifar_sized_data_is_unchanged():
    args = build_parser().parse_args([R20, "--data", SAMPLE, "--calib-size", "64", "--eval-size", "100"])
    mf = load_model_file(R20)
    calib, evald = resolve_data(args, mf, mf.example_input())
    # what --data gave before resizing and --normalize existed: stored pixels, CIFAR statistics
    before_calib = list(iterate_batches(load_split(SAMPLE, "train").subset(64), 256))
    before_eval = list(iterate_batches(load_split(SAMPLE, "test").subset(100), 256, shuffle=True))
    for got, want in ((calib, before_calib), (evald, before_eval)):
        assert len(got) == len(want)
        for (x, y), (x0, y0) in zip(got, want):
            assert torch.equal(x, x0) and torch.equal(y, y0)


def test_fewer_images_than_a_hooks_batches_hold_are_a_class_mixed_draw():
    """The bundled sample stores its images by class: --calib-size / --eval-size below its size draw class-mixed
    subsets (seeded by --calib-seed for calibration), where the first images would be airplanes only; at the
    default sizes the hooks' own batches are used as they are."""
    mf = load_model_file(R20)
    args = build_parser().parse_args([R20, "--calib-size", "64", "--eval-size", "100", "--calib-seed", "3"])
    calib, evald = resolve_data(args, mf)
    want_calib = list(iterate_batches(load_split(SAMPLE, "train").subset(64, seed=3), 128))
    want_eval = list(iterate_batches(load_split(SAMPLE, "test").subset(100), 500))
    for got, want in ((calib, want_calib), (evald, want_eval)):
        assert len(got) == len(want) and all(torch.equal(x, x0) and torch.equal(y, y0)
                                             for (x, y), (x0, y0) in zip(got, want))
        assert len(torch.cat([y for _, y in got]).unique()) == 10
    full_calib, full_eval = resolve_data(build_parser().parse_args([R20]), mf)
    assert torch.equal(torch.cat([y for _, y in full_calib]), torch.from_numpy(load_split(SAMPLE, "train").labels))
    assert sum(len(y) for _, y in full_eval) == 2000


@pytest.mark.parametrize(
    ("text", "stats"),
    [
        ("cifar", (CIFAR_MEAN, CIFAR_STD)),
        ("imagenet", (IMAGENET_MEAN, IMAGENET_STD)),
        ("ImageNet", (IMAGENET_MEAN, IMAGENET_STD)),
        ("0.5,0.5,0.5,0.25,0.25,0.25", ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))),
        (" 0.1, 0.2,0.3,1,2,3", ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))),
    ],
)
def test_normalization_choices(text, stats):
    assert parse_normalization(text) == stats


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "expected cifar, imagenet or six comma-separated numbers"),
        ("imagenet1k", "expected cifar, imagenet or six comma-separated numbers"),
        ("0.5,0.5,0.5", "expected cifar, imagenet or six comma-separated numbers"),
        ("0.5,0.5,0.5,0.25,0.25,0.25,1", "expected cifar, imagenet or six comma-separated numbers"),
        ("a,b,c,d,e,f", "expected cifar, imagenet or six comma-separated numbers"),
        ("nan,0,0,1,1,1", "expected cifar, imagenet or six comma-separated numbers"),
        ("0.5,0.5,0.5,0.25,0.25,0", "standard deviations (the last three numbers) must be positive"),
    ],
)
def test_bad_normalization_is_one_line(text, fragment):
    with pytest.raises(DataError) as info:
        parse_normalization(text)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_default_normalization_follows_the_source_size(tmp_path):
    resized = load_split(image_folder(tmp_path / "imgs"), "train", (32, 32))
    cifar = load_split(image_folder(tmp_path / "cifar", 32, 32), "train", (32, 32))
    assert default_normalization(resized) == (IMAGENET_MEAN, IMAGENET_STD)
    assert default_normalization(cifar) == (CIFAR_MEAN, CIFAR_STD)
    assert default_normalization(cifar, resized) == (IMAGENET_MEAN, IMAGENET_STD)
    x, _ = next(iterate_batches(resized, stats=((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))))
    expected = (torch.from_numpy(resized.images[0, 0, 0].astype(np.float32)) / 255 - 0.5) / 0.25
    torch.testing.assert_close(x[0, :, 0, 0], expected)


def _error_line(code, captured):
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcompile: error: ") and "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--normalize", "0.5,0.5"], "--normalize '0.5,0.5': expected cifar, imagenet or six"),
        (["--normalize", "1,1,1,0,1,1"], "standard deviations (the last three numbers) must be positive"),
    ],
)
def test_cli_bad_normalize_is_one_line(args, fragment, tmp_path, capsys):
    root = image_folder(tmp_path / "imgs")
    code = main([R20, "--data", str(root), *args, "--out", str(tmp_path / "out"), "--quiet"])
    assert fragment in _error_line(code, capsys.readouterr())


def test_cli_normalize_needs_data(tmp_path, capsys):
    code = main([R20, "--normalize", "imagenet", "--out", str(tmp_path / "out"), "--quiet"])
    assert _error_line(code, capsys.readouterr()).endswith("--normalize applies to --data")


def test_cli_data_needs_an_image_shaped_example_input(tmp_path, capsys):
    model = tmp_path / "flat.py"
    model.write_text("import torch\n\ndef build_model():\n    return torch.nn.Linear(4, 2)\n\n"
                     "def example_input():\n    return torch.randn(1, 4)\n")
    code = main([str(model), "--data", str(image_folder(tmp_path / "imgs")), "--out", str(tmp_path / "out")])
    assert "--data needs one (N, 3, H, W) example input to size the images; example_input() gives (1, 4)" in \
        _error_line(code, capsys.readouterr())


def test_cli_resizes_other_sized_data_to_the_model(tmp_path, capsys):
    root = image_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    code = main([R20, "--recipe", "int8", "--data", str(root), "--backend", "none", "--verify-size", "2",
                 "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"]["n"] == 2 and report["accuracy"]["calibration_images"] == 4


def image_archive(root: Path) -> Path:
    """The image folder as a CIFAR-style archive: ``imgs/<split>/<class>/<image>`` in a .tar.gz."""
    folder = image_folder(root / "imgs", 32, 32)
    archive = root / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="imgs")
    return archive


def rewrite_npz(path: Path, change) -> None:
    """Rewrite an entry's arrays (header member included, unchanged) after ``change`` edits them in place."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def older_version(path: Path) -> None:
    """A well-formed entry, hash and all, from the previous format version."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != qcache.HEADER}
    qcache.store_arrays(path, data_module.CACHE_KIND, data_module.CACHE_VERSION - 1, arrays)


TAMPER = {
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    "garbage": lambda f: f.write_bytes(np.random.default_rng(0).bytes(5000)),
    "empty": lambda f: f.write_bytes(b""),
    "all-zero images": lambda f: rewrite_npz(f, lambda a: a["images"].fill(0)),
    "relabelled": lambda f: rewrite_npz(f, lambda a: a["labels"].fill(0)),
    "no header (written before headers)": lambda f: rewrite_npz(f, lambda a: a.pop(qcache.HEADER)),
    "older format version": older_version,
}


@pytest.mark.parametrize("source", ["folder", "archive"])
@pytest.mark.parametrize("tamper", list(TAMPER))
def test_an_unusable_cache_entry_is_decoded_again_with_a_warning(source, tamper, tmp_path, cache):
    src = image_archive(tmp_path) if source == "archive" else image_folder(tmp_path / "imgs", 32, 32)
    fresh = load_split(src, "test", (32, 32))
    (entry,) = cache.glob("*-test.npz")
    TAMPER[tamper](entry)
    with pytest.warns(qcache.CacheWarning) as record:
        again = load_split(src, "test", (32, 32))
    (w,) = record
    assert str(entry) in str(w.message)
    assert warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line).count("\n") == 1
    for got in (again, load_split(src, "test", (32, 32))):  # the second read is of the rewritten entry
        np.testing.assert_array_equal(got.images, fresh.images)
        np.testing.assert_array_equal(got.labels, fresh.labels)
        assert got.classes == fresh.classes and got.source_size == fresh.source_size


def test_a_sound_cache_entry_is_read_without_decoding(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "imgs")
    fresh = load_split(root, "train", (32, 32))

    def must_not_decode(*args):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(data_module, "_decode", must_not_decode)
    with warnings.catch_warnings():
        warnings.simplefilter("error", qcache.CacheWarning)
        np.testing.assert_array_equal(load_split(root, "train", (32, 32)).images, fresh.images)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8)),  # same bytes, another shape
        (np.zeros(4, np.uint8), np.zeros(1, np.int32)),  # same bytes, another dtype
        (np.asarray(("cat", "dog")), np.asarray(("dog", "cat"))),
    ],
)
def test_the_content_hash_covers_shape_dtype_and_bytes(a, b):
    assert qcache.digest_arrays({"x": a}) != qcache.digest_arrays({"x": b})
    assert qcache.digest_arrays({"x": a}) == qcache.digest_arrays({"x": a.copy()})


def tiny_model_file(tmp_path: Path) -> str:
    model = tmp_path / "tiny.py"
    model.write_text("import torch\n\ndef build_model():\n    return torch.nn.Conv2d(3, 2, 3)\n\n"
                     "def example_input():\n    return torch.randn(1, 3, 8, 8)\n")
    return str(model)


def flat_folder(root: Path) -> Path:
    """``<class>/<image>`` with no splits: what used to be calibrated and evaluated on the same images."""
    for split_dir in image_folder(root).iterdir():
        for cls in split_dir.iterdir():
            cls.rename(root / f"{split_dir.name}-{cls.name}")
        split_dir.rmdir()
    return root


def train_only(root: Path) -> Path:
    shutil.rmtree(image_folder(root) / "test")
    return root


def zip_file(root: Path) -> Path:
    root.mkdir()
    with zipfile.ZipFile(root / "data.zip", "w") as z:
        z.writestr("train/cat/0.png", b"x")
    return root / "data.zip"


def corrupt_image(root: Path) -> Path:
    image_folder(root)
    (root / "train" / "cat" / "0.png").write_bytes(b"not a png")
    return root


def truncated_archive(root: Path) -> Path:
    archive = image_archive(root)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    return archive


def classes_differ(root: Path) -> Path:
    """A class in test/ that train/ lacks: every label after it would shift between the splits."""
    image_folder(root)
    (root / "test" / "fox").mkdir()
    shutil.copy(root / "test" / "cat" / "0.jpg", root / "test" / "fox" / "0.jpg")
    return root


def text_named_tar(root: Path) -> Path:
    root.mkdir()
    (root / "x.tar.gz").write_text("hello\n")
    return root / "x.tar.gz"


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (text_named_tar, "x.tar.gz is not a tar archive; expected a tar archive (.tar, .tar.gz"),
        (zip_file, "data.zip is a zip archive; expected a tar archive"),
        (truncated_archive, "cannot read archive"),
        (flat_folder, "has no train/ and no test/ subdirectory; expected train/<class>/<image> and "
                      "test/<class>/<image> (or val/<class>/<image>) inside it"),
        (train_only, "has no test/ subdirectory; expected train/<class>/<image> and test/<class>/<image>"),
        (corrupt_image, "cannot decode image"),
        (classes_differ, "the train and test splits have different classes (test only: fox); labels are the "
                         "classes' positions in sorted order, so they would name different classes"),
    ],
)
def test_cli_unusable_data_is_one_line(make, fragment, tmp_path, capsys):
    data = str(make(tmp_path / "d"))
    code = main([tiny_model_file(tmp_path), "--data", data, "--out", str(tmp_path / "out"), "--quiet"])
    assert fragment in _error_line(code, capsys.readouterr())


def test_an_unwritable_cache_warns_in_one_line_and_the_data_still_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("QCOMPILE_CACHE", str(blocker / "cache"))  # cannot be created, even as root
    root = image_folder(tmp_path / "imgs")
    with pytest.warns(qcache.CacheWarning, match="cannot write the cache entry") as record:
        data = load_split(root, "train", (32, 32))
    assert len(data) > 0 and len(record) == 1 and "\n" not in str(record[0].message)


def test_normalized_batches_are_contiguous_nchw():
    """A model's ``x.view(-1, n)`` after its convs needs contiguous tensors: a permuted NHWC view would make
    PyTorch's convs return channels-last tensors and that view fail."""
    from qcompile.data import normalize

    x = normalize(np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    assert x.shape == (4, 3, 8, 8) and x.is_contiguous()
    conv = torch.nn.Conv2d(3, 5, 3)
    assert conv(x).view(4, -1).shape == (4, 5 * 6 * 6)


@pytest.mark.parametrize("folder", ["val", "valid", "validation"])
def test_a_val_folder_is_the_test_split_where_there_is_no_test_folder(folder, tmp_path, cache):
    """ImageNet's layout (train/, val/) and fastai's (valid/), as a directory and as an archive."""
    root = image_folder(tmp_path / "d")
    (root / "test").rename(root / folder)
    test = load_split(root, "test")
    assert (len(test), test.classes) == (2, ("cat", "dog"))
    with tarfile.open(tmp_path / "d.tar", "w") as tar:
        tar.add(root, arcname="d")
    assert np.array_equal(load_split(tmp_path / "d.tar", "test").labels, test.labels)


def test_a_folders_subset_decodes_only_the_images_drawn(tmp_path, cache, monkeypatch):
    """512 calibration images of ImageNet's 1.28 million decode 512 files: the same draw as ImageSet.subset."""
    import qcompile.data as data

    root = image_folder(tmp_path / "d")
    for i in range(2, 6):  # 6 training images per class
        for cls in ("cat", "dog"):
            shutil.copy(root / "train" / cls / "0.png", root / "train" / cls / f"{i}.png")
    whole = load_split(root, "train")
    decoded = []
    real_decode = data._decode
    monkeypatch.setattr(data, "_decode", lambda raw, where: decoded.append(where) or real_decode(raw, where))
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "another-cache"))
    drawn = load_split(root, "train", limit=5, seed=3)
    expected = whole.subset(5, seed=3)
    assert len(decoded) == 5 and np.array_equal(drawn.labels, expected.labels)
    assert np.array_equal(np.asarray(drawn.images), np.asarray(expected.images))
    assert load_split(root, "train", limit=5, seed=3).labels.tolist() == expected.labels.tolist()
    assert len(decoded) == 5  # cached
    assert len(load_split(root, "train", limit=0)) == 0


def test_splits_of_different_classes_name_a_few_of_them(tmp_path):
    """A validation subset of 3 of 9 classes: one line naming five of the six missing, and how many more."""
    root = tmp_path / "d"
    for split, classes in (("train", range(9)), ("test", range(3))):
        for c in classes:
            (root / split / f"n{c:08d}").mkdir(parents=True)
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / split / f"n{c:08d}" / "0.png")
    with pytest.raises(DataError) as caught:
        load_train_test(root)
    assert ("the train and test splits have different classes (train only: n00000003, n00000004, n00000005, "
            "n00000006, n00000007 and 1 more); labels are") in str(caught.value)
