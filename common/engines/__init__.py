"""Ignite engines and what they run: trainers, prepare-batch objects, inferers, losses, handlers, resume, DDP."""
