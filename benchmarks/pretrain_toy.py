"""Pretrain the built-in `toy` model: a Stable Diffusion layout (AutoencoderKL, CLIP text encoder and
tokenizer, UNet2DConditionModel, DDIM scheduler) trained from scratch on the toy world
(dreambooth_ray/toyworld.py), on a CPU, within a time budget. Seeded; one thread by default.

Stages (each budgeted by wall time, so --minutes bounds the run):
  1. the toy-world judge (classifier of class, colour, scene, pattern)   --judge-seconds
  2. the VAE (32 px -> 8x8x4 latents)                                     --vae-share of --minutes
  3. text encoder + UNet, epsilon prediction, 10% empty captions for CFG  the rest of --minutes
Then it samples prompts naming a class, a colour and a scene and reports how often the judge
recognises each (competence), and writes:
  OUT/pipeline/   a diffusers folder (StableDiffusionPipeline.save_pretrained, safetensors)
  OUT/judge.safetensors, OUT/pretrain.json

  nice -n 19 python benchmarks/pretrain_toy.py --minutes 40 --out dreambooth_ray/assets/toy
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreambooth_ray import toyworld as tw  # noqa: E402

EXTRA_WORDS = ("cup", "ball", "plain", "background")
MAX_TOKENS = 16  # the longest caption is 10 tokens; cross-attention over 16, not 77


def write_toy_tokenizer(path: Path) -> None:
    """The tiny CLIP BPE tokenizer, extended with the toy-world words it lacks. cup and ball become one
    token each; plain and background stay several pieces (earlier merges such as "g r" win), harmless."""
    from dreambooth_ray import tiny

    tiny.write_tokenizer(path)
    vocab = json.loads((path / "vocab.json").read_text())
    specials = [t for t in ("<|startoftext|>", "<|endoftext|>")]
    for s in specials:
        vocab.pop(s)
    merges = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
    mset = set(merges)
    for word in EXTRA_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        acc = pieces[0]
        for p in pieces[1:]:
            m = f"{acc} {p}"
            if m not in mset:
                merges.append(m)
                mset.add(m)
            acc = acc + p
            if acc not in vocab:
                vocab[acc] = len(vocab)
    for s in specials:
        vocab[s] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["model_max_length"] = MAX_TOKENS
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def build(tokenizer, seed: int):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=16, sample_size=tw.RESOLUTION,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=tw.RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(48, 96), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=16,
    )
    return vae, text_encoder, unet


def scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def train_vae(vae, x_all, seconds: float, batch: int, log):
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    t0, step = time.time(), 0
    vae.train()
    while time.time() - t0 < seconds:
        x = x_all[torch.randint(0, len(x_all), (batch,), generator=g)].float() / 127.5 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-3 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            log(f"vae step {step} loss {loss.item():.4f} kl {kl.item():.3f} ({time.time() - t0:.0f}s)")
    vae.eval()
    return step


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=40.0, help="VAE + UNet training budget")
    ap.add_argument("--judge-seconds", type=float, default=60.0)
    ap.add_argument("--vae-share", type=float, default=0.2)
    ap.add_argument("--data", type=int, default=24000, help="toy-world images generated for training")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-samples", type=int, default=50, help="samples for the competence check (0: skip)")
    ap.add_argument("--out", default="dreambooth_ray/assets/toy")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    # 1. the judge
    judge = tw.train_judge(seconds=args.judge_seconds, seed=args.seed, data=min(args.data, 20000), log=log)
    judge_acc = tw.judge_accuracy(judge)
    log(f"judge accuracy on held-out toy world: {judge_acc}")
    tw.save_judge(judge, out / "judge.safetensors")

    # data
    trip = tw.sample(args.seed, args.data)
    attrs = [a for a, _, _ in trip]
    imgs = np.stack([np.asarray(im, dtype=np.uint8).transpose(2, 0, 1) for _, im, _ in trip])
    del trip
    x_all = torch.from_numpy(imgs)
    log(f"generated {args.data} toy-world images")

    tok_dir = out / "_tok"
    write_toy_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    vae, text_encoder, unet = build(tokenizer, args.seed)
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in
                dict(vae=vae, text_encoder=text_encoder, unet=unet).items()}
    log(f"parameters: {n_params}")

    # 2. the VAE
    budget = args.minutes * 60
    vae_steps = train_vae(vae, x_all, budget * args.vae_share, 16, log)
    with torch.no_grad():
        lat = []
        for i in range(0, len(x_all), 256):
            d = vae.encode(x_all[i:i + 256].float() / 127.5 - 1).latent_dist
            lat.append(torch.cat([d.mean, d.std], 1))
        lat = torch.cat(lat)
        scaling = float(1.0 / lat[:, :4].std())
        rec = vae.decode(lat[:256, :4]).sample
        vae_mse = float(F.mse_loss(rec, x_all[:256].float() / 127.5 - 1))
    vae.register_to_config(scaling_factor=scaling)
    log(f"vae: {vae_steps} steps, reconstruction mse {vae_mse:.4f}, scaling_factor {scaling:.4f}")

    # 3. text encoder + UNet
    sched = scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(args.seed + 2)
    crng = random.Random(args.seed + 3)
    unet_seconds = budget * (1 - args.vae_share)
    warm = 200
    t0, step, ema = time.time(), 0, None
    unet.train()
    text_encoder.train()
    while time.time() - t0 < unet_seconds:
        idx = torch.randint(0, len(lat), (args.batch,), generator=g)
        m, s = lat[idx, :4], lat[idx, 4:]
        z = (m + s * torch.randn(m.shape, generator=g)) * scaling
        caps = ["" if crng.random() < 0.1 else tw.caption(attrs[i], crng) for i in idx.tolist()]
        ids = tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        enc = text_encoder(ids)[0]
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=g)
        pred = unet(sched.add_noise(z, noise, t), t, enc).sample
        loss = F.mse_loss(pred, noise)
        # linear warmup, then cosine decay over the remaining time budget
        frac = min(1.0, (time.time() - t0) / unet_seconds)
        lr = args.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac)))
        for pg in opt.param_groups:
            pg["lr"] = lr
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0:
            log(f"unet step {step} loss {ema:.4f} lr {lr:.2e} ({time.time() - t0:.0f}s)")
    unet.eval()
    text_encoder.eval()
    train_minutes = (time.time() - t_start) / 60

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    import shutil

    shutil.rmtree(tok_dir, ignore_errors=True)
    size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    report = dict(seed=args.seed, minutes_budget=args.minutes, train_minutes=round(train_minutes, 2),
                  threads=args.threads, data=args.data, batch=args.batch, unet_steps=step, vae_steps=vae_steps,
                  final_loss=ema, vae_mse=vae_mse, parameters=n_params, judge_accuracy=judge_acc,
                  size_mb=round(size_mb, 2))
    if args.eval_samples:
        report["competence"] = competence(out / "pipeline", judge, n=args.eval_samples, seed=args.seed)
        log(f"competence: {report['competence']}")
    (out / "pretrain.json").write_text(json.dumps(report, indent=1))
    log(f"done: {json.dumps(report)}")
    return report


def competence(pipeline_dir, judge, n: int = 50, seed: int = 0, steps: int = 25, guidance: float = 7.5,
               batch: int = 25) -> dict:
    """Sample prompts naming a class, a colour and a scene; the fraction of samples in which the judge
    recognises each (and all three)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    rng = random.Random(f"competence-{seed}")
    want = [tw.random_attrs(rng) for _ in range(n)]
    prompts = [tw.caption(a, colour=True, scene=True) for a in want]
    images = []
    for i in range(0, n, batch):
        g = torch.Generator().manual_seed(seed + i)
        images += pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=g,
                       height=tw.RESOLUTION, width=tw.RESOLUTION).images
    preds = tw.judge_predict(judge, images)
    res = {k: sum(p[k] == getattr(a, k) for a, p in zip(want, preds)) / n for k in ("cls", "colour", "scene")}
    res["all_three"] = sum(all(p[k] == getattr(a, k) for k in ("cls", "colour", "scene"))
                           for a, p in zip(want, preds)) / n
    res["n"] = n
    res["steps"], res["guidance"] = steps, guidance
    return res


if __name__ == "__main__":
    main()
