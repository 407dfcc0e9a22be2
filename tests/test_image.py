"""The Dockerfile of llmos's image (kubernetes.image). No Docker engine runs here, so its COPY lines
are carried out as Docker would and its install step is run on what they copied: the packages the
pods import come from those files alone. Its pins are checked against pyproject's and the spec's."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from cluster.spec import LLMOS_IMAGE, KubernetesOptions

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions(keyword: str) -> list[list[str]]:
    """The arguments of every `keyword` instruction, continuation lines joined, flags (--x=y) left out."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    found = []
    for line in joined.splitlines():
        words = line.split()
        if words and words[0] == keyword:
            found.append([word for word in words[1:] if not word.startswith("--")])
    return found


def copy_as_docker_does(context: Path, root: Path) -> Path:
    """Carry out the COPY lines into `root`: a directory source copies its contents, a file goes into a
    destination ending in `/` (or becomes the destination)."""
    for *sources, destination in instructions("COPY"):
        target = root / destination.lstrip("/")
        for source in sources:
            path = context / source
            if path.is_dir():
                shutil.copytree(path, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                place = target / path.name if destination.endswith("/") else target
                place.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, place)
    return root


def test_the_image_installs_llmos_from_the_files_it_copies(tmp_path: Path):
    [run] = instructions("RUN")
    installs = re.findall(r"pip install (?:--\S+ )*(\S+)", " ".join(run))
    assert installs[0] == '"torch==2.13.0"'
    source = installs[1]
    root = copy_as_docker_does(REPO, tmp_path / "image")
    site = tmp_path / "site-packages"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", site]
    subprocess.run(
        [*pip, root / source.lstrip("/")],
        check=True,
        timeout=300,
        capture_output=True,
    )
    # From another directory, as a pod runs them, and without this checkout's editable install (whose finder
    # would serve any package the copy lacks): each entry point imports from the installed copy.
    away = tmp_path / "elsewhere"
    away.mkdir()

    def run_in_pod(code: str) -> subprocess.CompletedProcess:
        without_checkout = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)];"
        command = [sys.executable, "-c", without_checkout + code]
        env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
        return subprocess.run(command, cwd=away, env=env, capture_output=True, text=True, timeout=120)

    imported = run_in_pod(
        "import cluster.cli, jobs.train, serving.app, manifests.render, benchmarks.commands;"
        "print(*(m.__file__ for m in (cluster.cli, jobs.train, serving.app, manifests.render, benchmarks.commands)))"
    )
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert all(Path(path).is_relative_to(site) for path in imported.stdout.split())
    help_text = run_in_pod(
        "import runpy; sys.argv = ['train', '--help']; runpy.run_module('jobs.train', run_name='__main__')"
    )
    assert help_text.returncode == 0 and "--without-controller" in help_text.stdout, help_text.stderr[-2000:]


def test_the_image_pins_what_pyproject_and_the_spec_pin():
    [[from_arg]] = [args for args in instructions("ARG") if args[0].startswith("RAY_IMAGE=")]
    ray_version = KubernetesOptions().ray_version
    assert from_arg == f"RAY_IMAGE=rayproject/ray:{ray_version}-py311"
    assert f"ray[train,serve]=={ray_version}" in PYPROJECT["project"]["dependencies"]
    assert '"torch==2.13.0"' in " ".join(instructions("RUN")[0])
    assert "torch==2.13.0" in PYPROJECT["project"]["dependencies"]
    assert LLMOS_IMAGE == f"llmos:{PYPROJECT['project']['version']}" == KubernetesOptions().image
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {source for *sources, _ in instructions("COPY") for source in sources}
    assert {package.rstrip("*") for package in packages} <= copied
