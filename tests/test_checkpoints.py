"""Checkpoints upload in the background while training goes on, with the same guarantee as before:
a checkpoint that was still uploading when its worker died is never resumed from."""

import pickle
from pathlib import Path

import ray
import torch

from dreambooth_ray import checkpoint, train
from dreambooth_ray.settings import S3Settings
from dreambooth_ray.spec import parse_spec
from dreambooth_ray.storage import Storage

from conftest import assert_trained_and_identical, final_checkpoint, final_weights, tiny_spec


def test_a_killed_worker_resumes_from_the_last_complete_checkpoint_with_identical_weights(ray_cluster, s3_endpoint,
                                                                                         bucket, toy_images, capfd):
    """ZeRO-2 over two workers on S3, two runs of one spec at once: one uninterrupted; in the other
    rank 0 is SIGKILLed right after step 3's save, once step 2's checkpoint is complete, with step 3's
    upload queued or under way, and the store stalling on rank 0's optimizer shard of it (a proxy
    holds it): step 3 can't complete, though rank 1's part of it may land. Ray Train restarts the
    group, which resumes from step 2, not from the half-uploaded step 3, and ends bit-identical. With
    `deterministic`, as a GPU run needs for this (tests/gpu; CPU kernels are deterministic either
    way). ZeRO-3 and a killed driver: test_reliability.py. Ray's ~900-character "(raylet) A worker
    died or was killed ..." paragraph about the killed worker stays off the console (the queue says
    it in one line) and lands in the job's logs folder."""
    import threading
    import time

    from s3proxy import FaultyS3Proxy

    from dreambooth_ray import console

    errors_before = len(console.RAY_ERRORS)

    proxy = FaultyS3Proxy(s3_endpoint)
    data = tiny_spec(f"s3://{bucket}/a", str(toy_images), s3={"endpoint_url": s3_endpoint}, prior={"enabled": False},
                     train={"zero_stage": 2, "num_workers": 2, "max_failures": 1, "checkpoint_every": 1,
                            "checkpoint_upload": "async", "deterministic": True})
    spec = parse_spec(data)
    held = parse_spec({**data, "s3": {"endpoint_url": proxy.url}})
    storage, subject = Storage(spec.storage, spec.s3), spec.subjects[0]
    shard = proxy.hold = "/a/checkpoints/t/killed/step-0000003/ckpt/zero_pp_rank_0_"  # rank 0's; rank 1's may land

    def release_on_resume():  # the restarted group reads step 2's shards: the killed attempt is gone
        deadline = time.time() + 300
        while time.time() < deadline and not any(m == "GET" and "/killed/step-0000002/ckpt/" in path
                                                 for m, path in list(proxy.seen)):
            time.sleep(0.1)
        proxy.release()

    watcher = threading.Thread(target=release_on_resume, daemon=True)
    watcher.start()
    fit = ray.remote(num_cpus=0)(train.fit)
    try:
        straight, killed = ray.get([fit.remote(spec, subject, storage, "straight", None, False),
                                    fit.remote(held, subject, Storage(held.storage, held.s3), "killed", None, False,
                                               ("kill-uploading", 3))])
    finally:
        proxy.release()
        proxy.close()
    # The held path is a real one: the resumed attempt wrote it (the first may have died before).
    assert any(shard in path for _, path in proxy.seen), proxy.seen
    a, state_a = final_weights(straight.checkpoint)
    b, state_b = final_weights(ray.train.Checkpoint(killed.checkpoint.path, straight.checkpoint.filesystem))
    assert state_a == {"step": 4, "started_at": 0, "world_size": 2}
    assert state_b == {"step": 4, "started_at": 2, "world_size": 2}  # from step 2: not restarted, not from 3
    assert_trained_and_identical(a, b)

    deadline = time.time() + 20  # (Ray's error listener is a thread of this driver)
    while time.time() < deadline and not any("A worker died" in e for e in console.RAY_ERRORS[errors_before:]):
        time.sleep(0.2)
    assert console.save_ray_errors(storage, "t", since=errors_before) == storage.url("outputs", "t", "logs", "driver",
                                                                                     "ray-errors.log")
    kept = storage.read_bytes("outputs", "t", "logs", "driver", "ray-errors.log").decode()
    assert "A worker died or was killed while executing a task" in kept and "Worker exit type: SYSTEM_ERROR" in kept
    shown = "".join(capfd.readouterr())
    assert "(raylet)" not in shown and "A worker died" not in shown and "Worker exit" not in shown


def test_the_training_workers_export_the_trained_weights_under_zero3(ray_cluster, tmp_path, toy_images):
    """ZeRO-3 shards gathered on rank 0 at the last step become the diffusers folder: equal to the final
    checkpoint's consolidated weights (fp32 asked), with no checkpoint downloaded to export. The
    subject's timeline has every stage and the bytes it moved, equal to the files it wrote and read."""
    import json

    from diffusers import StableDiffusionPipeline

    from dreambooth_ray import console, job

    store = tmp_path / "store"
    spec = parse_spec(tiny_spec(str(store), str(toy_images), prior={"enabled": False},
                                train={"zero_stage": 3, "num_workers": 2, "export_dtype": "fp32", "steps": 2}))
    [r] = job.run_job(spec)
    assert r.status == "done", r.error
    out = store / "outputs" / "t" / "toy"
    record = json.loads((out / "job.json").read_text())
    assert record["exported_by"] == "training workers" and record["dtype"] == "fp32"
    weights, state = final_checkpoint(Storage(str(store)), ("outputs", "t", "toy"))
    assert state["step"] == 2
    unet = StableDiffusionPipeline.from_pretrained(out / "model").unet.state_dict()
    assert {f"unet.{k}" for k in unet} == set(weights)
    assert all(torch.equal(unet[k.removeprefix("unet.")], v) for k, v in weights.items())

    # The per-subject timeline: every stage, none negative, the worker's phases within the training span.
    t = record["timeline"]
    assert {k for k, _ in console.TIMELINE} - {"sr"} <= set(t), t  # no SR stage here
    assert min(t.values()) >= 0 and t["steps"] > 0 and t["model_load"] > 0
    summary = json.loads((store / "outputs" / "t" / "results.json").read_text())["subjects"][0]
    inside = sum(t[k] for k in ("worker_start", "photos_and_class_images", "model_load", "latent_cache_and_engine",
                                "restore", "checkpoint_buffers", "steps", "checkpoint_stalls", "validation_handover"))
    assert inside <= summary["train_end"] - summary["train_start"], (inside, summary)
    assert summary["timeline"] == t and "steps" in console.format_timeline(t)

    # The bytes it moved through storage, against the files themselves: written, the checkpoint (both
    # ranks' shards), the exported model, the loss history, the TensorBoard events and the samples; read,
    # the subject's photos and the workers' export record.
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size  # noqa: E731
    [ckpt] = (store / "checkpoints").rglob("step-0000002")
    # The encode task's file (deleted once the run is trained), made again here from the same inputs
    from dreambooth_ray import encode, engine, images, models

    photos = [s.image for s in images.load_subject_images(str(toy_images), spec.train.resolution)]
    again = Storage(str(tmp_path / "again"))
    encode.save(again, spec, "r", engine.frozen_inputs(models.load_components(spec.model), photos, [], "a sks toy",
                                                         "a toy", spec.train, torch.device("cpu")))
    encoded = size(tmp_path / "again" / Path(*encode.where(spec, "r")))
    assert not (store / "encoded").exists() or not any((store / "encoded").rglob("*.safetensors"))
    assert t["bytes_written"] == (size(ckpt) + size(out / "model") + size(out / "history") + encoded
                                  + size(store / "outputs" / "t" / "tensorboard") + size(out / "samples.png"))
    # each rank reads the photos and the encode task's output; the encode task reads the photos and wrote it
    assert t["bytes_read"] == 3 * size(toy_images) + 2 * encoded + size(out / "export.json")
    assert f"io {t['bytes_written'] / 1e6:.1f}/{t['bytes_read'] / 1e6:.1f} MB" in console.format_timeline(t)


def test_a_store_error_reading_a_checkpoint_is_retried_not_taken_for_an_incomplete_one(s3_endpoint, bucket):
    """A 503 while reading a checkpoint's state.json is the store failing, not a checkpoint still
    uploading: the listing is retried. (Read as "incomplete", it once made a finished subject end
    "without a checkpoint" in CI, and would make a resume start over.)"""
    import boto3
    import pyarrow.fs as pafs

    from s3proxy import FaultyS3Proxy

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for step in (2, 4):
        key = f"db/checkpoints/r/step-{step:07d}"
        s3.put_object(Bucket=bucket, Key=f"{key}/state.json", Body=b'{"world_size": 1}')
        s3.put_object(Bucket=bucket, Key=f"{key}/uploaded/rank-00000", Body=b"")
    proxy = FaultyS3Proxy(s3_endpoint)
    try:
        path, fs = Storage(f"s3://{bucket}/db", S3Settings(endpoint_url=proxy.url)).ray_storage("checkpoints", "r")
        # The product's client retries a 503 itself (8 attempts, with seconds of backoff); one that
        # does not lets each 503 reach the code under test at once.
        host = proxy.url.split("://")[1]
        fs = pafs.S3FileSystem(endpoint_override=host, scheme="http", region="us-east-1",
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
        proxy.fail_matching = ("step-0000004/state.json", 2)
        assert checkpoint.complete_steps((path, fs)) == [2, 4]
        assert proxy.fail_matching[1] == 0 and proxy.injected == 2
    finally:
        proxy.close()


def test_a_resuming_rank_downloads_only_what_its_engine_loads(s3_endpoint, bucket, tmp_path):
    """DeepSpeed loads the shared files and a rank's own ZeRO shards: a resuming rank downloads those
    from S3, not every rank's shards, and counts as read only what it read (from S3 or a folder). A
    checkpoint's metrics are read alone."""
    import os
    from pathlib import Path

    import boto3
    import pyarrow.fs as pafs

    from dreambooth_ray.storage import io_counts

    files = {"state.json": b'{"step": 2}', "metrics.json": b'{"loss": 0.5}', "uploaded/rank-00001": b"7",
             "ckpt/mp_rank_00_model_states.pt": b"m" * 10,  # ZeRO-2: every rank's weights
             "ckpt/zero_pp_rank_0_mp_rank_00_optim_states.pt": b"0" * 100,
             "ckpt/zero_pp_rank_1_mp_rank_00_optim_states.pt": b"1" * 101,
             "ckpt/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt": b"b" * 102,  # as bf16 runs name it
             "ckpt/zero_pp_rank_1_mp_rank_00_model_states.pt": b"z" * 103,  # ZeRO-3: the rank's own weights
             "ckpt/zero_pp_rank_10_mp_rank_00_optim_states.pt": b"x" * 104}
    rank1 = {k: v for k, v in files.items() if "rank_0_" not in k and "rank_10_" not in k}
    s3, local = boto3.client("s3", endpoint_url=s3_endpoint), tmp_path / "step-0000002"
    for k, v in files.items():
        s3.put_object(Bucket=bucket, Key=f"db/checkpoints/r/step-0000002/{k}", Body=v)
        (local / k).parent.mkdir(parents=True, exist_ok=True)
        (local / k).write_bytes(v)
    path, fs = Storage(f"s3://{bucket}/db", S3Settings(endpoint_url=s3_endpoint)).ray_storage("checkpoints", "r")
    stored = ray.train.Checkpoint(f"{path}/step-0000002", fs)

    def copied(ckpt, rank):
        read = io_counts()[1]
        with checkpoint.local_copy(ckpt, rank=rank) as d:
            got = {os.path.relpath(os.path.join(r, n), d): Path(r, n).read_bytes() for r, _, ns in os.walk(d) for n in ns}
        return got, io_counts()[1] - read

    assert copied(stored, 1) == (rank1, sum(map(len, rank1.values())))
    assert copied(stored, None) == (files, sum(map(len, files.values())))  # consolidation: every shard
    assert copied(ray.train.Checkpoint(str(local), pafs.LocalFileSystem()), 1)[1] == sum(map(len, rank1.values()))
    assert checkpoint.read_metrics(stored) == {"loss": 0.5}
    assert checkpoint.read_metrics(ray.train.Checkpoint(f"{path}/step-0000009", fs)) == {}


def test_an_async_checkpoint_holds_the_state_of_its_step_even_when_written_after_the_next(tmp_path):
    """The async path copies the state to host memory in the background and streams the copy to
    storage: the stored file has the state as it was at `save`, though the next optimizer step changes
    the live tensors (in place) before the write starts, because that step first waits for the copy
    (`settle`); and a failed write is raised where the upload waits for it."""
    import threading
    import types
    from collections import OrderedDict

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from dreambooth_ray.snapshot import SnapshotWriter

    local, store = tmp_path / "local", tmp_path / "store"  # DeepSpeed's paths name `local`; files land in `store`
    writes = SnapshotWriter()

    def begin(step, stale_marker=None):
        return writes.begin(TorchCheckpointEngine(), str(local), str(store / str(step)), None, stale_marker)

    hold = threading.Event()
    for step in (2, 4):  # the second checkpoint refills the first one's buffers
        marker = store / str(step) / "uploaded" / "rank-00000"  # a crashed attempt's, for the same step
        marker.parent.mkdir(parents=True)
        marker.write_text("0")
        begin(step, str(marker))
        writes._pool.submit(hold.wait)  # the writer is busy: the write below starts after the next step
        scaler = types.SimpleNamespace(cur_scale=2.0**step)  # ZeRO saves its live loss scaler object
        live = {"module": OrderedDict(w=torch.full((4,), float(step))),
                "optimizer": {"state": {0: {"exp_avg": torch.zeros(4) - step}}, "loss_scaler": scaler},
                "shapes": [torch.Size([4])], "step": step}
        copying = threading.Event()
        writes._copier.submit(copying.wait)  # the copy to host memory is slow, too
        writes.save(live, str(local / "ckpt" / "state.pt"))  # each checkpoint's files have the same names
        written = writes.waiter()
        settle = threading.Thread(target=writes.settle)  # the next optimizer step waits for the copy
        settle.start()
        settle.join(0.3)
        assert settle.is_alive(), "the optimizer step went on before the checkpoint's copy was made"
        copying.set()
        settle.join()
        live["module"]["w"].add_(1)  # the next step
        live["optimizer"]["state"][0]["exp_avg"].add_(1)
        scaler.cur_scale /= 2  # an overflow
        hold.set()
        stored = store / str(step) / "ckpt" / "state.pt"
        assert written() == stored.stat().st_size  # the bytes sent, as stored
        assert not marker.exists()  # dropped before the shard was rewritten
        hold.clear()
        saved = torch.load(stored, weights_only=False)
        assert torch.equal(saved["module"]["w"], torch.full((4,), float(step)))
        assert torch.equal(saved["optimizer"]["state"][0]["exp_avg"], torch.zeros(4) - step)
        assert type(saved["module"]) is OrderedDict and saved["shapes"] == [torch.Size([4])] and saved["step"] == step
        assert saved["optimizer"]["loss_scaler"].cur_scale == 2.0**step
    assert not local.exists()  # nothing was written locally

    # A checkpoint saved while the last one's write is still queued waits for it: the buffers are shared.
    begin(6)
    writes._pool.submit(hold.wait)
    writes.save({"w": torch.full((4,), 6.0)}, str(local / "state.pt"))
    written = writes.waiter()

    def next_checkpoint():
        begin(8)
        writes.save({"w": torch.full((4,), 8.0)}, str(local / "state.pt"))

    t = threading.Thread(target=next_checkpoint)
    t.start()
    t.join(0.5)  # it waits in begin() for step 6's write (else it refills the buffer now)
    hold.set()
    t.join()
    written()
    writes.waiter()()
    assert torch.equal(torch.load(store / "6" / "state.pt")["w"], torch.full((4,), 6.0))
    assert torch.equal(torch.load(store / "8" / "state.pt")["w"], torch.full((4,), 8.0))

    begin(10)
    writes.save({"w": torch.ones(1), "hook": lambda: None}, str(local / "state.pt"))  # pickle can't write this
    try:
        writes.waiter()()
    except (AttributeError, TypeError, pickle.PicklingError) as e:
        assert "lambda" in str(e)
    else:
        raise AssertionError("a failed background write passed unnoticed")


def test_a_streamed_file_goes_to_the_store_in_flushed_slices(tmp_path):
    """pyarrow's S3 stream queues (a copy of) whatever it is given until a flush: the writer hands it
    slices of at most `chunk` bytes, each flushed, and the file is byte for byte torch.save's."""
    import io

    import pyarrow.fs as pafs

    from dreambooth_ray.snapshot import _Bounded

    class Recording(io.BytesIO):
        def __init__(self):
            super().__init__()
            self.log = []

        def write(self, b):
            self.log.append(len(memoryview(b).cast("B")))
            return super().write(b)

        def flush(self):
            self.log.append("flush")

    out = Recording()
    assert _Bounded(out, chunk=7).write(bytes(range(20))) == 20
    assert out.log == [7, "flush", 7, "flush", 6, "flush"] and out.getvalue() == bytes(range(20))

    state = {"w": torch.arange(100_000, dtype=torch.float32)}
    direct = io.BytesIO()
    torch.save(state, direct)
    with pafs.LocalFileSystem().open_output_stream(str(tmp_path / "s.pt")) as f:
        torch.save(state, _Bounded(f, chunk=4096))
    assert (tmp_path / "s.pt").read_bytes() == direct.getvalue()
