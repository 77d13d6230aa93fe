// distorch validate: checks an allocation string (and, given a topology, that its devices exist
// and are not asked for more than they have). Prints "ok" or the one-line error.
#include <iostream>
#include <memory>
#include <string>

#include "cli.hpp"
#include "distorch/device/topology.hpp"
#include "distorch/placement/grammar.hpp"

namespace {

const std::string validate_help = distorch::cli::allocation_grammar_help + R"(
Examples:
  distorch validate --alloc 'cuda:0,2.5gb;cpu,*'
  distorch validate --alloc 'cuda:0,8%;cuda:1,8%;cpu,4%' --devices cuda:0=24GiB,cuda:1=12GiB,cpu=64GiB
Exit codes: 0 ok, 1 invalid (the error names the entry and its column).
See docs/allocation.md for every rule and error.)";

distorch::cli::command_registration validate_command{{"validate", 20, [](CLI::App& app, auto set_action) {
  struct options {
    std::string alloc;
    std::string devices;
    bool strict = false;
  };
  auto o = std::make_shared<options>();
  auto* sub = app.add_subcommand("validate", "Check an allocation string, optionally against a device topology");
  sub->add_option("--alloc", o->alloc, "Allocation string, e.g. 'cuda:0,2.5gb;cpu,*'")->required();
  sub->add_option("--devices", o->devices, "Topology to check against, e.g. cuda:0=24GiB,cpu=64GiB");
  sub->add_flag("--strict", o->strict, "Asking a device for more than it has is an error, not a warning");
  sub->footer(validate_help);
  sub->callback([o, set_action] {
    set_action([o] {
      const auto spec = distorch::parse_allocation(o->alloc);
      if (!o->devices.empty()) (void)distorch::check_against(spec, distorch::parse_topology(o->devices), o->strict);
      std::cout << "ok\n";
      return distorch::cli::exit_ok;
    });
  });
}}};

}  // namespace
