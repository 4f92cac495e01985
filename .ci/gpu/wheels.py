"""Wheels for running ComfyUI v0.33.0 headless on a machine with PyTorch but no package registry.

Two halves, one file (standard library and pip only, so it runs before anything is installed):

  download (where PyPI is reachable):  python3 .ci/gpu/wheels.py download [--python 3.10,3.11,3.12]
      Fetches, for each CPython version, one Linux x86_64 wheel of every distribution ComfyUI v0.33.0 needs at
      start-up beyond torch + torchvision (the closure of its requirements.txt, pinned to the versions the suite is
      tested with), into .ci/gpu/wheels/pool/cp3XX/, then packs folders of at most 60 MiB to carry
      (.ci/gpu/wheels/<folder>/) and writes .ci/gpu/wheels/MANIFEST.txt (each wheel and its size).
      .ci/gpu/wheels/ is git-ignored: never commit wheels.

  install (on the GPU machine, no network):  python3 .ci/gpu/wheels.py install [--target DIR] COMFYUI_DIR WHEEL_DIR...
      Reads COMFYUI_DIR/requirements.txt and the pack's requirements.txt; every requirement that the running
      interpreter already satisfies is left alone (the image's packages are never replaced); every other one is
      installed from the carried wheels that fit this interpreter (pip install --no-index --no-deps, one call),
      and the requirements of what is installed are followed the same way. Prints what it installed, what was
      already there, and, clearly, what is missing (with the wheel that would be needed). Exit status 3 when a
      start-up requirement is missing.

Not installed on purpose (not imported by `import nodes, execution, server, comfy.model_management` nor by
loading the comfy_extras nodes; server-only data packages or guarded optional imports):
comfyui-frontend-package, comfyui-workflow-templates*, comfyui-embedded-docs, PyOpenGL, comfy-angle.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STORE = HERE / "wheels"
MIB = 2 ** 20
FOLDER_LIMIT = 60 * MIB

# Not needed headless (see the docstring).
SKIP = {"comfyui-frontend-package", "comfyui-workflow-templates", "comfyui-embedded-docs", "pyopengl", "comfy-angle",
        "torch", "torchvision"}

# The closure of ComfyUI v0.33.0's start-up requirements beyond torch + torchvision, at the versions the suite is
# installed and tested with (CPython 3.11). A version that has no wheel for some CPython is replaced there by
# the newest release that has one (av 18 has no cp310 wheel: av 17.1.0 there).
PINS = {
    "aiohappyeyeballs": "2.7.1", "aiohttp": "3.14.5", "aiosignal": "1.4.0", "alembic": "1.20.1",
    "annotated-doc": "0.0.7", "annotated-types": "0.8.0", "anyio": "4.16.0", "attrs": "26.1.0", "av": "18.1.0",
    "blake3": "1.0.11", "certifi": "2026.10.19.post1", "charset-normalizer": "3.5.3", "click": "8.5.1",
    "comfy-aimdo": "0.4.13", "comfy-kitchen": "0.2.31", "einops": "0.8.2", "frozenlist": "1.8.0", "h11": "0.16.0",
    "hf-xet": "1.8.0", "httpcore2": "2.16.2", "httpx2": "2.16.2", "huggingface-hub": "2.4.0", "idna": "3.20",
    "kornia": "0.9.0", "kornia-rs": "0.2.0", "mako": "1.4.3", "markdown-it-py": "4.3.0", "mdurl": "0.1.2",
    "multidict": "7.2.1", "packaging": "26.4", "propcache": "0.5.4", "psutil": "7.2.2", "pydantic": "2.14.4",
    "pydantic-core": "2.50.5", "pydantic-settings": "2.16.3", "pygments": "2.21.0", "python-dotenv": "1.2.4",
    "pyyaml": "6.0.4", "regex": "2026.11.19", "requests": "2.34.2", "rich": "15.0.0", "safetensors": "0.8.0",
    "scipy": "1.17.1", "sentencepiece": "0.2.3", "shellingham": "1.5.4", "simpleeval": "1.0.8", "spandrel": "0.4.2",
    "sqlalchemy": "2.1.9", "tokenizers": "0.23.3", "torchaudio": "2.11.1", "torchsde": "0.2.6", "tqdm": "4.70.1",
    "trampoline": "0.1.2", "transformers": "5.24.0", "truststore": "0.10.5", "typer": "0.29.2",
    "typing-inspection": "0.4.5", "urllib3": "2.8.0", "yarl": "1.25.1",
    # present with torch + torchvision, pinned for completeness of the sets
    "markupsafe": "3.0.4", "typing-extensions": "4.16.0",
}
# Needed on CPython 3.10 only (backports, and greenlet for the older sqlalchemy that 3.10 gets): newest releases.
EXTRAS = {"3.10": ["async-timeout<6", "exceptiongroup", "tomli", "greenlet"]}
# What ComfyUI's requirements.txt asks of them where it asks more than "any version" (used when a pin has no wheel).
SPECS = {"av": ">=16.0.0", "aiohttp": ">=3.11.8", "yarl": ">=1.18.0", "transformers": ">=4.50.3",
         "tokenizers": ">=0.13.3", "safetensors": ">=0.4.2", "sqlalchemy": ">=2.0.0", "simpleeval": ">=1.0.0",
         "kornia": ">=0.7.1", "pydantic": "~=2.0", "pydantic-settings": "~=2.0"}

# The distributions that a typical CUDA image with PyTorch (CPython 3.12, torch 2.11 with CUDA 13, transformers, scipy
# and aiohttp already there) lacks: the small folder "h200" that travels in one go.
H200_MISSING = ["alembic", "annotated-types", "av", "blake3", "comfy-aimdo", "comfy-kitchen", "kornia", "kornia-rs",
                "mako", "pydantic", "pydantic-core", "pydantic-settings", "python-dotenv", "simpleeval", "spandrel",
                "sqlalchemy", "torchsde", "trampoline", "typing-inspection"]
# comfy-kitchen's CUDA build is 58.5 MB; its pure-Python wheel (0.2 MB) imports and serves every path a
# non-quantized fp16 SD1.x run takes (the CUDA kernels are for fp8/fp4 quantized layers and --use-ck-attention).
# The small folder takes the pure one; the CUDA build travels alone in a folder of its own.
PLATFORMS = ["manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"] + \
    [f"manylinux_2_{n}_x86_64" for n in range(5, 36)]


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _packaging():
    try:
        from packaging import requirements, specifiers, tags, utils, version  # noqa: F401
        import packaging
    except ImportError:  # pip's own copy: always there where pip is
        from pip._vendor import packaging
        from pip._vendor.packaging import requirements, specifiers, tags, utils, version  # noqa: F401
    return packaging


# -- download (here) ----------------------------------------------------------------------------------------------

def pip_download(pyver: str, dest: Path, reqs: list[str], pure_only=False) -> bool:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           pyver, "--implementation", "cp", "-d", str(dest), "--no-cache-dir"]
    for p in PLATFORMS if not pure_only else ["any"]:
        cmd += ["--platform", p]
    out = subprocess.run(cmd + reqs, capture_output=True, text=True)
    if out.returncode:
        print(f"  pip download {' '.join(reqs)} failed for {pyver}: {out.stderr.strip().splitlines()[-1:]}")
    return out.returncode == 0


def download(pyvers: list[str]) -> None:
    for pyver in pyvers:
        tag = "cp" + pyver.replace(".", "")
        dest = STORE / "pool" / tag
        dest.mkdir(parents=True, exist_ok=True)
        reqs = [f"{n}=={v}" for n, v in PINS.items() if n != "comfy-kitchen"]
        print(f"{tag}: {len(reqs)} wheels")
        if not pip_download(pyver, dest, reqs):
            for n, v in PINS.items():
                if n != "comfy-kitchen" and not pip_download(pyver, dest, [f"{n}=={v}"]):
                    pip_download(pyver, dest, [n + SPECS.get(n, "")])
        for extra in EXTRAS.get(pyver, []):
            pip_download(pyver, dest, [extra])
        # comfy-kitchen both ways: the pure wheel (the small folders) and the CUDA build (a folder of its own)
        pure = STORE / "pool" / "kitchen-pure"
        pip_download(pyver, pure, [f"comfy-kitchen=={PINS['comfy-kitchen']}"], pure_only=True)
        pip_download(pyver, STORE / "pool" / f"kitchen-cuda-{tag}", [f"comfy-kitchen=={PINS['comfy-kitchen']}"])
    pack(pyvers)


def _wheel_dist(path: Path) -> str:
    return canon(path.name.split("-")[0])


def _link(files, folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    for f in files:
        target = folder / f.name
        if not target.exists():
            target.hardlink_to(f)  # a copy that travels carries the bytes; hard links cost no space here


def pack(pyvers: list[str]) -> None:
    """Carry folders: h200 (what a typical CUDA image with PyTorch lacks), full-cp3XX-N (everything beyond torch +
    torchvision for CPython 3.XX, for an image that has nothing else), kitchen-cuda-cp3XX (the CUDA build)."""
    pure_kitchen = sorted((STORE / "pool" / "kitchen-pure").glob("*.whl"))
    lines = ["# wheels under .ci/gpu/wheels/, by carry folder (sizes in MiB; each folder <= 60 MiB)"]
    folders = {}
    for pyver in pyvers:
        tag = "cp" + pyver.replace(".", "")
        wheels = sorted((STORE / "pool" / tag).glob("*.whl")) + pure_kitchen
        if tag == "cp312":
            folders["h200"] = [w for w in wheels if _wheel_dist(w) in H200_MISSING]
        # first fit decreasing into <= 60 MiB folders
        bins: list[list[Path]] = []
        for w in sorted(wheels, key=lambda w: -w.stat().st_size):
            for b in bins:
                if sum(x.stat().st_size for x in b) + w.stat().st_size <= FOLDER_LIMIT:
                    b.append(w)
                    break
            else:
                bins.append([w])
        for i, b in enumerate(bins, 1):
            folders[f"full-{tag}-{i}"] = b
        cuda = sorted((STORE / "pool" / f"kitchen-cuda-{tag}").glob("*.whl"))
        if cuda:
            folders[f"kitchen-cuda-{tag}"] = cuda
    for name, files in folders.items():
        _link(files, STORE / name)
        total = sum(f.stat().st_size for f in files)
        assert total <= FOLDER_LIMIT, (name, total)
        lines.append(f"\n[{name}]  {len(files)} wheels, {total / MIB:.1f} MiB")
        lines += [f"  {f.stat().st_size / MIB:7.2f}  {f.name}" for f in sorted(files, key=lambda f: f.name.lower())]
    (STORE / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# -- install (there) ----------------------------------------------------------------------------------------------

def requirement_lines(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            out.append(line)
    return out


class Wheels:
    """The carried wheels that fit this interpreter, best first per distribution."""

    def __init__(self, dirs):
        pk = _packaging()
        rank = {t: i for i, t in enumerate(pk.tags.sys_tags())}
        self.by_dist: dict[str, list] = {}
        self.unfit: dict[str, list[str]] = {}
        for d in dirs:
            for path in sorted(Path(d).glob("*.whl")):
                name, ver, _, tags = pk.utils.parse_wheel_filename(path.name)
                best = min((rank[t] for t in tags if t in rank), default=None)
                if best is None:
                    self.unfit.setdefault(canon(name), []).append(path.name)
                    continue
                self.by_dist.setdefault(canon(name), []).append((ver, -best, path))
        for entries in self.by_dist.values():
            entries.sort(key=lambda e: (e[0], e[1]), reverse=True)

    def best(self, name: str, spec):
        for ver, _, path in self.by_dist.get(name, []):
            if spec.contains(ver, prereleases=True):
                return ver, path
        return None


def wheel_requirements(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def installed_version(name: str):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def install(comfy_dir: Path, dirs: list[str], dry_run=False, target: str | None = None) -> int:
    pk = _packaging()
    Requirement = pk.requirements.Requirement
    wheels = Wheels(dirs)
    roots = requirement_lines(comfy_dir / "requirements.txt") + requirement_lines(ROOT / "requirements.txt")
    todo = [(Requirement(r), "ComfyUI/pack requirements.txt") for r in roots]
    present, chosen, missing = {}, {}, {}
    while todo:
        req, why = todo.pop(0)
        name = canon(req.name)
        if name in SKIP or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        if name in chosen:
            if not req.specifier.contains(chosen[name][0], prereleases=True):
                missing[name] = f"{req} (from {why}) but the carried wheel is {chosen[name][0]}"
            continue
        have = installed_version(name)
        if have is not None and req.specifier.contains(have, prereleases=True):
            present[name] = have
            continue
        found = wheels.best(name, req.specifier)
        if found is None:
            unfit = wheels.unfit.get(name)
            hint = f"; carried but not for this interpreter: {', '.join(unfit)}" if unfit else ""
            missing[name] = f"{req} (from {why}){' installed: ' + have if have else ''}{hint}"
            continue
        chosen[name] = found
        todo += [(Requirement(r), f"{name} {found[0]}") for r in wheel_requirements(found[1])]
    # torchaudio must be built for the torch that is here
    torch_version = installed_version("torch")
    print(f"python {sys.version.split()[0]} at {sys.executable}; torch {torch_version}")
    if torch_version is None:
        missing["torch"] = "torch: this python has no PyTorch (the check needs the image's CUDA build)"
    elif "torchaudio" in chosen:
        for r in wheel_requirements(chosen["torchaudio"][1]):
            req = Requirement(r)
            if canon(req.name) == "torch" and not req.specifier.contains(torch_version.split("+")[0], prereleases=True):
                missing["torchaudio"] = (f"torchaudio {chosen.pop('torchaudio')[0]} needs {req}, this machine has torch "
                                         f"{torch_version}: carry the torchaudio wheel built for torch {torch_version}")
    print("already there: " + ", ".join(f"{n} {v}" for n, v in sorted(present.items())))
    files = [str(path) for _, path in chosen.values()]
    print("to install: " + (", ".join(f"{n} {v}" for n, (v, _) in sorted(chosen.items())) or "nothing"))
    if files and not dry_run:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--disable-pip-version-check", *(["--target", target] if target else []), *files]
        rc = subprocess.run(cmd).returncode
        if rc:
            print(f"MISSING: pip install failed (exit {rc})")
            return rc
    for name, text in sorted(missing.items()):
        print(f"MISSING: {name}: needs {text}")
    return 3 if missing else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download")
    d.add_argument("--python", default="3.10,3.11,3.12")
    e = sub.add_parser("extras", help="download only the EXTRAS, then pack")
    e.add_argument("--python", default="3.10,3.11,3.12")
    p = sub.add_parser("pack")
    p.add_argument("--python", default="3.10,3.11,3.12")
    i = sub.add_parser("install")
    i.add_argument("comfy_dir", type=Path)
    i.add_argument("dirs", nargs="+")
    i.add_argument("--dry-run", action="store_true")
    i.add_argument("--target", help="install there (pip --target) instead of into this interpreter's site-packages")
    args = parser.parse_args()
    if args.cmd == "download":
        download(args.python.split(","))
    elif args.cmd == "extras":
        for pyver in args.python.split(","):
            for extra in EXTRAS.get(pyver, []):
                pip_download(pyver, STORE / "pool" / ("cp" + pyver.replace(".", "")), [extra])
        pack(args.python.split(","))
    elif args.cmd == "pack":
        pack(args.python.split(","))
    else:
        sys.exit(install(args.comfy_dir, args.dirs, args.dry_run, args.target))


if __name__ == "__main__":
    main()
