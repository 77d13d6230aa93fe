#pragma once
/// \file
/// The error hierarchy. Every failure distorch reports is a subclass of `distorch::error` and
/// carries what was being done, the offending input, where in it (column, byte offset, unit
/// index...), what is wrong and how to fix it.
///
/// Example:
/// \code
///   try {
///     distorch::parse_bytes("-1gb");
///   } catch (const distorch::error& e) {
///     std::cerr << e.what() << '\n';   // one line: doing, subject, position, problem, fix
///     e.info().fix;                    // "write a non-negative size such as 2.5gb"
///   }
/// \endcode

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

#include "distorch/core/config.hpp"

namespace distorch::inline v0 {

/// Where in the input the problem sits.
struct error_position {
  std::string kind;     ///< "column", "offset", "unit", "line", ...
  std::uint64_t value;  ///< 1-based for columns and lines, 0-based for byte offsets and indices
};

/// Everything an error knows, field by field, for programs that want more than the message.
struct error_info {
  std::string doing;                        ///< "parsing allocation string"
  std::string subject;                      ///< the offending input, name or entry
  std::optional<error_position> position;   ///< where in the input, when it has a place
  std::string problem;                      ///< what is wrong
  std::string fix;                          ///< what would make it work
};

namespace detail {
inline std::string compose_error_message(std::string_view category, const error_info& info) {
  std::string message{category};
  message += ": ";
  if (!info.doing.empty()) {
    message += info.doing;
  }
  if (!info.subject.empty()) {
    message += info.doing.empty() ? "'" : " '";
    message += info.subject;
    message += "'";
  }
  if (info.position) {
    message += " at ";
    message += info.position->kind;
    message += ' ';
    message += std::to_string(info.position->value);
  }
  if (!info.problem.empty()) {
    message += ": ";
    message += info.problem;
  }
  if (!info.fix.empty()) {
    message += " (fix: ";
    message += info.fix;
    message += ')';
  }
  return message;
}
}  // namespace detail

/// Base of every distorch error. `what()` is one line; `info()` has the parts.
class error : public std::runtime_error {
 public:
  /// Composes the one-line message from `category` and the parts of `info`.
  /// \code throw distorch::error("my_error", {"reading config", "a.json", std::nullopt, "not JSON", "fix the file"}); \endcode
  error(std::string_view category, error_info info)
      : std::runtime_error(detail::compose_error_message(category, info)),
        info_(std::move(info)),
        category_(category) {}

  /// The parts of the message: doing, subject, position, problem, fix.
  /// \code catch (const distorch::error& e) { report(e.info().subject, e.info().fix); } \endcode
  const error_info& info() const noexcept { return info_; }
  /// "allocation_error", "format_error", ...
  const std::string& category() const noexcept { return category_; }

 private:
  error_info info_;
  std::string category_;
};

#define DISTORCH_DEFINE_ERROR(name)                                             \
  class name : public error {                                                  \
   public:                                                                     \
    explicit name(error_info info) : error(#name, std::move(info)) {}          \
  }

/// A malformed allocation string, byte size, device name or topology.
DISTORCH_DEFINE_ERROR(allocation_error);
/// A plan that cannot be made or honoured (the compute device cannot hold what it must, ...).
DISTORCH_DEFINE_ERROR(placement_error);
/// A malformed or unsupported weight file.
DISTORCH_DEFINE_ERROR(format_error);
/// An adapter that does not fit the model or holds bad values.
DISTORCH_DEFINE_ERROR(lora_error);
/// A device that is missing, full, or cannot do what was asked (pinned memory without CUDA, ...).
DISTORCH_DEFINE_ERROR(device_error);
/// A kept model lost a tensor or had one moved by a free.
DISTORCH_DEFINE_ERROR(retention_error);

#undef DISTORCH_DEFINE_ERROR

}  // namespace distorch::inline v0
