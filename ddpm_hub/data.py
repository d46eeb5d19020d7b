"""Training data as `datasets.Dataset`s: the embedded digits, Hub datasets and image folders, with checks.

Images are validated before training (a run never trains silently on garbage): a corrupt, unreadable or
non-image item raises a `DataError` naming the file or row, or, when asked, is skipped and counted.
Transforms are deterministic (resize, centre crop, channels, [-1, 1]); random flips are applied in the training
step from its seeded generator so that a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from .config import DataConfig

logger = logging.getLogger(__name__)

DIGITS_NAME = "digits"
# Fixed split of the 1,797 UCI optical digits (CC BY 4.0, shipped by scikit-learn): every 6th image
# (index % 6 == 0, 300 images) is held out as `test`; the other 1,497 are `train`.
DIGITS_TEST_EVERY = 6


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class DataError(ValueError):
    """A data set or image that cannot be used for training, with the item named."""


def load_digits_dataset():
    """The embedded default: UCI optical digits as a `datasets.DatasetDict` with `train`/`test` splits.

    Each row has `image` (an 8x8 PIL grayscale image, 0..16 intensities scaled to 0..255) and `label`.
    """
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    is_test = np.arange(len(pixels)) % DIGITS_TEST_EVERY == 0
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})

    def split(mask: np.ndarray, name: str) -> datasets.Dataset:
        rows = {
            "image": [Image.fromarray(p, mode="L") for p in pixels[mask]],
            "label": [int(v) for v in digits.target[mask]],
        }
        return datasets.Dataset.from_dict(rows, features=features, split=name)  # the split is named, as a Hub one

    return datasets.DatasetDict({"train": split(~is_test, "train"), "test": split(is_test, "test")})


def _is_utf8(name: str) -> bool:
    """False for a name Python decoded from non-UTF-8 bytes (they become lone surrogates, surrogateescape)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(path: Path) -> str:
    """A path for a message: bytes that are not UTF-8 shown as \\xNN escapes instead of unprintable surrogates."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _load_image_folder(root: str, argument: str, cache_dir: str | None):
    """An image folder through datasets' `imagefolder` builder: `train/`, `test/`, `validation/` subfolders become
    splits, `metadata.jsonl` adds columns, and files without an image extension are ignored, as everywhere in the
    datasets ecosystem."""
    import datasets
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    path = Path(root)
    if not path.is_dir():
        raise DataError(f"--{argument} {path} is not a directory")
    extensions = {e.lower() for e in ImageFolder.EXTENSIONS}
    images = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions]
    if not images:
        raise DataError(f"--{argument} {path} contains no image files: put the training images there")
    # datasets stores paths as UTF-8 and fails on any other name with "An error occurred while generating the
    # dataset", naming no file; name them here (they cannot be skipped: the builder lists the folder itself)
    if not _is_utf8(str(path.absolute())):  # datasets stores absolute paths
        raise DataError(f"--{argument} {_printable(path.absolute())}: the folder's path is not valid UTF-8, which "
                        "datasets cannot store: rename the folder (or the one it is in)")  # fmt: skip
    undecodable = [p for p in images if not _is_utf8(str(p))]
    if undecodable:
        names = ", ".join(_printable(p.relative_to(path)) for p in undecodable[:3])
        raise DataError(
            f"--{argument} {_printable(path)}: {len(undecodable)} image file name(s), {names}"
            f"{', ...' if len(undecodable) > 3 else ''}, are not valid UTF-8, which datasets cannot store: rename them"
        )
    # datasets labels images by their subfolder only when there are two or more; one class subfolder (a held-out
    # folder of one class, say) keeps its label too
    parents = {p.parent for p in images}
    names = {p.name.lower() for p in parents}
    single_class = len(names) == 1 and path not in parents and not names & set(SPLIT_FOLDER_NAMES)
    try:
        return datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir,
                                     **({"drop_labels": False} if single_class else {}))  # fmt: skip
    except Exception as exc:
        raise DataError(f"--{argument} {path}: datasets could not load it as an imagefolder ({exc}); "
            "note that a metadata.jsonl must list every image of its folder") from exc


# Folder names that datasets reads as splits, not classes.
SPLIT_FOLDER_NAMES = ("train", "training", "test", "testing", "eval", "evaluation", "valid", "validation", "val", "dev")
# Single data files that datasets' packaged builders read (the file's extension names the builder).
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def is_saved_dataset(path: str | Path) -> bool:
    """True for a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    path = Path(path)
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_dict.json", "state.json"))


def _load_local_dataset(path: Path, data: DataConfig):
    """A local `--dataset_name`: a `save_to_disk` folder (datasets.load_from_disk), a single data file (its
    packaged builder) or a folder of data files (datasets.load_dataset); a lone Dataset becomes split `train`."""
    import datasets

    try:
        if is_saved_dataset(path):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file():
            builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(
                    f"--dataset_name {path}: a {path.suffix or 'suffix-less'} file is not a data file datasets reads; "
                    f"give a {', '.join(DATA_FILE_BUILDERS)} file, a save_to_disk folder, or --train_data_dir"
                )
            loaded = datasets.load_dataset(builder, data_files=str(path), cache_dir=data.cache_dir)
        else:
            loaded = datasets.load_dataset(str(path), data.dataset_config_name, cache_dir=data.cache_dir)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"--dataset_name {path}: datasets could not load this local path ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}); for a folder of images use --train_data_dir"
        ) from exc
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})


def load_dataset_dict(data: DataConfig):
    """The `datasets.DatasetDict` that `data` names: an image folder, the embedded digits, or a Hub dataset."""
    import datasets

    if data.train_data_dir is not None:
        return _load_image_folder(data.train_data_dir, "train_data_dir", data.cache_dir)
    if data.dataset_name in (None, DIGITS_NAME):
        return load_digits_dataset()
    if Path(data.dataset_name).exists():
        return _load_local_dataset(Path(data.dataset_name), data)
    try:
        return datasets.load_dataset(data.dataset_name, data.dataset_config_name, cache_dir=data.cache_dir)
    except Exception as exc:  # datasets raises many types; name the input and what to do
        raise DataError(
            f"could not load --dataset_name {data.dataset_name!r} (config {data.dataset_config_name!r}): {exc}. "
            "Check the id, or use --train_data_dir for a local folder of images."
        ) from exc


def _held_out_split(dd, data: DataConfig):
    """The held-out split: `--validation_data_dir`, the explicit `--eval_split`, or `test`/`validation`."""
    if data.validation_data_dir is not None:
        folder = _load_image_folder(data.validation_data_dir, "validation_data_dir", data.cache_dir)
        name = data.eval_split if data.eval_split in folder else next(iter(folder))
        return folder[name]
    if data.eval_split is not None:
        if data.eval_split not in dd:
            raise DataError(f"--eval_split {data.eval_split!r} not in the dataset; available splits: {sorted(dd)}")
        return dd[data.eval_split]
    for name in ("test", "validation"):
        if name in dd and name != data.split:
            return dd[name]
    return None


def _check_image_column(ds, column: str, name: str) -> None:
    """The column holds images (or image paths/bytes), not labels or numbers: DataError naming the image columns."""
    import datasets

    feature = ds.features[column]
    if isinstance(feature, datasets.Image):
        return
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "binary", "large_binary"):
        return  # paths or encoded bytes, cast to datasets.Image below
    images = [k for k, v in ds.features.items() if isinstance(v, datasets.Image)]
    kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
    raise DataError(
        f"--image_column {column!r} of the {name} split holds {kind} values, not images; "
        + (f"image columns: {images}" if images else f"columns: {ds.column_names}")
    )


def load_splits(data: DataConfig):
    """(train, held-out or None) `datasets.Dataset`s for the data options; images left undecoded for validation."""
    import datasets

    dd = load_dataset_dict(data)
    if data.split not in dd:
        raise DataError(f"--split {data.split!r} not in the dataset; available splits: {sorted(dd)}")
    train, held_out = dd[data.split], _held_out_split(dd, data)
    for name, ds in (("train", train), ("held-out", held_out)):
        if ds is not None and data.image_column not in ds.column_names:
            raise DataError(
                f"--image_column {data.image_column!r} not found in the {name} split; columns: {ds.column_names}"
            )
        if ds is not None:
            _check_image_column(ds, data.image_column, name)
    train = train.cast_column(data.image_column, datasets.Image(decode=False))
    if held_out is not None:
        held_out = held_out.cast_column(data.image_column, datasets.Image(decode=False))
    return train, held_out


LABEL_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "string", "large_string")


def _check_label_column(ds, column: str, name: str) -> None:
    """`column` exists in the split and holds class labels (a `ClassLabel`, integers or strings): DataError naming
    the column, what it holds and the columns that could be labels."""
    import datasets

    if column not in ds.column_names:
        hint = (" (an image folder has a `label` column when its images sit in class subfolders, FOLDER/CLASS/"
                "IMAGE, not at its top level)" if column == "label" else "")  # fmt: skip
        raise DataError(
            f"--class_column {column!r} not found in the {name} split{hint}; columns: {ds.column_names}"
        )
    feature = ds.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return
    if isinstance(feature, datasets.Value) and feature.dtype in LABEL_DTYPES:
        return
    kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
    candidates = [k for k, v in ds.features.items() if isinstance(v, datasets.ClassLabel)
                  or (isinstance(v, datasets.Value) and v.dtype in LABEL_DTYPES)]  # fmt: skip
    raise DataError(
        f"--class_column {column!r} of the {name} split holds {kind} values, not class labels (a ClassLabel, "
        f"integers or strings); " + (f"label columns: {candidates}" if candidates else f"columns: {ds.column_names}")
    )


def _label_keys(ds, column: str) -> list[str | None]:
    """Each row's class as a name: a `ClassLabel` id becomes its name (datasets' -1, no label, becomes None);
    integers and strings become strings. Splits are matched by these names, never by their own ids."""
    import datasets

    feature = ds.features[column]
    values = ds[column]
    if isinstance(feature, datasets.ClassLabel):
        names = feature.names
        return [names[v] if isinstance(v, int) and 0 <= v < len(names) else None for v in values]
    return [None if v is None else str(v) for v in values]


def class_names(ds, column: str, name: str = "train") -> list[str]:
    """The class names of a labelled split, a label's id being its index here: the `ClassLabel` names (in their
    order) that label at least one image of the split, else its distinct values in sorted order. DataError for a
    missing column or one that holds no class labels."""
    import datasets

    _check_label_column(ds, column, name)
    feature = ds.features[column]
    present = {k for k in _label_keys(ds, column) if k is not None}
    if isinstance(feature, datasets.ClassLabel):
        names = [n for n in feature.names if n in present]
        unused = [n for n in feature.names if n not in present]
        if unused:  # an imagefolder's ClassLabel is the union of the subfolders of every split
            logger.warning(
                "--class_column %r: the classes %s have no image in the %s split, so the model does not learn them "
                "(%d classes remain)", column, unused[:20], name, len(names),
            )
    else:
        values = {v for v in ds[column] if v is not None}
        names = [str(v) for v in sorted(values)]
    if len(names) < 2:
        raise DataError(f"--class_column {column!r} of the {name} split has {len(names)} class(es) {names}: a "
                        "class-conditional model needs at least 2; train an unconditional one (no --class_conditional)")
    return names


def encode_labels(
    ds, column: str, names: list[str], name: str = "train", classes: str = "training classes"
) -> torch.Tensor:
    """The class ids (int64 `[N]`, indices into `names`) of a split's `column`, matched by class name (never by
    the split's own `ClassLabel` ids, which differ between splits with different classes); DataError naming the
    first row whose label is missing or not one of `names`."""
    _check_label_column(ds, column, name)
    index = {n: i for i, n in enumerate(names)}
    ids = []
    for row, key in enumerate(_label_keys(ds, column)):
        if key is None:
            raise DataError(f"{name} row {row} has no class label (--class_column {column!r}): label it or remove it")
        if key not in index:
            raise DataError(
                f"{name} row {row} has the class {key!r}, which is not one of the {len(names)} {classes} "
                f"{names[:20]}: the model can only be given classes it learned from the train split"
            )
        ids.append(index[key])
    return torch.tensor(ids, dtype=torch.long)


def image_channels(image: Image.Image) -> int:
    """1 for grayscale modes (L, LA, 1, I, F, I;16), 3 for colour ones: how many channels the data has."""
    return 1 if image.mode in ("L", "LA", "1", "I", "F", "I;16", "I;16B", "I;16L") else 3


def _header_channels(value) -> int | None:
    """The channel count from an image's header only (no pixel decoding), None when it cannot be read."""
    try:
        if isinstance(value, Image.Image):
            return image_channels(value)
        if isinstance(value, dict) and value.get("bytes"):
            with Image.open(io.BytesIO(value["bytes"])) as image:
                return image_channels(image)
        path = value.get("path") if isinstance(value, dict) else value
        with Image.open(path) as image:
            return image_channels(image)
    except Exception:  # unreadable items are reported (or skipped) by the validation pass
        return None


def detect_channels(ds, column: str, name: str = "train") -> int:
    """The channel count of a split from all its images' headers (datasets stores no channel count): the
    majority's, colour on a tie; a mixed split is logged, and every image is converted to that count."""
    counts, unread, first = {1: 0, 3: 0}, 0, None
    for batch in ds.select_columns([column]).iter(batch_size=256):
        for value in batch[column]:
            channels = _header_channels(value)
            if channels is not None:
                counts[channels] += 1
            else:
                unread, first = unread + 1, value if first is None else first
    if not counts[1] and not counts[3]:
        where = first.get("path") if isinstance(first, dict) else first if isinstance(first, str) else None
        example = f" (the first: {_printable(Path(str(where)))})" if where else ""
        raise DataError(f"none of the {unread} image(s) of the {name} split can be read as an image{example}: check "
                        "the files are images (PNG, JPEG, ...) and not damaged")  # fmt: skip
    channels = 1 if counts[1] > counts[3] else 3
    if counts[1] and counts[3]:
        logger.warning(
            "the %s split mixes %d grayscale and %d colour images: converting all to %s (the majority); pass "
            "--channels to choose", name, counts[1], counts[3], "grayscale" if channels == 1 else "RGB",
        )
    return channels


def _exif_upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF Orientation says (a camera stores a portrait photo sideways), exactly as
    datasets' `Image` feature decodes it; the turned image has no Orientation left, so turning is idempotent."""
    if image.getexif().get(ExifTags.Base.Orientation) is None:
        return image
    upright = ImageOps.exif_transpose(image)
    upright.format = image.format  # transposing drops it; to_model_image reads it (16-bit PNGs opened as I)
    return upright


def decode_image(item: dict | Image.Image | str, where: str) -> Image.Image:
    """Decode one undecoded `datasets.Image` value (`{"bytes", "path"}`), a path or an image, turned upright by its
    EXIF Orientation as datasets does; DataError if bad."""
    try:
        if isinstance(item, Image.Image):
            image = item
        elif isinstance(item, str):
            image = Image.open(item)
        elif isinstance(item, dict):
            if item.get("bytes"):
                image = Image.open(io.BytesIO(item["bytes"]))
            elif item.get("path"):
                image = Image.open(item["path"])
            else:
                raise DataError(f"{where}: empty image (no bytes and no path)")
        else:
            raise DataError(f"{where}: not an image value ({type(item).__name__})")
        image.load()
        image = _exif_upright(image)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:  # not an OSError: it would escape as a traceback naming no file
        raise DataError(
            f"{where}: Pillow refuses to decode it as a possible decompression bomb ({exc}); downscale the image "
            "(or, calling the API, raise PIL.Image.MAX_IMAGE_PIXELS)"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{where}: cannot read the image ({type(exc).__name__}: {exc})") from exc
    if image.width == 0 or image.height == 0:
        raise DataError(f"{where}: image has zero size")
    return image


def to_model_image(image: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """PIL image -> uint8 `[C, resolution, resolution]`: mode conversion, resize (short side), centre crop.

    Modes are converted explicitly: RGBA/LA are composited on black, P/CMYK/I;16/I/F are converted to RGB or L.
    16-bit images (I;16, and 16-bit PNGs that older Pillow opens as I) are scaled by their bit depth (x * 255 /
    65535), so every image of a data set keeps its brightness; other 32-bit int and float images, which have no
    stated range, are stretched to 0..255 per image.
    """
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG"):
        arr = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) * (255.0 / 65535.0)
        image = Image.fromarray(np.round(arr).astype(np.uint8), mode="L")
    elif image.mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi == lo else (arr - lo) / (hi - lo) * 255.0
        image = Image.fromarray(np.round(arr).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB" if channels == 3 else "L")
    if image.size != (resolution, resolution):
        scale = resolution / min(image.size)
        new_size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(new_size, Image.Resampling.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    arr = np.array(image, dtype=np.uint8)  # a writable copy
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _row_name(ds_name: str, index: int, value) -> str:
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    return f"{ds_name} row {index}" + (f" ({path})" if path else "")


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and transforms images on the fly (in DataLoader workers) to uint8 `[C, R, R]` tensors, or
    `(image, class id)` pairs when `labels` (int64 `[len(ds)]`, by row) are given.

    `indices` selects the usable rows (after a validation pass that skipped bad ones); a bad image found
    while loading raises a DataError naming the row and file.
    """

    def __init__(self, ds, column: str, resolution: int, channels: int, indices=None, name: str = "train",
                 labels: torch.Tensor | None = None):  # fmt: skip
        self.ds, self.column, self.resolution, self.channels, self.name = ds, column, resolution, channels, name
        self.indices = list(range(len(ds))) if indices is None else list(indices)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> torch.Tensor:
        value = self.ds[index][self.column]
        where = _row_name(self.name, index, value)
        return torch.from_numpy(to_model_image(decode_image(value, where), self.resolution, self.channels))

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        image = self.load(self.indices[i])
        return image if self.labels is None else (image, self.labels[self.indices[i]])


def validate_images(
    dataset: ImageDataset, skip_bad: bool = False, keep: bool = True, progress: bool = True
) -> tuple[torch.Tensor | None, list[int], int]:
    """Decode every image once: (uint8 `[N, C, R, R]` if `keep`, usable row indices, number skipped).

    Raises DataError naming the first bad item unless `skip_bad`; raises if nothing usable is left.
    """
    from tqdm.auto import tqdm

    if len(dataset) == 0:
        raise DataError(f"the {dataset.name} split is empty: there are no images to use")
    kept: list[torch.Tensor] = []
    good: list[int] = []
    skipped = 0
    for index in tqdm(dataset.indices, desc=f"checking {dataset.name} images", disable=not progress, unit="img"):
        try:
            image = dataset.load(index)
        except DataError as exc:
            if not skip_bad:
                raise DataError(f"{exc}. Fix or remove it, or pass --skip_bad_images to skip such items.") from exc
            logger.warning("skipping %s", exc)
            skipped += 1
            continue
        good.append(index)
        if keep:
            kept.append(image)
    if not good:
        raise DataError(f"all {len(dataset)} images of the {dataset.name} split are unreadable: none left to use")
    return (torch.stack(kept) if keep else None), good, skipped


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(uint8 images `[N, C, H, W]`, class ids `[N]` or None) of a training batch: labels are an optional part."""
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 `[N, C, H, W]` -> float32 in [-1, 1] (x / 127.5 - 1), the model's data range."""
    return images.to(torch.float32) / 127.5 - 1.0


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2, drawn from `generator` (on the images' device)."""
    flip = torch.rand(images.shape[0], generator=generator, device=generator.device) < 0.5
    flip = flip.to(images.device).reshape(-1, *([1] * (images.ndim - 1)))
    return torch.where(flip, images.flip(-1), images)
