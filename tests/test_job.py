"""End to end on a local Ray cluster and the local S3 server: the job as a user runs it."""

import json
import os
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from PIL import Image

from dreambooth_ray import job, models
from dreambooth_ray.settings import S3Settings
from dreambooth_ray.spec import load_spec, parse_spec
from dreambooth_ray.storage import Storage

from conftest import assert_exported_is_the_trained_checkpoint, final_checkpoint, tiny_spec


def snapshot(root) -> dict:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


def test_quickstart_end_to_end_then_rerun_does_nothing(quickstart):
    assert quickstart.rc == 0
    store, spec_file = quickstart.store, quickstart.spec_file
    out = store / "outputs" / "quickstart" / "toy"
    assert "toy" in quickstart.printed  # the results table names the subject

    record = json.loads((out / "job.json").read_text())
    m = record["metrics"]
    steps = quickstart.data["train"]["steps"]
    assert record["step"] == steps and m["step"] == steps
    # The spec's prior.loss_weight (0.5, see conftest) reaches the step: the reported losses are means over
    # micro-steps and ranks, linear, so L = L_subject + 0.5 L_prior holds for them to float32 rounding.
    assert m["prior_loss"] > 0 and m["loss"] == pytest.approx(m["instance_loss"] + 0.5 * m["prior_loss"], rel=1e-6)
    assert record["versions"]["deepspeed"] and record["spec"]["train"]["zero_stage"] == 2
    # The frozen VAE ran once in the encode task; the training workers never loaded it (the text encoder trains)
    assert m["parts_not_loaded"] == ["vae"] and record["timeline"]["encode"] > 0
    assert not (store / "encoded" / "quickstart" / record["run"] / "frozen.safetensors").exists()  # gone once trained
    # batch_size is per worker: the quickstart's 2 workers see 2 photos a step
    assert record["global_batch"] == {"per_worker": 1, "workers": 2, "accumulation": 1,
                                      "subject_images_per_step": 2, "subject_images_in_run": 2 * steps}
    priors = store / "priors" / record["priors"]["key"]
    assert sorted(p.name for p in priors.glob("*.png")) == [f"{i:06d}.png" for i in range(16)]

    from diffusers import StableDiffusionPipeline

    # In fp32, as the job's own samples and eval load it.
    pipe = StableDiffusionPipeline.from_pretrained(out / "model", torch_dtype=torch.float32)
    base = models.load_pipeline(quickstart.data["model"])
    # The exported UNet and text encoder (written by the training workers at the last step) are the final
    # checkpoint's consolidated weights in the export precision, bit for bit, and trained (every tensor moved
    # by lr / 2 or more).
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[record["spec"]["train"]["export_dtype"]]
    assert record["dtype"] == record["spec"]["train"]["export_dtype"]
    final, state = final_checkpoint(Storage(str(store)), ("outputs", "quickstart", "toy"))
    assert state["step"] == steps
    assert {k.split(".", 1)[0] for k in final} == {"unet", "text_encoder"}
    # A key projection's bias gets no gradient (softmax ignores what shifts every logit of a query alike):
    # weight decay alone moves it, by less than lr / 2.
    trained = {"unet": base.unet.state_dict(),
               "text_encoder": {k: v for k, v in base.text_encoder.state_dict().items() if not k.endswith("k_proj.bias")}}
    for part in ("unet", "text_encoder"):
        assert_exported_is_the_trained_checkpoint(getattr(pipe, part).state_dict(),
                                                  {k: v for k, v in final.items() if k.startswith(part + ".")},
                                                  trained[part],
                                                  lr=record["spec"]["train"]["learning_rate"], dtype=dtype,
                                                  prefix=part + ".")
    assert pipe("a sks toy", num_inference_steps=2, height=32, width=32).images[0].size == (32, 32)
    grid = Image.open(out / "samples.png")
    assert grid.size[0] == 4 * 192 and grid.size[1] > 192  # 4 prompts, captioned

    table = store / "outputs" / "quickstart" / "results.json"
    before = snapshot(store)
    results = job.run_job(load_spec(spec_file))
    assert results[0].status == "skipped"
    assert set(results[0].stages.values()) == {"skipped"}
    after = snapshot(store)
    # Only the new run's results table, its report and its own logs are written.
    job_dir = store / "outputs" / "quickstart"
    for rewritten in (table, job_dir / "report.html"):
        assert after.pop(str(rewritten)) > before.pop(str(rewritten))
    logs = str(job_dir / "logs") + os.sep
    assert not any(k.startswith(logs) and after[k] != before.get(k) for k in before if k in after)
    after = {k: v for k, v in after.items() if not k.startswith(logs)}
    before = {k: v for k, v in before.items() if not k.startswith(logs)}
    assert after == before, "a re-run of a finished job must not write anything else"
    assert json.loads(table.read_text())["subjects"][0]["status"] == "skipped"


def test_s3_two_subjects_share_one_prior_set_through_a_flaky_store(ray_cluster, s3_endpoint, bucket, toy_images):
    """Two subjects of one class on S3, through a proxy that answers every 4th request with 503 and
    drops every connection for 2 s mid-training: retried, both finish, one prior set serves both."""
    import s3fs

    from s3proxy import FaultyS3Proxy

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, use_listings_cache=False)
    fs.put(str(toy_images) + "/", f"{bucket}/photos/toy/", recursive=True)
    proxy = FaultyS3Proxy(s3_endpoint)
    proxy.fail_every = 4

    def outage():
        deadline = time.time() + 300
        while time.time() < deadline and not fs.glob(f"{bucket}/dreambooth/checkpoints/t/*/step-0000002/state.json"):
            time.sleep(0.2)
        proxy.down = True
        time.sleep(2)
        proxy.down = False

    t = threading.Thread(target=outage, daemon=True)
    t.start()
    data = tiny_spec(f"s3://{bucket}/dreambooth", f"s3://{bucket}/photos/toy", s3={"endpoint_url": proxy.url},
                     train={"steps": 4, "checkpoint_every": 2, "zero_stage": 0})
    data["subjects"].append({"name": "toy2", "images": str(toy_images), "class": "toy", "identifier": "auto"})
    try:
        results = job.run_job(parse_spec(data))
    finally:
        t.join(timeout=5)
        proxy.close()
    assert [r.status for r in results] == ["done", "done"], [r.error for r in results]
    assert [r.steps for r in results] == [4, 4]
    assert proxy.injected >= 10 and proxy.dropped >= 1, (proxy.injected, proxy.dropped)

    summary = json.loads(fs.cat_file(f"{bucket}/dreambooth/outputs/t/results.json"))
    assert [p["generated"] for p in summary["priors"]] == [4]  # one class, generated once, used twice
    keys = fs.ls(f"{bucket}/dreambooth/priors")
    assert len(keys) == 1
    assert len(fs.glob(f"{keys[0]}/*.png")) == 4
    for r in results:
        rec = json.loads(fs.cat_file(f"{bucket}/dreambooth/outputs/t/{r.name}/job.json"))
        assert rec["priors"]["url"] == f"s3://{keys[0]}"
        assert "testing-secret" not in json.dumps(rec)
        assert r.model == f"s3://{bucket}/dreambooth/outputs/t/{r.name}/model"
    # Credentials from the environment never reach storage or Ray's logs.
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    leaked = [p for p in fs.find(bucket) if secret.encode() in fs.cat_file(p)]
    assert not leaked, leaked
    logs = ray._private.worker._global_node.get_logs_dir_path()
    assert not [p for p in Path(logs).rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    pipe = models.load_pipeline(results[1].model, S3Settings(endpoint_url=s3_endpoint), torch_dtype=torch.float32)
    rec = json.loads(fs.cat_file(f"{bucket}/dreambooth/outputs/t/toy2/job.json"))
    assert rec["identifier"] in {"sks", "zwx", "qlt"} and rec["instance_prompt"] == f"a {rec['identifier']} toy"
    assert pipe(rec["instance_prompt"], num_inference_steps=2, height=32, width=32).images[0].size == (32, 32)
    assert fs.exists(f"{bucket}/dreambooth/outputs/t/toy2/samples.png")
    # The model card travels to the Hub with the folder: no bucket, endpoint or storage path in it.
    card = fs.cat_file(f"{bucket}/dreambooth/outputs/t/toy2/model/README.md").decode()
    assert rec["instance_prompt"] in card and "samples/00.png" in card
    assert not [s for s in (bucket, "s3://", s3_endpoint, proxy.url, "dreambooth/outputs") if s in card]
    # ... nor in the single-file checkpoint's header (written beside it through the same flaky store)
    single = fs.cat_file(f"{bucket}/dreambooth/outputs/t/toy2/model/toy2.safetensors")
    header = single[8:8 + int.from_bytes(single[:8], "little")].decode()
    assert f'"modelspec.trigger_phrase":"{rec["instance_prompt"]}"' in header
    assert not [s for s in (bucket, "s3://", s3_endpoint, proxy.url, "dreambooth/outputs") if s in header]


def test_own_class_images_open_the_class_set_and_generation_tops_it_up(ray_cluster, tmp_path, toy_images):
    """Issue #34, `prior.class_images` (kohya's regularisation images): 3 of the user's images and
    num_class_images 5 give a class set of exactly those 3, preprocessed as photos are, then images 3
    and 4 of the model's own class images (the same seeds as a set without the folder); the folder is
    part of the cache key and the run's name; a bad file in it fails the job before any compute."""
    import numpy as np

    from dreambooth_ray import images, preflight, priors
    from dreambooth_ray.console import Reporter
    from dreambooth_ray.identity import run_name

    own = tmp_path / "regularisation"
    own.mkdir()
    for i, size in enumerate([(48, 40), (40, 64), (36, 36)]):  # not square, not the training size
        Image.effect_noise(size, 30 + 20 * i).convert("RGB").save(own / f"reg_{i}.{'png' if i else 'jpg'}")
    base = tiny_spec(str(tmp_path / "store"), str(toy_images), prior={"num_class_images": 5})
    spec = parse_spec({**base, "prior": {**base["prior"], "class_images": str(own)}})
    plain = parse_spec(base)
    storage, subject, identity = Storage(spec.storage), spec.subjects[0], models.identity("tiny")
    cache = priors.PriorCache.for_subject(spec, subject, storage, identity)
    reference = priors.PriorCache.for_subject(plain, subject, storage, identity)
    assert cache.key != reference.key

    counts = ray.get(job.prior_task.remote(cache, spec, False, Reporter("priors")))
    assert {k: counts[k] for k in ("own", "generated", "cached", "class_images")} == \
        {"own": 3, "generated": 2, "cached": 0, "class_images": str(own)}
    assert sorted(f for f in storage.listdir("priors", cache.key) if f.endswith(".png")) == ["000003.png", "000004.png"]
    # What a training worker loads: it knows the key alone (the names come from the set's meta.json).
    loaded = priors.PriorCache(storage, cache.key, subject.class_text, 32, spec.prior).load(5)
    for name, im in zip(["reg_0.jpg", "reg_1.png", "reg_2.png"], loaded[:3]):
        assert np.array_equal(np.asarray(im), np.asarray(images.decode((own / name).read_bytes(), name, 32))), name
    priors.generate(reference, plain, use_gpu=False)
    for got, want in zip(loaded[3:], reference.load(5)[3:]):  # seeded by index: the plain set's images 3 and 4
        assert np.array_equal(np.asarray(got), np.asarray(want))
    again = ray.get(job.prior_task.remote(cache, spec, False, Reporter("priors")))
    assert (again["generated"], again["cached"], again["own"]) == (0, 2, 3)
    # Through a job: the encode task and the workers find the set by its key alone (meta.json); job.json says it.
    [r] = job.run_job(spec)
    assert r.status == "done", r.error
    record = json.loads((tmp_path / "store" / "outputs" / "t" / "toy" / "job.json").read_text())
    assert record["priors"] == {"key": cache.key, "url": cache.url, "class_images": str(own), "own": 3}
    assert record["spec"]["prior"]["class_images"] == str(own)

    # Another folder, or one more file in it: another class set, another run.
    (own / "reg_3.png").write_bytes((own / "reg_1.png").read_bytes())
    grown = priors.PriorCache.for_subject(spec, subject, storage, identity)
    assert grown.key != cache.key
    assert run_name(spec, subject, identity, grown.key) != run_name(spec, subject, identity, cache.key)

    (own / "reg_4.jpg").write_text("<html>not a photo</html>")
    with pytest.raises(preflight.PreflightError) as e:
        job.run_job(parse_spec({**base, "storage": str(tmp_path / "fresh"),
                                "prior": {**base["prior"], "class_images": str(own)}}))
    assert f"  prior.class_images: {own}/reg_4.jpg: not an image (it begins with text: '<html>not a photo</html>')" \
        in str(e.value).splitlines()
    assert not (tmp_path / "fresh" / "priors").exists()
