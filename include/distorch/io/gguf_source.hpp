#pragma once
/// \file
/// `gguf_source`: a GGUF file as a `weight_source`. Unquantized tensors (F32, F16, BF16, F64,
/// I8..I64) load as zero-copy views of the file mapping in their own dtype; block-quantized ones
/// load dequantized to float32. A tensor can also stay quantized: `load_quantized` gives its bytes
/// as a uint8 tensor (zero-copy) with its ggml type and logical shape, so the runtime can keep it
/// compact on a donor device and `dequantize` it after fetching it.
///
/// Example:
/// \code
///   distorch::gguf_source src("flux1-dev-Q4_K_S.gguf");
///   at::Tensor w = src.load("double_blocks.0.img_attn.qkv.weight");          // float32
///   distorch::quantized_tensor q = src.load_quantized("double_blocks.0.img_attn.qkv.weight");
///   at::Tensor again = distorch::dequantize(q);                              // same values as w
/// \endcode

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "distorch/core/error.hpp"
#include "distorch/io/ggml_dequant.hpp"
#include "distorch/io/ggml_types.hpp"
#include "distorch/io/gguf.hpp"
#include "distorch/io/mapped_file.hpp"
#include "distorch/io/weight_source.hpp"

namespace distorch::inline v0 {

/// A tensor kept in its stored ggml encoding.
struct quantized_tensor {
  at::Tensor data;                  ///< uint8, one dimension, exactly the tensor's bytes
  ggml_type type = ggml_type::f32;  ///< how those bytes encode the values
  std::vector<std::int64_t> shape;  ///< the logical PyTorch shape of the values
  std::string name;                 ///< for error messages
};

namespace detail {

inline std::optional<at::ScalarType> ggml_scalar_type(ggml_type t) noexcept {
  switch (t) {
    case ggml_type::f32: return at::kFloat;
    case ggml_type::f16: return at::kHalf;
    case ggml_type::bf16: return at::kBFloat16;
    case ggml_type::f64: return at::kDouble;
    case ggml_type::i8: return at::kChar;
    case ggml_type::i16: return at::kShort;
    case ggml_type::i32: return at::kInt;
    case ggml_type::i64: return at::kLong;
    default: return std::nullopt;
  }
}

// A CPU tensor over `bytes` of the mapping, kept alive by the tensor's deleter. Data not aligned
// to its element size is copied instead: LibTorch kernels may assume element alignment, and a
// GGUF file may set general.alignment as low as 1.
inline at::Tensor gguf_view(const std::shared_ptr<const mapped_file>& file, std::span<const std::byte> bytes,
                            at::ScalarType scalar, std::size_t element_size, const std::vector<std::int64_t>& shape) {
  const auto options = at::TensorOptions().dtype(scalar).device(at::kCPU);
  if (bytes.empty()) return at::empty(shape, options);
  if (reinterpret_cast<std::uintptr_t>(bytes.data()) % element_size != 0) {
    at::Tensor copy = at::empty(shape, options);
    std::memcpy(copy.data_ptr(), bytes.data(), bytes.size());
    return copy;
  }
  // The mapping is private and copy-on-write, so a write through the view never reaches the file.
  return at::from_blob(const_cast<std::byte*>(bytes.data()), shape, [keep = file](void*) mutable { keep.reset(); },
                       options);
}

// Dequantizes whole blocks in chunks through at::parallel_for, so the work spreads over LibTorch's
// intra-op threads where this build has them (it runs serially otherwise, e.g. an OpenMP LibTorch
// used from a file compiled without -fopenmp). Every chunk is a valid call of ggml_dequantize.
inline void dequantize_parallel(ggml_type type, std::span<const std::byte> src, float* dst, std::int64_t numel,
                                const std::string& name) {
  const auto& traits = ggml_traits(type);
  const std::int64_t block_elements = traits.block_elements;
  const std::int64_t block_bytes = traits.block_bytes;
  const std::int64_t blocks = numel / block_elements;
  const std::int64_t grain = std::max<std::int64_t>(1, 65536 / block_elements);
  at::parallel_for(0, blocks, grain, [&](std::int64_t begin, std::int64_t end) {
    ggml_dequantize(type,
                    src.subspan(static_cast<std::size_t>(begin * block_bytes), static_cast<std::size_t>((end - begin) * block_bytes)),
                    std::span<float>(dst + begin * block_elements, static_cast<std::size_t>((end - begin) * block_elements)),
                    name);
  });
}

inline std::int64_t shape_numel(const std::vector<std::int64_t>& shape) noexcept {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

}  // namespace detail

/// Dequantizes a quantized tensor to float32 in its logical shape. The bytes may live on any
/// device: they are converted on the CPU and the result is put on the bytes' device. Throws
/// `format_error` naming the tensor when the bytes are not uint8, do not match the type and shape,
/// or when distorch has no conversion for the type.
/// \code
///   auto q = src.load_quantized("blk.0.ffn_up.weight");
///   q.data = q.data.to(at::kCUDA);           // kept compact on a donor device
///   at::Tensor w = distorch::dequantize(q);  // float32, on that device
/// \endcode
inline at::Tensor dequantize(const quantized_tensor& q) {
  const auto& traits = ggml_traits(q.type);
  const auto fail = [&](std::string problem, std::string fix) {
    throw format_error({"dequantizing tensor", q.name, std::nullopt, std::move(problem), std::move(fix)});
  };
  if (!q.data.defined()) fail("the tensor has no bytes", "pass the result of gguf_source::load_quantized");
  if (q.data.scalar_type() != at::kByte)
    fail(std::string("its bytes are ") + c10::toString(q.data.scalar_type()) + ", not uint8",
         "pass the uint8 byte tensor load_quantized returned");
  if (!ggml_can_dequantize(q.type))
    fail("ggml type " + std::string(traits.name) + " has no float32 conversion in distorch",
         "keep it quantized for a runtime that understands " + std::string(traits.name) +
             ", or requantize the file to Q8_0, Q*_K or F16");
  for (auto d : q.shape)
    if (d < 0) fail("the shape has a negative dimension", "pass the shape load_quantized returned");
  const std::int64_t numel = detail::shape_numel(q.shape);
  const auto bytes = ggml_row_bytes(q.type, static_cast<std::uint64_t>(numel));
  if (!bytes || *bytes != static_cast<std::uint64_t>(q.data.numel()))
    fail(std::to_string(q.data.numel()) + " bytes do not encode " + std::to_string(numel) + " " +
             std::string(traits.name) + " elements",
         "pass the bytes, type and shape of one tensor together");
  const at::Tensor cpu = (q.data.device().is_cpu() ? q.data : q.data.cpu()).contiguous();
  at::Tensor out = at::empty(q.shape, at::TensorOptions().dtype(at::kFloat).device(at::kCPU));
  if (numel > 0)
    detail::dequantize_parallel(q.type,
                                std::span<const std::byte>(static_cast<const std::byte*>(cpu.data_ptr()),
                                                           static_cast<std::size_t>(cpu.numel())),
                                out.data_ptr<float>(), numel, q.name);
  return q.data.device().is_cpu() ? out : out.to(q.data.device());
}

/// A GGUF file opened for loading. The file is mapped once; tensors are views of the mapping or
/// fresh float32 tensors, and every view keeps the mapping alive.
class gguf_source final : public weight_source {
 public:
  /// Maps and parses `path`. Throws `format_error` for an unreadable or malformed file.
  /// \code distorch::gguf_source src("model.gguf"); \endcode
  explicit gguf_source(const std::string& path) : gguf_source(mapped_file::open(path)) {}

  /// Parses an already mapped file.
  /// \code distorch::gguf_source src(distorch::mapped_file::open("model.gguf")); \endcode
  explicit gguf_source(std::shared_ptr<const mapped_file> file)
      : file_(std::move(file)), gguf_(parse_gguf(file_->bytes(), file_->path())), records_(gguf_records(gguf_)) {
    for (const auto& kv : gguf_.metadata) metadata_.emplace(kv.key, kv.value.to_string());
  }

  std::string format() const override { return "gguf"; }
  const std::string& path() const override { return file_->path(); }
  const std::vector<tensor_record>& records() const override { return records_; }
  /// Every metadata key with its printed value (long arrays shortened; `gguf()` has them whole).
  const std::map<std::string, std::string>& metadata() const override { return metadata_; }

  /// The parsed header: metadata values, tensor infos, alignment, data offset.
  /// \code auto arch = src.gguf().find("general.architecture")->to_string(); \endcode
  const gguf_file& gguf() const noexcept { return gguf_; }

  /// The tensor info of a name. Throws `format_error` when the file has no such tensor.
  /// \code distorch::ggml_type t = src.info("output.weight").type; \endcode
  const gguf_tensor_info& info(const std::string& name) const {
    if (const auto* t = gguf_.find_tensor(name)) return *t;
    throw format_error({"looking up tensor in " + file_->path(), name, std::nullopt, "the GGUF file has no tensor of this name",
                        "list the names with `distorch inspect` or records()"});
  }

  /// Loads a tensor on the CPU: unquantized types as zero-copy views in their dtype, quantized
  /// types dequantized to float32, both in the PyTorch shape. Throws `format_error` for an unknown
  /// name and for a type distorch cannot dequantize (load_quantized still reads it).
  /// \code at::Tensor w = src.load("blk.0.attn_q.weight"); \endcode
  at::Tensor load(const std::string& name) const override {
    const auto& t = info(name);
    const auto bytes = gguf_tensor_bytes(file_->bytes(), t);
    if (const auto scalar = detail::ggml_scalar_type(t.type))
      return detail::gguf_view(file_, bytes, *scalar, ggml_traits(t.type).block_bytes, t.shape);
    if (!ggml_can_dequantize(t.type))
      throw format_error({"loading tensor from " + file_->path(), name, error_position{"offset", t.file_offset},
                          "ggml type " + std::string(ggml_type_name(t.type)) + " has no float32 conversion in distorch",
                          "use load_quantized to keep its bytes, or requantize the file to Q8_0, Q*_K or F16"});
    file_->will_need(static_cast<std::size_t>(t.file_offset), bytes.size());
    at::Tensor out = at::empty(t.shape, at::TensorOptions().dtype(at::kFloat).device(at::kCPU));
    if (t.numel > 0) detail::dequantize_parallel(t.type, bytes, out.data_ptr<float>(), t.numel, t.name);
    return out;
  }

  /// Loads a tensor still encoded: its bytes as a one-dimensional uint8 view of the mapping, its
  /// ggml type and its PyTorch shape. Works for every type the file may hold. Throws
  /// `format_error` for an unknown name.
  /// \code
  ///   distorch::quantized_tensor q = src.load_quantized("blk.0.ffn_down.weight");
  ///   q.data.numel();   // the stored bytes, e.g. numel / 256 * 144 for Q4_K
  /// \endcode
  quantized_tensor load_quantized(const std::string& name) const {
    const auto& t = info(name);
    const auto bytes = gguf_tensor_bytes(file_->bytes(), t);
    return {detail::gguf_view(file_, bytes, at::kByte, 1, {static_cast<std::int64_t>(bytes.size())}), t.type, t.shape,
            t.name};
  }

  std::optional<tensor_location> locate(const std::string& name) const override {
    const auto* t = gguf_.find_tensor(name);
    if (t == nullptr) return std::nullopt;
    return tensor_location{file_->path(), t->file_offset, t->bytes, std::string(ggml_type_name(t->type))};
  }

 private:
  std::shared_ptr<const mapped_file> file_;
  gguf_file gguf_;
  std::vector<tensor_record> records_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace distorch::inline v0
