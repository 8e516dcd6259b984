"""Many subjects in one job, on a simulated two-node cluster: concurrent runs placed on different
nodes, one prior set per class, a broken subject isolated, then fixed and re-run on another cluster."""

import json
import os
import subprocess
import sys
from pathlib import Path

from dreambooth_ray import job
from dreambooth_ray.spec import parse_spec
from dreambooth_ray.tiny import make_subject_images

from conftest import tiny_spec


def test_batch_on_two_nodes_runs_concurrently_isolates_failures_and_resumes(ray_cluster, tmp_path):
    photos, store = tmp_path / "photos", tmp_path / "store"
    make_subject_images(photos / "a", n=3, seed=1)
    make_subject_images(photos / "c", n=3, seed=3, color=(30, 30, 220))
    make_subject_images(photos / "broken", n=2, seed=4)  # too few photos
    (photos / "subjects.csv").write_text(
        "name,images,class,identifier\n"
        "a,a,toy,sks\n"
        "c,c,cup,sks\n"
        "broken,broken,toy,qlt\n"
    )
    data = tiny_spec(str(store), "unused", train={"steps": 2}, prior={"num_actors": 1})
    data["subjects"] = str(photos / "subjects.csv")
    spec = parse_spec(data)
    assert [s.images for s in spec.subjects][0] == str(photos / "a")

    p = subprocess.run([sys.executable, str(Path(__file__).with_name("multinode_job.py")), json.dumps(data)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""})
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-4000:]
    out = json.loads(line[0][len("RESULT "):])
    assert {n: s["status"] for n, s in out["subjects"].items()} == {"a": "done", "c": "done", "broken": "failed"}
    assert "at least 3" in out["subjects"]["broken"]["error"]
    # No dashboard on this cluster, so no state API for the workers' logs: the job asks once and goes
    # on (Ray's client alone would wait 40 s for one to register, before and after the job).
    assert out["dashboard"] is None and out["logs"] == {} and out["logs_asked_s"] < 5, out

    summary = json.loads((store / "outputs" / "t" / "results.json").read_text())
    # Concurrency: the two training runs overlapped in time, each on its own worker node.
    spans = sorted((s["train_start"], s["train_end"]) for s in summary["subjects"] if s["train_start"])
    assert len(spans) == 2 and spans[1][0] < spans[0][1], spans
    nodes = {n: json.loads((store / "outputs" / "t" / n / "job.json").read_text())["metrics"]["node_id"]
             for n in ("a", "c")}
    assert nodes["a"] != nodes["c"] and set(nodes.values()) == set(out["workers"]), (nodes, out)
    # One prior generation per distinct class, none repeated.
    assert sorted(p["generated"] for p in summary["priors"]) == [4, 4]
    assert len({p["key"] for p in summary["priors"]}) == 2
    assert len(list((store / "priors").iterdir())) == 2
    assert {s["name"]: s["status"] for s in summary["subjects"]}["broken"] == "failed"

    # Fix the broken subject and re-submit (to this session's cluster): only it is trained;
    # finished subjects are skipped and the priors come from the cache.
    make_subject_images(photos / "broken", n=3, seed=4)
    again = {r.name: r for r in job.run_job(spec)}
    assert {n: r.status for n, r in again.items()} == {"a": "skipped", "c": "skipped", "broken": "done"}
    assert again["broken"].stages["train"] == "ran"
    summary = json.loads((store / "outputs" / "t" / "results.json").read_text())
    assert sorted(p["generated"] for p in summary["priors"]) == [0, 0]


def test_a_lane_trains_subject_after_subject_and_a_failure_stays_its_own(ray_cluster, tmp_path, toy_images):
    """One lane at a time (a Ray Train worker group) takes four subjects' runs, one after another. c's run
    fails (test hook, no retries): its lane ends, c alone fails, and the others go on in a new lane. So
    a, b and d ran in at most two lanes, two of them in the same processes, and all three end
    bit-identical (same photos and settings): nothing of one subject's run leaks into the next's."""
    import ray

    from dreambooth_ray import train
    from dreambooth_ray.storage import Storage

    from conftest import assert_trained_and_identical, final_weights

    spec = parse_spec(tiny_spec(str(tmp_path / "store"), str(toy_images), prior={"enabled": False},
                                train={"steps": 2, "checkpoint_every": 1}))
    storage, [toy] = Storage(spec.storage), spec.subjects
    queue = train.TrainingQueue.remote(spec, "base", False, lanes=1)
    items = [train.work_item(spec, toy, storage, f"run-{n}", None, fault=("raise", 1) if n == "c" else None)
             for n in "abcd"]
    a, b, c, d = ray.get([queue.train.remote(item) for item in items])
    ray.get(queue.close.remote())
    assert c == {"error": "RuntimeError: injected failure after step 1 (test hook)"}
    assert len({r["metrics"]["lane"] for r in (a, b, d)}) <= 2
    weights = {n: final_weights(ray.train.Checkpoint(r["checkpoint"]))
               for n, r in (("a", a), ("b", b), ("d", d))}
    assert all(state == {"step": 2, "started_at": 0, "world_size": 1} for _, state in weights.values())
    assert_trained_and_identical(weights["a"][0], weights["b"][0], "weights of the lane's second subject")
    assert_trained_and_identical(weights["a"][0], weights["d"][0], "weights after a failed subject")
