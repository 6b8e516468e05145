// Storage dtypes shared by the CPU and CUDA kernels (no torch headers): the dtype codes the
// bindings pass in, 16-bit storage types, branch-free float conversions (vectorisable on the
// CPU, plain integer code on the GPU), and one dispatch macro.
//
// Conversions match PyTorch bit for bit: float -> bfloat16 and float -> half round to nearest
// even; NaN maps to a quiet NaN.
#pragma once
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define CKPTREG_HDI __host__ __device__ __forceinline__
#else
#define CKPTREG_HDI inline
#endif

namespace ckptreg {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

struct half_t { uint16_t x; };
struct bf16_t { uint16_t x; };

CKPTREG_HDI uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; memcpy(&u, &f, 4); return u;
#endif
}
CKPTREG_HDI float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; memcpy(&f, &u, 4); return f;
#endif
}

// bfloat16 -> float: the 16 bits are the top half of the float.
CKPTREG_HDI float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

// float -> bfloat16, round to nearest even, NaN -> 0x7FC0 (as c10::BFloat16).
CKPTREG_HDI uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return nan ? (uint16_t)0x7FC0 : (uint16_t)rounded;
}

// half -> float, exact, branch free (selects only).
CKPTREG_HDI float f16_to_f32(uint16_t h) {
  const uint32_t shifted_exp = 0x7C00u << 13;
  uint32_t o = ((uint32_t)h & 0x7FFFu) << 13;  // exponent/mantissa bits
  uint32_t exp = shifted_exp & o;
  o += (uint32_t)(127 - 15) << 23;                    // exponent adjust
  uint32_t o_inf = o + ((uint32_t)(128 - 16) << 23);  // Inf/NaN
  // zero / subnormal: renormalise through a float subtraction
  float sub = bits_f32(o + (1u << 23)) - bits_f32(113u << 23);
  uint32_t o_sub = f32_bits(sub);
  o = (exp == shifted_exp) ? o_inf : ((exp == 0) ? o_sub : o);
  o |= ((uint32_t)h & 0x8000u) << 16;
  return bits_f32(o);
}

// float -> half, round to nearest even, overflow -> inf, NaN -> 0x7E00 (sign kept).
CKPTREG_HDI uint16_t f32_to_f16(float f) {
  const uint32_t f32infty = 255u << 23;
  const uint32_t f16max = (127u + 16u) << 23;
  const uint32_t denorm_magic_bits = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t x = f32_bits(f);
  uint32_t sign = x & 0x80000000u;
  x ^= sign;
  uint32_t o_big = (x > f32infty) ? 0x7E00u : 0x7C00u;
  float dm = bits_f32(denorm_magic_bits);
  uint32_t o_den = f32_bits(bits_f32(x) + dm) - denorm_magic_bits;
  uint32_t mant_odd = (x >> 13) & 1u;
  uint32_t o_norm = (x + ((uint32_t)(15 - 127) << 23) + 0xFFFu + mant_odd) >> 13;
  uint32_t o = (x >= f16max) ? o_big : ((x < (113u << 23)) ? o_den : o_norm);
  return (uint16_t)((o & 0xFFFFu) | (sign >> 16));
}

// load<T>(p) -> accumulation type, store(p, v)
template <typename T> struct Conv;
template <> struct Conv<float> {
  typedef float acc;
  static CKPTREG_HDI float load(float v) { return v; }
  static CKPTREG_HDI float from(float v) { return v; }
  static CKPTREG_HDI float from(double v) { return (float)v; }
};
template <> struct Conv<double> {
  typedef double acc;
  static CKPTREG_HDI double load(double v) { return v; }
  static CKPTREG_HDI double from(float v) { return (double)v; }
  static CKPTREG_HDI double from(double v) { return v; }
};
template <> struct Conv<half_t> {
  typedef float acc;
  static CKPTREG_HDI float load(half_t v) { return f16_to_f32(v.x); }
  static CKPTREG_HDI half_t from(float v) { half_t h; h.x = f32_to_f16(v); return h; }
  static CKPTREG_HDI half_t from(double v) { half_t h; h.x = f32_to_f16((float)v); return h; }
};
template <> struct Conv<bf16_t> {
  typedef float acc;
  static CKPTREG_HDI float load(bf16_t v) { return bf16_to_f32(v.x); }
  static CKPTREG_HDI bf16_t from(float v) { bf16_t h; h.x = f32_to_bf16(v); return h; }
  static CKPTREG_HDI bf16_t from(double v) { bf16_t h; h.x = f32_to_bf16((float)v); return h; }
};

}  // namespace ckptreg

// CKPTREG_DISPATCH(code, T, ...): run the statement list with T bound to the storage type of a
// ckptreg::DType code. The caller handles an unknown code (the macro falls through).
#define CKPTREG_DISPATCH(code, T, ...)                          \
  switch ((int)(code)) {                                        \
    case ::ckptreg::kF32: { typedef float T; __VA_ARGS__; break; }          \
    case ::ckptreg::kF16: { typedef ::ckptreg::half_t T; __VA_ARGS__; break; } \
    case ::ckptreg::kBF16: { typedef ::ckptreg::bf16_t T; __VA_ARGS__; break; } \
    case ::ckptreg::kF64: { typedef double T; __VA_ARGS__; break; }         \
    default: break;                                             \
  }
