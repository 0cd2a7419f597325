"""The benchmark harness behind `coreml-sd bench`: one model, several backends, comparable numbers.

For each requested backend (`coreml-ane`, `coreml-gpu`, `coreml-cpu`, `coreml-all`, `mil`,
`torch-cpu`, `torch-cuda`, `torch-mps`, `diffusers`) it measures cold and warm load, text-encoder,
UNet-step (one guided step: the batch-2 pair) and VAE-decoder latency, a full generation and peak
memory, each backend with the others' models released. Backends this machine cannot run are
recorded as skipped, with the reason. Results follow `benchmarks/schema.json`.

    machine.py   machine facts, load average, peak memory
    stats.py     median / p10 / p90 / IQR
    targets.py   backend names, precisions and what each needs
    models.py    the benchmark model: random SD 1.5 weights or a user's model; conversion cache
    measure.py   one backend's measurements (coreml_sd pipelines and diffusers' own pipeline)
    runner.py    all backends, each in a fresh process by default, into one result
    report.py    markdown table, PNG chart, comparison of two result files
"""
