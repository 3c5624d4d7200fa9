"""The compiled CPU kernels (`kernels.c`): int8 activations times 4/6/8-bit weights, and their Python side.

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
- Layout: `pack(raw, type_name, rows, cols)` turns GGUF Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K rows into the tile
  layout the C file documents (16 rows per tile, lossless), also Q5_0 / Q5_1 (4-bit tiles plus a plane of fifth
  bits) and IQ4_NL (Q4_0's tile; the kernel looks the nibbles up in kvalues_iq4nl); `unpack` is its inverse,
  so export still writes the original bytes. Rows are padded with zero rows to a multiple of 16; outputs are
  sliced back.
- `gemm(packed, kind, x)` quantizes x (T, K) to 8 bits the way llama.cpp's x86 code does for that type (q8_0 /
  q8_1: scale = amax/127 rounded to f16, codes rounded half to even; the K-quants: q8_K, 256 values per float
  scale, `quantize_activations_k`) and returns x @ W.T in float32.
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
KINDS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "Q4_K": 3, "Q6_K": 4, "Q5_K": 5, "Q5_0": 6, "Q5_1": 7, "IQ4_NL": 8}
Q5_TYPES = ("Q5_0", "Q5_1")
"""4-bit tiles plus a 64-byte plane of fifth bits per tile and block (kernels.c's header)."""
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
"""K-quants: super-blocks of 256 columns and q8_K activations (one float scale and 16 sums per 256 values)."""
TILE = 16
BLOCK = 32
QK_K = 256
# columns per block (32, or 256 for the K-quants)
BLOCK_COLS = {"Q4_0": BLOCK, "Q4_1": BLOCK, "Q8_0": BLOCK, "Q4_K": QK_K, "Q5_K": QK_K, "Q6_K": QK_K,
              "Q5_0": BLOCK, "Q5_1": BLOCK, "IQ4_NL": BLOCK}
# bytes per tile and block: codes, then scales (and offsets / mins); see kernels.c's header for each layout
TILE_BLOCK_BYTES = {"Q4_0": 256 + 32, "Q4_1": 256 + 64, "Q8_0": 512 + 32, "Q4_K": 2048 + 256 + 64,
                    "Q5_K": 2048 + 512 + 256 + 64, "Q6_K": 2048 + 1024 + 256 + 32,
                    "Q5_0": 256 + 64 + 32, "Q5_1": 256 + 64 + 64, "IQ4_NL": 256 + 32}
GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210,
                    "Q5_0": 22, "Q5_1": 24, "IQ4_NL": 18}

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
    lib.pl_quantize_act_k.argtypes = [p, i, i, p, p, p]
    lib.pl_quantize_act_k.restype = None
    lib.pl_gemm.argtypes = [i, p, i, i, p, p, p, p, i, p, i, i]
    lib.pl_gemm.restype = None
    lib.pl_set_threads.argtypes = [i]
    lib.pl_get_threads.restype = i
    lib.pl_isa.restype = i
    lib.pl_set_prefetch.argtypes = [i]
    lib.pl_get_prefetch.restype = i
    lib.pl_read_bandwidth.argtypes = [p, ctypes.c_size_t, i]
    lib.pl_read_bandwidth.restype = ctypes.c_double
    lib.pl_decode_step.restype = i  # arguments: (pl_model*, float* x, int pos, int lo, float* cos, float* sin)
    # (pl_model*, pl_head*, token, pos, lo, cos, sin, flags) -> argmax / 0 / < 0 refused; engine/cpu.py
    lib.pl_decode_token.argtypes = [p, p, i, i, i, p, p, i]
    lib.pl_decode_token.restype = i
    lib.pl_embed_row.argtypes = [p, i, i, i, i, p]  # (table, type, tiles?, cols, row, float* out) -> 0 / -1
    lib.pl_embed_row.restype = i
    lib.pl_argmax_rows.argtypes = [p, i, i, ctypes.c_long, p]  # (x, B, V, ld, int32 out) -> void
    lib.pl_argmax_rows.restype = None
    lib.pl_prefill.argtypes = [p, p, p]  # (pl_model*, pl_chunk*, float* x (T, hidden)) -> 0 / < 0 refused
    lib.pl_prefill.restype = i
    lib.pl_prefill_segs.argtypes = [p, i, p, p]  # (pl_seg*, n, pl_chunk* scratch, float* x (sum T, hidden)) -> 0 / < 0
    lib.pl_prefill_segs.restype = i
    lib.pl_decode_batch_profile.argtypes = [p, i]  # (double out[4], reset) -> void
    lib.pl_decode_batch_profile.restype = None
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


def set_prefetch(nbytes: int) -> None:
    """The K-quant kernels' software prefetch distance in bytes (decode reads; 0 turns it off). Speed only: the
    results never depend on it."""
    lib = _load()
    if lib is not None:
        lib.pl_set_prefetch(int(nbytes))


def get_prefetch() -> int:
    """The K-quant kernels' current software prefetch distance in bytes (0: off, or no kernels)."""
    lib = _load()
    return 0 if lib is None else lib.pl_get_prefetch()


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc `malloc_trim`). Loading repacks every weight, and the freed
    file copies otherwise stay in the process's resident memory (about 0.5 GB for phi-3-mini)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----- layout -----------------------------------------------------------------------------------------------------

def _nibble_tiles(q: torch.Tensor, tiles: int, nb: int) -> torch.Tensor:
    """Codes (tiles*16, nb, 8, 32) in [0, 15] (8 sub-blocks of 32 columns) -> (tiles, nb, 2048) in the Q4 tile
    order per sub-block: byte (j, c, r, i) = column 4c+i of row r (low nibble) | column 16+4c+i (high nibble)."""
    qb = q[..., :16] | (q[..., 16:] << 4)  # (R, nb, 8, 16): byte 4c+i
    return qb.reshape(tiles, TILE, nb, 8, 4, 4).permute(0, 2, 3, 4, 1, 5).reshape(tiles, nb, 2048)


def _nibbles_from_tiles(p: torch.Tensor, tiles: int, nb: int) -> torch.Tensor:
    """Inverse of `_nibble_tiles`: (tiles, nb, 2048) -> codes (tiles*16, nb, 8, 32)."""
    qb = p.reshape(tiles, nb, 8, 4, TILE, 4).permute(0, 4, 1, 2, 3, 5).reshape(tiles * TILE, nb, 8, 16)
    return torch.cat([qb & 0x0F, qb >> 4], dim=-1)


def _rows_to_tiles(x: torch.Tensor, tiles: int, nb: int) -> torch.Tensor:
    """Per-row values (tiles*16, nb, n, bytes) -> (tiles, nb, n * 16 * bytes): item-major, then row."""
    n, w = x.shape[2], x.shape[3]
    return x.reshape(tiles, TILE, nb, n, w).permute(0, 2, 3, 1, 4).reshape(tiles, nb, n * TILE * w)


def _tiles_to_rows(p: torch.Tensor, tiles: int, nb: int, n: int, w: int) -> torch.Tensor:
    """Inverse of `_rows_to_tiles`: (tiles, nb, n*16*w) -> (tiles*16, nb, n, w)."""
    return p.reshape(tiles, nb, n, TILE, w).permute(0, 3, 1, 2, 4).reshape(tiles * TILE, nb, n, w)


def _pack_k(b: torch.Tensor, type_name: str, tiles: int, nb: int) -> torch.Tensor:
    """GGUF K-quant blocks (tiles*16, nb, block bytes) -> tile layout (tiles, nb, TILE_BLOCK_BYTES)."""
    if type_name in ("Q4_K", "Q5_K"):
        s = b[..., 4:16]
        sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], dim=-1)
        mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)
        qs = b[..., -128:].reshape(-1, nb, 4, 1, 32)
        q = torch.cat([qs & 0x0F, qs >> 4], dim=3).reshape(-1, nb, 8, 32)  # column order
        fifth = []
        if type_name == "Q5_K":  # GGUF qh[l] bit j -> tile byte (j, r, i) bit c (column 4c+i) / 4+c (16+4c+i)
            qh = b[..., 16:48].reshape(-1, nb, 1, 32)
            h = torch.cat([(qh >> j) & 1 for j in range(8)], dim=2).reshape(-1, nb, 8, 2, 4, 4)  # (j, half, c, i)
            hb = torch.zeros_like(h[..., 0, 0, :])
            for half in range(2):
                for c in range(4):
                    hb |= h[..., half, c, :] << (4 * half + c)
            fifth = [_rows_to_tiles(hb, tiles, nb)]
        return torch.cat([_nibble_tiles(q, tiles, nb), *fifth, _rows_to_tiles(sc[..., None], tiles, nb),
                          _rows_to_tiles(mn[..., None], tiles, nb), _rows_to_tiles(b[..., None, 0:2], tiles, nb),
                          _rows_to_tiles(b[..., None, 2:4], tiles, nb)], dim=-1)
    ql, qh = b[..., :128].reshape(-1, nb, 2, 1, 64), b[..., 128:192].reshape(-1, nb, 2, 1, 32)
    lo = torch.cat([ql & 0x0F, ql >> 4], dim=3)  # (R, nb, 2, 2, 64): column order
    hi = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=3)  # (R, nb, 2, 4, 32): column order
    q = (lo.reshape(-1, nb, 8, 32) | (hi.reshape(-1, nb, 8, 32) << 4))  # codes 0..63
    h2 = (q >> 4).reshape(-1, nb, 8, 2, 4, 4)  # (.., j, half, c, i)
    hb = h2[..., 0, :] | (h2[..., 1, :] << 2) | (h2[..., 2, :] << 4) | (h2[..., 3, :] << 6)  # (R, nb, 8, 2, 4)
    hb = hb.reshape(tiles, TILE, nb, 8, 2, 4).permute(0, 2, 3, 4, 1, 5).reshape(tiles, nb, 1024)
    return torch.cat([_nibble_tiles(q & 0x0F, tiles, nb), hb, _rows_to_tiles(b[..., 192:208, None], tiles, nb),
                      _rows_to_tiles(b[..., None, 208:210], tiles, nb)], dim=-1)


def _unpack_k(p: torch.Tensor, type_name: str, tiles: int, nb: int) -> torch.Tensor:
    """Inverse of `_pack_k`: (tiles, nb, TILE_BLOCK_BYTES) -> GGUF blocks (tiles*16, nb, block bytes)."""
    q = _nibbles_from_tiles(p[..., :2048], tiles, nb)  # (R, nb, 8, 32)
    if type_name in ("Q4_K", "Q5_K"):
        fifth = []
        if type_name == "Q5_K":
            hb = _tiles_to_rows(p[..., 2048:2560], tiles, nb, 8, 4).reshape(-1, nb, 8, 1, 1, 4)  # (j, i)
            h = torch.cat([torch.cat([(hb >> (4 * half + c)) & 1 for c in range(4)], dim=4) for half in range(2)],
                          dim=3).reshape(-1, nb, 8, 32)  # (j, column in sub-block)
            qh = torch.zeros_like(h[:, :, 0, :])
            for j in range(8):
                qh |= h[:, :, j, :] << j
            fifth = [qh]
            p = p[..., 512:]  # the rest as Q4_K's
        sc = _tiles_to_rows(p[..., 2048:2176], tiles, nb, 8, 1)[..., 0]
        mn = _tiles_to_rows(p[..., 2176:2304], tiles, nb, 8, 1)[..., 0]
        d = _tiles_to_rows(p[..., 2304:2336], tiles, nb, 1, 2)[..., 0, :]
        dmin = _tiles_to_rows(p[..., 2336:2368], tiles, nb, 1, 2)[..., 0, :]
        scales = torch.cat([(sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6),
                            (mn[..., 0:4] & 63) | ((mn[..., 4:8] >> 4) << 6),
                            (sc[..., 4:8] & 0x0F) | ((mn[..., 4:8] & 0x0F) << 4)], dim=-1)
        pairs = q.reshape(-1, nb, 4, 2, 32)
        qs = (pairs[..., 0, :] | (pairs[..., 1, :] << 4)).reshape(-1, nb, 128)
        return torch.cat([d, dmin, scales, *fifth, qs], dim=-1)
    hb = p[..., 2048:3072].reshape(tiles, nb, 8, 2, TILE, 4).permute(0, 4, 1, 2, 3, 5).reshape(-1, nb, 8, 2, 1, 4)
    h2 = torch.cat([(hb >> (2 * c)) & 3 for c in range(4)], dim=4).reshape(-1, nb, 8, 32)
    q = (q | (h2 << 4)).reshape(-1, nb, 256)
    lo = (q & 0x0F).reshape(-1, nb, 2, 2, 64)
    ql = (lo[..., 0, :] | (lo[..., 1, :] << 4)).reshape(-1, nb, 128)
    hi = (q >> 4).reshape(-1, nb, 2, 4, 32)
    qh = (hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6)).reshape(-1, nb, 64)
    scales = _tiles_to_rows(p[..., 3072:3328], tiles, nb, 16, 1)[..., 0]
    d = _tiles_to_rows(p[..., 3328:3360], tiles, nb, 1, 2)[..., 0, :]
    return torch.cat([ql, qh, scales, d], dim=-1)


def _fifth_bit_tiles(qh: torch.Tensor, tiles: int, nb: int) -> torch.Tensor:
    """Q5_0/Q5_1 qh bytes (tiles*16, nb, 4) (a little-endian u32, bit j: fifth bit of weight j) -> the tiles'
    fifth-bit planes (tiles, nb, 64): byte (r, i) bit k = fifth bit of column 4k+i of row r."""
    q = qh.to(torch.int64)
    bits = ((q[..., 0] | q[..., 1] << 8 | q[..., 2] << 16 | q[..., 3] << 24)[..., None] >> torch.arange(32)) & 1
    hb = (bits.reshape(-1, nb, 8, 4) << torch.arange(8).reshape(8, 1)).sum(2)  # (R, nb, i)
    return _rows_to_tiles(hb.to(torch.uint8)[..., None, :], tiles, nb)


def _fifth_bit_rows(p: torch.Tensor, tiles: int, nb: int) -> torch.Tensor:
    """Inverse of `_fifth_bit_tiles`: (tiles, nb, 64) -> qh bytes (tiles*16, nb, 4)."""
    hb = _tiles_to_rows(p, tiles, nb, 1, 4)[..., 0, :].to(torch.int64)  # (R, nb, i)
    bits = (hb[..., None, :] >> torch.arange(8).reshape(8, 1)) & 1  # (R, nb, k, i): column 4k+i
    u32 = (bits.reshape(*bits.shape[:2], 32) << torch.arange(32)).sum(-1)
    return torch.stack([(u32 >> s) & 0xFF for s in (0, 8, 16, 24)], dim=-1).to(torch.uint8)


def pack(raw: torch.Tensor, type_name: str, rows: int, cols: int) -> torch.Tensor:
    """GGUF bytes (rows, cols/block*size) uint8 -> tile layout, flat uint8 (tiles * blocks * TILE_BLOCK_BYTES)."""
    if type_name not in KINDS:
        raise KernelError(f"the CPU kernels run {sorted(KINDS)}, not {type_name}")
    block = BLOCK_COLS[type_name]
    if cols % block:
        raise KernelError(f"{cols} columns are not a multiple of {block} ({type_name})")
    nb, gb = cols // block, GGUF_BLOCK_BYTES[type_name]
    if raw.shape != (rows, nb * gb):
        raise KernelError(f"{type_name} bytes {tuple(raw.shape)} do not hold a ({rows}, {cols}) matrix")
    pad = -rows % TILE
    b = raw.reshape(rows, nb, gb)
    if pad:
        b = torch.cat([b, torch.zeros(pad, nb, gb, dtype=torch.uint8)])
    tiles = (rows + pad) // TILE
    if type_name in K_TYPES:
        return _pack_k(b, type_name, tiles, nb).reshape(-1).contiguous()
    b = b.reshape(tiles, TILE, nb, gb)
    if type_name in Q5_TYPES:
        o = 2 if type_name == "Q5_0" else 4  # qh at o, nibbles at o + 4
        qs = b[..., o + 4:].reshape(tiles, TILE, nb, 4, 4).permute(0, 2, 3, 1, 4)  # (t, nb, c, r, i)
        parts = [qs.reshape(tiles, nb, 256), _fifth_bit_tiles(b[..., o:o + 4].reshape(-1, nb, 4), tiles, nb)]
        parts += [b[..., h:h + 2].permute(0, 2, 1, 3).reshape(tiles, nb, 32) for h in range(0, o, 2)]  # d (, m)
    elif type_name == "Q8_0":
        codes = (b[..., 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)  # (t, r, nb, 32)
        codes = codes.reshape(tiles, TILE, nb, 8, 4).permute(0, 2, 3, 1, 4)  # (t, nb, c, r, i)
        scales = b[..., :2].permute(0, 2, 1, 3)  # (t, nb, r, 2)
        parts = [codes.reshape(tiles, nb, 512), scales.reshape(tiles, nb, 32)]
    else:  # Q4_0, Q4_1, IQ4_NL (IQ4_NL's block is Q4_0's: f16 d, 16 bytes of nibbles)
        hdr = 4 if type_name == "Q4_1" else 2
        qs = b[..., hdr:].reshape(tiles, TILE, nb, 4, 4).permute(0, 2, 3, 1, 4)  # (t, nb, c, r, i)
        parts = [qs.reshape(tiles, nb, 256), b[..., 0:2].permute(0, 2, 1, 3).reshape(tiles, nb, 32)]
        if type_name == "Q4_1":
            parts.append(b[..., 2:4].permute(0, 2, 1, 3).reshape(tiles, nb, 32))
    return torch.cat(parts, dim=-1).reshape(-1).contiguous()


def unpack(packed: torch.Tensor, type_name: str, rows: int, cols: int) -> torch.Tensor:
    """Inverse of `pack`: the original GGUF bytes (rows, cols/block*size)."""
    nb, gb, tb = cols // BLOCK_COLS[type_name], GGUF_BLOCK_BYTES[type_name], TILE_BLOCK_BYTES[type_name]
    tiles = -(-rows // TILE)
    p = packed.reshape(tiles, nb, tb)
    if type_name in K_TYPES:
        return _unpack_k(p, type_name, tiles, nb).reshape(tiles * TILE, nb * gb)[:rows].contiguous()
    if type_name in Q5_TYPES:
        qs = p[..., :256].reshape(tiles, nb, 4, TILE, 4).permute(0, 3, 1, 2, 4).reshape(tiles, TILE, nb, 16)
        qh = _fifth_bit_rows(p[..., 256:320], tiles, nb).reshape(tiles, TILE, nb, 4)
        hdr = [p[..., o:o + 32].reshape(tiles, nb, TILE, 2).permute(0, 2, 1, 3)
               for o in ((320,) if type_name == "Q5_0" else (320, 352))]
        out = torch.cat([*hdr, qh, qs], dim=-1)
    elif type_name == "Q8_0":
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
    nb, tb = cols // BLOCK_COLS[type_name], TILE_BLOCK_BYTES[type_name]
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


def quantize_activations_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x float32 (T, K) contiguous, K a multiple of 256 -> llama.cpp's q8_K: (codes int8 (T, K), d float32
    (T, K/256), sums of 16 codes int16 (T, K/16))."""
    lib = _load()
    if lib is None:
        raise KernelError(f"CPU kernels unavailable: {_error}")
    T, K = x.shape
    if K % QK_K:
        raise KernelError(f"input width {K} is not a multiple of {QK_K} (q8_K)")
    qa = torch.empty(T, K, dtype=torch.int8)
    d = torch.empty(T, K // QK_K, dtype=torch.float32)
    bs = torch.empty(T, K // 16, dtype=torch.int16)
    lib.pl_quantize_act_k(x.data_ptr(), T, K, qa.data_ptr(), d.data_ptr(), bs.data_ptr())
    return qa, d, bs


def gemm(packed: torch.Tensor, type_name: str, rows: int, x: torch.Tensor, *, scalar: bool = False) -> torch.Tensor:
    """x (T, K) float -> x @ W.T (T, rows) float32, W in tile layout. `scalar` forces the plain-C path."""
    lib = _load()
    if lib is None:
        raise KernelError(f"CPU kernels unavailable: {_error}")
    x = x.to(torch.float32).contiguous()
    T, K = x.shape
    block = BLOCK_COLS[type_name]
    if K % block:
        raise KernelError(f"input width {K} is not a multiple of {block} ({type_name})")
    tiles = -(-rows // TILE)
    if packed.numel() != tiles * (K // block) * TILE_BLOCK_BYTES[type_name]:
        raise KernelError(f"packed {type_name} weight of {packed.numel()} bytes does not hold ({rows}, {K})")
    if type_name in K_TYPES:
        qa, da, sa_i = quantize_activations_k(x)  # sa_i: the int16 block sums
        sa_f = da
    else:
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
