"""SDXL's and Flux.1-dev's real architectures, random weights, trained through Ray Train on one GPU.

    .venv/bin/python benchmarks/family_gpu.py [--families sdxl,flux] [--steps 10] [--warmup 3] [--report-steps 5]
        [--configs NAME,...] [--flux-full-layers 2 4] [--out benchmarks/results] [--tmp DIR] [--tiny]

Issue 14 (SDXL: steps/s, peak memory, the ZeRO stages, our path against the standard recipe) and
issue 15 (Flux: ZeRO-3 and LoRA at 512 px: steps/s, peak GPU memory, host memory per worker).
NOT YET RUN ON A GPU: written 2026-11-24 and checked on a CPU with --tiny only (that session's GPU
time went to the GPU tests). Estimated ~4.5 min (SDXL) + ~4 min (Flux) on an H100, so one command per
family; SDXL full fine-tuning at ZeRO-2/3 may not fit 80 GB without the bf16-weights engine.
Each config is one `TorchTrainer.fit` with one worker (use_gpu=True, NCCL), so each runs in a fresh
process and leaves the GPU empty for the next. The worker does what a training worker does: the model
is loaded by `models.load_components` from a saved diffusers folder (partitioned under ZeRO-3 full
fine-tuning, as train.py loads it), `engine.build` makes the engine, and the steps are timed as
ray_bench.ray_worker times them: setup, warm-up, timed steps, then `--report-steps` more with what
train_loop adds (an all_reduce and a `ray.train.report`, paced by Train V2's 2 s poll; fewer than
ray_bench's, as they measure Ray, not the model). Peak GPU memory is the CUDA allocator's over setup
and steps; host memory is the worker process's peak RSS (VmHWM: loading included); "resident" is what
stays allocated after the steps (weights, gradients, optimizer state), per parameter of the denoiser.
A config that fails (an OOM is a result) is recorded as {"error": ...} with the peak it reached.

Models (random weights: cost does not depend on values; nothing is downloaded), built on the GPU in
a child process (seconds; 12B parameters initialised on a CPU take minutes) and saved once per family:
- SDXL base: the published UNet (2.57B, fp32 as the hub's default files) and VAE (scaling 0.13025),
  1024 px, batch 1 + 1 class image. Configs: full fine-tuning under bf16 autocast over fp32 weights at
  ZeRO-2 and ZeRO-3, LoRA (the product's defaults: rank 4 on the attention projections), and
  "reference": the standard recipe written out here (`ReferenceSDXL`; `bench.Reference` is SD1.5's:
  one text encoder, no added conditioning), in a worker of its own: plain torch AdamW over the fp32
  UNet, bf16 autocast, the VAE run on each step in fp32, prompts encoded once (as diffusers' SDXL
  scripts do with frozen encoders), noise-prediction MSE with prior preservation, no DeepSpeed.
  The full configs are compared with it: ours / reference steps/s and peak memory. Optional:
  "full-bf16w-zero2" (DeepSpeed's bf16 engine: bf16 weights, fp32 master copy; least memory).
- Flux.1-dev: the published transformer (19 double + 38 single blocks, width 3072 = 24 x 128;
  11.9B) saved in bf16 as the hub's is (24 GB; diffusers loads it back in fp32, as the product does)
  and the 16-channel VAE (scale 0.3611, shift 0.1159), 512 px, T5 sequence 512. Configs: LoRA on the
  full depth with bf16 weights (`mixed_precision: bf16-weights`, DeepSpeed's bf16 engine: the frozen
  base in bf16, fp32 master copies of the adapters) at ZeRO-2; full fine-tuning at ZeRO-3 (bf16-weights)
  at a REDUCED depth (`--flux-full-layers`, real width): the whole model needs ~16 bytes a parameter,
  ~190 GB, which one 80 GB GPU cannot hold (one rank shards nothing), so the result gives parameters
  and resident bytes a parameter to extrapolate from. Optional: "lora-zero3".
- Text encoders have their real output widths (SDXL: CLIP-L 768 + bigG 1280, projection 1280; Flux:
  CLIP-L 768 pooled, T5 d_model 4096) but 2 layers (CLIP; T5: 1) with a small FFN and the tiny
  tokenizers: frozen, they are run once in `engine.build` (encode_frozen), never in the step.

--tiny: the same code paths on a CPU with tiny.build_sdxl_pipeline()/build_flux_pipeline() at 32 px
(to check the script; its numbers mean nothing) -> bench-family-tiny.json. Otherwise the script needs
CUDA (exit 2 without) and writes <out>/bench-family-gpu.json, keeping the families and configs it did
not run (so `--families sdxl`, then `--families flux`, fill one file).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ray_bench import cuda_problem  # noqa: E402  (light: imports torch only when called)

N_INSTANCE, N_CLASS = 4, 4  # image pools (the step takes 1 + 1); each is VAE-encoded once, both flips
PROMPTS = ("a sks toy", "a toy")

# Published configs (stabilityai/stable-diffusion-xl-base-1.0, black-forest-labs/FLUX.1-dev); the rest
# of each is diffusers' defaults, as in those files.
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 mid_block_type="UNetMidBlock2DCrossAttn")
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
FLUX_VAE = {**SD_VAE, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
            "use_post_quant_conv": False}
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
RESOLUTION = {"sdxl": 1024, "flux": 512}

# name -> (runner, saved model, TrainConfig overrides); runner "ours" is engine.build, "reference" ReferenceSDXL.
CONFIGS = {
    "sdxl": {
        "full-zero2": ("ours", "full", {"zero_stage": 2}),
        "full-zero3": ("ours", "full", {"zero_stage": 3}),
        "lora": ("ours", "full", {"method": "lora"}),
        "reference": ("reference", "full", {"zero_stage": 0}),
        "full-bf16w-zero2": ("ours", "full", {"mixed_precision": "bf16-weights"}),
    },
    "flux": {
        "lora": ("ours", "full", {"method": "lora", "mixed_precision": "bf16-weights"}),
        "full-zero3": ("ours", "reduced", {"zero_stage": 3, "mixed_precision": "bf16-weights"}),
        "lora-zero3": ("ours", "full", {"method": "lora", "mixed_precision": "bf16-weights", "zero_stage": 3}),
    },
}
DEFAULT = {"sdxl": ("full-zero2", "full-zero3", "lora", "reference"), "flux": ("lora", "full-zero3")}
TEXT_NOTE = ("text encoders: real output widths (SDXL CLIP-L 768 + bigG 1280, projection 1280; Flux CLIP-L 768 "
             "pooled + T5 d_model 4096), 2 layers (T5: 1), small FFN, tiny tokenizers; frozen, run once at setup "
             "(engine.build's encode_frozen), outside the timed step")


def host_rss_gb(field: str = "VmHWM") -> float:
    """This process's RSS now (VmRSS) or its peak since it started (VmHWM), in GiB."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 2**20
    except (OSError, StopIteration):  # no procfs: the peak is what getrusage knows (KiB on Linux)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class ReferenceSDXL:
    """The standard recipe's SDXL step (diffusers' SDXL DreamBooth/fine-tuning scripts, full fine-tuning,
    prior preservation on): fp32 UNet under bf16 autocast, torch AdamW, the fp32 VAE on each step."""

    def __init__(self, parts, instance, classes, cfg, device):
        import torch

        from dreambooth_ray.data import DreamBoothData

        fam, b, res = parts["family"], cfg.batch_size, cfg.resolution
        self.cfg, self.device, self.sched = cfg, device, parts["noise_scheduler"]
        self.vae = parts["vae"].requires_grad_(False).to(device, torch.float32)  # SDXL's VAE overflows in fp16
        self.unet = parts["unet"].to(device).train()
        self.data = DreamBoothData(instance, classes, cfg.random_flip)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=cfg.learning_rate, weight_decay=1e-2)
        # Frozen encoders: the scripts compute the prompts' embeddings once, before the loop.
        inputs = fam.prompt_inputs(parts, [PROMPTS[0]] * b + [PROMPTS[1]] * b)
        self.cond = fam.encode_frozen(fam.encoders(parts), inputs, device)
        self.time_ids = torch.tensor([[res, res, 0, 0, res, res]] * 2 * b, device=device, dtype=torch.float32)

    def step(self, step: int) -> float:
        import torch

        from dreambooth_ray.data import step_generator
        from dreambooth_ray.loss import diffusion_target, prior_preservation_loss

        dev = self.device
        pixels, n = self.data.batch(self.cfg.batch_size, step_generator(self.cfg.seed, step))
        with torch.no_grad():
            latents = self.vae.encode(pixels.to(dev)).latent_dist.sample() * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (latents.shape[0],), device=dev)
        noisy = self.sched.add_noise(latents, noise, t)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            pred = self.unet(noisy, t, self.cond["encoder_hidden_states"],
                             added_cond_kwargs={"text_embeds": self.cond["text_embeds"], "time_ids": self.time_ids}).sample
        loss, _, _ = prior_preservation_loss(pred, diffusion_target(self.sched, latents, noise, t), n, 1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def ray_worker(config: dict) -> None:
    """One Ray Train worker: the product's model loading and engine (or the reference recipe), timed like
    ray_bench.ray_worker; the measurements (or the error) go back in a reported checkpoint."""
    import json
    import os
    import tempfile
    import time
    import traceback
    from pathlib import Path

    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from dreambooth_ray import bench, engine, models
    from dreambooth_ray.spec import TrainConfig

    steps, warmup, report_steps, ours = config["steps"], config["warmup"], config["report_steps"], config["runner"] == "ours"
    cfg = TrainConfig(**config["cfg"])
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    instance, classes = bench.images(N_INSTANCE, cfg.resolution, 0), bench.images(N_CLASS, cfg.resolution, 1)
    out: dict = {"host_rss_after_imports_gb": host_rss_gb("VmRSS"),
                 "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
                 "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                 "process_group_backend": str(dist.get_backend()), "world_size": dist.get_world_size()}
    if on_gpu:  # the previous config's worker may still be exiting: start on an empty GPU
        deadline = time.time() + 60
        while torch.cuda.mem_get_info(device)[0] < 0.9 * torch.cuda.mem_get_info(device)[1] and time.time() < deadline:
            time.sleep(1)
        out["gpu_free_at_start_gb"] = torch.cuda.mem_get_info(device)[0] / 2**30
    mem = bench.PeakMemory(device)
    try:
        t0 = time.perf_counter()
        parts = models.load_components(config["model_dir"], partitioned=engine.partitioned_loader(cfg) if ours else None)
        out["load_s"] = time.perf_counter() - t0
        out["host_rss_after_load_gb"] = host_rss_gb("VmRSS")
        with mem:
            t0 = time.perf_counter()
            if ours:
                eng = engine.build(parts, instance, classes, *PROMPTS, cfg, 1.0, device)
                step, denoiser = (lambda s: eng.step(s)[0].item()), getattr(eng.ds.module, parts["family"].denoiser)
            else:
                runner = ReferenceSDXL(parts, instance, classes, cfg, device)
                step, denoiser = runner.step, runner.unet
            del parts
            bench.sync(device)
            out["setup_s"] = time.perf_counter() - t0
            # Under ZeRO-3 a parameter holds only its shard: ds_numel is its whole size.
            numel = lambda ps: sum(getattr(p, "ds_numel", p.numel()) for p in ps)  # noqa: E731
            out["params"] = numel(denoiser.parameters())
            out["trainable_params"] = numel(p for p in denoiser.parameters() if p.requires_grad)
            for s in range(warmup):
                step(s)
            bench.sync(device)
            # The step alone, as the standalone bench times it.
            t0 = time.perf_counter()
            for s in range(warmup, warmup + steps):
                loss = step(s)
            bench.sync(device)
            compute = time.perf_counter() - t0
            out.update(steps_per_s=steps / compute, samples_per_s=steps * 2 * cfg.batch_size / compute, final_loss=loss)
            if on_gpu:  # what stays between steps: weights, gradients, optimizer state
                out["resident_gb"] = torch.cuda.memory_allocated(device) / 2**30
                out["resident_bytes_per_param"] = torch.cuda.memory_allocated(device) / out["params"]
            if ours and report_steps:
                # The step with what train_loop adds: the losses all-reduced (on the device), one report.
                t0 = time.perf_counter()
                for s in range(warmup + steps, warmup + steps + report_steps):
                    sums = eng.step(s).to(device)
                    dist.all_reduce(sums)
                    ray.train.report({"step": s + 1, "loss": sums[0].item()})
                bench.sync(device)
                out["steps_per_s_with_report"] = report_steps / (time.perf_counter() - t0)
    except Exception as e:  # an OOM is a result: keep it, with the peak it reached, and go on
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in msg.lower()
        out["error"] = ("CUDA OOM: " if oom else f"{type(e).__name__}: ") + msg[:400]
        if not oom:
            out["traceback"] = traceback.format_exc()[-3000:]
    if on_gpu:
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30  # with the allocator's cache
        out["gpu_total_gb"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    else:
        out["peak_mem_gb"] = mem.peak / 2**30  # CPU: the sampled RSS peak over setup and steps
    out["host_peak_rss_gb"] = host_rss_gb("VmHWM")
    # With a checkpoint: Train V2's Result keeps only what was reported with one.
    with tempfile.TemporaryDirectory() as d:
        Path(d, "bench.json").write_text(json.dumps(out))
        ray.train.report({"bench_done": 1}, checkpoint=ray.train.Checkpoint.from_directory(d))


def ray_path(model_dir: str, runner: str, cfg: dict, args, storage: str, name: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    try:
        result = TorchTrainer(
            ray_worker,
            train_loop_config={"model_dir": model_dir, "runner": runner, "cfg": cfg, "steps": args.steps,
                               "warmup": args.warmup, "report_steps": args.report_steps},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=not args.tiny),  # GPUs: Ray's default backend, NCCL
            run_config=RunConfig(name=name, storage_path=storage),
        ).fit()
        with result.checkpoint.as_directory() as d:
            r = json.loads(Path(d, "bench.json").read_text())
    except Exception as e:  # the worker died before it could report (killed, say)
        r = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:600]}"}
    r["fit_wall_s"] = time.perf_counter() - t0
    return r


def real_pipeline(family: str, device: str):
    """The family's published architecture with random weights, built on `device`; tokenizers and
    scheduler are the tiny pipeline's (whose schedulers have the real models' configs)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    from dreambooth_ray import tiny

    pipe = tiny.build_sdxl_pipeline() if family == "sdxl" else tiny.build_flux_pipeline()
    torch.manual_seed(0)
    with torch.device(device):
        pipe.text_encoder = tiny._clip(pipe.tokenizer, 768, projection=False)
        if family == "sdxl":
            pipe.text_encoder_2 = tiny._clip(pipe.tokenizer_2, 1280, projection=True)
            pipe.vae = AutoencoderKL(**SD_VAE)
            pipe.unet = UNet2DConditionModel(**SDXL_UNET)  # fp32, as the hub's default files
        else:
            tok = pipe.tokenizer_2
            pipe.text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=4096, d_kv=64, d_ff=256,
                                                          num_layers=1, num_heads=4, pad_token_id=tok.pad_token_id))
            pipe.vae = AutoencoderKL(**FLUX_VAE)
            torch.set_default_dtype(torch.bfloat16)  # as the hub stores it: 24 GB, not 48
            try:
                pipe.transformer = FluxTransformer2DModel(**FLUX_DEV)
            finally:
                torch.set_default_dtype(torch.float32)
    return pipe


def save_models(family: str, folder: str, tiny_: bool, layers: list[int]) -> None:
    """The child process: build the family's pipeline (Flux: also at reduced depth), save each as a
    diffusers folder, and write what was saved to <folder>/info.json."""
    import torch
    from diffusers import FluxTransformer2DModel

    from dreambooth_ray import tiny

    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not tiny_ else "cpu"
    pipe = (tiny.build_sdxl_pipeline() if family == "sdxl" else tiny.build_flux_pipeline()) if tiny_ \
        else real_pipeline(family, device)
    denoiser = "unet" if family == "sdxl" else "transformer"
    info: dict = {"folders": {}, "params": {}, "build_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    variants = [("full", None)] + ([("reduced", layers)] if family == "flux" else [])
    for name, depth in variants:
        if depth:  # the same transformer at a reduced depth: same width, same dtype, same device
            config = {**getattr(pipe, denoiser).config, "num_layers": depth[0], "num_single_layers": depth[1]}
            dtype = getattr(pipe, denoiser).dtype
            setattr(pipe, denoiser, None)
            torch.set_default_dtype(dtype)
            try:
                with torch.device(device):
                    pipe.transformer = FluxTransformer2DModel.from_config(config)
            finally:
                torch.set_default_dtype(torch.float32)
        model = getattr(pipe, denoiser)
        info["params"][name] = sum(p.numel() for p in model.parameters())
        info["dtype"] = str(model.dtype)
        info.setdefault("config", {})[name] = {k: v for k, v in model.config.items() if not k.startswith("_")}
        pipe.save_pretrained(Path(folder) / name)
        info["folders"][name] = str(Path(folder) / name)
    info["save_s"] = time.perf_counter() - t0
    Path(folder, "info.json").write_text(json.dumps(info, default=str))


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def depth_note(family: str, variant: str, params: int, tiny_: bool, layers) -> str:
    if tiny_:
        return f"tiny model ({count(params)}): code path check only"
    if family == "sdxl":
        return "real: the whole SDXL base UNet"
    if variant == "full":
        return "real: 19 double + 38 single blocks, width 3072"
    return (f"REDUCED: {layers[0]} double + {layers[1]} single blocks of Flux.1-dev's 19 + 38, real width 3072 "
            "(the whole model cannot be fully fine-tuned on one 80 GB GPU)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="sdxl,flux")
    p.add_argument("--steps", type=int, default=10, help="timed steps per config")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--report-steps", type=int, default=5, help="then steps with train_loop's all_reduce + report")
    p.add_argument("--configs", default=None, help="comma-separated config names (default: " + "; ".join(
        f"{f}: {','.join(c)}" for f, c in DEFAULT.items()) + "; also: sdxl full-bf16w-zero2, flux lora-zero3)")
    p.add_argument("--flux-full-layers", type=int, nargs=2, default=[2, 4], metavar=("DOUBLE", "SINGLE"),
                   help="Flux's depth for full fine-tuning (real: 19 38)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tmp", default=None, help="where the models are saved (Flux: ~27 GB; default: the system temp dir)")
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU: checks the code paths, measures nothing")
    p.add_argument("--save-model", nargs=2, metavar=("FAMILY", "FOLDER"), help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)

    problem = None if args.tiny else cuda_problem()
    if problem:
        print(f"family_gpu: {problem}. Nothing was run (--tiny checks the code paths on a CPU).", file=sys.stderr)
        return 2
    if args.save_model:
        save_models(*args.save_model, args.tiny, args.flux_full_layers)
        return 0
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    wanted = args.configs.split(",") if args.configs else None
    bad = [f for f in families if f not in CONFIGS] + [c for c in wanted or () if not any(c in v for v in CONFIGS.values())]
    if bad:
        p.error(f"unknown: {', '.join(bad)} (families: {', '.join(CONFIGS)}; configs: "
                + "; ".join(f"{f}: {', '.join(v)}" for f, v in CONFIGS.items()) + ")")

    import ray
    import torch

    from dreambooth_ray.cli import init_ray

    init_ray()
    if not args.tiny and ray.cluster_resources().get("GPU", 0) < 1:
        print("family_gpu: torch sees CUDA but the Ray instance has no GPU resource", file=sys.stderr)
        return 2
    import deepspeed
    import diffusers

    out = Path(args.out)
    path = out / ("bench-family-tiny.json" if args.tiny else "bench-family-gpu.json")
    result = json.loads(path.read_text()) if path.exists() else {"families": {}}  # merged: partial runs add up
    result.update({"torch": torch.__version__, "ray": ray.__version__, "deepspeed": deepspeed.__version__,
                   "diffusers": diffusers.__version__, "steps": args.steps, "warmup": args.warmup,
                   "report_steps": args.report_steps, "tiny": args.tiny, "batch": "1 subject + 1 class image per step",
                   "text_encoders": TEXT_NOTE, "command": "python " + " ".join(sys.argv)})
    wall = time.perf_counter()
    for fam in families:
        names = [c for c in (wanted or DEFAULT[fam]) if c in CONFIGS[fam]]
        if not names:
            continue
        res = 32 if args.tiny else RESOLUTION[fam]
        with tempfile.TemporaryDirectory(dir=args.tmp, prefix=f"family-{fam}-") as tmp:
            t0 = time.perf_counter()
            # A child process builds and saves: this driver never holds the GPU the workers need.
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--save-model", fam, tmp,
                            "--flux-full-layers", *map(str, args.flux_full_layers), *(["--tiny"] if args.tiny else [])],
                           check=True, cwd=ROOT)
            info = json.loads(Path(tmp, "info.json").read_text())
            print(f"family_gpu: {fam}: built in {info['build_s']:.0f} s, saved in {info['save_s']:.0f} s "
                  f"({', '.join(f'{k} {count(v)} params' for k, v in info['params'].items())}; "
                  f"{time.perf_counter() - t0:.0f} s with the child's start)", flush=True)
            entry = {"resolution": res, "denoiser_dtype_saved": info["dtype"], "params_saved": info["params"],
                     "architecture": info["config"],  # per saved model: full, reduced (Flux) "build_s": info["build_s"], "save_s": info["save_s"],
                     "configs": dict(result["families"].get(fam, {}).get("configs", {}))}  # keep configs not run now
            for name in names:
                runner, variant, over = CONFIGS[fam][name]
                cfg = {"resolution": res, "batch_size": 1, "mixed_precision": "bf16", "zero_stage": 2,
                       "learning_rate": 1e-5, "steps": args.warmup + args.steps + args.report_steps, **over}
                how = ("standard recipe, no DeepSpeed" if runner == "reference" else
                       f"{cfg.get('method', 'full')}, {cfg['mixed_precision']}, ZeRO-{cfg['zero_stage']}")
                print(f"family_gpu: {fam} {name} ({variant} model, {how}) ...", flush=True)
                r = ray_path(info["folders"][variant], runner, cfg, args, str(Path(tmp) / "ray"), f"family-{fam}-{name}")
                r.update(steps=args.steps, warmup=args.warmup, train=cfg, runner=runner, depth=depth_note(fam, variant, info["params"][variant], args.tiny,
                                                                    args.flux_full_layers))
                entry["configs"][name] = r
                print(f"family_gpu: {fam} {name}: " + (r["error"] if "error" in r else
                      f"{r['steps_per_s']:.2f} steps/s, peak {r['peak_mem_gb']:.1f} GB, host peak "
                      f"{r['host_peak_rss_gb']:.1f} GB") + f" ({r['fit_wall_s']:.0f} s)", flush=True)
        ref = entry["configs"].get("reference", {})
        for name, r in entry["configs"].items():
            if name.startswith("full") and "steps_per_s" in ref and "steps_per_s" in r:
                r["vs_reference"] = {"ratio_steps_per_s": r["steps_per_s"] / ref["steps_per_s"],
                                     "ratio_peak_mem": r["peak_mem_gb"] / ref["peak_mem_gb"]}
        result["families"][fam] = entry
    ray.shutdown()
    result["device"] = next((c["device"] for e in result["families"].values() for c in e["configs"].values()
                             if "device" in c), None)
    result["wall_s_this_run"] = time.perf_counter() - wall

    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nfamilies on {result['device']} ({args.steps} timed steps; batch 1 + 1 class image)")
    print(f"{'family':6} {'config':16} {'res':>5} {'params':>8} {'steps/s':>8} {'+report':>8} {'peak GB':>8} "
          f"{'B/param':>8} {'host GB':>8} {'x ref':>11}  depth")
    for fam, e in result["families"].items():
        for name, r in e["configs"].items():
            head = f"{fam:6} {name:16} {e['resolution']:5d} {count(r.get('params', 0)):>8}"
            if "error" in r:
                print(f"{head} {r['error'][:70]} (peak {r.get('peak_mem_gb', 0):.1f} GB)")
                continue
            vs = r.get("vs_reference")
            print(f"{head} {r['steps_per_s']:8.2f} {r.get('steps_per_s_with_report', float('nan')):8.2f} "
                  f"{r['peak_mem_gb']:8.2f} {r.get('resident_bytes_per_param', float('nan')):8.2f} "
                  f"{r['host_peak_rss_gb']:8.2f} "
                  + (f"{vs['ratio_steps_per_s']:5.2f} {vs['ratio_peak_mem']:5.2f}" if vs else f"{'':11}")
                  + f"  {r['depth'].split(':')[0]}")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
