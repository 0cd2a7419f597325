"""Train the built-in tiny text-to-image model on scikit-learn's handwritten digits.

The model has the Stable Diffusion 1.x architecture at a tiny size: a CLIP text encoder
(transformers `CLIPTextModel`, the real CLIP vocabulary and tokenizer), a KL autoencoder
(diffusers `AutoencoderKL`, 32x32 RGB pixels <-> 4x8x8 latents) and a text-conditioned
`UNet2DConditionModel` that works in the autoencoder's scaled latent space with SD's noise
schedule (scaled_linear, 0.00085-0.012, 1000 steps, epsilon prediction). It learns from the
1,797 8x8 digits in `sklearn.datasets.load_digits` (no download), rendered at 32x32 with random
rotation/scale/shift and one of five looks the prompt controls: black ink on white (the default),
red, green or blue ink on white, and white ink on black ("white on black", "inverted"). Captions
are what people type ("a handwritten digit seven", "the number 7", "7", "a red handwritten digit
seven", "7, white on black"); 15 % are empty so classifier-free guidance and negative prompts work.

Reproduce the shipped weights exactly (CPU only, 2 threads; about 24 CPU-minutes, so roughly
12-15 minutes on 2 idle cores — 45 minutes measured while the 2-core machine was shared with 4-6
other jobs):

    . .venv/bin/activate
    python training/train_digits.py --out coreml_sd/data/builtin

It writes `digits.safetensors` (one file, original CompVis/AUTOMATIC1111 key layout, fp16) and
`digits.coreml-sd.json` (its config) there. Everything is seeded (`--seed 0`), runs on CPU with
a fixed thread count and deterministic algorithms, so the same torch version on the same kind of
CPU gives the same bytes; the defaults are the shipped settings.

Stages: (1) render a fixed bank of augmented images; (2) train the autoencoder on it; (3) encode
the bank, scaling factor = 1 / std of the latents (as SD's 0.18215 was chosen); (4) train the UNet
and the text encoder together on latents, with min-SNR loss weighting and an EMA of the weights;
(5) export the EMA weights.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import resource
import sys
import time
from pathlib import Path

# Before torch loads OpenMP: idle threads sleep instead of spinning, which otherwise burns the
# other core (and multiplies the wall time) whenever the machine is shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coreml_sd.tokenizer import CLIPTokenizer  # noqa: E402

IMAGE_SIZE = 32
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=[32, 64],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[16, 32, 32],
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
)
TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=32,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# name: (ink RGB, paper RGB, share of the data, chance the caption names the look)
STYLES = {
    "black": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 0.40, 0.3),
    "red": ((0.85, 0.08, 0.08), (1.0, 1.0, 1.0), 0.15, 0.9),
    "green": ((0.05, 0.55, 0.15), (1.0, 1.0, 1.0), 0.15, 0.9),
    "blue": ((0.10, 0.20, 0.90), (1.0, 1.0, 1.0), 0.15, 0.9),
    "inverted": ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), 0.15, 0.9),
}
STYLE_NAMES = tuple(STYLES)
CORE_FORMS = ("handwritten digit {w}", "handwritten digit {n}", "digit {w}", "digit {n}", "number {n}",
              "number {w}", "handwritten {w}", "handwritten number {n}", "{n}", "{w}")
ADJECTIVES = {"black": ("black",), "red": ("red",), "green": ("green",), "blue": ("blue",),
              "inverted": ("white", "inverted")}
SUFFIXES = {
    "black": (" in black ink", ", black on white", " on a white background", " in black", ", black"),
    "inverted": (", white on black", " white on black", " on a black background", " in white on black",
                 ", inverted colors", " in white ink on black"),
}
PREFIXES = ("a drawing of ", "an image of ", "a picture of ", "a photo of ")
EMPTY_SHARE = 0.15
DESCRIPTION = ("coreml-sd built-in model: handwritten digits 0-9 at 32x32 (scikit-learn load_digits), ink colour "
               "and white-on-black from the prompt; trained by training/train_digits.py")


def suffixes(style: str) -> tuple[str, ...]:
    return SUFFIXES.get(style, (f" in {style}", f" in {style} ink", f", {style}", f" written in {style}"))


def caption(digit: int, style: str, rng: random.Random) -> str:
    """A prompt someone might type for this image; empty for the unconditional share."""
    if rng.random() < EMPTY_SHARE:
        return ""
    form = rng.choice(CORE_FORMS)
    core = form.format(w=WORDS[digit], n=digit)
    bare = form.startswith("{")  # "7", "seven": rarely with an article
    article = rng.choice(("", "", "a ")) if bare else rng.choice(("a ", "the ", ""))
    text = None
    if rng.random() < STYLES[style][3]:
        if rng.random() < (0.3 if style == "inverted" else 0.5):
            text = f"{article}{rng.choice(ADJECTIVES[style])} {core}"
        else:
            text = f"{article}{core}{rng.choice(suffixes(style))}"
    text = text or f"{article}{core}"
    if rng.random() < 0.15:
        text = rng.choice(PREFIXES) + text
    return text


# ---------------------------------------------------------------------------------------------
# 1. data


def render(ink8: torch.Tensor, styles: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """8x8 ink maps (N, 8, 8) in [0, 1] -> augmented (N, 3, 32, 32) RGB in [-1, 1]."""
    n = ink8.shape[0]

    def uniform(scale):
        return (torch.rand(n, generator=gen) * 2 - 1) * scale

    angle, scale = uniform(math.radians(12)), 1 + uniform(0.12)
    shift_x, shift_y = uniform(0.10), uniform(0.10)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    src = F.pad(ink8[:, None], (2, 2, 2, 2))  # (N, 1, 12, 12): room to rotate and shrink
    grid = F.affine_grid(theta, (n, 1, IMAGE_SIZE, IMAGE_SIZE), align_corners=False)
    # The 8 digit pixels fill 26 of the 32 output pixels at scale 1: a margin like the originals'.
    grid = grid * (8 / 12) * (IMAGE_SIZE / 26)
    ink = F.grid_sample(src, grid, mode="bicubic", padding_mode="zeros", align_corners=False)
    ink = ((ink - 0.05) / 0.75).clamp(0, 1)  # (N, 1, 32, 32): a little crisper than plain bicubic
    ink_rgb = torch.tensor([STYLES[s][0] for s in STYLE_NAMES])[styles][:, :, None, None]
    paper = torch.tensor([STYLES[s][1] for s in STYLE_NAMES])[styles][:, :, None, None]
    return (paper + (ink_rgb - paper) * ink) * 2 - 1


def make_bank(variants: int, seed: int, limit: int | None = None):
    """`variants` augmented renders of each of the 1,797 digits (or the first `limit`), each with a random look."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink8 = torch.tensor(digits.images[:limit], dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target[:limit], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    shares = torch.tensor([STYLES[s][2] for s in STYLE_NAMES])
    images, all_labels, all_styles = [], [], []
    for _ in range(variants):
        styles = torch.multinomial(shares, len(labels), replacement=True, generator=gen)
        images.append(render(ink8, styles, gen))
        all_labels.append(labels)
        all_styles.append(styles)
    return torch.cat(images), torch.cat(all_labels), torch.cat(all_styles)


# ---------------------------------------------------------------------------------------------
# 2. autoencoder


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(images: torch.Tensor, *, steps: int, batch: int, lr: float, kl_weight: float, seed: int, device: str,
              log):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=gen)].to(device)
        post = vae.encode(x).latent_dist
        eps = torch.randn(post.mean.shape, generator=gen).to(device)
        rec = vae.decode(post.mean + post.std * eps).sample
        rec_loss = F.mse_loss(rec, x) + F.l1_loss(rec, x)
        loss = rec_loss + kl_weight * post.kl().mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} rec {rec_loss.item():.4f} kl {post.kl().mean().item():.1f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_bank(vae, images: torch.Tensor, device: str, batch: int = 512):
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(images[i:i + batch].to(device)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    return torch.cat(means), torch.cat(stds)


# ---------------------------------------------------------------------------------------------
# 3. UNet + text encoder


def sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(SCHEDULER["beta_start"] ** 0.5, SCHEDULER["beta_end"] ** 0.5,
                           SCHEDULER["num_train_timesteps"], dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class CaptionIds:
    """Caption -> 77 token ids, cached (the pure-Python tokenizer equals transformers')."""

    def __init__(self):
        self.tokenizer = CLIPTokenizer()
        self.cache: dict[str, list[int]] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for t in texts:
            if t not in self.cache:
                self.cache[t] = self.tokenizer(t)
            rows.append(self.cache[t])
        return torch.tensor(rows, dtype=torch.long)


def encode_text(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """Encode each distinct caption once: a batch of 256 has far fewer distinct ones."""
    unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
    return text_encoder(unique)[0][inverse]


def ema_update(ema, model, decay: float):
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_unet(lat_mean, lat_std, labels, styles, scale: float, *, steps: int, batch: int, lr: float,
               seed: int, device: str, log):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG).to(device)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).to(device)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    alphas_cumprod = sd_alphas_cumprod()
    gen = torch.Generator().manual_seed(seed + 1)
    rng = random.Random(seed + 2)
    ids_of = CaptionIds()
    for step in range(steps):
        idx = torch.randint(0, len(labels), (batch,), generator=gen)
        latents = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scale
        texts = [caption(int(labels[i]), STYLE_NAMES[int(styles[i])], rng) for i in idx]
        t = torch.randint(0, len(alphas_cumprod), (batch,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        a = alphas_cumprod[t][:, None, None, None]
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        noisy, noise, t_dev = noisy.to(device), noise.to(device), t.to(device)
        context = encode_text(text_encoder, ids_of(texts).to(device))
        pred = unet(noisy, t_dev, encoder_hidden_states=context).sample
        snr = (alphas_cumprod[t] / (1 - alphas_cumprod[t])).to(device)
        weight = snr.clamp(max=5.0) / snr  # min-SNR-5 (Hang et al. 2023): faster, steadier training
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f}")
    return ema_text.eval().cpu(), ema_unet.eval().cpu()


# ---------------------------------------------------------------------------------------------
# 4. export


def save_diffusers(path: Path, text_encoder, unet, vae, scaling_factor: float) -> Path:
    """A diffusers folder (for checks with diffusers' own pipeline and schedulers)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer as HFTokenizer

    clip = REPO / "coreml_sd" / "data" / "clip"
    vae.register_to_config(scaling_factor=scaling_factor)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, unet=unet,
        tokenizer=HFTokenizer(str(clip / "vocab.json"), str(clip / "merges.txt")),
        scheduler=PNDMScheduler.from_config(dict(SCHEDULER, skip_prk_steps=True)),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the checkpoint and its config")
    parser.add_argument("--diffusers-out", type=Path, default=None, help="also save a diffusers folder here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", type=int, default=8, help="augmented renders per digit")
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--vae-batch", type=int, default=64)
    parser.add_argument("--unet-steps", type=int, default=2000)
    parser.add_argument("--unet-batch", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="only the first N digits (quick checks)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the UNet + text encoder")
    parser.add_argument("--device", default="cpu",
                        help="cpu for the shipped weights; cuda only to try recipe changes quickly")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(args.device == "cpu")
    start = time.perf_counter()

    def log(msg):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = usage.ru_utime + usage.ru_stime
        print(f"[wall {time.perf_counter() - start:7.1f}s cpu {cpu:7.1f}s] {msg}", flush=True)

    images, labels, styles = make_bank(args.variants, args.seed, args.limit)
    log(f"bank: {tuple(images.shape)} images")
    vae = train_vae(images, steps=args.vae_steps, batch=args.vae_batch, lr=1e-3, kl_weight=1e-5,
                    seed=args.seed, device=args.device, log=log)
    lat_mean, lat_std = encode_bank(vae, images, args.device)
    vae = vae.cpu()
    gen = torch.Generator().manual_seed(args.seed + 3)
    sampled = lat_mean + lat_std * torch.randn(lat_mean.shape, generator=gen)
    scaling_factor = float(f"{1.0 / sampled.std().item():.5f}")
    log(f"latents {tuple(lat_mean.shape)} std {sampled.std().item():.4f} -> scaling factor {scaling_factor}")
    text_encoder, unet = train_unet(lat_mean, lat_std, labels, styles, scaling_factor, steps=args.unet_steps,
                                    batch=args.unet_batch, lr=args.lr, seed=args.seed + 10, device=args.device,
                                    log=log)
    if args.diffusers_out:
        save_diffusers(args.diffusers_out, text_encoder, unet, vae, scaling_factor)
        log(f"diffusers folder: {args.diffusers_out}")
    export(args.out, text_encoder, unet, vae, scaling_factor, log)
    log("done")
    return 0


def export(out: Path, text_encoder, unet, vae, scaling_factor: float, log) -> None:
    """One single-file checkpoint (original key layout, fp16) and its config beside it."""
    from coreml_sd.checkpoint import config_from_modules, write_original_checkpoint
    from coreml_sd.config import SchedulerConfig

    out.mkdir(parents=True, exist_ok=True)
    vae.register_to_config(scaling_factor=scaling_factor)
    config = config_from_modules(text_encoder, unet, vae, family="sd1", scheduler=SchedulerConfig.from_dict(SCHEDULER),
                                 description=DESCRIPTION)
    ckpt = write_original_checkpoint(out / "digits.safetensors", text_encoder=text_encoder, unet=unet, vae=vae,
                                     dtype="fp16")
    config.write(out / "digits.coreml-sd.json")
    log(f"wrote {ckpt} ({ckpt.stat().st_size / 1e6:.2f} MB) and {out / 'digits.coreml-sd.json'}")


if __name__ == "__main__":
    raise SystemExit(main())
