"""Faults injected into the real system: killed actors, missing buckets, credentials kept out of output."""

import io
import threading
import time

import psutil
import pytest
from PIL import Image

from dreambooth_ray import job, models, priors
from dreambooth_ray.spec import parse_spec
from dreambooth_ray.storage import Storage, StorageError

from conftest import assert_trained_and_identical, tiny_spec


def test_prior_actor_killed_mid_shard_still_gives_exactly_the_requested_images(ray_cluster, tmp_path):
    n = 12
    spec = parse_spec(tiny_spec(str(tmp_path / "store"), "unused",
                                prior={"num_class_images": n, "batch_size": 1, "num_actors": 2, "inference_steps": 6}))
    storage = Storage(spec.storage)
    cache = priors.PriorCache.for_subject(spec, spec.subjects[0], storage, models.identity("tiny"))
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if len([f for f in storage.listdir("priors", cache.key) if f.endswith(".png")]) >= 2:
                for p in psutil.process_iter(["cmdline"]):
                    if "ray::PriorGenerator.generate" in " ".join(p.info["cmdline"] or []):
                        p.kill()
                        killed.append(p.pid)
                        return
            time.sleep(0.05)

    t = threading.Thread(target=killer)
    t.start()
    counts = priors.generate(cache, spec, use_gpu=False)
    t.join()
    assert killed, "the test never caught an actor mid-shard"
    assert counts["generated"] == n
    names = sorted(f for f in storage.listdir("priors", cache.key) if f.endswith(".png"))
    assert names == [f"{i:06d}.png" for i in range(n)]  # exactly n, none duplicated, no temp leftovers
    assert not [f for f in storage.listdir("priors", cache.key) if f.endswith(".tmp")]
    for f in names:  # none corrupt
        Image.open(io.BytesIO((tmp_path / "store" / "priors" / cache.key / f).read_bytes())).load()


def test_missing_bucket_or_no_permission_is_a_clear_error_before_any_work(ray_cluster, s3_endpoint, bucket,
                                                                         toy_images):
    from s3proxy import FaultyS3Proxy

    spec = parse_spec(tiny_spec("s3://no-such-bucket-dbr/x", str(toy_images), s3={"endpoint_url": s3_endpoint}))
    t0 = time.time()
    with pytest.raises(StorageError, match="no-such-bucket-dbr.*not writable"):
        job.run_job(spec)
    proxy = FaultyS3Proxy(s3_endpoint)
    proxy.deny = True  # the store answers 403 AccessDenied: credentials without permission
    try:
        spec = parse_spec(tiny_spec(f"s3://{bucket}/x", str(toy_images), s3={"endpoint_url": proxy.url}))
        with pytest.raises(StorageError, match=f"{bucket}/x.*not writable.*(AccessDenied|Forbidden|Permission)"):
            job.run_job(spec)
    finally:
        proxy.close()
    assert time.time() - t0 < 60
    import boto3

    listed = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket, Prefix="x/")
    assert listed.get("KeyCount", 0) == 0  # nothing was started, nothing was written


def test_killed_driver_rerun_resumes_zero3_with_identical_weights(ray_cluster, tmp_path, toy_images):
    """`dreambooth-ray run` (ZeRO-3, 2 workers) is SIGKILLed with the local Ray it started, mid-training;
    re-running the job resumes from the last registered checkpoint, ignores a partial one, redoes no
    prior image, and ends with weights bit-identical to an uninterrupted run."""
    import json
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from dreambooth_ray import train
    from dreambooth_ray.checkpoint import consolidated_state_dict, read_state

    store = tmp_path / "store"
    spec_data = tiny_spec(str(store), str(toy_images), prior={"num_class_images": 2},
                          # sync uploads: a checkpoint on disk then trails its registration by one report
                          # (async uploads and their mid-upload deaths: test_checkpoints.py)
                          train={"steps": 10, "checkpoint_every": 2, "zero_stage": 3, "num_workers": 2,
                                 "checkpoint_upload": "sync"},
                          samples={"prompts": ["a {class_noun}"]})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec_data))
    cli = Path(sys.executable).with_name("dreambooth-ray")
    proc = subprocess.Popen([str(cli), "run", str(tmp_path / "job.yaml")], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # Step 6 on its way means step 2 is complete (sync uploads: every rank's marker written before step 3).
    while not list(store.glob("checkpoints/t/*/step-0000006/state.json")):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    tree = [proc, *psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started, mid-training
    for p in tree:
        try:
            p.kill()
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    proc.wait()
    assert not (store / "outputs" / "t" / "toy" / "job.json").exists()
    assert not list(store.glob("checkpoints/t/*/step-0000010")), "the driver finished before it was killed"

    [run_dir] = [d for d in (store / "checkpoints" / "t").iterdir() if d.name != "lanes"]  # (Ray's runs of the lanes)
    partial = run_dir / "step-9999999" / "ckpt"  # what a crash mid-upload could leave: never to be chosen
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 100)

    spec = parse_spec(spec_data)
    [result] = job.run_job(spec)
    assert result.status == "done" and result.steps == 10
    record = json.loads((store / "outputs" / "t" / "toy" / "job.json").read_text())
    resumed = run_dir / "step-0000010"
    assert read_state(str(resumed))["started_at"] >= 2, "the re-run should resume from a checkpoint, not start over"
    assert record["priors"]["key"] and len(list((store / "priors").iterdir())) == 1
    summary = json.loads((store / "outputs" / "t" / "results.json").read_text())
    assert summary["priors"][0]["generated"] == 0  # finished prior images were not redone

    ref = train.fit(spec, spec.subjects[0], Storage(spec.storage), "straight", record["priors"]["key"], use_gpu=False)
    assert read_state(ref.checkpoint.path) == {"step": 10, "started_at": 0, "world_size": 2}
    a, b = consolidated_state_dict(ref.checkpoint.path), consolidated_state_dict(str(resumed))
    assert_trained_and_identical(a, b, "ZeRO-3 weights")


def test_jobs_sharing_a_storage_root_keep_separate_checkpoints(tmp_path):
    from dreambooth_ray.identity import run_name

    a = parse_spec(tiny_spec(str(tmp_path), "x", name="job-a"))
    b = parse_spec(tiny_spec(str(tmp_path), "x", name="job-b"))
    c = parse_spec(tiny_spec(str(tmp_path), "x", name="job-a", train={"learning_rate": 1e-5}))
    storage = Storage(str(tmp_path))
    paths = {storage.ray_storage("checkpoints", s.name)[0] + "/" + run_name(s, s.subjects[0], "m", None)
             for s in (a, b, c)}
    assert len(paths) == 3  # other job, or other weights-relevant settings: another checkpoint folder
    same = parse_spec(tiny_spec(str(tmp_path), "x", name="job-a", train={"checkpoint_every": 1}))
    assert run_name(same, same.subjects[0], "m", None) == run_name(a, a.subjects[0], "m", None)
