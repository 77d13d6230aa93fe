#pragma once
// Helpers shared by test files that write files: a self-removing temporary folder, the Python
// interpreter that has torch (tests run it to write independent reference files), file reading.

#include <stdlib.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>

namespace distorch_test {

/// A fresh folder under the system temp folder, removed with everything in it at scope exit.
struct temp_dir {
  std::filesystem::path path;
  explicit temp_dir(const std::string& tag = "test") {
    std::string pattern = (std::filesystem::temp_directory_path() / ("distorch-" + tag + "-XXXXXX")).string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("cannot create a temporary folder from " + pattern);
    path = pattern;
  }
  ~temp_dir() {
    std::error_code ignored;
    std::filesystem::remove_all(path, ignored);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;

  /// Path of a file inside the folder.
  std::string operator/(const std::string& name) const { return (path / name).string(); }
  /// Writes a text file inside the folder and returns its path.
  std::string write(const std::string& name, const std::string& text) const {
    const auto p = path / name;
    std::ofstream(p, std::ios::binary) << text;
    return p.string();
  }
};

/// The interpreter with torch and the reference packages: $DISTORCH_PYTHON (set by meson test to
/// the pinned virtual environment), else python3 on PATH.
inline std::string python() {
  const char* p = std::getenv("DISTORCH_PYTHON");
  return p != nullptr ? p : "python3";
}

/// The whole content of a file ("" when it cannot be read).
inline std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

/// The source tree, for scripts kept beside the tests: $DISTORCH_SOURCE_ROOT (set by meson test).
inline std::string source_root() {
  const char* root = std::getenv("DISTORCH_SOURCE_ROOT");
  if (root == nullptr) throw std::runtime_error("DISTORCH_SOURCE_ROOT is unset: run the tests through meson test");
  return root;
}

/// Writes `script` into `dir` as `name`, runs it with python() and `args`, and returns its exit
/// status. Its output goes to `name`.log in `dir` (read it with read_file when it fails).
inline int run_python(const temp_dir& dir, const std::string& name, const std::string& script, const std::string& args = "") {
  const std::string path = dir.write(name, script);
  const std::string command = python() + " " + path + " " + args + " > " + path + ".log 2>&1";
  return std::system(command.c_str());
}

}  // namespace distorch_test
