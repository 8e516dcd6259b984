"""Many subjects in one job: concurrent runs, one prior set per class, a broken subject isolated."""

import json

from dreambooth_ray import job
from dreambooth_ray.spec import parse_spec
from dreambooth_ray.tiny import make_subject_images

from conftest import tiny_spec


def test_batch_runs_concurrently_isolates_failures_and_resumes(ray_cluster, tmp_path):
    photos = tmp_path / "photos"
    make_subject_images(photos / "a", n=3, seed=1)
    make_subject_images(photos / "b", n=3, seed=2)
    make_subject_images(photos / "c", n=3, seed=3, color=(30, 30, 220))
    make_subject_images(photos / "broken", n=2, seed=4)  # too few photos
    (photos / "subjects.csv").write_text(
        "name,images,class,identifier\n"
        "a,a,toy,sks\n"
        "b,b,toy,zwx\n"
        "c,c,cup,sks\n"
        "broken,broken,toy,qlt\n"
    )
    data = tiny_spec(str(tmp_path / "store"), "unused", train={"steps": 2})
    data["subjects"] = str(photos / "subjects.csv")
    spec = parse_spec(data)
    assert [s.images for s in spec.subjects][0] == str(photos / "a")

    results = {r.name: r for r in job.run_job(spec)}
    assert {n: r.status for n, r in results.items()} == {"a": "done", "b": "done", "c": "done", "broken": "failed"}
    assert "broken" in results["broken"].error and "at least 3" in results["broken"].error

    # Concurrency: at least two training runs overlapped in time.
    spans = sorted((r.train_start, r.train_end) for r in results.values() if r.train_start)
    assert any(b0 < a1 for (a0, a1), (b0, b1) in zip(spans, spans[1:])), spans

    # One prior generation per distinct class, none repeated.
    summary = json.loads((tmp_path / "store" / "outputs" / "t" / "results.json").read_text())
    assert sorted(p["generated"] for p in summary["priors"]) == [4, 4]
    assert len({p["key"] for p in summary["priors"]}) == 2
    assert len(list((tmp_path / "store" / "priors").iterdir())) == 2
    assert {s["name"]: s["status"] for s in summary["subjects"]}["broken"] == "failed"

    # Fix the broken subject and re-submit: only it is trained; finished subjects are skipped.
    make_subject_images(photos / "broken", n=3, seed=4)
    again = {r.name: r for r in job.run_job(spec)}
    assert {n: r.status for n, r in again.items()} == {"a": "skipped", "b": "skipped", "c": "skipped", "broken": "done"}
    assert again["broken"].stages["train"] == "ran"
    summary = json.loads((tmp_path / "store" / "outputs" / "t" / "results.json").read_text())
    assert sorted(p["generated"] for p in summary["priors"]) == [0, 0]  # priors came from the cache
