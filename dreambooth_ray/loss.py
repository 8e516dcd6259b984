"""The DreamBooth objective: noise-prediction MSE on the subject plus weighted MSE on class images."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} in the model's scheduler config")


def to_grid(mask: torch.Tensor, size) -> torch.Tensor:
    """[N, 1, H, W] masks -> [N, 1, h, w], each cell the mean of the pixels it covers (area average)."""
    return mask if tuple(mask.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(mask.float(), size)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(m * err) / sum(m) over the rows, channels and cells: the mean squared error over the subject.
    Not kohya's mean(m * err), which shrinks the subject term by the subject's share of the frame (a
    small subject would learn slower and the prior term would outweigh it); an all-ones mask is plain MSE."""
    m = to_grid(mask, pred.shape[-2:]).to(pred.device, torch.float32).expand_as(pred)
    return (m * (pred - target) ** 2).sum() / m.sum()


def prior_preservation_loss(pred: torch.Tensor, target: torch.Tensor, n_instance: int, prior_weight: float,
                            mask: torch.Tensor | None = None):
    """L = L_subject + lambda * L_prior, rows [:n_instance] being the subject and the rest the class.
    `mask` ([n_instance, 1, H, W], 1 = subject): the subject term is masked_mse; the prior term never is.

    Returns (loss, subject_loss, prior_loss); prior_loss is 0 when the batch has no class rows.
    """
    pred, target = pred.float(), target.float()
    inst = (F.mse_loss(pred[:n_instance], target[:n_instance]) if mask is None
            else masked_mse(pred[:n_instance], target[:n_instance], mask))
    if pred.shape[0] == n_instance:
        return inst, inst.detach(), torch.zeros((), device=pred.device)
    if pred.shape[0] != 2 * n_instance:
        raise ValueError(f"batch of {pred.shape[0]} rows is not {n_instance} subject + {n_instance} class rows")
    prior = F.mse_loss(pred[n_instance:], target[n_instance:])
    return inst + prior_weight * prior, inst.detach(), prior.detach()
