#pragma once
/// \file
/// `inventory_of_file`: the inventory of a weight file from its headers alone, with the same
/// grouping rules as for a live module. No tensor data is read, so a plan for a 100 GB checkpoint
/// can be made on a laptop. Units come in the order the reader lists records (file order for
/// safetensors; see io/safetensors.hpp).
///
/// Example:
/// \code
///   auto inv = distorch::inventory_of_file("model.safetensors", {{R"(blocks\.\d+)"}});
///   inv.total_bytes();
/// \endcode

#include <span>
#include <string>

#include "distorch/io/open.hpp"
#include "distorch/model/inventory.hpp"

namespace distorch::inline v0 {

/// Builds the inventory of any file `open_weights` can open. Throws `format_error` for a
/// malformed file and `allocation_error` naming the rule for a grouping rule that is an invalid
/// regex or matches no tensor of the file.
/// \code
///   auto inv = distorch::inventory_of_file("ckpt/model.safetensors.index.json");
/// \endcode
inline inventory inventory_of_file(const std::string& path, std::span<const grouping_rule> grouping = {}) {
  const auto source = open_weights(path);
  return inventory::from_records(source->records(), grouping);
}

/// Same, for an already open source.
/// \code
///   auto inv = distorch::inventory_of_source(*distorch::open_weights("model.gguf"));
/// \endcode
inline inventory inventory_of_source(const weight_source& source, std::span<const grouping_rule> grouping = {}) {
  return inventory::from_records(source.records(), grouping);
}

}  // namespace distorch::inline v0
