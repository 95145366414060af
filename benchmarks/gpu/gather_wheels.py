"""Gather what the GPU host lacks into ``.whl/`` (git-ignored), to travel there with the tree.

The host (one H100/H200, no network) has Python 3.12 with torch, transformers, accelerate, numpy,
pandas, pyarrow, pytest, ... but no trl, datasets, deepspeed, bitsandbytes, pydantic, peft at our
version, or MLflow. This script, run here with the project's venv:

1. downloads, for CPython 3.12 on manylinux x86_64 and without dependencies, one wheel of each
   package in ``CARRIED`` at the version installed in this venv (the versions the tests ran with);
2. builds DeepSpeed here as a pure-Python wheel (``DS_BUILD_OPS=0``; ops would JIT-compile there,
   and the kit uses none);
3. copies SmolLM2-135M's config and tokenizer files to ``.whl/smollm2-135m`` (part (b) rebuilds
   the model there with random weights);
4. checks the result: one wheel per package, compiled ones built for cp312 manylinux x86_64,
   bitsandbytes with its CUDA 13 library, DeepSpeed without compiled ops; installs them into a
   temporary ``--target`` folder as the host will and imports the pure-Python ones from there;
5. prints the wheels with their sizes and fails if they and the tree exceed the 64 MiB that can
   travel.

    .venv/bin/python benchmarks/gpu/gather_wheels.py

MLflow stays behind (about 30 MB with its dependencies): the kit runs with ``tracking.enabled:
false``. transformers stays behind too: the kit is tested against the host's 5.17 (see README).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WHEELS = REPO / ".whl"
LIMIT = 64 * 2**20
# What the host lacks (or has at another version) and the kit imports, with their own needs.
CARRIED = (
    "trl",
    "datasets",
    "dill",
    "multiprocess",
    "fsspec",
    "peft",
    "bitsandbytes",
    "hjson",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
)
BUILT_HERE = ("deepspeed",)
PURE_IMPORTS = (
    "trl",
    "datasets",
    "dill",
    "fsspec",
    "peft",
    "deepspeed",
    "hjson",
    "annotated_types",
    "typing_inspection",
    "typing_extensions",
)  # pydantic needs pydantic_core: compiled, cp312
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
for _platform in PLATFORMS:
    TARGET += ["--platform", _platform]


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def wheel_name(path: Path) -> str:
    return path.name.split("-")[0].lower().replace("_", "-")


def check(wheels: list[Path]) -> list[str]:
    """Problems with the gathered wheels (empty: fine)."""
    problems = []
    names = [wheel_name(w) for w in wheels]
    for name in {*CARRIED, *BUILT_HERE}:
        if names.count(name) != 1:
            problems.append(f"{name}: {names.count(name)} wheels (want exactly one)")
    for wheel in wheels:
        tags = wheel.name[:-4].split("-")[-3:]  # python, abi, platform
        if tags[1] != "none" and tags[:2] != ["cp312", "cp312"]:
            problems.append(f"{wheel.name}: compiled for {tags[:2]}, not cp312")
        if tags[2] != "any" and "x86_64" not in tags[2]:
            problems.append(f"{wheel.name}: platform {tags[2]}, not x86_64")
        members = zipfile.ZipFile(wheel).namelist()
        if wheel_name(wheel) == "bitsandbytes" and "bitsandbytes/libbitsandbytes_cuda130.so" not in members:
            problems.append(f"{wheel.name}: no libbitsandbytes_cuda130.so (the host's torch is cu130)")
        if wheel_name(wheel) == "deepspeed" and any(m.endswith(".so") for m in members):
            problems.append(f"{wheel.name}: contains compiled ops (build it with DS_BUILD_OPS=0)")
    return problems


def install_and_import(wheels: list[Path]) -> list[str]:
    """Install as the host will (``--target``, no deps, no index) and import the pure-Python
    packages from there with this Python; compiled cp312 ones cannot load on another Python."""
    problems = []
    with tempfile.TemporaryDirectory() as site:
        pip(
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--target",
            site,
            *TARGET,
            *map(str, wheels),
        )
        if sys.version_info[:2] != (3, 12):  # this Python's own build of a cp312 package stands in
            for wheel in wheels:
                if "-cp312-" in wheel.name:
                    for top in {m.split("/")[0] for m in zipfile.ZipFile(wheel).namelist()}:
                        if not top.endswith(".dist-info"):
                            shutil.rmtree(Path(site) / top, ignore_errors=True)
        probe = "import importlib, sys; print(importlib.import_module(sys.argv[1]).__file__)"
        env = {**os.environ, "PYTHONPATH": site}
        env.pop("PYTHONHOME", None)
        for name in PURE_IMPORTS:
            result = subprocess.run(
                [sys.executable, "-c", probe, name], capture_output=True, text=True, env=env
            )
            where = result.stdout.split()[-1] if result.returncode == 0 and result.stdout.split() else ""
            if not where.startswith(site):
                problems.append(
                    f"import {name} from the --target folder failed: "
                    f"{(result.stderr.strip().splitlines() or [where])[-1]}"
                )
    return problems


def tree_bytes() -> int:
    """What travels besides .whl: tracked and untracked-not-ignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    files = [REPO / os.fsdecode(p) for p in listed if p]
    return sum(f.stat().st_size for f in files if f.is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> int:
    WHEELS.mkdir(exist_ok=True)
    for old in WHEELS.glob("*.whl"):
        old.unlink()  # one version of each: two would stop the install there
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in CARRIED]
    pip("download", "-q", "--no-deps", *TARGET, "-d", str(WHEELS), *pins)
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    pip(
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(WHEELS),
        *(f"{name}=={importlib.metadata.version(name)}" for name in BUILT_HERE),
        env=env,
    )
    sys.path.insert(0, str(Path(__file__).parent))
    from pipeline_part import SHAPE_DIR, copy_shape_files

    copy_shape_files(SHAPE_DIR)

    wheels = sorted(WHEELS.glob("*.whl"))
    problems = check(wheels) + install_and_import(wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    shape, tree, total = folder_bytes(SHAPE_DIR), tree_bytes(), folder_bytes(WHEELS)
    print(f"{shape / 2**20:8.2f} MiB  {SHAPE_DIR.relative_to(REPO)}/ (config + tokenizer)")
    print(f"{total / 2**20:8.2f} MiB  .whl/ in all")
    print(f"{tree / 2**20:8.2f} MiB  the tree without .whl/ (tracked + untracked, not ignored)")
    print(f"{(total + tree) / 2**20:8.2f} MiB  travels (limit {LIMIT / 2**20:.0f} MiB)")
    if total + tree > LIMIT:
        problems.append(f"{(total + tree) / 2**20:.1f} MiB would travel: over the limit")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
