"""The names of conversion choices, owned here (light: no torch or coremltools) because the runtime
reads them from manifests, `coreml-sd bench` passes them to the converter, and the converter and
its command line validate them. The converter defines what each one does."""

ATTENTION_IMPLEMENTATIONS = ("split_einsum_v2", "split_einsum", "original")
WEIGHT_MODES = ("fp16", "palettize-8", "palettize-6", "palettize-4", "int8")
MIN_TARGETS = ("macOS13", "macOS14", "macOS15", "iOS16", "iOS17", "iOS18")
