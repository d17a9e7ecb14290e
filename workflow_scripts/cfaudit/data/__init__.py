"""Data stage: the embedded dataset, ISIC download, ground truth, resizing and packing, the split."""
