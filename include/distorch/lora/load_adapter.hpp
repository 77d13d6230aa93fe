#pragma once
/// \file
/// `load_adapter(path)`: an adapter from a weight file (any format `open_weights` reads), with
/// the PEFT `adapter_config.json` beside it applied when there is one.
///
/// Example:
/// \code
///   auto style = std::make_shared<distorch::adapter>(distorch::load_adapter("loras/style.safetensors"));
///   distorch::adapter_set adapters{{style, 0.8}};
/// \endcode

#include <optional>
#include <string>

#include "distorch/io/open.hpp"
#include "distorch/lora/adapter.hpp"
#include "distorch/lora/peft_config.hpp"

namespace distorch::inline v0 {

/// How to read an adapter file.
struct adapter_load_options {
  /// Read `adapter_config.json` from the adapter's folder when present.
  bool peft_config_beside = true;
  /// A PEFT config to use instead (wins over the file beside).
  std::optional<peft_config> peft;
};

/// Loads an adapter file. Throws `format_error` for an unreadable or malformed file and
/// `lora_error` for bad adapter contents, a file with no adapter keys (a model file, say) or a
/// broken adapter_config.json.
/// \code auto a = distorch::load_adapter("adapter_model.safetensors"); \endcode
inline adapter load_adapter(const std::string& path, const adapter_load_options& options = {}) {
  std::optional<peft_config> peft = options.peft;
  if (!peft && options.peft_config_beside) peft = adapter::peft_config_beside(path);
  const auto source = open_weights(path);
  return adapter::from_source(*source, std::move(peft));
}

}  // namespace distorch::inline v0
