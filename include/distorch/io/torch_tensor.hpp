#pragma once
/// \file
/// The thin layer between the pure file parsers and LibTorch: it turns a tensor descriptor (dtype,
/// shape, byte range of a mapped file) into an `at::Tensor`, and a list of named tensors into a
/// safetensors file.
///
/// Views are zero-copy: the tensor's storage points into the file mapping and its deleter holds a
/// `shared_ptr` to the mapping, so the mapping lives exactly as long as the last tensor made from
/// it. Data that is not aligned to its element size is copied instead, because LibTorch kernels
/// may assume alignment (vectorized loads) and some CPUs fault on it. The mapping is private and
/// copy-on-write, so writing to a view never reaches the file.
///
/// Example:
/// \code
///   auto file = distorch::mapped_file::open("model.safetensors");
///   auto header = distorch::parse_safetensors(file->bytes(), file->path());
///   const auto& t = header.tensors.front();
///   at::Tensor w = distorch::tensor_from_mapping(file, header.data_offset + t.begin, t.bytes(), t.type, t.shape, t.name);
/// \endcode

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <bit>
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
#include "distorch/io/mapped_file.hpp"
#include "distorch/io/safetensors_writer.hpp"
#include "distorch/model/dtype.hpp"
#include "distorch/model/torch_dtype.hpp"

namespace distorch::inline v0 {

static_assert(std::endian::native == std::endian::little,
              "weight files are little-endian; a big-endian host would need byte swapping");


/// Makes a CPU tensor from `bytes` bytes at `offset` of a mapped file: a zero-copy view when the
/// data is aligned to its element size, a copy otherwise. `name` (and `path`, when the mapping
/// was opened under another name) label errors. Throws
/// `format_error` when the range lies outside the file, when the byte count does not match the
/// shape, or when this LibTorch has no dtype for `type` (float8 kinds on 1.13, sub-byte kinds).
/// \code
///   at::Tensor w = distorch::tensor_from_mapping(file, 128, 24, distorch::dtype::f32, {2, 3}, "w");
/// \endcode
inline at::Tensor tensor_from_mapping(const std::shared_ptr<const mapped_file>& file, std::uint64_t offset,
                                      std::uint64_t bytes, dtype type, const std::vector<std::int64_t>& shape,
                                      const std::string& name, const std::string& path = {}) {
  const std::string& label = path.empty() ? file->path() : path;
  at::ScalarType scalar{};
  try {
    scalar = to_scalar_type(type);
  } catch (const format_error& e) {
    throw format_error({"materializing tensor from " + label, name, error_position{"offset", offset},
                        "this LibTorch has no dtype " + std::string(dtype_name(type)) + " (" + e.info().problem + ")",
                        e.info().fix});
  }
  if (offset > file->size() || bytes > file->size() - offset)
    throw format_error({"materializing tensor from " + label, name, error_position{"offset", offset},
                        "byte range runs past the end of the file", "the file is truncated"});
  std::uint64_t numel = 1;
  for (const auto d : shape) numel *= static_cast<std::uint64_t>(d);  // validated by the parser
  if (numel * dtype_size(type) != bytes)
    throw format_error({"materializing tensor from " + label, name, error_position{"offset", offset},
                        "byte count does not match shape x dtype", "the descriptor is corrupt"});
  const auto options = at::TensorOptions().dtype(scalar).device(at::kCPU);
  const std::byte* data = file->data() + offset;
  if (bytes == 0) return at::empty(shape, options);
  if (reinterpret_cast<std::uintptr_t>(data) % dtype_size(type) != 0) {
    at::Tensor copy = at::empty(shape, options);
    std::memcpy(copy.data_ptr(), data, static_cast<std::size_t>(bytes));
    return copy;
  }
  // The deleter's captured shared_ptr is what keeps the mapping alive for this view.
  return at::from_blob(const_cast<std::byte*>(data), shape, [keep = file](void*) mutable { keep.reset(); }, options);
}

/// True when `t` is a view into mapped file memory rather than its own allocation.
/// \code
///   bool zero_copy = distorch::shares_mapping(w, *file);
/// \endcode
inline bool shares_mapping(const at::Tensor& t, const mapped_file& file) noexcept {
  if (!t.defined() || file.size() == 0) return false;
  const auto* p = static_cast<const std::byte*>(t.storage().data());
  return p >= file.data() && p < file.data() + file.size();
}

/// Writes named tensors as a safetensors file (atomically; see io/safetensors_writer.hpp). Tensors
/// on other devices or not contiguous are brought to contiguous CPU memory first. Throws
/// `format_error` for a dtype the format cannot hold, a duplicate name, or an I/O failure.
/// \code
///   distorch::save_safetensors("out.safetensors", {{"w", at::ones({2, 3})}}, {{"format", "pt"}});
/// \endcode
inline void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                             const std::map<std::string, std::string>& metadata = {}) {
  std::vector<at::Tensor> keep;
  std::vector<safetensors_entry> entries;
  keep.reserve(tensors.size());
  entries.reserve(tensors.size());
  for (const auto& [name, tensor] : tensors) {
    std::optional<dtype> type;
    try {
      type = from_scalar_type(tensor.scalar_type());
    } catch (const format_error& e) {
      throw format_error({"writing safetensors file " + path, name, std::nullopt,
                          std::string("dtype ") + c10::toString(tensor.scalar_type()) + " has no safetensors name",
                          e.info().fix});
    }
    keep.push_back(tensor.to(at::kCPU).contiguous());
    const auto& t = keep.back();
    const auto* p = static_cast<const std::byte*>(t.data_ptr());
    entries.push_back({name, *type, t.sizes().vec(),
                       std::span<const std::byte>(p, static_cast<std::size_t>(t.numel()) * t.element_size())});
  }
  write_safetensors(path, entries, metadata);
}

}  // namespace distorch::inline v0
