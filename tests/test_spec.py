import json
import subprocess
import sys

import pytest

from dreambooth_ray.spec import SpecError, load_spec, parse_spec
from dreambooth_ray.storage import Storage

from conftest import ROOT, tiny_spec


def errors_of(data) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(data, "job.yaml")
    return str(e.value)


def test_quickstart_spec_loads_and_resolves_paths_relative_to_the_file():
    spec = load_spec(ROOT / "jobs" / "quickstart.yaml")
    s = spec.subjects[0]
    assert s.images == str(ROOT / "jobs" / "toyworld-subjects" / "toy-purple-dots")
    assert spec.storage == str(ROOT / "runs")
    assert s.instance_text == "a sks toy" and s.class_text == "a toy"


def test_own_class_images_resolve_like_photos(tmp_path):
    import yaml

    (tmp_path / "job.yaml").write_text(yaml.safe_dump(tiny_spec("s3://b/x", "photos", prior={"class_images": "reg/dogs"})))
    assert load_spec(tmp_path / "job.yaml").prior.class_images == str(tmp_path / "reg" / "dogs")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(tiny_spec("s3://b/x", "p", prior={"class_images": "s3://b/reg"})))
    assert load_spec(tmp_path / "job.yaml").prior.class_images == "s3://b/reg"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "jobs").glob("*.yaml")))
def test_every_example_job_is_a_valid_spec(name):
    spec = load_spec(ROOT / "jobs" / name)
    assert spec.subjects and (spec.sr.enabled is (name == "cascade.yaml"))


def test_unknown_keys_and_bad_values_name_the_field():
    msg = errors_of(tiny_spec("/tmp/x", "/tmp/y", train={"steps": -3, "zero_stage": 5, "lr": 1e-4}, bogus=1))
    assert "job.yaml: invalid job spec" in msg
    assert "train.steps:" in msg and "greater than or equal to 1" in msg
    assert "train.zero_stage:" in msg
    assert "train.lr: unknown field" in msg
    assert "bogus: unknown field" in msg


def test_wrong_types_and_missing_class_are_reported():
    data = tiny_spec("/tmp/x", "/tmp/y", train={"steps": "many", "learning_rate": [1]})
    del data["subjects"][0]["class"]
    msg = errors_of(data)
    assert "train.steps:" in msg and "train.learning_rate:" in msg
    assert "subjects.0.class: Field required" in msg


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "x" * 65, "sp ace", ""])
def test_subject_names_cannot_escape_storage(name):
    data = tiny_spec("/tmp/x", "/tmp/y")
    data["subjects"][0]["name"] = name
    assert "subjects.0.name" in errors_of(data)


def test_storage_paths_are_checked_segment_by_segment(tmp_path):
    st = Storage(str(tmp_path))
    assert st.path("outputs", "job", "toy") == f"{tmp_path}/outputs/job/toy"
    with pytest.raises(ValueError):
        st.path("outputs", "..", "etc")
    with pytest.raises(ValueError):
        st.path("outputs/../../etc")


def test_duplicate_subjects_bad_placeholders_and_fp16_on_cpu():
    data = tiny_spec("/tmp/x", "/tmp/y")
    data["subjects"].append(dict(data["subjects"][0]))
    assert "repeated: toy" in errors_of(data)
    data = tiny_spec("/tmp/x", "/tmp/y")
    data["subjects"][0]["instance_prompt"] = "a {ident} thing"
    assert "subjects.0.instance_prompt" in errors_of(data)
    assert "fp16" in errors_of(tiny_spec("/tmp/x", "/tmp/y", train={"mixed_precision": "fp16", "use_gpu": False}))
    assert "subject" in errors_of({**tiny_spec("/tmp/x", "/tmp/y"), "subject": {}})


def test_yaml_is_loaded_safely(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="job.yaml: not valid YAML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="cannot read job spec"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(tmp_path / "list.yaml")


def test_cli_reports_spec_errors_without_a_traceback(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("name: q\nsubject: {name: toy, images: x, class: toy}\ntrain: {steps: -1, stepz: 3}\n")
    p = subprocess.run([sys.executable, "-m", "dreambooth_ray.cli", "run", str(job)], capture_output=True, text=True)
    assert p.returncode == 2
    assert "train.steps" in p.stderr and "train.stepz: unknown field" in p.stderr
    assert "Traceback" not in p.stderr


def test_defaults_follow_the_standard_recipe():
    """LoRA learns at its own rate (diffusers' LoRA recipes: 1e-4; at full fine-tuning's 5e-6 a rank-4
    adapter barely moves), a rate the spec gives is kept, and subjects are not mirrored by default."""
    from dreambooth_ray.spec import TrainConfig

    def train(**t):
        data = tiny_spec("/tmp/x", "/tmp/y")
        data["train"].pop("learning_rate")
        data["train"].update(t)
        return parse_spec(data).train

    assert train(method="lora").learning_rate == 1e-4 and train().learning_rate == 5e-6
    assert train(method="lora", learning_rate=3e-5).learning_rate == 3e-5
    assert train().random_flip is False
    assert TrainConfig(method="lora").learning_rate == 1e-4 and TrainConfig().learning_rate == 5e-6
    # job.json records the spec: the rate used is stated there
    assert json.loads(TrainConfig(method="lora").model_dump_json())["learning_rate"] == 1e-4


def test_the_global_batch_is_per_worker_times_workers_times_accumulation():
    from dreambooth_ray.spec import TrainConfig

    cfg = TrainConfig(batch_size=2, num_workers=4, gradient_accumulation=3, steps=100)
    assert cfg.global_batch == {"per_worker": 2, "workers": 4, "accumulation": 3, "subject_images_per_step": 24,
                                "subject_images_in_run": 2400}
    assert cfg.describe_batch() == ("global batch 24 (2 per worker x 4 worker(s) x 3 accumulation), "
                                    "2400 subject images in 100 steps")
