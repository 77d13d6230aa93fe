#pragma once
/// \file
/// Version and configuration macros. Everything distorch declares lives in the versioned inline
/// namespace `distorch::v0`, so two major versions can be linked into one program.
///
/// Example:
/// \code
///   static_assert(DISTORCH_VERSION_MAJOR == 0);
///   std::string v = distorch::version_string();   // "0.1.0"
/// \endcode

#define DISTORCH_VERSION_MAJOR 0
#define DISTORCH_VERSION_MINOR 1
#define DISTORCH_VERSION_PATCH 0
#define DISTORCH_VERSION_STRING "0.1.0"

#include <string_view>

namespace distorch::inline v0 {

/// The library version as "major.minor.patch".
/// \code std::cout << distorch::version_string(); \endcode
constexpr std::string_view version_string() noexcept { return DISTORCH_VERSION_STRING; }

}  // namespace distorch::inline v0
