"""Class labels of a conditional model, decided in one place: which classes a stored model has (and in which id
order), whether fine-tuning data matches them, and whether guidance applies (the model has a null label)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .config import ConfigError

logger = logging.getLogger("ddpm_hub.train")
CLASS_LABELS_FILE = "class_labels.json"  # id2label, cond_drop_prob, guidance scale of a class-conditional run


def has_null_label(conditional: bool, cond_drop_prob: float | None) -> bool:
    """Whether classifier-free guidance (and the unconditional bound) applies: a class-conditional model trained
    with label dropout, whose null label learned the unconditional model. `cond_drop_prob=None` is a folder saved
    before it was recorded: yes."""
    return conditional and cond_drop_prob != 0


def label_config(class_names: list[str], cond_drop_prob: float, guidance_scale: float) -> dict[str, Any]:
    """A conditional pipeline's config: class names, label dropout and the guidance scale its card recommends (none
    without a null label)."""
    guided = has_null_label(True, cond_drop_prob)
    return {"id2label": dict(enumerate(class_names)), "cond_drop_prob": cond_drop_prob,
            "recommended_guidance_scale": guidance_scale if guided else None}  # fmt: skip


def stored_class_names(source: str | Path) -> list[str] | None:
    """The class names (in id order) a pipeline folder, checkpoint or Hub repo stores (model_index.json's
    `id2label`, a checkpoint's class_labels.json), None where it stores none."""
    path = Path(source).expanduser()
    candidates = [path / "model_index.json", path / CLASS_LABELS_FILE] if path.is_dir() else []
    if not path.exists():
        try:
            from huggingface_hub import hf_hub_download

            candidates = [Path(hf_hub_download(str(source), "model_index.json"))]
        except Exception:  # no model_index.json there: only the class count can be checked
            return None
    for file in candidates:
        try:
            id2label = json.loads(file.read_text()).get("id2label")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(id2label, dict) and id2label:
            return [str(id2label[k]) for k in sorted(id2label, key=int)]
    return None


def pretrained_class_order(source: str, names: list[str]) -> list[str]:
    """Fine-tuning keeps the pretrained model's class ids: the data's classes in the pretrained order (matched by
    name), or ConfigError naming the classes that differ."""
    stored = stored_class_names(source)
    if stored is None:
        return names
    if set(stored) != set(names):
        new, gone = sorted(set(names) - set(stored)), sorted(set(stored) - set(names))
        raise ConfigError(
            f"the pretrained model's classes {stored[:20]} differ from the data's {names[:20]} (new: {new[:10]}, "
            f"missing: {gone[:10]}): fine-tune on data with the same class names"
        )
    if stored != names:
        logger.info("class ids follow the pretrained model's order %s", stored[:20])
    return stored


def check_pretrained_classes(embeds: int | None, num_classes: int | None) -> None:
    """Fine-tuning keeps the class embedding: a conditional model needs labels of as many classes, and back."""
    if embeds is None and num_classes is not None:
        raise ConfigError("the pretrained UNet is unconditional (no class embedding): fine-tune it without "
                          "--class_conditional")  # fmt: skip
    if embeds is not None and num_classes is None:
        raise ConfigError(f"the pretrained UNet is class-conditional ({embeds - 1} classes): pass --class_conditional")
    if embeds is not None and embeds != num_classes + 1:
        raise ConfigError(f"the pretrained UNet has {embeds - 1} classes but the data has {num_classes}: fine-tune "
                          "on data with the same classes")  # fmt: skip
