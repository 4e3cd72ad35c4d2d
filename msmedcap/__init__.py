"""msmedcap: SAM-guided dual-encoder medical image captioning (MSMedCap), trained with DeepSpeed."""
__version__ = "0.1.0"


def from_pretrained(path):
    """A self-contained model directory (``msmedcap export --bundle``) -> (model in eval mode, Config)."""
    from msmedcap.export.bundle import load_bundle

    return load_bundle(path)
