"""Rectified-flow (flow-matching) transformers: what SD3 and Flux share.

The objective (SD3 paper, "Scaling Rectified Flow Transformers"): x_s = (1 - s) x0 + s * noise for a
noise level s in (0, 1), and the transformer predicts the velocity noise - x0. The level is drawn as
u from a density (`timestep_sampling`) and then shifted the way the model's scheduler shifts its
sampling schedule: a fixed shift s' = a u / (1 + (a - 1) u) (SD3: a = 3), or, with dynamic shifting
(Flux), s' = e^mu / (e^mu + 1/u - 1) with mu growing linearly in the number of image tokens, so a
large image is trained at the noise levels it is sampled at. The transformer's timestep input is
1000 s (as in the pipelines). Loss weights (`weighting`) follow the SD3 paper's options.
"""

from __future__ import annotations

import math

import torch

from .base import Family


def sample_u(n: int, g: torch.Generator, scheme: str, mean: float = 0.0, std: float = 1.0,
             mode_scale: float = 1.29) -> torch.Tensor:
    """n points in (0, 1): uniform, logit-normal (sigmoid of N(mean, std)), or the SD3 paper's 'mode'
    density (heavier in the middle for mode_scale > 0)."""
    if scheme == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=g))
    u = torch.rand(n, generator=g)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def image_seq_mu(seq_len: int, sched_cfg) -> float:
    """Flux's resolution-dependent shift exponent (linear in the image's token count)."""
    lo, hi = sched_cfg.get("base_image_seq_len", 256), sched_cfg.get("max_image_seq_len", 4096)
    a, b = sched_cfg.get("base_shift", 0.5), sched_cfg.get("max_shift", 1.15)
    return a + (b - a) * (seq_len - lo) / (hi - lo)


def shift_sigmas(u: torch.Tensor, sched_cfg, seq_len: int) -> torch.Tensor:
    """The noise level the model's scheduler would use for an unshifted level u."""
    if sched_cfg.get("use_dynamic_shifting", False):
        mu = image_seq_mu(seq_len, sched_cfg)
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    a = sched_cfg.get("shift", 1.0)
    return a * u / (1 + (a - 1) * u)


def loss_weighting(sigmas: torch.Tensor, scheme: str) -> torch.Tensor | None:
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return None


class FlowMatchingFamily(Family):
    """A transformer trained with the flow-matching objective; the pipeline's scheduler is
    FlowMatchEulerDiscreteScheduler (its config holds the shift)."""

    denoiser = "transformer"
    denoiser_class = ""  # SD3Transformer2DModel, FluxTransformer2DModel
    added_conditioning = ()
    inference_half = "bfloat16"
    export_dtype = "bf16"  # fp16 overflows their activations, as it does in training
    default_sampling = "logit_normal"  # the published recipe's timestep density
    default_weighting = "none"
    clip_encoders: tuple[str, ...] = ()  # the CLIP encoders: full training and text-encoder LoRA adapt these
    t5 = ""  # the pipeline attribute of the T5 encoder (frozen: its states are computed once)
    max_sequence_length = 256  # T5 tokens, as the pipeline's default
    lora_key_format = "peft"
    # No kohya LoRA layout here: ComfyUI (and Forge, which shares its loader) maps the diffusers/peft keys
    # of an SD3 or Flux LoRA (`transformer.<module>.lora_A.weight`, split q/k/v included) onto its own
    # model, A1111 loads neither architecture, and diffusers reads its own format.
    comfy_reads_diffusers_lora = True

    def prediction_type(self, pipe) -> str | None:
        return None
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out")

    @property
    def trainable_encoders(self) -> tuple[str, ...]:
        return self.clip_encoders

    @property
    def identifier_tokenizer(self) -> str:  # the paper's rank window was found on T5's vocabulary
        return self.tokenizers[self.text_encoders.index(self.t5)]

    def _tokenizer(self, path: str, name: str = "tokenizer"):
        if name == self.identifier_tokenizer:  # CLIPTokenizer would also read T5's tokenizer.json, wrongly
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path, subfolder=name)
        return super()._tokenizer(path, name)

    def load_parts(self, path: str, partitioned=None, skip: frozenset = frozenset()) -> dict:
        """`skip`: parts not to load (frozen ones whose outputs a worker is given: engine.FrozenInputs)."""
        from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

        index = DiffusionPipeline.load_config(path)
        parts = {tok: self._tokenizer(path, tok) for tok in self.tokenizers}
        parts.update({te: None if te in skip else self._text_encoder(path, index, te) for te in self.text_encoders})
        parts.update(
            vae=None if "vae" in skip else AutoencoderKL.from_pretrained(path, subfolder="vae"),
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
            family=self,
        )
        parts[self.denoiser] = None if self.denoiser in skip else self.load_denoiser(path, partitioned)
        return parts

    # ---- prompts --------------------------------------------------------------------------------

    def prompt_inputs(self, parts: dict, prompts: list[str]) -> dict:
        out = {}
        for key, tok in zip(self.prompt_keys, self.tokenizers):
            t = parts[tok]
            length = self.max_sequence_length if tok == self.identifier_tokenizer else t.model_max_length
            out[key] = t(prompts, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids
        return out

    def t5_key(self) -> str:
        return self.prompt_keys[self.text_encoders.index(self.t5)]

    def frozen_states(self, parts: dict, inputs: dict, device) -> dict:
        """Beside trained CLIP encoders, the frozen T5's states, computed once."""
        key = self.t5_key()
        return {"t5_states": self.encode_frozen({self.t5: parts[self.t5]}, {key: inputs[key]}, device,
                                                encode=lambda encs, **ids: self.t5_states(encs[self.t5], ids[key]))}

    def trained_inputs(self, parts: dict, inputs: dict, device, frozen: dict | None = None) -> dict:
        """The CLIP token ids, and the frozen T5's states: `frozen` (the encode task's), else computed here."""
        key = self.t5_key()
        states = frozen if frozen is not None else self.frozen_states(parts, inputs, device)
        return {**{k: v.to(device) for k, v in inputs.items() if k != key}, **{k: v.to(device) for k, v in states.items()}}

    @staticmethod
    def t5_states(t5, ids):
        return t5(ids)[0]

    # ---- objective ------------------------------------------------------------------------------

    def _scheme(self, cfg, field: str, default: str) -> str:
        value = getattr(cfg.flow, field) if cfg is not None else "auto"
        return default if value == "auto" else value

    def image_tokens(self, shape) -> int:
        return shape[-2] * shape[-1]

    def sample_timesteps(self, noise_scheduler, n: int, g: torch.Generator, cfg=None, shape=None) -> torch.Tensor:
        flow = cfg.flow if cfg is not None else None
        u = sample_u(n, g, self._scheme(cfg, "timestep_sampling", self.default_sampling),
                     *((flow.logit_mean, flow.logit_std, flow.mode_scale) if flow else ()))
        u = u.clamp(1e-5, 1 - 1e-5)  # s = 0 trains nothing; s = 1 divides by zero in the dynamic shift
        return 1000.0 * shift_sigmas(u, noise_scheduler.config, self.image_tokens(shape))

    def noisy(self, noise_scheduler, x0, noise, t):
        s = (t.float() / 1000).view(-1, *[1] * (x0.dim() - 1)).to(x0.device)
        return (1 - s) * x0 + s * noise

    def target(self, noise_scheduler, x0, noise, t):
        return noise - x0

    def loss_weights(self, noise_scheduler, t, cfg=None) -> torch.Tensor | None:
        return loss_weighting(t.float() / 1000, self._scheme(cfg, "weighting", self.default_weighting))

    def objective_problems(self, cfg) -> list[str]:
        problems = []
        if cfg.snr_gamma is not None:  # min-SNR-gamma's weights are a function of DDPM's alpha_bar(t)
            problems.append(f"train.snr_gamma: a {self.pipeline} trains with flow matching, which has no "
                            "discrete SNR schedule for min-SNR-gamma; weight its noise levels with train.flow.weighting")
        if cfg.noise_offset:  # no published flow recipe uses it; the noise is also half of the velocity target
            problems.append(f"train.noise_offset: a {self.pipeline} trains with flow matching, where the noise is "
                            "both the path's start and part of the target (noise - x0), and no published flow recipe "
                            "(diffusers' SD3/Flux scripts, the SD3 paper) offsets it; shape the noise levels with "
                            "train.flow.timestep_sampling")
        return problems

    # ---- denoiser -------------------------------------------------------------------------------

    def denoise(self, model, noisy, t, **cond):
        inputs = {k: cond.pop(k) for k in list(cond) if k in self.prompt_keys or k == "t5_states"}
        if inputs:
            cond.update(self.encode(self.encoders(model), **inputs))
        return self.transformer_forward(getattr(model, self.denoiser), noisy, t, **cond)

    def encoders(self, holder) -> dict:
        get = holder.get if isinstance(holder, dict) else (lambda n: getattr(holder, n, None))
        return {n: get(n) for n in self.text_encoders if get(n) is not None}

    def set_attention(self, module, classic: bool = False) -> None:
        """The transformers' own attention processors already call PyTorch's fused attention."""

    # ---- preflight ------------------------------------------------------------------------------

    def text_width(self, read) -> int | None:
        return (read(f"{self.t5}/config.json") or {}).get("d_model")

    def cross_width(self, denoiser: dict) -> int | None:
        return denoiser.get("joint_attention_dim")

    def config_problems(self, read, denoiser: dict) -> list[str]:
        sched = read("scheduler/scheduler_config.json") or {}
        if sched.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
            return [f"model: a {self.pipeline} is trained with flow matching; its scheduler is a "
                    f"{sched['_class_name']}, not FlowMatchEulerDiscreteScheduler"]
        return []
