// distorch version: the library version and the LibTorch it was built against.
#include <iostream>

#include <nlohmann/json.hpp>
#include <torch/csrc/api/include/torch/version.h>

#include "cli.hpp"
#include "distorch/core/config.hpp"

namespace {
distorch::cli::command_registration version_command{{"version", 900, [](CLI::App& app, auto set_action) {
  auto* sub = app.add_subcommand("version", "Print the distorch and LibTorch versions");
  auto json = std::make_shared<bool>(false);
  sub->add_flag("--json", *json, "Print as JSON");
  sub->footer("Examples:\n  distorch version\n  distorch version --json");
  sub->callback([json, set_action] {
    set_action([json] {
      if (*json) {
        std::cout << nlohmann::json{{"distorch", std::string(distorch::version_string())}, {"libtorch", TORCH_VERSION}}.dump(2) << '\n';
      } else {
        std::cout << "distorch " << distorch::version_string() << " (LibTorch " << TORCH_VERSION << ")\n";
      }
      return 0;
    });
  });
}}};
}  // namespace
