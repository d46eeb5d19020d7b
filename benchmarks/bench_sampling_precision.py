"""Does the precision of sampling change a conditional digits model's samples? fp32 against bf16 (autocast, and
bf16 weights), the same initial noise, on the device at hand.

One H200-trained conditional digits model sampled far worse (85% of the requested class at guidance scale 1, FID 30)
than the CPU-trained ones (97%) with as good a bound (docs/benchmarks.md, classifier-free guidance). A good bound and
bad samples point at sampling; a GPU run may sample in bf16 (mixed precision) where a CPU run samples in fp32. This
measures, per precision, the class accuracy and FID (both digits classifiers) of `--per_class` guided samples of
each class with DPM-Solver++ 2M (the default sampler), and DDPM-250 in fp32 as a second sampler.

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
MODES = {  # name: (sampler, steps, autocast dtype, weights dtype)
    "fp32": ("dpm", 10, None, None),
    "bf16 autocast": ("dpm", 10, torch.bfloat16, None),
    "bf16 weights": ("dpm", 10, None, torch.bfloat16),
    "fp32, DDPM-250": ("ddpm", 250, None, None),
}
COLUMNS = ["precision", "sampler", "steps", "digits_mlp_accuracy", "digits_conv_accuracy", "digits_mlp_fid",
           "digits_conv_fid"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "outputs" / "ddpm-digits-cond"), help="a conditional folder")
    parser.add_argument("--per_class", type=int, default=50, help="samples per class and precision")
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--quick", action="store_true", help="a tiny random conditional model, seconds")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sampling_precision.json"))
    args = parser.parse_args()
    from ddpm_hub import DDPMPipeline, DDPMScheduler
    from ddpm_hub.sampling import with_sampler

    if args.quick:
        from ddpm_hub import create_unet

        torch.manual_seed(0)
        unet = create_unet("tiny", in_channels=1, out_channels=1, sample_size=8, num_class_embeds=11)
        base = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=20), cond_drop_prob=0.1,
                            id2label={i: str(i) for i in range(10)})  # fmt: skip
        args.per_class, modes = 5, {k: (s, min(n, 19), a, w) for k, (s, n, a, w) in MODES.items()}
    else:
        base, modes = DDPMPipeline.from_pretrained(args.model), MODES
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base.to(device)
    held, held_labels = held_out_digits()
    rows = []
    for name, (sampler_name, steps, autocast, weights) in modes.items():
        pipeline = with_sampler(base, sampler_name)
        pipeline.set_progress_bar_config(disable=True)
        if weights is not None:
            pipeline.unet.to(weights)
        context = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        try:
            with context:
                row = measure_seed(pipeline, held, held_labels, args.guidance_scale, args.per_class, steps, args.seed)
        finally:
            pipeline.unet.to(torch.float32)
        rows.append({"precision": name, "sampler": sampler_name, "steps": steps,
                     **{k: v for k, v in row.items() if not isinstance(v, list)}})  # fmt: skip
        print(name, {k: round(rows[-1][k], 3) for k in COLUMNS[3:]}, flush=True)
    print_table(f"Sampling precision: {args.per_class} samples per class at guidance scale {args.guidance_scale:g}, "
                f"seed {args.seed}, on {device}", rows, COLUMNS)  # fmt: skip
    write_json(args.out, {"machine": machine(), "device": str(device), "model": None if args.quick else args.model,
                          "per_class": args.per_class, "guidance_scale": args.guidance_scale, "seed": args.seed,
                          "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
