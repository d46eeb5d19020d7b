"""`python -m ddpm_hub {sample,evaluate,push,plot}`: sample grids, bits/dim and FID, Hub pushes, pictures.

Models load with safetensors only, from a local folder, a Hub id or the cache (`HF_HUB_OFFLINE=1`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
}


def load_pipeline(model: str, scheduler: str = "ddpm", device: str | None = None):
    """A DDPMPipeline from a folder or Hub id, with the chosen scheduler built from its config."""
    import diffusers

    from ddpm_hub import DDPMPipeline, DDPMScheduler

    pipeline = DDPMPipeline.from_pretrained(model)
    if scheduler != "ddpm":
        cls = getattr(diffusers, SCHEDULERS[scheduler])
        pipeline.scheduler = cls.from_config(pipeline.scheduler.config)
    elif not isinstance(pipeline.scheduler, DDPMScheduler):
        pipeline.scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    if device:
        pipeline.to(device)
    return pipeline


def _grid(images, path: Path, upscale: int = 1) -> Path:
    from ddpm_hub.plots import image_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, upscale=upscale, pad=2 if upscale > 1 else 0).save(path)
    return path


def cmd_sample(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args.model, args.scheduler, args.device)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    images = []
    for start in range(0, args.num_images, args.batch_size):
        n = min(args.batch_size, args.num_images - start)
        images += pipeline(batch_size=n, generator=generator, num_inference_steps=args.steps).images
    print(f"wrote {_grid(images, Path(args.out), args.upscale)}")
    return 0


def _load_eval_images(args: argparse.Namespace, channels: int, resolution: int) -> torch.Tensor:
    from ddpm_hub.config import DataConfig
    from ddpm_hub.data import ImageDataset, load_splits, validate_images

    if args.dataset and Path(args.dataset).is_dir():
        data = DataConfig(train_data_dir=args.dataset, split=args.split, image_column=args.image_column)
    else:
        data = DataConfig(dataset_name=args.dataset, split=args.split, image_column=args.image_column)
    ds, _ = load_splits(data)
    if args.num_images:
        ds = ds.select(range(min(args.num_images, len(ds))))
    images, _, _ = validate_images(ImageDataset(ds, args.image_column, resolution, channels, name=args.split))
    return images


def cmd_evaluate(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args.model, "ddpm", args.device)
    cfg = pipeline.unet.config
    images = _load_eval_images(args, cfg.in_channels, cfg.sample_size)
    results: dict[str, float] = {"num_images": len(images)}
    if args.bpd or args.bpd_estimate:
        g = torch.Generator().manual_seed(args.seed)
        out = pipeline.bits_per_dim(images, batch_size=args.batch_size, generator=g, estimate=args.bpd_estimate)
        key = "bits_per_dim_estimate" if args.bpd_estimate else "bits_per_dim"
        results[key] = float(out.total.mean())
        if out.stderr is not None:
            results[key + "_stderr"] = float((out.stderr**2).sum().sqrt() / len(images))
        if out.terms is not None and args.vlb_plot:
            from ddpm_hub.plots import vlb_terms_plot

            vlb_terms_plot(out.terms, args.vlb_plot)
    if args.fid or args.inception_score:
        from ddpm_hub.metrics import frechet_inception_distance, inception_score

        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        fake = []
        for start in range(0, len(images), args.batch_size):
            n = min(args.batch_size, len(images) - start)
            fake.append(
                pipeline(batch_size=n, generator=generator, num_inference_steps=args.steps, output_type="pt").images
            )
        if args.fid:
            results["fid"] = frechet_inception_distance(images.split(args.batch_size), fake)
        if args.inception_score:
            results["inception_score"], results["inception_score_std"] = inception_score(fake)
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from ddpm_hub.hub_push import push_pipeline_folder

    url = push_pipeline_folder(args.folder, args.repo_id, private=args.private)
    print(f"pushed {args.folder} to {url}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from ddpm_hub import plots

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
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
    elif args.kind == "reverse":
        if not args.model:
            print("error: plot reverse needs --model", file=sys.stderr)
            return 2
        pipeline = load_pipeline(args.model, "ddpm", args.device)
        result = pipeline(
            batch_size=1,
            generator=torch.Generator().manual_seed(args.seed),
            num_inference_steps=args.steps,
            output_type="pt",
            return_intermediates=True,
        )
        inter = result["intermediates"]
        plots.reverse_process_strip(
            inter["samples"], inter["pred_original_samples"], pipeline.scheduler.timesteps, scale=8
        ).save(out)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddpm_hub", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="sample a grid of images")
    s.add_argument("--model", required=True, help="a pipeline folder or Hub id")
    s.add_argument("--num_images", type=int, default=16)
    s.add_argument("--steps", type=int, default=1000, help="denoising steps")
    s.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddpm")
    s.add_argument("--batch_size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None)
    s.add_argument("--upscale", type=int, default=1, help="enlarge each image (nearest) for viewing small images")
    s.add_argument("--out", default="grid.png")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("evaluate", help="bits/dim (full or estimate) and FID on a data set")
    e.add_argument("--model", required=True)
    e.add_argument("--dataset", default="digits", help="'digits', a Hub dataset id, or an image folder")
    e.add_argument("--split", default="test")
    e.add_argument("--image_column", default="image")
    e.add_argument("--num_images", type=int, default=0, help="0: all")
    e.add_argument("--bpd", action="store_true", help="the full bound over all T steps")
    e.add_argument("--bpd_estimate", action="store_true", help="the fast unbiased estimate")
    e.add_argument("--fid", action="store_true", help="FID against the data (Inception features)")
    e.add_argument("--inception_score", action="store_true", help="Inception Score of samples (Inception logits)")
    e.add_argument("--steps", type=int, default=1000)
    e.add_argument("--batch_size", type=int, default=64)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default=None)
    e.add_argument("--vlb_plot", default=None, help="write a PNG of the per-step VLB terms (with --bpd)")
    e.add_argument("--out", default=None, help="also write the results as JSON")
    e.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("push", help="push a trained pipeline folder to the Hub (token from HF_TOKEN or login)")
    p.add_argument("--folder", required=True)
    p.add_argument("--repo_id", required=True)
    p.add_argument("--private", action="store_true")
    p.set_defaults(func=cmd_push)

    g = sub.add_parser("plot", help="pictures: forward/reverse process strips, noise schedules")
    g.add_argument("kind", choices=["forward", "reverse", "schedules"])
    g.add_argument("--model", default=None)
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--beta_schedule", default="linear")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None)
    g.add_argument("--out", default="plot.png")
    g.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ddpm_hub.data import DataError
    from ddpm_hub.hub_push import HubError

    try:
        return args.func(args)
    except (DataError, HubError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
