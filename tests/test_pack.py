"""Packed subjects (pack.py): N subjects' LoRA adapters trained in one step over the shared frozen base,
each ending where its solo run (engine.build, the same spec and seed) ends; in this process (a 1-process
gloo group, the real DeepSpeed engine, no Ray)."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_ray import checkpoint, engine, export, models, pack
from dreambooth_ray.spec import TrainConfig

CPU = torch.device("cpu")
STEPS = 4
# Prior weight 20 makes every subject's gradient norm exceed DeepSpeed's clip of 1.0 (measured 1.4-2.2 per
# subject; the three together 3.0), so the per-subject clipping is exercised at every step.
PRIOR_WEIGHT = 20.0


def _cfg(**train) -> TrainConfig:
    return TrainConfig(**{"resolution": 32, "mixed_precision": "fp32", "zero_stage": 2, "learning_rate": 1e-3,
                          "method": "lora", "random_flip": True, **train})


def _subjects():
    """Three subjects with their own photos (1, 2 and 3 of them), prompts and seeds, one class."""
    rng = np.random.default_rng(0)
    photo = lambda: Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))  # noqa: E731
    photos = [[photo() for _ in range(k + 1)] for k in range(3)]
    classes = [Image.new("RGB", (32, 32), (128, 100 + 20 * j, 128)) for j in range(3)]
    return [pack.Member(photos[i], classes, f"a {w} toy", "a toy", seed=i) for i, w in enumerate(("sks", "zwx", "qrt"))]


def _solo(parts, m: pack.Member, steps: int, **train) -> dict:
    cfg = _cfg(seed=m.seed, **train)
    torch.manual_seed(m.seed)  # as a worker seeds itself before building (train.train_subject)
    eng = engine.build(copy.deepcopy(parts), m.instance, m.classes, m.instance_text, m.class_text, cfg,
                       PRIOR_WEIGHT, CPU, masks=m.masks, captions=m.captions)
    for step in range(steps):
        eng.step(step)
    return export.live_state_dict(eng.ds, cfg, 0)


def _packed(parts, members, steps: int, start: int = 0, eng=None, **train):
    eng = eng or pack.build(copy.deepcopy(parts), members, _cfg(**train), PRIOR_WEIGHT, CPU)
    eng.most = getattr(eng, "most", torch.zeros(len(members)))  # each subject's largest gradient norm
    for step in range(start, steps):
        eng.step(step)
        eng.most = torch.maximum(eng.most, eng.norms)
    return eng


def _global_clip(params, max_norm):
    """What DeepSpeed does to a pack if left to clip: one norm over every subject's gradients."""
    grads = [p.grad for p in params]
    norm = torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()
    for g in grads:
        g.mul_(min(1.0, max_norm / (norm.item() + 1e-6)))
    return norm.expand(grads[0].shape[0])


def _worst(eng, solos) -> float:
    worst = 0.0
    for i, solo in enumerate(solos):
        mine = eng.subject_state_dict(i)
        assert set(mine) == set(solo), "a packed subject's keys are its solo run's (the export path loads them)"
        worst = max(worst, max((mine[k] - solo[k]).abs().max().item() for k in solo))
    return worst


@pytest.mark.parametrize("model,train", [("tiny", {}), ("tiny-sdxl", {}), ("tiny-sd3", {}), ("tiny-flux", {}),
                                         ("tiny", {"batch_size": 2, "gradient_accumulation": 2}),
                                         # min-SNR weights, offset noise and a schedule: 3.4e-7 measured
                                         ("tiny", {"snr_gamma": 1.0, "noise_offset": 0.1, "lr_scheduler": "cosine",
                                                   "lr_warmup_steps": 1})])
def test_a_pack_of_three_trains_each_adapter_as_its_solo_run(group, model, train):
    parts = models.load_components(model)
    members = _subjects()
    solos = [_solo(parts, m, STEPS, **train) for m in members]
    eng = _packed(parts, members, STEPS, **train)
    # The clip bites: each subject's largest norm over the steps, measured 1.5-2.3 (tiny), 1.0-1.2 (tiny-sd3).
    assert eng.most.max() > 1.0, eng.most
    # The adapters moved (B starts at zero; measured max |B| 4.0e-3 after 4 steps at lr 1e-3) and the subjects differ.
    assert min(max(v.abs().max().item() for k, v in s.items() if "lora_B" in k) for s in solos) > 1e-3
    assert max((solos[0][k] - solos[1][k]).abs().max().item() for k in solos[0]) > 0.1
    # Measured worst |packed - solo| over every adapter tensor: 7.5e-7 (tiny), 5.1e-7 (tiny-sdxl), 4.5e-7
    # (tiny-sd3), 3.0e-8 (tiny-flux), 7.5e-7 (tiny, 2 photos a micro-step, 2 micro-steps): float rounding of
    # a 3-subject batch against 1 (kernel reduction order), on weights of magnitude up to 1. Global clipping
    # puts tiny's at 4.2e-4, one shared random stream at 7.9e-3 (the next test).
    assert _worst(eng, solos) < 5e-6


@pytest.mark.parametrize("model", ["tiny-sdxl"])  # SDXL: per-row pooled embeddings and time ids too (tiny: 5.4e-7)
def test_masks_and_captions_in_a_pack_train_as_in_the_solo_run(group, model):
    """Subject 0 has a mask on one photo and its own caption on the other, subject 1 neither, subject 2 a
    caption only: each adapter still ends where its solo run (masked loss, caption rows) ends."""
    parts = models.load_components(model)
    members = _subjects()
    half = np.zeros((32, 32), np.float32)
    half[:, :16] = 1.0  # the left half is the subject
    members[0].masks, members[0].captions = [half], None
    members[2].captions = [None, "a qrt toy on a table", "a qrt toy in the snow"]
    members[0].instance.append(members[0].instance[0].rotate(90))
    members[0].masks.append(None)
    members[0].captions = [None, "a sks toy, upside down"]
    solos = [_solo(parts, m, STEPS) for m in members]
    eng = _packed(parts, members, STEPS)
    plain = copy.copy(members[0])
    plain.masks = plain.captions = None
    unmasked = max((_solo(parts, plain, STEPS)[k] - solos[0][k]).abs().max().item() for k in solos[0])
    # Measured: subject 0 trained without its mask and caption ends 4.5e-3 (tiny) / 4.1e-3 (tiny-sdxl) away;
    # the pack's worst |packed - solo| is 5.4e-7 (tiny) and 4.6e-5 (tiny-sdxl, subject 2 with distinct
    # captions). That one's losses equal its solo run's to 1e-7 at every step (no coupled rows); its weights
    # drift further through Adam, whose per-element step is lr-sized even where a gradient is at rounding level.
    assert unmasked > 1e-3
    assert _worst(eng, solos) < 1e-4


def test_coupled_subjects_would_fail_the_equality(group, monkeypatch):
    """The tolerance above is tight enough to see each coupling the pack avoids."""
    parts = models.load_components("tiny")
    members = _subjects()
    solos = [_solo(parts, m, STEPS) for m in members]
    with monkeypatch.context() as m:
        m.setattr(pack, "clip_per_subject", _global_clip)
        assert _worst(_packed(parts, members, STEPS), solos) > 1e-4  # measured 4.2e-4
    with monkeypatch.context() as m:
        seed0 = pack.step_generator
        m.setattr(pack, "step_generator", lambda seed, *a: seed0(0, *a))  # every subject draws subject 0's stream
        assert _worst(_packed(parts, members, STEPS), solos) > 1e-4  # measured 7.9e-3


def test_a_pack_over_a_base_read_in_bf16_trains_the_adapters_of_the_fp32_load(group):
    """train_pack reads the frozen base straight into bf16 under mixed_precision bf16 (engine.load_whole, as
    a solo LoRA run does): the adapters still start in fp32 (engine.fp32_view) and end bit-identical to the
    pack over the fp32 load that pack.build casts."""
    cfg = _cfg(mixed_precision="bf16")
    members = _subjects()[:2]
    runs = []
    for loader in (None, engine.partitioned_loader(cfg.model_copy(update={"zero_stage": 0}))):
        parts = models.load_components("tiny", partitioned=loader)
        eng = _packed(parts, members, 2, mixed_precision="bf16")
        runs.append([eng.subject_state_dict(i) for i in range(2)])
    assert {v.dtype for v in runs[1][0].values()} == {torch.float32}
    assert all(torch.equal(a[k], b[k]) for a, b in zip(*runs) for k in a)


def test_a_pack_resumed_from_its_checkpoint_ends_bit_identical(group, tmp_path):
    """The checkpoint holds every adapter of the pack and its optimizer state, as a LoRA run's does
    (trainable parameters only): a pack saved at step 2 and resumed in a new engine ends bit-identical
    to the pack that went on."""
    parts = models.load_components("tiny")
    members = _subjects()
    straight = pack.build(copy.deepcopy(parts), members, _cfg(), PRIOR_WEIGHT, CPU)
    _packed(parts, members, 2, eng=straight)
    at2 = [straight.subject_state_dict(i) for i in range(len(members))]
    checkpoint._save_state(straight.ds, str(tmp_path), 2, lora=True)
    # What the job exports a subject from when the workers' export is missing (job._stage_model): its row.
    saved = checkpoint.consolidated_state_dict(str(tmp_path))
    for i, want in enumerate(at2):
        got = pack.unpacked(saved, i)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), i
    _packed(parts, members, STEPS, start=2, eng=straight)
    resumed = pack.build(copy.deepcopy(parts), members, _cfg(), PRIOR_WEIGHT, CPU)
    with checkpoint.weights_only():
        _, client = resumed.ds.load_checkpoint(str(tmp_path), tag=checkpoint.TAG, load_module_strict=False)
    assert client["step"] == 2
    _packed(parts, members, STEPS, start=2, eng=resumed)
    for i in range(len(members)):
        a, b = straight.subject_state_dict(i), resumed.subject_state_dict(i)
        assert all(torch.equal(a[k], b[k]) for k in a), i
    # and not because nothing moved after the save: steps 3-4 changed the adapters
    again = pack.build(copy.deepcopy(parts), members, _cfg(), PRIOR_WEIGHT, CPU)
    _packed(parts, members, 2, eng=again)
    early, late = again.subject_state_dict(0), straight.subject_state_dict(0)
    assert any(not torch.equal(early[k], late[k]) for k in late)


@pytest.mark.parametrize("setting,named", [({"mixed_precision": "fp16"}, "loss scale"),
                                           ({"method": "full"}, "method: lora"),
                                           ({"lora": {"text_encoder": True}}, "lora.text_encoder"),
                                           ({"optimizer": "adafactor", "zero_stage": 0}, "optimizer adamw"),
                                           ({"optimizer": "prodigy"}, "optimizer adamw")])
def test_settings_a_pack_cannot_train_alone_are_refused_before_any_compute(setting, named):
    """By the spec (the job spec's error names train.pack and why), and by pack.build for a caller past it."""
    from conftest import tiny_spec

    from dreambooth_ray.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match=rf"train: pack 2: .*{named}"):
        parse_spec(tiny_spec("/nowhere", "/nowhere", train={"method": "lora", "pack": 2, **setting}))
    parse_spec(tiny_spec("/nowhere", "/nowhere", train={"method": "lora", "pack": 1, **setting}))  # alone: fine
    parts = models.load_components("tiny")
    with pytest.raises(pack.PackError, match=named):
        pack.build(parts, _subjects(), _cfg(**setting), 1.0, CPU)


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_each_subjects_adapter_exports_through_the_solo_path_and_loads_into_its_pipeline(group, tmp_path, toy_images,
                                                                                         model):
    """subject_state_dict(i) through the solo export (export.pipeline_with, save_lora), loaded by the family's
    own pipeline (`load_lora_weights`): its denoiser computes what the pack computes for subject i's rows."""
    from conftest import tiny_spec

    from dreambooth_ray.spec import parse_spec
    from dreambooth_ray.storage import Storage

    spec = parse_spec(tiny_spec(str(tmp_path), str(toy_images), model=model, train={"method": "lora"}))
    parts = models.load_components(model)
    members = _subjects()[:2]
    eng = _packed(parts, members, 2)
    net = eng.ds.module.unet
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500])
    cond = {k: v[:1] for k, v in eng.texts[0].items()}  # subject 0's first row: one prompt for every subject here
    if model == "tiny-sdxl":
        cond["time_ids"] = torch.tensor([[32.0, 32, 0, 0, 32, 32]])
    with torch.no_grad():
        both = eng.family.unet_forward(net, x.expand(2, -1, -1, -1), t.expand(2),
                                  **{k: v.expand(2, *v.shape[1:]) for k, v in cond.items()})
    base = models.load_pipeline(model)
    with torch.no_grad():
        plain = eng.family.unet_forward(base.unet, x, t, **cond)
    for i in range(2):
        url, _ = export.save_lora(Storage(str(tmp_path)), export.pipeline_with(spec, eng.subject_state_dict(i)),
                                  ("out", str(i)), with_text_encoder=False)
        loaded = models.load_pipeline(model)
        loaded.load_lora_weights(url)
        with torch.no_grad():
            got = eng.family.unet_forward(loaded.unet, x, t, **cond)
        # Measured |loaded - packed row i| 1.3e-6..1.5e-6 (a batch of 2 against 1, bmm against peft's Linears),
        # against the adapter's own effect of 2.2e-2..6.9e-2 and 1.8e-2..3.0e-2 between the two subjects' rows.
        assert (got - both[i : i + 1]).abs().max() < 1e-5, (got - both[i : i + 1]).abs().max()
        assert (got - plain).abs().max() > 5e-3
    assert (both[0] - both[1]).abs().max() > 5e-3


def test_a_job_trains_subjects_in_packs_each_as_alone_and_a_killed_worker_resumes_the_pack(ray_cluster, tmp_path):
    """`dreambooth-ray run` with `train.pack: 2` (run_job, real Ray lanes): two subjects in one run, each
    with its own adapter, samples and job.json; subject 0's adapter equals a solo job's. Then the same pack
    with rank 0 SIGKILLed after its step-2 checkpoint: the restarted lane resumes it, and every adapter
    ends bit-identical to the uninterrupted pack's."""
    import json

    from safetensors.torch import load_file

    from conftest import final_checkpoint, final_weights, tiny_spec

    from dreambooth_ray import job, train
    from dreambooth_ray.spec import parse_spec
    from dreambooth_ray.storage import Storage
    from dreambooth_ray.tiny import make_subject_images

    for name, seed, color in (("red", 0, (200, 40, 40)), ("blue", 1, (40, 40, 200))):
        make_subject_images(tmp_path / name, n=3, seed=seed, color=color)
    store = tmp_path / "store"
    data = tiny_spec(str(store), "", prior={"enabled": False},
                     train={"method": "lora", "pack": 2, "export_dtype": "fp32", "learning_rate": 1e-3,
                            "max_failures": 1},
                     subjects=[{"name": n, "images": str(tmp_path / n), "class": "toy"} for n in ("red", "blue")])
    spec = parse_spec(data)
    storage = Storage(str(store))
    results = job.run_job(spec)
    assert [r.status for r in results] == ["done", "done"], [r.error for r in results]
    adapters, records = [], []
    for i, name in enumerate(("red", "blue")):
        out = store / "outputs" / "t" / name
        record, trained = json.loads((out / "job.json").read_text()), json.loads((out / "train.json").read_text())
        assert record["exported_by"] == "training workers" and record["lora"]
        assert trained["pack"]["index"] == i and trained["pack"]["subjects"] == ["red", "blue"]
        assert (out / "samples.png").exists() and record["metrics"]["step"] == 4
        adapters.append(load_file(out / "lora" / "pytorch_lora_weights.safetensors"))
        records.append(trained)
    assert records[0]["checkpoint"] == records[1]["checkpoint"]  # one run, one checkpoint for both
    for name in ("red", "blue"):  # the members recorded before training, for a re-run to pack them again
        assert json.loads((store / "outputs" / "t" / name / job.PACK_RECORD).read_text()) == {
            "pack": records[0]["pack"]["run"], "members": [["red", records[0]["run"]], ["blue", records[1]["run"]]]}

    solo = parse_spec({**data, "name": "solo", "train": {**data["train"], "pack": 1}, "subjects": data["subjects"][:1]})
    [r] = job.run_job(solo)
    assert r.status == "done", r.error
    alone = load_file(store / "outputs" / "solo" / "red" / "lora" / "pytorch_lora_weights.safetensors")
    assert set(alone) == set(adapters[0])
    # Measured |packed - solo| at most 7.5e-7 in-process (above); the other subject's adapter is 1e-3+ away.
    assert max((adapters[0][k] - alone[k]).abs().max().item() for k in alone) < 5e-6
    assert max((adapters[1][k] - alone[k]).abs().max().item() for k in alone) > 1e-3

    # The same pack, killed: a spec of another name keeps its checkpoints and outputs apart.
    killed = parse_spec({**data, "name": "k"})
    members = [{"subject": s, "run_name": rec["run"], "prior_key": None, "reporter": None, "validator": None,
                "export_to": (("outputs", "k", s.name), rec["run"])} for s, rec in zip(killed.subjects, records)]
    got = train.fit_pack(killed, members, Storage(killed.storage), "killed", False, fault=("kill", 2))
    straight, state = final_checkpoint(storage, ("outputs", "t", "red"))
    resumed, state_k = final_weights(got[records[0]["run"]].checkpoint)
    assert state["step"] == state_k["step"] == 4 and state_k["started_at"] == 2  # resumed from step 2, not restarted
    assert set(straight) == set(resumed) and all(torch.equal(straight[k], resumed[k]) for k in straight)
    for i, name in enumerate(("red", "blue")):  # and what the killed pack's workers exported is each subject's own
        again = load_file(store / "outputs" / "k" / name / "lora" / "pytorch_lora_weights.safetensors")
        assert all(torch.equal(again[k], adapters[i][k]) for k in again)


def test_a_rerun_packs_the_subjects_of_a_started_pack_together_again(tmp_path):
    """A pack records its members (pack.json) before it trains; a re-run whose subject list shifted (a
    subject added in front, another already done) groups that pack first, so its run name, and with it
    its checkpoint, is the same. Without the record the grouping is by position (here: a new pack)."""
    from conftest import tiny_spec

    from dreambooth_ray import job
    from dreambooth_ray.identity import run_name
    from dreambooth_ray.spec import parse_spec
    from dreambooth_ray.storage import Storage
    from dreambooth_ray.tiny import make_subject_images

    make_subject_images(tmp_path / "photos", n=2, seed=0)
    names = ["new", "a", "b", "c"]
    spec = parse_spec(tiny_spec(str(tmp_path / "store"), "", prior={"enabled": False}, train={"method": "lora", "pack": 2},
                                subjects=[{"name": n, "images": str(tmp_path / "photos"), "class": "toy"} for n in names]))
    storage = Storage(spec.storage)
    fresh = [(s.name, run_name(spec, s, "model", None)) for s in spec.subjects]
    assert job.pack_groups(spec, storage, fresh) == [[0, 1], [2, 3]]  # by position

    # The first attempt's pack was (a, b): what pack_task writes for each member before it trains.
    started = job.pack_name(spec, [fresh[1][1], fresh[2][1]])
    for name in ("a", "b"):
        storage.write_json({"pack": started, "members": [list(fresh[1]), list(fresh[2])]}, "outputs", "t", name,
                           job.PACK_RECORD)
    assert job.pack_groups(spec, storage, fresh) == [[1, 2], [0, 3]]
    planned = [n for _, n, _ in job.planned_runs(spec, storage, "model") if n.startswith("pack-")]
    assert planned == [started, job.pack_name(spec, [fresh[0][1], fresh[3][1]])]  # the preflight's packs are the job's

    # A member whose run changed (its settings or photos did) cannot rebuild the pack: by position again.
    changed = [fresh[0], fresh[1], (fresh[2][0], fresh[2][1] + "x"), fresh[3]]
    assert job.pack_groups(spec, storage, changed) == [[0, 1], [2, 3]]
    # A record whose pack name does not follow from its members (written by hand, or by another spec) is ignored.
    storage.write_json({"pack": "pack-other", "members": [list(fresh[1]), list(fresh[2])]}, "outputs", "t", "a",
                       job.PACK_RECORD)
    storage.write_json({"pack": "pack-other", "members": [list(fresh[1]), list(fresh[2])]}, "outputs", "t", "b",
                       job.PACK_RECORD)
    assert job.pack_groups(spec, storage, fresh) == [[0, 1], [2, 3]]
    for bad in ([1, 2], {"pack": started, "members": [7, None]}, {"pack": started, "members": [[["a"], "b"]]}):
        storage.write_json(bad, "outputs", "t", "a", job.PACK_RECORD)  # not a record it wrote: ignored, no crash
        assert job.pack_groups(spec, storage, fresh) == [[0, 1], [2, 3]]

    # A subject whose solo run (pack: 1) left a complete checkpoint resumes it alone: it is not packed.
    step = tmp_path / "store" / "checkpoints" / "t" / fresh[3][1] / "step-2"
    (step / "uploaded").mkdir(parents=True)
    (step / "state.json").write_text('{"world_size": 1}')
    (step / "uploaded" / "rank-00000").touch()  # what checkpoint.save leaves once every rank has uploaded
    planned = [w for w, n, _ in job.planned_runs(spec, storage, "model") if n.startswith("pack-")]
    assert planned == ["the pack of new, a", "the pack of b"]
