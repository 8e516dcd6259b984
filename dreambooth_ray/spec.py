"""The job spec: one YAML file, validated by pydantic. Unknown keys and bad values name the field."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .errors import UserError
from .settings import S3Settings, _Strict, check_name

DEFAULT_VALIDATION_PROMPTS = (
    "a {identifier} {class_noun}",
    "a {identifier} {class_noun} on the beach",
    "a {identifier} {class_noun} in the snow",
    "a {identifier} {class_noun} wearing a hat",
    "an oil painting of a {identifier} {class_noun}",
    "a {class_noun}",
)


def check_template(v: str) -> str:
    try:
        v.format(identifier="x", class_noun="x")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"unknown placeholder {e} (use {{identifier}} and {{class_noun}})") from None
    return v


class SpecError(UserError, ValueError):
    """A job spec that cannot be used; the message names the file and field."""


class Subject(_Strict):
    """One subject: its photos, the class it belongs to, and the identifier that will name it."""

    name: str
    images: str = Field(description="local folder or fsspec URL (s3://...) of 3-50 photos")
    class_noun: str = Field(alias="class", min_length=1)
    identifier: str = Field(default="sks", min_length=1, description="'auto': a rare token picked from the vocabulary")
    instance_prompt: str = "a {identifier} {class_noun}"
    class_prompt: str = "a {class_noun}"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "subject name")

    @field_validator("instance_prompt", "class_prompt")
    @classmethod
    def _known_placeholders(cls, v: str) -> str:
        return check_template(v)

    def prompt(self, template: str) -> str:
        return template.format(identifier=self.identifier, class_noun=self.class_noun)

    @property
    def instance_text(self) -> str:
        return self.prompt(self.instance_prompt)

    @property
    def class_text(self) -> str:
        return self.prompt(self.class_prompt)


class IdentifierConfig(_Strict):
    """How `identifier: auto` picks a rare token (see identifiers.py)."""

    rank_min: int = Field(5000, ge=0)
    rank_max: int = Field(10000, ge=1)
    max_chars: int = Field(3, ge=1, le=10)

    @model_validator(mode="after")
    def _range(self):
        if self.rank_max <= self.rank_min:
            raise ValueError("rank_max must be above rank_min")
        return self


class PriorConfig(_Strict):
    enabled: bool = True
    num_class_images: int = Field(100, ge=1, le=100_000)
    loss_weight: float = Field(1.0, ge=0.0)
    inference_steps: int = Field(25, ge=1, le=1000)
    # DPM-Solver++ matches the 50-step default samplers' quality in ~20-25 steps; 'model' keeps the
    # model's own scheduler (the standard recipe's choice).
    scheduler: Literal["dpm++", "model"] = "dpm++"
    guidance_scale: float = Field(7.5, ge=0.0)
    batch_size: int = Field(4, ge=1)
    num_actors: Optional[int] = Field(None, ge=1, description="default: one per GPU, or 2 CPU actors")
    seed: int = 0
    # Kohya's regularisation images: a folder (or s3:// prefix) of your own class images, used first and
    # topped up by generation to num_class_images. Bad files fail the job before compute, skip_bad_images or not.
    class_images: Optional[str] = Field(None, min_length=1, description="folder or s3:// prefix of your own class images")


class LoraConfig(_Strict):
    """`train.method: lora`: low-rank adapters (peft) instead of full fine-tuning."""

    rank: int = Field(4, ge=1, le=1024)
    alpha: float = Field(4.0, gt=0)
    target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")  # UNet attention
    text_encoder: bool = False  # also adapt the text encoder (q/k/v/out projections)
    text_encoder_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")


class FlowConfig(_Strict):
    """The flow-matching objective of SD3 and Flux (families/flow.py); 'auto' is each model's published recipe."""

    timestep_sampling: Literal["auto", "uniform", "logit_normal", "mode"] = "auto"  # auto: logit-normal
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0.0)
    mode_scale: float = 1.29
    weighting: Literal["auto", "none", "sigma_sqrt", "cosmap"] = "auto"  # auto: none (uniform weights)
    guidance: float = Field(3.5, ge=0.0, description="the embedded guidance a guidance-distilled Flux trains at")


# The standard recipes' learning rates (diffusers' DreamBooth scripts): full fine-tuning moves every
# weight a little; a low-rank adapter starts at (near) zero and needs ~20x more to move in a few hundred
# steps (diffusers' LoRA recipes use 1e-4 for SD, SDXL, SD3 and Flux alike).
DEFAULT_LEARNING_RATE = {"full": 5e-6, "lora": 1e-4}
POLYNOMIAL_LR_END = 1e-7  # diffusers' get_scheduler end value for 'polynomial'


class TrainConfig(_Strict):
    resolution: int = Field(512, ge=8, le=4096)
    steps: int = Field(400, ge=1)
    learning_rate: float = Field(5e-6, gt=0.0, le=1.0, description="default: 5e-6 (full), 1e-4 (lora)")
    lr_warmup_steps: int = Field(0, ge=0)
    # diffusers' get_scheduler names and formulas (engine.lr_lambda); the lr of step k is theirs at step k.
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial"] = "constant_with_warmup"
    lr_num_cycles: int = Field(1, ge=1, description="cosine_with_restarts: the number of hard restarts (cosine: one half-wave)")
    lr_power: float = Field(1.0, gt=0.0, description="polynomial: the decay's power (1: linear down to 1e-7)")
    # adamw: torch's (DeepSpeed's CPU AdamW under offload); adafactor: transformers', at learning_rate under
    # lr_scheduler (no relative step); prodigy: the prodigyopt package, learning_rate a multiplier (default 1.0).
    optimizer: Literal["adamw", "adafactor", "prodigy"] = "adamw"
    weight_decay: float = Field(1e-2, ge=0.0, le=1.0)
    # Min-SNR-gamma (Hang et al. 2023): per-row weight min(SNR, gamma)/SNR (epsilon) or /(SNR + 1)
    # (v-prediction); None: uniform. DDPM families only (families/base.py), 5 is the paper's choice.
    snr_gamma: Optional[float] = Field(None, gt=0.0)
    # noise += noise_offset * N(0, 1) per (row, channel): learns overall brightness (DDPM families only).
    noise_offset: float = Field(0.0, ge=0.0, le=1.0)
    batch_size: int = Field(1, ge=1, description="instance images per worker per micro-step")
    gradient_accumulation: int = Field(1, ge=1)
    # bf16: bf16 autocast over fp32 weights (the fp32 weights are the master copy);
    # bf16-weights: DeepSpeed's bf16 engine (bf16 weights, fp32 master copy in the optimizer: least memory);
    # fp16: DeepSpeed's fp16 engine with loss scaling (GPUs only). `dreambooth-ray bench` compares them.
    mixed_precision: Literal["fp32", "bf16", "bf16-weights", "fp16"] = "bf16"
    zero_stage: Literal[0, 1, 2, 3] = 2
    num_workers: int = Field(1, ge=1)
    use_gpu: Optional[bool] = Field(None, description="default: use GPUs if the cluster has or can scale to any")
    checkpoint_every: int = Field(100, ge=1)
    # async: training continues while a checkpoint uploads (registered only once complete and verified).
    checkpoint_upload: Literal["async", "sync"] = "async"
    keep_checkpoints: int = Field(2, ge=1)
    # The exported model's precision: written by the training workers at the last step (fp32 of a
    # bf16-weights/fp16 run comes from the final checkpoint instead). Default: the family's (fp16; bf16
    # for SD3 and Flux, whose activations overflow fp16).
    export_dtype: Optional[Literal["fp16", "bf16", "fp32"]] = None
    # Written beside the diffusers export (which samples and eval load), for ComfyUI, AUTOMATIC1111 and
    # Forge: kohya's LoRA layout (LoRA runs of SD 1.x/2.x and SDXL), a single-file checkpoint (full runs).
    export_formats: Optional[tuple[Literal["kohya", "single_file"], ...]] = Field(None, description=(
        "formats besides diffusers' (default: all that apply to the model and method); "
        "`dreambooth-ray export` writes them for subjects already trained"))
    max_failures: int = Field(2, ge=0)
    train_text_encoder: bool = False
    method: Literal["full", "lora"] = "full"
    lora: LoraConfig = LoraConfig()
    flow: FlowConfig = FlowConfig()
    # Off, as in diffusers' recipes: a mirrored subject (text, a logo, a watch on the other wrist) is
    # another subject.
    random_flip: bool = False
    # The subject loss over the subject alone, where photos have masks (an alpha channel, or masks/<name>
    # beside them; white = subject): the background is not learned as part of the subject. auto: on
    # when any photo has a mask (a photo without one is all subject); on: every photo must have one.
    masked_loss: Literal["auto", "on", "off"] = "auto"
    seed: int = 0
    # LoRA: train this many subjects of the job at once, in one forward and backward over the shared frozen
    # base (pack.py), each adapter as its solo run trains it. 1: one subject per run.
    pack: int = Field(1, ge=1, le=256, description=(
        "method lora: subjects trained together in one run, each exactly as alone (see README, Packed subjects)"))
    # GPU kernels (cuBLAS split-K, attention backward, atomics) are not bit-reproducible run to run:
    # measured on an H100, two identical runs differ by ~2e-3 after 4 steps, so a resumed run cannot
    # equal an uninterrupted one. This trades some speed for identical runs (CPU runs are anyway).
    deterministic: bool = Field(False, description="deterministic GPU kernels: a resumed run equals an uninterrupted one bit for bit; an op with none fails the first step")
    # Memory: what fits a smaller GPU, at some speed (see README, "Fitting a GPU").
    gradient_checkpointing: bool = Field(False, description=(
        "recompute the denoiser's (and trained text encoders') activations in backward: far less activation "
        "memory, one more forward per step"))
    offload: Literal["none", "optimizer", "optimizer+params"] = Field("none", description=(
        "ZeRO-Offload: the optimizer state (and, under ZeRO-3, the parameters) in host memory, updated by "
        "DeepSpeed's CPU Adam"))
    # Speed: each is measured on and off by `dreambooth-ray bench`.
    cache_latents: bool = Field(True, description="encode subject and class images with the VAE once, not every step")
    attention: Literal["sdpa", "classic"] = "sdpa"
    channels_last: bool = False  # measured: no gain on an H100 at batch 1+1 (see benchmarks/results)
    compile: bool = Field(False, description="torch.compile the UNet (pays off for long runs on GPUs)")

    @property
    def global_batch(self) -> dict:
        """What one optimizer step sees: `batch_size` is per worker, so 4 workers show the model 4x the
        photos of one at the same `steps` (and, with prior preservation, as many class images again)."""
        per_step = self.batch_size * self.num_workers * self.gradient_accumulation
        return {"per_worker": self.batch_size, "workers": self.num_workers,
                "accumulation": self.gradient_accumulation, "subject_images_per_step": per_step,
                "subject_images_in_run": per_step * self.steps}

    def describe_lr(self) -> str:
        """'lr 5e-06', then what differs from the defaults: optimizer, schedule, loss weighting, offset."""
        extra = [f"{self.optimizer}"] if self.optimizer != "adamw" else []
        if self.lr_scheduler != "constant_with_warmup" or self.lr_warmup_steps:
            extra.append(f"{self.lr_scheduler} schedule, {self.lr_warmup_steps} warmup steps")
        extra += [f"min-SNR gamma {self.snr_gamma:g}"] if self.snr_gamma is not None else []
        extra += [f"noise offset {self.noise_offset:g}"] if self.noise_offset else []
        return f"lr {self.learning_rate:g}" + (f" ({', '.join(extra)})" if extra else "")

    def describe_batch(self) -> str:
        b = self.global_batch
        return (f"global batch {b['subject_images_per_step']} ({b['per_worker']} per worker x {b['workers']} worker(s) "
                f"x {b['accumulation']} accumulation), {b['subject_images_in_run']} subject images in {self.steps} steps")

    @model_validator(mode="before")
    @classmethod
    def _method_learning_rate(cls, data):
        # Filled in, not left None: job.json, the run's identity and the console show the rate used.
        if isinstance(data, dict) and data.get("learning_rate") is None:
            method = data.get("method", "full")
            lr = 1.0 if data.get("optimizer") == "prodigy" else DEFAULT_LEARNING_RATE.get(method, DEFAULT_LEARNING_RATE["full"])
            data = {**data, "learning_rate": lr}
        return data

    @model_validator(mode="after")
    def _schedule_fits(self):
        if self.lr_scheduler == "constant" and self.lr_warmup_steps:
            raise ValueError("lr_warmup_steps: lr_scheduler 'constant' has no warmup (use 'constant_with_warmup')")
        if self.lr_scheduler == "polynomial" and self.learning_rate <= POLYNOMIAL_LR_END:
            raise ValueError(f"learning_rate: lr_scheduler 'polynomial' decays to {POLYNOMIAL_LR_END}; start above it")
        return self

    @model_validator(mode="after")
    def _optimizer_fits(self):
        if self.offload != "none" and self.optimizer != "adamw":
            raise ValueError(f"optimizer {self.optimizer!r} cannot run with offload {self.offload!r}: ZeRO-Offload "
                             "updates the state with DeepSpeed's CPU Adam (set optimizer: adamw, or offload: none)")
        # ZeRO (1-3) hands the optimizer flat 1-D partitions (measured: a [3,4] and a [2,3] weight arrive as
        # one [24]): Adafactor could not factor its second moments and would clip its update over a whole
        # partition, another optimizer whose result would depend on the worker count.
        if self.optimizer == "adafactor" and self.zero_stage != 0:
            raise ValueError(f"optimizer 'adafactor' needs zero_stage 0 (got {self.zero_stage}): ZeRO flattens the "
                             "parameters, and Adafactor factors its second moments by each weight's shape")
        if self.use_gpu is False and self.cpu_problem():
            raise ValueError(self.cpu_problem())
        return self

    def cpu_problem(self) -> str | None:
        """What these settings cannot do on CPU workers (job.py asks once it knows the cluster has no GPUs)."""
        if self.optimizer == "prodigy" and self.zero_stage != 0 and self.num_workers > 1:
            return ("optimizer 'prodigy' with zero_stage 1-3 on several CPU workers: prodigyopt sums its step size "
                    "estimate across ZeRO partitions on CUDA only (use zero_stage 0 or one worker)")
        return None

    @model_validator(mode="after")
    def _lora_trains_adapters_only(self):
        # The whole encoder would be fine-tuned in memory (and shape the sample grid), while the
        # exported LoRA holds adapters only: what users load would not be what was trained.
        if self.method == "lora" and self.train_text_encoder:
            raise ValueError("train_text_encoder: true fine-tunes the whole text encoder, which a LoRA export "
                             "cannot hold; with method: lora, set lora.text_encoder: true for text-encoder adapters")
        return self

    def pack_problems(self) -> list[str]:
        """Why these settings cannot train a pack as its subjects' solo runs (empty: they can)."""
        out = []
        if self.method != "lora":
            out.append("needs method: lora (full fine-tuning gives every subject its own base model)")
        if self.mixed_precision in ("fp16", "bf16-weights"):
            why = ("fp16's one loss scale and skipped steps would couple the subjects" if self.mixed_precision == "fp16"
                   else "DeepSpeed's bf16 optimizer clips over all parameters, coupling the subjects")
            out.append(f"needs mixed_precision fp32 or bf16, not {self.mixed_precision!r}: {why}")
        if self.train_text_encoder or (self.method == "lora" and self.lora.text_encoder):
            out.append("trains denoiser adapters only (no train_text_encoder, no lora.text_encoder)")
        if self.offload != "none":
            out.append("keeps the adapters' optimizer on the device (offload: none): they are small")
        if self.optimizer != "adamw":  # AdamW is elementwise; these look across every subject's adapters at once
            out.append(f"needs optimizer adamw, not {self.optimizer!r}: "
                       + ("Prodigy's step size is estimated over all parameters" if self.optimizer == "prodigy"
                          else "Adafactor clips its update over each packed [subjects, ...] tensor")
                       + ", coupling the subjects")
        return out

    @model_validator(mode="after")
    def _pack_fits(self):
        if self.pack > 1 and self.pack_problems():
            raise ValueError(f"pack {self.pack}: " + "; ".join(self.pack_problems()))
        return self

    @model_validator(mode="after")
    def _formats_fit_the_method(self):
        wrong = {"lora": "single_file", "full": "kohya"}[self.method]
        if wrong in (self.export_formats or ()):
            raise ValueError(f"export_formats: {wrong!r} is not written for a method {self.method!r} run "
                             f"({'a full fine-tune' if wrong == 'single_file' else 'a LoRA'} format)")
        return self

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        # DeepSpeed offloads a partitioned optimizer (ZeRO 1-3) and partitioned parameters (ZeRO-3) only.
        if self.offload != "none" and self.zero_stage == 0:
            raise ValueError(f"offload {self.offload!r} needs zero_stage 1-3 (DeepSpeed offloads ZeRO's partitions)")
        if self.offload == "optimizer+params" and self.zero_stage != 3:
            raise ValueError("offload 'optimizer+params' needs zero_stage 3 (only ZeRO-3 partitions the parameters)")
        return self

    @model_validator(mode="after")
    def _fp16_needs_gpu(self):
        if self.mixed_precision == "fp16" and self.use_gpu is False:
            raise ValueError("mixed_precision 'fp16' needs GPUs (use 'bf16' or 'fp32' on CPU)")
        return self


class SRConfig(_Strict):
    """The paper's super-resolution stage: an SR diffusion model fine-tuned on the subject, conditioned
    on the subject's real low-res images, with little noise augmentation of that low-res input."""

    enabled: bool = False
    model: str = Field("tiny-sr", description="a DeepFloyd IF stage II or Stable Diffusion x4 upscaler pipeline: hub id, folder, s3://; "
                       "'tiny-sr' / 'tiny-x4' built in")
    input_resolution: Optional[int] = Field(None, ge=8, le=4096, description="default: train.resolution")
    output_resolution: int = Field(128, ge=16, le=4096)
    # Level s in [0, 1] of the noising schedule applied to the low-res input (the conditioning label
    # is s * (T - 1)); the paper lowers it from 1e-3 to 1e-5 to keep the subject's fine detail.
    noise_aug: float = Field(1e-5, ge=0.0, le=1.0)
    steps: int = Field(200, ge=1)
    learning_rate: float = Field(5e-6, gt=0.0, le=1.0)
    batch_size: int = Field(1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    num_workers: Optional[int] = Field(None, ge=1, description="default: train.num_workers")
    mixed_precision: Optional[Literal["fp32", "bf16", "bf16-weights", "fp16"]] = None  # default: train's
    checkpoint_every: int = Field(100, ge=1)
    prior_preservation: bool = Field(False, description="class images at output resolution, down/upsampled alike")
    prior_loss_weight: float = Field(1.0, ge=0.0)
    inference_steps: int = Field(25, ge=1, description="SR steps when rendering the samples")

    @model_validator(mode="after")
    def _upscales(self):
        if self.input_resolution is not None and self.input_resolution >= self.output_resolution:
            raise ValueError("output_resolution must be above input_resolution")
        return self

    def train_config(self, base: "TrainConfig") -> "TrainConfig":
        """The SR run's training settings: the base stage's, with the SR section's overrides."""
        return base.model_copy(update=dict(
            resolution=self.output_resolution, steps=self.steps, learning_rate=self.learning_rate,
            batch_size=self.batch_size, zero_stage=self.zero_stage, checkpoint_every=self.checkpoint_every,
            num_workers=self.num_workers or base.num_workers, mixed_precision=self.mixed_precision or base.mixed_precision,
            method="full", train_text_encoder=False, cache_latents=False, lr_warmup_steps=0, pack=1,
            # the paper's SR objective with AdamW at sr.learning_rate, constant: the base stage's optimizer,
            # schedule, min-SNR and noise offset are its own (Prodigy's rate is a multiplier, Adafactor needs ZeRO-0)
            optimizer="adamw", lr_scheduler="constant", snr_gamma=None, noise_offset=0.0,
            # what DeepSpeed can offload at the SR stage's own ZeRO stage (the validator sees only `train`'s)
            offload=("none" if self.zero_stage == 0 else
                     "optimizer" if base.offload == "optimizer+params" and self.zero_stage != 3 else base.offload),
        ))


class SampleConfig(_Strict):
    prompts: tuple[str, ...] = DEFAULT_VALIDATION_PROMPTS
    images_per_prompt: int = Field(1, ge=1, le=16)
    inference_steps: int = Field(25, ge=1)
    guidance_scale: float = Field(7.5, ge=0.0)
    seed: int = 0
    validation_every: int = Field(0, ge=0, description=(
        "every N training steps, render these prompts (first image each) with the weights of that step, "
        "while training goes on; 0: off"))
    validation_gpus: float = Field(0.0, ge=0.0, le=1.0, description=(
        "GPUs for the validation renderer on a GPU job (0: it renders on a CPU; 1: it takes a GPU of its own)"))


class MlflowConfig(_Strict):
    uri: str = Field(description="the tracking server, e.g. http://mlflow.internal:5000 (credentials: the "
                                 "MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN environment variables)")
    experiment: Optional[str] = Field(None, description="default: the job's name")

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        from urllib.parse import urlsplit

        if urlsplit(v).username or urlsplit(v).password:
            raise ValueError("has credentials in it; specs are stored and logged: put them in the "
                             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
                             "environment variables of the command that runs the job")
        return v


class TrackingConfig(_Strict):
    """TensorBoard event files are always written (outputs/<job>/tensorboard/); MLflow is optional."""

    mlflow: Optional[MlflowConfig] = None


class EvalConfig(_Strict):
    """`dreambooth-ray eval`: the paper's metrics over its prompt set (see eval.py)."""

    prompts: Literal["auto", "objects", "live"] | tuple[str, ...] = Field(
        "auto", description="the paper's 25 prompts for objects or live subjects ('auto': by class noun), or a list")
    images_per_prompt: int = Field(4, ge=1, le=64)
    class_images: int = Field(16, ge=0, le=1000, description="'a {class_noun}' renders for PRES; 0: skip PRES")
    inference_steps: int = Field(50, ge=1)
    guidance_scale: float = Field(7.5, ge=0.0)
    seed: int = 0
    dino: str = Field("facebook/dino-vits16", description="DINO ViT: 'tiny-dino', 'toy-dino', hub id, folder or s3://")
    clip: str = Field("openai/clip-vit-base-patch32", description="CLIP: 'tiny-clip', 'toy-clip', hub id, folder or s3://")
    num_actors: Optional[int] = Field(None, ge=1, description="renderers; default: one per GPU, else up to 2")
    batch_size: int = Field(8, ge=1)

    @field_validator("prompts")
    @classmethod
    def _templates(cls, v):
        for t in () if isinstance(v, str) else v:
            check_template(t)
        return v


class JobSpec(_Strict):
    name: str
    model: str = Field("tiny", description="'tiny', a hub id, a local folder or an s3:// path")
    storage: str = Field("./runs", description="local folder or s3://bucket/prefix")
    s3: S3Settings = S3Settings()
    subjects: tuple[Subject, ...]
    prior: PriorConfig = PriorConfig()
    train: TrainConfig = TrainConfig()
    sr: SRConfig = SRConfig()
    samples: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    identifiers: IdentifierConfig = IdentifierConfig()
    skip_bad_images: bool = False
    max_concurrent_subjects: Optional[int] = Field(None, ge=1, description="default: as many as the cluster fits")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "job name")

    @model_validator(mode="before")
    @classmethod
    def _subject_forms(cls, data):
        # `subject:` is shorthand for a one-element list; `subjects: <url>` names a CSV/JSONL manifest.
        if isinstance(data, dict) and "subject" in data:
            if "subjects" in data:
                raise ValueError("give either 'subject' or 'subjects', not both")
            data = dict(data)
            data["subjects"] = [data.pop("subject")]
        if isinstance(data, dict) and isinstance(data.get("subjects"), str):
            data = dict(data)
            data["subjects"] = read_manifest(data["subjects"], S3Settings.model_validate(data.get("s3") or {}))
        return data

    @model_validator(mode="after")
    def _sr_resolution(self):
        if self.sr.enabled and self.sr.output_resolution <= (self.sr.input_resolution or self.train.resolution):
            raise ValueError(f"sr.output_resolution ({self.sr.output_resolution}) must be above the base "
                             f"stage's resolution ({self.sr.input_resolution or self.train.resolution})")
        return self

    @model_validator(mode="after")
    def _unique_subjects(self):
        if not self.subjects:
            raise ValueError("a job needs at least one subject")
        names = [s.name for s in self.subjects]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"subject names must be unique; repeated: {', '.join(dupes)}")
        return self

    def stage_train(self, stage: str = "base") -> TrainConfig:
        """The training settings of a stage: 'base', or 'sr' (the SR section's overrides of `train`)."""
        return self.train if stage == "base" else self.sr.train_config(self.train)

    def fingerprint(self, *parts: object) -> str:
        """A short stable hash of JSON-able parts: names caches and runs that depend on them."""
        blob = json.dumps(parts, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def read_manifest(url: str, s3: S3Settings) -> list[dict]:
    """Subjects from a CSV (header: name,images,class,identifier) or JSONL file at any fsspec URL.

    Relative `images` entries are relative to the manifest's own location.
    """
    import csv
    import io
    import posixpath

    from .storage import filesystem

    try:
        fs, path = filesystem(url, s3)
        text = fs.cat_file(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read subject manifest {url!r}: {e}") from None
    if url.lower().endswith((".jsonl", ".ndjson")):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{url} line {n}: not JSON ({e.msg})") from None
    elif url.lower().endswith(".csv"):
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k and (v or "").strip()}
                for r in csv.DictReader(io.StringIO(text))]
    else:
        raise ValueError(f"subject manifest {url!r} must end in .csv or .jsonl")
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    for r in rows:
        img = r.get("images") if isinstance(r, dict) else None
        if isinstance(img, str) and "://" not in img and not img.startswith("/"):
            r["images"] = posixpath.normpath(f"{base}/{img}") if "://" not in base else f"{base}/{img}"
    return rows


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid job spec"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_spec(data: object, source: str = "<spec>", base_dir: Path | None = None) -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a job spec must be a mapping of fields, got {type(data).__name__}")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_errors(e, source)) from None
    if base_dir is not None:
        spec = _resolve_relative(spec, base_dir)
    return spec


def load_spec(path: str | Path) -> JobSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"{path}: cannot read job spec ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    subjects = data.get("subjects") if isinstance(data, dict) else None
    if isinstance(subjects, str) and not _is_url(subjects) and not Path(subjects).is_absolute():
        data["subjects"] = str((path.parent / subjects).resolve())  # a manifest next to the spec
    return parse_spec(data, str(path), base_dir=path.parent)


def _is_url(s: str) -> bool:
    return "://" in s


def _resolve_relative(spec: JobSpec, base: Path) -> JobSpec:
    """Relative local paths in a spec file are relative to that file, not to the caller's cwd."""

    def fix(p: str) -> str:
        return p if _is_url(p) or Path(p).is_absolute() else str((base / p).resolve())

    model, sr_model = spec.model, spec.sr.model
    if model != "tiny" and not _is_url(model) and (base / model).exists():
        model = fix(model)
    if sr_model != "tiny-sr" and not _is_url(sr_model) and (base / sr_model).exists():
        spec = spec.model_copy(update={"sr": spec.sr.model_copy(update={"model": fix(sr_model)})})
    subjects = tuple(s.model_copy(update={"images": fix(s.images)}) for s in spec.subjects)
    prior = spec.prior.model_copy(update={"class_images": spec.prior.class_images and fix(spec.prior.class_images)})
    return spec.model_copy(update={"storage": fix(spec.storage), "model": model, "subjects": subjects, "prior": prior})
