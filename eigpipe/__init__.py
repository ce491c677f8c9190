"""eigpipe: the eigenspectrum study of pre-trained vs scratch object detectors as a Snakemake workflow."""

__version__ = "0.1.0"
