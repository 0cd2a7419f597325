"""coreml-sd: convert Stable Diffusion checkpoints to Core ML once, then generate anywhere.

Importing this package is cheap: torch, diffusers and coremltools are imported only by the backend
that needs them, so a Mac generating from a converted model never loads torch.
"""

__version__ = "0.1.0"

__all__ = ["Pipeline", "__version__"]


def __getattr__(name):
    # Lazy so that `import coreml_sd` stays free of heavy imports (checked by a test).
    if name == "Pipeline":
        from coreml_sd.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'coreml_sd' has no attribute {name!r}")
