"""`dreambooth-ray bench`: our training path against the standard DreamBooth recipe, in one run.

The reference is the diffusers `train_dreambooth.py` recipe, written out here: every step encodes
the images with the VAE and the prompts with the text encoder, the UNet runs under fp16 autocast
with fp32 weights and a grad scaler (plain fp32 on CPU, as the recipe runs there), plain AdamW, and the
class images are made one batch of 4 at a time with the model's own 50-step scheduler.
Ours is `engine.build` (the code every Ray Train worker runs) with each speed-up on, then with
each one off in turn. Everything runs on one device in this process: no Ray, so the ratios are
of the compute alone.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from . import engine, models, tiny
from .data import step_generator
from .loss import diffusion_target, prior_preservation_loss
from .spec import TrainConfig

SIZES = {"tiny": (tiny.build_pipeline, 32), "sd15": (tiny.sd15_pipeline, 512)}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, from the data sheets


class PeakMemory(contextlib.AbstractContextManager):
    """Peak device memory (CUDA allocator) or peak process RSS (CPU, sampled) inside the block."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            proc = psutil.Process()

            def sample():
                while not self._stop.wait(0.01):
                    self.peak = max(self.peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def images(n: int, size: int, seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


class Reference:
    """The standard recipe's training step (diffusers train_dreambooth.py, prior preservation on)."""

    def __init__(self, parts, instance, classes, cfg: TrainConfig, device: torch.device):
        from .data import DreamBoothData

        self.cfg, self.device, self.parts = cfg, device, parts
        half = torch.float16 if cfg.mixed_precision == "fp16" else torch.float32
        self.half = half
        parts["vae"].requires_grad_(False).to(device, half)
        parts["text_encoder"].requires_grad_(False).to(device, half)
        self.unet = parts["unet"].to(device).train()  # trained weights stay fp32
        self.data = DreamBoothData(instance, classes, cfg.random_flip)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=cfg.learning_rate, weight_decay=1e-2)
        self.scaler = torch.amp.GradScaler(device.type, enabled=half == torch.float16)
        tok = parts["tokenizer"]
        self.ids = tok(["a sks toy"] * cfg.batch_size + ["a toy"] * cfg.batch_size, padding="max_length",
                       max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids

    def step(self, step: int) -> float:
        p, dev = self.parts, self.device
        g = step_generator(self.cfg.seed, step)
        pixels, n = self.data.batch(self.cfg.batch_size, g)
        with torch.no_grad():
            latents = p["vae"].encode(pixels.to(dev, self.half)).latent_dist.sample() * p["vae"].config.scaling_factor
            states = p["text_encoder"](self.ids.to(dev))[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, p["noise_scheduler"].config.num_train_timesteps, (latents.shape[0],), device=dev)
        noisy = p["noise_scheduler"].add_noise(latents, noise, t)
        with torch.autocast(dev.type, dtype=self.half, enabled=self.half != torch.float32):
            pred = self.unet(noisy, t, states).sample
        loss, _, _ = prior_preservation_loss(pred, diffusion_target(p["noise_scheduler"], latents, noise, t), n, 1.0)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class Ours:
    fused: bool | None = None  # None: engine.optimizer's choice for the device

    def __init__(self, parts, instance, classes, cfg: TrainConfig, device: torch.device):
        self.eng = engine.build(parts, instance, classes, "a sks toy", "a toy", cfg, 1.0, device, fused=self.fused)

    def step(self, step: int) -> float:
        return self.eng.step(step)[0].item()


class OursForeach(Ours):
    fused = False


def fresh_parts(pipe):
    from diffusers import DDPMScheduler

    return {"tokenizer": pipe.tokenizer, "text_encoder": copy.deepcopy(pipe.text_encoder),
            "vae": copy.deepcopy(pipe.vae), "unet": copy.deepcopy(pipe.unet),
            "noise_scheduler": DDPMScheduler.from_config(pipe.scheduler.config)}


def time_training(kind, pipe, cfg, device, instance, classes, steps: int, warmup: int) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        runner = kind(fresh_parts(pipe), instance, classes, cfg, device)
        sync(device)
        setup = time.perf_counter() - t0
        for s in range(warmup):
            runner.step(s)
        sync(device)
        t0 = time.perf_counter()
        for s in range(warmup, warmup + steps):
            loss = runner.step(s)
        sync(device)
        dt = time.perf_counter() - t0
    del runner
    return {"steps_per_s": steps / dt, "samples_per_s": steps * 2 * cfg.batch_size / dt, "setup_s": setup,
            "peak_mem_gb": mem.peak / 2**30, "final_loss": loss}


def unet_step_flops(pipe, cfg: TrainConfig, resolution: int, device) -> float:
    """FLOPs of one UNet forward + backward at the training batch shape (counted, not estimated)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = copy.deepcopy(pipe.unet).to(device)
    b, h = 2 * cfg.batch_size, resolution // 8 if resolution >= 64 else resolution // 2
    x = torch.randn(b, unet.config.in_channels, h, h, device=device)
    ctx = torch.randn(b, 77, unet.config.cross_attention_dim, device=device)
    with FlopCounterMode(display=False) as fc:
        unet(x, torch.randint(0, 1000, (b,), device=device), ctx).sample.float().pow(2).mean().backward()
    del unet
    return float(fc.get_total_flops())


def time_sampling(pipe, device, n: int, batch: int, steps: int, scheduler: str, resolution: int, ours: bool) -> dict:
    """Class-image generation: the reference's pipeline as loaded vs ours as the prior actors set it up."""
    p = copy.deepcopy(pipe)
    if ours:
        p = models.prepare_sampler(p, device.type)
    else:
        p = p.to(device, torch.float16 if device.type == "cuda" else torch.float32)
    p.set_progress_bar_config(disable=True)
    p.scheduler = models.sampler_scheduler(pipe.scheduler, scheduler)
    run = lambda k: p(["a toy"] * k, height=resolution, width=resolution, num_inference_steps=steps,  # noqa: E731
                      generator=torch.Generator(device.type).manual_seed(0)).images
    run(min(batch, n))  # warm-up
    sync(device)
    t0 = time.perf_counter()
    out = []
    for i in range(0, n, batch):
        out += run(min(batch, n - i))
    sync(device)
    dt = time.perf_counter() - t0
    del p
    return {"images_per_s": n / dt, "seconds": dt, "batch": batch, "steps": steps, "scheduler": scheduler, "images": out}


def run(size: str, steps: int, warmup: int, n_class: int, e2e_steps: int, out_dir: Path, compile_: bool,
        prior_actors: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _init_single_process_group(device)
    build, res = SIZES[size]
    pipe = build()
    on_gpu = device.type == "cuda"
    # bf16 (fp32 master weights) on GPUs; on CPU fp32 is the fast choice (bf16 is a variant below).
    base = TrainConfig(resolution=res, batch_size=1, mixed_precision="bf16" if on_gpu else "fp32", zero_stage=0,
                       learning_rate=1e-5, steps=steps)
    instance, classes = images(5, res, 0), images(max(4, n_class), res, 1)
    variants = {
        "ours (all on)": (Ours, {}),
        "  no latent cache": (Ours, {"cache_latents": False}),
        "  fp32 (no bf16)" if on_gpu else "  bf16 autocast (not fp32)": (Ours, {"mixed_precision": "fp32" if on_gpu else "bf16"}),
        "  bf16 weights (DeepSpeed bf16)": (Ours, {"mixed_precision": "bf16-weights"}),
        "  classic attention (no SDPA)": (Ours, {"attention": "classic"}),
        "  + channels_last": (Ours, {"channels_last": True}),
    }
    if on_gpu:
        variants["  foreach AdamW (not fused)"] = (OursForeach, {})
    if compile_:
        variants["  + torch.compile"] = (Ours, {"compile": True})
    result: dict = {"size": size, "device": torch.cuda.get_device_name() if on_gpu else f"CPU x{os.cpu_count()}",
                    "torch": torch.__version__, "steps": steps, "warmup": warmup, "training": {}}
    ref_cfg = base.model_copy(update={"mixed_precision": "fp16" if on_gpu else "fp32"})
    print(f"bench: {size} on {result['device']}", flush=True)
    result["training"]["reference"] = ref = time_training(Reference, pipe, ref_cfg, device, instance, classes,
                                                          steps, warmup)
    print(f"  reference: {ref['steps_per_s']:.2f} steps/s", flush=True)
    for name, (kind, over) in variants.items():
        r = time_training(kind, pipe, base.model_copy(update=over), device, instance, classes, steps, warmup)
        r["ratio_vs_reference"] = r["steps_per_s"] / ref["steps_per_s"]
        result["training"][name.strip()] = r
        print(f"  {name}: {r['steps_per_s']:.2f} steps/s ({r['ratio_vs_reference']:.2f}x)", flush=True)
    if on_gpu:
        flops = unet_step_flops(pipe, base, res, device)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in result["device"]), None)
        best = result["training"]["ours (all on)"]["steps_per_s"]
        result["unet_step_tflop"] = flops / 1e12
        result["mfu_ours"] = flops * best / peak if peak else None
        result["mfu_reference"] = flops * ref["steps_per_s"] / peak if peak else None

    # Class images: the recipe's 50-step model scheduler, 4 at a time, vs DPM-Solver++ in 25, batched.
    batch = 16 if on_gpu else 4
    sref = time_sampling(pipe, device, n_class, 4, 50, "model", res, ours=False)
    sours = time_sampling(pipe, device, n_class, batch, 25, "dpm++", res, ours=True)
    result["prior_generation"] = {"reference": _strip(sref), "ours": _strip(sours),
                                  "ratio": sours["images_per_s"] / sref["images_per_s"]}
    print(f"  class images: {sref['images_per_s']:.2f} -> {sours['images_per_s']:.2f} images/s", flush=True)
    if prior_actors > 1:
        result["prior_actor_scaling"] = actor_scaling(size, res, max(n_class, 32), prior_actors)

    # End to end for one subject: class images + training + writing the model.
    result["end_to_end"] = e2e = {}
    for name, kind, cfg, samp in (("reference", Reference, ref_cfg, sref), ("ours", Ours, base, sours)):
        t0 = time.perf_counter()
        s = time_sampling(pipe, device, n_class, samp["batch"], samp["steps"], samp["scheduler"], res, name == "ours")
        runner = kind(fresh_parts(pipe), instance, s["images"], cfg, device)
        for k in range(e2e_steps):
            runner.step(k)
        sync(device)
        with tempfile.TemporaryDirectory() as tmp:
            unet = runner.unet if name == "reference" else runner.eng.ds.module.unet
            unet.save_pretrained(tmp)
        e2e[name] = {"seconds": time.perf_counter() - t0, "class_images": n_class, "steps": e2e_steps}
        del runner
    e2e["ratio"] = e2e["reference"]["seconds"] / e2e["ours"]["seconds"]
    print(f"  end to end: {e2e['reference']['seconds']:.1f} s -> {e2e['ours']['seconds']:.1f} s", flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"bench-{size}.json").write_text(json.dumps(result, indent=2))
    plot(result, out_dir / f"bench-{size}.png")
    print_table(result)
    return result


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "images"}


def actor_scaling(size: str, res: int, n: int, actors: int) -> dict:
    """Prior images/s through the real Ray actors: 1 actor, then `actors`. CPU tiny model only."""
    import ray

    from . import priors
    from .cli import init_ray
    from .spec import parse_spec
    from .storage import Storage

    init_ray(num_cpus=actors + 1)
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in (1, actors):
            spec = parse_spec({"name": "bench", "model": "tiny", "storage": tmp,
                               "subject": {"name": "s", "images": tmp, "class": f"toy{k}"},
                               "prior": {"num_class_images": n, "batch_size": 4, "num_actors": k, "inference_steps": 25},
                               "train": {"resolution": res}})
            cache = priors.PriorCache.for_subject(spec, spec.subjects[0], Storage(tmp), "tiny-bench")
            t0 = time.perf_counter()
            priors.generate(cache, spec, use_gpu=False)
            rates[k] = n / (time.perf_counter() - t0)
    ray.shutdown()
    return {"images_per_s": {str(k): v for k, v in rates.items()}, "ratio": rates[actors] / rates[1],
            "note": "includes each actor's pipeline load"}


def _init_single_process_group(device: torch.device) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def print_table(r: dict) -> None:
    print(f"\n{r['size']} on {r['device']} ({r['steps']} timed steps)")
    print(f"{'training path':34} {'steps/s':>9} {'samples/s':>10} {'peak GB':>8} {'x ref':>7}")
    for name, t in r["training"].items():
        print(f"{name:34} {t['steps_per_s']:9.2f} {t['samples_per_s']:10.2f} {t['peak_mem_gb']:8.2f} "
              f"{t.get('ratio_vs_reference', 1.0):7.2f}")
    if r.get("mfu_ours") is not None:
        print(f"MFU (UNet fwd+bwd, {r['unet_step_tflop']:.2f} TFLOP/step): ours {r['mfu_ours']:.1%}, "
              f"reference {r['mfu_reference']:.1%}")
    p = r["prior_generation"]
    print(f"class images/s: reference {p['reference']['images_per_s']:.2f}, ours {p['ours']['images_per_s']:.2f} "
          f"({p['ratio']:.2f}x)")
    if "prior_actor_scaling" in r:
        a = r["prior_actor_scaling"]
        print(f"prior actors: {a['images_per_s']} images/s, scaling {a['ratio']:.2f}x")
    e = r["end_to_end"]
    print(f"end to end ({e['ours']['class_images']} class images + {e['ours']['steps']} steps + save): "
          f"reference {e['reference']['seconds']:.1f} s, ours {e['ours']['seconds']:.1f} s ({e['ratio']:.2f}x)")


def plot(r: dict, path: Path) -> None:
    """A small bar chart of the ratios against the reference (Pillow: no plotting dependency)."""
    from PIL import Image, ImageDraw

    rows = [(k, v.get("ratio_vs_reference", 1.0)) for k, v in r["training"].items()]
    rows += [("class images/s", r["prior_generation"]["ratio"]), ("end to end", r["end_to_end"]["ratio"])]
    w, row_h, left = 640, 22, 230
    top = max(v for _, v in rows)
    im = Image.new("RGB", (w, row_h * (len(rows) + 2)), "white")
    d = ImageDraw.Draw(im)
    d.text((8, 4), f"speed vs reference recipe: {r['size']} on {r['device']}", fill="black")
    for i, (name, v) in enumerate(rows, 1):
        y = i * row_h + 6
        d.text((8, y + 3), name, fill="black")
        d.rectangle([left, y, left + int((w - left - 60) * v / top), y + row_h - 6],
                    fill=(200, 80, 60) if name == "reference" else (60, 120, 200))
        d.text((left + int((w - left - 60) * v / top) + 4, y + 3), f"{v:.2f}x", fill="black")
    im.save(path)


def main(argv: list[str] | None = None) -> int:
    import sys

    from .cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


def cmd_bench(args, console=None) -> int:
    run(args.size, args.steps, args.warmup, args.class_images, args.e2e_steps, Path(args.out), args.compile,
        args.prior_actors)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
