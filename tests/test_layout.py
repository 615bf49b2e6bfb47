"""The package's layout: former module names, and ITK Python met in one place.

The subpackages (``io``, ``spatial``, ``pipeline``, ``evaluation``) took in modules that lived at the top; their
former names stay importable for one release, as the same module objects. ITK Python is imported by the bridge
(:mod:`itk_gradicon.io.itk_bridge`) and by the elastix runner, which is ITK Python's own elastix wrapping; no
other module of the package imports it.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import itk_gradicon

PACKAGE = Path(itk_gradicon.__file__).resolve().parent


@pytest.mark.parametrize("former", sorted(itk_gradicon.MOVED))
def test_a_former_module_name_is_the_module_at_its_new_home(former):
    old = importlib.import_module(f"itk_gradicon.{former}")
    new = importlib.import_module(f"itk_gradicon.{itk_gradicon.MOVED[former]}")
    assert old is new
    assert new.__spec__.name == new.__name__ == f"itk_gradicon.{itk_gradicon.MOVED[former]}"
    assert not (PACKAGE / f"{former}.py").exists()  # no second copy under the former name


def test_from_imports_of_former_names_reach_the_same_objects():
    from itk_gradicon import imageio, transforms
    from itk_gradicon.io.images import read_image
    from itk_gradicon.spatial.transforms import DisplacementField

    assert imageio.read_image is read_image
    assert transforms.DisplacementField is DisplacementField


def test_itk_python_is_imported_only_by_the_bridge_and_the_elastix_runner():
    importing = re.compile(r"^\s*(import itk\b|from itk import)", re.MULTILINE)
    found = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                   if importing.search(path.read_text(encoding="utf-8")))
    assert found == ["io/itk_bridge.py", "pipeline/elastix.py"]


def test_every_python_name_the_readme_documents_imports():
    """``from itk_gradicon... import ...`` lines of the README's code blocks, and the dotted names its text
    cites (``itk_gradicon.spatial.resample.resample_image`` ...), all resolve."""
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    imports = re.findall(r"^from (itk_gradicon[\w.]*) import ([\w, ]+)$", readme, re.MULTILINE)
    assert imports
    for module, names in imports:
        loaded = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(loaded, name) or importlib.import_module(f"{module}.{name}"), (module, name)
    cited = set(re.findall(r"`(itk_gradicon(?:\.\w+)+)`", readme))
    assert cited
    for dotted in cited:
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                target = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attribute in parts[cut:]:
                target = getattr(target, attribute)
            break
