#pragma once
/// \file
/// Dequantization of ggml tensor bytes to float32, bit-exact with ggml's reference (scalar) block
/// formulas: F32, F16, BF16, F64, I8..I64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K,
/// Q6_K, IQ4_NL, IQ4_XS. Other known types are a `format_error` that names the type. Bytes are read
/// as little-endian one by one, so neither host byte order nor data alignment matters. Pure C++20.
///
/// Example:
/// \code
///   std::vector<float> out(4096);
///   distorch::ggml_dequantize(distorch::ggml_type::q4_k, bytes, out, "blk.0.attn_q.weight");
///   distorch::fp16_to_fp32(0x3c00);   // 1.0f
/// \endcode

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>

#include "distorch/core/error.hpp"
#include "distorch/io/ggml_types.hpp"

namespace distorch::inline v0 {

/// IEEE half (binary16) bits to float, exactly: subnormals are normalized, infinities kept, and a
/// NaN keeps its sign and payload with the quiet bit set, as the F16C and Arm conversions do.
/// \code distorch::fp16_to_fp32(0x0001);   // 2^-24, the smallest subnormal \endcode
constexpr float fp16_to_fp32(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  std::uint32_t mantissa = h & 0x3ffu;
  std::uint32_t bits = 0;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {
      // Subnormal half: shift the mantissa up to an implicit leading one; every half subnormal is
      // a normal float.
      std::uint32_t e = 127 - 15 + 1;
      while ((mantissa & 0x400u) == 0) {
        mantissa <<= 1;
        --e;
      }
      bits = sign | (e << 23) | ((mantissa & 0x3ffu) << 13);
    }
  } else if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13) | (mantissa != 0 ? 0x00400000u : 0u);
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  return std::bit_cast<float>(bits);
}

/// bfloat16 bits to float: the upper half of a float, so exact for every value.
/// \code distorch::bf16_to_fp32(0x3f80);   // 1.0f \endcode
constexpr float bf16_to_fp32(std::uint16_t h) noexcept { return std::bit_cast<float>(static_cast<std::uint32_t>(h) << 16); }

/// True when `ggml_dequantize` converts this type.
/// \code distorch::ggml_can_dequantize(distorch::ggml_type::iq2_xxs);   // false \endcode
constexpr bool ggml_can_dequantize(ggml_type t) noexcept {
  switch (t) {
    case ggml_type::f32: case ggml_type::f16: case ggml_type::bf16: case ggml_type::f64:
    case ggml_type::i8: case ggml_type::i16: case ggml_type::i32: case ggml_type::i64:
    case ggml_type::q4_0: case ggml_type::q4_1: case ggml_type::q5_0: case ggml_type::q5_1: case ggml_type::q8_0:
    case ggml_type::q2_k: case ggml_type::q3_k: case ggml_type::q4_k: case ggml_type::q5_k: case ggml_type::q6_k:
    case ggml_type::iq4_nl: case ggml_type::iq4_xs:
      return true;
    default:
      return false;
  }
}

namespace detail {

inline std::uint16_t load_u16le(const std::uint8_t* p) noexcept {
  return static_cast<std::uint16_t>(p[0] | (p[1] << 8));
}
inline std::uint32_t load_u32le(const std::uint8_t* p) noexcept {
  return static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) |
         (static_cast<std::uint32_t>(p[2]) << 16) | (static_cast<std::uint32_t>(p[3]) << 24);
}
inline std::uint64_t load_u64le(const std::uint8_t* p) noexcept {
  return static_cast<std::uint64_t>(load_u32le(p)) | (static_cast<std::uint64_t>(load_u32le(p + 4)) << 32);
}
inline float load_fp16(const std::uint8_t* p) noexcept { return fp16_to_fp32(load_u16le(p)); }

// The non-uniform 4-bit code book shared by IQ4_NL and IQ4_XS.
inline constexpr std::int8_t iq4nl_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                                 1,    13,   25,  38,  53,  69,  89,  113};

// Each block function reads one block at `b` and writes its elements to `y`. The arithmetic is
// ggml's reference code, operation by operation, so the float results are the same bits.

inline void dequant_q4_0(const std::uint8_t* b, float* y) noexcept {  // d, qs[16]
  const float d = load_fp16(b);
  const std::uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    const int x0 = (qs[j] & 0x0f) - 8;
    const int x1 = (qs[j] >> 4) - 8;
    y[j] = static_cast<float>(x0) * d;
    y[j + 16] = static_cast<float>(x1) * d;
  }
}

inline void dequant_q4_1(const std::uint8_t* b, float* y) noexcept {  // d, m, qs[16]
  const float d = load_fp16(b);
  const float m = load_fp16(b + 2);
  const std::uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    const int x0 = qs[j] & 0x0f;
    const int x1 = qs[j] >> 4;
    y[j] = static_cast<float>(x0) * d + m;
    y[j + 16] = static_cast<float>(x1) * d + m;
  }
}

inline void dequant_q5_0(const std::uint8_t* b, float* y) noexcept {  // d, qh[4], qs[16]
  const float d = load_fp16(b);
  const std::uint32_t qh = load_u32le(b + 2);
  const std::uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const std::uint32_t xh0 = ((qh >> j) << 4) & 0x10u;
    const std::uint32_t xh1 = (qh >> (j + 12)) & 0x10u;
    const int x0 = static_cast<int>((qs[j] & 0x0fu) | xh0) - 16;
    const int x1 = static_cast<int>((qs[j] >> 4) | xh1) - 16;
    y[j] = static_cast<float>(x0) * d;
    y[j + 16] = static_cast<float>(x1) * d;
  }
}

inline void dequant_q5_1(const std::uint8_t* b, float* y) noexcept {  // d, m, qh[4], qs[16]
  const float d = load_fp16(b);
  const float m = load_fp16(b + 2);
  const std::uint32_t qh = load_u32le(b + 4);
  const std::uint8_t* qs = b + 8;
  for (int j = 0; j < 16; ++j) {
    const std::uint32_t xh0 = ((qh >> j) << 4) & 0x10u;
    const std::uint32_t xh1 = (qh >> (j + 12)) & 0x10u;
    const int x0 = static_cast<int>((qs[j] & 0x0fu) | xh0);
    const int x1 = static_cast<int>((qs[j] >> 4) | xh1);
    y[j] = static_cast<float>(x0) * d + m;
    y[j + 16] = static_cast<float>(x1) * d + m;
  }
}

inline void dequant_q8_0(const std::uint8_t* b, float* y) noexcept {  // d, qs[32] signed
  const float d = load_fp16(b);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(static_cast<std::int8_t>(b[2 + j])) * d;
}

inline void dequant_q2_k(const std::uint8_t* b, float* y) noexcept {  // scales[16], qs[64], d, dmin
  const std::uint8_t* scales = b;
  const std::uint8_t* q = b + 16;
  const float d = load_fp16(b + 80);
  const float dmin = load_fp16(b + 82);
  int is = 0;
  for (int n = 0; n < 256; n += 128) {
    int shift = 0;
    for (int j = 0; j < 4; ++j) {
      std::uint8_t sc = scales[is++];
      float dl = d * static_cast<float>(sc & 0xf);
      float ml = dmin * static_cast<float>(sc >> 4);
      for (int l = 0; l < 16; ++l) *y++ = dl * static_cast<float>((q[l] >> shift) & 3) - ml;
      sc = scales[is++];
      dl = d * static_cast<float>(sc & 0xf);
      ml = dmin * static_cast<float>(sc >> 4);
      for (int l = 0; l < 16; ++l) *y++ = dl * static_cast<float>((q[l + 16] >> shift) & 3) - ml;
      shift += 2;
    }
    q += 32;
  }
}

inline void dequant_q3_k(const std::uint8_t* b, float* y) noexcept {  // hmask[32], qs[64], scales[12], d
  const std::uint8_t* hm = b;
  const std::uint8_t* q = b + 32;
  const std::uint8_t* packed = b + 96;
  const float d_all = load_fp16(b + 108);
  // Sixteen 6-bit scales: low nibbles in bytes 0..7, high bit pairs in bytes 8..11.
  std::int8_t scales[16];
  for (int j = 0; j < 16; ++j) {
    const int low = j < 8 ? (packed[j] & 0xf) : (packed[j - 8] >> 4);
    const int high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
    scales[j] = static_cast<std::int8_t>(low | (high << 4));
  }
  int is = 0;
  std::uint8_t m = 1;
  for (int n = 0; n < 256; n += 128) {
    int shift = 0;
    for (int j = 0; j < 4; ++j) {
      float dl = d_all * static_cast<float>(scales[is++] - 32);
      for (int l = 0; l < 16; ++l)
        *y++ = dl * static_cast<float>(((q[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4));
      dl = d_all * static_cast<float>(scales[is++] - 32);
      for (int l = 0; l < 16; ++l)
        *y++ = dl * static_cast<float>(((q[l + 16] >> shift) & 3) - ((hm[l + 16] & m) ? 0 : 4));
      shift += 2;
      m = static_cast<std::uint8_t>(m << 1);
    }
    q += 32;
  }
}

// The packed 6-bit scale and min of sub-block j of Q4_K and Q5_K.
inline void k4_scale_min(int j, const std::uint8_t* q, std::uint8_t& scale, std::uint8_t& min) noexcept {
  if (j < 4) {
    scale = q[j] & 63;
    min = q[j + 4] & 63;
  } else {
    scale = static_cast<std::uint8_t>((q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4));
    min = static_cast<std::uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// Q4_K and Q5_K walk their 256 values in four runs of 64: in run i the low nibbles of 32 bytes use
// sub-block 2i and the high nibbles sub-block 2i + 1. Both formats scale a sub-block alike.
struct k4_sub_block_pair {
  float d_low, min_low, d_high, min_high;
};

inline k4_sub_block_pair k4_scales_of_pair(int pair, const std::uint8_t* scales, float d, float dmin) noexcept {
  std::uint8_t sc = 0, m = 0;
  k4_sub_block_pair p{};
  k4_scale_min(2 * pair, scales, sc, m);
  p.d_low = d * static_cast<float>(sc);
  p.min_low = dmin * static_cast<float>(m);
  k4_scale_min(2 * pair + 1, scales, sc, m);
  p.d_high = d * static_cast<float>(sc);
  p.min_high = dmin * static_cast<float>(m);
  return p;
}

inline void dequant_q4_k(const std::uint8_t* b, float* y) noexcept {  // d, dmin, scales[12], qs[128]
  const float d = load_fp16(b);
  const float dmin = load_fp16(b + 2);
  const std::uint8_t* scales = b + 4;
  const std::uint8_t* q = b + 16;
  for (int pair = 0; pair < 4; ++pair) {
    const auto s = k4_scales_of_pair(pair, scales, d, dmin);
    for (int l = 0; l < 32; ++l) *y++ = s.d_low * static_cast<float>(q[l] & 0xf) - s.min_low;
    for (int l = 0; l < 32; ++l) *y++ = s.d_high * static_cast<float>(q[l] >> 4) - s.min_high;
    q += 32;
  }
}

inline void dequant_q5_k(const std::uint8_t* b, float* y) noexcept {  // d, dmin, scales[12], qh[32], qs[128]
  const float d = load_fp16(b);
  const float dmin = load_fp16(b + 2);
  const std::uint8_t* scales = b + 4;
  const std::uint8_t* qh = b + 16;
  const std::uint8_t* ql = b + 48;
  std::uint8_t u1 = 1, u2 = 2;
  for (int pair = 0; pair < 4; ++pair) {
    const auto s = k4_scales_of_pair(pair, scales, d, dmin);
    for (int l = 0; l < 32; ++l) *y++ = s.d_low * static_cast<float>((ql[l] & 0xf) + ((qh[l] & u1) ? 16 : 0)) - s.min_low;
    for (int l = 0; l < 32; ++l) *y++ = s.d_high * static_cast<float>((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - s.min_high;
    ql += 32;
    u1 = static_cast<std::uint8_t>(u1 << 2);
    u2 = static_cast<std::uint8_t>(u2 << 2);
  }
}

inline void dequant_q6_k(const std::uint8_t* b, float* y) noexcept {  // ql[128], qh[64], scales[16] signed, d
  const std::uint8_t* ql = b;
  const std::uint8_t* qh = b + 128;
  const std::uint8_t* sc_bytes = b + 192;
  const float d = load_fp16(b + 208);
  for (int n = 0; n < 256; n += 128) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = static_cast<int>((ql[l] & 0xf) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = static_cast<int>((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = static_cast<int>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = static_cast<int>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      const auto sc = [&](int k) { return static_cast<float>(static_cast<std::int8_t>(sc_bytes[k])); };
      y[l] = d * sc(is + 0) * static_cast<float>(q1);
      y[l + 32] = d * sc(is + 2) * static_cast<float>(q2);
      y[l + 64] = d * sc(is + 4) * static_cast<float>(q3);
      y[l + 96] = d * sc(is + 6) * static_cast<float>(q4);
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc_bytes += 8;
  }
}

inline void dequant_iq4_nl(const std::uint8_t* b, float* y) noexcept {  // d, qs[16]
  const float d = load_fp16(b);
  const std::uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>(iq4nl_values[qs[j] & 0xf]);
    y[j + 16] = d * static_cast<float>(iq4nl_values[qs[j] >> 4]);
  }
}

inline void dequant_iq4_xs(const std::uint8_t* b, float* y) noexcept {  // d, scales_h, scales_l[4], qs[128]
  const float d = load_fp16(b);
  const std::uint16_t scales_h = load_u16le(b + 2);
  const std::uint8_t* scales_l = b + 4;
  const std::uint8_t* qs = b + 8;
  for (int ib = 0; ib < 8; ++ib) {
    const int ls = ((scales_l[ib / 2] >> (4 * (ib % 2))) & 0xf) | (((scales_h >> (2 * ib)) & 3) << 4);
    const float dl = d * static_cast<float>(ls - 32);
    for (int j = 0; j < 16; ++j) {
      y[j] = dl * static_cast<float>(iq4nl_values[qs[j] & 0xf]);
      y[j + 16] = dl * static_cast<float>(iq4nl_values[qs[j] >> 4]);
    }
    y += 32;
    qs += 16;
  }
}

template <void (*Block)(const std::uint8_t*, float*) noexcept>
void dequant_blocks(const std::uint8_t* src, float* dst, std::size_t blocks, std::size_t block_bytes,
                    std::size_t block_elements) noexcept {
  for (std::size_t i = 0; i < blocks; ++i) Block(src + i * block_bytes, dst + i * block_elements);
}

}  // namespace detail

/// Converts `dst.size()` elements of type `type` from `src` to float32. `src` must hold exactly
/// those elements: a whole number of blocks, `ggml_row_bytes(type, dst.size())` bytes. Throws
/// `format_error` naming `subject` (the tensor) when the sizes disagree or when the type has no
/// conversion here (the other quantized types: keep their bytes with a quantized load).
/// \code
///   std::vector<float> out(n);
///   distorch::ggml_dequantize(info.type, bytes_of_tensor, out, info.name);
/// \endcode
inline void ggml_dequantize(ggml_type type, std::span<const std::byte> src, std::span<float> dst,
                            std::string_view subject = {}) {
  const auto& traits = ggml_traits(type);
  if (!ggml_can_dequantize(type))
    throw format_error({"dequantizing GGUF tensor", std::string(subject), std::nullopt,
                        "ggml type " + std::string(traits.name) + " has no float32 conversion in distorch",
                        "load it quantized (its bytes and type) for a runtime that understands " +
                            std::string(traits.name) + ", or requantize the file to Q8_0, Q*_K or F16"});
  const auto bytes = ggml_row_bytes(type, dst.size());
  if (!bytes || *bytes != src.size())
    throw format_error({"dequantizing GGUF tensor", std::string(subject), std::nullopt,
                        std::to_string(src.size()) + " bytes of " + std::string(traits.name) + " do not hold exactly " +
                            std::to_string(dst.size()) + " elements (blocks of " +
                            std::to_string(traits.block_elements) + " elements in " +
                            std::to_string(traits.block_bytes) + " bytes)",
                        "pass the tensor's own bytes and element count"});
  const auto* s = reinterpret_cast<const std::uint8_t*>(src.data());
  float* y = dst.data();
  const std::size_t n = dst.size();
  const std::size_t blocks = n / traits.block_elements;
  const std::size_t bb = traits.block_bytes, be = traits.block_elements;
  switch (type) {
    case ggml_type::f32:
      for (std::size_t i = 0; i < n; ++i) y[i] = std::bit_cast<float>(detail::load_u32le(s + 4 * i));
      return;
    case ggml_type::f16:
      for (std::size_t i = 0; i < n; ++i) y[i] = fp16_to_fp32(detail::load_u16le(s + 2 * i));
      return;
    case ggml_type::bf16:
      for (std::size_t i = 0; i < n; ++i) y[i] = bf16_to_fp32(detail::load_u16le(s + 2 * i));
      return;
    case ggml_type::f64:
      for (std::size_t i = 0; i < n; ++i) y[i] = static_cast<float>(std::bit_cast<double>(detail::load_u64le(s + 8 * i)));
      return;
    case ggml_type::i8:
      for (std::size_t i = 0; i < n; ++i) y[i] = static_cast<float>(static_cast<std::int8_t>(s[i]));
      return;
    case ggml_type::i16:
      for (std::size_t i = 0; i < n; ++i) y[i] = static_cast<float>(static_cast<std::int16_t>(detail::load_u16le(s + 2 * i)));
      return;
    case ggml_type::i32:
      for (std::size_t i = 0; i < n; ++i) y[i] = static_cast<float>(static_cast<std::int32_t>(detail::load_u32le(s + 4 * i)));
      return;
    case ggml_type::i64:
      for (std::size_t i = 0; i < n; ++i) y[i] = static_cast<float>(static_cast<std::int64_t>(detail::load_u64le(s + 8 * i)));
      return;
    case ggml_type::q4_0: return detail::dequant_blocks<detail::dequant_q4_0>(s, y, blocks, bb, be);
    case ggml_type::q4_1: return detail::dequant_blocks<detail::dequant_q4_1>(s, y, blocks, bb, be);
    case ggml_type::q5_0: return detail::dequant_blocks<detail::dequant_q5_0>(s, y, blocks, bb, be);
    case ggml_type::q5_1: return detail::dequant_blocks<detail::dequant_q5_1>(s, y, blocks, bb, be);
    case ggml_type::q8_0: return detail::dequant_blocks<detail::dequant_q8_0>(s, y, blocks, bb, be);
    case ggml_type::q2_k: return detail::dequant_blocks<detail::dequant_q2_k>(s, y, blocks, bb, be);
    case ggml_type::q3_k: return detail::dequant_blocks<detail::dequant_q3_k>(s, y, blocks, bb, be);
    case ggml_type::q4_k: return detail::dequant_blocks<detail::dequant_q4_k>(s, y, blocks, bb, be);
    case ggml_type::q5_k: return detail::dequant_blocks<detail::dequant_q5_k>(s, y, blocks, bb, be);
    case ggml_type::q6_k: return detail::dequant_blocks<detail::dequant_q6_k>(s, y, blocks, bb, be);
    case ggml_type::iq4_nl: return detail::dequant_blocks<detail::dequant_iq4_nl>(s, y, blocks, bb, be);
    case ggml_type::iq4_xs: return detail::dequant_blocks<detail::dequant_iq4_xs>(s, y, blocks, bb, be);
    default: return;  // unreachable: ggml_can_dequantize listed every type handled above
  }
}

}  // namespace distorch::inline v0
