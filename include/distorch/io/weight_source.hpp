#pragma once
/// \file
/// `weight_source`: the one interface every weight file reader implements (safetensors, sharded
/// safetensors, GGUF, PyTorch zip). It lists tensor records from headers alone and loads one
/// tensor at a time as a CPU tensor, zero-copy over the file mapping where the bytes allow it.
/// The runtime, the LoRA loader and the CLI use files only through this interface.
///
/// Example:
/// \code
///   std::unique_ptr<distorch::weight_source> src = distorch::open_weights("model.safetensors");
///   for (const auto& record : src->records()) std::cout << record.name << '\n';
///   at::Tensor w = src->load("blocks.0.attn.qkv.weight");   // CPU tensor, shares the mapping
/// \endcode

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "distorch/core/error.hpp"
#include "distorch/model/inventory.hpp"

namespace distorch::inline v0 {

/// Where a tensor's bytes sit, for tools that show file layout (`distorch inspect`).
struct tensor_location {
  std::string file;          ///< the file holding the bytes (a shard, for sharded checkpoints)
  std::uint64_t offset = 0;  ///< absolute byte offset in that file
  std::uint64_t bytes = 0;   ///< stored byte count
  std::string stored_type;   ///< the format's own type name: "BF16", "Q4_K", ...
};

/// The interface of every weight file reader; `open_weights` picks the reader by content.
/// \code
///   void list(const distorch::weight_source& src) {
///     for (const auto& r : src.records()) std::cout << r.name << ' ' << r.bytes << '\n';
///   }
/// \endcode
class weight_source {
 public:
  virtual ~weight_source() = default;

  /// "safetensors", "safetensors-index", "gguf", "torch-zip".
  virtual std::string format() const = 0;
  /// The path it was opened from.
  virtual const std::string& path() const = 0;
  /// Every tensor, in the file's model order, from headers alone (no tensor data read).
  virtual const std::vector<tensor_record>& records() const = 0;
  /// File-level metadata as strings (safetensors `__metadata__`, GGUF key/values printed).
  virtual const std::map<std::string, std::string>& metadata() const = 0;
  /// Loads one tensor on the CPU in its stored dtype (GGUF quantized types: dequantized to
  /// float32). Throws `format_error` naming the tensor when it is unknown or cannot be
  /// materialized.
  virtual at::Tensor load(const std::string& name) const = 0;

  /// Where a tensor's bytes sit in the file, or nullopt when the reader cannot say (or the name is
  /// unknown). Readers override it; the default knows nothing.
  virtual std::optional<tensor_location> locate(const std::string& name) const {
    (void)name;
    return std::nullopt;
  }

  /// True when a tensor of that name exists.
  bool contains(const std::string& name) const {
    for (const auto& r : records())
      if (r.name == name) return true;
    return false;
  }
};

}  // namespace distorch::inline v0
