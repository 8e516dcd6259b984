"""The real path's mechanisms, each checked where it lives: the T5 mask in training, run identity,
LoRA's export, and checkpoints that cannot run code."""

import os
import pickle

import pytest
import torch

from dreambooth_ray import checkpoint, engine, export, identity, models
from dreambooth_ray.spec import SpecError, parse_spec

from conftest import tiny_spec


def test_a_trained_t5_encoder_sees_the_padding_mask_as_in_inference():
    """IF's T5 reads the padding mask; with the encoder trained, the step must give the same
    prediction as the frozen path (and inference) does."""
    parts = models.load_components("tiny-if")
    te, unet, fam = parts["text_encoder"], parts["unet"], parts["family"]
    inputs = fam.prompt_inputs(parts, ["a sks toy", "a toy"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert (mask == 0).any()  # padded prompts, or the test shows nothing
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    with torch.no_grad():
        frozen = unet(x, t, fam.encode_frozen(fam.encoders(parts), inputs, torch.device("cpu"))["encoder_hidden_states"]).sample
        trained = engine.DreamBoothModel(unet, te)(x, t, input_ids=ids, attention_mask=mask)
        unmasked = engine.DreamBoothModel(unet, te)(x, t, input_ids=ids)
    assert torch.equal(trained, frozen)
    assert not torch.allclose(unmasked, frozen)  # the mask matters for this model


def _spec(**train):
    return parse_spec(tiny_spec("/tmp/unused", "/tmp/unused", train=train))


def test_run_identity_follows_every_effective_setting():
    base = parse_spec(tiny_spec("/tmp/s", "/tmp/p", sr={"enabled": True, "output_resolution": 64}))
    subject = base.subjects[0]

    def names(spec, auto=False):
        s = subject.model_copy(update={"identifier": "auto"}) if auto else subject
        return identity.run_name(spec, s, "m", "p"), identity.sr_run_name(spec, s, "sr", None)

    def changed(section, **values):
        data = tiny_spec("/tmp/s", "/tmp/p", sr={"enabled": True, "output_resolution": 64})
        data[section] = {**data.get(section, {}), **values}
        return parse_spec(data)

    b, sr = names(base)
    # The SR stage inherits workers, precision and accumulation from `train`: they name its run too.
    for setting in ({"num_workers": 2}, {"mixed_precision": "bf16"}, {"gradient_accumulation": 2}):
        nb, nsr = names(changed("train", **setting))
        assert nb != b and nsr != sr, setting
    # An `sr.num_workers` equal to the inherited count is the same run; another count is not.
    assert names(changed("sr", num_workers=1))[1] == sr and names(changed("sr", num_workers=2))[1] != sr
    # `identifier: auto` resolves from the vocabulary window: a new window is a new run.
    a = names(base, auto=True)
    assert names(changed("identifiers", rank_min=100), auto=True) != a
    assert names(changed("identifiers", rank_min=100)) == (b, sr)  # a fixed identifier ignores it
    # Cadence, retries and speed switches are the same run (resumable).
    for setting in ({"checkpoint_every": 7}, {"max_failures": 5}, {"attention": "classic"},
                    {"gradient_checkpointing": True}):
        assert names(changed("train", **setting)) == (b, sr), setting
    # Offload updates with another optimizer kernel (DeepSpeed's CPU Adam): another run
    assert names(changed("train", offload="optimizer"))[0] != b


def test_lora_with_a_fully_trained_text_encoder_is_refused():
    with pytest.raises(SpecError, match="train_text_encoder.*lora.text_encoder: true"):
        _spec(method="lora", train_text_encoder=True)
    _spec(method="lora", lora={"text_encoder": True})


def _stage0_checkpoint(folder, module_state) -> str:
    os.makedirs(folder / checkpoint.TAG)
    torch.save({"module": module_state}, folder / checkpoint.TAG / "mp_rank_00_model_states.pt")
    return str(folder)


def test_lora_export_fails_on_missing_adapter_weights(tmp_path):
    spec = _spec(method="lora", lora={"text_encoder": True})
    pipe = models.load_pipeline("tiny")
    engine.add_lora(pipe.unet, pipe.text_encoder, spec.train)
    trained = {f"{part}.{k}": v.detach().clone() + 1 for part in ("unet", "text_encoder")
               for k, v in getattr(pipe, part).named_parameters() if "lora_" in k}
    out = export.trained_pipeline(spec, _stage0_checkpoint(tmp_path / "full", trained))
    got = {f"{part}.{k}": v for part in ("unet", "text_encoder") for k, v in getattr(out, part).named_parameters()
           if "lora_" in k}
    assert got.keys() == trained.keys() and all(torch.equal(got[k], trained[k]) for k in trained)
    partial = {k: v for k, v in trained.items() if not k.startswith("text_encoder.")}
    with pytest.raises(RuntimeError, match=r"lacks \d+ trained adapter weights, e.g. \['text_encoder\."):
        export.trained_pipeline(spec, _stage0_checkpoint(tmp_path / "partial", partial))


class _Planted:
    """What a bucket writer could put in a checkpoint: unpickling it runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("layout", ["stage0", "zero"])
def test_a_planted_pickle_in_a_checkpoint_does_not_run(tmp_path, layout):
    marker = str(tmp_path / "ran")
    folder = tmp_path / "ckpt"
    os.makedirs(folder / checkpoint.TAG)
    name = "mp_rank_00_model_states.pt" if layout == "stage0" else "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"module": {"w": torch.zeros(1)}, "x": _Planted(marker)}, folder / checkpoint.TAG / name)
    if layout == "zero":  # DeepSpeed reads the model-states files first
        torch.save({"module": None, "x": _Planted(marker)}, folder / checkpoint.TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        checkpoint.consolidated_state_dict(str(folder))
    assert not os.path.exists(marker)
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # set only while loading
