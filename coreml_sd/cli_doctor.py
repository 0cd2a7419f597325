"""`coreml-sd doctor` and `coreml-sd cache info|clear`: the machine and the cache folder.

The commands only unpack options and call `coreml_sd.doctor` / `coreml_sd.cachedir`.
"""

from __future__ import annotations

import json

import click


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def doctor(as_json: bool) -> None:
    """What this machine can run: Core ML, torch (CUDA, MPS), CPU bf16 and threads, the cache folder."""
    from coreml_sd.doctor import render_report, system_report

    report = system_report()
    click.echo(json.dumps(report, indent=2) if as_json else render_report(report))


@click.group("cache")
def cache() -> None:
    """The cache folder: compiled Core ML models, checkpoint hashes, benchmark models ($COREML_SD_CACHE)."""


@cache.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def cache_info(as_json: bool) -> None:
    """Where the cache is and how much each part of it holds."""
    from coreml_sd.cachedir import CACHE_ENTRIES, cache_usage

    usage = cache_usage()
    if as_json:
        click.echo(json.dumps(usage, indent=2))
        return
    note = "" if usage["exists"] else " (not created yet)"
    click.echo(f"{usage['path']}: {usage['size_bytes'] / 2**20:.1f} MiB{note}")
    for name, size in usage["entries"].items():
        click.echo(f"  {name:<12} {size / 2**20:8.1f} MiB  {CACHE_ENTRIES[name]}")
    if usage["other"]:
        click.echo(f"  not coreml-sd's, left alone: {', '.join(usage['other'])}")


@cache.command("clear")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON on stdout.")
def cache_clear(yes: bool, as_json: bool) -> None:
    """Remove coreml-sd's cached files (compiled models recompile on next use). Other files are kept."""
    from coreml_sd.cachedir import cache_usage, clear_cache

    usage = cache_usage()
    if not usage["entries"]:
        click.echo(json.dumps({"path": usage["path"], "removed": [], "freed_bytes": 0, "kept": usage["other"]})
                   if as_json else f"{usage['path']}: nothing to remove")
        return
    if not yes and not click.confirm(f"Remove {', '.join(usage['entries'])} ({usage['size_bytes'] / 2**20:.1f} MiB) "
                                     f"from {usage['path']}?", err=True):
        raise click.Abort()
    result = clear_cache()
    click.echo(json.dumps(result, indent=2) if as_json else
               f"removed {', '.join(result['removed'])} from {result['path']}: {result['freed_bytes'] / 2**20:.1f} MiB")


def register(group: click.Group) -> None:
    group.add_command(doctor)
    group.add_command(cache)
