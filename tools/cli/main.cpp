// distorch: inspect weight files, validate allocation strings, plan placements, run the demo.
// Errors print as one line on stderr; exit codes are 0 ok, 1 bad input, 2 internal error.

#include <algorithm>
#include <exception>
#include <iostream>

#include "cli.hpp"
#include "distorch/core/config.hpp"
#include "distorch/core/error.hpp"

int main(int argc, char** argv) {
  using namespace distorch::cli;
  CLI::App app{"distorch " + std::string(distorch::version_string()) +
               ": spread LibTorch model weights across devices by byte, ratio or fraction policies"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string(distorch::version_string()));
  app.footer("Run 'distorch COMMAND --help' for a command's options and examples.");

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
    std::cerr << "distorch: " << e.what() << " (run 'distorch --help')\n";
    return exit_bad_input;
  }
  try {
    return action ? action() : exit_bad_input;
  } catch (const distorch::error& e) {
    std::cerr << "distorch: " << e.what() << '\n';
    return exit_bad_input;
  } catch (const usage_error& e) {
    std::cerr << "distorch: " << e.what() << '\n';
    return exit_bad_input;
  } catch (const std::exception& e) {
    std::cerr << "distorch: internal error: " << e.what() << '\n';
    return exit_internal;
  }
}
