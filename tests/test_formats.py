"""What the UIs and the Hub load besides diffusers' formats (export.write_formats): a LoRA in kohya's layout
(AUTOMATIC1111, Forge, ComfyUI), modelspec / kohya keys in the safetensors headers, a model card, and
`train.export_formats`. Checked against diffusers' own kohya converter: `load_lora_weights` on the kohya
file (the path Civitai LoRAs take) renders what the diffusers-format adapter renders."""

from datetime import datetime

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from dreambooth_ray import export, families, models
from dreambooth_ray.identity import run_name
from dreambooth_ray.spec import SpecError, TrainConfig, parse_spec
from dreambooth_ray.storage import Storage

from conftest import tiny_spec

MODELSPEC = ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
             "modelspec.trigger_phrase", "modelspec.resolution", "modelspec.prediction_type", "modelspec.date")
KOHYA = {"tiny": ("stable-diffusion-v1", "sd_v1"), "tiny-sdxl": ("stable-diffusion-xl-v1-base", "sdxl_base_v1-0")}


def _trained_lora(model: str, rank: int, alpha: float):
    """A LoRA pipeline as training leaves it (adapters on the UNet and every text encoder), its up
    projections random: peft starts them at 0, which would make any adapter render the base model."""
    pipe = models.load_pipeline(model)
    family = families.BY_PIPELINE[type(pipe).__name__]
    family.add_lora(pipe, TrainConfig(method="lora", lora={"rank": rank, "alpha": alpha, "text_encoder": True}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for part in family.lora_parts(True):
            for n, p in getattr(pipe, part).named_parameters():
                if "lora_B" in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return pipe, family


def _render(pipe) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return pipe("a sks toy", num_inference_steps=3, height=32, width=32, generator=g, output_type="np").images[0]


@pytest.mark.parametrize("model,rank,alpha", [("tiny", 4, 8.0), ("tiny-sdxl", 4, 8.0), ("tiny-sdxl", 4, 4.0)])
def test_kohya_lora_renders_what_the_diffusers_adapter_renders(tmp_path, toy_images, model, rank, alpha):
    store = tmp_path / "store"
    spec = parse_spec(tiny_spec(str(store), str(toy_images), model=model,
                                train={"method": "lora", "lora": {"rank": rank, "alpha": alpha, "text_encoder": True}}))
    storage, subject, out = Storage(spec.storage), spec.subjects[0], ("outputs", "t", "toy")
    trained, family = _trained_lora(model, rank, alpha)
    export.save_lora(storage, trained, out, with_text_encoder=True)
    made = export.write_formats(spec, subject, storage, out, trained, "fp32", [("a sks toy", _image())])
    kohya = store / "outputs" / "t" / "toy" / "lora" / "toy.safetensors"
    assert made["formats"] == {"kohya": str(kohya)}

    with safe_open(str(kohya), "pt") as f:
        keys, header = set(f.keys()), f.metadata()
    parts = {"tiny": ("lora_unet_", "lora_te_"), "tiny-sdxl": ("lora_unet_", "lora_te1_", "lora_te2_")}[model]
    assert {next(p for p in parts if k.startswith(p)) for k in keys} == set(parts)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    if model == "tiny-sdxl":  # kohya's SDXL layout names sgm's blocks: A1111 maps them without conversion
        assert any(k.startswith("lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.") for k in keys)
        assert not any("down_blocks" in k or "up_blocks" in k for k in keys)
    with safe_open(str(kohya), "pt") as f:
        assert {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")} == {alpha}  # the trained alpha

    # diffusers' own kohya converter (load_lora_weights on the file, as for a Civitai LoRA) renders what the
    # diffusers-format adapter and the trained pipeline render: measured bit-identical (max diff 0.0).
    by_diffusers, by_kohya = models.load_pipeline(model), models.load_pipeline(model)
    by_diffusers.load_lora_weights(str(kohya.parent))  # picks pytorch_lora_weights.safetensors
    by_kohya.load_lora_weights(str(kohya))
    want = _render(trained)
    assert np.abs(_render(by_diffusers) - want).max() <= 1e-6
    assert np.abs(_render(by_kohya) - want).max() <= 1e-6
    # (`.alpha` written as the rank, as diffusers' convert_state_dict_to_kohya does, moved the kohya render
    # of the alpha-8 adapters by 0.39 (SD) and 0.15 (SDXL).) And the adapter matters (measured 0.23, 0.29):
    assert np.abs(_render(models.load_pipeline(model)) - want).max() > 0.05


def _image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (200, 10, 10))


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_headers_and_card_carry_what_uis_and_the_hub_read_and_no_storage_path(tmp_path, toy_images, model):
    store = tmp_path / "store"
    spec = parse_spec(tiny_spec(str(store), str(toy_images), model=model,
                                train={"method": "lora", "lora": {"rank": 4, "alpha": 8.0}}))
    storage, subject, out = Storage(spec.storage), spec.subjects[0], ("outputs", "t", "toy")
    trained, _ = _trained_lora(model, 4, 8.0)
    export.save_lora(storage, trained, out, with_text_encoder=False)
    before = datetime.now().astimezone()
    export.write_formats(spec, subject, storage, out, trained, "fp16",
                         [("a sks toy", _image()), ("a sks toy on the beach", _image())])
    folder = store / "outputs" / "t" / "toy" / "lora"
    arch, version = KOHYA[model]
    headers = {}
    for name in ("toy.safetensors", "pytorch_lora_weights.safetensors"):
        with safe_open(str(folder / name), "pt") as f:
            headers[name] = f.metadata()
            if name == "toy.safetensors":  # written in the export's precision, as the diffusers file is
                assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    for name, md in headers.items():
        assert set(MODELSPEC) <= set(md)
        assert md["modelspec.architecture"] == f"{arch}/lora" and md["modelspec.trigger_phrase"] == "a sks toy"
        assert md["modelspec.resolution"] == "32x32" and md["modelspec.prediction_type"] == "epsilon"
        assert md["modelspec.title"] == "toy (t)" and md["modelspec.sai_model_spec"] == "1.0.0"
        assert abs(datetime.fromisoformat(md["modelspec.date"]) - before).total_seconds() < 60
        assert (md["ss_base_model_version"], md["ss_network_dim"], md["ss_network_alpha"], md["ss_output_name"]) == \
            (version, "4", "8.0", "toy")
        assert not [v for v in md.values() if str(tmp_path) in v or "/tmp" in v], "no storage path in a header"
    assert headers["toy.safetensors"]["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert headers["pytorch_lora_weights.safetensors"]["modelspec.implementation"] == "diffusers"
    # diffusers' own header key (the adapter's alpha, read by load_lora_weights) is kept
    assert "lora_adapter_metadata" in headers["pytorch_lora_weights.safetensors"]

    text = (folder / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["instance_prompt"] == "a sks toy" and "base_model" not in front  # a built-in: no Hub id to name
    assert {"lora", "dreambooth", "text-to-image"} <= set(front["tags"])
    assert [w["text"] for w in front["widget"]] == ["a sks toy", "a sks toy on the beach"]
    assert all((folder / w["output"]["url"]).is_file() for w in front["widget"])
    assert "license" not in front and "# license:" in text  # the user's to choose
    assert "## Use it in ComfyUI / AUTOMATIC1111 / Forge" in text and "`toy.safetensors`" in text
    assert "<lora:toy:1> a sks toy" in text and 'load_lora_weights("' in text
    assert str(tmp_path) not in text and "/tmp" not in text


def test_card_names_a_hub_base_model_and_never_a_path_or_bucket():
    from dreambooth_ray.modelcard import card, hub_id

    assert hub_id("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert [hub_id(r) for r in ("tiny-sdxl", "s3://bucket/models/sdxl", "/data/models/sdxl", "./m/x")] == [None] * 4
    for ref in ("s3://my-bucket/models/sdxl", "/data/models/sdxl"):
        text = card(families.SDXL, title="toy (t)", trigger="a sks toy", base_model=ref, lora=None,
                    files={"model_index.json": "diffusers"}, samples=[], steps=10)
        assert "my-bucket" not in text and "/data" not in text and "base_model:" not in text.split("---")[1]
    text = card(families.SDXL, title="toy (t)", trigger="a sks toy", base_model="stabilityai/sdxl", lora=None,
                files={"model_index.json": "diffusers"}, samples=[], steps=10)
    assert yaml.safe_load(text.split("---\n")[1])["base_model"] == "stabilityai/sdxl"


def test_export_formats_default_to_what_the_family_writes_and_name_the_field(tmp_path, toy_images):
    lora = TrainConfig(method="lora")
    assert export.formats_of(families.SD, lora) == ("kohya",) == export.formats_of(families.SDXL, lora)
    # SD3 / Flux: the diffusers LoRA is what ComfyUI maps for them (A1111 loads neither): no kohya file
    assert export.formats_of(families.SD3, lora) == () == export.formats_of(families.FLUX, lora)
    with pytest.raises(SpecError, match=r"train.export_formats: 'kohya' is not written for a lora run of Flux"):
        export.formats_of(families.FLUX, TrainConfig(method="lora", export_formats=["kohya"]))
    with pytest.raises(SpecError, match=r"export_formats: 'kohya' is not written for a method 'full' run"):
        parse_spec(tiny_spec(str(tmp_path), str(toy_images), train={"export_formats": ["kohya"]}))
    with pytest.raises(SpecError, match=r"export_formats"):
        parse_spec(tiny_spec(str(tmp_path), str(toy_images), train={"export_formats": ["ckpt"]}))
    # What is written beside the export is not what is trained: the run (and its resume) is the same one.
    a = parse_spec(tiny_spec(str(tmp_path), str(toy_images), train={"method": "lora"}))
    b = parse_spec(tiny_spec(str(tmp_path), str(toy_images), train={"method": "lora", "export_formats": []}))
    assert run_name(a, a.subjects[0], "m", None) == run_name(b, b.subjects[0], "m", None)


def test_full_run_writes_the_familys_single_file_checkpoint_with_its_header(tmp_path, toy_images):
    """The wiring of a full fine-tune's single file (the layouts themselves: tests/test_single_file.py):
    `family.single_file_state_dict(pipe)` in the export's precision, modelspec in its header, named in
    the card with how each UI loads it."""
    store = tmp_path / "store"
    spec = parse_spec(tiny_spec(str(store), str(toy_images)))
    storage, out = Storage(spec.storage), ("outputs", "t", "toy")
    pipe = models.load_pipeline("tiny")
    assert export.formats_of(families.SD, spec.train) == ("single_file",)
    export.save(storage, pipe, out)
    made = export.write_formats(spec, spec.subjects[0], storage, out, pipe, "fp16", None)
    path = store / "outputs" / "t" / "toy" / "model" / "toy.safetensors"
    assert made["formats"] == {"single_file": str(path)}
    want = families.SD.single_file_state_dict(pipe)
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(want)
        assert all(torch.equal(f.get_tensor(k), want[k].half()) for k in want)
        md = f.metadata()
    assert set(MODELSPEC) <= set(md) and md["modelspec.architecture"] == "stable-diffusion-v1"
    assert not any(k.startswith("ss_") for k in md)  # kohya's keys are a LoRA's
    text = (path.parent / "README.md").read_text()
    assert "`toy.safetensors`" in text and "widget" not in text
    assert "ComfyUI: copy `toy.safetensors` into `ComfyUI/models/checkpoints/`" in text
    assert "AUTOMATIC1111 / Forge: copy it into `models/Stable-diffusion/`" in text


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_kohya_names_cover_resnet_and_transformer_targets(model):
    """Targets beyond attention (ResNet convs and time projections, shortcuts, proj_in, feed-forward):
    diffusers' kohya converter (SDXL: its sgm block remapping too) puts every adapter weight of the kohya
    file back on the module it was trained on."""
    from safetensors.torch import load, save

    pipe = models.load_pipeline(model)
    family = families.BY_PIPELINE[type(pipe).__name__]
    targets = ["to_q", "conv1", "conv2", "time_emb_proj", "conv_shortcut", "proj_in", "ff.net.2"]
    family.add_lora(pipe, TrainConfig(method="lora", lora={"rank": 4, "alpha": 8.0, "target_modules": targets}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    kohya = family.kohya_lora_state_dict(pipe, with_text_encoder=False)
    loaded = models.load_pipeline(model)
    loaded.load_lora_weights(load(save(kohya)))  # through the bytes of a file, as a UI reads it
    want = {k: v for k, v in pipe.unet.state_dict().items() if "lora_" in k}
    got = {k.replace(".default_0.", ".default."): v for k, v in loaded.unet.state_dict().items() if "lora_" in k}
    assert len(want) == 90  # 45 adapted modules in both tiny UNets and want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("model,arch,version", [("tiny-sd3", "stable-diffusion-3", "sd3"),
                                                ("tiny-flux", "flux-1-dev", "flux1")])
def test_flow_families_lora_is_the_diffusers_file_with_the_header_and_card(tmp_path, toy_images, model, arch, version):
    """SD3 / Flux: no kohya file (ComfyUI maps their diffusers keys; A1111 loads neither); the diffusers
    file gets the header, still loads with load_lora_weights to the trained adapters, and the card
    points ComfyUI at it."""
    store = tmp_path / "store"
    spec = parse_spec(tiny_spec(str(store), str(toy_images), model=model,
                                train={"method": "lora", "lora": {"rank": 4, "alpha": 8.0}}))
    storage, out = Storage(spec.storage), ("outputs", "t", "toy")
    trained, family = _trained_lora(model, 4, 8.0)
    export.save_lora(storage, trained, out, with_text_encoder=False)
    assert export.write_formats(spec, spec.subjects[0], storage, out, trained, "fp32", None)["formats"] == {}
    folder = store / "outputs" / "t" / "toy" / "lora"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "pytorch_lora_weights.safetensors"]
    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["modelspec.architecture"] == f"{arch}/lora" and md["ss_base_model_version"] == version
    assert md["modelspec.trigger_phrase"] == "a sks toy" and "modelspec.prediction_type" not in md  # as kohya
    loaded = models.load_pipeline(model)
    loaded.load_lora_weights(str(folder))
    want = {k: v for k, v in trained.transformer.state_dict().items() if "lora_" in k}
    got = {k.replace(".default_0.", ".default."): v for k, v in loaded.transformer.state_dict().items() if "lora_" in k}
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    text = (folder / "README.md").read_text()
    assert "ComfyUI: copy `pytorch_lora_weights.safetensors` into `ComfyUI/models/loras/`" in text
    assert "AUTOMATIC1111 / Forge: copy" not in text and "torch.bfloat16" in text
