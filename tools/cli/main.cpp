// distorch: inspect weight files, validate allocation strings, plan placements, run the demo.
// Errors print as one line on stderr; exit codes are 0 ok, 1 bad input, 2 internal error.

#include <algorithm>
#include <exception>
#include <iostream>
#include <string>

#include <c10/util/Exception.h>

#include "cli.hpp"
#include "distorch/core/config.hpp"
#include "distorch/core/error.hpp"

namespace {

/// "lora apply": the subcommands the user named before parsing stopped, so a parse error can point
/// at the right --help. Empty when none was named.
std::string command_path(const CLI::App& app) {
  std::string path;
  const CLI::App* at = &app;
  for (auto subs = at->get_subcommands(); !subs.empty(); subs = at->get_subcommands()) {
    at = subs.front();
    path += (path.empty() ? "" : " ") + at->get_name();
  }
  return path;
}

void print_error(const std::string& message) {
  std::cerr << "distorch: " << distorch::cli::one_line(message) << '\n';
}

}  // namespace

int main(int argc, char** argv) {
  using namespace distorch::cli;
  // Named here, so usage lines say "distorch" whatever path it was started by.
  CLI::App app{"distorch " + std::string(distorch::version_string()) +
                   ": spread LibTorch model weights across devices by byte, ratio or fraction policies",
               "distorch"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string(distorch::version_string()));
  app.footer(
      "Examples:\n"
      "  distorch inspect model.safetensors\n"
      "  distorch plan --alloc 'cuda:0,8gb;cpu,*' --devices cuda:0=24GiB,cpu=64GiB --model model.safetensors\n"
      "  distorch demo\n"
      "Run 'distorch COMMAND --help' for a command's options and examples.\n"
      "Exit codes: 0 ok, 1 bad input (the one-line error on stderr names it and the fix), 2 internal error.");

  std::function<int()> action;
  auto set_action = [&](std::function<int()> a) { action = std::move(a); };
  auto& commands = command_list();
  std::stable_sort(commands.begin(), commands.end(), [](const command& a, const command& b) { return a.order < b.order; });
  for (auto& c : commands) c.add(app, set_action);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // CLI11's own messages name the option or argument; add which command and where to look.
    const std::string sub = command_path(app);
    if (sub.empty() && argc > 1 && argv[1][0] != '-') {
      // CLI11 reports an unknown command as "A subcommand is required", which hides the typo.
      print_error(std::string("'") + argv[1] + "' is not a distorch command (fix: run 'distorch --help' for the commands)");
      return exit_bad_input;
    }
    print_error((sub.empty() ? "" : sub + ": ") + e.what() + " (fix: run 'distorch" + (sub.empty() ? "" : " " + sub) +
                " --help' for its usage)");
    return exit_bad_input;
  }
  try {
    if (!action) {
      print_error("no command ran (fix: run 'distorch --help')");
      return exit_bad_input;
    }
    return action();
  } catch (const distorch::error& e) {
    print_error(e.what());
    return exit_bad_input;
  } catch (const usage_error& e) {
    print_error(e.what());
    return exit_bad_input;
  } catch (const c10::Error& e) {
    // LibTorch's own message without its multi-line C++ backtrace.
    print_error(std::string("internal error: ") + e.what_without_backtrace());
    return exit_internal;
  } catch (const std::exception& e) {
    print_error(std::string("internal error: ") + e.what());
    return exit_internal;
  } catch (...) {
    print_error("internal error: an unknown exception");
    return exit_internal;
  }
}
