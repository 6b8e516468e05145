// Counter-based random numbers for DARE masks: the C++/CUDA twin of ckptreg/rng.py.
//
// The keep decision of element j depends only on the 64-bit stream key (seed, tensor name,
// checkpoint index; computed in Python by rng.dare_key) and the absolute element index j, so
// every backend, thread count and chunking gives the same mask. All arithmetic is modulo 2^64.
//
//   mix(z)  = z ^= z >> 30; z *= M1; z ^= z >> 27; z *= M2; z ^= z >> 31   (splitmix64 finaliser)
//   r_j     = mix(key + (j + 1) * GAMMA) >> 40                            (24 random bits)
//   keep_j  = r_j < threshold24(density),  threshold24(d) = floor(d * 2^24)
//
// Plain C++ (no torch, no STL): usable from host code and from CUDA device code.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define CKPTREG_HD __host__ __device__ __forceinline__
#else
#define CKPTREG_HD inline
#endif

namespace ckptreg {
namespace rng {

constexpr uint64_t GAMMA = 0x9E3779B97F4A7C15ull;
constexpr uint64_t M1 = 0xBF58476D1CE4E5B9ull;
constexpr uint64_t M2 = 0x94D049BB133111EBull;
constexpr uint64_t FNV_OFFSET = 0xCBF29CE484222325ull;
constexpr uint64_t FNV_PRIME = 0x100000001B3ull;

CKPTREG_HD uint64_t mix(uint64_t z) {
  z ^= z >> 30;
  z *= M1;
  z ^= z >> 27;
  z *= M2;
  z ^= z >> 31;
  return z;
}

// FNV-1a 64 of a byte string (the tensor name's UTF-8 bytes).
CKPTREG_HD uint64_t fnv1a64(const char* s, uint64_t len) {
  uint64_t h = FNV_OFFSET;
  for (uint64_t i = 0; i < len; ++i) {
    h ^= (uint64_t)(unsigned char)s[i];
    h *= FNV_PRIME;
  }
  return h;
}

// Stream key of one (seed, tensor name, checkpoint index) triple (== rng.dare_key).
CKPTREG_HD uint64_t dare_key(uint64_t seed, const char* name, uint64_t len, uint64_t index) {
  uint64_t k = mix(seed ^ fnv1a64(name, len));
  return mix(k + (index + 1) * GAMMA);
}

// floor(density * 2^24) for density in (0, 1] (== rng.threshold24).
CKPTREG_HD uint32_t threshold24(double density) {
  return (uint32_t)(density * 16777216.0);
}

// The 24 random bits of element j of the stream `key`.
CKPTREG_HD uint32_t bits24(uint64_t key, uint64_t j) {
  return (uint32_t)(mix(key + (j + 1) * GAMMA) >> 40);
}

CKPTREG_HD bool keep(uint64_t key, uint64_t j, uint32_t thr24) {
  return bits24(key, j) < thr24;
}

}  // namespace rng
}  // namespace ckptreg
