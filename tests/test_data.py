"""Data loading and validation: the embedded digits, image folders with bad items, odd modes, errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline
from PIL import Image

from ddpm_hub.cli import main as cli
from ddpm_hub.config import DataConfig
from ddpm_hub.data import (
    DataError,
    ImageDataset,
    load_digits_dataset,
    load_splits,
    normalize_uint8,
    random_flip,
    to_model_image,
    validate_images,
)


def test_digits_split_is_fixed_and_documented():
    dd = load_digits_dataset()
    assert len(dd["train"]) == 1497 and len(dd["test"]) == 300
    image = dd["train"][0]["image"]
    assert image.mode == "L" and image.size == (8, 8)
    from sklearn.datasets import load_digits

    raw = load_digits().images
    np.testing.assert_array_equal(np.asarray(dd["test"][1]["image"]), np.round(raw[6] * 255 / 16).astype(np.uint8))
    assert max(np.asarray(dd["train"][i]["image"]).max() for i in range(20)) == 255


def _folder(tmp_path, files: dict[str, bytes | Image.Image]):
    root = tmp_path / "imgs"
    root.mkdir()
    for name, content in files.items():
        if isinstance(content, Image.Image):
            content.save(root / name)
        else:
            (root / name).write_bytes(content)
    return root


def _rgb(size=(8, 8), value=100):
    return Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8))


@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("zero.png", b"", "zero.png"),
        ("notes.png", b"hello, not an image", "notes.png"),
        ("truncated.png", None, "truncated.png"),
    ],
)
def test_bad_files_are_named(tmp_path, name, content, needle):
    if content is None:
        good = tmp_path / "tmp.png"
        _rgb((32, 32)).save(good)
        content = good.read_bytes()[:60]
    root = _folder(tmp_path, {"ok.png": _rgb(), name: content})
    train, held = load_splits(DataConfig(train_data_dir=str(root)))
    assert held is None and len(train) == 2
    ds = ImageDataset(train, "image", 8, 3)
    with pytest.raises(DataError, match=needle) as exc:
        validate_images(ds, progress=False)
    assert "--skip_bad_images" in str(exc.value)
    images, good, skipped = validate_images(ds, skip_bad=True, progress=False)
    assert images.shape == (1, 3, 8, 8) and skipped == 1 and len(good) == 1


def test_all_bad_or_empty_is_an_error(tmp_path):
    root = _folder(tmp_path, {"a.png": b"x", "b.jpg": b"y"})
    train, _ = load_splits(DataConfig(train_data_dir=str(root)))
    with pytest.raises(DataError, match="all 2 images .* unreadable"):
        validate_images(ImageDataset(train, "image", 8, 3), skip_bad=True, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("files without an image extension are not images to imagefolder")
    with pytest.raises(DataError, match="contains no image files"):
        load_splits(DataConfig(train_data_dir=str(empty)))
    with pytest.raises(DataError, match="not a directory"):
        load_splits(DataConfig(train_data_dir=str(tmp_path / "missing")))


@pytest.mark.parametrize("mode", ["RGBA", "P", "CMYK", "I;16", "L", "LA", "1", "I", "F"])
@pytest.mark.parametrize("channels", [1, 3])
def test_odd_modes_are_converted(mode, channels):
    base = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).convert("RGB")
    if mode == "I;16":
        image = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    elif mode in ("I", "F"):
        image = base.convert("L").convert(mode)
    else:
        image = base.convert(mode)
    arr = to_model_image(image, 8, channels)
    assert arr.shape == (channels, 8, 8) and arr.dtype == np.uint8
    if mode in ("L", "RGBA", "I;16", "I", "F", "P", "CMYK", "LA"):
        assert arr.max() > 200 and arr.min() < 10  # the dynamic range survived


def test_rgba_composited_on_black():
    rgba = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    assert to_model_image(rgba, 8, 3).max() == 0


def test_mixed_sizes_resize_and_center_crop():
    wide = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (16, 1)))  # 32 wide x 16 high
    arr = to_model_image(wide, 8, 1)
    assert arr.shape == (1, 8, 8)
    # short side -> 8, then the centre 8 columns of the 16-wide resized image
    assert 60 < arr[0, 0].mean() < 200
    assert to_model_image(_rgb((5, 50)), 16, 3).shape == (3, 16, 16)


def test_missing_image_column_and_split():
    with pytest.raises(DataError, match="--image_column 'img' not found"):
        load_splits(DataConfig(dataset_name="digits", image_column="img"))
    with pytest.raises(DataError, match="--split 'validation' not in"):
        load_splits(DataConfig(dataset_name="digits", split="validation"))


def test_normalize_and_flip():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert normalize_uint8(x).tolist() == [[[[-1.0, 1.0]]]]
    batch = torch.arange(2 * 1 * 1 * 3, dtype=torch.float32).reshape(2, 1, 1, 3)
    flipped = random_flip(batch, torch.Generator().manual_seed(0))
    for a, b in zip(batch, flipped, strict=True):
        assert torch.equal(a, b) or torch.equal(a.flip(-1), b)
    again = random_flip(batch, torch.Generator().manual_seed(0))
    assert torch.equal(flipped, again)


def test_dataset_name_goes_through_datasets_load_dataset(tmp_path):
    """--dataset_name takes the real `datasets.load_dataset` path; here with a local parquet repo layout."""
    dd = load_digits_dataset()
    root = tmp_path / "hub-layout" / "data"
    root.mkdir(parents=True)
    dd["train"].select(range(40)).to_parquet(str(root / "train-00000-of-00001.parquet"))
    dd["test"].select(range(10)).to_parquet(str(root / "test-00000-of-00001.parquet"))
    train, held = load_splits(DataConfig(dataset_name=str(tmp_path / "hub-layout"), cache_dir=str(tmp_path / "cache")))
    assert len(train) == 40 and len(held) == 10
    images, good, skipped = validate_images(ImageDataset(train, "image", 8, 1), progress=False)
    assert images.shape == (40, 1, 8, 8) and skipped == 0
    np.testing.assert_array_equal(images[0, 0].numpy(), np.asarray(dd["train"][0]["image"]))
    with pytest.raises(DataError, match="could not load --dataset_name"):
        load_splits(DataConfig(dataset_name=str(tmp_path / "nothing-here"), cache_dir=str(tmp_path / "cache")))


def _gray(value=100):
    return Image.fromarray(np.full((8, 8), value, dtype=np.uint8))


def test_image_folder_follows_imagefolder_splits_and_metadata(tmp_path):
    """train/ and test/ subfolders are splits (the held-out one is found by name), metadata.jsonl is allowed,
    and non-image files are ignored, exactly as `datasets.load_dataset("imagefolder")` does."""
    root = tmp_path / "folder"
    for split, n in (("train", 5), ("test", 2)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            _gray(i * 10).save(root / split / f"{i}.png")
        lines = [f'{{"file_name": "{i}.png", "caption": "digit {i}"}}' for i in range(n)]
        (root / split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (root / "train" / "README.txt").write_text("not an image")
    train, held = load_splits(DataConfig(train_data_dir=str(root), cache_dir=str(tmp_path / "cache")))
    assert len(train) == 5 and len(held) == 2 and "caption" in train.column_names
    validation = tmp_path / "val"
    validation.mkdir()
    for i in range(3):
        _gray().save(validation / f"v{i}.png")
    _, held = load_splits(DataConfig(train_data_dir=str(root), validation_data_dir=str(validation)))
    assert len(held) == 3
    with pytest.raises(DataError, match="--eval_split 'holdout' not in"):
        load_splits(DataConfig(train_data_dir=str(root), eval_split="holdout"))
    flat = _folder(tmp_path, {"a.png": _rgb(), "b.png": _rgb()})
    train, held = load_splits(DataConfig(train_data_dir=str(flat)))
    assert len(train) == 2 and held is None


def test_channels_come_from_the_data(tmp_path):
    from ddpm_hub.data import detect_channels

    gray = _folder(tmp_path, {"a.png": _gray(), "b.png": _gray()})
    train, _ = load_splits(DataConfig(train_data_dir=str(gray)))
    assert detect_channels(train, "image") == 1
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    _rgb().save(rgb / "a.png")
    train, _ = load_splits(DataConfig(train_data_dir=str(rgb)))
    assert detect_channels(train, "image") == 3
    train, _ = load_splits(DataConfig(dataset_name="digits"))
    assert detect_channels(train, "image") == 1


def _upright_jpeg_and_png(tmp_path):
    """A 6-wide, 4-high RGB image saved as PNG and JPEG with EXIF Orientation 6 (stored sideways, shown turned
    90 degrees clockwise), as a camera writes a portrait photo; (folder, pixels as stored)."""
    root = tmp_path / "exif"
    root.mkdir()
    stored = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(stored).save(root / "a.png", exif=exif.tobytes())
    Image.fromarray(stored).save(root / "b.jpg", exif=exif.tobytes(), quality=95)
    return root, stored


def test_exif_orientation_is_applied_as_datasets_does(tmp_path):
    import datasets
    from PIL import ImageOps

    from ddpm_hub.data import decode_image, detect_channels

    root, stored = _upright_jpeg_and_png(tmp_path)
    upright = np.rot90(stored, k=-1)  # Orientation 6: turn 90 degrees clockwise, 4 wide x 6 high
    jpeg = tmp_path / "exif" / "b.jpg"
    jpeg_upright = np.rot90(np.asarray(Image.open(jpeg)), k=-1)  # the JPEG's own (lossy) pixels, turned
    train, _ = load_splits(DataConfig(train_data_dir=str(root)))
    paths = [train[i]["image"]["path"] for i in range(2)]
    for path in paths:
        expected = upright if path.endswith(".png") else jpeg_upright
        feature = np.asarray(datasets.Image().decode_example({"path": path, "bytes": None}))
        np.testing.assert_array_equal(feature, expected)  # datasets' own Image feature turns it so
        data = Path(path).read_bytes()
        for value in (path, {"path": path, "bytes": None}, {"path": None, "bytes": data}, Image.open(path)):
            np.testing.assert_array_equal(np.asarray(decode_image(value, "row")), expected)
        already = ImageOps.exif_transpose(Image.open(path))  # an image turned before (datasets decoded it)
        np.testing.assert_array_equal(np.asarray(decode_image(already, "row")), expected)
    images, good, skipped = validate_images(ImageDataset(train, "image", 4, 3), progress=False)
    png = paths.index(str(root / "a.png"))
    np.testing.assert_array_equal(images[png].numpy(), to_model_image(Image.fromarray(upright), 4, 3))
    assert detect_channels(train, "image") == 3


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG of only IHDR and IEND chunks: its header claims `width` x `height` RGB pixels, it holds none."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_decompression_bomb_is_named_and_skipped(tmp_path):
    from ddpm_hub.data import decode_image, detect_channels

    bomb = _png_header_only(14000, 14000)  # 196M pixels: over twice PIL.Image.MAX_IMAGE_PIXELS
    root = _folder(tmp_path, {"ok.png": _rgb(), "bomb.png": bomb})
    train, _ = load_splits(DataConfig(train_data_dir=str(root)))
    assert detect_channels(train, "image") == 3  # the bomb's header is not counted, nor raised
    ds = ImageDataset(train, "image", 8, 3)
    with pytest.raises(DataError, match=r"bomb\.png.*decompression bomb.*MAX_IMAGE_PIXELS") as exc:
        validate_images(ds, progress=False)
    assert "--skip_bad_images" in str(exc.value) and "\n" not in str(exc.value)
    images, good, skipped = validate_images(ds, skip_bad=True, progress=False)
    assert images.shape == (1, 3, 8, 8) and skipped == 1 and len(good) == 1
    with pytest.raises(DataError, match="row 3: .*decompression bomb"):
        decode_image({"path": None, "bytes": bomb}, "row 3")


def test_non_utf8_file_name_is_named(tmp_path):
    import os

    root = tmp_path / "classes"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            _rgb(value=i).save(root / name / f"{i}.png")
    try:
        bad = os.path.join(os.fsencode(root / "cat"), b"bad\xff.png")
        _rgb().save(bad, format="PNG")
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses file names that are not UTF-8")
    with open(os.path.join(os.fsencode(root / "dog"), b"notes\xff.txt"), "w") as f:
        f.write("not an image: ignored, as by datasets' imagefolder")
    with pytest.raises(DataError, match=r"cat/bad\\xff\.png.*not valid UTF-8.*rename") as exc:
        load_splits(DataConfig(train_data_dir=str(root), cache_dir=str(tmp_path / "cache")))
    assert "\n" not in str(exc.value) and str(exc.value).isprintable()
    os.remove(bad)
    train, _ = load_splits(DataConfig(train_data_dir=str(root), cache_dir=str(tmp_path / "cache")))
    assert len(train) == 4
    renamed = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"folder\xff"))  # the folder itself, named so
    os.rename(root, renamed)
    with pytest.raises(DataError, match=r"folder\\xff: the folder's path is not valid UTF-8"):
        load_splits(DataConfig(train_data_dir=renamed, cache_dir=str(tmp_path / "cache")))


# -- datasets and files as they are ------------------------------------------------------------------------------------


def test_an_image_column_of_labels_is_a_one_line_error():
    needle = (
        r"--image_column 'label' of the train split holds ClassLabel values, not images; image columns: \['image'\]"
    )
    with pytest.raises(DataError, match=needle):
        load_splits(DataConfig(dataset_name="digits", image_column="label"))


def test_saved_datasets_and_single_data_files_load_as_dataset_name(tmp_path):
    dd = load_digits_dataset()
    small = type(dd)({"train": dd["train"].select(range(40)), "test": dd["test"].select(range(10))})
    small.save_to_disk(str(tmp_path / "saved_dict"))
    small["train"].save_to_disk(str(tmp_path / "saved_one"))
    small["train"].to_parquet(str(tmp_path / "train.parquet"))
    cache = str(tmp_path / "cache")
    train, held = load_splits(DataConfig(dataset_name=str(tmp_path / "saved_dict"), cache_dir=cache))
    assert (len(train), len(held)) == (40, 10)
    for source in ("saved_one", "train.parquet"):
        train, held = load_splits(DataConfig(dataset_name=str(tmp_path / source), cache_dir=cache))
        assert len(train) == 40 and held is None, source
        stored = Image.open(io.BytesIO(train[3]["image"]["bytes"]))
        np.testing.assert_array_equal(np.asarray(stored), np.asarray(dd["train"][3]["image"]))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt: a .txt file is not a data file"):
        load_splits(DataConfig(dataset_name=str(tmp_path / "notes.txt")))
    out = tmp_path / "eval.json"  # evaluate takes the saved folder as --dataset, too
    tiny_pipeline(T=20).save_pretrained(tmp_path / "model")
    assert cli(["evaluate", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "saved_dict"),
                "--num_images", "3", "--bpd_estimate", "--out", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["num_images"] == 3


def test_sixteen_bit_images_are_scaled_by_their_bit_depth(tmp_path):
    for value in (0, 257, 32896, 65535):  # a constant image keeps its brightness: x * 255 / 65535
        image = Image.fromarray(np.full((8, 8), value, dtype=np.uint16))
        assert image.mode == "I;16"
        assert (to_model_image(image, 8, 1) == round(value * 255 / 65535)).all(), value
    ramp = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    np.testing.assert_array_equal(to_model_image(Image.open(tmp_path / "ramp.png"), 8, 1)[0],
                                  np.round(ramp * (255 / 65535)).astype(np.uint8))  # fmt: skip


def test_a_split_of_which_no_image_can_be_read_says_how_many_and_names_one(tmp_path):
    """Every file of the split unreadable (say, text saved as .png): one line saying none of the N can be read, naming
    the first, before anything else fails on them."""
    import datasets

    from ddpm_hub.data import detect_channels

    paths = []
    for i in range(3):
        (tmp_path / f"{i}.png").write_text("not an image")
        paths.append(str(tmp_path / f"{i}.png"))
    with pytest.raises(DataError, match=r"none of the 3 image\(s\) of the train split can be read as an image \(the "
                       r"first: .*0\.png\)"):  # fmt: skip
        detect_channels(datasets.Dataset.from_dict({"image": paths}), "image")
