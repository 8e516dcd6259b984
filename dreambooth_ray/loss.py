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


def prior_preservation_loss(pred: torch.Tensor, target: torch.Tensor, n_instance: int, prior_weight: float):
    """L = L_subject + lambda * L_prior, rows [:n_instance] being the subject and the rest the class.

    Returns (loss, subject_loss, prior_loss); prior_loss is 0 when the batch has no class rows.
    """
    pred, target = pred.float(), target.float()
    inst = F.mse_loss(pred[:n_instance], target[:n_instance])
    if pred.shape[0] == n_instance:
        return inst, inst.detach(), torch.zeros((), device=pred.device)
    if pred.shape[0] != 2 * n_instance:
        raise ValueError(f"batch of {pred.shape[0]} rows is not {n_instance} subject + {n_instance} class rows")
    prior = F.mse_loss(pred[n_instance:], target[n_instance:])
    return inst + prior_weight * prior, inst.detach(), prior.detach()
