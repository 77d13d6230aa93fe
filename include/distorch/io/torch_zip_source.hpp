#pragma once
/// \file
/// `torch_zip_source`: a PyTorch zip checkpoint (.bin / .pt) behind the `weight_source`
/// interface. Records come from `data.pkl` alone; `load` returns zero-copy views over the file
/// mapping where torch.save's layout allows it (see io/torch_zip.hpp).
///
/// Example:
/// \code
///   distorch::torch_zip_source src("pytorch_model.bin");
///   for (const auto& r : src.records()) std::cout << r.name << ' ' << r.bytes << '\n';
///   at::Tensor w = src.load("lm_head.weight");
/// \endcode

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "distorch/io/torch_zip.hpp"
#include "distorch/io/weight_source.hpp"

namespace distorch::inline v0 {

/// A PyTorch zip checkpoint (`torch.save`, .bin / .pt) as a `weight_source`; see the file example.
class torch_zip_source final : public weight_source {
 public:
  /// Opens `path`; throws `format_error` as `torch_zip_file::open` does.
  /// \code
  ///   std::unique_ptr<distorch::weight_source> src = std::make_unique<distorch::torch_zip_source>("model.pt");
  /// \endcode
  explicit torch_zip_source(const std::string& path, const pickle_limits& limits = {})
      : file_(torch_zip_file::open(path, limits)) {
    const auto& sd = file_->state_dict();
    std::vector<std::size_t> users(sd.storages.size());
    for (const auto& t : sd.tensors) ++users[t.storage];
    records_.reserve(sd.tensors.size());
    for (const auto& t : sd.tensors) {
      tensor_record r{t.name, t.type, t.shape};
      r.bytes = static_cast<std::uint64_t>(t.numel()) * dtype_size(t.type);
      // Tensors viewing one storage (tied weights, slices) share its bytes and must stay together.
      if (users[t.storage] > 1) {
        r.storage_key = t.storage + 1;
        r.storage_bytes = sd.storages[t.storage].nbytes();
      }
      records_.push_back(std::move(r));
    }
    metadata_["byteorder"] = file_->big_endian() ? "big" : "little";
    if (!file_->archive_version().empty()) metadata_["archive_version"] = file_->archive_version();
  }

  std::string format() const override { return "torch-zip"; }
  const std::string& path() const override { return file_->path(); }
  const std::vector<tensor_record>& records() const override { return records_; }
  /// "byteorder" and "archive_version" (the archive's `version` record).
  const std::map<std::string, std::string>& metadata() const override { return metadata_; }
  /// A CPU view of the tensor in its stored dtype; views of one storage share it.
  at::Tensor load(const std::string& name) const override { return file_->tensor(name); }

  /// The bytes from the tensor's first element to its last (inside its storage record), when the
  /// record is stored uncompressed; `stored_type` is the dtype name ("float32", ...).
  std::optional<tensor_location> locate(const std::string& name) const override {
    const auto& sd = file_->state_dict();
    for (const auto& t : sd.tensors) {
      if (t.name != name) continue;
      const auto base = file_->storage_file_offset(t.storage);
      if (!base) return std::nullopt;
      const std::uint64_t element = dtype_size(t.type);
      std::uint64_t span = 0;  // elements from the first to the last addressed one, inclusive
      if (t.numel() > 0) {
        span = 1;
        for (std::size_t d = 0; d < t.shape.size(); ++d)
          span += static_cast<std::uint64_t>(t.shape[d] - 1) * static_cast<std::uint64_t>(t.stride[d]);
      }
      return tensor_location{path(), *base + static_cast<std::uint64_t>(t.storage_offset) * element, span * element,
                             std::string(dtype_name(t.type))};
    }
    return std::nullopt;
  }

  /// The underlying checkpoint, for storages, strides and `requires_grad` flags.
  /// \code
  ///   bool trained = src.file().state_dict().tensors[0].requires_grad;
  /// \endcode
  const torch_zip_file& file() const noexcept { return *file_; }

 private:
  std::shared_ptr<const torch_zip_file> file_;
  std::vector<tensor_record> records_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace distorch::inline v0
