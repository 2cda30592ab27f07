"""The tutorial's shape: numbered files in reading and dependency order, each short enough to read.

A numbered file may import only lower-numbered files (its demo included), so `python NN_x.py`
needs nothing above NN; the plumbing modules beside the drivers import no numbered file at all,
so no import circle can form. The registry of file 05 names every modality's file and class.
"""
import ast
import glob
import importlib
import os
import re

import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBERED = sorted(glob.glob(os.path.join(ROOT, "[0-9][0-9]_*.py")))
PLUMBING = ("config.py", "engine.py", "figures.py", "prepare.py", "readers.py")


def imports(path):
    """Every module a file imports: import statements and importlib.import_module("name") calls."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant):
                names.add(node.args[0].value)
    return names


def numbered(names):
    return sorted(n for n in names if re.match(r"\d\d_", n))


def test_numbered_files_import_only_lower_numbers():
    assert len(NUMBERED) >= 12
    for path in NUMBERED:
        own = os.path.basename(path)[:2]
        higher = [n for n in numbered(imports(path)) if n[:2] >= own]
        assert not higher, f"{os.path.basename(path)} imports {higher}: a numbered file imports only lower numbers"


def test_numbered_files_are_numbered_in_order_and_short():
    for i, path in enumerate(NUMBERED, start=1):
        name = os.path.basename(path)
        assert name.startswith(f"{i:02d}_"), f"{name}: the numbers run 01, 02, ... without gaps"
        source = open(path).read()
        assert source.startswith(f'"""{i:02d} - '), f"{name}: its docstring opens with its number and concept"
        assert 'if __name__ == "__main__":' in source, f"{name}: it has a demo"
        lines = source.count("\n")
        assert lines <= 500, f"{name}: {lines} lines; a numbered file is one concept of at most 500 lines"


def test_plumbing_imports_no_numbered_file():
    for name in PLUMBING:
        found = numbered(imports(os.path.join(ROOT, name)))
        assert not found, f"{name} imports {found}: plumbing stays below the numbered files"


def test_the_registry_names_every_modality_and_decoder():
    M = importlib.import_module("05_modalities")
    assert set(M.MODALITIES) == set(config.MODALITIES)
    for name, (file, cls) in M.MODALITIES.items():
        modality = getattr(importlib.import_module(file), cls)
        assert issubclass(modality, M.Modality) and modality.name == name, name
        assert "load" in vars(modality), f"{cls}: a modality reads its own data"
    for name, file in M.DECODERS.items():
        assert callable(importlib.import_module(file).build_vae), name


def test_the_drivers_and_the_readme_stay_compact():
    # the paper's two stages read in one sitting; the README is the entry, not the manual (docs/ is)
    for name, most in (("train.py", 350), ("sample.py", 200), ("README.md", 200)):
        lines = open(os.path.join(ROOT, name)).read().count("\n")
        assert lines <= most, f"{name}: {lines} lines; at most {most} (move detail to engine.py or docs/)"


def test_the_demo_settings_build_every_modality():
    # the demos build their modality from demo_settings (not from train.py's config): it must name
    # every setting a modality reads, or `python NN_x.py` fails where pytest does not look
    M = importlib.import_module("05_modalities")
    for name, (file, cls) in M.MODALITIES.items():
        getattr(importlib.import_module(file), cls)(M.demo_settings(frames=8, samples_per_ray=8))
