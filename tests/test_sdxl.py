"""Stable Diffusion XL through its family (families/sdxl.py), on the built-in tiny-sdxl: the pooled
embedding and time ids that reach the UNet against their definition; a job through Ray Train +
DeepSpeed, full under ZeRO-3 (the export loads with StableDiffusionXLPipeline.from_pretrained and
renders) and LoRA (the adapter loads with load_lora_weights and holds the trained weights)."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_ray import engine, families, models
from dreambooth_ray.data import to_tensor
from dreambooth_ray.images import load_subject_images, square
from dreambooth_ray.spec import TrainConfig

CPU = torch.device("cpu")
RES = 32
# A non-square photo, larger than the training size: resized to 49 x 32 (w x h), then the centre
# 32 x 32 crop starts 8 px from the left, and 49 - 8 - 32 = 9 px from the left of the mirrored photo.
PHOTO_W, PHOTO_H = 98, 64


@pytest.fixture(scope="module")
def sdxl_parts():
    return models.load_components("tiny-sdxl")


def _photos(folder):
    """Three photos of PHOTO_W x PHOTO_H with distinct, left-right asymmetric content."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (PHOTO_H, PHOTO_W, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_time_ids_and_pooled_embedding_reach_the_unet(group, sdxl_parts, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    assert models.family("tiny-sdxl") is families.SDXL
    photos = load_subject_images(str(_photos(tmp_path / "photos")), RES)
    assert {p.geometry for p in photos} == {(PHOTO_H, PHOTO_W, 0, 8, 32, 49)}  # (orig h, w, top, left, resized h, w)
    classes = [Image.new("RGB", (RES, RES), (128, 128, 128))]
    pipe = StableDiffusionXLPipeline.from_pretrained(models.resolve("tiny-sdxl"))

    def want(prompt):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        return embeds[0], pooled[0]

    for train_text_encoder in (False, True):  # cached embeddings of frozen encoders, and the trained encoders
        cfg = TrainConfig(resolution=RES, mixed_precision="fp32", zero_stage=2, learning_rate=1e-3, batch_size=4,
                          random_flip=True, cache_latents=False, train_text_encoder=train_text_encoder)
        parts = copy.deepcopy(sdxl_parts)
        seen, pixels = {}, []
        parts["unet"].register_forward_pre_hook(lambda m, a, kw: seen.update(args=a, **kw) and None, with_kwargs=True)
        encode = parts["vae"].encode
        parts["vae"].encode = lambda x, *a, **k: (pixels.append(x.clone()), encode(x, *a, **k))[1]
        eng = engine.build(parts, [p.image for p in photos], classes, "a sks toy", "a toy", cfg, 1.0, CPU,
                           geometry=[p.geometry for p in photos])
        eng.step(0)
        added = seen["added_cond_kwargs"]
        time_ids, text_embeds, states = added["time_ids"], added["text_embeds"], seen["args"][2]
        assert time_ids.shape == (8, 6) and text_embeds.shape == (8, 32) and states.shape == (8, 77, 64)
        subject = [to_tensor([square(Image.open(tmp_path / "photos" / f"p{i}.png").convert("RGB"), RES)])[0]
                   for i in range(3)]
        flips = 0
        for row in range(4):  # subject rows: the time ids of the photo they are, flipped or not
            px = pixels[0][row]
            plain = any(torch.equal(px, s) for s in subject)
            flipped = any(torch.equal(px, s.flip(-1)) for s in subject)
            assert plain != flipped
            flips += flipped
            assert time_ids[row].tolist() == [PHOTO_H, PHOTO_W, 0, 9 if flipped else 8, RES, RES]
            hidden, pooled = want("a sks toy")
            torch.testing.assert_close(states[row], hidden, rtol=0, atol=1e-6)
            torch.testing.assert_close(text_embeds[row], pooled, rtol=0, atol=1e-6)
        assert 0 < flips < 4  # both variants met (measured: seed 0)
        for row in range(4, 8):  # class rows: generated at the target size, uncropped
            assert time_ids[row].tolist() == [RES, RES, 0, 0, RES, RES]
            hidden, pooled = want("a toy")
            torch.testing.assert_close(states[row], hidden, rtol=0, atol=1e-6)
            torch.testing.assert_close(text_embeds[row], pooled, rtol=0, atol=1e-6)
        eng.ds.destroy()


def _base_weights(part: str) -> dict:
    from diffusers import StableDiffusionXLPipeline

    return getattr(StableDiffusionXLPipeline.from_pretrained(models.resolve("tiny-sdxl")), part).state_dict()


def test_full_zero3_both_text_encoders_trains_and_exports(ray_cluster, tmp_path, toy_images):
    """Full fine-tuning of the UNet and both text encoders under ZeRO-3 on 2 workers (the UNet loaded
    partitioned); the export is a folder StableDiffusionXLPipeline.from_pretrained loads, holding the
    trained weights. (A killed worker's bit-identical resume under ZeRO-3 is family-independent: it is
    tested on Flux, tests/test_flow.py, and the UNet families in test_job/test_reliability.)"""
    from diffusers import StableDiffusionXLPipeline

    from conftest import render, tiny_spec
    from dreambooth_ray import export, train
    from dreambooth_ray.checkpoint import consolidated_state_dict, local_copy
    from dreambooth_ray.spec import parse_spec
    from dreambooth_ray.storage import Storage

    spec = parse_spec(tiny_spec(str(tmp_path / "store"), str(toy_images), model="tiny-sdxl", prior={"enabled": False},
                                train={"zero_stage": 3, "num_workers": 2, "train_text_encoder": True}))
    storage, subject = Storage(spec.storage), spec.subjects[0]
    result = train.fit(spec, subject, storage, "straight", None, False)
    with local_copy(result.checkpoint) as d:
        b = consolidated_state_dict(d)
        pipe = export.trained_pipeline(spec, d)
    assert {k.split(".")[0] for k in b} == {"unet", "text_encoder", "text_encoder_2"}
    for part in ("unet", "text_encoder", "text_encoder_2"):  # every part trained away from the base
        base = _base_weights(part)
        assert any(not torch.equal(v, base[k.split(".", 1)[1]]) for k, v in b.items() if k.startswith(part + "."))

    url = export.save(storage, pipe, ("outputs", "t", "toy"))
    loaded = StableDiffusionXLPipeline.from_pretrained(url)
    for k, v in b.items():
        part, name = k.split(".", 1)
        assert torch.equal(getattr(loaded, part).state_dict()[name], v), k
    assert render(loaded).shape == (RES, RES, 3)


def test_lora_job_with_text_encoders_exports_what_load_lora_weights_reads(ray_cluster, tmp_path, toy_images):
    """A job (priors, `identifier: auto`, LoRA on the UNet and both text encoders, export, samples), all
    through the SDXL pipeline; the exported adapter loads with load_lora_weights and equals the trained
    one. (Evaluation through a family's pipeline is tested on SD3: tests/test_flow.py.)"""
    import json

    from diffusers import StableDiffusionXLPipeline

    from conftest import assert_exported_adapter_loads, tiny_spec
    from dreambooth_ray import job
    from dreambooth_ray.spec import parse_spec

    store = tmp_path / "store"
    data = tiny_spec(str(store), str(toy_images), model="tiny-sdxl",
                     subjects=[{"name": "toy", "images": str(toy_images), "class": "toy", "identifier": "auto"}],
                     # fp32 export: the adapter must equal the trained one bit for bit; alpha != rank
                     train={"method": "lora", "lora": {"rank": 4, "alpha": 8.0, "text_encoder": True},
                            "learning_rate": 1e-2, "export_dtype": "fp32"})
    spec = parse_spec(data)
    [result] = job.run_job(spec)
    assert result.status == "done", result.error
    out = store / "outputs" / "t" / "toy"
    record = json.loads((out / "job.json").read_text())
    tok = models.load_tokenizer("tiny-sdxl")
    assert record["identifier"] != "auto" and len(tok.tokenize(record["identifier"])) == 1
    assert (out / "samples.png").exists() and len(list((store / "priors").rglob("*.png"))) == 4

    pipe = StableDiffusionXLPipeline.from_pretrained(models.resolve("tiny-sdxl"))
    assert_exported_adapter_loads(out, pipe, ("unet", "text_encoder", "text_encoder_2"))

    # Beside it, what the UIs load (tests/test_formats.py checks each in depth): the kohya file, which
    # diffusers' kohya converter loads to the same adapters, its header, the samples and the model card.
    import yaml
    from safetensors import safe_open

    from dreambooth_ray import cli

    folder = out / "lora"
    kohya, card = folder / "toy.safetensors", folder / "README.md"
    assert record["formats"] == {"kohya": str(kohya)} and record["card"] == str(card)
    with safe_open(str(kohya), "pt") as f:
        md, written = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert md["modelspec.trigger_phrase"] == record["instance_prompt"]
    assert (md["ss_base_model_version"], md["ss_network_dim"], md["ss_network_alpha"]) == ("sdxl_base_v1-0", "4", "8.0")
    front = yaml.safe_load(card.read_text().split("---\n")[1])
    assert front["instance_prompt"] == record["instance_prompt"] and len(front["widget"]) == 2
    assert all((folder / w["output"]["url"]).is_file() for w in front["widget"])
    assert str(store) not in card.read_text() and not [v for v in md.values() if str(store) in v]
    from_kohya = StableDiffusionXLPipeline.from_pretrained(models.resolve("tiny-sdxl"))
    from_kohya.load_lora_weights(str(kohya))
    for part in ("unet", "text_encoder", "text_encoder_2"):
        want = {k: v for k, v in getattr(pipe, part).state_dict().items() if "lora_" in k}
        got = {k: v for k, v in getattr(from_kohya, part).state_dict().items() if "lora_" in k}
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), part

    # `dreambooth-ray export` writes them again for the subject already trained, from its exported adapter.
    kohya.unlink()
    card.unlink()
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    assert cli.main(["export", str(tmp_path / "job.yaml"), "--no-samples"]) == 0
    with safe_open(str(kohya), "pt") as f:
        assert set(f.keys()) == set(written) and all(torch.equal(f.get_tensor(k), written[k]) for k in written)
        assert f.metadata()["modelspec.trigger_phrase"] == record["instance_prompt"]
    assert "toy.safetensors" in card.read_text()
    assert json.loads((out / "job.json").read_text())["formats"] == {"kohya": str(kohya)}
