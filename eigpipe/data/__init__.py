"""Datasets: COCO-format loading and validation, and the synthetic shapes generator."""
