"""The training data: loaded with datasets, validated and decoded to uint8 tensors once, with class ids for a
conditional run and the held-out split for evaluation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm_hub.config import (
    ConfigError,
    TrainConfig,
)
from ddpm_hub.data import (
    DataError,
    ImageDataset,
    class_names,
    detect_channels,
    encode_labels,
    load_splits,
    validate_images,
)
from ddpm_hub.labels import pretrained_class_order

logger = logging.getLogger("ddpm_hub.train")


MEMORY_CACHE_LIMIT_BYTES = 4 << 30  # "auto" keeps decoded uint8 images in memory up to this size


@dataclass
class Data:
    """The training loader's dataset (uint8 images, with class ids when conditional), held-out images (uint8)
    and labels, and bookkeeping."""

    train: torch.utils.data.Dataset
    held_out: torch.Tensor | None
    num_train: int
    skipped: int
    channels: int
    description: str
    dataset_id: str | None
    license: str | None
    class_names: list[str] | None = None
    held_out_labels: torch.Tensor | None = None
    dataset_type: str | None = None
    dataset_name: str | None = None
    eval_split: str | None = None

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)


def describe_data(cfg: TrainConfig) -> tuple[str, str | None]:
    """(human description, Hub dataset id or None) of the training data."""
    if cfg.train_data_dir:
        return f"images from the folder {Path(cfg.train_data_dir).name}", None
    if cfg.dataset_name in (None, "digits"):
        return "the UCI optical digits (8x8, CC BY 4.0, via scikit-learn), train split", None
    if Path(cfg.dataset_name).exists():  # a local save_to_disk folder or data file: no Hub id
        return f"the local dataset {Path(cfg.dataset_name).name} ({cfg.split} split)", None
    return f"{cfg.dataset_name} ({cfg.split} split)", cfg.dataset_name


def dataset_reference(cfg: TrainConfig) -> tuple[str, str]:
    """(type, name) of the data for the card's model-index: the Hub id for Hub data; for local data an id-like
    token that is not a Hub id (`digits`, `imagefolder`, or the datasets builder of a local file) and a name."""
    from ddpm_hub.hub import EMBEDDED_DIGITS

    if cfg.train_data_dir:
        return "imagefolder", f"images from the folder {Path(cfg.train_data_dir).name}"
    if cfg.dataset_name in (None, "digits"):
        return EMBEDDED_DIGITS["type"], EMBEDDED_DIGITS["name"]
    local = Path(cfg.dataset_name)
    if local.exists():
        builder = local.suffix.lstrip(".").lower() if local.is_file() else "arrow"
        return builder, f"the local dataset {local.name}"
    return cfg.dataset_name, cfg.dataset_name


def prepare_data(cfg: TrainConfig, accelerator) -> Data:
    """Load (datasets), validate and transform the data; the channel count comes from the data unless given.
    With `--class_conditional` the class ids travel with the images (validated against the train split's classes)."""
    with accelerator.main_process_first():
        train_ds, held_ds = load_splits(cfg.data)
    channels = cfg.channels or detect_channels(train_ds, cfg.image_column)
    names, labels = None, None
    if cfg.class_conditional:
        names = class_names(train_ds, cfg.class_column)
        if cfg.pretrained_model_name_or_path:
            names = pretrained_class_order(cfg.pretrained_model_name_or_path, names)
        labels = encode_labels(train_ds, cfg.class_column, names)
    progress = accelerator.is_local_main_process
    train = ImageDataset(train_ds, cfg.image_column, cfg.resolution, channels, name="train", labels=labels)
    size = len(train) * channels * cfg.resolution**2
    in_memory = cfg.cache_images_in_memory == "yes" or (
        cfg.cache_images_in_memory == "auto" and size <= MEMORY_CACHE_LIMIT_BYTES
    )
    skipped = 0
    if in_memory or cfg.skip_bad_images:
        images, good, skipped = validate_images(train, skip_bad=cfg.skip_bad_images, keep=in_memory, progress=progress)
        if not in_memory:
            train_set = ImageDataset(train_ds, cfg.image_column, cfg.resolution, channels, indices=good, name="train",
                                     labels=labels)  # fmt: skip
        elif labels is None:
            train_set = torch.utils.data.TensorDataset(images)
        else:
            train_set = torch.utils.data.TensorDataset(images, labels[good])
    else:
        if len(train) == 0:
            raise DataError("the train split is empty: there is nothing to train on")
        train_set = train
    if skipped:
        logger.warning("skipped %d unreadable training images (--skip_bad_images)", skipped)
    num_train = len(train_set)
    check_batches(cfg, num_train, accelerator.num_processes)
    held_out, held_labels = None, None
    if held_ds is not None and len(held_ds) > 0:
        all_held = encode_labels(held_ds, cfg.class_column, names, "held-out") if names is not None else None
        held = ImageDataset(held_ds, cfg.image_column, cfg.resolution, channels, name="held-out")
        held_out, good, held_skipped = validate_images(held, skip_bad=cfg.skip_bad_images, keep=True,
                                                       progress=progress)  # fmt: skip
        held_labels = all_held[good] if all_held is not None else None
        if held_skipped:
            logger.warning("skipped %d unreadable held-out images (--skip_bad_images)", held_skipped)
    elif cfg.final_bpd != "none" or cfg.num_quality_samples:
        logger.warning(
            "the data has no held-out split: no held-out bits/dim (--final_bpd %s) and no FID/KID at the end; give "
            "--eval_split, --validation_data_dir or data with a test/validation split", cfg.final_bpd,
        )
    from ddpm_hub.hub import dataset_license

    description, dataset_id = describe_data(cfg)
    embedded = cfg.train_data_dir is None and cfg.dataset_name in (None, "digits")
    license_id = dataset_license(dataset_id, embedded=embedded)
    dataset_type, dataset_name = dataset_reference(cfg)
    eval_split = str(held_ds.split) if held_out is not None and getattr(held_ds, "split", None) else None
    if held_out is not None and cfg.validation_data_dir is not None:  # a folder of its own, not a split of the data
        eval_split = f"validation folder {Path(cfg.validation_data_dir).expanduser().resolve().name}"
    return Data(train_set, held_out, num_train, skipped, channels, description, dataset_id, license_id, names,
                held_labels, dataset_type, dataset_name, eval_split)  # fmt: skip


def check_batches(cfg: TrainConfig, num_train: int, num_processes: int) -> None:
    """Every process gets at least one full batch per epoch (the loader drops incomplete ones): ConfigError
    before training otherwise."""
    needed = cfg.train_batch_size * num_processes
    if num_train < needed:
        per = f" x {num_processes} processes" if num_processes > 1 else ""
        raise ConfigError(
            f"--train_batch_size {cfg.train_batch_size}{per} needs at least {needed} training images, the data has "
            f"{num_train}: lower --train_batch_size" + (" or use fewer processes" if num_processes > 1 else "")
        )

