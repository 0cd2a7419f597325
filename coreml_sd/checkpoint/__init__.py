"""Single-file checkpoints and the files that modify a model (VAE, LoRA, embeddings, hypernetworks).

Nothing here imports torch at module load; the modules that need it import it inside functions,
so `import coreml_sd` stays light.
"""
