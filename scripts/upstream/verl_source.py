"""verl's source tree to patch: the PyPI source distribution (downloaded once into a cache) or a git snapshot."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

VERL_VERSION = "0.9.1"


def sdist_path(cache: Path) -> Path:
    """verl's sdist in ``cache``, downloaded with pip on first use."""
    path = cache / f"verl-{VERL_VERSION}.tar.gz"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", f"verl=={VERL_VERSION}", "--no-deps"]
        subprocess.run([*cmd, "--no-binary", ":all:", "-d", str(cache)], check=True)
    if not path.exists():
        raise FileNotFoundError(f"pip did not leave {path.name} in {cache}")
    return path


def unpack_sdist(archive: Path, dest: Path) -> Path:
    """Unpack into ``dest`` and return the tree root (the archive's single top directory)."""
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    (root,) = [p for p in dest.iterdir() if p.is_dir()]
    return root


def export_git(git_dir: Path, dest: Path, rev: str = "HEAD") -> Path:
    """``git archive`` of a bare mirror (no work tree) into ``dest/verl-<rev>``."""
    root = dest / f"verl-{rev}"
    root.mkdir(parents=True)
    archive = subprocess.run(["git", "--git-dir", str(git_dir), "archive", rev], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    return root


def fresh_copies(source: Path | str, cache: Path, out: Path) -> tuple[Path, Path]:
    """Two identical trees under ``out``: pristine (for the diff) and the one to patch."""
    if out.exists():
        shutil.rmtree(out)
    trees = []
    for name in ("pristine", "patched"):
        dest = out / name
        dest.mkdir(parents=True)
        if source == "sdist":
            trees.append(unpack_sdist(sdist_path(cache), dest))
        else:
            trees.append(export_git(Path(source), dest))
    return trees[0], trees[1]
