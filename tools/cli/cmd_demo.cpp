// distorch demo: the quickstart from the command line. Generates a small transformer and a LoRA as
// safetensors in a temporary folder, distributes it across the devices found (a simulated GPU
// that is too small, plus the CPU, when there is no GPU), runs it, and prints the plan, the
// streaming statistics and the difference to the undistributed model, which must be exactly 0.
// Loading shows a progress bar on a terminal.
#include <iostream>
#include <memory>

#include "cli.hpp"
#include "distorch/runtime/demo.hpp"
#include "progress.hpp"

namespace {
distorch::cli::command_registration demo_command{{"demo", 50, [](CLI::App& app, auto set_action) {
  auto* sub = app.add_subcommand("demo", "Distribute a generated transformer + LoRA and check exact parity");
  auto json = std::make_shared<bool>(false);
  auto forwards = std::make_shared<int>(3);
  auto depth = std::make_shared<std::size_t>(2);
  sub->add_flag("--json", *json, "Print the result as JSON");
  sub->add_option("--forwards", *forwards, "Forward passes to run")->check(CLI::Range(1, 1000));
  sub->add_option("--prefetch-depth", *depth, "Units fetched ahead of the one running")->check(CLI::Range(0, 16));
  sub->footer(
      "Runs on any machine: without a GPU the compute device is a simulated GPU holding 70% of the model.\n"
      "Examples:\n"
      "  distorch demo\n"
      "  distorch demo --json --prefetch-depth 1\n"
      "Exit codes: 0 bit-identical to the undistributed model, 1 bad input, 2 internal error or a difference.");
  sub->callback([=] {
    set_action([=] {
      distorch::demo::options options;
      options.forwards = *forwards;
      options.prefetch_depth = *depth;
      distorch::demo::result result;
      {
        // Loading reports one step per unit; the bar draws on stderr only when it is a terminal.
        distorch::cli::progress_bar bar;
        options.progress = bar.callback();
        result = distorch::demo::run(options);
      }
      if (*json) std::cout << result.json.dump(2) << '\n';
      else std::cout << result.report;
      return result.bit_identical && result.max_abs_diff == 0.0 ? distorch::cli::exit_ok : distorch::cli::exit_internal;
    });
  });
}}};
}  // namespace
