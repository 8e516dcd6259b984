"""The interface a model family implements, and the behaviour most families share.

A family, one instance per architecture:
- is recognised from model_index.json's `_class_name` (`pipeline`);
- loads its parts (`load_parts`): tokenizer(s), text encoder(s), VAE (latent families), the denoiser
  (`denoiser`: a UNet, or a transformer for the flow-matching families) and its training schedule;
- turns prompts into what its denoiser takes (`prompt_inputs` -> token ids, `encode` -> hidden states,
  pooled embeddings, masks), and per photo (`row_conditioning`: SDXL's time ids);
- states its training objective (`sample_timesteps`, `noisy`, `target`, `loss_weights`);
- runs its denoiser (`denoise`);
- names its pipeline class (class images, samples, eval and export all load through it);
- lists its default LoRA targets and saves LoRA in the format its pipeline's `load_lora_weights` reads;
- gives the tokenizer that `identifier: auto` searches.
"""

from __future__ import annotations


import torch

from ..errors import UserError
from ..loss import diffusion_target


class UnsupportedModel(UserError, ValueError):
    """A pipeline no family handles; the message lists the supported ones."""


# Every family's one instance, in FAMILIES' order: families/__init__.py registers them here (it imports
# this module, so this module does not import it back), and unpickling finds a family among them by name.
REGISTERED: list["Family"] = []


def _lookup(name: str) -> "Family":
    return next(f for f in REGISTERED if f.name == name)


def set_sdpa(unet, classic: bool = False) -> None:
    """PyTorch's fused attention (or, `classic`, the plain one) for a UNet's attention layers; the
    added-KV layers of IF's UNets get their own processor kind."""
    from diffusers.models import attention_processor as ap

    added_kv = any("AddedKV" in type(p).__name__ for p in unet.attn_processors.values())
    if added_kv:
        unet.set_attn_processor(ap.AttnAddedKVProcessor() if classic else ap.AttnAddedKVProcessor2_0())
    else:
        unet.set_attn_processor(ap.AttnProcessor() if classic else ap.AttnProcessor2_0())


class Family:
    name = ""  # short name: sd, if, sdxl, if-sr, x4
    title = ""  # what a user calls it
    pipeline = ""  # the diffusers pipeline class (model_index.json's _class_name)
    role = "base"  # "base" (text to image) or "sr" (super-resolution)
    latent = True  # diffused in a VAE's latent space (else in pixels)
    inference_half = "float16"  # the dtype class images, samples and eval render in on GPUs
    export_dtype = "fp16"  # train.export_dtype's default: the family's native 16 bits
    vae_fp32 = False  # the VAE overflows in fp16: encode in fp32 whatever the training precision
    denoiser = "unet"  # the pipeline attribute of the trained denoiser (checkpoint keys start with it)
    denoiser_class = "UNet2DConditionModel"
    text_encoders: tuple[str, ...] = ("text_encoder",)  # pipeline attribute names, in order
    tokenizers: tuple[str, ...] = ("tokenizer",)
    reads_text_mask = False  # the text encoder reads the padding mask (T5), else none is given (CLIP)
    text_length: int | None = None  # tokens a prompt is padded to, as the pipeline does (None: the tokenizer's)
    added_conditioning: tuple = (None, "text")  # UNet addition_embed_type values this family drives
    prompt_keys = ("input_ids", "attention_mask")
    row_key: str | None = None  # the denoiser argument that row_conditioning feeds  # what prompt_inputs returns (consumed by encode)
    lora_targets: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
    text_encoder_lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    # The keys the family's LoRA loader expects: the UNet pipelines' own (lora.down/up), or peft's
    # (lora_A/B), which the transformer pipelines read (a UNet-style rename leaves them half-loaded).
    lora_key_format = "diffusers"
    supports = {"full": True, "lora": True, "text_encoder": True, "sr": False}

    @property
    def trainable_encoders(self) -> tuple[str, ...]:
        """The text encoders `train_text_encoder` and text-encoder LoRA adapt."""
        return self.text_encoders

    @property
    def identifier_tokenizer(self) -> str:
        return self.tokenizers[0]

    def __repr__(self) -> str:
        return f"<family {self.name}: {self.pipeline}>"

    def __reduce__(self):  # pickled (Ray) and copied (deepcopy) by name: one instance per family
        return _lookup, (self.name,)

    # ---- loading --------------------------------------------------------------------------------

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)

    def _text_encoder(self, path: str, index: dict, name: str):
        import transformers

        cls = getattr(transformers, (index.get(name) or [None, "CLIPTextModel"])[1])
        return cls.from_pretrained(path, subfolder=name)

    def _tokenizer(self, path: str, name: str = "tokenizer"):
        """The tokenizer class model_index.json names (as the pipeline loads it), else AutoTokenizer's
        pick. Never a guess by trial: CLIPTokenizer reads a T5 folder without error, into garbage
        (IF's "a sks dog" became `<unk> s k <unk> d o <unk>`)."""
        import transformers
        from diffusers import DiffusionPipeline

        try:
            entry = DiffusionPipeline.load_config(path).get(name)
        except (OSError, ValueError):
            entry = None
        named = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str) else None
        cls = getattr(transformers, named, None) if named else None
        return (cls or transformers.AutoTokenizer).from_pretrained(path, subfolder=name)

    def tokenizer(self, path: str):
        """The tokenizer `identifier: auto` picks a rare token from."""
        return self._tokenizer(path, self.identifier_tokenizer)

    def denoiser_type(self):
        import diffusers

        return getattr(diffusers, self.denoiser_class)

    def load_denoiser(self, path: str, partitioned=None):
        """The denoiser; `partitioned(cls, path, subfolder)` builds it sharded across the workers
        (ZeRO-3's partitioned initialisation, engine.load_partitioned) instead of whole on each."""
        if partitioned is not None:
            return partitioned(self.denoiser_type(), path, self.denoiser)
        return self.denoiser_type().from_pretrained(path, subfolder=self.denoiser)

    def load_parts(self, path: str, partitioned=None, skip: frozenset = frozenset()) -> dict:
        """`skip`: parts not to load (frozen ones whose outputs a worker is given: engine.FrozenInputs)."""
        from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline

        index = DiffusionPipeline.load_config(path)
        parts = {tok: self._tokenizer(path, tok) for tok in self.tokenizers}
        parts.update({te: None if te in skip else self._text_encoder(path, index, te) for te in self.text_encoders})
        parts.update(
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae") if self.latent and "vae" not in skip else None,
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
            family=self,
        )
        parts[self.denoiser] = None if self.denoiser in skip else self.load_denoiser(path, partitioned)
        return parts

    def trained_inputs(self, parts: dict, inputs: dict, device, frozen: dict | None = None) -> dict:
        """The step's prompt inputs when text encoders train (computed in the forward pass); `frozen`:
        the frozen encoders' share (frozen_states), computed once elsewhere."""
        return {k: v.to(device) for k, v in inputs.items()}

    def frozen_states(self, parts: dict, inputs: dict, device) -> dict | None:
        """What frozen encoders beside trained ones contribute, computed once (None: no such encoder)."""
        return None

    def fixed_conditioning(self, cfg, denoiser) -> dict:
        """Denoiser inputs every step shares (Flux's embedded guidance)."""
        return {}

    def encoders(self, holder) -> dict:
        """{name: text encoder} of a parts dict, a pipeline or a DreamBoothModel."""
        get = holder.get if isinstance(holder, dict) else (lambda n: getattr(holder, n, None))
        return {n: get(n) for n in self.text_encoders}

    # ---- prompts --------------------------------------------------------------------------------

    def token_ids(self, tok, prompts: list[str]):
        """Ids and mask as the family's pipeline encodes prompts: padded to `text_length` (IF: 77 of
        T5's 512), else to the tokenizer's own length (CLIP's 77)."""
        length = self.text_length or tok.model_max_length
        t = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return t.input_ids, t.attention_mask

    def prompt_inputs(self, parts: dict, prompts: list[str]) -> dict:
        ids, mask = self.token_ids(parts[self.tokenizers[0]], prompts)
        return {"input_ids": ids, **({"attention_mask": mask} if self.reads_text_mask else {})}

    def encode(self, encoders: dict, input_ids, attention_mask=None) -> dict:
        """Token ids -> the denoiser's text conditioning (with gradients when the encoders train)."""
        return {"encoder_hidden_states": encoders["text_encoder"](input_ids, attention_mask=attention_mask)[0]}

    @torch.no_grad()
    def encode_frozen(self, encoders: dict, inputs: dict, device, encode=None):
        """The conditioning of frozen encoders (`encode`, default `self.encode`), computed once on
        `device`; the encoders go back to the CPU."""
        for te in encoders.values():
            te.requires_grad_(False).to(device)
        out = (encode or self.encode)(encoders, **{k: v.to(device) for k, v in inputs.items()})
        for te in encoders.values():
            te.to("cpu")
        return out

    def row_conditioning(self, geometry: list, resolution: int, random_flip: bool) -> torch.Tensor | None:
        """Per-photo conditioning, [N, flip variants, ...] (SDXL's time ids); None for most families."""
        return None

    # ---- objective ------------------------------------------------------------------------------

    def sample_timesteps(self, noise_scheduler, n: int, g: torch.Generator, cfg=None, shape=None) -> torch.Tensor:
        return torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=g)

    def noisy(self, noise_scheduler, x0, noise, t):
        return noise_scheduler.add_noise(x0, noise, t)

    def target(self, noise_scheduler, x0, noise, t):
        return diffusion_target(noise_scheduler, x0, noise, t)

    def loss_weights(self, noise_scheduler, t, cfg=None) -> torch.Tensor | None:
        """Per-row loss weights: None (uniform, the DreamBooth paper's objective), or with `snr_gamma`
        min-SNR-gamma's (Hang et al. 2023): min(SNR, gamma) / SNR for an epsilon target, / (SNR + 1) for
        v, SNR = alpha_bar / (1 - alpha_bar) at the row's timestep. Both are the x0 loss's weight
        min(SNR, gamma) rescaled by the target's own weight in x0 terms (SNR; SNR + 1)."""
        if cfg is None or cfg.snr_gamma is None:
            return None
        ab = noise_scheduler.alphas_cumprod.to(t.device)[t].double()
        snr = ab / (1 - ab)
        w = snr.clamp(max=cfg.snr_gamma)
        return (w / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else w / snr).float()

    def objective_problems(self, cfg) -> list[str]:
        """Training settings this family's objective cannot honour (preflight reports them)."""
        return []

    # ---- denoiser -------------------------------------------------------------------------------

    def unet_forward(self, unet, noisy, t, encoder_hidden_states=None, class_labels=None, **added):
        return unet(noisy, t, encoder_hidden_states, class_labels=class_labels).sample

    def denoise(self, model, noisy, t, **cond):
        """The trained module's forward: text encoders first when they train, then the UNet."""
        inputs = {k: cond.pop(k) for k in list(cond) if k in self.prompt_keys}
        if getattr(model, "text_encoder", None) is not None:
            cond.update(self.encode(self.encoders(model), **inputs))
        return self.unet_forward(getattr(model, self.denoiser), noisy, t, **cond)

    def set_attention(self, module, classic: bool = False) -> None:
        set_sdpa(module, classic)

    def after_training(self, pipe, spec) -> None:
        """Settings an exported pipeline should carry (IF stage II: the trained resolution)."""

    # ---- LoRA -----------------------------------------------------------------------------------

    def lora_targets_of(self, lc) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(UNet targets, text-encoder targets) of a `train.lora` section: what it names, else this
        family's defaults (IF's T5 names its projections q/k/v/o, CLIP's q_proj/k_proj/v_proj/out_proj)."""
        unet = lc.target_modules if "target_modules" in lc.model_fields_set else self.lora_targets
        te = lc.text_encoder_modules if "text_encoder_modules" in lc.model_fields_set else self.text_encoder_lora_targets
        return tuple(unet), tuple(te)

    def add_lora(self, holder, cfg) -> None:
        """Freeze the base weights and add trainable low-rank adapters (peft), as diffusers' LoRA
        scripts do: on the denoiser, and on every trainable text encoder with `lora.text_encoder`."""
        from peft import LoraConfig

        lc = cfg.lora
        unet_targets, te_targets = self.lora_targets_of(lc)
        get = holder.get if isinstance(holder, dict) else (lambda n: getattr(holder, n))
        get(self.denoiser).requires_grad_(False)
        get(self.denoiser).add_adapter(LoraConfig(r=lc.rank, lora_alpha=lc.alpha, init_lora_weights="gaussian",
                                           target_modules=list(unet_targets)))
        if lc.text_encoder:
            for te in (get(n) for n in self.trainable_encoders):
                te.requires_grad_(False)
                te.add_adapter(LoraConfig(r=lc.rank, lora_alpha=lc.alpha, init_lora_weights="gaussian",
                                          target_modules=list(te_targets)))

    def lora_parts(self, with_text_encoder: bool) -> tuple[str, ...]:
        return (self.denoiser,) + (self.trainable_encoders if with_text_encoder else ())

    def save_lora(self, pipe, folder: str, with_text_encoder: bool) -> None:
        """The adapters as a diffusers LoRA file that this family's `load_lora_weights` reads."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        convert = convert_state_dict_to_diffusers if self.lora_key_format == "diffusers" else (lambda sd: sd)
        layers = {f"{part}_lora_layers": convert(get_peft_model_state_dict(getattr(pipe, part)))
                  for part in self.lora_parts(with_text_encoder)}
        # Each adapter's config (rank, alpha, targets) goes along: without it load_lora_weights assumes
        # alpha = rank, and an adapter trained with another alpha would load at the wrong scale.
        layers.update({f"{part}_lora_adapter_metadata": getattr(pipe, part).peft_config["default"].to_dict()
                       for part in self.lora_parts(with_text_encoder)})
        self.pipeline_class().save_lora_weights(folder, safe_serialization=True, **layers)

    # ---- what other tools load (ComfyUI, AUTOMATIC1111/Forge, the Hub): modelcard.py, export.write_formats

    tags: tuple[str, ...] = ()  # the Hub's tags for this architecture
    comfy_reads_diffusers_lora = False  # ComfyUI maps the UNet keys of no diffusers SD/SDXL LoRA

    def architecture(self, pipe) -> str:
        """modelspec.architecture (the ids kohya's sai_model_spec writes)."""
        return self.name

    def kohya_base_version(self, pipe) -> str:
        """kohya's ss_base_model_version, which A1111 labels a LoRA by (an SDXL one without it shows as SD1)."""
        return self.name

    def prediction_type(self, pipe) -> str | None:
        """modelspec.prediction_type: "epsilon" or "v" from the scheduler (None: a flow-matching family,
        for which kohya writes none either)."""
        kind = pipe.scheduler.config.get("prediction_type", "epsilon")
        return {"epsilon": "epsilon", "v_prediction": "v"}.get(kind, kind)

    def kohya_lora_state_dict(self, pipe, with_text_encoder: bool) -> dict[str, torch.Tensor]:
        """The pipeline's LoRA adapters in kohya's layout (`lora_unet_*`, `lora_te*_`), which A1111 needs
        and ComfyUI, Forge and diffusers' Civitai loader read."""
        raise NotImplementedError(f"{self.title}: no kohya LoRA layout (no UI that reads one loads this model)")

    def export_formats(self, method: str) -> tuple[str, ...]:
        """The formats beside diffusers' this family writes for a `method` run (train.export_formats)."""
        if method == "lora":
            return ("kohya",) if type(self).kohya_lora_state_dict is not Family.kohya_lora_state_dict else ()
        return ("single_file",) if type(self).single_file_state_dict is not Family.single_file_state_dict else ()

    # ---- single-file checkpoints ---------------------------------------------------------------

    def single_file_state_dict(self, pipe) -> dict[str, torch.Tensor]:
        """The pipeline's weights as the one file ComfyUI, A1111, Forge and InvokeAI load, in the
        original key layout, markers (`single_file_extras`) included; tensors as the pipe holds them
        (the export's precision), nothing gathered again."""
        raise NotImplementedError(f"{self.title} ({self.pipeline}) has no single-file checkpoint layout; "
                                  "its diffusers folder is the export")

    def single_file_extras(self, pipe) -> dict[str, torch.Tensor]:
        """What a UI reads from a single file beyond the weights (SDXL's `v_pred` marker)."""
        return {}

    single_file_uis = "ComfyUI, AUTOMATIC1111, Forge"  # what loads the single file (the model card says)

    def single_file_howto(self, file: str) -> list[str]:
        """The model card's lines on loading the single file in the UIs."""
        return [f"- ComfyUI: copy `{file}` into `ComfyUI/models/checkpoints/` (a *Load Checkpoint* node).",
                "- AUTOMATIC1111 / Forge: copy it into `models/Stable-diffusion/`."]

    # ---- preflight (configs only) ---------------------------------------------------------------

    def config_problems(self, read, unet: dict) -> list[str]:
        """What this family cannot drive in a model's configs (read: relpath -> dict or None; `unet`:
        the denoiser's config): the UNet's added conditioning must be what the family provides."""
        problems = []
        added = unet.get("addition_embed_type")
        if added not in self.added_conditioning:
            if added is None:
                problems.append(f"model: a {self.pipeline} needs a UNet with added conditioning "
                                f"({', '.join(map(repr, self.added_conditioning))}); this one takes none")
            else:
                problems.append(f"model: its UNet takes added conditioning ({added!r}, e.g. SDXL's pooled text and "
                                f"time ids) that a {self.pipeline} does not provide")
        if unet.get("class_embed_type") is not None or unet.get("num_class_embeds") is not None:
            problems.append("model: its UNet is class-conditioned (a super-resolution UNet?); use it as sr.model")
        return problems

    def cross_width(self, denoiser: dict) -> int | None:
        """The width of the text conditioning the denoiser takes, from its config."""
        return denoiser.get("encoder_hid_dim") or denoiser.get("cross_attention_dim")

    def text_width(self, read) -> int | None:
        """The width of the text conditioning the UNet's cross-attention gets, from config files."""
        te = read(f"{self.text_encoders[0]}/config.json") or {}
        return te.get("d_model") or te.get("hidden_size")


def kohya_lora(module, prefix: str, rename=lambda name: name) -> dict[str, torch.Tensor]:
    """One model's peft LoRA layers in kohya's layout: `<prefix>_<module path, dots as _>.lora_down.weight`
    (peft's A), `.lora_up.weight` (B) and `.alpha`, the trained alpha: kohya scales by alpha / rank, and
    diffusers' convert_state_dict_to_kohya writes alpha = rank, wrong for an adapter trained otherwise.
    `rename`: the module path in the layout the UIs expect (SDXL's LDM block names)."""
    out = {}
    for name, m in module.named_modules():
        if not hasattr(m, "lora_A") or not m.lora_A:
            continue
        if len(m.lora_A) != 1:
            raise ValueError(f"{name}: {len(m.lora_A)} adapters (one is exported)")
        (adapter, down), = m.lora_A.items()
        if adapter in getattr(m, "lora_magnitude_vector", {}) or getattr(m, "use_rslora", {}).get(adapter):
            raise ValueError(f"{name}: DoRA / rsLoRA adapters have no kohya LoRA equivalent")
        key = f"{prefix}_{rename(name).replace('.', '_')}"
        up = m.lora_B[adapter].weight
        out[f"{key}.lora_down.weight"] = down.weight.detach().cpu().contiguous()
        out[f"{key}.lora_up.weight"] = up.detach().cpu().contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(m.lora_alpha[adapter]), dtype=up.dtype)
    return out
