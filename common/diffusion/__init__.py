"""Latent diffusion: the scaled latent space, noise schedules stored with weights, guided samplers, sample requests."""
