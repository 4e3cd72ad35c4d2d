"""msmedcap: SAM-guided dual-encoder medical image captioning (MSMedCap), trained with DeepSpeed."""
__version__ = "0.1.0"
