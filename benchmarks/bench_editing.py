"""Editing the held-out digits with a trained DDPM: inpainting (RePaint), SDEdit and interpolation, measured by class
accuracy and FID in both digits feature spaces (the shipped classifiers, `ddpm_hub.digits_features`).

Parts (`--parts`, default all):
- `inpaint`: the 300 held-out digits with four masks (bottom half, right half, the centre 4x4, a random half of the
  pixels, drawn once per image), completed by a black fill (the masked pixels set to black), the replacement method
  (`DDPMInpaintPipeline` with `jump_n_sample=1`) and RePaint at each `--repaint` (jump_length, jump_n_sample), all
  DDPM steps (`--inpaint_steps` levels of the chain; RePaint is DDPM-only). For each: the share of completed digits
  that each classifier assigns to the original's label, FID against the held-out digits, and the wall time of the
  300 completions. The unmasked originals' accuracy is the ceiling.
- `inpaint_conditional` (with `--conditional_model`): the same with a class-conditional model given the true label
  at `--guidance_scale` (default: the model's recommended scale, as the CLI does): the replacement method and
  RePaint at each `--conditional_repaint`.
- `sdedit`: the held-out digits corrupted (`gaussian`: N(0, sigma^2) noise added in [-1, 1] units, clipped;
  `scribble`: one random pen stroke drawn over the digit; `none`: the clean digits, for reference), then
  `DDPMImg2ImgPipeline` at each `--strengths` with the package's default sampler (DPM-Solver++ 2M at its 10 steps,
  so strength s runs int(10 s) steps, as the CLI's `img2img` does): accuracy w.r.t. the original label
  (faithfulness) against FID vs the held-out digits (realism).
- `interpolation`: a few held-out pairs through x_t (`DDPMInterpolationPipeline`, the paper's t = 500 of 1000 DDPM
  steps, strength 0.5), against the pixel-space mix: a figure.

Every stochastic method runs at each seed (`--seeds`, `--sdedit_seeds`; a seed gives every method the same
generator): mean over seeds with a 95% t-interval; wall times are those of the fastest seed. Masks and corruptions
are drawn once (masks from seed 0, the Gaussian noise and the strokes from `CORRUPTION_SEED`), the same
for every method and seed. Prints tables, writes JSON (`--update` keeps the parts of an existing `--out` that this
run does not redo) and draws the figures from the JSON: `--figure` (SDEdit accuracy against FID), `--inpaint_figure`,
`--sdedit_examples_figure`, `--interpolation_figure`.

    OMP_NUM_THREADS=1 python benchmarks/bench_editing.py --model outputs/ddpm-digits \
        --conditional_model outputs/ddpm-digits-cond                       # the measurement (docs/benchmarks.md)
    python benchmarks/bench_editing.py --quick                             # smoke run: tiny random models, seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_guidance import SPACES, held_out_digits  # noqa: E402
from common import machine, print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "docs" / "figures"
PARTS = ("inpaint", "inpaint_conditional", "sdedit", "interpolation")
MASKS = ("bottom_half", "right_half", "centre_4x4", "random_half")
CORRUPTIONS = ("none", "gaussian", "scribble")
EXAMPLES = 8  # images per example strip stored in the JSON


# -- inputs -----------------------------------------------------------------------------------------------------------


def make_masks(n: int, size: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """The four masks as float `[n, 1, size, size]`, 1 = repaint (diffusers' convention): the bottom half, the right
    half, the centre 4x4 (for 8x8; the centre half-size square in general), and a random half of the pixels (one
    draw per image, exactly half of them)."""
    half, quarter = size // 2, size // 4
    masks = {name: torch.zeros(n, 1, size, size) for name in MASKS}
    masks["bottom_half"][..., half:, :] = 1
    masks["right_half"][..., :, half:] = 1
    masks["centre_4x4"][..., quarter:quarter + half, quarter:quarter + half] = 1
    generator = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(size * size, generator=generator) for _ in range(n)])
    random_half = torch.zeros(n, size * size)
    random_half.scatter_(1, order[:, : size * size // 2], 1.0)
    masks["random_half"] = random_half.view(n, 1, size, size)
    return masks


def scribbles(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """`n` random pen strokes as uint8 `[n, 1, size, size]`: a polyline through 3 random points, drawn 8x larger with
    a pen 6/8 of a pixel wide and box-downsampled (anti-aliased, white on black)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    scale, out = 8, []
    for _ in range(n):
        canvas = Image.new("L", (size * scale, size * scale), 0)
        points = [tuple(p) for p in rng.uniform(0.5, size - 0.5, (3, 2)) * scale]
        ImageDraw.Draw(canvas).line(points, fill=255, width=6, joint="curve")
        out.append(np.asarray(canvas.resize((size, size), Image.Resampling.BOX)))
    return torch.from_numpy(np.stack(out))[:, None]


# The Gaussian corruption's seed must be none of the pipelines' seeds: torch's CPU generator fills tensors in order, so
# a corruption drawn from seed 0 would be the very noise that SDEdit's seed 0 adds to it (they add coherently: a
# noisier start, measured as a worse seed 0).
CORRUPTION_SEED = 10_000


def corrupt(images: torch.Tensor, kind: str, sigma: float, seed: int = CORRUPTION_SEED) -> torch.Tensor:
    """uint8 digits `[N, 1, H, W]` corrupted by `kind` as float in [-1, 1]: `none`, `gaussian` (N(0, sigma^2) noise in
    [-1, 1] units, clipped) or `scribble` (a random stroke, the brighter of stroke and digit at each pixel)."""
    x = images.float() / 127.5 - 1
    if kind == "none":
        return x
    if kind == "gaussian":
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        return (x + sigma * noise).clamp(-1, 1)
    if kind == "scribble":
        stroke = scribbles(len(images), images.shape[-1], seed)
        return torch.maximum(images, stroke).float() / 127.5 - 1
    raise ValueError(f"unknown corruption {kind!r}; choose from {CORRUPTIONS}")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Pipeline output (`output_type="pt"`, [0, 1]) as uint8, as `sampling.sample_uint8` rounds it."""
    return (images * 255).round().to(torch.uint8).cpu()


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats as uint8, rounded as the pipelines' output is."""
    return to_uint8(((x + 1) / 2).clamp(0, 1))


def scores(images: torch.Tensor, labels: torch.Tensor, held_out: torch.Tensor) -> dict[str, float]:
    """Class accuracy w.r.t. `labels` and FID against the held-out digits, in both digits spaces (FID as
    `metrics.digits_quality` computes it; only FID: its KID's 100 subsets cost more than the rest together)."""
    from ddpm_hub import metrics
    from ddpm_hub.digits_features import cached_digits_classifier

    row = {f"{space}_accuracy": metrics.digits_class_accuracy(images, labels, space) for space in SPACES}
    for space in SPACES:
        classifier = cached_digits_classifier(space)
        with torch.no_grad():
            real, fake = classifier.features(held_out.cpu()).double(), classifier.features(images.cpu()).double()
        row[f"{space}_fid"] = metrics.frechet_distance(real, fake)
    return row


def summarise(row: dict, per_seed: list[dict]) -> dict:
    """`row` with the mean and 95% half-width over seeds of every number of `per_seed`."""
    from ddpm_hub.metrics import mean_interval

    row["per_seed"] = per_seed
    for name, value in per_seed[0].items():
        if isinstance(value, float):
            stat = mean_interval([r[name] for r in per_seed])
            row[name], row[f"{name}_half_width"] = stat["mean"], stat["half_width"]
    # wall time: the fastest seed (the least disturbed by other work on the machine); the mean beside it
    row["seconds_mean"], row["seconds"] = row.pop("seconds"), min(r["seconds"] for r in per_seed)
    row.pop("seconds_half_width")
    return row


def hex_images(images: torch.Tensor) -> list[str]:
    """uint8 `[N, 1, H, W]` as one hex string per image (the JSON's example strips)."""
    return [bytes(x.flatten().tolist()).hex() for x in images]


def unhex_images(strings: list[str], size: int) -> np.ndarray:
    return np.stack([np.frombuffer(bytes.fromhex(s), dtype=np.uint8).reshape(size, size) for s in strings])


# -- the parts --------------------------------------------------------------------------------------------------------


def in_batches(call, n: int, batch_size: int) -> tuple[torch.Tensor, float]:
    """`call(start, stop)` over batches of `n` images: (the uint8 results, wall seconds of the calls)."""
    out, seconds = [], 0.0
    for start in range(0, n, batch_size):
        begin = time.perf_counter()
        images = call(start, min(n, start + batch_size))
        seconds += time.perf_counter() - begin
        out.append(to_uint8(images))
    return torch.cat(out), seconds


def inpaint_methods(repaint: list[tuple[int, int]]) -> list[dict]:
    return [{"method": "replacement", "jump_length": 1, "jump_n_sample": 1}] + [
        {"method": f"RePaint ({j}, {r})", "jump_length": j, "jump_n_sample": r} for j, r in repaint
    ]


def run_inpaint(pipeline, images, labels, held_out, masks, methods, args, conditional: dict | None) -> dict:
    """Every method on every mask at every seed. `conditional`: {"guidance_scale": s} to give the true labels."""
    from ddpm_hub.pipelines.pipeline_class_conditional import ids_by_design
    from ddpm_hub.pipelines.pipeline_editing import repaint_plan, repaint_schedule

    x0 = images.float() / 127.5 - 1
    rows, examples = [], {}
    guided = conditional is not None and conditional["guidance_scale"] != 1
    for mask_name, mask in masks.items():
        examples[mask_name] = {"input": hex_images(images[:EXAMPLES]), "mask": hex_images(to_uint8(mask[:EXAMPLES]))}
        if conditional is None:  # the black fill and the ceiling need no model: once, with the unconditional part
            black = from_model_range(torch.where(mask > 0, -1.0, x0))
            rows.append({"model": "none", "mask": mask_name, "method": "black fill", "seconds": 0.0,
                         "unet_calls": 0, **scores(black, labels, held_out)})  # fmt: skip
            examples[mask_name]["black fill"] = hex_images(black[:EXAMPLES])
        for spec in methods:
            calls = len(repaint_plan(repaint_schedule(args.inpaint_steps, spec["jump_length"], spec["jump_n_sample"])))
            per_seed = []
            for seed in args.seeds:
                generator = torch.Generator().manual_seed(seed)

                def call(start, stop, generator=generator, mask=mask, spec=spec):
                    extra = {} if conditional is None else {"class_labels": labels[start:stop], **conditional}
                    with ids_by_design():
                        return pipeline(image=x0[start:stop], mask_image=mask[start:stop],
                                        num_inference_steps=args.inpaint_steps, jump_length=spec["jump_length"],
                                        jump_n_sample=spec["jump_n_sample"], generator=generator, output_type="pt",
                                        **extra).images  # fmt: skip

                completed, seconds = in_batches(call, len(images), args.batch_size)
                per_seed.append({"seed": seed, "seconds": seconds, **scores(completed, labels, held_out)})
                if seed == args.seeds[0]:
                    examples[mask_name][spec["method"]] = hex_images(completed[:EXAMPLES])
                print(f"  {mask_name} {spec['method']} seed {seed}: {seconds:.0f} s, accuracy "
                      + " / ".join(f"{per_seed[-1][f'{s}_accuracy']:.3f}" for s in SPACES), flush=True)
            row = {"model": "conditional" if conditional else "unconditional", "mask": mask_name, **spec,
                   "unet_calls": calls * (2 if guided else 1)}  # fmt: skip
            rows.append(summarise(row, per_seed))
    return {"rows": rows, "examples": examples, "inpaint_steps": args.inpaint_steps, "seeds": args.seeds,
            **(conditional or {})}  # fmt: skip


def run_sdedit(pipeline, images, labels, held_out, args) -> dict:
    """SDEdit of each corruption at each strength and seed, with the package's default sampler."""
    from ddpm_hub.choices import SAMPLERS
    from ddpm_hub.sampling import with_sampler

    sampler, steps = "dpm", SAMPLERS["dpm"].steps
    editor = with_sampler(pipeline, sampler)
    editor.set_progress_bar_config(disable=True)
    rows, examples = [], {}
    for kind in CORRUPTIONS:
        corrupted = corrupt(images, kind, args.noise_sigma)
        examples[kind] = {"input": hex_images(images[:EXAMPLES]), "corrupted": hex_images(from_model_range(
            corrupted[:EXAMPLES]))}  # fmt: skip
        for strength in args.strengths:
            per_seed = []
            for seed in args.sdedit_seeds if strength > 0 else args.sdedit_seeds[:1]:  # strength 0: no noise drawn
                generator = torch.Generator().manual_seed(seed)

                def call(start, stop, generator=generator, corrupted=corrupted, strength=strength):
                    return editor(image=corrupted[start:stop], strength=strength, num_inference_steps=steps,
                                  generator=generator, output_type="pt").images  # fmt: skip

                edited, seconds = in_batches(call, len(images), args.batch_size)
                per_seed.append({"seed": seed, "seconds": seconds, **scores(edited, labels, held_out)})
                if seed == args.sdedit_seeds[0]:
                    examples[kind][f"{strength:g}"] = hex_images(edited[:EXAMPLES])
            row = summarise({"corruption": kind, "strength": strength, "steps_run": int(steps * strength)}, per_seed)
            rows.append(row)
            print(f"  {kind} strength {strength:g}: " + ", ".join(f"{k} {row[k]:.4g}" for k in SDEDIT_TABLE[3:]),
                  flush=True)
    return {"rows": rows, "examples": examples, "sampler": sampler, "sampler_steps": steps,
            "noise_sigma": args.noise_sigma, "seeds": args.sdedit_seeds}  # fmt: skip


def interpolation_pairs(labels: torch.Tensor, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Indices of the first held-out digit of each class of each (class, class) pair."""
    first = {int(c): int((labels == c).nonzero()[0]) for c in labels.unique()}
    return [(first[a], first[b]) for a, b in pairs if a in first and b in first]


def run_interpolation(pipeline, images, labels, args) -> dict:
    """Each pair through x_t at the paper's level (DDPM, strength 0.5), one seed; and the pixel-space mix."""
    pipeline.set_progress_bar_config(disable=True)
    x0 = images.float() / 127.5 - 1
    pairs, strips = interpolation_pairs(labels, args.interpolation_classes), []
    begin = time.perf_counter()
    for a, b in pairs:
        generator = torch.Generator().manual_seed(0)
        through = pipeline(image_a=x0[a:a + 1], image_b=x0[b:b + 1], lambdas=args.lambdas, strength=0.5,
                           num_inference_steps=args.interpolation_steps, generator=generator,
                           output_type="pt").images  # fmt: skip
        pixel = torch.cat([(1 - w) * x0[a:a + 1] + w * x0[b:b + 1] for w in args.lambdas])
        strips.append({"a": a, "b": b, "labels": [int(labels[a]), int(labels[b])],
                       "through_x_t": hex_images(to_uint8(through)), "pixel_mix": hex_images(from_model_range(pixel)),
                       "image_a": hex_images(images[a:a + 1])[0],
                       "image_b": hex_images(images[b:b + 1])[0]})  # fmt: skip
    return {"lambdas": list(args.lambdas), "strength": 0.5, "sampler": "ddpm",
            "num_inference_steps": args.interpolation_steps, "seconds": time.perf_counter() - begin, "pairs": strips}


# -- figures ----------------------------------------------------------------------------------------------------------


def _strip(strings: list[str], size: int) -> np.ndarray:
    """Images side by side with a 1-pixel blue gap, as one RGB array."""
    tiles = np.repeat(unhex_images(strings, size)[..., None], 3, axis=-1)
    gap = np.broadcast_to(np.array([40, 80, 160], dtype=np.uint8), (size, 1, 3))
    return np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)


def plot_sdedit(part: dict, path: Path) -> None:
    """Class accuracy against FID, one curve per corruption, points labelled by strength; both spaces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110)
    colours = {"none": "grey", "gaussian": "tab:blue", "scribble": "tab:red"}
    for ax, space, name in zip(axes, SPACES, ("MLP", "CNN"), strict=True):
        for kind in CORRUPTIONS:
            rows = [r for r in part["rows"] if r["corruption"] == kind]
            fids, accs = [r[f"{space}_fid"] for r in rows], [100 * r[f"{space}_accuracy"] for r in rows]
            ax.errorbar(fids, accs, xerr=[r.get(f"{space}_fid_half_width", 0) for r in rows],
                        yerr=[100 * r.get(f"{space}_accuracy_half_width", 0) for r in rows], fmt="o-",
                        color=colours[kind], capsize=2, label=f"{kind} corruption" if kind != "none" else
                        "clean digits (reference)")  # fmt: skip
            for r, x, y in zip(rows, fids, accs, strict=True):
                ax.annotate(f"{r['strength']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=colours[kind])  # fmt: skip
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(left=0)
        ax.set_xlabel(f"FID vs the held-out digits, digits {name} features (lower: more realistic)")
        ax.set_ylabel(f"original label kept, by the {name} (%)")
        ax.set_ylim(0, 105)
        ax.legend(fontsize=7, loc="lower left")
    seeds = len(part["seeds"])
    fig.suptitle(f"SDEdit (DPM-Solver++ {part['sampler_steps']} steps) of corrupted held-out digits, points "
                 f"labelled by strength; mean of {seeds} seeds, 95% interval", fontsize=9)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_grid(cells: list[list[list[str] | None]], row_names: list[str], col_names: list[str], path: Path,
              title: str, size: int) -> None:  # fmt: skip
    """A table of image strips: `cells[row][col]` = hex images (None: an empty cell)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_strip = max(len(c) for row in cells for c in row if c)
    width = len(col_names) * per_strip * 0.3 + 1.6
    fig, axes = plt.subplots(len(cells), len(col_names), figsize=(width, 0.36 * len(cells) + 0.9), dpi=110,
                             squeeze=False)  # fmt: skip
    for i, row in enumerate(cells):
        for j, strings in enumerate(row):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if strings:
                ax.imshow(_strip(strings, size), interpolation="nearest")
            else:
                ax.axis("off")
            if i == 0:
                ax.set_title(col_names[j], fontsize=8)
        axes[i, 0].set_ylabel(row_names[i], fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97), h_pad=0.2, w_pad=0.4)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def masked_input(part_examples: dict, size: int) -> list[str]:
    """The inputs with the pixels to repaint shown mid-grey (the mask's white)."""
    images = unhex_images(part_examples["input"], size).copy()
    masks = unhex_images(part_examples["mask"], size)
    images[masks > 127] = 128
    return [bytes(x.flatten().tolist()).hex() for x in images]


def plot_inpaint(result: dict, path: Path, size: int) -> None:
    """One column per mask, one row per method (the conditional model's after the unconditional ones)."""
    uncond = result.get("inpaint", {}).get("examples", {})
    cond = result.get("inpaint_conditional", {}).get("examples", {})
    masks = [m for m in MASKS if m in uncond]
    if not masks:
        return
    rows = {"original": [uncond[m]["input"] for m in masks],
            "input (grey: repaint)": [masked_input(uncond[m], size) for m in masks]}  # fmt: skip
    for source, prefix in ((uncond, ""), (cond, "conditional, ")):
        for method in [k for k in source.get(masks[0], {}) if k not in ("input", "mask")]:
            rows[prefix + method] = [source.get(m, {}).get(method) for m in masks]
    steps = result["inpaint"]["inpaint_steps"]
    plot_grid(list(rows.values()), list(rows), [m.replace("_", " ") for m in masks], path,
              f"Inpainting held-out digits (DDPM chain of {steps} levels, seed 0); conditional: given the true label",
              size)  # fmt: skip


def plot_sdedit_examples(part: dict, path: Path, size: int) -> None:
    """One column per corruption, one row per stage: the original, the corrupted input, SDEdit at each strength."""
    kinds = [k for k in CORRUPTIONS if k != "none"]
    examples = [part["examples"][k] for k in kinds]
    strengths = [k for k in examples[0] if k not in ("input", "corrupted", "0")]
    rows = {"original": [e["input"] for e in examples], "corrupted": [e["corrupted"] for e in examples]}
    rows.update({f"strength {k}": [e[k] for e in examples] for k in strengths})
    plot_grid(list(rows.values()), list(rows), kinds, path, f"SDEdit of corrupted held-out digits (DPM-Solver++ "
              f"{part['sampler_steps']} steps, seed 0)", size)  # fmt: skip


def plot_interpolation(part: dict, path: Path, size: int) -> None:
    cells, names = [], []
    lambdas = ", ".join(f"{w:g}" for w in part["lambdas"])
    for p in part["pairs"]:
        for kind, title in (("pixel_mix", "pixel mix"), ("through_x_t", "through x_500")):
            cells.append([("a", [p["image_a"]]), (f"lambda = {lambdas}", p[kind]), ("b", [p["image_b"]])])
            names.append(f"{p['labels'][0]} -> {p['labels'][1]}: {title}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(part["lambdas"])
    fig, axes = plt.subplots(len(cells), 3, figsize=(1.2 + n * 0.55, 0.62 * len(cells) + 0.6), dpi=110,
                             squeeze=False, gridspec_kw={"width_ratios": [size, n * (size + 1) - 1, size]})  # fmt: skip
    for i, row in enumerate(cells):
        for j, (column, strings) in enumerate(row):
            ax = axes[i, j]
            ax.imshow(_strip(strings, size), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(column, fontsize=8)
        axes[i, 0].set_ylabel(names[i], fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("Interpolating held-out digits: the pixel mix (1 - lambda) a + lambda b, and\nHo et al.'s mix of "
                 "x_t (t = 500 of 1000 DDPM steps, the same noise for both and for every lambda)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------------------------------

INPAINT_TABLE = ("model", "mask", "method", "unet_calls", "seconds", "digits_mlp_accuracy",
                 "digits_mlp_accuracy_half_width", "digits_conv_accuracy", "digits_conv_accuracy_half_width",
                 "digits_mlp_fid", "digits_conv_fid")  # fmt: skip
SDEDIT_TABLE = ("corruption", "strength", "steps_run", "digits_mlp_accuracy", "digits_conv_accuracy",
                "digits_mlp_fid", "digits_conv_fid")  # fmt: skip


def tiny_models(folder: Path) -> tuple[str, str]:
    """Two random tiny 8x8 models saved as pipeline folders (the smoke run's, no training): unconditional, and
    class-conditional over the 10 digits (null label trained, recommended scale 2)."""
    from ddpm_hub import DDPMPipeline, DDPMScheduler, create_unet

    paths = []
    for name, classes in (("uncond", None), ("cond", 11)):
        torch.manual_seed(0)
        unet = create_unet("tiny", num_class_embeds=classes).eval()
        with torch.no_grad():  # non-trivial outputs (the output layers start at zero)
            for p in unet.parameters():
                p.add_(0.05 * torch.randn_like(p))
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
        labels = {} if classes is None else {"id2label": {i: str(i) for i in range(10)}, "cond_drop_prob": 0.1,
                                             "recommended_guidance_scale": 2.0}  # fmt: skip
        DDPMPipeline(unet=unet, scheduler=scheduler, **labels).save_pretrained(folder / name)
        paths.append(str(folder / name))
    return paths[0], paths[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="an unconditional digits pipeline or checkpoint folder")
    parser.add_argument("--conditional_model", default=None, help="a class-conditional one (inpaint_conditional)")
    parser.add_argument("--parts", nargs="*", choices=PARTS, default=list(PARTS),
                        help="the parts to run (none, with --update: redraw the figures from --out)")
    parser.add_argument("--num_images", type=int, default=300, help="held-out digits edited (the first N)")
    parser.add_argument("--inpaint_steps", type=int, default=100, help="DDPM levels of RePaint's chain")
    parser.add_argument("--repaint", type=int, nargs=2, action="append", metavar=("JUMP_LENGTH", "JUMP_N_SAMPLE"),
                        help="a RePaint setting (repeat the option; default: 5 5 and 10 10)")
    parser.add_argument("--conditional_repaint", type=int, nargs=2, action="append",
                        metavar=("JUMP_LENGTH", "JUMP_N_SAMPLE"),
                        help="RePaint settings for the conditional model, after the replacement method (default: 5 5)")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="for the conditional model (default: its recommended scale)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="inpainting seeds")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0])
    parser.add_argument("--noise_sigma", type=float, default=0.5, help="the gaussian corruption, in [-1, 1] units")
    parser.add_argument("--sdedit_seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--interpolation_classes", type=int, nargs=2, action="append", metavar=("A", "B"),
                        help="a pair of digit classes to interpolate (repeat; default: 0 6, 1 7, 3 8, 4 9)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[i / 8 for i in range(9)])
    parser.add_argument("--interpolation_steps", type=int, default=1000, help="DDPM steps (strength 0.5 runs half)")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; --quick: 1, its tensors are too small to share)")
    parser.add_argument("--quick", action="store_true", help="tiny random models, few images and steps: a smoke run")
    parser.add_argument("--update", action="store_true", help="keep the parts of an existing --out not run now")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "editing_digits.json"))
    parser.add_argument("--figure", default=str(FIGURES / "sdedit_digits.png"))
    parser.add_argument("--inpaint_figure", default=str(FIGURES / "inpaint_digits.png"))
    parser.add_argument("--sdedit_examples_figure", default=str(FIGURES / "sdedit_examples_digits.png"))
    parser.add_argument("--interpolation_figure", default=str(FIGURES / "interpolation_digits.png"))
    args = parser.parse_args()
    args.repaint = args.repaint or [(5, 5), (10, 10)]
    args.conditional_repaint = args.conditional_repaint or [(5, 5)]
    args.interpolation_classes = args.interpolation_classes or [(0, 6), (1, 7), (3, 8), (4, 9)]
    tmp = tempfile.TemporaryDirectory()
    if args.quick:
        args.threads = args.threads or 1
        args.num_images, args.inpaint_steps, args.repaint, args.seeds = 12, 10, [(2, 2)], [0, 1]
        args.conditional_repaint, args.strengths, args.sdedit_seeds = [(2, 2)], [0.0, 0.5, 1.0], [0, 1]
        args.interpolation_classes, args.lambdas, args.interpolation_steps = [(0, 6)], [0.0, 0.5, 1.0], 20
        figures = Path(tmp.name) / "figures"
        args.figure, args.inpaint_figure = str(figures / "sdedit.png"), str(figures / "inpaint.png")
        args.sdedit_examples_figure, args.interpolation_figure = str(figures / "ex.png"), str(figures / "interp.png")
        if args.model is None:
            args.model, args.conditional_model = tiny_models(Path(tmp.name))
    if args.model is None:
        parser.error("--model is required (an unconditional digits pipeline folder), or --quick")
    parts = [p for p in args.parts if p != "inpaint_conditional" or args.conditional_model]
    if args.threads:
        torch.set_num_threads(args.threads)

    from ddpm_hub import DDPMImg2ImgPipeline, DDPMInpaintPipeline, DDPMInterpolationPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    held_out, held_labels = held_out_digits()
    images, labels = held_out[: args.num_images], held_labels[: args.num_images]
    size = images.shape[-1]
    masks = make_masks(len(images), size)
    result: dict = {}
    if args.update and Path(args.out).exists():
        import json

        result = json.loads(Path(args.out).read_text())
    run = {"machine": machine(), "command": " ".join(sys.argv), "num_images": len(images), "quick": args.quick}
    ceiling = {"model": "none", "mask": "none (originals)", "method": "unmasked originals", "seconds": 0.0,
               "unet_calls": 0, **scores(images, labels, held_out)}  # fmt: skip

    for part in parts:
        begin = time.perf_counter()
        print(f"{part}:", flush=True)
        if part == "inpaint":
            pipeline = DDPMInpaintPipeline.from_pretrained(args.model).to(device)
            pipeline.set_progress_bar_config(disable=True)
            out = run_inpaint(pipeline, images, labels, held_out, masks, inpaint_methods(args.repaint), args, None)
            out["rows"].insert(0, ceiling)
            out["model"] = args.model
        elif part == "inpaint_conditional":
            pipeline = DDPMInpaintPipeline.from_pretrained(args.conditional_model).to(device)
            pipeline.set_progress_bar_config(disable=True)
            scale = args.guidance_scale
            if scale is None:
                scale = float(pipeline.config.get("recommended_guidance_scale") or 1.0)
            out = run_inpaint(pipeline, images, labels, held_out, masks, inpaint_methods(args.conditional_repaint),
                              args, {"guidance_scale": scale})  # fmt: skip
            out["model"] = args.conditional_model
        elif part == "sdedit":
            pipeline = DDPMImg2ImgPipeline.from_pretrained(args.model).to(device)
            out = run_sdedit(pipeline, images, labels, held_out, args)
            out["model"] = args.model
        else:
            pipeline = DDPMInterpolationPipeline.from_pretrained(args.model).to(device)
            out = run_interpolation(pipeline, images, labels, args)
            out["model"] = args.model
        result[part] = {**run, **out, "part_seconds": time.perf_counter() - begin}
        print(f"{part}: {result[part]['part_seconds']:.0f} s", flush=True)

    result["machine"] = run["machine"]
    result["rows"] = [dict(r, part=p) for p in ("inpaint", "inpaint_conditional") for r in result.get(p, {}).get(
        "rows", [])]  # fmt: skip
    if result["rows"]:
        print_table(f"Inpainting {len(images)} held-out digits: class accuracy (mean over seeds, 95% half-width) "
                    f"and FID vs the held-out digits; seconds: wall time of {len(images)} completions, fastest seed",
                    [{k: r.get(k, "") for k in INPAINT_TABLE} for r in result["rows"]], list(INPAINT_TABLE))
    if "sdedit" in result:
        print_table(f"SDEdit (DPM-Solver++ {result['sdedit']['sampler_steps']} steps): accuracy w.r.t. the original "
                    "label and FID vs the held-out digits, mean over seeds", result["sdedit"]["rows"],
                    list(SDEDIT_TABLE))  # fmt: skip
    write_json(args.out, result)
    if "sdedit" in result:
        plot_sdedit(result["sdedit"], Path(args.figure))
        plot_sdedit_examples(result["sdedit"], Path(args.sdedit_examples_figure), size)
        print(f"wrote {args.figure}, {args.sdedit_examples_figure}")
    if "inpaint" in result:
        plot_inpaint(result, Path(args.inpaint_figure), size)
        print(f"wrote {args.inpaint_figure}")
    if "interpolation" in result:
        plot_interpolation(result["interpolation"], Path(args.interpolation_figure), size)
        print(f"wrote {args.interpolation_figure}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
