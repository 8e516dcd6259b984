"""Issue #34's training controls against independent computations: lr schedules (diffusers' get_scheduler),
optimizers (the same class stepped by hand outside DeepSpeed), min-SNR-gamma weights (diffusers'
compute_snr) and offset noise (its formula), and their refusals, identity and job.json."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_ray import engine, identity, models, preflight
from dreambooth_ray.loss import diffusion_target, prior_preservation_loss
from dreambooth_ray.spec import SpecError, TrainConfig, parse_spec

from conftest import tiny_spec

CPU = torch.device("cpu")
SCHEDULES = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


@pytest.fixture(scope="module")
def tiny_parts():
    return models.load_components("tiny")


def _reference_lrs(cfg: TrainConfig, n: int) -> list[float]:
    """The lr of steps 0..n-1 from diffusers' get_scheduler, stepped as a training loop steps it."""
    from diffusers.optimization import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps,
                          num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_step_runs_at_diffusers_lr_for_each_schedule(name):
    warm = 0 if name == "constant" else 5
    cfg = TrainConfig(steps=40, learning_rate=2e-4, lr_scheduler=name, lr_warmup_steps=warm, lr_num_cycles=3,
                      lr_power=2.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    ours = torch.optim.lr_scheduler.LambdaLR(opt, engine.lr_lambda(cfg))
    got = []
    for _ in range(45):  # past the end too (polynomial holds lr_end, restarts hold 0)
        got.append(ours.get_last_lr()[0])
        opt.step()
        ours.step()
    want = _reference_lrs(cfg, 45)
    # Same formulas in the same float order: measured equal bit for bit; 1e-12 leaves room for libm.
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)
    distinct = len(set(round(x, 12) for x in want))
    assert distinct == 1 if name == "constant" else distinct > 5  # the others move


def test_the_default_schedule_is_todays_constant_rate():
    """`constant_with_warmup` with no warmup (the default) is the multiplier 1 at every step, as the
    former min(1, (k+1)/(w+1)) was at w = 0."""
    cfg = TrainConfig()
    assert cfg.lr_scheduler == "constant_with_warmup" and cfg.lr_warmup_steps == 0
    f = engine.lr_lambda(cfg)
    assert [f(k) for k in range(cfg.steps + 5)] == [min(1.0, (k + 1) / 1) for k in range(cfg.steps + 5)]


def _build(tiny_parts, **train):
    cfg = TrainConfig(**{"resolution": 32, "mixed_precision": "fp32", "zero_stage": 2, "learning_rate": 1e-3,
                         "random_flip": False, **train})
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return engine.build(copy.deepcopy(tiny_parts), [Image.fromarray(pixels)], [Image.new("RGB", (32, 32), (128,) * 3)],
                        "a sks toy", "a toy", cfg, 1.0, CPU)


def test_a_resumed_engine_continues_the_schedule_at_its_step(group, tiny_parts, tmp_path):
    """DeepSpeed's checkpoint carries the LambdaLR's step: an engine restored after step 3 runs step 3
    at the schedule's lr for step 3 (not step 0's), and ends bit-identical to the run that went on."""
    from dreambooth_ray.checkpoint import TAG, weights_only

    train = dict(steps=7, lr_scheduler="cosine", lr_warmup_steps=2)
    straight = _build(tiny_parts, **train)
    want = _reference_lrs(straight.cfg, 7)
    lrs = []
    for k in range(7):
        lrs.append(straight.lr())
        straight.step(k)
        if k == 2:
            straight.ds.save_checkpoint(str(tmp_path), tag=TAG)
    assert lrs == pytest.approx(want, rel=1e-12) and lrs[0] == 0 and lrs[2] == 1e-3  # warmup 0, 1/2, then the cosine
    resumed = _build(tiny_parts, **train)
    assert resumed.lr() == 0.0  # a fresh engine starts at step 0
    with weights_only():  # as checkpoint.restore loads it
        resumed.ds.load_checkpoint(str(tmp_path), tag=TAG)
    again = []
    for k in range(3, 7):
        again.append(resumed.lr())
        resumed.step(k)
    assert again == lrs[3:]
    a = {n: p.detach() for n, p in straight.ds.module.named_parameters()}
    b = {n: p.detach() for n, p in resumed.ds.module.named_parameters()}
    assert all(torch.equal(a[n], b[n]) for n in a)


# ---- optimizers -------------------------------------------------------------------------------------


class _Fixed:
    """The same [subject; class] rows every call: the weights are the only thing that changes between steps."""

    def __init__(self, rows):
        self.rows = rows

    def batch(self, batch_size, g):
        return self.rows, 1


def _fixed_rows(tiny_parts):
    sched = tiny_parts["noise_scheduler"]
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, sched.config.num_train_timesteps, (2,), generator=g)
    rows = torch.cat([torch.randn(2, 8, 16, 16, generator=g), t.float().view(2, 1, 1, 1).expand(2, 1, 16, 16)], dim=1)
    text = torch.randn(2, 77, 32, generator=g)

    def loss(model, r, n, _g):
        lat, noise, tt = r.split([4, 4, 1], dim=1)
        tt = tt[:, 0, 0, 0].long()
        pred = model(sched.add_noise(lat, noise, tt), tt, encoder_hidden_states=text)
        return prior_preservation_loss(pred, diffusion_target(sched, lat, noise, tt), n, 1.0)

    return rows, loss


def _by_hand(tiny_parts, cfg, rows, loss, n):
    """`n` steps of the optimizer class outside DeepSpeed: same gradients, clipped at 1.0 as DeepSpeed's
    config says, the lr from diffusers' get_scheduler."""
    from diffusers.optimization import get_scheduler

    assert engine.deepspeed_config(cfg)["gradient_clipping"] == 1.0
    unet = copy.deepcopy(tiny_parts["unet"])
    model = engine.DreamBoothModel(unet)
    params = list(unet.parameters())
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        opt = Adafactor(params, lr=cfg.learning_rate, relative_step=False, scale_parameter=False, warmup_init=False,
                        weight_decay=cfg.weight_decay)
    else:
        from prodigyopt import Prodigy

        opt = Prodigy(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps)
    norms = []
    for _ in range(n):
        opt.zero_grad()
        loss(model, rows, 1, None)[0].backward()
        norms.append(torch.nn.utils.clip_grad_norm_(params, 1.0).item())
        opt.step()
        sched.step()
    return unet, norms, opt


@pytest.mark.parametrize("optimizer,zero_stage", [("adamw", 0), ("adamw", 1), ("adamw", 2), ("adamw", 3),
                                                  ("adafactor", 0),
                                                  ("prodigy", 0), ("prodigy", 1), ("prodigy", 2), ("prodigy", 3)])
def test_n_engine_steps_equal_the_optimizer_stepped_by_hand(group, tiny_parts, optimizer, zero_stage):
    if optimizer == "prodigy":
        pytest.importorskip("prodigyopt")
    lr = {"adamw": 1e-3, "adafactor": 1e-3, "prodigy": 1.0}[optimizer]
    n = 8 if optimizer == "prodigy" else 3  # Prodigy starts at d = 1e-6 and needs steps to grow it
    cfg = TrainConfig(resolution=32, mixed_precision="fp32", zero_stage=zero_stage, optimizer=optimizer,
                      learning_rate=lr, steps=n + 1, lr_scheduler="linear")  # lr x 1, ..., 2/(n+1): the schedule acts
    rows, loss = _fixed_rows(tiny_parts)
    unet = copy.deepcopy(tiny_parts["unet"])
    eng = engine.Engine(engine.initialize(engine.DreamBoothModel(unet), cfg, CPU), _Fixed(rows), cfg, loss)
    inner = getattr(eng.ds.optimizer, "optimizer", eng.ds.optimizer)
    assert type(inner).__name__ == {"adamw": "AdamW", "adafactor": "Adafactor", "prodigy": "Prodigy"}[optimizer]
    for k in range(n):
        eng.step(k)
    ref, norms, hand = _by_hand(tiny_parts, cfg, rows, loss, n)
    assert min(norms) > 1.5  # clipping acts at every step (measured 2.3-2.8): a missing clip would show
    from dreambooth_ray import export

    got = export.live_state_dict(eng.ds, cfg, 0)
    base, want = tiny_parts["unet"].state_dict(), ref.state_dict()
    moved = max((want[k] - base[k]).abs().max().item() for k in want)
    worst = max((got[f"unet.{k}"].float() - want[k]).abs().max().item() for k in want)
    # Measured (3 steps; Prodigy 8): moved 2.3e-3 (AdamW), 1.6e-2 (Adafactor), 3.0e-4 (Prodigy); apart by 0 at
    # ZeRO-0 and at most 1.2e-7 under ZeRO-1/2 and Prodigy's ZeRO-3 (flat partitions sum the gradient norm in
    # another order), 2.6e-6 for AdamW under ZeRO-3 (its reduce-scatter rounds a near-zero gradient, which
    # Adam's 1/sqrt(v) scales up to a fraction of a step). A lost schedule step (lr x 1 instead of 0.75 at
    # step 1) moves the weights by ~5e-4.
    assert moved > (1e-4 if optimizer == "prodigy" else 1e-3), moved
    assert worst < (1e-5 if (optimizer, zero_stage) == ("adamw", 3) else 1e-6), worst
    # The memory plan's optimizer column (plan.STATE_BYTES per trained element) against the state held.
    from dreambooth_ray.plan import STATE_BYTES

    held = sum(t.numel() * t.element_size() for st in inner.state.values() for t in st.values()
               if torch.is_tensor(t) and t.dim() > 0)
    P = sum(p.numel() for p in tiny_parts["unet"].parameters())
    # Measured bytes per element: AdamW 8.0, Prodigy 16.0 (15.99 at ZeRO-0: an all-zero weight's p0 is a
    # scalar), Adafactor 2.24 (factored; the plan counts its bound, 4).
    if optimizer == "adafactor":
        assert 1.5 * P < held <= STATE_BYTES[optimizer] * P, held / P
    else:
        assert held == pytest.approx(STATE_BYTES[optimizer] * P, rel=2e-3), held / P
    if optimizer == "prodigy":  # its step size estimate sums over every partition: the whole model's
        d, d_hand = inner.param_groups[0]["d"], hand.param_groups[0]["d"]
        # Measured: d grew from 1e-6 to 1.14e-4 in 8 steps, engine and hand 3e-7 relative apart.
        assert d > 50e-6 and d == pytest.approx(d_hand, rel=1e-5), (d, d_hand)


@pytest.mark.parametrize("train,field", [
    ({"optimizer": "adafactor", "zero_stage": 2}, "zero_stage 0"),
    ({"optimizer": "prodigy", "offload": "optimizer"}, "offload"),
    ({"optimizer": "adafactor", "zero_stage": 0, "offload": "none"}, None),
    ({"lr_scheduler": "constant", "lr_warmup_steps": 10}, "lr_warmup_steps"),
    ({"lr_scheduler": "polynomial", "learning_rate": 1e-8}, "learning_rate"),
    ({"lr_scheduler": "cosine_wobble"}, "train.lr_scheduler"),
    ({"snr_gamma": 0}, "train.snr_gamma"),
    ({"noise_offset": -0.1}, "train.noise_offset"),
    ({"optimizer": "prodigy", "num_workers": 2, "use_gpu": False}, "CUDA only"),
    ({"optimizer": "prodigy", "num_workers": 2, "zero_stage": 0, "use_gpu": False}, None),
])
def test_bad_controls_are_refused_naming_the_field(train, field):
    data = tiny_spec("/tmp/s", "/tmp/p", train=train)
    if field is None:
        parse_spec(data)
        return
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert field in str(e.value), str(e.value)


def test_prodigy_on_several_cpu_workers_is_refused_before_any_compute_once_the_cluster_is_known():
    # use_gpu unset: the spec cannot know; job.run_job asks cpu_problem() once the cluster says "no GPUs".
    cfg = TrainConfig(optimizer="prodigy", num_workers=2)
    assert "CUDA only" in cfg.cpu_problem() and TrainConfig(optimizer="prodigy").cpu_problem() is None


def test_prodigy_defaults_to_a_unit_multiplier():
    assert TrainConfig(optimizer="prodigy").learning_rate == 1.0
    assert TrainConfig(optimizer="prodigy", method="lora", learning_rate=0.5).learning_rate == 0.5
    assert TrainConfig(method="lora").learning_rate == 1e-4


# ---- min-SNR-gamma and noise offset -----------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_diffusers_compute_snr(tiny_parts, prediction):
    """The weights of every timestep against the formula diffusers' training scripts apply to
    compute_snr: min(SNR, gamma) / SNR (epsilon), / (SNR + 1) (v)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from dreambooth_ray.families import SD

    sched = DDPMScheduler.from_config(tiny_parts["noise_scheduler"].config, prediction_type=prediction)
    t = torch.arange(sched.config.num_train_timesteps)
    cfg = TrainConfig(snr_gamma=5.0)
    snr = compute_snr(sched, t)
    want = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    want = want / snr if prediction == "epsilon" else want / (snr + 1)
    got = SD.loss_weights(sched, t, cfg)
    # Measured: 1.2e-7 relative apart (compute_snr squares sqrt(alpha_bar)/sqrt(1 - alpha_bar) in fp32).
    assert torch.allclose(got, want, rtol=1e-6, atol=0), (got / want - 1).abs().max()
    assert (got < 1).sum() > 100 and (want == 1).sum() > 10 if prediction == "epsilon" else (got < 0.99).all()
    assert SD.loss_weights(sched, t, TrainConfig()) is None  # off by default: the paper's uniform loss


def _recording_step(tiny_parts, cfg, seed=7):
    """diffusion_step on cached-latent rows with a denoiser that records its input and predicts 0."""
    from dreambooth_ray.families import SD

    class Zero(torch.nn.Module):
        def forward(self, x, t, **cond):
            self.x, self.t = x.detach().clone(), t.clone()
            return torch.zeros_like(x)

    rows = torch.cat([torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
                      torch.full((2, 4, 8, 8), 0.1)], dim=1)  # [mean || std] of 2 rows: subject, class
    model = Zero()
    g = torch.Generator().manual_seed(seed)
    out = engine.diffusion_step(model, tiny_parts["noise_scheduler"], rows, 1, g, 1.0, torch.float32, CPU,
                                scaling_factor=0.5, family=SD, cfg=cfg)
    return model, rows, out


def test_offset_noise_is_the_diffusers_formula_drawn_from_the_step_generator(tiny_parts):
    """noise = N(0, I) + offset * N(0, 1) per (row, channel), drawn from the step's generator after the
    noise itself: reproduce the draws by hand and the noisy input and the epsilon target follow."""
    sched = tiny_parts["noise_scheduler"]
    cfg = TrainConfig(noise_offset=0.1)
    model, rows, (loss, inst, prior) = _recording_step(tiny_parts, cfg)
    g = torch.Generator().manual_seed(7)
    mean, std = rows.chunk(2, dim=1)
    latents = (mean + std * torch.randn(mean.shape, generator=g)) * 0.5
    noise = torch.randn(latents.shape, generator=g)
    noise = noise + 0.1 * torch.randn(2, 4, 1, 1, generator=g)
    t = torch.randint(0, sched.config.num_train_timesteps, (2,), generator=g)
    assert torch.equal(model.t, t)
    assert torch.allclose(model.x, sched.add_noise(latents, noise, t), rtol=0, atol=1e-6)
    # A zero prediction's loss is the target's mean square: the offset noise is the epsilon target too.
    assert inst.item() == pytest.approx(noise[0].pow(2).mean().item(), rel=1e-5)
    assert prior.item() == pytest.approx(noise[1].pow(2).mean().item(), rel=1e-5)
    # Off (the default): the draws are today's, no extra one.
    model0, _, _ = _recording_step(tiny_parts, TrainConfig())
    assert not torch.allclose(model0.x, model.x) and torch.equal(model0.t, torch.randint(
        0, sched.config.num_train_timesteps, (2,), generator=_replay_to_timesteps(rows)))


def _replay_to_timesteps(rows):
    g = torch.Generator().manual_seed(7)
    torch.randn(rows.chunk(2, dim=1)[0].shape, generator=g)
    torch.randn(rows.chunk(2, dim=1)[0].shape, generator=g)
    return g


def test_min_snr_weights_reach_the_loss_per_row(tiny_parts):
    """With a zero prediction the subject loss is w_0 * mean(noise_0^2) and the prior loss w_1 * mean(noise_1^2),
    w from the formula at each row's own timestep."""
    sched = tiny_parts["noise_scheduler"]
    plain_model, _, (_, inst0, prior0) = _recording_step(tiny_parts, TrainConfig())
    model, _, (loss, inst, prior) = _recording_step(tiny_parts, TrainConfig(snr_gamma=0.5))
    ab = sched.alphas_cumprod[model.t].double()
    snr = ab / (1 - ab)
    w = (snr.clamp(max=0.5) / snr).float()
    # The draw (t = 520, 400: SNR 0.33, 0.74) puts one row under gamma and one above: w = 1, 0.68, so a
    # weight applied to the wrong row, or to the batch's mean, shows.
    assert w[0] == 1 and w[1] < 0.7
    assert inst.item() == pytest.approx(w[0].item() * inst0.item(), rel=1e-5)
    assert prior.item() == pytest.approx(w[1].item() * prior0.item(), rel=1e-5)


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_flow_families_refuse_min_snr_and_noise_offset_in_preflight(model):
    for train, field in (({"snr_gamma": 5.0}, "train.snr_gamma"), ({"noise_offset": 0.05}, "train.noise_offset")):
        spec = parse_spec({**tiny_spec("/tmp/s", "/tmp/p", train=train), "model": model})
        problems = preflight.base_model_problems(spec)
        assert len(problems) == 1 and problems[0].startswith(field), problems
        ddpm = parse_spec(tiny_spec("/tmp/s", "/tmp/p", train=train))  # the tiny SD: allowed
        assert preflight.base_model_problems(ddpm) == []
    assert preflight.base_model_problems(parse_spec({**tiny_spec("/tmp/s", "/tmp/p"), "model": model})) == []


# ---- identity and job.json --------------------------------------------------------------------------


NEW_SETTINGS = [{"lr_scheduler": "cosine"}, {"lr_scheduler": "cosine_with_restarts", "lr_num_cycles": 2},
                {"lr_scheduler": "polynomial", "lr_power": 2.0}, {"optimizer": "prodigy"}, {"weight_decay": 0.0},
                {"snr_gamma": 5.0}, {"noise_offset": 0.05}, {"lr_warmup_steps": 3}]


def test_each_control_names_a_new_run_and_lands_in_job_json(tmp_path):
    from dreambooth_ray.export import write_record
    from dreambooth_ray.storage import Storage

    def name(**train):
        spec = parse_spec(tiny_spec("/tmp/s", "/tmp/p", train=train))
        return identity.run_name(spec, spec.subjects[0], "m", "p")

    base = name()
    names = [name(**s) for s in NEW_SETTINGS]
    assert base not in names and len(set(names)) == len(names)
    assert name(lr_num_cycles=3) != base  # even where the schedule ignores it: the spec is what was asked
    spec = parse_spec(tiny_spec(str(tmp_path), "/tmp/p", train={"snr_gamma": 5.0, "optimizer": "prodigy",
                                                                 "lr_scheduler": "cosine", "noise_offset": 0.05}))
    write_record(spec, Storage(str(tmp_path)), ("out",), {"metrics": {}})
    t = json.loads((tmp_path / "out" / "job.json").read_text())["spec"]["train"]
    assert {k: t[k] for k in ("snr_gamma", "optimizer", "lr_scheduler", "noise_offset", "weight_decay",
                              "lr_num_cycles", "lr_power")} == {
        "snr_gamma": 5.0, "optimizer": "prodigy", "lr_scheduler": "cosine", "noise_offset": 0.05,
        "weight_decay": 1e-2, "lr_num_cycles": 1, "lr_power": 1.0}
    # The SR stage keeps the paper's objective at a constant rate: base-only settings leave its run alone.
    sr = dict(sr={"enabled": True, "output_resolution": 64})
    a = parse_spec(tiny_spec("/tmp/s", "/tmp/p", **sr))
    b = parse_spec(tiny_spec("/tmp/s", "/tmp/p", train={"snr_gamma": 5.0, "noise_offset": 0.1, "lr_scheduler": "cosine",
                                                        "optimizer": "adafactor", "zero_stage": 0}, **sr))
    assert b.stage_train("sr").optimizer == "adamw" and b.stage_train("sr").zero_stage == 2  # Adafactor: ZeRO-0 only
    assert identity.sr_run_name(a, a.subjects[0], "sr", None) == identity.sr_run_name(b, b.subjects[0], "sr", None)


# train_identity's keys for a default `train:` before these settings existed (main at 74d600b, printed there).
IDENTITY_BEFORE = {"batch_size", "cache_latents", "deterministic", "flow", "gradient_accumulation", "learning_rate",
                   "lr_warmup_steps", "method", "mixed_precision", "num_workers", "offload", "random_flip",
                   "resolution", "seed", "steps", "train_text_encoder", "zero_stage"}


def test_a_run_named_before_these_settings_keeps_its_name():
    """At their defaults the new settings stay out of the identity: a run started before the upgrade
    resumes after it. Warmup's formula changed, so a warmup run is named anew."""
    from dreambooth_ray.spec import TrainConfig

    for method in ("full", "lora"):
        assert set(identity.train_identity(TrainConfig(method=method))) - {"lora"} == IDENTITY_BEFORE
    explicit = {"lr_scheduler": "constant_with_warmup", "lr_num_cycles": 1, "lr_power": 1.0, "optimizer": "adamw",
                "weight_decay": 0.01, "snr_gamma": None, "noise_offset": 0.0}
    assert identity.train_identity(TrainConfig(**explicit)) == identity.train_identity(TrainConfig())
    assert "lr_scheduler" in identity.train_identity(TrainConfig(lr_warmup_steps=3))


def test_the_memory_plan_offers_only_what_the_optimizer_allows():
    from dreambooth_ray import plan

    for opt in ("adafactor", "prodigy"):
        s = plan.Settings.of(TrainConfig(optimizer=opt, zero_stage=0))
        assert s.optimizer == opt and plan.candidates(s)
        for c in plan.candidates(s):  # each candidate is a spec the validators accept
            TrainConfig(optimizer=opt, zero_stage=c.zero_stage, offload=c.offload, mixed_precision=c.mixed_precision)
    assert {c.zero_stage for c in plan.candidates(plan.Settings(optimizer="prodigy", zero_stage=0))} == {0, 2, 3}


def test_the_training_line_names_the_controls_that_differ_from_the_defaults():
    assert TrainConfig(learning_rate=2e-4).describe_lr() == "lr 0.0002"  # the line test_console checks, unchanged
    assert TrainConfig(optimizer="prodigy", lr_scheduler="cosine", lr_warmup_steps=10, snr_gamma=5.0,
                       noise_offset=0.05).describe_lr() == (
        "lr 1 (prodigy, cosine schedule, 10 warmup steps, min-SNR gamma 5, noise offset 0.05)")
