"""The compiled CPU kernels (`kernels.c`): int8 activations times 4-bit / 8-bit weights, and their Python side.

- Build: `kernels.c` is compiled on first use with the machine's C compiler (`$CC`, else `cc`) as
  `-O3 -march=native -pthread -shared`, into `$POCKETLM_CACHE` (default `~/.cache/pocketlm`) under a name
  that holds the hash of the source and flags, written atomically, so concurrent first uses are safe and an
  edited source is rebuilt. `-march=native` is right here because the library is built on the machine that
  runs it; the C file picks AVX512-VNNI, AVX2 or plain C at compile time. `scripts/install.sh` builds it once
  (`python -m pocketlm.quant.kernels`). No compiler: `available()` is False and the layers keep their
  reference path (a warning says why, once).
- Forcing a path: `POCKETLM_KERNEL_ISA=native|avx512-vnni|avx2|scalar` replaces `-march=native` by the flags of
  that instruction set (`isa_flags`): avx512-vnni and avx2 by `-march=x86-64` plus exactly the extensions the C
  file tests for (`-mavx2 -mfma -mf16c`, and `-mavx512f -mavx512bw -mavx512vnni`), scalar by `-march=x86-64`
  alone (SSE2, no AVX: the plain-C path; on a non-x86 CPU the compiler's default target). Each choice is its
  own cached library (the name hashes the flags), and `isa()` reports the path the loaded library really runs.
  It exists so that tests and CI exercise the AVX2 and plain-C paths on any x86 machine (an AVX512 one
  included). A value outside that list, or an instruction set this CPU lacks (it would die with SIGILL), raises
  `KernelError` on first use instead of falling back quietly; so does a build that selects another path.
- Threads: `default_threads()` counts the cores this process may really use: the CPU affinity mask, capped by
  a cgroup CPU quota (`/sys/fs/cgroup/cpu.max`) when one is set; `POCKETLM_NUM_THREADS` overrides.
- Layout: `pack(raw, type_name, rows, cols)` turns GGUF Q4_0 / Q4_1 / Q8_0 rows into the tile layout the C file
  documents (16 rows per tile, lossless); `unpack` is its inverse, so export still writes the original bytes.
  Rows are padded with zero rows to a multiple of 16; outputs are sliced back.
- `gemm(packed, kind, x)` quantizes x (T, K) to q8 blocks the way llama.cpp's x86 code does (scale = amax/127
  rounded to f16, codes rounded half to even) and returns x @ W.T in float32.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from pocketlm.errors import PocketLMError

SOURCE = Path(__file__).with_name("kernels.c")
BASE_FLAGS = ["-O3", "-pthread", "-shared", "-fPIC", "-std=c11", "-Wall", "-Wno-unused-function"]
FLAGS = ["-O3", "-march=native", "-pthread", "-shared", "-fPIC", "-std=c11", "-Wall", "-Wno-unused-function"]
"""The default (native) build's flags; `flags()` gives those of the instruction set in force."""
ISA_ENV = "POCKETLM_KERNEL_ISA"
ISAS = ("native", "avx512-vnni", "avx2", "scalar")
"""Accepted values of $POCKETLM_KERNEL_ISA; all but "native" are also names that `isa()` returns."""
_X86_AVX2 = ["-march=x86-64", "-mavx2", "-mfma", "-mf16c"]
ISA_X86_FLAGS = {"avx512-vnni": [*_X86_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vnni"], "avx2": _X86_AVX2,
                 "scalar": ["-march=x86-64"]}
ISA_CPU_FLAGS = {"avx512-vnni": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni"),
                 "avx2": ("avx2", "fma", "f16c"), "scalar": ()}
"""The /proc/cpuinfo flags each forced instruction set needs (its compile flags enable exactly these)."""
ISA_NAMES = {2: "avx512-vnni", 1: "avx2", 0: "scalar"}
"""pl_isa()'s codes: the path kernels.c selected at compile time."""
KINDS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2}
TILE = 16
BLOCK = 32
# bytes per tile and 32-column block: codes, then f16 scales (and f16 offsets for Q4_1)
TILE_BLOCK_BYTES = {"Q4_0": 256 + 32, "Q4_1": 256 + 64, "Q8_0": 512 + 32}
GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}

_lib: ctypes.CDLL | None = None
_error: str | None = None


class KernelError(PocketLMError, RuntimeError):
    """The compiled kernels cannot be built or refuse an input."""


def cache_dir() -> Path:
    return Path(os.environ.get("POCKETLM_CACHE", Path.home() / ".cache" / "pocketlm"))


def requested_isa() -> str:
    """$POCKETLM_KERNEL_ISA, checked: "native" when unset. Raises KernelError for any other value."""
    value = os.environ.get(ISA_ENV, "").strip().lower() or "native"
    if value not in ISAS:
        raise KernelError(f"{ISA_ENV}={os.environ[ISA_ENV]!r} is not one of {', '.join(ISAS)}")
    return value


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None where that file is missing or has none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def isa_flags(isa_name: str) -> list[str]:
    """Target flags for `isa_name` (one of ISAS) on this machine. Raises KernelError when the CPU cannot run it
    (where /proc/cpuinfo cannot tell, the request is trusted)."""
    if isa_name not in ISAS:
        raise KernelError(f"instruction set {isa_name!r} is not one of {', '.join(ISAS)}")
    if isa_name == "native":
        return ["-march=native"]
    if not is_x86():
        if isa_name == "scalar":
            return []  # the compiler's default target: no x86 intrinsics are enabled, the C file's plain path
        raise KernelError(f"{ISA_ENV}={isa_name} needs an x86-64 CPU; this one is {platform.machine()} "
                          f"(use native or scalar)")
    have = cpu_flags()
    missing = [f for f in ISA_CPU_FLAGS[isa_name] if have is not None and f not in have]
    if missing:
        raise KernelError(f"{ISA_ENV}={isa_name}: this CPU lacks {' '.join(missing)} "
                          f"(it would stop with an illegal instruction); use native or scalar")
    return list(ISA_X86_FLAGS[isa_name])


def supported_isas() -> list[str]:
    """The instruction sets $POCKETLM_KERNEL_ISA may force on this machine, fastest first."""
    names = []
    for name in ISAS[1:]:
        try:
            isa_flags(name)
        except KernelError:
            continue
        names.append(name)
    return names


def flags(isa_name: str | None = None) -> list[str]:
    """The full compiler flags for `isa_name` (default: the one $POCKETLM_KERNEL_ISA asks for)."""
    isa_name = requested_isa() if isa_name is None else isa_name
    return FLAGS if isa_name == "native" else [*BASE_FLAGS, *isa_flags(isa_name)]


def library_path(isa_name: str | None = None) -> Path:
    """Where the build for `isa_name` lives: the name hashes the source and the flags, so each is its own file."""
    tag = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags(isa_name)).encode()).hexdigest()[:16]
    return cache_dir() / f"kernels-{tag}.so"


def build(verbose: bool = False, isa_name: str | None = None) -> Path:
    """Compile kernels.c for `isa_name` (default: $POCKETLM_KERNEL_ISA, else native) into the cache (no-op when
    that build is there). Raises KernelError."""
    isa_name = requested_isa() if isa_name is None else isa_name
    out = library_path(isa_name)
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise KernelError("no C compiler found (set $CC or install gcc) to build pocketlm's CPU kernels")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".kernels-", suffix=".so")
    os.close(fd)
    cmd = [cc, *flags(isa_name), str(SOURCE), "-o", tmp, "-lm"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise KernelError(f"building the CPU kernels failed ({' '.join(cmd)}):\n{r.stderr.strip()[-2000:]}")
        if verbose and r.stderr.strip():
            print(r.stderr, file=sys.stderr)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> ctypes.CDLL | None:
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    if os.environ.get("POCKETLM_KERNELS", "1") == "0":
        _error = "disabled by POCKETLM_KERNELS=0"
        return None
    wanted = requested_isa()  # a bad value or an ISA this CPU lacks raises: a forced path never falls back quietly
    isa_flags(wanted)
    try:
        lib = ctypes.CDLL(str(build(isa_name=wanted)))
    except (KernelError, OSError) as e:
        _error = str(e)
        warnings.warn(f"pocketlm CPU kernels unavailable, using the reference path: {e}", RuntimeWarning,
                      stacklevel=3)
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.pl_quantize_act.argtypes = [p, i, i, p, p, p, p]
    lib.pl_quantize_act.restype = None
    lib.pl_gemm.argtypes = [i, p, i, i, p, p, p, p, i, p, i, i]
    lib.pl_gemm.restype = None
    lib.pl_set_threads.argtypes = [i]
    lib.pl_get_threads.restype = i
    lib.pl_isa.restype = i
    lib.pl_read_bandwidth.argtypes = [p, ctypes.c_size_t, i]
    lib.pl_read_bandwidth.restype = ctypes.c_double
    lib.pl_decode_step.restype = i  # arguments: (pl_model*, float* x, int pos, int lo, float* cos, float* sin)
    built = ISA_NAMES[lib.pl_isa()]
    if wanted != "native" and built != wanted:
        raise KernelError(f"{ISA_ENV}={wanted} but the library built with {' '.join(flags(wanted))} runs the "
                          f"{built} path")
    lib.pl_set_threads(default_threads())
    _lib = lib
    return lib


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _error


def isa() -> str:
    """The instruction-set path of the loaded library ("avx512-vnni", "avx2" or "scalar"); "none" without one."""
    lib = _load()
    return "none" if lib is None else ISA_NAMES[lib.pl_isa()]


def default_threads() -> int:
    """Cores this process can use: affinity mask, capped by a cgroup v2 quota; POCKETLM_NUM_THREADS wins."""
    env = os.environ.get("POCKETLM_NUM_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise KernelError(f"POCKETLM_NUM_THREADS={env!r} is not an integer") from None
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def set_threads(n: int) -> None:
    lib = _load()
    if lib is not None:
        lib.pl_set_threads(int(n))


def get_threads() -> int:
    lib = _load()
    return 1 if lib is None else lib.pl_get_threads()


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc `malloc_trim`). Loading repacks every weight, and the freed
    file copies otherwise stay in the process's resident memory (about 0.5 GB for phi-3-mini)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----- layout -----------------------------------------------------------------------------------------------------

def pack(raw: torch.Tensor, type_name: str, rows: int, cols: int) -> torch.Tensor:
    """GGUF bytes (rows, cols/32*block) uint8 -> tile layout, flat uint8 (tiles * cols/32 * TILE_BLOCK_BYTES)."""
    if type_name not in KINDS:
        raise KernelError(f"the CPU kernels run {sorted(KINDS)}, not {type_name}")
    if cols % BLOCK:
        raise KernelError(f"{cols} columns are not a multiple of {BLOCK}")
    nb, gb = cols // BLOCK, GGUF_BLOCK_BYTES[type_name]
    if raw.shape != (rows, nb * gb):
        raise KernelError(f"{type_name} bytes {tuple(raw.shape)} do not hold a ({rows}, {cols}) matrix")
    pad = -rows % TILE
    b = raw.reshape(rows, nb, gb)
    if pad:
        b = torch.cat([b, torch.zeros(pad, nb, gb, dtype=torch.uint8)])
    tiles = (rows + pad) // TILE
    b = b.reshape(tiles, TILE, nb, gb)
    if type_name == "Q8_0":
        codes = (b[..., 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)  # (t, r, nb, 32)
        codes = codes.reshape(tiles, TILE, nb, 8, 4).permute(0, 2, 3, 1, 4)  # (t, nb, c, r, i)
        scales = b[..., :2].permute(0, 2, 1, 3)  # (t, nb, r, 2)
        parts = [codes.reshape(tiles, nb, 512), scales.reshape(tiles, nb, 32)]
    else:
        hdr = 2 if type_name == "Q4_0" else 4
        qs = b[..., hdr:].reshape(tiles, TILE, nb, 4, 4).permute(0, 2, 3, 1, 4)  # (t, nb, c, r, i)
        parts = [qs.reshape(tiles, nb, 256), b[..., 0:2].permute(0, 2, 1, 3).reshape(tiles, nb, 32)]
        if type_name == "Q4_1":
            parts.append(b[..., 2:4].permute(0, 2, 1, 3).reshape(tiles, nb, 32))
    return torch.cat(parts, dim=-1).reshape(-1).contiguous()


def unpack(packed: torch.Tensor, type_name: str, rows: int, cols: int) -> torch.Tensor:
    """Inverse of `pack`: the original GGUF bytes (rows, cols/32*block)."""
    nb, gb, tb = cols // BLOCK, GGUF_BLOCK_BYTES[type_name], TILE_BLOCK_BYTES[type_name]
    tiles = -(-rows // TILE)
    p = packed.reshape(tiles, nb, tb)
    if type_name == "Q8_0":
        codes = p[..., :512].reshape(tiles, nb, 8, TILE, 4).permute(0, 3, 1, 2, 4).reshape(tiles, TILE, nb, 32)
        codes = (codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)
        scales = p[..., 512:544].reshape(tiles, nb, TILE, 2).permute(0, 2, 1, 3)
        out = torch.cat([scales, codes], dim=-1)
    else:
        qs = p[..., :256].reshape(tiles, nb, 4, TILE, 4).permute(0, 3, 1, 2, 4).reshape(tiles, TILE, nb, 16)
        hdr = [p[..., 256:288].reshape(tiles, nb, TILE, 2).permute(0, 2, 1, 3)]
        if type_name == "Q4_1":
            hdr.append(p[..., 288:320].reshape(tiles, nb, TILE, 2).permute(0, 2, 1, 3))
        out = torch.cat([*hdr, qs], dim=-1)
    return out.reshape(tiles * TILE, nb * gb)[:rows].contiguous()


def unpack_rows(packed: torch.Tensor, type_name: str, rows: int, cols: int, index: torch.Tensor) -> torch.Tensor:
    """GGUF bytes of the rows `index` (1-D int64) only: unpacks just the tiles that hold them."""
    nb, tb = cols // BLOCK, TILE_BLOCK_BYTES[type_name]
    tiles = -(-rows // TILE)
    index = index.reshape(-1)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= rows):
        raise KernelError(f"row index out of range [0, {rows}): {index.min().item()}..{index.max().item()}")
    used, inverse = torch.unique(index // TILE, return_inverse=True)
    part = packed.reshape(tiles, nb * tb)[used].reshape(-1)
    raw = unpack(part, type_name, used.numel() * TILE, cols)  # (len(used)*16, row bytes)
    return raw[inverse * TILE + index % TILE]


# ----- compute ----------------------------------------------------------------------------------------------------

def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x float32 (T, K) contiguous -> (codes int8 (T, K), scales (T, K/32), sums int32, sums*scale f16 as f32)."""
    lib = _load()
    if lib is None:
        raise KernelError(f"CPU kernels unavailable: {_error}")
    T, K = x.shape
    qa = torch.empty(T, K, dtype=torch.int8)
    da = torch.empty(T, K // BLOCK, dtype=torch.float32)
    sa_i = torch.empty(T, K // BLOCK, dtype=torch.int32)
    sa_f = torch.empty(T, K // BLOCK, dtype=torch.float32)
    lib.pl_quantize_act(x.data_ptr(), T, K, qa.data_ptr(), da.data_ptr(), sa_i.data_ptr(), sa_f.data_ptr())
    return qa, da, sa_i, sa_f


def gemm(packed: torch.Tensor, type_name: str, rows: int, x: torch.Tensor, *, scalar: bool = False) -> torch.Tensor:
    """x (T, K) float -> x @ W.T (T, rows) float32, W in tile layout. `scalar` forces the plain-C path."""
    lib = _load()
    if lib is None:
        raise KernelError(f"CPU kernels unavailable: {_error}")
    x = x.to(torch.float32).contiguous()
    T, K = x.shape
    if K % BLOCK:
        raise KernelError(f"input width {K} is not a multiple of {BLOCK}")
    tiles = -(-rows // TILE)
    if packed.numel() != tiles * (K // BLOCK) * TILE_BLOCK_BYTES[type_name]:
        raise KernelError(f"packed {type_name} weight of {packed.numel()} bytes does not hold ({rows}, {K})")
    qa, da, sa_i, sa_f = quantize_activations(x)
    y = torch.empty(T, tiles * TILE, dtype=torch.float32)
    lib.pl_gemm(KINDS[type_name], packed.data_ptr(), tiles, K, qa.data_ptr(), da.data_ptr(), sa_i.data_ptr(),
                sa_f.data_ptr(), T, y.data_ptr(), tiles * TILE, int(scalar))
    return y if tiles * TILE == rows else y[:, :rows]


def read_bandwidth(nbytes: int = 1 << 30, reps: int = 5, threads: int | None = None) -> float:
    """Measured read bandwidth in GB/s (best of `reps` passes over an `nbytes` buffer) with `threads` threads."""
    import time
    lib = _load()
    if lib is None:
        raise KernelError(f"CPU kernels unavailable: {_error}")
    old = lib.pl_get_threads()
    lib.pl_set_threads(threads or old)
    try:
        buf = torch.ones(nbytes, dtype=torch.uint8)
        lib.pl_read_bandwidth(buf.data_ptr(), nbytes, 1)  # touch
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            lib.pl_read_bandwidth(buf.data_ptr(), nbytes, 1)
            best = min(best, time.perf_counter() - t)
        return nbytes / best / 1e9
    finally:
        lib.pl_set_threads(old)


if __name__ == "__main__":  # `python -m pocketlm.quant.kernels`: build now (install.sh), print what was built
    path = build(verbose=True)  # honours $POCKETLM_KERNEL_ISA
    print(f"pocketlm CPU kernels: {path} ({isa()}, {default_threads()} threads)")
