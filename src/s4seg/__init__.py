"""s4seg: semi-supervised semantic segmentation of aerial imagery, as a DVC pipeline."""

__version__ = "0.1.0"
