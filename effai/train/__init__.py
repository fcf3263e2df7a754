"""Training: distillation losses and the pieces a training loop needs."""
