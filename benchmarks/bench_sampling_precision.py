"""What makes a conditional digits model sample badly with a good bound? Sampling precision (fp32 against bf16
autocast and bf16 weights) and where DPM-Solver starts its chain, the same initial noise, on the device at hand.

One H200-trained conditional digits model sampled far worse (85% of the requested class at guidance scale 1, FID 30)
than the CPU-trained ones (97%) with as good a bound (docs/benchmarks.md, classifier-free guidance). A good bound and
bad samples point at sampling. This measures, per mode and guidance scale, the class accuracy and FID (both digits
classifiers) of `--per_class` guided samples of each class with DPM-Solver++ 2M (the default sampler, 10 steps):
- in fp32, under bf16 autocast and with bf16 weights (a GPU run may sample in mixed precision);
- started at t=999, as diffusers builds DPM-Solver++ from a config whose `timestep_spacing` is not "leading" (its own
  default, "linspace", or "trailing"): on the cosine schedule x0 = (x - sigma eps) / alpha multiplies the model's
  error by 1 / sqrt(alphabar_999) = 2e4 there; and as ddpm-hub builds it from that config (`lambda_min_clipped`,
  a start at t=967);
and DDPM-250 in fp32 as a second sampler.

    python benchmarks/bench_sampling_precision.py --model outputs/ddpm-digits-cond [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_guidance import held_out_digits, measure_seed  # noqa: E402
from common import machine, print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODES = {  # name: (sampler, steps, autocast dtype, weights dtype, how the scheduler is built)
    "fp32": ("dpm", 10, None, None, "model"),
    "bf16 autocast": ("dpm", 10, torch.bfloat16, None, "model"),
    "bf16 weights": ("dpm", 10, None, torch.bfloat16, "model"),
    "fp32, from t=999 (diffusers, linspace spacing)": ("dpm", 10, None, None, "diffusers-linspace"),
    "fp32, from t=967 (ddpm-hub, linspace spacing)": ("dpm", 10, None, None, "ddpm-hub-linspace"),
    "fp32, DDPM-250": ("ddpm", 250, None, None, "model"),
}
COLUMNS = ["mode", "guidance_scale", "sampler", "steps", "first_timestep", "digits_mlp_accuracy",
           "digits_conv_accuracy", "digits_mlp_fid", "digits_conv_fid"]  # fmt: skip


def pipeline_for(base, sampler_name: str, built: str):
    """`base` with sampler `sampler_name`: from the model's own scheduler config (`built="model"`, as ddpm-hub samples
    it), or from that config with `timestep_spacing="linspace"` as diffusers builds it (`X.from_config`) or as
    ddpm-hub builds it (`build_scheduler`)."""
    import diffusers
    from ddpm_hub.pipelines.pipeline_class_conditional import LABEL_CONFIG

    from ddpm_hub.choices import SAMPLERS
    from ddpm_hub.sampling import build_scheduler, with_sampler

    if built == "model":
        return with_sampler(base, sampler_name)
    config = {**base.scheduler.config, "timestep_spacing": built.rsplit("-", 1)[1]}
    sampler = SAMPLERS[sampler_name]
    if built.startswith("diffusers"):
        scheduler = getattr(diffusers, sampler.scheduler).from_config(config, **sampler.config)
    else:
        scheduler = build_scheduler(sampler_name, config)
    labels = {k: base.config[k] for k in LABEL_CONFIG if k in base.config}
    return type(base)(unet=base.unet, scheduler=scheduler, **labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "outputs" / "ddpm-digits-cond"), help="a conditional folder")
    parser.add_argument("--per_class", type=int, default=50, help="samples per class and precision")
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--quick", action="store_true", help="a tiny random conditional model, seconds")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sampling_precision.json"))
    args = parser.parse_args()
    from ddpm_hub import DDPMPipeline, DDPMScheduler

    if args.quick:
        from ddpm_hub import create_unet

        torch.manual_seed(0)
        unet = create_unet("tiny", in_channels=1, out_channels=1, sample_size=8, num_class_embeds=11)
        base = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=20), cond_drop_prob=0.1,
                            id2label={i: str(i) for i in range(10)})  # fmt: skip
        args.per_class, modes = 5, {k: (s, min(n, 19), a, w, b) for k, (s, n, a, w, b) in MODES.items()}
    else:
        base, modes = DDPMPipeline.from_pretrained(args.model), MODES
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base.to(device)
    held, held_labels = held_out_digits()
    rows = []
    for name, (sampler_name, steps, autocast, weights, built) in modes.items():
        pipeline = pipeline_for(base, sampler_name, built)
        pipeline.set_progress_bar_config(disable=True)
        if weights is not None:
            pipeline.unet.to(weights)
        context = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        pipeline.scheduler.set_timesteps(steps)
        first = int(pipeline.scheduler.timesteps[0])
        try:
            for scale in args.guidance_scales:
                with context:
                    row = measure_seed(pipeline, held, held_labels, scale, args.per_class, steps, args.seed)
                rows.append({"mode": name, "guidance_scale": scale, "sampler": sampler_name, "steps": steps,
                             "first_timestep": first, **{k: v for k, v in row.items() if not isinstance(v, list)}})
                print(name, scale, {k: round(rows[-1][k], 3) for k in COLUMNS[5:]}, flush=True)
        finally:
            pipeline.unet.to(torch.float32)
    print_table(f"Sampling modes: {args.per_class} samples per class, seed {args.seed}, on {device}", rows, COLUMNS)
    write_json(args.out, {"machine": machine(), "device": str(device), "model": None if args.quick else args.model,
                          "per_class": args.per_class, "guidance_scales": args.guidance_scales, "seed": args.seed,
                          "rows": rows})  # fmt: skip

if __name__ == "__main__":
    main()
