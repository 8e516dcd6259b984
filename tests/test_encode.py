"""Frozen parts off the training workers (encode.py): a worker given the encode task's output never
builds a frozen text encoder or VAE, and trains exactly as the worker that computes them itself."""

import copy
import gc

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_ray import encode, engine, models
from dreambooth_ray.spec import TrainConfig, parse_spec
from dreambooth_ray.storage import Storage

from conftest import tiny_spec

CPU = torch.device("cpu")


def _live(kinds) -> int:
    return sum(isinstance(o, kinds) for o in gc.get_objects())


@pytest.mark.parametrize("ref", ["tiny", "tiny-flux"])  # a CLIP family; T5 states and pooled CLIP
def test_a_worker_given_the_frozen_inputs_builds_no_frozen_part_and_trains_as_before(group, tmp_path, ref):
    from diffusers import AutoencoderKL
    from transformers import PreTrainedModel

    cfg = TrainConfig(resolution=32, mixed_precision="fp32", zero_stage=2, learning_rate=1e-3, batch_size=2)
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    classes = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    spec = parse_spec(tiny_spec(str(tmp_path), str(tmp_path), model=ref))
    full = models.load_components(ref)
    fam = full["family"]
    assert encode.needed(spec) == {*fam.text_encoders, "vae"}
    # The task's computation, through storage (safetensors) as a worker reads it
    made = engine.frozen_inputs(copy.deepcopy(full), photos, classes, "a sks toy", "a toy", cfg, CPU)
    storage = Storage(str(tmp_path / "store"))
    encode.save(storage, spec, "run-1", made)
    frozen = encode.load(storage, spec, "run-1")
    assert frozen.conditioning.keys() == made.conditioning.keys()

    gc.collect()
    before = _live((PreTrainedModel, AutoencoderKL))
    lean = models.load_components(ref, skip=encode.needed(spec))
    assert _live((PreTrainedModel, AutoencoderKL)) == before  # no text encoder, no VAE was built
    assert all(lean[n] is None for n in encode.needed(spec))

    a = engine.build(lean, photos, classes, "a sks toy", "a toy", cfg, 1.0, CPU, frozen=frozen)
    b = engine.build(copy.deepcopy(full), photos, classes, "a sks toy", "a toy", cfg, 1.0, CPU)
    for step in range(3):
        assert a.step(step).tolist() == b.step(step).tolist(), step
    wa, wb = a.ds.module.state_dict(), b.ds.module.state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_lane_that_encodes_first_stores_what_the_encode_task_stores(ray_cluster, tmp_path, toy_images):
    """A GPU job's lane computes the frozen inputs itself before it loads the model (train.encode_first:
    an encode task would wait for a GPU the lanes hold): forced here on CPU workers. The lane wrote them
    where the task writes, equal bit for bit to the task's, and its
    model was loaded without the frozen parts (a worker given the stored inputs trains as one computing
    them: the test above)."""
    import ray
    from safetensors.torch import load

    from dreambooth_ray import train

    spec = parse_spec(tiny_spec(str(tmp_path / "store"), str(toy_images), prior={"enabled": False},
                                train={"steps": 2, "checkpoint_every": 2}))
    storage, subject = Storage(spec.storage), spec.subjects[0]
    in_lane = train.fit(spec, subject, storage, "in-lane", None, False, encode_here=True)
    assert in_lane.metrics["parts_not_loaded"] == sorted(encode.needed(spec)) == ["text_encoder", "vae"]
    ray.get(encode.encode_task.remote(spec, [(subject, "by-task", None)]))  # a Ray worker, as the lane (1 thread)
    a, b = (load(storage.read_bytes(*encode.where(spec, run))) for run in ("in-lane", "by-task"))
    assert set(a) == set(b) >= {"instance", "conditioning.encoder_hidden_states"}
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("ref", ["tiny-flux", "tiny-sd3"])
def test_a_frozen_t5_beside_trained_clips_is_encoded_off_the_worker(group, tmp_path, ref):
    """SD3/Flux with train_text_encoder: the CLIP encoders train, T5 stays frozen. The encode task
    computes T5's states (family.frozen_states) and the worker never builds a T5, yet trains exactly as
    the worker that loads T5, computes them and drops it (bf16: frozen T5 in bf16, as in training)."""
    from transformers import T5EncoderModel

    cfg = TrainConfig(resolution=32, mixed_precision="bf16", zero_stage=2, learning_rate=1e-3, batch_size=1,
                      train_text_encoder=True)
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    classes = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))]
    spec = parse_spec(tiny_spec(str(tmp_path), str(tmp_path), model=ref, train=dict(
        resolution=32, mixed_precision="bf16", learning_rate=1e-3, train_text_encoder=True)))
    full = models.load_components(ref)
    fam = full["family"]
    assert encode.needed(spec) == {fam.t5, "vae"}
    task = models.load_components(ref, skip={fam.denoiser, *(set(fam.text_encoders) - encode.needed(spec))})
    made = engine.frozen_inputs(task, photos, classes, "a sks toy", "a toy", cfg, CPU)
    assert set(made.conditioning) == {"t5_states"} and made.conditioning["t5_states"].dtype == torch.bfloat16
    storage = Storage(str(tmp_path / "store"))
    encode.save(storage, spec, "run-1", made)
    frozen = encode.load(storage, spec, "run-1")

    gc.collect()
    before = sum(isinstance(o, T5EncoderModel) for o in gc.get_objects())
    lean = models.load_components(ref, skip=encode.needed(spec))
    assert sum(isinstance(o, T5EncoderModel) for o in gc.get_objects()) == before and lean[fam.t5] is None
    torch.manual_seed(0)
    a = engine.build(lean, photos, classes, "a sks toy", "a toy", cfg, 1.0, CPU, frozen=frozen)
    torch.manual_seed(0)
    b = engine.build(copy.deepcopy(full), photos, classes, "a sks toy", "a toy", cfg, 1.0, CPU)
    assert set(fam.trainable_encoders) <= {n for n, _ in a.ds.module.named_children()}
    for step in range(3):
        assert a.step(step).tolist() == b.step(step).tolist(), step
    wa, wb = a.ds.module.state_dict(), b.ds.module.state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("ref", ["tiny-sr", "tiny-x4"])  # IF stage II (T5, pixel pairs); x4 (CLIP, VAE latent pairs)
def test_an_sr_worker_given_the_frozen_inputs_builds_no_text_encoder_or_vae_and_trains_as_before(
        group, tmp_path, toy_images, monkeypatch, ref):
    """The SR stage's frozen inputs (the prompts' states; x4: the latent pairs of the photos and class
    images, both flips) computed as a GPU lane's rank 0 does (train.encode_first, the encode task's
    encode_runs), stored, and read back by the worker path (load_sr_components with skip, sr.build with
    frozen): every module that path constructs is counted, and none is a text encoder or a VAE; its
    losses and weights equal, bit for bit, those of the worker that loads and uses them itself."""
    import io

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import PreTrainedModel

    from dreambooth_ray import sr, train
    from dreambooth_ray.images import load_subject_images
    from dreambooth_ray.priors import PriorCache

    spec = parse_spec(tiny_spec(str(tmp_path / "store"), str(toy_images), prior={"num_class_images": 2},
                                train={"random_flip": True},
                                sr={"enabled": True, "model": ref, "input_resolution": 16, "output_resolution": 64,
                                    "learning_rate": 1e-3, "mixed_precision": "fp32", "prior_preservation": True}))
    storage, subject, cfg = Storage(spec.storage), spec.subjects[0], spec.stage_train("sr")
    rng = np.random.default_rng(0)
    for i in range(2):  # the SR stage's class images, at its output resolution
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
        storage.write_bytes(png.getvalue(), "priors", "k", PriorCache.image_name(i))
    train.encode_first(spec, [(subject, "sr-run", "k")], 0, "sr")
    frozen = encode.load(storage, spec, "sr-run")
    photos = [p.image for p in load_subject_images(subject.images, 64, None, quiet=True)]
    classes = PriorCache(storage, "k", subject.class_text, 64, spec.prior).load(2)
    if ref == "tiny-x4":
        assert encode.needed(spec, "sr") == {"text_encoder", "vae"}
        # [photo, flip, 4 + 4 + 3 (latent mean, std, low-res image), 16, 16]; class images alike
        assert frozen.instance.shape == (4, 2, 11, 16, 16) and frozen.classes.shape == (2, 2, 11, 16, 16)
    else:
        assert encode.needed(spec, "sr") == {"text_encoder"} and frozen.instance is None  # pixel pairs: the worker's

    built = []
    init = torch.nn.Module.__init__

    def counted(self, *args, **kwargs):
        built.append(type(self))
        init(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__init__", counted)
    full = models.load_sr_components(ref)  # today's worker: the counter sees the frozen parts it builds
    assert any(issubclass(c, PreTrainedModel) for c in built)
    assert any(issubclass(c, AutoencoderKL) for c in built) == (ref == "tiny-x4")
    built.clear()
    lean = models.load_sr_components(ref, skip=encode.needed(spec, "sr"))
    a = sr.build(lean, photos, classes, subject.instance_text, subject.class_text, cfg, spec.sr, 16, CPU, frozen=frozen)
    assert UNet2DConditionModel in built  # (the counter counts)
    assert not [c for c in built if issubclass(c, (PreTrainedModel, AutoencoderKL))]
    monkeypatch.undo()

    b = sr.build(full, photos, classes, subject.instance_text, subject.class_text, cfg, spec.sr, 16, CPU)
    for step in range(3):
        assert a.step(step).tolist() == b.step(step).tolist(), step
    wa, wb = a.ds.module.state_dict(), b.ds.module.state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_an_sr_unet_under_zero3_is_built_sharded_and_trains_as_the_whole_load(group, tmp_path, toy_images):
    """The SR stage under ZeRO-3 loads its UNet as the base stage does (engine.partitioned_loader): built
    sharded (DeepSpeed's partitioned parameters before the engine exists), not whole on each worker; and
    its steps are those of the UNet loaded whole, bit for bit (one worker: the shard is the parameter)."""
    from dreambooth_ray import engine, sr
    from dreambooth_ray.images import load_subject_images

    spec = parse_spec(tiny_spec(str(tmp_path / "store"), str(toy_images), prior={"enabled": False},
                                sr={"enabled": True, "model": "tiny-sr", "input_resolution": 16, "output_resolution": 64,
                                    "learning_rate": 1e-3, "mixed_precision": "fp32", "zero_stage": 3}))
    subject, cfg = spec.subjects[0], spec.stage_train("sr")
    photos = [p.image for p in load_subject_images(subject.images, 64, None, quiet=True)]
    sharded = models.load_sr_components("tiny-sr", partitioned=engine.partitioned_loader(cfg))
    assert all(hasattr(p, "ds_id") for p in sharded["unet"].parameters())  # ZeRO-3's, from construction
    whole = models.load_sr_components("tiny-sr")
    assert not any(hasattr(p, "ds_id") for p in whole["unet"].parameters())
    torch.manual_seed(cfg.seed)
    a = sr.build(sharded, photos, [], subject.instance_text, subject.class_text, cfg, spec.sr, 16, CPU)
    torch.manual_seed(cfg.seed)
    b = sr.build(whole, photos, [], subject.instance_text, subject.class_text, cfg, spec.sr, 16, CPU)
    for step in range(3):  # a wrong load (other weights, an unshared shard) moves the losses at once
        assert a.step(step).tolist() == b.step(step).tolist(), step
