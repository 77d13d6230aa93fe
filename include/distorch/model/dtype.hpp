#pragma once
/// \file
/// `dtype`: element types of stored tensors, independent of LibTorch so that file parsers and the
/// planner can use them. model/torch_dtype.hpp maps them to `at::ScalarType` where one exists.
///
/// Example:
/// \code
///   distorch::dtype_size(distorch::dtype::bf16);   // 2
///   distorch::dtype_name(distorch::dtype::f32);    // "float32"
/// \endcode

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>

namespace distorch::inline v0 {

/// Element types. `f8_*`, `u16`..`u64` and the sub-byte float kinds exist in files but have no
/// LibTorch 1.13 dtype; `opaque` marks block-quantized data (GGUF) whose bytes are not
/// numel × size.
enum class dtype : std::uint8_t {
  f64, f32, f16, bf16, i64, i32, i16, i8, u8, boolean,
  u16, u32, u64, f8_e4m3, f8_e5m2, f8_e8m0, c64, c128,
  opaque,
};

inline constexpr std::array<std::string_view, 19> detail_dtype_names{
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "complex64", "complex128",
    "opaque"};

/// PyTorch-style name: "float32", "bfloat16", ...
constexpr std::string_view dtype_name(dtype t) noexcept { return detail_dtype_names[static_cast<std::size_t>(t)]; }

/// Bytes per element; 0 for `opaque`.
constexpr std::size_t dtype_size(dtype t) noexcept {
  switch (t) {
    case dtype::f64: case dtype::i64: case dtype::u64: case dtype::c64: return 8;
    case dtype::c128: return 16;
    case dtype::f32: case dtype::i32: case dtype::u32: return 4;
    case dtype::f16: case dtype::bf16: case dtype::i16: case dtype::u16: return 2;
    case dtype::i8: case dtype::u8: case dtype::boolean: case dtype::f8_e4m3: case dtype::f8_e5m2: case dtype::f8_e8m0: return 1;
    case dtype::opaque: return 0;
  }
  return 0;
}

/// Inverse of `dtype_name`.
constexpr std::optional<dtype> dtype_from_name(std::string_view name) noexcept {
  for (std::size_t i = 0; i < detail_dtype_names.size(); ++i)
    if (detail_dtype_names[i] == name) return static_cast<dtype>(i);
  return std::nullopt;
}

/// True for floating-point dtypes (the ones LoRA patches merge into).
/// \code distorch::is_floating(distorch::dtype::bf16);   // true \endcode
constexpr bool is_floating(dtype t) noexcept {
  return t == dtype::f64 || t == dtype::f32 || t == dtype::f16 || t == dtype::bf16 || t == dtype::f8_e4m3 ||
         t == dtype::f8_e5m2 || t == dtype::f8_e8m0;
}

}  // namespace distorch::inline v0
