"""Training throughput: our trainer's step against the stock diffusers example-style step, same model and batch.

    python benchmarks/bench_train.py [--quick] [--out benchmarks/results/train.json]

Prints a table (images/s, medians and spread, fraction of the FLOP floor, peak RSS) and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, benchmark_trainer, machine, matmul_gflops, median_time, print_table, unet_flops, write_json  # noqa: E402


def stock_step_fn(unet, accelerator, batch: int, channels_last: bool = False, compiled: bool = False):
    """diffusers' examples/unconditional_image_generation step: add_noise, MSE, AdamW, clip, EMAModel, and the
    loss read back with `.item()` for the progress bar and logs, as the example does every step. The accelerator
    brings mixed precision (and compiles the model in `prepare` when its dynamo plugin is set: `compiled`)."""
    import copy

    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    model = copy.deepcopy(unet).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=0, num_training_steps=1000)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    ema = EMAModel(
        model.parameters(),
        decay=0.9999,
        use_ema_warmup=True,
        inv_gamma=1.0,
        power=0.75,
        model_cls=type(unet),
        model_config=unet.config,
    )
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    cfg = unet.config
    clean = torch.rand(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=accelerator.device) * 2 - 1

    def step():
        noise = torch.randn(clean.shape, device=clean.device)
        timesteps = torch.randint(0, 1000, (batch,), device=clean.device).long()
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        if channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with accelerator.accumulate(model):
            model_output = model(noisy, timesteps).sample
            loss = F.mse_loss(model_output.float(), noise.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        ema.step(model.parameters())
        return loss.detach().item()  # the example logs the loss every step

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke version for CI")
    parser.add_argument("--out", default="benchmarks/results/train.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rate = matmul_gflops(1024 if args.quick else 2048)
    cases = (
        [("digits", 8, 16, 3), ("digits", 8, 128, 3), ("cifar10", 32, 2, 1)]
        if args.quick
        else [("digits", 8, 16, 15), ("digits", 8, 128, 9), ("cifar10", 32, 8, 3), ("cifar10", 32, 16, 3)]
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset, resolution, batch, repeats in cases:
            ours, trainer = benchmark_trainer(preset, resolution, batch, f"{tmp}/{preset}-{batch}")
            unet, accelerator = trainer.accelerator.unwrap_model(trainer.unet), trainer.accelerator
            stock = stock_step_fn(unet, accelerator, batch)
            flops = unet_flops(unet, 1, backward=True)
            floor = rate * 1e9 / flops  # images/s if every FLOP ran at the matmul rate
            for name, fn in (("stock", stock), ("ours", ours)):
                with PeakRSS() as mem:
                    t = median_time(fn, repeats, warmup=2)
                ips = batch / t["median"]
                rows.append(
                    {
                        "model": preset,
                        "batch": batch,
                        "path": name,
                        "images_per_s": ips,
                        "spread_images_per_s": f"{batch / t['max']:.3g}-{batch / t['min']:.3g}",
                        "floor_fraction": ips / floor,
                        "floor_images_per_s": floor,
                        "gflop_per_image": flops / 1e9,
                        "peak_rss_mib": mem.peak_mib,
                        "repeats": repeats,
                    }
                )
            stock_ips = rows[-2]["images_per_s"]
            rows[-1]["speedup_vs_stock"] = rows[-1]["images_per_s"] / stock_ips
    print_table(
        f"Training throughput (matmul {rate:.0f} GFLOP/s)",
        rows,
        [
            "model",
            "batch",
            "path",
            "images_per_s",
            "spread_images_per_s",
            "speedup_vs_stock",
            "floor_fraction",
            "peak_rss_mib",
        ],
    )
    write_json(args.out, {"machine": machine(), "matmul_gflops": rate, "rows": rows})


if __name__ == "__main__":
    main()
