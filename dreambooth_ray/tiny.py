"""The built-in `tiny` model: a randomly initialised Stable Diffusion layout small enough for CPU.

Nothing is downloaded. The tokenizer is a real byte-level BPE (CLIPTokenizer) over a small vocabulary
generated here, so prompts tokenize exactly as they would with a real CLIP tokenizer, only coarser.
The pipeline is written to disk once and then loaded by the same code as any user's model folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TINY_VERSION = "tiny-v1"
TINY_SR_VERSION = "tiny-sr-v3"  # v3: T5 tokenizer, as IF stage II ships
TINY_X4_VERSION = "tiny-x4-v1"
TINY_IF_VERSION = "tiny-if-v2"  # v2: T5 tokenizer, as IF stage I ships
TINY_SDXL_VERSION = "tiny-sdxl-v1"
TINY_SD3_VERSION = "tiny-sd3-v1"
TINY_FLUX_VERSION = "tiny-flux-v1"
TINY_METRICS_VERSION = "tiny-metrics-v1"
TINY_RESOLUTION = 32  # pixels; the VAE downsamples by 2, so latents are 16x16

# Words that get a single token each; everything else falls back to byte-level pieces.
_WORDS = (
    "a an the of in on at with and photo picture dog cat toy backpack vase bowl clock sneaker teapot "
    "person face man woman sks zwx qlt beach city street snow forest mountain grass table kitchen "
    "water river lake floor bed sofa moon space desert jungle red blue green yellow purple white black "
    "wearing hat sunglasses rainbow scarf santa chef police sitting lying running top front behind "
    "oil painting style van gogh cube sphere cartoon sketch high quality view"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2/CLIP byte-to-unicode table: printable stand-ins for every byte.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer(path: Path) -> None:
    chars = list(_bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    seen = set(vocab)
    for word in _WORDS:
        # Merge left to right: "d o" -> "do", "do g</w>" -> "dog</w>".
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        acc = pieces[0]
        for p in pieces[1:]:
            merged = acc + p
            if f"{acc} {p}" not in merges:
                merges.append(f"{acc} {p}")
            if merged not in seen:
                seen.add(merged)
                vocab.append(merged)
            acc = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))


def build_pipeline(seed: int = 0):
    """A StableDiffusionPipeline with random weights, identical for a given seed on every machine."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=TINY_RESOLUTION,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _if_text(seed: int):
    """IF's text side, tiny: a T5 tokenizer (sentencepiece-style, as IF ships) and a tiny T5 encoder."""
    import tempfile

    import torch
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_t5_tokenizer(Path(tmp), seed)
        tokenizer = T5Tokenizer.from_pretrained(tmp)
    torch.manual_seed(seed)
    return tokenizer, T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                              num_heads=4, pad_token_id=tokenizer.pad_token_id))


def _if_schedulers():
    from diffusers import DDPMScheduler

    # IF's schedule: cosine betas, learned-range variance, dynamic thresholding of the pixel prediction.
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", thresholding=True,
                         clip_sample=True), DDPMScheduler(beta_schedule="squaredcos_cap_v2")


def build_if_pipeline(seed: int = 0):
    """A DeepFloyd IF stage I layout (IFPipeline), tiny and random: text-to-image in pixel space (no
    VAE), T5 text, a UNet that predicts noise and variance (6 output channels)."""
    import torch
    from diffusers import IFPipeline, UNet2DConditionModel

    tokenizer, text_encoder = _if_text(seed + 5)
    torch.manual_seed(seed + 6)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    return IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=_if_schedulers()[0],
                      safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)


def build_sr_pipeline(seed: int = 0, out_resolution: int = 128):
    """A DeepFloyd IF stage II layout (IFSuperResolutionPipeline), tiny and random.

    The UNet takes [noisy image; upsampled low-res image] (6 channels) and the low-res image's
    noise-augmentation level as a timestep-embedded class label; it predicts noise and variance.
    Its text side is a tiny T5 tokenizer and encoder, as IF's.
    """
    import torch
    from diffusers import IFSuperResolutionPipeline, UNet2DConditionModel

    tokenizer, text_encoder = _if_text(seed + 1)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=out_resolution, in_channels=6, out_channels=6, layers_per_block=1,
        block_out_channels=(16, 32, 64), down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8, class_embed_type="timestep",
    )
    # IF stage II's schedules: a learned-variance DDPM for the image, a plain one for noise augmentation.
    scheduler, noising = _if_schedulers()
    return IFSuperResolutionPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler,
                                     image_noising_scheduler=noising, safety_checker=None, feature_extractor=None,
                                     watermarker=None, requires_safety_checker=False)


def build_x4_pipeline(seed: int = 0):
    """The Stable Diffusion x4 upscaler layout (StableDiffusionUpscalePipeline), tiny and random: the
    UNet takes [noisy latents; low-res image] (7 channels) and the low-res noise level as an integer
    class label; the VAE downsamples by 4, so latents and the low-res image share a size."""
    import tempfile

    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(seed + 4)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, num_class_embeds=1000,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, scaling_factor=0.08333,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    # The x4 upscaler's schedules: v-prediction for the latents, a plain DDPM for the low-res noise.
    low_res = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    return StableDiffusionUpscalePipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          low_res_scheduler=low_res, scheduler=scheduler, max_noise_level=350)


def build_sdxl_pipeline(seed: int = 0, width_2: int = 32):
    """A Stable Diffusion XL layout (StableDiffusionXLPipeline), tiny and random: two CLIP text
    encoders (the second with a text projection, whose pooled output conditions the UNet) with the
    tiny tokenizer twice, a UNet with SDXL's "text_time" added conditioning (pooled text + 6 time ids),
    and the tiny VAE. Cross-attention reads both encoders' hidden states side by side (32 + `width_2`;
    tiny-sdxl's 32 + 32; diffusers' single-file loader tells the encoders apart only by width, as
    SDXL's are 768 and 1280 wide, so tests of it take another `width_2`)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp)

    def text_config(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                              projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    torch.manual_seed(seed + 8)
    time_dim, pooled_dim = 8, width_2
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32 + width_2, attention_head_dim=8,
        norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=TINY_RESOLUTION, scaling_factor=0.13025,
        force_upcast=True,
    )
    text_encoder = CLIPTextModel(text_config(32))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(width_2))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")  # SDXL's shipped schedule
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def write_t5_tokenizer(path: Path, seed: int = 0) -> None:
    """A sentencepiece-style (unigram) T5 tokenizer, tiny: T5's special tokens, then word-initial
    pieces ("\u2581dog") for the tiny words, characters, and a tail of rare 2-3 letter pieces, ids in
    score order as in a trained sentencepiece model (so `identifier: auto` has a rare window to search)."""
    import random
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    rng = random.Random(seed)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -3.0 - 0.01 * i) for i, w in enumerate(_WORDS)]
    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    pieces += [(c, -6.0) for c in chars] + [("\u2581" + c, -6.5) for c in string.ascii_lowercase if c not in _WORDS]
    seen = {p for p, _ in pieces}
    rare = []
    while len(rare) < 400:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.choice((2, 3))))
        if "\u2581" + w not in seen:
            seen.add("\u2581" + w)
            rare.append(("\u2581" + w, -9.0 - 0.001 * len(rare)))
    tok = Tokenizer(models.Unigram(pieces + rare, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "model_max_length": 512, "pad_token": "<pad>", "eos_token": "</s>",
        "unk_token": "<unk>", "extra_ids": 0,
    }))


def _flow_parts(seed: int, t5_width: int, latent_channels: int = 4, shift: float = 0.0609, scale: float = 1.5):
    """What the tiny SD3 and Flux share: the tiny CLIP tokenizer, a tiny T5 (its own unigram
    tokenizer), and the tiny VAE with a latent shift and scale (as SD3's and Flux's VAEs have)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp) / "clip")
        write_t5_tokenizer(Path(tmp) / "t5", seed)
        clip_tok, t5_tok = CLIPTokenizer.from_pretrained(Path(tmp) / "clip"), T5TokenizerFast.from_pretrained(Path(tmp) / "t5")
    torch.manual_seed(seed + 11)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=t5_width, d_kv=8, d_ff=2 * t5_width, num_layers=2,
                                 num_heads=4, pad_token_id=t5_tok.pad_token_id))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=TINY_RESOLUTION, scaling_factor=scale, shift_factor=shift,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    return clip_tok, t5_tok, t5, vae


def _clip(tokenizer, hidden: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                              projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def build_sd3_pipeline(seed: int = 0):
    """A Stable Diffusion 3 layout (StableDiffusion3Pipeline), tiny and random: two CLIP encoders with
    projections (pooled 32 + 32), a T5 64 wide (the CLIP states, 32 + 32, are padded to it), an MMDiT
    on 2x2 latent patches, SD3's flow-matching schedule (shift 3)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_tok, t5_tok, t5, vae = _flow_parts(seed, t5_width=64)
    torch.manual_seed(seed + 12)
    te, te2 = _clip(clip_tok, 32, True), _clip(clip_tok, 32, True)
    transformer = SD3Transformer2DModel(sample_size=TINY_RESOLUTION // 2, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
                                        pos_embed_max_size=32)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=te, tokenizer=clip_tok, text_encoder_2=te2,
                                    tokenizer_2=clip_tok, text_encoder_3=t5, tokenizer_3=t5_tok)


def build_flux_pipeline(seed: int = 0):
    """A Flux.1-dev layout (FluxPipeline), tiny and random: CLIP (pooled, 32), T5 (sequence, 32), a
    transformer with double- and single-stream blocks over packed 2x2 latent patches, the guidance
    embedding, and Flux's resolution-dependent (dynamic) timestep shift."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_tok, t5_tok, t5, vae = _flow_parts(seed, t5_width=32, shift=0.1159, scale=0.3611)
    torch.manual_seed(seed + 13)
    te = _clip(clip_tok, 32, False)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=sched, vae=vae, text_encoder=te, tokenizer=clip_tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok)


def sd15_pipeline(seed: int = 0):
    """Stable Diffusion 1.5's architecture (UNet 860M, VAE, CLIP ViT-L text) with random weights.

    For throughput benchmarks: cost does not depend on weight values, and nothing is downloaded.
    """
    import tempfile

    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD 1.x config
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1)  # SD 1.5's shipped scheduler
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


class _Folder:
    """Parts saved side by side in one folder (a transformers model and its processor)."""

    def __init__(self, *parts):
        self.parts = parts

    def save_pretrained(self, path) -> None:
        for part in self.parts:
            part.save_pretrained(path)


def build_dino(seed: int = 0) -> _Folder:
    """A DINO-layout ViT (ViT-S/16's shape, scaled down) with random weights, and its processor."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed + 2)
    model = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                               intermediate_size=64), add_pooling_layer=False)
    return _Folder(model, ViTImageProcessor(size={"height": 32, "width": 32}))


def build_clip(seed: int = 0) -> _Folder:
    """A CLIP dual encoder with random weights, its image processor and the tiny tokenizer."""
    import tempfile

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(seed + 3)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_hidden_layers=2),
        projection_dim=16,
    )
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              tokenizer)
    return _Folder(CLIPModel(config), processor)


def _toy_version() -> str:
    """'toy-' + a digest of the shipped files (about 10 MB, ~20 ms): retraining them renews the cache key."""
    import hashlib

    root = Path(__file__).resolve().parent / "assets" / "toy" / "pipeline"
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")) if root.is_dir() else []:
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return "toy-" + h.hexdigest()[:12]


TOY_VERSION = _toy_version()


def build_toy():
    """The built-in `toy` model: pretrained on the toy world (benchmarks/pretrain_toy.py), shipped as
    weights in dreambooth_ray/assets/toy/pipeline; materialize copies it into the cache."""
    from .toyworld import ToyAssets

    return ToyAssets("pipeline")


# name -> (version, builder, the file whose presence makes the folder complete)
BUILT_IN = {
    "toy": (TOY_VERSION, "build_toy", "model_index.json"),
    "tiny": (TINY_VERSION, "build_pipeline", "model_index.json"),
    "tiny-if": (TINY_IF_VERSION, "build_if_pipeline", "model_index.json"),
    "tiny-sdxl": (TINY_SDXL_VERSION, "build_sdxl_pipeline", "model_index.json"),
    "tiny-sd3": (TINY_SD3_VERSION, "build_sd3_pipeline", "model_index.json"),
    "tiny-flux": (TINY_FLUX_VERSION, "build_flux_pipeline", "model_index.json"),
    "tiny-sr": (TINY_SR_VERSION, "build_sr_pipeline", "model_index.json"),
    "tiny-x4": (TINY_X4_VERSION, "build_x4_pipeline", "model_index.json"),
    "tiny-dino": (f"{TINY_METRICS_VERSION}-dino", "build_dino", "config.json"),
    "tiny-clip": (f"{TINY_METRICS_VERSION}-clip", "build_clip", "config.json"),
}


def materialize(cache_dir: str | os.PathLike | None = None, name: str = "tiny") -> Path:
    """Write a built-in tiny model (see BUILT_IN) to a local folder once (per machine)."""
    version, builder, marker = BUILT_IN[name]
    root = Path(cache_dir or os.environ.get("DREAMBOOTH_RAY_CACHE", Path.home() / ".cache" / "dreambooth-ray"))
    path = root / "models" / version
    if (path / marker).exists():
        return path
    import tempfile

    root.joinpath("models").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root / "models", prefix=".tiny-"))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        # transformers writes weights only on rank 0 of an initialized process group, so a Ray Train
        # worker of rank > 0 would save configs without weights: write from a clean process instead
        # (~9 s of imports; rank 0, or a process in a group of one, writes them itself).
        import subprocess
        import sys

        subprocess.run([sys.executable, "-c", f"import sys; from dreambooth_ray.tiny import {builder}; "
                        f"{builder}().save_pretrained(sys.argv[1])", str(tmp)], check=True)
    else:
        globals()[builder]().save_pretrained(tmp)
    parts = ("unet", "transformer", "vae", "text_encoder") if marker == "model_index.json" else (".",)
    missing = [d for d in parts if (tmp / d).exists() and not any((tmp / d).glob("*.safetensors"))]
    if marker == "model_index.json" and not any((tmp / d).exists() for d in ("unet", "transformer")):
        missing = ["unet or transformer"]
    if missing:
        raise RuntimeError(f"tiny model written to {tmp} lacks weights for {missing}")
    try:
        os.rename(tmp, path)  # atomic: concurrent workers on one machine race harmlessly
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path


def make_subject_images(folder: str | os.PathLike, n: int = 5, size: int = 64, seed: int = 0, color=(200, 40, 40)) -> list[Path]:
    """A toy subject for demos and tests: the same red figure, shifted, scaled, on varied backgrounds."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        bg = tuple(rng.randint(90, 250) for _ in range(3))
        im = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(im)
        r = size * rng.uniform(0.22, 0.3)
        cx, cy = size / 2 + rng.uniform(-6, 6), size / 2 + rng.uniform(-6, 6)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)  # body
        for dx in (-r * 0.7, r * 0.7):  # ears
            d.rectangle([cx + dx - r * 0.25, cy - r * 1.35, cx + dx + r * 0.25, cy - r * 0.7], fill=color)
        d.ellipse([cx - r * 0.35, cy - r * 0.3, cx - r * 0.1, cy - r * 0.05], fill=(20, 20, 20))  # eyes
        d.ellipse([cx + r * 0.1, cy - r * 0.3, cx + r * 0.35, cy - r * 0.05], fill=(20, 20, 20))
        p = folder / f"toy_{i:02d}.{'jpg' if i % 2 else 'png'}"
        im.save(p, quality=92) if p.suffix == ".jpg" else im.save(p)
        paths.append(p)
    return paths
