// Tests of model/torch_dtype.hpp. The expected scalar types and element sizes are written out here.
#include "distorch/model/torch_dtype.hpp"

#include <doctest/doctest.h>

using distorch::dtype;

TEST_CASE("torch_dtype: every dtype LibTorch 1.13 has maps both ways") {
  struct row { dtype d; at::ScalarType t; std::size_t size; };
  const row table[] = {
      {dtype::f64, at::ScalarType::Double, 8},        {dtype::f32, at::ScalarType::Float, 4},
      {dtype::f16, at::ScalarType::Half, 2},          {dtype::bf16, at::ScalarType::BFloat16, 2},
      {dtype::i64, at::ScalarType::Long, 8},          {dtype::i32, at::ScalarType::Int, 4},
      {dtype::i16, at::ScalarType::Short, 2},         {dtype::i8, at::ScalarType::Char, 1},
      {dtype::u8, at::ScalarType::Byte, 1},           {dtype::boolean, at::ScalarType::Bool, 1},
      {dtype::c64, at::ScalarType::ComplexFloat, 8},  {dtype::c128, at::ScalarType::ComplexDouble, 16},
  };
  for (const auto& r : table) {
    CAPTURE(distorch::dtype_name(r.d));
    CHECK((distorch::to_scalar_type(r.d) == r.t));
    CHECK(distorch::from_scalar_type(r.t) == r.d);
    CHECK(c10::elementSize(r.t) == r.size);
    CHECK(distorch::dtype_size(r.d) == r.size);
  }
}

TEST_CASE("torch_dtype: float8 needs LibTorch 2.1") {
#if defined(DISTORCH_TORCH_HAS_FLOAT8)
  CHECK((distorch::to_scalar_type(dtype::f8_e4m3) == at::ScalarType::Float8_e4m3fn));
  CHECK(distorch::from_scalar_type(at::ScalarType::Float8_e5m2) == dtype::f8_e5m2);
#else
  for (dtype d : {dtype::f8_e4m3, dtype::f8_e5m2}) {
    try {
      (void)distorch::to_scalar_type(d);
      FAIL("expected format_error");
    } catch (const distorch::format_error& e) {
      CHECK(e.info().subject == std::string(distorch::dtype_name(d)));
      CHECK(std::string(e.what()).find("2.1") != std::string::npos);
    }
  }
#endif
}

TEST_CASE("torch_dtype: float8_e8m0fnu needs LibTorch 2.7") {
#if defined(DISTORCH_TORCH_HAS_FLOAT8_E8M0)
  CHECK((distorch::to_scalar_type(dtype::f8_e8m0) == at::ScalarType::Float8_e8m0fnu));
#else
  CHECK_THROWS_AS((void)distorch::to_scalar_type(dtype::f8_e8m0), distorch::format_error);
#endif
}

TEST_CASE("torch_dtype: uint16/32/64 need LibTorch 2.3") {
#if defined(DISTORCH_TORCH_HAS_WIDE_UNSIGNED)
  CHECK((distorch::to_scalar_type(dtype::u32) == at::ScalarType::UInt32));
  CHECK(distorch::from_scalar_type(at::ScalarType::UInt64) == dtype::u64);
#else
  for (dtype d : {dtype::u16, dtype::u32, dtype::u64}) CHECK_THROWS_AS((void)distorch::to_scalar_type(d), distorch::format_error);
#endif
}

TEST_CASE("torch_dtype: block-quantized data has no scalar type") {
  try {
    (void)distorch::to_scalar_type(dtype::opaque);
    FAIL("expected format_error");
  } catch (const distorch::format_error& e) {
    CHECK(e.info().subject == "opaque");
    CHECK(e.info().fix.find("dequantize") != std::string::npos);
  }
}

TEST_CASE("torch_dtype: scalar types no weight file stores are rejected") {
  for (auto t : {at::ScalarType::QInt8, at::ScalarType::QUInt8, at::ScalarType::ComplexHalf, at::ScalarType::QInt32}) {
    CAPTURE(c10::toString(t));
    CHECK_THROWS_AS((void)distorch::from_scalar_type(t), distorch::format_error);
  }
}
