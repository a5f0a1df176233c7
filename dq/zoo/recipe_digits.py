"""The recipes that trained dq's embedded models on scikit-learn's real handwritten digits: a small DDPM
UNet (unconditional), a small class-conditional DiT (diffusers DiTTransformer2DModel), and a small
PixArt-shaped transformer (diffusers PixArtTransformer2DModel: adaLN-single, cross-attention to a caption).

    python -m dq.zoo.recipe_digits --out dq/zoo/embedded              # 2,400 steps: ~18 min on 2 idle CPU cores
    python -m dq.zoo.recipe_digits --arch dit --out dq/zoo/embedded_dit
    python -m dq.zoo.recipe_digits --arch pixart --out dq/zoo/embedded_pixart

They write `<out>/unet/` (or `<out>/transformer/`) and `<out>/scheduler/` (diffusers `save_pretrained`
layout, safetensors) with the EMA weights, and `<out>/training_record.json` (arguments, final loss, wall
time, versions). Training is plain DDPM: epsilon-prediction MSE at uniform timesteps, no augmentation, Adam,
EMA of the weights. The DiT sees each image's label, replaced by the null class (10) with probability
--label-dropout, so that it also learns the unconditional prediction classifier-free guidance needs. The
PixArt-shaped model gets the same labels as "captions": a fixed table of random token embeddings [11, L, D]
(one caption of L tokens a label, row 10 the null caption, drawn from --seed), written to
`<out>/class_embedder/embeddings.safetensors`, which dq reads as the model's conditioning.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DModel
from safetensors.torch import save_file

from dq import cli
from dq.arch.text_conditioning import pack_text_conditioning
from dq.data import DIGITS_SIZE, load_digit_images
from dq.io import staged_dir, write_json


def embedded_unet_config(sample_size: int = DIGITS_SIZE) -> dict:
    """UNet2DModel arguments: the block types of google/ddpm-cifar10-32 (attention at the middle
    resolution and in the mid block) at a small width, for 1-channel images of side `sample_size`."""
    return {
        "sample_size": sample_size,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
        "norm_eps": 1e-6,
        "attention_head_dim": None,  # one head per attention layer, as in ddpm-cifar10-32
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
    }


NULL_CLASS = 10  # the DiT's "no label" class (classifier-free guidance); the digits are classes 0..9


def _transformer_config(sample_size: int) -> dict:
    """What the embedded transformers share: 1-channel images in, epsilon out (no learned variance), patch 2
    (64 tokens at 16x16), width 96 (4 heads of 24), depth 4."""
    return {"sample_size": sample_size, "in_channels": 1, "out_channels": 1, "patch_size": 2,
            "num_attention_heads": 4, "attention_head_dim": 24, "num_layers": 4}


def embedded_dit_config(sample_size: int = DIGITS_SIZE) -> dict:
    """DiTTransformer2DModel arguments: adaLN-Zero blocks, 10 classes + the null class (`_transformer_config`)."""
    return {
        **_transformer_config(sample_size),
        "num_embeds_ada_norm": NULL_CLASS,  # diffusers adds the null row: the label table has 11 rows
        "norm_type": "ada_norm_zero",
    }


CAPTION_TOKENS, CAPTION_CHANNELS = 8, 32  # the PixArt-shaped model's label "captions": 8 tokens of 32 features


def embedded_pixart_config(sample_size: int = DIGITS_SIZE) -> dict:
    """PixArtTransformer2DModel arguments: adaLN-single blocks with cross-attention to a caption of
    CAPTION_TOKENS tokens (CAPTION_CHANNELS features, projected to the width), no resolution conditioning
    (`_transformer_config`)."""
    return {
        **_transformer_config(sample_size),
        "cross_attention_dim": 96,
        "caption_channels": CAPTION_CHANNELS,
        "num_embeds_ada_norm": 1000,  # required by the constructor; adaLN-single does not use it
        "norm_type": "ada_norm_single",
        "use_additional_conditions": False,
        "interpolation_scale": 1,
    }


def caption_table(seed: int) -> torch.Tensor:
    """[NULL_CLASS + 1, CAPTION_TOKENS, CAPTION_CHANNELS]: label k's caption embedding (row 10: the null caption)."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn(NULL_CLASS + 1, CAPTION_TOKENS, CAPTION_CHANNELS, generator=generator)


def build_model(arch: str) -> torch.nn.Module:
    if arch == "dit":
        return DiTTransformer2DModel(**embedded_dit_config())
    if arch == "pixart":
        return PixArtTransformer2DModel(**embedded_pixart_config())
    return UNet2DModel(**embedded_unet_config())


def embedded_scheduler_config() -> dict:
    """DDPMScheduler arguments: the training noise schedule of google/ddpm-cifar10-32."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "variance_type": "fixed_large",
        "clip_sample": True,
    }


def learning_rate_at(step: int, base_lr: float, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to 10% of `base_lr`."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for ema_param, param in zip(ema_model.parameters(), model.parameters()):
        ema_param.lerp_(param, 1.0 - decay)


def save_model_folder(unet: torch.nn.Module, scheduler: DDPMScheduler, out: Path, denoiser: str = "unet",
                      captions: torch.Tensor | None = None) -> None:
    """Write `out/<denoiser>`, `out/scheduler` (and `out/class_embedder` with `captions`); each folder is
    written beside and renamed into place."""
    for name, part in ((denoiser, unet), ("scheduler", scheduler)):
        with staged_dir(out / name) as staging:
            part.save_pretrained(staging)
    if captions is not None:
        with staged_dir(out / "class_embedder") as staging:
            save_file({"weight": captions.contiguous()}, str(Path(staging) / "embeddings.safetensors"))


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    images, labels = load_digit_images(size=DIGITS_SIZE)  # [1797, 1, 16, 16] in [-1, 1], [1797]
    dit = args.arch in ("dit", "pixart")  # a class-conditional transformer
    unet = build_model(args.arch)
    folder = "transformer" if dit else "unet"
    captions = caption_table(args.seed) if args.arch == "pixart" else None
    if dit:  # eval mode: the labels are dropped here (seeded), not by diffusers' own train-mode label dropout
        unet.eval()
    scheduler = DDPMScheduler(**embedded_scheduler_config())
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.Adam(unet.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    num_params = sum(p.numel() for p in unet.parameters())
    print(f"{type(unet).__name__} with {num_params:,} parameters; {len(images)} training images", flush=True)

    start, smoothed_loss = time.time(), None
    for step in range(args.steps):
        index = torch.randint(0, len(images), (args.batch_size,), generator=generator)
        clean = images[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        if dit:
            label = labels[index].clone()
            label[torch.rand(args.batch_size, generator=generator) < args.label_dropout] = NULL_CLASS
            if captions is None:
                prediction = unet(noisy, timestep=timesteps, class_labels=label).sample
            else:
                prediction = unet(noisy, timestep=timesteps, encoder_hidden_states=captions[label],
                                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        else:
            prediction = unet(noisy, timesteps).sample
        loss = F.mse_loss(prediction, noise)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, args.lr, args.steps, args.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        # Short EMA horizon early on, so the EMA is not dominated by the random initialisation.
        update_ema(ema_unet, unet, min(args.ema_decay, (1 + step) / (10 + step)))
        smoothed_loss = loss.item() if smoothed_loss is None else 0.98 * smoothed_loss + 0.02 * loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps} loss {smoothed_loss:.4f} "
                  f"lr {optimizer.param_groups[0]['lr']:.2e} {time.time() - start:.0f}s", flush=True)
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
            save_model_folder(ema_unet, scheduler, Path(args.out), folder, captions)

    wall_time_s = time.time() - start
    save_model_folder(ema_unet, scheduler, Path(args.out), folder, captions)
    record = {
        "command": "python -m dq.zoo.recipe_digits " + " ".join(sys.argv[1:]),
        "arguments": vars(args),
        "num_parameters": num_params,
        "final_loss_smoothed": smoothed_loss,
        "wall_time_s": round(wall_time_s, 1),
        "dataset": "sklearn.datasets.load_digits via dq.data.load_digit_images(size=16), 1,797 images",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "python": platform.python_version()},
    }
    if dit:  # do the samples show the digit asked for? (dq's digit classifier, per guidance scale)
        record["class_accuracy"] = {str(g): round(class_accuracy(ema_unet, dict(scheduler.config), g,
                                                                 captions=captions), 4)
                                    for g in args.eval_guidance}
        print(f"class accuracy of 200 samples per guidance scale: {record['class_accuracy']}", flush=True)
    write_json(Path(args.out) / "training_record.json", record)
    return record


@torch.no_grad()
def class_accuracy(model: torch.nn.Module, scheduler_config: dict, guidance_scale: float, num_samples: int = 200,
                   seed: int = 0, captions: torch.Tensor | None = None) -> float:
    """The share of `num_samples` samples (25-step quad DDIM, sample k asks for class k % 10, classifier-free
    guidance at `guidance_scale` against the null class; with `captions`, the labels' caption embeddings)
    that dq's digit classifier reads as the class asked."""
    from dq.metrics.digit_classifier import accuracy, load_classifier
    from dq.sampling import SamplerConfig, sample

    sampler = SamplerConfig(name="ddim", num_steps=25, eta=0.0, spacing="quad", guidance_scale=guidance_scale)
    labels = torch.arange(num_samples) % 10
    cond, uncond = labels, torch.full((num_samples,), NULL_CLASS)
    if captions is not None:  # packed with an all-ones attention mask, as dq conditions a PixArt model
        cond, uncond = (pack_text_conditioning(captions[k], torch.ones(len(k), CAPTION_TOKENS)) for k in (cond, uncond))
    images = sample(model, scheduler_config, sampler, num_samples, seed=seed, batch_size=100, progress=False,
                    cond=cond, uncond=uncond)
    classifier, _ = load_classifier()
    return accuracy(classifier, images.clamp(-1.0, 1.0), labels)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="model folder to write (unet/ or transformer/, scheduler/)")
    parser.add_argument("--arch", choices=("unet", "dit", "pixart"), default="unet")
    parser.add_argument("--label-dropout", type=float, default=0.1, help="dit, pixart: share of labels set to the null class")
    parser.add_argument("--eval-guidance", type=float, nargs="*", default=[1.0, 2.0, 4.0],
                        help="dit, pixart: guidance scales at which the samples' class accuracy is recorded")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--checkpoint-every", type=int, default=500, help="0 disables intermediate saves")
    return parser.parse_args(argv)


@cli.entry
def main(argv: list[str]) -> None:
    record = train(parse_args(argv))
    print(json.dumps({k: record[k] for k in ("num_parameters", "final_loss_smoothed", "wall_time_s")}))


if __name__ == "__main__":
    main()
