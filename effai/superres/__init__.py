"""Super-resolution inference (layer 5): a deterministic few-step DDIM sampler around a denoiser step (torch or an
exported artifact in its runtime), tiled inference with overlap blending, and the export of SRDiff's LR encoder and
denoiser step to effai's targets with parity. Spec: docs/superres.md.
"""
