"""`python -m ddpm_hub {sample,inpaint,img2img,interpolate,evaluate,push,plot}`: samples, edited images (RePaint,
SDEdit, interpolation), bits/dim and FID/KID, Hub pushes, pictures.

Models load with safetensors only, from a pipeline folder, a training `checkpoint-N` folder (EMA weights unless
`--weights raw`), a Hub id or the cache (`HF_HUB_OFFLINE=1`). Every user error is one line and exit status 2.
Heavy libraries are imported only once a command runs, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from .choices import BETA_SCHEDULES, DEFAULT_SAMPLER, OFFERED, SAMPLERS
from .config import OneLineParser
from .labels import has_null_label


class UserError(Exception):
    """A bad argument or input: printed as one line, exit status 2."""


def load_pipeline(
    model: str,
    sampler: str = "ddpm",
    device: str | None = None,
    weights: str = "ema",
    seed: int = 0,
    compile: bool = False,
    pipeline_class: str = "DDPMPipeline",
):
    """A DDPMPipeline (or its subclass `pipeline_class`, an editing pipeline) from a folder, checkpoint or Hub id,
    with the named sampler's scheduler (and the UNet compiled in place with torch.compile when asked)."""
    import ddpm_hub
    from ddpm_hub.sampling import build_scheduler

    pipeline = getattr(ddpm_hub, pipeline_class).from_pretrained(model, weights=weights)
    pipeline.scheduler = build_scheduler(sampler, pipeline.scheduler.config, seed)
    if device:
        pipeline.to(device)
    if compile:
        pipeline.unet.compile()  # nn.Module.compile: same module, compiled forward (inductor)
    return pipeline


def _steps(args: argparse.Namespace) -> int:
    return args.steps if args.steps is not None else SAMPLERS[args.sampler].steps


def class_ids(pipeline, tokens: list[str]) -> list[int]:
    """Class ids of command-line labels (UserError naming the allowed ones). A token that is one of the model's
    class names is that class. Other tokens are read as class ids (0, 1, ...), unless the model's class names
    are numbers: a number then always means the class of that name, never an id, so `1` cannot mean two classes."""
    from ddpm_hub.pipelines.pipeline_class_conditional import is_number, num_classes_of

    num_classes = num_classes_of(pipeline.unet)
    if num_classes is None:
        raise UserError("--class_labels: this model is unconditional (no class embedding); drop --class_labels")
    id2label = pipeline.id2label or {}
    names = {str(v).strip(): k for k, v in id2label.items()}
    numeric_names = any(is_number(n) for n in names)
    ids = []
    for token in tokens:
        text = token.strip()
        if text in names:
            ids.append(names[text])
        elif not numeric_names and is_number(text) and str(int(text)) == text and 0 <= int(text) < num_classes:
            ids.append(int(text))
        else:
            if numeric_names:
                allowed = f"the class names {list(names)} (this model's names are numbers, so numbers are names)"
            elif names:
                allowed = f"the class names {list(names)} or ids 0..{num_classes - 1}"
            else:
                allowed = f"ids 0..{num_classes - 1}"
            raise UserError(f"--class_labels {token!r} is not a class of this model; choose from {allowed}")
    return ids


def guidance_for(pipeline, args: argparse.Namespace, labelled: bool) -> float:
    """The guidance scale of a run: `--guidance_scale`, else the scale the model's card recommends (stored in its
    config by the trainer) when sampling given labels, else 1. UserError where guidance cannot apply."""
    from ddpm_hub.pipelines.pipeline_class_conditional import num_classes_of

    given = args.guidance_scale
    if num_classes_of(pipeline.unet) is None:
        if given not in (None, 1.0):
            raise UserError("--guidance_scale is for class-conditional models; this one is unconditional (drop it)")
        return 1.0
    if not labelled:
        if given not in (None, 1.0):
            raise UserError("--guidance_scale needs --class_labels: guidance steers each image towards its class, "
                            "and without labels the model samples unconditionally")  # fmt: skip
        return 1.0
    if not has_null_label(True, pipeline.config.get("cond_drop_prob")):
        if given not in (None, 1.0):
            raise UserError("--guidance_scale: this model was trained without label dropout (no unconditional "
                            "model), so it takes no guidance; drop --guidance_scale")  # fmt: skip
        return 1.0
    return given if given is not None else float(pipeline.config.get("recommended_guidance_scale") or 1.0)


# -- checks before work: each raises UserError (one line) before a model is loaded or a step is run -------------


def check_device(device: str | None) -> None:
    """`--device` names a device this torch build has (a CPU-only torch has no cuda)."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"--device {device!r} is not a torch device ({exc}); e.g. cpu, cuda, cuda:1, mps") from None
    available = {
        "cuda": lambda: torch.cuda.is_available(),
        "mps": lambda: torch.backends.mps.is_available(),
        "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
    }
    if kind.type in available and not available[kind.type]():
        raise UserError(
            f"--device {device}: no {kind.type} device is available to this torch ({torch.__version__}); use "
            f"--device cpu, or install a torch build with {kind.type} support"
        )
    if kind.type == "cuda" and kind.index is not None and kind.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: there are only {torch.cuda.device_count()} cuda device(s)")


def check_output_dir(folder: str | Path, flag: str, given: str | Path | None = None) -> None:
    """`folder` exists or can be created, and a file can be written in it (`given`: the path the user typed)."""
    import tempfile

    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        where = f"{given}: cannot write in {folder}" if given is not None else f"{folder}: cannot write there"
        raise UserError(f"{flag} {where} ({exc.strerror or exc})") from None


def check_output_file(path: str | Path, flag: str, image: bool = False) -> None:
    """`path` is not a directory, has an image extension PIL can write (for pictures), and its folder is
    writable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory: give a file name inside it, e.g. {path / 'out.png'}")
    if image:
        from PIL import Image

        suffix = path.suffix.lower()
        if Image.registered_extensions().get(suffix) not in Image.SAVE:
            raise UserError(f"{flag} {path}: {suffix or 'no'} file extension is not an image format; use .png")
    check_output_dir(path.parent, flag, given=path)


def check_sampling(pipeline, args: argparse.Namespace) -> None:
    """The step count and batch size suit the loaded model's sampler (e.g. at most its T training steps)."""
    try:
        pipeline.check_inputs(args.batch_size, _steps(args))
    except ValueError as exc:
        message = str(exc).replace("num_inference_steps", "--steps").replace("batch_size", "--batch_size")
        raise UserError(f"{message} (sampler {args.sampler})") from None


def cmd_sample(args: argparse.Namespace) -> int:
    import contextlib

    check_device(args.device)
    with contextlib.ExitStack() as stack:
        if args.out_dir:
            claim_out_dir(stack, args.out_dir, "sample")
        return _sample(args)


def claim_out_dir(stack, out_dir: str, command: str) -> None:
    """Make `--out_dir` this run's, for as long as `stack` is open: writable, locked against a second run (refused at
    once), cleared of what a killed run left, and holding no earlier images; a folder this run created and leaves
    empty is removed again. UserError (one line) otherwise."""
    from ddpm_hub.output_lock import OutputLock, OutputLockedError

    if not os.path.lexists(out_dir):  # a run that fails or is refused leaves no empty folder behind
        stack.callback(_remove_if_empty, Path(out_dir))
    check_output_dir(out_dir, "--out_dir")
    try:  # one run per folder, from this check to the last file: a second one is refused at once
        stack.enter_context(OutputLock(out_dir, command))
    except OutputLockedError as exc:
        raise UserError(f"--out_dir {exc}") from None
    remove_sample_staging(Path(out_dir))  # what a killed run left (no run can be writing it now)
    earlier = sorted(p.name for p in Path(out_dir).iterdir() if p.name == "samples.npz" or p.suffix == ".png")
    if earlier:  # new files would overwrite some and sit beside others: a folder mixing two runs
        raise UserError(f"--out_dir {out_dir} already holds samples ({', '.join(earlier[:3])}"
                        f"{', ...' if len(earlier) > 3 else ''}): choose a new folder, or remove them first")


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only if empty (the lock's file is gone: the lock is released first)
    except OSError:
        pass


def _sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from ddpm_hub.sampling import sample_uint8

    if args.out or not args.out_dir:
        check_output_file(args.out or "grid.png", "--out", image=True)
    pipeline = load_pipeline(args.model, args.sampler, args.device, args.weights, args.seed, args.compile)
    check_sampling(pipeline, args)
    labels, cols, num_images = None, None, args.num_images
    if args.class_labels:  # one grid row of --num_images per class
        ids = class_ids(pipeline, args.class_labels)
        labels, cols = torch.tensor(ids).repeat_interleave(args.num_images), args.num_images
        num_images = len(labels)
    if labels is None and not has_null_label(True, pipeline.config.get("cond_drop_prob")):
        raise UserError("this model was trained without label dropout, so it has no unconditional mode: pass "
                        f"--class_labels (choose from {list((pipeline.id2label or {}).values())})")
    if args.out or not args.out_dir:
        size = pipeline.unet.config.sample_size
        check_picture_size(max(size) if isinstance(size, (list, tuple)) else int(size), num_images, args.upscale)
    scale = guidance_for(pipeline, args, labels is not None)
    if has_null_label(labels is not None, pipeline.config.get("cond_drop_prob")):
        stored = pipeline.config.get("recommended_guidance_scale")
        why = "" if args.guidance_scale is not None else (" (the model's recommended scale)" if stored is not None
                                                           else " (the model stores no recommended scale)")
        print(f"guidance scale {scale:g}{why}")
    images = sample_uint8(pipeline, num_images, _steps(args), args.seed, args.batch_size, progress=True,
                          class_labels=labels, guidance_scale=scale)  # fmt: skip
    arrays = images.permute(0, 2, 3, 1).numpy()  # NHWC uint8
    pils = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]
    if args.out_dir:
        out_dir = Path(args.out_dir)
        extra = {}
        if labels is not None:  # the class ids, and the names they stand for (class_names[id])
            extra = {"labels": labels.numpy(), "class_names": np.array(_class_names(pipeline))}
        files = [(name, lambda fh, image=image: image.save(fh, format="PNG"))
                 for image, name in zip(pils, _file_names(pipeline, labels, len(pils)), strict=True)]  # fmt: skip
        files.append(("samples.npz", lambda fh: np.savez_compressed(fh, arr_0=arrays, **extra)))  # clean-fid's layout
        write_sample_files(out_dir, files)
        noun = "PNG" if len(pils) == 1 else "PNGs"
        print(f"wrote {len(pils)} {noun} and samples.npz (uint8 NHWC) to {out_dir}")
    if args.out or not args.out_dir:
        write_grid(Path(args.out or "grid.png"), pils, cols, args.upscale)
    return 0


# -- editing: inpaint (RePaint), img2img (SDEdit), interpolate (Ho et al. 4.3) ------------------------------------

EDITORS = {"inpaint": "DDPMInpaintPipeline", "img2img": "DDPMImg2ImgPipeline",
           "interpolate": "DDPMInterpolationPipeline"}  # fmt: skip
# the editing pipelines' argument names, as the command line spells them
EDIT_FLAGS = (("num_inference_steps", "--steps"), ("jump_length", "--jump_length"),
              ("jump_n_sample", "--jump_n_sample"), ("lambdas", "--lambdas"), ("class_labels", "--class_labels"),
              ("guidance_scale", "--guidance_scale"))  # fmt: skip


def cmd_edit(args: argparse.Namespace) -> int:
    import contextlib

    check_device(args.device)
    with contextlib.ExitStack() as stack:
        if args.out_dir:
            claim_out_dir(stack, args.out_dir, args.command)
        return _edit(args)


def read_picture(path: str, flag: str):
    """The image file `path` as a PIL image (UserError naming `flag` when it cannot be read)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)  # as diffusers' load_image: the picture as a viewer shows it
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: no such file") from None
    except OSError as exc:  # a folder, no permission, not an image PIL can read
        reason = exc.strerror or "not an image file PIL can read"
        raise UserError(f"{flag} {path}: {reason}") from None


def _edit_steps(args: argparse.Namespace) -> int:
    if args.command == "inpaint":
        return args.steps if args.steps is not None else 250
    return _steps(args)


def _edit(args: argparse.Namespace) -> int:
    """An editing command: the pictures read, the model loaded as the editing pipeline, every input checked, then
    --num_images results per input (per class with --class_labels), batch by batch from one seeded generator."""
    import numpy as np
    import torch

    from ddpm_hub.pipelines.pipeline_class_conditional import ids_by_design

    flags = {"inpaint": ("image", "mask"), "img2img": ("image",), "interpolate": ("image_a", "image_b")}
    for name in ("out", "out_dir"):
        if getattr(args, name) == "":
            raise UserError(f"--{name} is empty: give a file name (--out) or a folder (--out_dir)")
    out = Path(args.out or f"{args.command}.png") if args.out or not args.out_dir else None
    if out is not None:
        check_output_file(out, "--out", image=True)
        for name in flags[args.command]:
            if Path(getattr(args, name)).resolve() == out.resolve():
                raise UserError(f"--out {out} is the --{name} picture itself: choose another file name (the input "
                                "would be overwritten)")  # fmt: skip
    pictures = {name: read_picture(getattr(args, name), f"--{name}") for name in flags[args.command]}
    sampler = "ddpm" if args.command == "inpaint" else args.sampler  # RePaint needs DDPM's step
    editor = load_pipeline(args.model, sampler, args.device, args.weights, args.seed, getattr(args, "compile", False),
                           EDITORS[args.command])  # fmt: skip
    steps = _edit_steps(args)
    try:
        editor.check_edit_inputs(steps, "pt", getattr(args, "strength", None))
        inputs = {name: editor.preprocess_image(p, f"--{name}") for name, p in pictures.items() if name != "mask"}
        if "mask" in pictures:
            inputs["mask"] = editor.preprocess_mask(pictures["mask"], inputs["image"], "--mask")
        if args.command == "interpolate" and inputs["image_a"].shape != inputs["image_b"].shape:
            raise UserError(f"--image_b is {inputs['image_b'].shape[-1]}x{inputs['image_b'].shape[-2]} pixels but "
                            f"--image_a is {inputs['image_a'].shape[-1]}x{inputs['image_a'].shape[-2]}: pass two "
                            "images of one size")  # fmt: skip
    except ValueError as exc:
        raise UserError(_flag_names(str(exc))) from None
    strength = getattr(args, "strength", None)
    if strength is not None and strength > 0 and int(steps * strength) == 0:
        raise UserError(f"--strength {strength:g} of --steps {steps} runs no step: use --strength 0 for the input "
                        f"unchanged, or --strength >= {1 / steps:.3g}, or more --steps")  # fmt: skip
    labels = None
    if args.class_labels:
        labels = torch.tensor(class_ids(editor, args.class_labels)).repeat_interleave(args.num_images)
    elif not has_null_label(True, editor.config.get("cond_drop_prob")):
        raise UserError("this model was trained without label dropout, so it has no unconditional mode: pass "
                        f"--class_labels (choose from {list((editor.id2label or {}).values())})")
    scale = guidance_for(editor, args, labels is not None)
    count = len(labels) if labels is not None else args.num_images  # inpaint/img2img results; interpolation rows
    rows = count if args.command == "interpolate" else len(args.class_labels or [None])  # of the picture
    if out is not None:  # the picture's size (results and the inputs shown beside them), before any work
        results = count * (len(args.lambdas) if args.command == "interpolate" else 1)
        shown = {"inpaint": 2, "img2img": 1, "interpolate": 2}[args.command] * rows
        check_picture_size(max(next(iter(inputs.values())).shape[-2:]), results + shown, args.upscale)
    generator = torch.Generator().manual_seed(args.seed)
    editor.set_progress_bar_config(disable=False)
    results = []
    with ids_by_design():  # the labels here are class ids
        if args.command == "interpolate":
            for row in range(count):  # each row: new noise for the pair, shared by its lambdas
                kwargs = {} if labels is None else {"class_labels": int(labels[row]), "guidance_scale": scale}
                results.append(_run_editor(editor, dict(image_a=inputs["image_a"], image_b=inputs["image_b"],
                                                        lambdas=args.lambdas, strength=args.strength, mix=args.mix),
                                           steps, generator, kwargs))  # fmt: skip
        else:
            call = {"image": inputs["image"]}
            if args.command == "inpaint":
                call.update(mask_image=inputs["mask"], jump_length=args.jump_length, jump_n_sample=args.jump_n_sample)
            else:
                call.update(strength=args.strength)
            for start in range(0, count, args.batch_size):
                n = min(args.batch_size, count - start)
                kwargs = {} if labels is None else {"class_labels": labels[start:start + n], "guidance_scale": scale}
                image = call["image"].expand(n, *call["image"].shape[1:])
                results.append(_run_editor(editor, {**call, "image": image}, steps, generator, kwargs))
    results = torch.cat(results)  # uint8 [N, C, H, W]
    arrays = results.permute(0, 2, 3, 1).numpy()  # NHWC uint8
    tiles = [_tile(a) for a in arrays]
    if args.out_dir:
        extra = {}
        if labels is not None:  # the class ids, and the names they stand for (class_names[id])
            ids = labels.repeat_interleave(len(args.lambdas)) if args.command == "interpolate" else labels
            extra = {"labels": ids.numpy(), "class_names": np.array(_class_names(editor))}
        if args.command == "interpolate":
            extra["lambdas"] = np.tile(np.array(args.lambdas, dtype=np.float64), count)
            names = [f"{i:06d}.png" for i in range(len(tiles))]
        else:
            names = _file_names(editor, labels, len(tiles))
        files = [(name, lambda fh, tile=tile: tile.save(fh, format="PNG")) for tile, name in zip(tiles, names,
                                                                                                strict=True)]
        files.append(("samples.npz", lambda fh: np.savez_compressed(fh, arr_0=arrays, **extra)))
        write_sample_files(Path(args.out_dir), files)
        print(f"wrote {len(tiles)} {'PNG' if len(tiles) == 1 else 'PNGs'} and samples.npz (uint8 NHWC) to "
              f"{args.out_dir}")
    if out is not None:
        grid, cols = _edit_picture(args.command, inputs, tiles, rows)
        write_grid(out, grid, cols, args.upscale)
    return 0


def _flag_names(message: str) -> str:
    for name, flag in EDIT_FLAGS:
        message = message.replace(name, flag)
    return message


def _run_editor(editor, call: dict, steps: int, generator, kwargs: dict):
    """One call of an editing pipeline as uint8 `[N, C, H, W]` (the rounding of its PIL output)."""
    import torch

    try:
        images = editor(**call, **kwargs, num_inference_steps=steps, generator=generator, output_type="pt").images
    except ValueError as exc:  # the pipeline checks its arguments before any work
        raise UserError(_flag_names(str(exc))) from None
    return (images * 255).round().to(torch.uint8).cpu()


def _tile(array):
    """A PIL image of a uint8 `[H, W, C]` array (grayscale for one channel)."""
    from PIL import Image

    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def _edit_picture(command: str, inputs: dict, tiles: list, rows: int) -> tuple[list, int]:
    """The tiles of the output picture and its columns: per row, input | mask | results (inpaint), input | results
    (img2img), image_a | one result per lambda | image_b (interpolate)."""
    def picture(x, mask: bool):  # [1, C, H, W] in [-1, 1], a mask [1, 1, H, W] in {0, 1} -> a tile like the results
        x = x[0].float().cpu()
        x = x if mask else x / 2 + 0.5
        return _tile((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).convert(tiles[0].mode)

    first = {name: picture(x, name == "mask") for name, x in inputs.items()}
    per_row = len(tiles) // rows
    grid = []
    for row in range(rows):
        results = tiles[row * per_row:(row + 1) * per_row]
        if command == "inpaint":
            grid += [first["image"], first["mask"], *results]
        elif command == "img2img":
            grid += [first["image"], *results]
        else:
            grid += [first["image_a"], *results, first["image_b"]]
    return grid, len(grid) // rows


# -- writing outputs: complete files or none, never through a link planted at the target ------------------------

SAMPLE_STAGING = (".samples-", ".tmp")  # prefix and suffix of `sample --out_dir`'s staging folder inside the folder


MAX_PICTURE_PIXELS = 2**28  # 268M pixels (about 800 MB as RGB): PIL would refuse to open more as a possible bomb


def check_picture_size(tile_px: int, num_tiles: int, upscale: int | None) -> None:
    """UserError, before any work, when `num_tiles` tiles of `tile_px` pixels enlarged `upscale` times make a picture
    of more than MAX_PICTURE_PIXELS."""
    if upscale is None:
        return
    pixels = num_tiles * (tile_px * upscale) ** 2
    if pixels > MAX_PICTURE_PIXELS:
        raise UserError(f"--upscale {upscale} makes a picture of about {pixels / 1e6:,.0f}M pixels from {num_tiles} "
                        f"tile(s) of {tile_px} px (at most {MAX_PICTURE_PIXELS / 1e6:.0f}M): use a smaller --upscale, "
                        "or --out_dir for the images at their own size")  # fmt: skip


def write_grid(path: Path, tiles: list, cols: int, upscale: int | None) -> None:
    """`tiles` (PIL images) as one grid picture at `path` (replaced atomically), enlarged by `upscale` (default:
    what suits the tile size), in the format of the path's extension."""
    from PIL import Image

    from ddpm_hub.plots import image_grid
    from ddpm_hub.sampling import grid_upscale

    check_picture_size(max(tiles[0].size), len(tiles), upscale)
    upscale = upscale if upscale is not None else grid_upscale(tiles[0].height)
    picture = image_grid(tiles, upscale=upscale, cols=cols)
    image_format = Image.registered_extensions()[path.suffix.lower()]
    replace_file(path, lambda fh: picture.save(fh, format=image_format))
    print(f"wrote {path}")


def _create(path: Path, write) -> None:
    """Create the new file `path` (O_EXCL | O_NOFOLLOW: never an existing file, never through a link), fill it with
    `write(fh)` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(fd, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def _write_error(path: Path, exc: OSError, folder: Path, kept: str) -> UserError:
    """A failed write as one line naming the file (and a full disk as such)."""
    from ddpm_hub.checkpoints import storage_hint

    return UserError(f"could not write {path} ({exc.strerror or exc}){storage_hint(exc, folder)}; {kept}")


def replace_file(path: Path, write) -> None:
    """Write `path` through a temporary file beside it, moved over it with os.replace once complete: a link planted
    at `path` is replaced, not written through, and a failure (a full disk: UserError naming `path`) leaves the
    earlier file, or none, never half of one."""
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _create(tmp, write)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(path, exc, path.parent, f"{path} is left as it was") from None
        raise


def remove_sample_staging(out_dir: Path) -> None:
    """Remove the staging folders that killed `sample --out_dir` runs left in `out_dir` (call with its lock held)."""
    from ddpm_hub.checkpoints import remove_tree

    for leftover in out_dir.glob(f"{SAMPLE_STAGING[0]}*{SAMPLE_STAGING[1]}"):
        remove_tree(leftover, ignore_errors=True)


def write_sample_files(out_dir: Path, files: list) -> None:
    """Write `files` ((name, write(fh)) pairs, samples.npz last) into `out_dir` as a complete set or not at all:
    each is written and fsynced in a fresh staging folder inside `out_dir`, then all are moved into place with
    os.replace, samples.npz last, so that its presence means the set is complete. A link planted at a target is
    replaced, never written through. A failure (a full disk) removes this run's files, staged and moved, and is a
    UserError naming the file; a kill leaves at most complete PNGs without samples.npz, and a staging folder that
    the next run into the folder removes."""
    import contextlib
    import shutil
    import tempfile

    from ddpm_hub.checkpoints import fsync_dir

    staging, moved, target = None, [], out_dir
    try:
        staging = Path(tempfile.mkdtemp(prefix=SAMPLE_STAGING[0], suffix=SAMPLE_STAGING[1], dir=out_dir))
        for name, write in files:
            target = out_dir / name
            _create(staging / name, write)
        for name, _ in files:
            target = out_dir / name
            if name == files[-1][0]:  # the PNGs are in place (and their names durable) before samples.npz
                fsync_dir(out_dir)
            os.replace(staging / name, target)
            moved.append(target)
        fsync_dir(out_dir)
    except BaseException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for path in reversed(moved):  # samples.npz, if it got there, first
            path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(target, exc, out_dir, f"no samples were kept in {out_dir}") from None
        raise
    with contextlib.suppress(OSError):  # empty now (a leftover would be removed by the next run into the folder)
        staging.rmdir()


def _class_names(pipeline) -> list[str]:
    """A conditional model's class names in id order (its ids as text where it stores no names)."""
    from ddpm_hub.pipelines.pipeline_class_conditional import num_classes_of

    id2label = pipeline.id2label or {}
    return [id2label.get(i, str(i)) for i in range(num_classes_of(pipeline.unet))]


def _file_names(pipeline, labels, count: int) -> list[str]:
    """`000003.png`, or `<class name>_0003.png` for class-conditional samples, numbered per class in order (a
    class asked for twice continues its numbers, so no file is overwritten; names made file-safe)."""
    if labels is None:
        return [f"{i:06d}.png" for i in range(count)]
    seen: dict[int, int] = {}
    names = []
    for label in labels.tolist():
        name = (pipeline.id2label or {}).get(label, str(label))
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or str(label)
        names.append(f"{safe}_{seen.get(label, 0):04d}.png")
        seen[label] = seen.get(label, 0) + 1
    if len(set(names)) != len(names):  # two class names made file-safe alike ("a b", "a_b"): use the ids
        return [f"{label}_{n}" for label, n in zip(labels.tolist(), names, strict=True)]
    return names


def _load_eval_images(args: argparse.Namespace, channels: int, resolution: int, id2label=None):
    """(uint8 images, class ids in the model's numbering or None): labels when `id2label` is given (a
    conditional model), matched to the model's classes by name."""
    from ddpm_hub.config import DataConfig
    from ddpm_hub.data import (
        DataError,
        ImageDataset,
        encode_labels,
        is_saved_dataset,
        load_splits,
        validate_images,
    )

    if args.dataset and Path(args.dataset).is_dir() and not is_saved_dataset(args.dataset):  # an image folder
        data = DataConfig(train_data_dir=args.dataset, split=args.split, image_column=args.image_column)
    else:
        data = DataConfig(dataset_name=args.dataset, split=args.split, image_column=args.image_column)
    ds, _ = load_splits(data)
    if args.num_images:
        ds = ds.select(range(min(args.num_images, len(ds))))
    images, good, _ = validate_images(ImageDataset(ds, args.image_column, resolution, channels, name=args.split))
    if id2label is None:
        return images, None
    names = [id2label[i] for i in sorted(id2label)]  # matched by name: the data's own ids may differ
    try:
        labels = encode_labels(ds, args.class_column, names, args.split, classes="classes of this model")
    except DataError as exc:
        if not getattr(args, "dataset_defaulted", False):
            raise
        raise DataError(f"{exc} (evaluate used --dataset digits, the default: pass --dataset with the model's "
                        "held-out data)") from None
    return images, labels[good]


def cmd_evaluate(args: argparse.Namespace) -> int:

    wanted = [name for name in ("bpd", "bpd_estimate", "fid", "kid", "digits_fid", "inception_score")
              if getattr(args, name)]  # fmt: skip
    if not wanted:
        raise UserError(
            "evaluate needs a metric: --bpd, --bpd_estimate, --digits_fid, --fid, --kid or --inception_score"
        )
    if {"fid", "kid", "inception_score"} & set(wanted):
        from ddpm_hub.metrics import check_inception_available

        try:
            check_inception_available()  # before loading or sampling anything
        except RuntimeError as exc:
            raise UserError(f"--{next(n for n in wanted if n in ('fid', 'kid', 'inception_score'))}: {exc}") from None
    if args.digits_fid:  # before loading anything, as far as the arguments tell
        _check_digits_counts(args.num_images or 4, args.num_samples or args.num_images or 4)
    check_evaluate_args(args)
    pipeline = load_pipeline(args.model, args.sampler, args.device, args.weights, args.seed, args.compile)
    if {"fid", "kid", "digits_fid", "inception_score"} & set(wanted):
        check_sampling(pipeline, args)
    cfg = pipeline.unet.config
    if args.digits_fid and (cfg.sample_size != 8 or cfg.in_channels != 1):
        raise UserError("--digits_fid is for 8x8 grayscale digit models; use --fid/--kid for other data")
    conditional = cfg.get("num_class_embeds") is not None
    scale = guidance_for(pipeline, args, conditional)
    id2label = dict(enumerate(_class_names(pipeline))) if conditional else None
    if args.dataset is None:  # the default is the embedded digits: only a yardstick for models of their shape
        if cfg.sample_size != 8 or cfg.in_channels != 1:
            shape = f"{cfg.sample_size}x{cfg.sample_size}x{cfg.in_channels}"
            raise UserError(f"evaluate: this model makes {shape} images and the default --dataset (digits) is "
                            "8x8x1: pass --dataset with the model's held-out data (a Hub id or an image folder)")
        args.dataset, args.dataset_defaulted = "digits", True
    images, labels = _load_eval_images(args, cfg.in_channels, cfg.sample_size, id2label)
    if args.digits_fid:
        _check_digits_counts(len(images), args.num_samples or len(images))
    results: dict[str, Any] = {"num_images": len(images)}
    report = None
    if args.bpd or args.bpd_estimate:
        from ddpm_hub.evaluation import bound

        mode = "estimate" if args.bpd_estimate else "full"
        out, unconditional = bound(pipeline, images, mode, args.batch_size, args.seed, class_labels=labels)
        results.update(_bpd_results(out, mode))
        if unconditional is not None:  # also the null-label bound, from the same noise
            results.update(_bpd_results(unconditional, mode, "unconditional_"))
        if out.terms is not None and args.vlb_plot:
            from ddpm_hub.plots import vlb_terms_plot

            vlb_terms_plot(out.terms, args.vlb_plot)
    if {"fid", "kid", "digits_fid", "inception_score"} & set(wanted):
        from ddpm_hub import metrics
        from ddpm_hub.evaluation import class_mix, inception_scores
        from ddpm_hub.sampling import sample_uint8

        num_samples = args.num_samples or len(images)
        seeds = list(range(args.seed, args.seed + args.num_seeds))
        sample_labels = None  # a conditional model asks for the held-out labels in turn (the same class mix)
        if labels is not None:
            sample_labels = class_mix(labels, num_samples)
            results["guidance_scale"] = scale
        results.update(sampler=args.sampler, steps=_steps(args), num_samples=num_samples)
        if args.digits_fid:
            report = metrics.sample_quality_report(pipeline, images, num_samples=num_samples,
                                                   num_inference_steps=_steps(args), seeds=seeds,
                                                   batch_size=args.batch_size, progress=True,
                                                   class_labels=sample_labels,
                                                   guidance_scale=scale)  # fmt: skip
            results["seeds"] = seeds
            summary = dict(report["summary"])
            accuracy = summary.pop("digits_class_accuracy", None)
            if accuracy is not None and pipeline.id2label in (None, {i: str(i) for i in range(10)}):
                results["digits_class_accuracy"] = accuracy["mean"]
            results.update({name: stat["mean"] for name, stat in summary.items()})
            if len(seeds) > 1:
                results.update({f"{name}_ci95": stat["half_width"] for name, stat in summary.items()})
            results["digits_per_seed"] = report["per_seed"]
        if {"fid", "kid", "inception_score"} & set(wanted):
            fake = sample_uint8(pipeline, num_samples, _steps(args), args.seed, args.batch_size, progress=True,
                                class_labels=sample_labels, guidance_scale=scale)  # fmt: skip
            which = [name for name in ("fid", "kid", "inception_score") if getattr(args, name)]
            scores = inception_scores(images, fake, which)
            results.update(scores)
    shown = {k: v for k, v in results.items()
             if k in ("seeds", "digits_class_accuracy") or not k.startswith(("digits_", "seeds"))}  # fmt: skip
    print(json.dumps(shown, indent=1))
    if report is not None:
        print(f"\ndigits sample quality ({args.sampler}, {_steps(args)} steps), in the shipped classifiers' features "
              "(not Inception):\n" + metrics.quality_table(report))  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def check_evaluate_args(args: argparse.Namespace) -> None:
    """evaluate's options fit together and its outputs can be written, before the model is loaded."""
    check_device(args.device)
    if args.vlb_plot and not args.bpd:
        raise UserError(
            "--vlb_plot draws the per-step terms of the full bound: add --bpd (--bpd_estimate samples only some steps)"
        )
    if args.vlb_plot:
        check_output_file(args.vlb_plot, "--vlb_plot", image=True)
    if args.out:
        check_output_file(args.out, "--out")


def _check_digits_counts(num_real: int, num_samples: int) -> None:
    if min(num_real, num_samples) < 4:
        raise UserError("--digits_fid needs at least 4 samples and 4 reference images (precision/recall use each "
                        "point's 3rd nearest neighbour): raise --num_images / --num_samples")  # fmt: skip


def _bpd_results(out, mode: str, prefix: str = "") -> dict[str, float]:
    key = prefix + ("bits_per_dim_estimate" if mode == "estimate" else "bits_per_dim")
    results = {key: float(out.total.mean())}
    if out.stderr is not None:
        results[key + "_stderr"] = out.mean_stderr()
    return results


def cmd_push(args: argparse.Namespace) -> int:
    if args.token is not None:  # never taken from a command line (ps, shell history, a launcher's error output)
        from ddpm_hub.config import HUB_TOKEN_REFUSED

        raise UserError(HUB_TOKEN_REFUSED.replace("--hub_token", "--token"))
    import tempfile

    from ddpm_hub.checkpoints import is_checkpoint
    from ddpm_hub.export import publish
    from ddpm_hub.hub_push import resolve_repo_id
    from ddpm_hub.output_lock import OutputLock

    folder = Path(args.folder)
    checkpoint = is_checkpoint(folder)
    if args.weights == "raw" and not checkpoint:  # before asking the Hub anything
        raise UserError(f"--weights raw is for training checkpoint-N folders only; {folder} is not one: drop it")
    if not checkpoint and not (folder / "model_index.json").is_file():
        raise UserError(f"{folder} is not a pipeline folder (no model_index.json): train first, then push")
    repo_id = resolve_repo_id(args.repo_id)  # NAME -> USER/NAME (whoami); checked before anything is written
    if checkpoint:  # a checkpoint is exported to a pipeline folder first
        run_folder = folder.parent.parent if folder.parent.name == "checkpoints" else folder
        with tempfile.TemporaryDirectory() as tmp, OutputLock(run_folder, "push", create=False, shared=True):
            pipeline = load_pipeline(str(folder), "ddpm", None, args.weights)
            export = Path(tmp) / folder.name
            pipeline.save_pretrained(export, repo_id=repo_id)
            url = publish(export, repo_id, private=args.private)
    else:
        url = publish(folder, repo_id, private=args.private)
    print(f"pushed {args.folder} to {url}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    import torch

    from ddpm_hub import plots

    out = Path(args.out)
    check_output_file(out, "--out", image=args.kind != "schedules")  # matplotlib also writes .pdf/.svg
    if args.kind == "schedules":
        plots.schedules_plot(out)
    elif args.kind == "forward":
        from ddpm_hub.data import load_digits_dataset
        from ddpm_hub.scheduling_ddpm import DDPMScheduler

        ds = load_digits_dataset()["test"]
        x = torch.stack([torch.tensor(list(ds[i]["image"].getdata())).reshape(1, 8, 8) for i in range(4)])
        x = x.float() / 127.5 - 1
        scheduler = DDPMScheduler(beta_schedule=args.beta_schedule)
        plots.forward_process_strip(scheduler, x, generator=torch.Generator().manual_seed(args.seed), scale=8).save(out)
    else:
        if not args.model:
            raise UserError("plot reverse needs --model")
        check_device(args.device)
        pipeline = load_pipeline(args.model, "ddpm", args.device, args.weights)
        if args.steps:
            try:
                pipeline.check_inputs(1, args.steps)
            except ValueError as exc:
                raise UserError(str(exc).replace("num_inference_steps", "--steps")) from None
        result = pipeline(
            batch_size=1,
            generator=torch.Generator().manual_seed(args.seed),
            num_inference_steps=args.steps or 1000,
            output_type="pt",
            return_intermediates=True,
        )
        inter = result["intermediates"]
        plots.reverse_process_strip(
            inter["samples"], inter["pred_original_samples"], pipeline.scheduler.timesteps, scale=8
        ).save(out)
    print(f"wrote {out}")
    return 0


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _finite(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _scale(text: str) -> float:
    """A guidance scale: a finite number >= 0 (0: unconditional, 1: no guidance)."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: unconditional, 1: no guidance), got {text}")
    return value


def _non_negative(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: all), got {value}")
    return value


def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="a pipeline folder, a checkpoint-N folder, or a Hub id")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="a checkpoint's EMA or raw weights")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)


class _DeprecatedAlias(argparse.Action):
    """`--scheduler`: the old name of `--sampler`, hidden from --help; still works, with a warning."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated; use --sampler", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _steps_argument(p: argparse.ArgumentParser, help: str) -> None:
    """`--steps`, and `--num_inference_steps` (the trainer's and the pipeline's name) as a hidden second flag: one
    flag with two names would be named '--steps/--num_inference_steps' in argparse's errors."""
    p.add_argument("--steps", type=_positive, default=None, help=f"{help}; also --num_inference_steps")
    p.add_argument("--num_inference_steps", dest="steps", type=_positive, default=None, help=argparse.SUPPRESS)


def _sampler_args(p: argparse.ArgumentParser) -> None:
    names = ", ".join(f"{k} ({SAMPLERS[k].steps})" for k in OFFERED)
    p.add_argument("--sampler", choices=sorted(OFFERED), default=DEFAULT_SAMPLER,
                   help=f"sampler (its usual step count): {names}")  # fmt: skip
    p.add_argument("--scheduler", dest="sampler", choices=sorted(OFFERED), action=_DeprecatedAlias,
                   help=argparse.SUPPRESS)  # fmt: skip
    p.add_argument("--guidance_scale", type=_scale, default=None,
                   help="classifier-free guidance of a class-conditional model given labels (0: unconditional, "
                   "1: none, above 1: stronger; default: the scale the model's card recommends, 1 if it has "
                   "none)")  # fmt: skip
    _steps_argument(p, "denoising steps (default: the sampler's)")
    p.add_argument("--batch_size", type=_positive, default=256)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet: pays off past a few hundred steps (README: break-even)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m ddpm_hub", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    s = sub.add_parser("sample", help="sample images: a grid, and/or every image as PNG plus one .npz")
    _model_args(s)
    _sampler_args(s)
    s.add_argument("--num_images", type=_positive, default=16, help="images (per class with --class_labels)")
    s.add_argument("--class_labels", nargs="+", default=None, metavar="LABEL",
                   help="class names (or ids 0, 1, ... where the names are not numbers) of a class-conditional "
                   "model: one grid row per class")  # fmt: skip
    s.add_argument("--upscale", type=_positive, default=None, help="enlarge each grid tile (default: to ~64 px)")
    s.add_argument("--out", default=None, help="grid PNG (default grid.png when --out_dir is not given)")
    s.add_argument("--out_dir", default=None, help="write every image as PNG and all as samples.npz (uint8 NHWC)")
    s.set_defaults(func=cmd_sample)

    _edit_parsers(sub)

    e = sub.add_parser("evaluate", help="bits/dim (full or estimate), FID/KID/IS against a data set")
    _model_args(e)
    _sampler_args(e)
    e.add_argument("--dataset", default=None,
                   help="'digits', a Hub dataset id, or an image folder (default: digits, for 8x8 grayscale "
                        "models only)")  # fmt: skip
    e.add_argument("--split", default="test")
    e.add_argument("--image_column", default="image")
    e.add_argument("--class_column", default="label",
                   help="the labels of a class-conditional model's data: conditional and unconditional bounds, "
                   "samples of the data's classes")  # fmt: skip
    e.add_argument("--num_images", type=_non_negative, default=0, help="held-out images to use (0: all)")
    e.add_argument("--bpd", action="store_true", help="the full bound over all T steps")
    e.add_argument("--bpd_estimate", action="store_true", help="the fast unbiased estimate")
    e.add_argument("--digits_fid", action="store_true",
                   help="8x8 digits: FID, KID, precision/recall, class-frequency error and classifier score in the "
                   "features of both shipped digits classifiers (digits_mlp, digits_conv)")  # fmt: skip
    e.add_argument("--num_samples", type=_positive, default=None,
                   help="samples per seed for FID/KID/IS (default: as many as evaluation images)")  # fmt: skip
    e.add_argument("--num_seeds", type=_positive, default=1,
                   help="--digits_fid at seeds --seed, --seed+1, ...: mean and 95%% t-interval over them")  # fmt: skip
    e.add_argument("--fid", action="store_true", help="FID (Inception features; needs torch-fidelity)")
    e.add_argument("--kid", action="store_true", help="KID (Inception features; needs torch-fidelity)")
    e.add_argument("--inception_score", action="store_true", help="Inception Score of samples (torch-fidelity)")
    e.add_argument("--vlb_plot", default=None, help="write a PNG of the per-step VLB terms (with --bpd)")
    e.add_argument("--out", default=None, help="also write the results as JSON")
    e.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("push", help="push a pipeline or checkpoint folder to the Hub (token: HF_TOKEN or login)")
    p.add_argument("--folder", required=True)
    p.add_argument("--repo_id", required=True)
    p.add_argument("--private", action="store_true")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="for a checkpoint folder")
    p.add_argument("--token", "--hub_token", "--hub-token", dest="token", help=argparse.SUPPRESS)  # refused
    p.set_defaults(func=cmd_push)

    g = sub.add_parser("plot", help="pictures: forward/reverse process strips, noise schedules")
    g.add_argument("kind", choices=["forward", "reverse", "schedules"])
    _model_args(g, required=False)
    _steps_argument(g, "denoising steps")
    g.add_argument("--beta_schedule", choices=BETA_SCHEDULES, default="linear")
    g.add_argument("--out", default="plot.png")
    g.set_defaults(func=cmd_plot)
    return parser


def _fraction(text: str) -> float:
    """A number in [0, 1]."""
    value = _finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _edit_parsers(sub) -> None:
    """inpaint, img2img and interpolate: a model as `sample` takes it, the pictures, the results per input."""
    commands = {
        "inpaint": "fill the white pixels of --mask in --image (RePaint; DDPM sampler): input | mask | results",
        "img2img": "a realistic image keeping the layout of --image (SDEdit, --strength): input | results",
        "interpolate": "interpolate --image_a and --image_b through x_t (Ho et al. 4.3): a | one per lambda | b",
    }
    for command, text in commands.items():
        p = sub.add_parser(command, help=text, description=text)
        _model_args(p)
        if command == "inpaint":
            p.add_argument("--image", required=True, help="the picture to complete (converted to the model's mode)")
            p.add_argument("--mask", required=True, help="the mask, the picture's size: white = repaint, black = keep")
            _steps_argument(p, "RePaint levels (default 250)")
            p.add_argument("--jump_length", type=_positive, default=10, help="levels per jump back (RePaint's j)")
            p.add_argument("--jump_n_sample", type=_positive, default=10,
                           help="passes over each block of levels (RePaint's r; 1: the replacement method)")
            p.add_argument("--guidance_scale", type=_scale, default=None,
                           help="classifier-free guidance with --class_labels (default: the model card's scale)")
            p.add_argument("--batch_size", type=_positive, default=256)
        else:
            _sampler_args(p)
            if command == "img2img":
                p.add_argument("--image", required=True, help="the picture to edit (converted to the model's mode)")
            else:
                p.add_argument("--image_a", required=True)
                p.add_argument("--image_b", required=True)
                p.add_argument("--lambdas", type=_fraction, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                               help="mixing weights in [0, 1] (0: image_a, 1: image_b)")  # fmt: skip
                p.add_argument("--mix", choices=["linear", "slerp"], default="linear")
            p.add_argument("--strength", type=_fraction, default=0.8 if command == "img2img" else 0.5,
                           help="how far the input is noised (0: unchanged, 1: sampling from noise); that fraction "
                           "of --steps runs")  # fmt: skip
        rows = "rows of interpolations" if command == "interpolate" else "results"
        p.add_argument("--num_images", type=_positive, default=1 if command == "interpolate" else 4,
                       help=f"{rows} per input (per class with --class_labels)")  # fmt: skip
        p.add_argument("--class_labels", nargs="+", default=None, metavar="LABEL",
                       help="class names (or ids) of a class-conditional model: one row per class")  # fmt: skip
        p.add_argument("--upscale", type=_positive, default=None, help="enlarge each tile (default: to ~64 px)")
        p.add_argument("--out", default=None, help=f"the picture (default {command}.png without --out_dir)")
        p.add_argument("--out_dir", default=None, help="write every result as PNG and all as samples.npz")
        p.set_defaults(func=cmd_edit)


PATH_ARGUMENTS = ("model", "out", "out_dir", "folder", "vlb_plot", "dataset", "image", "mask", "image_a", "image_b")


def _check_path_lengths(args: argparse.Namespace) -> None:
    """A path the system cannot take (a name over 255 bytes, a path over 4096) is a one-line error naming its option,
    before anything is loaded."""
    from ddpm_hub.config import show_text

    for name in PATH_ARGUMENTS:
        value = getattr(args, name, None)
        if isinstance(value, str) and (len(os.fsencode(value)) > 4096
                                       or any(len(os.fsencode(part)) > 255 for part in Path(value).parts)):
            raise UserError(f"--{name} {show_text(value)}: not a usable path (a name is too long)")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the command is, so that it stops as after Ctrl-C: its unfinished files and its
    folder lock are removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    import signal

    args = build_parser().parse_args(argv)
    handlers = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a signal ignored on purpose (nohup) stays ignored
        try:
            if signal.getsignal(sig) is signal.SIG_DFL:
                handlers[sig] = signal.signal(sig, _raise_interrupted)
        except ValueError:  # not the main thread: signals stay as they are
            break
    try:
        _check_path_lengths(args)
        with warnings.catch_warnings():
            # torchsde's Brownian interval (dpm_sde) warns about float rounding of its query times at every step
            warnings.filterwarnings("ignore", message=r"Should have (ta|tb|t0)", module=r"torchsde")
            return args.func(args)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(f"error: stopped by {signal.Signals(signum).name}; this run's unfinished files were removed",
              file=sys.stderr)  # fmt: skip
        return 128 + signum
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the library's errors name the bad input; show them as one line
        from ddpm_hub.checkpoints import CheckpointError
        from ddpm_hub.data import DataError
        from ddpm_hub.hub_push import HubError

        if isinstance(exc, (DataError, HubError, CheckpointError, OSError, ValueError, RuntimeError)):
            from ddpm_hub.config import redact_tokens, show_text

            print("error: " + redact_tokens(" ".join(show_text(word) for word in str(exc).split())), file=sys.stderr)
            return 2
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
