"""Datasets and preprocessing shared by export (calibration, --eval), training, DeViT and bundles: digits, image
folders and .npz in memory (`datasets`), the parity photo samples (`photos`). Hostile files are bounded here."""
