"""DeepFloyd IF: stage I (IFPipeline, text to image in pixels) and stage II (IFSuperResolutionPipeline,
an SR family). T5 text encoder that reads the padding mask; the UNets predict noise and variance
(the variance half is not trained, as in IF's recipe)."""

from __future__ import annotations

from .base import Family
from .sd import SRFamily


class IFStageI(Family):
    name = "if"
    title = "DeepFloyd IF stage I"
    pipeline = "IFPipeline"
    latent = False
    reads_text_mask = True
    text_length = 77  # IFPipeline.encode_prompt's, not T5's model_max_length (512)
    text_encoder_lora_targets = ("q", "k", "v", "o")  # T5's attention projections
    tags = ("if", "if-diffusers")

    def architecture(self, pipe) -> str:
        return "deepfloyd-if-i"


class IFStageII(SRFamily):
    name = "if-sr"
    title = "DeepFloyd IF stage II"
    pipeline = "IFSuperResolutionPipeline"
    latent = False
    reads_text_mask = True
    text_length = 77  # IFSuperResolutionPipeline.encode_prompt's
    layout = "if"
    noising_scheduler = "image_noising_scheduler"

    def after_training(self, pipe, spec) -> None:
        pipe.unet.register_to_config(sample_size=spec.sr.output_resolution)  # the trained size becomes the default


IF_STAGE_I = IFStageI()
IF_STAGE_II = IFStageII()
