"""Preflight: what would fail every time, found before any class image or worker group starts.

It reads configs only (model_index.json and each part's config.json) and builds modules on the
meta device, so it costs seconds and no weights, whatever the model's size or location; and it
decodes every subject's photos (and the user's own class images), as training will. Each problem is
one line that names its cause; all of them are reported at once.
"""

from __future__ import annotations

import json
import logging

from . import families
from .configs import ModelConfigs, PreflightError, model_index
from .spec import JobSpec, SpecError
from .storage import Storage

log = logging.getLogger("dreambooth_ray")

# What the families (families/) support: {pipeline class: description}.
BASE_PIPELINES = families.supported("base")
SR_PIPELINES = families.supported("sr")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# peft wraps these layer kinds; a target that names anything else fails inside every worker.
_LORA_LAYERS = ("Linear", "Conv2d", "Conv1d", "Embedding")


def _meta_denoiser(family, config: dict):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return family.denoiser_type().from_config(config)


def _meta_text_encoder(class_name: str, config: dict):
    import transformers
    from accelerate import init_empty_weights

    cls = getattr(transformers, class_name)
    with init_empty_weights():
        return cls(cls.config_class.from_dict(config))


def lora_target_problems(module, targets: tuple[str, ...], where: str) -> list[str]:
    """peft's rule for a list of targets: a module matches when its name is the target or ends in
    '.<target>'. A target that matches nothing, or only layers peft cannot wrap, fails every time."""
    problems = []
    named = list(module.named_modules())
    for t in targets:
        hits = [m for n, m in named if n == t or n.endswith("." + t)]
        if not hits:
            problems.append(f"{where}: target module {t!r} is not in this model")
        elif not all(type(m).__name__ in _LORA_LAYERS for m in hits):
            kinds = sorted({type(m).__name__ for m in hits} - set(_LORA_LAYERS))
            problems.append(f"{where}: target module {t!r} matches {', '.join(kinds)} layers, which LoRA cannot adapt")
    return problems


def base_model_problems(spec: JobSpec) -> list[str]:
    cfgs = ModelConfigs(spec.model, spec.s3, "model")
    index = model_index(cfgs)
    kind = index.get("_class_name")
    if kind not in BASE_PIPELINES:
        names = ", ".join(f"{k} ({v})" for k, v in BASE_PIPELINES.items())
        return [f"model: {spec.model!r} is a {kind}; supported base models: {names}"]
    family = families.family_for(index, "base")
    den = cfgs.read(f"{family.denoiser}/config.json") or {}
    problems = family.config_problems(cfgs.read, den) + family.objective_problems(spec.train)
    sched = cfgs.read("scheduler/scheduler_config.json") or {}
    if sched.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        problems.append(f"model: scheduler prediction_type {sched['prediction_type']!r} is not one of {PREDICTION_TYPES}")
    if spec.train.mixed_precision == "fp16" and family.inference_half != "float16":
        problems.append(f"train.mixed_precision: a {kind}'s activations overflow fp16; use bf16 or bf16-weights")
    hidden, expected = family.text_width(cfgs.read), family.cross_width(den)
    if hidden and expected and hidden != expected:
        problems.append(f"model: text encoder width {hidden} does not match the {family.denoiser}'s text input {expected}")
    if spec.train.export_formats is not None:
        from .export import formats_of

        try:
            formats_of(family, spec.train)
        except SpecError as e:
            problems.append(str(e))
    if spec.train.method == "lora" and not problems:
        lc = spec.train.lora
        unet_targets, te_targets = family.lora_targets_of(lc)
        problems += lora_target_problems(_meta_denoiser(family, den), unet_targets, "train.lora.target_modules")
        for name in family.trainable_encoders if lc.text_encoder else ():
            te_class = (index.get(name) or [None, None])[1]
            if te_class:
                where = "train.lora.text_encoder_modules" + ("" if name == "text_encoder" else f" ({name})")
                problems += lora_target_problems(_meta_text_encoder(te_class, cfgs.read(f"{name}/config.json") or {}),
                                                 te_targets, where)
    return problems


def sr_model_problems(spec: JobSpec) -> list[str]:
    sr = spec.sr
    cfgs = ModelConfigs(sr.model, spec.s3, "sr.model")
    kind = model_index(cfgs).get("_class_name")
    if kind not in SR_PIPELINES:
        names = ", ".join(f"{k} ({v})" for k, v in SR_PIPELINES.items())
        return [f"sr.model: {sr.model!r} is a {kind}; supported SR models: {names}"]
    unet = cfgs.read("unet/config.json") or {}
    conditioned = unet.get("class_embed_type") is not None or unet.get("num_class_embeds") is not None
    if unet.get("in_channels") not in (6, 7) or not conditioned:
        return [f"sr.model: its UNet is not a super-resolution UNet (6 or 7 input channels and noise-level "
                f"class labels; it has {unet.get('in_channels')} channels)"]
    if unet["in_channels"] == 7:  # x4: the low-res image is concatenated with latents of its own size
        vae = cfgs.read("vae/config.json") or {}
        factor = 2 ** (len(vae.get("block_out_channels", [0] * 3)) - 1)
        in_res = sr.input_resolution or spec.train.resolution
        if sr.output_resolution != in_res * factor:
            return [f"sr: this x4 upscaler's VAE makes {sr.output_resolution // factor} px latents from a "
                    f"{sr.output_resolution} px output, so the input must be {sr.output_resolution // factor} px, "
                    f"not {in_res} (set sr.input_resolution or sr.output_resolution)"]
    return []


def checkpoint_problems(storage: Storage, job: str, runs: list[tuple[str, str, int]]) -> list[str]:
    """(what, run name, workers): a run that already has checkpoints resumes only at their worker count."""
    problems = []
    for what, run, workers in runs:
        root = storage.path("checkpoints", job, run)
        states = sorted(storage.fs.glob(f"{root}/step-*/state.json"))
        if not states:
            continue
        with storage.fs.open(states[-1], "rb") as f:
            state = json.load(f)
        if state.get("world_size") != workers:
            problems.append(
                f"{what}: run {run} has a checkpoint at step {state.get('step')} written by {state.get('world_size')} "
                f"workers, and this job asks for {workers}; ZeRO checkpoints resume only on the same count "
                f"(set the worker count back, or remove {storage.url('checkpoints', job, run)} to start over)")
    return problems


def memory_problems(spec: JobSpec, gpu_memory: int | None) -> list[str]:
    """The memory plan (plan.py) against the GPUs' memory: a spec that cannot fit fails here, naming
    the figure and the cheapest settings that would fit. Nothing is checked when the GPUs' memory is
    unknown (CPU training, or a cluster that does not say: cluster.gpu_memory)."""
    if not gpu_memory:
        return []
    from . import plan

    try:
        problem = plan.check_fits(spec, gpu_memory)
    except Exception as e:  # the plan is an estimate: a model it cannot trace is no reason to refuse a job
        import logging

        logging.getLogger(__name__).warning("no memory plan for %s (%s: %s)", spec.model, type(e).__name__, e)
        return []
    return [problem] if problem else []


def photo_problems(spec: JobSpec) -> list[str]:
    """Every line of `photo_check`: the class images' and every subject's."""
    job_wide, by_subject = photo_check(spec)
    return job_wide + [line for lines in by_subject.values() for line in lines]


def photo_check(spec: JobSpec) -> tuple[list[str], dict[str, list[str]]]:
    """Every subject's photos and the user's own class images (`prior.class_images`), each file decoded
    as training will decode it: one line per bad file, naming the subject, the file and what is wrong
    with it; (the class images' lines, {subject: its lines}). With `skip_bad_images`, a bad photo is a
    warning here, said once (later readers are quiet)."""
    from concurrent.futures import ThreadPoolExecutor

    from .images import MIN_IMAGES, ImageError, read_images

    def one(url: str):
        try:
            return read_images(url, spec.train.resolution, spec.s3)
        except ImageError as e:  # the location itself: missing, or a file
            return str(e)

    sets = [(f"subject {s.name}", s.images) for s in spec.subjects]
    if spec.prior.enabled and spec.prior.class_images:
        sets.append(("prior.class_images", spec.prior.class_images))
    with ThreadPoolExecutor(max_workers=8) as pool:  # an s3:// listing and read each: overlap the waits
        found = list(pool.map(one, [url for _, url in sets]))
    job_wide: list[str] = []
    by_subject: dict[str, list[str]] = {}
    for (who, url), got in zip(sets, found):
        problems = job_wide if who == "prior.class_images" else by_subject.setdefault(who[len("subject "):], [])
        if isinstance(got, str):
            problems.append(f"{who}: {got}")
            continue
        good, bad = got
        where = url.rstrip("/")
        if spec.skip_bad_images and who != "prior.class_images":
            for name, why in bad:
                log.warning("%s: skipping bad image %s/%s: %s", who, where, name, why)
        else:
            problems += [f"{who}: {where}/{name}: {why}" for name, why in bad]
        if who == "prior.class_images":
            if not good and not bad:
                problems.append(f"{who}: {url} holds no JPEG, PNG or WebP image")
        elif len(good) < MIN_IMAGES and (spec.skip_bad_images or not bad):
            problems.append(f"{who}: {url}: {len(good)} usable image(s); DreamBooth needs at least {MIN_IMAGES}")
        if who != "prior.class_images" and spec.train.masked_loss == "on" and any(p.mask is None for p in good):
            names = ", ".join(p.name for p in good if p.mask is None)
            problems.append(f"{who}: train.masked_loss is on and these photos in {where} have no mask (an alpha "
                            f"channel or masks/<same name>): {names}")
    masked = [s.name for s, (_, url), got in zip(spec.subjects, sets, found)
              if not isinstance(got, str) and any(p.mask is not None for p in got[0])]
    trains_text = spec.train.train_text_encoder or (spec.train.method == "lora" and spec.train.lora.text_encoder)
    if masked and spec.train.masked_loss != "off" and trains_text:
        # Measured in the toy world (benchmarks/results/toyworld_masks*.md): photos all in one scene, masked,
        # drew it for the bare prompt 0.72 of the time with the text encoder trained, 0.32 with it frozen
        # (3 seeds each; the base model: 0.14; unmasked 0.95 and 0.82).
        log.warning("subject(s) %s: the masks weight the denoiser's loss only; a trained text encoder still learns "
                    "the photos' background with the identifier (set train_text_encoder: false, or lora.text_encoder: "
                    "false, to keep it out)", ", ".join(masked))
    return job_wide, {name: lines for name, lines in by_subject.items() if lines}


def check(spec: JobSpec, storage: Storage, runs: list[tuple[str, str, int]] = (),
          gpu_memory: int | None = None) -> dict[str, list[str]]:
    """Raises PreflightError naming every problem of a job that cannot run. Returns the subjects refused
    for their photos ({name: one line per bad file}): each fails alone, before any compute, and the
    others run (a job whose every subject is refused cannot run)."""
    problems = base_model_problems(spec)
    if not problems:
        problems += memory_problems(spec, gpu_memory)
    job_wide, refused = photo_check(spec)
    problems += job_wide
    if len(refused) == len(spec.subjects):
        problems += [line for lines in refused.values() for line in lines]
    if spec.sr.enabled:
        problems += sr_model_problems(spec)
    problems += checkpoint_problems(storage, spec.name, list(runs))
    if problems:
        raise PreflightError("job cannot run:\n  " + "\n  ".join(problems))
    return refused
