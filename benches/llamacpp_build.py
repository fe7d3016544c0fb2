"""llama.cpp built from the source in the ``llama-cpp-python`` sdist on PyPI,
for the CPU features this machine lists, cached outside the clone.

    python benches/llamacpp_build.py build      # llama-bench, llama-batched-bench, llama-server, llama-quantize
    python benches/llamacpp_build.py flags      # the CMake flags this CPU gets
    python benches/llamacpp_build.py quantize   # SmolLM2 as F16, Q4_K_M, Q5_K_M, Q6_K and Q8_0 GGUF files

The sdist's ``vendor/llama.cpp`` holds the whole llama.cpp tree. It is
unpacked into ``$REFT_RS_CACHE/llama.cpp-source-<version>-full`` and built
with CMake and Ninja (from PyPI) into ``$REFT_RS_CACHE/llama.cpp-build-
<version>-<features>``. ``GGML_NATIVE`` stays off (native builds have
crashed on these VMs, whose CPU flags list AMX they do not run); the AVX2,
FMA, F16C and AVX-512 (F, BW, VL, VBMI, VNNI, BF16) flags are turned on
where ``/proc/cpuinfo`` lists them, so llama.cpp runs the widest kernels
this CPU has, as the engine does.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
TARGETS = ("llama-bench", "llama-batched-bench", "llama-server", "llama-quantize")
# /proc/cpuinfo flag -> ggml CMake option.
FEATURES = (
    ("avx2", "GGML_AVX2"),
    ("fma", "GGML_FMA"),
    ("f16c", "GGML_F16C"),
    ("avx512f", "GGML_AVX512"),
    ("avx512vbmi", "GGML_AVX512_VBMI"),
    ("avx512_vnni", "GGML_AVX512_VNNI"),
    ("avx512_bf16", "GGML_AVX512_BF16"),
)


def cache_dir() -> Path:
    return Path(os.environ.get("REFT_RS_CACHE") or Path.home() / ".cache" / "reft_rs")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    found = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(found.group(1).split()) if found else set()


def cmake_flags(flags: set[str] | None = None) -> list[str]:
    """``-DGGML_NATIVE=OFF`` and one ``-D...=ON`` per feature the CPU lists
    (AVX-512 needs F, BW and VL together, as ggml's AVX512 option assumes)."""
    flags = cpu_flags() if flags is None else flags
    on = []
    for cpu, option in FEATURES:
        if cpu not in flags:
            continue
        if option.startswith("GGML_AVX512") and not {"avx512f", "avx512bw", "avx512vl"} <= flags:
            continue
        on.append(f"-D{option}=ON")
    return ["-DGGML_NATIVE=OFF", *on]


def features_label(flags: set[str] | None = None) -> str:
    """The features a build has, as its folder and the benchmarks name them."""
    return "-".join(f.split("=")[0][len("-DGGML_") :].lower() for f in cmake_flags(flags)[1:]) or "portable"


def source(parts: tuple[str, ...] | None = None) -> Path:
    """The sdist's ``vendor/llama.cpp``, downloaded with pip and unpacked into
    the cache on first use (renamed into place: never half there). ``parts``
    unpacks only those paths of the tree (the converter needs three)."""
    name = f"llama.cpp-source-{VERSION}" + ("" if parts else "-full")
    target = cache_dir() / name
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    tree = f"llama_cpp_python-{VERSION}/vendor/llama.cpp"
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=target.parent))
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                "llama-cpp-python",
                f"llama-cpp-python=={VERSION}",
                "-d",
                str(work),
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
        with tarfile.open(work / f"llama_cpp_python-{VERSION}.tar.gz") as sdist:
            members = [
                m
                for m in sdist.getmembers()
                if m.name.startswith(tree + "/")
                and (parts is None or m.name[len(tree) + 1 :].startswith(parts))
            ]
            sdist.extractall(work, members=members, filter="data")
        os.replace(work / tree, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def build(targets: tuple[str, ...] = TARGETS) -> Path:
    """The folder of the built programs (``bin/``), building what is missing."""
    out = cache_dir() / f"llama.cpp-build-{VERSION}-{features_label()}"
    if all((out / "bin" / t).is_file() for t in targets):
        return out / "bin"
    cmake, ninja = _tool("cmake"), _tool("ninja")
    tree = source()
    configure = [cmake, "-S", str(tree), "-B", str(out), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    options = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", *cmake_flags()]
    subprocess.run([*configure, *options], check=True)
    jobs = str(os.cpu_count() or 2)
    subprocess.run([cmake, "--build", str(out), "--target", *targets, "-j", jobs], check=True)
    return out / "bin"


QUANTS = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")


def smollm2_files(types: tuple[str, ...] = QUANTS) -> dict[str, Path]:
    """SmolLM2-135M-Instruct as GGUF files of each type, made as users make
    them: llama.cpp's ``convert_hf_to_gguf.py`` (the sdist's own ``gguf-py``
    on the path) turns the float32 folder into an F16 file, and
    ``llama-quantize`` makes the others from it. Cached with the build."""
    from reft_rs.io import pretrained

    out = cache_dir() / f"smollm2-gguf-{VERSION}"
    files = {t: out / f"SmolLM2-135M-Instruct.{t}.gguf" for t in ("F16", *types)}
    if all(f.is_file() for f in files.values()):
        return files
    out.mkdir(parents=True, exist_ok=True)
    tree = source()
    if not files["F16"].is_file():
        env = dict(os.environ, PYTHONPATH=f"{tree / 'gguf-py'}{os.pathsep}{tree}", NO_LOCAL_GGUF="1")
        work = files["F16"].with_suffix(".part")
        convert = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(pretrained.smollm2_path())]
        subprocess.run([*convert, "--outfile", str(work), "--outtype", "f16"], check=True, env=env)
        os.replace(work, files["F16"])
    quantize = build() / "llama-quantize"
    for t in types:
        if not files[t].is_file():
            work = files[t].with_suffix(".part")
            subprocess.run([str(quantize), str(files["F16"]), str(work), t], check=True)
            os.replace(work, files[t])
    return files


def _tool(name: str) -> str:
    """``cmake`` or ``ninja``: on the PATH, beside this Python, or installed
    from PyPI beside it."""
    beside = Path(sys.executable).parent / name
    for found in (shutil.which(name), beside if beside.is_file() else None):
        if found:
            return str(found)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", name], check=True)
    return str(beside)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["build", "flags", "quantize"])
    args = parser.parse_args()
    flags = cpu_flags()
    print(
        f"CPU features: {' '.join(sorted(f for f in flags if f.startswith(('avx', 'fma', 'f16c', 'amx'))))}"
    )
    print(f"CMake flags: {' '.join(cmake_flags(flags))}")
    if args.command == "build":
        print(f"built: {build()}")
    if args.command == "quantize":
        for kind, path in smollm2_files().items():
            print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
