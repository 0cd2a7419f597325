"""`coreml-sd recipe IMAGE`: the generation parameters embedded in an image, as generate options."""

from __future__ import annotations

import json

import click


@click.command("recipe")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("-m", "--model", default=None,
              help="Check the recipe's model against this one (hash, else name). Nothing is loaded.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def recipe(image, model, as_json):
    """Read the recipe in IMAGE (PNG Info of AUTOMATIC1111, Forge, Easy Diffusion or coreml-sd images,
    or their .txt/.json sidecar files) and print it with what cannot be honoured."""
    from coreml_sd.recipe import read_recipe

    model_hash = model_name = None
    if model is not None:
        from coreml_sd.sources import open_model

        info = open_model(model).info
        model_hash, model_name = info.hash, info.name
    found = read_recipe(image, model_hash=model_hash, model_name=model_name)
    if as_json:
        click.echo(json.dumps(found.to_dict(), indent=2, ensure_ascii=False))
        return
    click.echo(f"source: {found.source}")
    if found.model or found.model_hash:
        click.echo(f"model: {found.model or '?'}" + (f" [{found.model_hash}]" if found.model_hash else ""))
    for key, value in found.options.items():
        click.echo(f"{key}: {value}")
    for warning in found.warnings:
        click.echo(f"warning: {warning}", err=True)
