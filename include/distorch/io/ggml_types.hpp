#pragma once
/// \file
/// The ggml tensor type table: every type id a GGUF file can name, with its elements per block
/// and bytes per block. Ids follow ggml.h of llama.cpp (ggml-org) up to Q2_0 = 42. Ids ggml has
/// removed from GGUF files (Q4_2, Q4_3, the Q4_0_x_y and IQ4_NL_x_y repacked layouts) stay in the
/// table by name, so that a file using one gets an error that names it, but they have no sizes.
/// Pure C++20.
///
/// Example:
/// \code
///   const auto* t = distorch::ggml_traits(12);          // Q4_K
///   t->name;             // "Q4_K"
///   t->block_elements;   // 256
///   t->block_bytes;      // 144
///   distorch::ggml_row_bytes(distorch::ggml_type::q8_0, 4096);   // 4352
/// \endcode

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>

#include "distorch/model/dtype.hpp"

namespace distorch::inline v0 {

/// ggml tensor type ids, as stored in GGUF tensor infos.
enum class ggml_type : std::uint32_t {
  f32 = 0, f16 = 1, q4_0 = 2, q4_1 = 3,
  q4_2 = 4, q4_3 = 5,  // removed from ggml
  q5_0 = 6, q5_1 = 7, q8_0 = 8, q8_1 = 9,
  q2_k = 10, q3_k = 11, q4_k = 12, q5_k = 13, q6_k = 14, q8_k = 15,
  iq2_xxs = 16, iq2_xs = 17, iq3_xxs = 18, iq1_s = 19, iq4_nl = 20, iq3_s = 21, iq2_s = 22, iq4_xs = 23,
  i8 = 24, i16 = 25, i32 = 26, i64 = 27, f64 = 28, iq1_m = 29, bf16 = 30,
  q4_0_4_4 = 31, q4_0_4_8 = 32, q4_0_8_8 = 33,  // removed from GGUF files (repacked at runtime now)
  tq1_0 = 34, tq2_0 = 35,
  iq4_nl_4_4 = 36, iq4_nl_4_8 = 37, iq4_nl_8_8 = 38,  // removed from GGUF files
  mxfp4 = 39, nvfp4 = 40, q1_0 = 41, q2_0 = 42,
};

/// One row of the table.
struct ggml_type_traits {
  std::string_view name;        ///< ggml's name: "Q4_K", "BF16", ...
  std::uint32_t block_elements; ///< elements per block; 0 for removed types
  std::uint32_t block_bytes;    ///< bytes per block; 0 for removed types
  bool removed;                 ///< ggml no longer reads this id from GGUF files
  bool quantized;               ///< block-quantized (bytes are not numel × element size)
};

/// Number of ids the table covers (ids 0 .. ggml_type_count - 1).
inline constexpr std::uint32_t ggml_type_count = 43;

namespace detail {

inline constexpr std::uint32_t qk_k = 256;  // elements per super-block of the k-quants

inline constexpr std::array<ggml_type_traits, ggml_type_count> ggml_table{{
    {"F32", 1, 4, false, false},
    {"F16", 1, 2, false, false},
    {"Q4_0", 32, 2 + 16, false, true},
    {"Q4_1", 32, 2 + 2 + 16, false, true},
    {"Q4_2", 0, 0, true, true},
    {"Q4_3", 0, 0, true, true},
    {"Q5_0", 32, 2 + 4 + 16, false, true},
    {"Q5_1", 32, 2 + 2 + 4 + 16, false, true},
    {"Q8_0", 32, 2 + 32, false, true},
    {"Q8_1", 32, 4 + 4 + 32, false, true},
    {"Q2_K", qk_k, 2 + 2 + qk_k / 16 + qk_k / 4, false, true},
    {"Q3_K", qk_k, 2 + qk_k / 4 + qk_k / 8 + 12, false, true},
    {"Q4_K", qk_k, 2 + 2 + qk_k / 2 + 12, false, true},
    {"Q5_K", qk_k, 2 + 2 + qk_k / 2 + qk_k / 8 + 12, false, true},
    {"Q6_K", qk_k, 2 + qk_k / 2 + qk_k / 4 + qk_k / 16, false, true},
    {"Q8_K", qk_k, 4 + qk_k + qk_k / 8, false, true},
    {"IQ2_XXS", qk_k, 2 + qk_k / 4, false, true},
    {"IQ2_XS", qk_k, 2 + qk_k / 4 + qk_k / 32, false, true},
    {"IQ3_XXS", qk_k, 2 + qk_k / 4 + qk_k / 8, false, true},
    {"IQ1_S", qk_k, 2 + qk_k / 8 + qk_k / 16, false, true},
    {"IQ4_NL", 32, 2 + 16, false, true},
    {"IQ3_S", qk_k, 2 + qk_k / 4 + qk_k / 8 + qk_k / 32 + 4, false, true},
    {"IQ2_S", qk_k, 2 + qk_k / 4 + qk_k / 16, false, true},
    {"IQ4_XS", qk_k, 2 + 2 + qk_k / 2 + qk_k / 64, false, true},
    {"I8", 1, 1, false, false},
    {"I16", 1, 2, false, false},
    {"I32", 1, 4, false, false},
    {"I64", 1, 8, false, false},
    {"F64", 1, 8, false, false},
    {"IQ1_M", qk_k, qk_k / 8 + qk_k / 16 + qk_k / 32, false, true},
    {"BF16", 1, 2, false, false},
    {"Q4_0_4_4", 0, 0, true, true},
    {"Q4_0_4_8", 0, 0, true, true},
    {"Q4_0_8_8", 0, 0, true, true},
    {"TQ1_0", qk_k, 2 + 4 * 13, false, true},
    {"TQ2_0", qk_k, 2 + 64, false, true},
    {"IQ4_NL_4_4", 0, 0, true, true},
    {"IQ4_NL_4_8", 0, 0, true, true},
    {"IQ4_NL_8_8", 0, 0, true, true},
    {"MXFP4", 32, 1 + 16, false, true},
    {"NVFP4", 64, 4 + 32, false, true},
    {"Q1_0", 128, 2 + 16, false, true},
    {"Q2_0", 64, 2 + 16, false, true},
}};

// What an id past the table reads as through the enum overload: no sizes, so every size check
// rejects it.
inline constexpr ggml_type_traits ggml_unknown_type{"unknown", 0, 0, true, true};

}  // namespace detail

/// The table row of a raw type id, or nullptr when the id is past the table.
/// \code
///   if (const auto* t = distorch::ggml_traits(id); t == nullptr || t->removed) { /* reject */ }
/// \endcode
constexpr const ggml_type_traits* ggml_traits(std::uint32_t id) noexcept {
  return id < ggml_type_count ? &detail::ggml_table[id] : nullptr;
}

/// The table row of a type (a row named "unknown", without sizes, for a value past the table).
/// \code distorch::ggml_traits(distorch::ggml_type::q6_k).block_bytes;   // 210 \endcode
constexpr const ggml_type_traits& ggml_traits(ggml_type t) noexcept {
  const auto id = static_cast<std::uint32_t>(t);
  return id < ggml_type_count ? detail::ggml_table[id] : detail::ggml_unknown_type;
}

/// ggml's name of a type: "Q4_K".
/// \code distorch::ggml_type_name(distorch::ggml_type::iq4_xs);   // "IQ4_XS" \endcode
constexpr std::string_view ggml_type_name(ggml_type t) noexcept { return ggml_traits(t).name; }

/// Bytes of `elements` elements of a type, for a count that is a whole number of blocks; nullopt
/// when it is not, when the type is removed, or when the byte count overflows.
/// \code distorch::ggml_row_bytes(distorch::ggml_type::q4_0, 64);   // 36 \endcode
constexpr std::optional<std::uint64_t> ggml_row_bytes(ggml_type t, std::uint64_t elements) noexcept {
  const auto& traits = ggml_traits(t);
  if (traits.block_elements == 0 || elements % traits.block_elements != 0) return std::nullopt;
  const std::uint64_t blocks = elements / traits.block_elements;
  if (blocks != 0 && traits.block_bytes > UINT64_MAX / blocks) return std::nullopt;
  return blocks * traits.block_bytes;
}

/// The plain element type of an unquantized ggml type (F32, F16, BF16, F64, I8..I64); nullopt for
/// block-quantized and removed types, which inventories record as `dtype::opaque`.
/// \code distorch::ggml_plain_dtype(distorch::ggml_type::bf16);   // dtype::bf16 \endcode
constexpr std::optional<dtype> ggml_plain_dtype(ggml_type t) noexcept {
  switch (t) {
    case ggml_type::f32: return dtype::f32;
    case ggml_type::f16: return dtype::f16;
    case ggml_type::bf16: return dtype::bf16;
    case ggml_type::f64: return dtype::f64;
    case ggml_type::i8: return dtype::i8;
    case ggml_type::i16: return dtype::i16;
    case ggml_type::i32: return dtype::i32;
    case ggml_type::i64: return dtype::i64;
    default: return std::nullopt;
  }
}

}  // namespace distorch::inline v0
