"""SD3 and Flux (families/sd3.py, flux.py, flow.py) on the built-in tiny-sd3 and tiny-flux: the
flow-matching objective and its timestep shifts against their formulas and diffusers' scheduler;
the conditioning that reaches each transformer against its pipeline's own encode_prompt; `identifier:
auto` on a T5 sentencepiece vocabulary; ZeRO-3's partitioned load on 2 processes; and jobs through
Ray Train + DeepSpeed: a Flux full fine-tune under ZeRO-3 that resumes bit-identically after a killed
worker and exports a folder FluxPipeline loads and renders, and an SD3 LoRA job whose adapter
StableDiffusion3Pipeline.load_lora_weights loads with the trained weights."""

import copy
import json
import math

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from dreambooth_ray import engine, families, identifiers, models
from dreambooth_ray.families import flow
from dreambooth_ray.families.flux import pack, unpack
from dreambooth_ray.spec import IdentifierConfig, TrainConfig

CPU = torch.device("cpu")
RES = 32


def test_flow_matching_noising_target_and_loss_weights_follow_their_formulas():
    x0 = torch.arange(24.0).view(2, 3, 2, 2) / 10
    noise = torch.linspace(-1, 1, 24).view(2, 3, 2, 2)
    t = torch.tensor([250.0, 800.0])  # noise levels 0.25 and 0.8
    for fam in (families.SD3, families.FLUX):
        noisy = fam.noisy(None, x0, noise, t)
        torch.testing.assert_close(noisy[0], 0.75 * x0[0] + 0.25 * noise[0])
        torch.testing.assert_close(noisy[1], 0.2 * x0[1] + 0.8 * noise[1])
        assert torch.equal(fam.target(None, x0, noise, t), noise - x0)  # the velocity, not the noise
        assert fam.loss_weights(None, t, TrainConfig()) is None  # the recipes' default: uniform
    s = torch.tensor([0.25, 0.8])
    torch.testing.assert_close(families.SD3.loss_weights(None, t, TrainConfig(flow={"weighting": "sigma_sqrt"})),
                               torch.tensor([16.0, 1 / 0.64]))
    torch.testing.assert_close(families.SD3.loss_weights(None, t, TrainConfig(flow={"weighting": "cosmap"})),
                               2 / (math.pi * (1 - 2 * s + 2 * s**2)))


def test_timestep_shifts_equal_the_schedulers_and_sampling_follows_its_density():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    u = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95])
    sd3 = FlowMatchEulerDiscreteScheduler.from_pretrained(models.resolve("tiny-sd3"), subfolder="scheduler")
    flux = FlowMatchEulerDiscreteScheduler.from_pretrained(models.resolve("tiny-flux"), subfolder="scheduler")
    assert sd3.config.shift == 3.0 and flux.config.use_dynamic_shifting
    # The reference: the shifted sigmas each scheduler itself samples with, given the same unshifted ones.
    sd3.set_timesteps(sigmas=u.numpy())
    torch.testing.assert_close(flow.shift_sigmas(u, sd3.config, 64), sd3.sigmas[:-1])
    for tokens in (64, 1024, 4096):  # 32 px tiny, 512 px and 1024 px Flux (packed 2x2 patches)
        mu = calculate_shift(tokens, flux.config.base_image_seq_len, flux.config.max_image_seq_len,
                             flux.config.base_shift, flux.config.max_shift)
        assert flow.image_seq_mu(tokens, flux.config) == pytest.approx(mu)
        flux.set_timesteps(sigmas=u.numpy(), mu=mu)
        torch.testing.assert_close(flow.shift_sigmas(u, flux.config, tokens), flux.sigmas[:-1])

    def draws(fam, sched, shape, **f):
        return fam.sample_timesteps(sched, 5, torch.Generator().manual_seed(3), TrainConfig(flow=f), shape)

    g = torch.Generator().manual_seed(3)
    want = torch.sigmoid(0.5 + 2.0 * torch.randn(5, generator=g))  # logit-normal(0.5, 2)
    torch.testing.assert_close(draws(families.SD3, sd3, (5, 4, 16, 16), logit_mean=0.5, logit_std=2.0),
                               1000 * flow.shift_sigmas(want, sd3.config, 64))
    g = torch.Generator().manual_seed(3)
    r = torch.rand(5, generator=g)
    mode = 1 - r - 1.29 * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
    # Flux's shift counts packed tokens: a 64 x 64 latent is 32 x 32 = 1024 tokens.
    torch.testing.assert_close(draws(families.FLUX, flux, (5, 4, 64, 64), timestep_sampling="mode"),
                               1000 * flow.shift_sigmas(mode, flux.config, 1024))
    torch.testing.assert_close(draws(families.SD3, sd3, (5, 4, 16, 16), timestep_sampling="uniform"),
                               1000 * flow.shift_sigmas(r, sd3.config, 64))


def test_the_step_applies_the_vae_shift_and_the_flow_settings():
    """Cached latent rows (std 0) through the SD3 step: the transformer's input moves by
    -(1 - s) * shift * scale when the VAE's shift factor changes, and `train.flow` sets the density of
    the noise levels (drawn after the latent and noise draws, from the step's generator)."""
    fam = families.SD3
    parts = models.load_components("tiny-sd3")
    model = engine.DreamBoothModel(parts["transformer"], family=fam)
    seen = []
    parts["transformer"].register_forward_pre_hook(lambda m, a, kw: seen.append(kw) and None, with_kwargs=True)
    mean = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    rows = torch.cat([mean, torch.zeros_like(mean)], dim=1)
    cond = fam.encode_frozen(fam.encoders(parts), fam.prompt_inputs(parts, ["a sks dog"] * 2), CPU)

    def run(shift, **flow):
        engine.diffusion_step(model, parts["noise_scheduler"], rows, 2, torch.Generator().manual_seed(0), 1.0,
                              torch.float32, CPU, scaling_factor=1.5, shift_factor=shift, family=fam,
                              cfg=TrainConfig(flow=flow), **cond)
        return seen[-1]

    a, b = run(0.0), run(0.1)
    s = (a["timestep"] / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(b["hidden_states"] - a["hidden_states"], (-(1 - s) * 0.1 * 1.5).expand_as(mean))
    g = torch.Generator().manual_seed(0)
    torch.randn(mean.shape, generator=g), torch.randn(mean.shape, generator=g)  # the latent and noise draws
    u = torch.sigmoid(4.0 + 0.5 * torch.randn(2, generator=g))
    sched = parts["noise_scheduler"]
    torch.testing.assert_close(run(0.0, logit_mean=4.0, logit_std=0.5)["timestep"],
                               1000 * flow.shift_sigmas(u, sched.config, 256))


def _capture(parts, fam, cfg, photos, classes, steps=1):
    """Run `steps` training steps; return what the transformer was called with (the last call)."""
    seen = {}
    den = parts[fam.denoiser]
    den.register_forward_pre_hook(lambda m, a, kw: seen.update(kw) and None, with_kwargs=True)
    eng = engine.build(parts, photos, classes, "a sks dog", "a dog", cfg, 1.0, CPU)
    for i in range(steps):
        eng.step(i)
    return seen


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_conditioning_that_reaches_the_transformer_is_the_pipelines(group, name):
    """Frozen encoders (cached conditioning) and trained CLIP encoders (computed in the step, T5 cached):
    the transformer sees the text conditioning its pipeline's encode_prompt makes, the timestep in
    the pipeline's units, Flux's packed latents, position ids and guidance."""
    fam = models.family(name)
    pipe = models.load_pipeline(name)
    if fam is families.SD3:
        emb, _, pooled, _ = pipe.encode_prompt("a sks dog", "a sks dog", "a sks dog", device="cpu",
                                               do_classifier_free_guidance=False, max_sequence_length=256)
    else:
        emb, pooled, _ = pipe.encode_prompt("a sks dog", "a sks dog", device="cpu", max_sequence_length=512)
    photos = [Image.new("RGB", (RES, RES), (200, 40, 40))] * 2
    base = models.load_components(name)
    for trained in (False, True):
        cfg = TrainConfig(resolution=RES, mixed_precision="fp32", zero_stage=2, batch_size=2, learning_rate=1e-3,
                          train_text_encoder=trained)
        # batched rows differ from the pipeline's single prompt by float rounding (1.2e-5 measured)
        seen = _capture(copy.deepcopy(base), fam, cfg, photos, [])
        torch.testing.assert_close(seen["encoder_hidden_states"], emb.expand(2, -1, -1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(seen["pooled_projections"], pooled.expand(2, -1), atol=1e-4, rtol=1e-4)
        t = seen["timestep"]
        if fam is families.FLUX:
            assert ((0 < t) & (t < 1)).all()  # Flux takes the noise level itself
            assert torch.equal(seen["guidance"], torch.tensor([3.5, 3.5]))
            assert seen["hidden_states"].shape == (2, 64, 16)  # 16 x 16 latents -> 8 x 8 tokens of 2x2x4
            assert torch.equal(seen["img_ids"], pipe._prepare_latent_image_ids(1, 8, 8, CPU, torch.float32))
            assert torch.equal(seen["txt_ids"], torch.zeros(512, 3))
            x = torch.randn(2, 4, 16, 16)
            assert torch.equal(pack(x), pipe._pack_latents(x, 2, 4, 16, 16))
            assert torch.equal(unpack(pack(x), 16, 16), pipe._unpack_latents(pack(x), RES, RES, 2))
        else:
            assert ((1 < t) & (t < 1000)).all()  # SD3 takes 1000x the noise level
            assert seen["hidden_states"].shape == (2, 4, 16, 16)


def test_identifier_auto_picks_a_rare_single_piece_of_the_t5_vocabulary():
    tok = models.load_tokenizer("tiny-flux")
    assert type(tok).__name__.startswith("T5Tokenizer")
    vocab = json.loads(tok.backend_tokenizer.to_str())["model"]["vocab"]  # [piece, score] in id order
    from dreambooth_ray.identifiers import _english

    lo = len(vocab) // 2  # the tiny vocabulary is below rank 5000: its rarest half is searched
    want = sorted((i, p[1:]) for i, (p, _) in enumerate(vocab) if i >= lo and p.startswith("\u2581")
                  and 1 <= len(p) - 1 <= 3 and p[1:].isalpha() and p[1:].isascii() and p[1:].islower()
                  and p[1:] not in _english() and p[1:] != "dog"
                  and tok.tokenize(p[1:]) == [p])  # sentencepiece may prefer two likelier pieces
    assert identifiers.candidates(tok, "dog", IdentifierConfig()) == want and len(want) > 100
    picked = identifiers.pick(tok, "dog", 0)
    assert tok.tokenize(picked) == ["\u2581" + picked]
    assert [scores for p, scores in vocab if p == "\u2581" + picked][0] < vocab[lo][1] + 1e-9  # rarer than the window's start
    assert identifiers.pick(tok, "dog", 0) == picked and identifiers.pick(tok, "dog", 1) in dict(want).values()


def _partitioned_worker(rank, world, port, out):
    import os

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed

    from diffusers import FluxTransformer2DModel

    cfg = TrainConfig(zero_stage=3, mixed_precision="fp32")
    model = engine.load_partitioned(FluxTransformer2DModel, models.resolve("tiny-flux"), "transformer",
                                    engine.deepspeed_config(cfg), chunk=5000)  # many gathers, not one
    local = sum(p.ds_tensor.numel() for p in model.parameters())
    total = sum(p.ds_numel for p in model.parameters())
    whole = sum(p.numel() for p in model.parameters())  # what this rank holds outside a gather
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        sd = {k: v.clone() for k, v in model.state_dict().items()}
    from dreambooth_ray import export

    # The export's gather: chunk by chunk, cast as it arrives; a tied weight (T5's shared embedding)
    # under every name it has.
    half = export.gathered_state_dict(model, rank, torch.float16, chunk=5000)
    from transformers import T5Config, T5EncoderModel

    t5_config = T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    with deepspeed.zero.Init(config_dict_or_path=engine.deepspeed_config(cfg)):
        t5 = T5EncoderModel(t5_config)
    t5_sd = export.gathered_state_dict(t5, rank, None, chunk=100)
    if rank == 0:
        torch.save(sd, f"{out}/sd.pt")
        torch.save(half, f"{out}/half.pt")
        want = T5EncoderModel(t5_config).state_dict()
        assert {k: v.shape for k, v in t5_sd.items()} == {k: v.shape for k, v in want.items()}
        assert t5_sd["encoder.embed_tokens.weight"] is t5_sd["shared.weight"]
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump({"local": local, "total": total, "whole": whole}, f)
    dist.destroy_process_group()


def test_zero3_partitioned_load_and_the_exports_gather_on_two_processes(tmp_path):
    """The transformer built sharded (no rank ever holds a whole parameter between gathers) holds the
    saved weights; the export's chunked gather returns them in 16 bits, and a tied weight by every name."""
    import socket

    import torch.multiprocessing as mp
    from diffusers import FluxTransformer2DModel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_partitioned_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    want = FluxTransformer2DModel.from_pretrained(models.resolve("tiny-flux"), subfolder="transformer").state_dict()
    got = torch.load(tmp_path / "sd.pt")
    assert got.keys() == want.keys()
    half = torch.load(tmp_path / "half.pt")
    for k in want:
        assert torch.equal(got[k], want[k]), k
        assert half[k].dtype == torch.float16 and torch.equal(half[k], want[k].half()), k
    n = sum(v.numel() for v in want.values())
    for rank in (0, 1):
        r = json.loads((tmp_path / f"{rank}.json").read_text())
        assert r["total"] == n and r["whole"] == 0  # no rank holds full parameters between gathers
        assert abs(r["local"] - n / 2) <= 2 * len(want)  # half each, up to per-tensor padding


def test_flux_full_zero3_killed_worker_resumes_identically_and_exports_what_fluxpipeline_loads(
        ray_cluster, tmp_path, toy_images):
    """Full fine-tuning of the Flux transformer (partitioned load) under ZeRO-3 on 2 workers; one run's
    rank 0 is SIGKILLed after the step-2 checkpoint and resumes bit-identical to the uninterrupted run;
    its export is a folder FluxPipeline.from_pretrained loads, holding the trained weights."""
    from diffusers import FluxPipeline

    from conftest import render, tiny_spec
    from dreambooth_ray import export, train
    from dreambooth_ray.checkpoint import consolidated_state_dict, local_copy, read_state
    from dreambooth_ray.spec import parse_spec
    from dreambooth_ray.storage import Storage

    spec = parse_spec(tiny_spec(str(tmp_path / "store"), str(toy_images), model="tiny-flux", prior={"enabled": False},
                                train={"zero_stage": 3, "num_workers": 2, "max_failures": 1}))
    storage, subject = Storage(spec.storage), spec.subjects[0]
    fit = ray.remote(num_cpus=0)(train.fit)
    straight, resumed = ray.get([fit.remote(spec, subject, storage, "straight", None, False),
                                 fit.remote(spec, subject, storage, "interrupted", None, False, ("kill", 2))])
    with local_copy(straight.checkpoint) as d:
        a = consolidated_state_dict(d)
    with local_copy(resumed.checkpoint) as d:
        assert read_state(d) == {"step": 4, "started_at": 2, "world_size": 2}  # resumed, not restarted
        b = consolidated_state_dict(d)
        pipe = export.trained_pipeline(spec, d)
    assert a.keys() == b.keys() and {k.split(".")[0] for k in a} == {"transformer"}
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff == 0.0, f"resumed weights differ from the uninterrupted run by {diff}"
    base = models.load_pipeline("tiny-flux").transformer.state_dict()
    changed = [k for k, v in a.items() if not torch.equal(v, base[k.split(".", 1)[1]])]
    assert len(changed) > len(a) // 2, f"only {len(changed)} of {len(a)} tensors trained"

    url = export.save(storage, pipe, ("outputs", "t", "toy"))
    loaded = FluxPipeline.from_pretrained(url)
    for k, v in b.items():
        assert torch.equal(loaded.transformer.state_dict()[k.split(".", 1)[1]], v), k
    image = render(loaded)
    assert image.shape == (RES, RES, 3) and not np.array_equal(image, render(models.load_pipeline("tiny-flux")))


def test_sd3_lora_job_exports_what_load_lora_weights_reads(ray_cluster, tmp_path, toy_images):
    """A job (priors, `identifier: auto` from T5's vocabulary, LoRA on the transformer and both CLIP
    encoders, export, samples) and its evaluation, all through the SD3 pipeline; the adapter loads with
    load_lora_weights and equals the trained one."""
    from diffusers import StableDiffusion3Pipeline

    from conftest import assert_exported_adapter_loads, tiny_spec
    from dreambooth_ray import job
    from dreambooth_ray.spec import parse_spec

    store = tmp_path / "store"
    spec = parse_spec(tiny_spec(str(store), str(toy_images), model="tiny-sd3",
                                subjects=[{"name": "toy", "images": str(toy_images), "class": "toy",
                                           "identifier": "auto"}],
                                train={"method": "lora", "lora": {"rank": 4, "text_encoder": True},
                                       "learning_rate": 1e-2, "export_dtype": "fp32"},
                                eval={"prompts": ["a {identifier} {class_noun} on the beach"], "images_per_prompt": 2,
                                      "class_images": 2, "inference_steps": 2, "num_actors": 1, "batch_size": 2,
                                      "dino": "tiny-dino", "clip": "tiny-clip"}))
    [result] = job.run_job(spec)
    assert result.status == "done", result.error
    out = store / "outputs" / "t" / "toy"
    record = json.loads((out / "job.json").read_text())
    t5 = models.load_tokenizer("tiny-sd3")
    assert t5.tokenize(record["identifier"]) == ["\u2581" + record["identifier"]]
    assert (out / "samples.png").exists() and len(list((store / "priors").rglob("*.png"))) == 4

    pipe = StableDiffusion3Pipeline.from_pretrained(models.resolve("tiny-sd3"))
    assert_exported_adapter_loads(out, pipe, ("transformer", "text_encoder", "text_encoder_2"))

    from dreambooth_ray import eval as ev  # eval renders the base model + the adapter, through the SD3 pipeline

    [scored] = ev.evaluate(spec)
    assert scored["rendered"] == 4 and all(scored["metrics"][k] is not None for k in ("dino", "clip_i", "clip_t", "pres"))
