"""--data images are resized to the model's input (torchvision's evaluation transform) and normalised as asked;
CIFAR-sized data at a 32x32 model is exactly what it was before either existed."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qcompile.cli import build_parser, main, resolve_data
from qcompile.data import (
    CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, default_normalization, iterate_batches, load_split,
    parse_normalization,
)
from qcompile.errors import DataError
from qcompile.model_file import load_model_file

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


def test_cache_is_keyed_by_the_target_size(tmp_path, cache):
    root = image_folder(tmp_path / "imgs")
    assert load_split(root, "train", (32, 32)).images.shape[1:3] == (32, 32)
    assert load_split(root, "train", (24, 24)).images.shape[1:3] == (24, 24)
    assert load_split(root, "train").images.shape[1:3] == (40, 50)
    assert sorted(p.name.split("-", 2)[2] for p in cache.iterdir()) == ["train-24x24.npz", "train-32x32.npz",
                                                                       "train.npz"]
    again = load_split(root, "train", (32, 32))
    assert again.images.shape[1:3] == (32, 32) and again.source_size == (40, 50)


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
