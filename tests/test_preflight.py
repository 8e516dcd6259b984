"""Errors that recur on every attempt are found before any class image or worker group, named in one
line each; a failure inside training shows its own exception and is not retried."""

import json
import logging
import shutil
import time

import pytest

from dreambooth_ray import job, models, preflight, train
from dreambooth_ray.spec import parse_spec
from dreambooth_ray.storage import Storage

from conftest import tiny_spec


def tiny_copy(tmp_path, name="model", base="tiny", **edits):
    """The built-in model as a folder, with JSON edits: {"model_index.json": {...}, "unet/config.json": {...}}."""
    folder = tmp_path / name
    shutil.copytree(models.resolve(base), folder)
    for rel, change in edits.items():
        path = folder / rel
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    return folder


def problems(spec_dict, storage=None, runs=()):
    spec = parse_spec(spec_dict)
    with pytest.raises(preflight.PreflightError) as e:
        preflight.check(spec, storage or Storage(spec.storage), runs)
    return str(e.value)


def test_an_unsupported_architecture_fails_before_any_class_image(ray_cluster, tmp_path, toy_images):
    other = tiny_copy(tmp_path, **{"model_index.json": {"_class_name": "AuraFlowPipeline"}})
    store = tmp_path / "store"
    t0 = time.perf_counter()
    with pytest.raises(preflight.PreflightError) as e:
        job.run_job(parse_spec({**tiny_spec(str(store), str(toy_images)), "model": str(other)}))
    msg = str(e.value)
    assert "is a AuraFlowPipeline" in msg and "StableDiffusionPipeline (Stable Diffusion 1.x/2.x)" in msg
    assert "FluxPipeline (Flux.1)" in msg  # the supported list comes from the families
    assert not (store / "priors").exists() and not (store / "checkpoints").exists()  # no compute started
    assert time.perf_counter() - t0 < 20


def test_an_sdxl_unet_in_a_stable_diffusion_folder_is_named(tmp_path, toy_images):
    model = tiny_copy(tmp_path, **{"unet/config.json": {"addition_embed_type": "text_time"}})
    msg = problems({**tiny_spec(str(tmp_path / "s"), str(toy_images)), "model": str(model)})
    assert "added conditioning ('text_time'" in msg


def test_an_sdxl_pipeline_needs_an_sdxl_unet(tmp_path, toy_images):
    model = tiny_copy(tmp_path, **{"model_index.json": {"_class_name": "StableDiffusionXLPipeline"}})
    msg = problems({**tiny_spec(str(tmp_path / "s"), str(toy_images)), "model": str(model)})
    assert "a StableDiffusionXLPipeline needs a UNet with added conditioning ('text_time')" in msg
    model = tiny_copy(tmp_path, "sdxl", base="tiny-sdxl", **{"unet/config.json": {"addition_time_embed_dim": 4}})
    msg = problems({**tiny_spec(str(tmp_path / "s"), str(toy_images)), "model": str(model)})
    assert "added-conditioning input is 80 wide, not 6 time ids x 4 + the second text encoder's 32-wide" in msg
    preflight.check(parse_spec({**tiny_spec(str(tmp_path / "s"), str(toy_images), train={
        "method": "lora", "lora": {"text_encoder": True}}), "model": "tiny-sdxl"}), Storage(str(tmp_path / "s")))


def test_lora_targets_that_match_nothing_are_named(tmp_path, toy_images):
    msg = problems(tiny_spec(str(tmp_path / "s"), str(toy_images), train={
        "method": "lora", "lora": {"target_modules": ["to_q", "to_qq"], "text_encoder": True,
                                   "text_encoder_modules": ["q_proj", "layer_norm1", "nope"]}}))
    lines = msg.splitlines()[1:]
    assert len(lines) == 3, msg
    assert "train.lora.target_modules: target module 'to_qq' is not in this model" in msg
    assert "train.lora.text_encoder_modules: target module 'layer_norm1' matches LayerNorm layers" in msg
    assert "'nope' is not in this model" in msg
    preflight.check(parse_spec(tiny_spec(str(tmp_path / "s"), str(toy_images), train={"method": "lora"})),
                    Storage(str(tmp_path / "s")))  # the defaults pass


def test_sr_model_shape_and_x4_input_size(tmp_path, toy_images):
    base = tiny_spec(str(tmp_path / "s"), str(toy_images))
    msg = problems({**base, "sr": {"enabled": True, "model": "tiny", "output_resolution": 64}})
    assert "sr.model: 'tiny' is a StableDiffusionPipeline; supported SR models" in msg
    # tiny-x4's VAE makes 16 px latents from a 64 px output: the 32 px base resolution cannot feed it.
    msg = problems({**base, "sr": {"enabled": True, "model": "tiny-x4", "output_resolution": 64}})
    assert "the input must be 16 px, not 32" in msg
    preflight.check(parse_spec({**base, "sr": {"enabled": True, "model": "tiny-x4", "output_resolution": 64,
                                               "input_resolution": 16}}), Storage(str(tmp_path / "s")))


def test_worker_count_against_an_existing_checkpoint(tmp_path, toy_images):
    spec = parse_spec(tiny_spec(str(tmp_path / "s"), str(toy_images), prior={"enabled": False}))
    storage = Storage(spec.storage)
    runs = job.planned_runs(spec, storage, models.identity("tiny"))
    assert [(w, n) for w, _, n in runs] == [("subject toy", 1)]
    preflight.check(spec, storage, runs)  # no checkpoint yet
    storage.write_json({"step": 2, "started_at": 0, "world_size": 2}, "checkpoints", "t", runs[0][1],
                       "step-0000002", "state.json")
    with pytest.raises(preflight.PreflightError, match="written by 2 workers, and this job asks for 1"):
        preflight.check(spec, storage, runs)


def test_a_failure_inside_training_names_its_exception_and_is_not_retried(ray_cluster, tmp_path, toy_images, caplog):
    """What a new user met with an SDXL UNet: before, three attempts and 'Training failed due to worker errors'."""
    from diffusers import UNet2DConditionModel

    model = tiny_copy(tmp_path)
    config = {**UNet2DConditionModel.load_config(model / "unet"), "addition_embed_type": "text_time",
              "projection_class_embeddings_input_dim": 32 + 6 * 8, "addition_time_embed_dim": 8}
    UNet2DConditionModel.from_config(config).save_pretrained(model / "unet")  # weights for the new layers too
    spec = parse_spec({**tiny_spec(str(tmp_path / "s"), str(toy_images), prior={"enabled": False},
                                   train={"max_failures": 2, "steps": 2}), "model": str(model)})
    caplog.set_level(logging.WARNING, logger="dreambooth_ray")
    with pytest.raises(train.TrainingError) as e:
        train.fit(spec, spec.subjects[0], Storage(spec.storage), "sdxl-unet", None, use_gpu=False)
    assert str(e.value).startswith("TypeError: argument of type 'NoneType' is not")
    assert not [r for r in caplog.records if "resuming from the last checkpoint" in r.message]  # never retried


def test_retryable_failures_are_told_apart():
    import ray

    assert not train.retryable(TypeError("x")) and not train.retryable(ValueError("x"))
    assert train.retryable(RuntimeError("NCCL error")) and train.retryable(OSError("connection reset"))
    assert train.retryable(ray.exceptions.ActorDiedError())
    assert train.describe(KeyError("text_embeds")) == "KeyError: 'text_embeds'"


def test_flow_transformer_configs_are_checked_before_compute(tmp_path, toy_images):
    """SD3/Flux: the scheduler must be flow matching, T5's width the transformer's text input, LoRA
    targets must exist in the transformer (checked on a meta-device copy), and fp16 is refused."""
    model = tiny_copy(tmp_path, base="tiny-flux", **{"scheduler/scheduler_config.json": {"_class_name": "DDPMScheduler"},
                                                     "transformer/config.json": {"joint_attention_dim": 48}})
    msg = problems({**tiny_spec(str(tmp_path / "s"), str(toy_images)), "model": str(model)})
    assert "its scheduler is a DDPMScheduler, not FlowMatchEulerDiscreteScheduler" in msg
    assert "text encoder width 32 does not match the transformer's text input 48" in msg
    msg = problems({**tiny_spec(str(tmp_path / "s"), str(toy_images), train={"method": "lora", "lora": {
        "target_modules": ["to_q", "conv_in"]}}), "model": "tiny-sd3"})
    assert msg.endswith("train.lora.target_modules: target module 'conv_in' is not in this model")
    msg = problems({**tiny_spec(str(tmp_path / "s"), str(toy_images), train={"mixed_precision": "fp16"}),
                    "model": "tiny-flux"})
    assert "train.mixed_precision: a FluxPipeline's activations overflow fp16; use bf16 or bf16-weights" in msg


def test_an_export_format_the_model_cannot_take_is_named(tmp_path, toy_images):
    msg = problems(tiny_spec(str(tmp_path / "s"), str(toy_images), model="tiny-flux",
                             train={"method": "lora", "export_formats": ["kohya"]}))
    assert "train.export_formats: 'kohya' is not written for a lora run of Flux.1" in msg
    preflight.check(parse_spec(tiny_spec(str(tmp_path / "s"), str(toy_images), model="tiny-sdxl", train={
        "method": "lora", "export_formats": ["kohya"]})), Storage(str(tmp_path / "s")))


def _new_users_folder(folder):
    """What a new user brings: real JPEGs, one of them cut short, a text file named .jpg, an empty PNG."""
    import io

    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(3):
        Image.effect_noise((96, 80), 40 + 10 * i).convert("RGB").save(folder / f"IMG_{i:04d}.jpg", quality=90)
    jpg = io.BytesIO()
    Image.effect_noise((96, 80), 80).convert("RGB").save(jpg, format="JPEG", quality=90)
    (folder / "IMG_0003.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) * 2 // 3])
    (folder / "notes.jpg").write_text("shot on my phone, the dog is Rex\n")
    (folder / "blank.png").write_bytes(b"")
    return {"IMG_0003.jpg": "truncated: the file ends before the image data does",
            "notes.jpg": "not an image (it begins with text: 'shot on my phone, the do')",
            "blank.png": "empty file (0 bytes)"}


def test_every_subjects_bad_photos_are_named_before_any_compute(ray_cluster, tmp_path, s3_endpoint, bucket,
                                                               toy_images, caplog):
    """Issue #34: before any class image (the priors come first in a job), every bad file of every
    subject, a local and an s3:// one, is named with the subject and the reason in words, once (not
    again in a log line). A subject refused for its photos fails alone (issue #32), so a good subject
    beside them would run: here every subject is refused, and the job stops with one error naming all."""
    import boto3

    local = _new_users_folder(tmp_path / "rex")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for p in (tmp_path / "rex").iterdir():
        s3.put_object(Bucket=bucket, Key=f"photos/mia/{p.name}", Body=p.read_bytes())
    store = tmp_path / "store"
    subjects = [{"name": "rex", "images": str(tmp_path / "rex"), "class": "dog"},
                {"name": "toy", "images": str(toy_images), "class": "toy"},
                {"name": "mia", "images": f"s3://{bucket}/photos/mia", "class": "cat"}]
    base = tiny_spec(str(store), str(toy_images), s3={"endpoint_url": s3_endpoint})
    refused = preflight.check(parse_spec({**base, "subjects": subjects}), Storage(str(store)))
    assert sorted(refused) == ["mia", "rex"] and all(len(lines) == 3 for lines in refused.values()), refused
    spec = parse_spec({**base, "subjects": [subjects[0], subjects[2]]})
    caplog.set_level(logging.INFO, logger="dreambooth_ray")
    with pytest.raises(preflight.PreflightError) as e:
        job.run_job(spec)
    msg = str(e.value)
    logged = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("werkzeug"))  # (moto's)
    for name, why in local.items():
        assert f"  subject rex: {tmp_path / 'rex'}/{name}: {why}" in msg.splitlines(), msg
        assert f"  subject mia: s3://{bucket}/photos/mia/{name}: {why}" in msg.splitlines(), msg
        assert (msg + logged).count(name) == 2, (name, msg, logged)  # rex's and mia's: once each
    assert "object at 0x" not in msg + logged
    assert len(msg.splitlines()) == 1 + 6
    # Nothing was computed: no class image, no prior cache, no checkpoint, no encoded input.
    assert not (store / "priors").exists() and not (store / "checkpoints").exists() and not (store / "encoded").exists()


def test_with_skip_bad_images_each_bad_file_is_named_once(tmp_path, caplog):
    """The preflight warns once per skipped file; the report builder (and the workers, which read the
    photos again) say nothing more: before, the report logged a second, different line for each."""
    from dreambooth_ray import report
    from dreambooth_ray.images import load_subject_images

    bad = _new_users_folder(tmp_path / "rex")
    spec = parse_spec({**tiny_spec(str(tmp_path / "store"), str(tmp_path / "rex")), "skip_bad_images": True})
    caplog.set_level(logging.INFO)
    assert preflight.photo_problems(spec) == []  # 3 good JPEGs: enough to train on
    report.build(spec, Storage(spec.storage))
    load_subject_images(str(tmp_path / "rex"), 32, skip_bad=True, quiet=True)  # as train.py and encode.py do
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for name, why in bad.items():
        assert logged.count(name) == 1 and f"rex/{name}: {why}" in logged, logged
    page = (tmp_path / "store" / "outputs" / "t" / "report.html").read_text()
    assert all(f"{name}: {why}" in page.replace("&#x27;", "'") for name, why in bad.items())  # shown, not logged
