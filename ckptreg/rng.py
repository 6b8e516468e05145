"""Counter-based random numbers for DARE masks.

The mask of an element depends only on (seed, tensor name, checkpoint index, element index), so
the same seed gives the same mask on every backend (Python fallback, C++/OpenMP, CUDA), thread
count and chunk size. This module is the specification; the compiled kernels reproduce it bit
for bit (see csrc/common/rng.h).

Definition (all arithmetic modulo 2**64, ``>>`` a logical shift):

    mix(z)      = z ^= z >> 30; z *= M1; z ^= z >> 27; z *= M2; z ^= z >> 31   (splitmix64 finaliser)
    fnv1a64(s)  = FNV-1a 64-bit hash of the UTF-8 bytes of the tensor name
    key         = mix(mix(seed ^ fnv1a64(name)) + (index + 1) * GAMMA)
    r_j         = mix(key + (j + 1) * GAMMA) >> 40               (24 random bits for element j)
    keep_j      = r_j < threshold24(density),  threshold24(d) = floor(d * 2**24)

``density`` = 1 keeps every element. Comparing integers (not floats) keeps backends identical.
"""
from __future__ import annotations

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
M1 = 0xBF58476D1CE4E5B9
M2 = 0x94D049BB133111EB
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def _mix_int(z: int) -> int:
    z &= MASK64
    z ^= z >> 30
    z = (z * M1) & MASK64
    z ^= z >> 27
    z = (z * M2) & MASK64
    z ^= z >> 31
    return z


def fnv1a64(name: str) -> int:
    h = FNV_OFFSET
    for b in name.encode("utf-8"):
        h ^= b
        h = (h * FNV_PRIME) & MASK64
    return h


def dare_key(seed: int, name: str, index: int) -> int:
    """The 64-bit stream key of one (seed, tensor, checkpoint) triple, as an unsigned int."""
    k = _mix_int((seed & MASK64) ^ fnv1a64(name))
    return _mix_int(k + ((index + 1) * GAMMA & MASK64))


def threshold24(density: float) -> int:
    """Integer keep threshold for a density in (0, 1]: keep iff r < threshold24."""
    if not (0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density}")
    return int(density * (1 << 24))


def keep_scalar(key: int, j: int, thr: int) -> bool:
    """Pure-integer reference for one element (used by tests)."""
    return (_mix_int(key + ((j + 1) * GAMMA & MASK64)) >> 40) < thr


def signed64(u: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits (for torch/C++ int64 args)."""
    u &= MASK64
    return u - (1 << 64) if u >= (1 << 63) else u


def keep_mask(key: int, start: int, count: int, density: float, device=None):
    """Bool tensor: keep_j for j in [start, start + count). Torch int64 arithmetic wraps modulo
    2**64, which is exactly what the definition needs; logical shifts are masked arithmetic ones."""
    import torch

    j = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=device)
    z = j * signed64(GAMMA) + signed64(key)
    z = _mix_tensor(z)
    r = (z >> 40) & ((1 << 24) - 1)
    return r < threshold24(density)


def _mix_tensor(z):
    z = z ^ ((z >> 30) & ((1 << 34) - 1))
    z = z * signed64(M1)
    z = z ^ ((z >> 27) & ((1 << 37) - 1))
    z = z * signed64(M2)
    z = z ^ ((z >> 31) & ((1 << 33) - 1))
    return z
