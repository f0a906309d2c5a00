"""Install integrity: nothing we install collides with another installed distribution, and the
libraries we are checked against import from the repository root, where every command runs.

transformers >= 5.25 imports Hugging Face's ``kernels`` package; an import package of ours with that
name once shadowed it from the repository root and, installed as a wheel, overwrote its files. The
wheel is built here from this checkout and compared, file by file and top-level name by top-level
name, with every distribution installed in this environment (found through importlib.metadata, not
through any list of ours).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = "llm-encoder-engine"
SOURCES = ("pyproject.toml", "setup.py", "README.md", "engine", "converters", "encoder_kernels")


def _normal(name: str) -> str:
    return name.lower().replace("_", "-")


def _other_distributions() -> list[metadata.Distribution]:
    return [d for d in metadata.distributions() if d.metadata["Name"] and _normal(d.metadata["Name"]) != OURS]


def _top_level_names(files: list[PurePosixPath]) -> set[str]:
    """Top-level import names that files installed into site-packages provide: a package directory
    with Python files, or a module (``name.py``, an extension ``name.cpython-*.so``)."""
    names = set()
    for f in files:
        parts = f.parts
        if not parts or parts[0] in ("..", "/") or parts[0].endswith((".dist-info", ".egg-info", ".data")):
            continue
        if len(parts) > 1 and parts[-1].endswith((".py", ".pyi", ".so", ".pyd")):
            names.add(parts[0])
        elif len(parts) == 1 and parts[0].endswith((".py", ".so", ".pyd")) and not parts[0].startswith("_"):
            names.add(parts[0].split(".")[0])
    return names - {"__pycache__"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Our wheel, built from a copy of this checkout's sources (the build leaves build/ and
    *.egg-info behind, which must not land in the checkout), without network or build isolation."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    return wheel


def test_no_file_of_the_wheel_belongs_to_another_distribution(wheel):
    with zipfile.ZipFile(wheel) as z:
        ours = {PurePosixPath(n) for n in z.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert ours and all(p.parts[0] in ("engine", "converters", "encoder_kernels") for p in ours), sorted(ours)[:20]
    clashes = {}
    for dist in _other_distributions():
        for f in dist.files or ():
            if PurePosixPath(f.as_posix()) in ours:
                clashes.setdefault(dist.metadata["Name"], []).append(str(f))
    assert not clashes, f"installing our wheel would overwrite files of {clashes}"


def test_no_top_level_name_of_ours_is_a_top_level_name_of_another_distribution(wheel):
    with zipfile.ZipFile(wheel) as z:
        ours = _top_level_names([PurePosixPath(n) for n in z.namelist()])
    assert ours == {"engine", "converters", "encoder_kernels"}, ours
    seen = 0
    for dist in _other_distributions():
        theirs = _top_level_names([PurePosixPath(f.as_posix()) for f in dist.files or ()])
        theirs |= set((dist.read_text("top_level.txt") or "").split())
        seen += bool(theirs)
        assert not ours & theirs, f"{dist.metadata['Name']} installs the top-level name(s) {sorted(ours & theirs)}"
    assert seen > 20, "too few installed distributions were read to mean anything"


def test_transformers_peft_and_sentence_transformers_import_from_the_repository_root():
    """From the repository root (where make demo, make test and python -m ... run) the current
    directory comes first on sys.path: Hugging Face's ``kernels`` must still be theirs."""
    assert metadata.distribution("kernels"), "the test extra installs Hugging Face's kernels"
    code = (
        "import importlib.util, pathlib\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "assert 'site-packages' in spec.origin, spec.origin\n"
        "import transformers, peft, sentence_transformers\n"
        "from transformers import LlamaModel, MistralModel, Qwen2Model, Gemma2Model\n"
        "from transformers.activations import ACT2FN\n"
        "import engine, encoder_kernels.attention, converters.convert\n"
        "print(engine.Engine.__module__, pathlib.Path(encoder_kernels.attention.__file__).parent.name)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["engine.encoder", "encoder_kernels"]


def test_the_installed_engine_works_from_any_directory(tmp_path):
    """Outside the checkout the installed package is what imports (here: the editable install)."""
    code = (
        "import pathlib, engine, encoder_kernels.pooling, converters.hf2engine\n"
        "from engine.config import ModelConfig\n"
        f"assert pathlib.Path(encoder_kernels.pooling.__file__).resolve().parents[1] == pathlib.Path({str(REPO)!r})\n"
        "print(engine.Engine.__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env=env)
    if "No module named 'engine'" in proc.stderr:
        pytest.fail("the package is not installed: run `make test` (pip install -e '.[test,...]') first")
    assert proc.returncode == 0 and proc.stdout.strip() == "Engine", proc.stderr[-3000:]
