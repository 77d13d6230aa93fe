#pragma once
/// \file
/// `distorch::dtype` ↔ `at::ScalarType`. Files hold element types that older LibTorch lacks
/// (float8 arrived in 2.1, uint16/32/64 in 2.3, float8_e8m0fnu in 2.7); converting one of those
/// with a LibTorch that lacks it is a `format_error` that names the dtype and the version needed.
/// Block-quantized data (`dtype::opaque`) has no scalar type at all: it must be dequantized first.
///
/// Example:
/// \code
///   at::ScalarType t = distorch::to_scalar_type(distorch::dtype::bf16);   // at::kBFloat16
///   distorch::dtype d = distorch::from_scalar_type(at::kHalf);            // dtype::f16
/// \endcode

#include <string>

#include <c10/core/ScalarType.h>
#include <torch/version.h>

#include "distorch/core/error.hpp"
#include "distorch/model/dtype.hpp"

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)
#define DISTORCH_TORCH_HAS_FLOAT8 1
#endif
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
#define DISTORCH_TORCH_HAS_WIDE_UNSIGNED 1
#endif
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 7)
#define DISTORCH_TORCH_HAS_FLOAT8_E8M0 1
#endif

namespace distorch::inline v0 {

namespace detail {
[[noreturn]] inline void unsupported_dtype(dtype t, std::string problem, std::string fix) {
  throw format_error({"converting dtype to a LibTorch scalar type", std::string(dtype_name(t)), std::nullopt,
                      std::move(problem), std::move(fix)});
}
}  // namespace detail

/// The LibTorch scalar type of a dtype; `format_error` when this LibTorch has none.
/// \code auto options = at::TensorOptions().dtype(distorch::to_scalar_type(record.type)); \endcode
inline at::ScalarType to_scalar_type(dtype t) {
  const std::string running = "this LibTorch is " TORCH_VERSION;
  switch (t) {
    case dtype::f64: return at::ScalarType::Double;
    case dtype::f32: return at::ScalarType::Float;
    case dtype::f16: return at::ScalarType::Half;
    case dtype::bf16: return at::ScalarType::BFloat16;
    case dtype::i64: return at::ScalarType::Long;
    case dtype::i32: return at::ScalarType::Int;
    case dtype::i16: return at::ScalarType::Short;
    case dtype::i8: return at::ScalarType::Char;
    case dtype::u8: return at::ScalarType::Byte;
    case dtype::boolean: return at::ScalarType::Bool;
    case dtype::c64: return at::ScalarType::ComplexFloat;
    case dtype::c128: return at::ScalarType::ComplexDouble;
#if defined(DISTORCH_TORCH_HAS_WIDE_UNSIGNED)
    case dtype::u16: return at::ScalarType::UInt16;
    case dtype::u32: return at::ScalarType::UInt32;
    case dtype::u64: return at::ScalarType::UInt64;
#else
    case dtype::u16:
    case dtype::u32:
    case dtype::u64:
      detail::unsupported_dtype(t, "LibTorch has this dtype only from 2.3; " + running,
                                "build against LibTorch 2.3 or newer, or convert the tensor to a signed type");
#endif
#if defined(DISTORCH_TORCH_HAS_FLOAT8)
    case dtype::f8_e4m3: return at::ScalarType::Float8_e4m3fn;
    case dtype::f8_e5m2: return at::ScalarType::Float8_e5m2;
#else
    case dtype::f8_e4m3:
    case dtype::f8_e5m2:
      detail::unsupported_dtype(t, "LibTorch has float8 dtypes only from 2.1; " + running,
                                "build against LibTorch 2.1 or newer, or convert the weights to float16/bfloat16");
#endif
#if defined(DISTORCH_TORCH_HAS_FLOAT8_E8M0)
    case dtype::f8_e8m0: return at::ScalarType::Float8_e8m0fnu;
#else
    case dtype::f8_e8m0:
      detail::unsupported_dtype(t, "LibTorch has float8_e8m0fnu only from 2.7; " + running,
                                "build against LibTorch 2.7 or newer");
#endif
    case dtype::opaque:
      detail::unsupported_dtype(t, "block-quantized data has no LibTorch scalar type",
                                "dequantize it first (io/ggml_dequant.hpp), or keep it as raw bytes");
  }
  detail::unsupported_dtype(t, "unknown dtype value", "pass a valid distorch::dtype");
}

/// The distorch dtype of a LibTorch scalar type; `format_error` for types no weight file stores
/// (quantized, complex32, bits...).
/// \code auto d = distorch::from_scalar_type(param.scalar_type()); \endcode
inline dtype from_scalar_type(at::ScalarType t) {
  switch (t) {
    case at::ScalarType::Double: return dtype::f64;
    case at::ScalarType::Float: return dtype::f32;
    case at::ScalarType::Half: return dtype::f16;
    case at::ScalarType::BFloat16: return dtype::bf16;
    case at::ScalarType::Long: return dtype::i64;
    case at::ScalarType::Int: return dtype::i32;
    case at::ScalarType::Short: return dtype::i16;
    case at::ScalarType::Char: return dtype::i8;
    case at::ScalarType::Byte: return dtype::u8;
    case at::ScalarType::Bool: return dtype::boolean;
    case at::ScalarType::ComplexFloat: return dtype::c64;
    case at::ScalarType::ComplexDouble: return dtype::c128;
#if defined(DISTORCH_TORCH_HAS_WIDE_UNSIGNED)
    case at::ScalarType::UInt16: return dtype::u16;
    case at::ScalarType::UInt32: return dtype::u32;
    case at::ScalarType::UInt64: return dtype::u64;
#endif
#if defined(DISTORCH_TORCH_HAS_FLOAT8)
    case at::ScalarType::Float8_e4m3fn: return dtype::f8_e4m3;
    case at::ScalarType::Float8_e5m2: return dtype::f8_e5m2;
#endif
#if defined(DISTORCH_TORCH_HAS_FLOAT8_E8M0)
    case at::ScalarType::Float8_e8m0fnu: return dtype::f8_e8m0;
#endif
    default: break;
  }
  throw format_error({"converting a LibTorch scalar type to a distorch dtype", c10::toString(t), std::nullopt,
                      "distorch does not store or place tensors of this scalar type",
                      "convert the tensor to a floating, integer or bool type first"});
}

}  // namespace distorch::inline v0
