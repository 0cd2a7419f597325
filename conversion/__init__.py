"""The conversion stage: model sources -> Neural-Engine-friendly Core ML packages, verified.

Nothing in `coreml_sd` imports this package; `coreml-sd convert` reaches it through the
`coreml_sd.commands` entry point.
"""
