"""One training loop for classification pre-training and detector training."""
