#pragma once
// The distorch command-line program's small framework. Each command lives in its own .cpp and
// registers itself with a `command_registration` object; main.cpp owns parsing, the error policy
// and the exit codes (0 ok, 1 bad input, 2 internal error).

#include <CLI/CLI.hpp>

#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>
#include <unistd.h>
#include <vector>

namespace distorch::cli {

enum exit_code : int { exit_ok = 0, exit_bad_input = 1, exit_internal = 2 };

/// A command's body runs after parsing and returns its exit code. Throwing a distorch::error
/// means bad input (exit 1); any other exception is an internal error (exit 2).
struct command {
  std::string name;
  int order = 100;  // position in --help
  std::function<void(CLI::App& parent, std::function<void(std::function<int()>)> set_action)> add;
};

inline std::vector<command>& command_list() {
  static std::vector<command> list;
  return list;
}

struct command_registration {
  explicit command_registration(command c) { command_list().push_back(std::move(c)); }
};

/// Bad command-line input that is not a distorch::error (a missing file argument, ...).
struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// The allocation grammar in brief, shared by the --help of every command that takes --alloc.
inline const std::string allocation_grammar_help = R"(Allocation strings (compatible with DisTorch2):
  bytes     cuda:0,2.5gb;cpu,*            sizes in written order; * takes the rest (cpu if none)
            cuda:0,500mb;cuda:1,3.0g;cpu,5gb*
  ratio     cuda:0,25%;cpu,75%            parts of a ratio: 8%;8%;4% splits 40/40/20
  fraction  cuda:0,0.1;cpu,0.5            fractions of each device's total memory, in [0,1]
  vvram     cuda:0;4;cpu                  move 4 GB off the compute device onto the donors
  auto      auto                          fill the compute device, then the other devices
  override  blocks\.(0|1)\..*=cuda:1;...  pin units whose name matches the regex (first wins)
)";

/// True when stdout / stderr is a terminal (progress bars draw on stderr only then).
inline bool stdout_is_terminal() { return ::isatty(STDOUT_FILENO) == 1; }
inline bool stderr_is_terminal() { return ::isatty(STDERR_FILENO) == 1; }

/// An error message as one line: runs of control characters (newlines from CLI11, LibTorch or a
/// file name) become one space, so every error is exactly one line on stderr.
inline std::string one_line(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  bool gap = false;
  for (const char c : text) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
      gap = true;
      continue;
    }
    if (gap && !out.empty()) out += ' ';
    gap = false;
    out += c;
  }
  return out;
}

}  // namespace distorch::cli
