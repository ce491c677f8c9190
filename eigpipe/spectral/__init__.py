"""The eigenspectrum science: covariance accumulation, layer selection and hooks, extraction, stores,
spectra and dimension measures, and width derivation."""
