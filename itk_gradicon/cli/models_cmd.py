"""``gradicon models``: list, download, import and inspect models."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import GradiconGroup, existing_file, info


@click.group(cls=GradiconGroup)
def models() -> None:
    """Published models, the download cache, and model files.

    The cache folder is $ITK_GRADICON_CACHE, else $XDG_CACHE_HOME/itk_gradicon, else
    ~/.cache/itk_gradicon. $ITK_GRADICON_MIRROR (http(s):// or file://) replaces the download host:
    files are fetched as <mirror>/<name>.trch.
    """


def _size(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return str(n)


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def list_cmd(as_json: bool) -> None:
    """Show each known model: bundled (in the package) or published (downloaded into the cache),
    present or not, size, sha256, source."""
    from ..models import cache_dir, list_models

    rows = list_models()
    if as_json:
        click.echo(json.dumps({"cache": str(cache_dir()), "models": rows}, indent=2))
        return
    click.echo(f"cache: {cache_dir()}")
    width = max(len(row["name"]) for row in rows) + 1
    for row in rows:
        if row["kind"] == "bundled":
            state = "bundled" if row["present"] else "bundled, missing"
        else:
            state = "present" if row["present"] else "not downloaded"
        click.echo(f"{row['name']:<{width}} {state:<16} {_size(row['size']):>9}  "
                   f"sha256 {row['sha256'] or '-'}")
        click.echo(f"{'':<{width}} {row['description']}")
        click.echo(f"{'':<{width}} {row['url'] or row['path']}")


@models.command("download")
@click.argument("name")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
def download_cmd(name: str, quiet: bool) -> None:
    """Download a published model into the cache now (it is otherwise fetched on first use)."""
    from ..errors import ModelError
    from ..models import PUBLISHED, ensure_published, sha256_of

    if name not in PUBLISHED:
        raise ModelError(f"unknown model name {name!r}; known: {', '.join(PUBLISHED)}")

    def progress(done, total):
        if not quiet:
            text = f"{done / 1e6:.0f} MB" + (f" of {total / 1e6:.0f} MB" if total else "")
            click.echo(f"\rdownloading {name}: {text}", err=True, nl=False)

    path = ensure_published(name, progress=progress)
    info("", quiet=quiet)
    info(f"{name}: {path} (sha256 {sha256_of(path)})", quiet=quiet)


@models.command("import")
@click.argument("name")
@click.argument("file", type=existing_file(path_type=Path))
def import_cmd(name: str, file: Path) -> None:
    """Put a weight FILE fetched elsewhere into the cache as model NAME (for offline machines).

    The file is loaded strictly first (every tensor present, shapes equal, no code executed).
    """
    from ..models import import_model, sha256_of

    path = import_model(name, file)
    click.echo(f"imported {file} as {name}: {path} (sha256 {sha256_of(path)})")


@models.command("info")
@click.argument("model", metavar="NAME|FILE")
def info_cmd(model: str) -> None:
    """Load a model and print its card as JSON: architecture, preprocessing, expected pre-alignment,
    recommended refinement (what 'gradicon register' runs by default), domain, provenance (data, steps)
    and, for a bundled model, the figures measured with it."""
    from ..models import BUNDLED, load_model
    from ..network import count_parameters

    loaded = load_model(model)
    record = {
        "name": loaded.name, "source": str(loaded.source), "sha256": loaded.sha256,
        "parameters": count_parameters(loaded.network), "architecture": loaded.architecture.to_dict(),
        "similarity": loaded.similarity, "preprocessing": loaded.preprocessing,
        "prealignment": loaded.preprocessing.get("prealignment", "none"),
        "refinement": loaded.refinement.to_dict(), "domain": loaded.domain.to_dict(),
        "provenance": loaded.provenance}
    if model in BUNDLED:
        record["card"] = BUNDLED[model].card()
    click.echo(json.dumps(record, indent=2))


COMMANDS = [models]
