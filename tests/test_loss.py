"""Prior preservation really enters the loss: the class half of the batch is used, and weighted."""

import pytest
import torch
from PIL import Image

from dreambooth_ray import tiny
from dreambooth_ray.data import DreamBoothData, step_generator
from dreambooth_ray.loss import diffusion_target, prior_preservation_loss
from dreambooth_ray.engine import DreamBoothModel, diffusion_step, latent_encoder


def test_loss_arithmetic():
    pred, target = torch.zeros(4, 1), torch.tensor([[1.0], [1.0], [2.0], [2.0]])
    loss, inst, prior = prior_preservation_loss(pred, target, n_instance=2, prior_weight=0.5)
    assert inst.item() == 1.0 and prior.item() == 4.0 and loss.item() == 1.0 + 0.5 * 4.0
    with pytest.raises(ValueError, match="not 2 subject \\+ 2 class rows"):
        prior_preservation_loss(torch.zeros(3, 1), torch.zeros(3, 1), 2, 1.0)


def test_v_prediction_target_by_hand():
    """v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0 (Salimans & Ho), abar_t the schedule's cumulative
    alpha product, computed here from the betas; epsilon prediction's target is the noise itself."""
    from diffusers import DDPMScheduler

    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 417, 999])
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t].view(3, 1, 1, 1)
    v = abar.sqrt() * noise.double() - (1 - abar).sqrt() * x0.double()
    got = diffusion_target(DDPMScheduler(prediction_type="v_prediction", **kw), x0, noise, t)
    assert got.shape == v.shape and torch.allclose(got.double(), v, rtol=0, atol=1e-5)  # fp32: 1.3e-6 measured
    assert torch.equal(diffusion_target(DDPMScheduler(prediction_type="epsilon", **kw), x0, noise, t), noise)
    with pytest.raises(ValueError, match="unsupported prediction_type 'sample'"):
        diffusion_target(DDPMScheduler(prediction_type="sample", **kw), x0, noise, t)


def test_batches_hold_subject_then_class_rows():
    white, black = Image.new("RGB", (8, 8), "white"), Image.new("RGB", (8, 8), "black")
    data = DreamBoothData([white] * 3, [black] * 5)
    pixels, n = data.batch(2, step_generator(0, 0))
    assert n == 2 and pixels.shape == (4, 3, 8, 8)
    assert (pixels[:2] == 1).all() and (pixels[2:] == -1).all()
    # Same (seed, step) -> same batch: what makes a resumed run identical.
    a, _ = DreamBoothData([white, black, white], [black], random_flip=True).batch(3, step_generator(1, 5))
    b, _ = DreamBoothData([white, black, white], [black], random_flip=True).batch(3, step_generator(1, 5))
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def parts():
    pipe = tiny.build_pipeline()
    from diffusers import DDPMScheduler

    return pipe, DDPMScheduler.from_config(pipe.scheduler.config)


def _step(parts, classes, weight, cached=False, flip=False):
    pipe, sched = parts
    subject = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.effect_noise((32, 32), 60).convert("RGB")]
    cpu = torch.device("cpu")
    encode = latent_encoder(pipe.vae, cpu) if cached else None
    data = DreamBoothData(subject, classes, random_flip=flip, encode=encode)
    g = step_generator(0, 0)
    rows, n = data.batch(1, g)
    ids = pipe.tokenizer(["a sks toy", "a toy"][: len(rows)], padding="max_length", return_tensors="pt").input_ids
    kw = {"scaling_factor": pipe.vae.config.scaling_factor} if cached else {"vae": pipe.vae}
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
        return diffusion_step(DreamBoothModel(pipe.unet), sched, rows, n, g, weight,
                              torch.float32, cpu, encoder_hidden_states=states, **kw)


def test_training_step_uses_the_class_images(parts):
    gray = [Image.new("RGB", (32, 32), (128, 128, 128))]
    noise = [Image.effect_noise((32, 32), 120).convert("RGB")]
    loss1, inst1, prior1 = _step(parts, gray, 1.0)
    loss2, inst2, prior2 = _step(parts, noise, 1.0)
    loss0, inst0, prior0 = _step(parts, gray, 0.0)
    assert prior1 > 0 and torch.isclose(loss1, inst1 + prior1)
    assert torch.isclose(inst1, inst2) and torch.isclose(inst1, inst0)  # the subject half is untouched
    assert not torch.isclose(prior1, prior2)  # other class images -> other prior loss: they are used
    assert torch.isclose(loss0, inst0) and torch.isclose(prior0, prior1)  # lambda weights the prior term
    # Without class images (prior disabled) the batch is subject-only and the prior term is zero.
    loss_np, inst_np, prior_np = _step(parts, [], 1.0)
    assert prior_np == 0 and torch.isclose(loss_np, inst_np)


@pytest.mark.parametrize("flip", [False, True])
def test_cached_latents_give_the_same_step(parts, flip):
    """Latents encoded once (both flip variants) reproduce the per-step VAE encoding exactly."""
    noise = [Image.effect_noise((32, 32), 120).convert("RGB"), Image.new("RGB", (32, 32), (10, 200, 90))]
    per_step = _step(parts, noise, 1.0, cached=False, flip=flip)
    cached = _step(parts, noise, 1.0, cached=True, flip=flip)
    for a, b in zip(per_step, cached):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a, b)
    # ...and the flip variant is the encoding of the flipped image, not the flipped latents.
    pipe, _ = parts
    data = DreamBoothData(noise, [], random_flip=True, encode=latent_encoder(pipe.vae, torch.device("cpu")))
    mean_flipped_image = data.instance[0, 1].chunk(2)[0]
    assert not torch.allclose(mean_flipped_image, data.instance[0, 0].chunk(2)[0].flip(-1), atol=1e-3)
