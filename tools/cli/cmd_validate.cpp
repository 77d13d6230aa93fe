// distorch validate: checks an allocation string (and, given a topology, that its devices exist
// and are not asked for more than they have). Prints "ok" (or, with --json, what the string means)
// or the one-line error.
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "distorch/device/topology.hpp"
#include "distorch/placement/grammar.hpp"

namespace {

const std::string validate_help = distorch::cli::allocation_grammar_help + R"(
Examples:
  distorch validate --alloc 'cuda:0,2.5gb;cpu,*'
  distorch validate --alloc 'cuda:0,8%;cuda:1,8%;cpu,4%' --devices cuda:0=24GiB,cuda:1=12GiB,cpu=64GiB
  distorch validate --alloc 'cuda:0;4;cpu' --json
Exit codes: 0 ok, 1 invalid (the error names the entry and its column), 2 internal error.
See docs/allocation.md for every rule and error, docs/cli.md for the JSON shape.)";

/// What the string means, entry by entry: the parse made visible, so scripts need not re-parse.
nlohmann::ordered_json spec_json(const distorch::allocation_spec& spec, const std::vector<std::string>& warnings) {
  nlohmann::ordered_json out{{"ok", true}, {"alloc", spec.text}, {"mode", std::string(distorch::mode_name(spec.mode))}};
  if (spec.mode == distorch::allocation_mode::virtual_vram) {
    out["compute"] = spec.vvram_compute.str();
    out["offload_bytes"] = spec.vvram_bytes;
  }
  auto& entries = out["entries"] = nlohmann::ordered_json::array();
  for (const auto& e : spec.entries) {
    nlohmann::ordered_json j{{"device", e.device.str()}, {"text", e.text}, {"column", e.column}};
    switch (spec.mode) {
      case distorch::allocation_mode::bytes:
        j["bytes"] = e.has_size ? nlohmann::ordered_json(e.bytes) : nlohmann::ordered_json(nullptr);
        j["wildcard"] = e.wildcard;
        break;
      case distorch::allocation_mode::ratio:
      case distorch::allocation_mode::fraction:
        j["value"] = static_cast<double>(e.value_e9) / static_cast<double>(distorch::decimal_one);
        break;
      default:
        break;
    }
    entries.push_back(std::move(j));
  }
  auto& overrides = out["overrides"] = nlohmann::ordered_json::array();
  for (const auto& o : spec.overrides)
    overrides.push_back({{"pattern", o.pattern}, {"device", o.device.str()}, {"column", o.column}});
  out["warnings"] = warnings;
  return out;
}

distorch::cli::command_registration validate_command{{"validate", 20, [](CLI::App& app, auto set_action) {
  struct options {
    std::string alloc;
    std::string devices;
    bool strict = false;
    bool json = false;
  };
  auto o = std::make_shared<options>();
  auto* sub = app.add_subcommand("validate", "Check an allocation string, optionally against a device topology");
  sub->add_option("--alloc", o->alloc, "Allocation string, e.g. 'cuda:0,2.5gb;cpu,*'")->required();
  sub->add_option("--devices", o->devices, "Topology to check against, e.g. cuda:0=24GiB,cpu=64GiB");
  sub->add_flag("--strict", o->strict, "Asking a device for more than it has is an error, not a warning");
  sub->add_flag("--json", o->json, "Print the parsed string (mode, entries, overrides, warnings) as JSON");
  sub->footer(validate_help);
  sub->callback([o, set_action] {
    set_action([o] {
      const auto spec = distorch::parse_allocation(o->alloc);
      std::vector<std::string> warnings;
      if (!o->devices.empty()) warnings = distorch::check_against(spec, distorch::parse_topology(o->devices), o->strict);
      if (o->json)
        std::cout << spec_json(spec, warnings).dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << '\n';
      else
        std::cout << "ok\n";
      return distorch::cli::exit_ok;
    });
  });
}}};

}  // namespace
