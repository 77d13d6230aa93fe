// distorch plan: plans where every unit of a model lives, before anything is loaded, and prints
// the plan as a table or as JSON. The model comes from a units list (--units) or from a weight
// file's headers (--model: safetensors, index.json, GGUF, .bin/.pt); no tensor data is read.
// --predict adds the predicted step time of streaming (profile/predictor.hpp); --suggest the
// smallest offload that fits (profile/suggest.hpp).
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli.hpp"
#include "distorch/core/bytes.hpp"
#include "distorch/device/topology.hpp"
#include "distorch/io/file_inventory.hpp"
#include "distorch/placement/grammar.hpp"
#include "distorch/placement/plan_io.hpp"
#include "distorch/placement/planner.hpp"
#include "distorch/placement/units_file.hpp"
#include "distorch/profile/predictor.hpp"
#include "distorch/profile/profile.hpp"
#include "distorch/profile/suggest.hpp"

namespace {

const std::string plan_help = distorch::cli::allocation_grammar_help + R"(
The head of the model stays on the compute device up to its quota; the tail goes to the other
devices, first-fit in the order written. Units below 0.01% of the model stay on the compute
device. The compute device must also hold the streaming window (largest streamed unit x
(--prefetch + 1): the unit that runs and the --prefetch units fetched ahead of it, the depth the
runtime streams with) and the --reserve; otherwise planning fails and says what would fit.

Units file: a JSON list in model order, e.g.
  [{"name": "embed", "bytes": 262144}, {"name": "blocks.0.attn", "bytes": 16777216}, ...]

Prediction (--predict): simulates one step with the plan: units run in order, each for the
compute time given (--compute-ms-per-unit X, or --compute-gbps Y meaning unit bytes / Y GB/s);
a streamed unit is copied over its link (latency + bytes / bandwidth from --profile FILE, made by
'distorch profile --out FILE'; without --profile, built-in conservative figures: 10 GB/s pinned
host->device, 5 GB/s host memcpy, ...) starting --depth units ahead (default: --prefetch), and
compute waits for it. Prints bytes, transfer and exposed time per link, the step time and the
slowdown vs all-resident. --pageable models CPU homes in pageable instead of pinned memory.
Suggestion (--suggest): the smallest offload that fits the compute device with its window and
reserve, as a bytes-mode allocation string; without --alloc the plan shown is the suggestion's.

Examples:
  distorch plan --alloc 'cuda:0,2.5gb;cpu,*' --devices cuda:0=24GiB,cpu=64GiB --units units.json
  distorch plan --alloc 'cuda:0,8gb;cpu,*' --devices cuda:0=24GiB,cpu=64GiB --units units.json \
                --predict --profile profile.json --compute-gbps 400 --depth 2
  distorch plan --suggest --devices cuda:0=8GiB,cpu=64GiB --model model.safetensors --group 'blocks\.\d+' --reserve 1gb
  distorch plan --alloc 'cuda:0;4;cpu' --devices cuda:0=8GiB,cpu=64GiB --units units.json --json
  distorch plan --alloc 'cuda:0,8gb;cpu,*' --devices cuda:0=24GiB,cpu=64GiB --model model.safetensors --group 'blocks\.\d+'
  distorch plan --alloc 'cuda:0,25%;cpu,75%' --devices cuda:0=8GiB,cpu=64GiB --units units.json \
                --compute cuda:0 --group 'blocks\.\d+' --prefetch 1 --reserve 1gb --strict
Exit codes: 0 ok, 1 bad input or a plan that cannot fit, 2 internal error.
See docs/allocation.md and docs/placement.md.)";

struct plan_request {
  std::string alloc;
  std::string devices;
  std::string compute;  // empty: the virtual-VRAM compute device, else the first non-CPU device
  std::string units_file;
  std::string model_file;
  std::vector<std::string> groups;
  std::vector<std::string> heads;
  std::size_t prefetch = 1;
  std::string reserve = "0";
  std::uint32_t tiny_ppm = 100;
  bool json = false;
  bool strict = false;
  bool predict = false;
  std::string profile_file;
  // CLI11 2.1 has no std::optional options: whether one was given is its count.
  std::size_t depth = 0;
  double compute_ms_per_unit = 0;
  double compute_gbps = 0;
  const CLI::Option* depth_given = nullptr;
  const CLI::Option* ms_given = nullptr;
  const CLI::Option* gbps_given = nullptr;
  bool pageable = false;
  bool suggest = false;
};

distorch::device_id choose_compute(const plan_request& r, const distorch::allocation_spec& spec, const distorch::topology& topo) {
  if (!r.compute.empty()) return distorch::device_id::parse(r.compute);
  if (spec.mode == distorch::allocation_mode::virtual_vram) return spec.vvram_compute;
  for (const auto& d : topo.devices)
    if (!d.id.is_cpu()) return d.id;
  return distorch::device_id::cpu();
}

/// The compute time per unit that --predict was given.
distorch::compute_time compute_time_of(const plan_request& r) {
  const bool ms = r.ms_given->count() > 0, gbps = r.gbps_given->count() > 0;
  if (ms == gbps)
    throw distorch::cli::usage_error(
        "plan --predict needs one compute time: --compute-ms-per-unit X (every unit) or --compute-gbps Y (unit bytes / Y GB/s)");
  if (ms) return distorch::compute_time::uniform(r.compute_ms_per_unit / 1e3);
  return distorch::compute_time::by_bytes(r.compute_gbps * 1e9);
}

/// Plans `model` as the request says and prints it. Every model source ends here.
int print_plan(const distorch::inventory& model, const plan_request& r) {
  if (r.alloc.empty() && !r.suggest)
    throw distorch::cli::usage_error("plan needs an allocation: give --alloc 'cuda:0,2.5gb;cpu,*', or --suggest to propose one");
  const auto topo = distorch::parse_topology(r.devices);
  // The policies check the devices against the topology themselves (and clamp or refuse in
  // strict mode), so check_against would only repeat their warnings here.
  distorch::planner_options options;
  options.prefetch_depth = r.prefetch;
  options.reserve = distorch::parse_bytes(r.reserve);
  options.strict = r.strict;
  options.tiny_ppm = r.tiny_ppm;
  options.head_rules = r.heads;
  std::optional<distorch::placement_plan> plan;
  std::optional<distorch::allocation_suggestion> suggestion;
  std::vector<distorch::device_storage> storage;  // the string's :dtype suffixes
  if (!r.alloc.empty()) {
    const auto spec = distorch::parse_allocation(r.alloc);
    plan = distorch::make_plan(model, topo, choose_compute(r, spec, topo), distorch::policy_from_spec(spec), options);
    storage = distorch::storage_of(spec);
  }
  if (r.suggest) {
    const distorch::device_id compute = plan ? plan->compute : choose_compute(r, distorch::allocation_spec{}, topo);
    suggestion = distorch::suggest_allocation(model, topo, compute, options);
    if (!plan) plan = suggestion->plan;
  }
  std::optional<distorch::step_prediction> prediction;
  if (r.predict) {
    const auto profile = r.profile_file.empty() ? distorch::conservative_profile(topo) : distorch::read_profile_file(r.profile_file);
    distorch::predict_options predict;
    predict.depth = r.depth_given->count() > 0 ? r.depth : r.prefetch;
    predict.pinned_host = !r.pageable;
    prediction = distorch::predict_step(*plan, profile, compute_time_of(r), predict);
  }
  if (r.json) {
    auto j = distorch::plan_to_json(*plan);
    if (prediction) j["prediction"] = distorch::prediction_to_json(*prediction);
    if (suggestion) j["suggestion"] = distorch::suggestion_to_json(*suggestion);
    if (!storage.empty()) {
      auto& s = j["storage"] = nlohmann::json::object();
      for (const auto& h : storage) s[h.device.str()] = std::string(distorch::dtype_name(h.type));
    }
    std::cout << j.dump(2) << '\n';
  } else {
    std::cout << distorch::format_plan_table(*plan);
    if (!storage.empty()) {
      std::cout << "storage:";
      for (const auto& h : storage) std::cout << ' ' << h.device.str() << '=' << distorch::dtype_name(h.type);
      std::cout << "  (floating weights kept narrower at these homes, cast back after each fetch; bytes above are the module's)\n";
    }
    if (prediction) std::cout << distorch::format_prediction(*prediction);
    if (suggestion)
      std::cout << "suggest: " << suggestion->allocation << "  (smallest offload that fits: " << distorch::format_bytes(suggestion->offloaded_bytes)
                << " to " << suggestion->donor.str() << "; " << suggestion->plan.compute.str() << " needs "
                << distorch::format_bytes(suggestion->needed_bytes) << " with window and reserve)\n";
  }
  return distorch::cli::exit_ok;
}

distorch::cli::command_registration plan_command{{"plan", 30, [](CLI::App& app, auto set_action) {
  auto r = std::make_shared<plan_request>();
  auto* sub = app.add_subcommand("plan", "Plan where each unit of a model lives, before loading anything");
  sub->add_option("--alloc", r->alloc, "Allocation string, e.g. 'cuda:0,2.5gb;cpu,*' (needed unless --suggest)");
  sub->add_option("--devices", r->devices, "Device topology, e.g. cuda:0=24GiB,cuda:1=12GiB,cpu=64GiB")->required();
  sub->add_option("--compute", r->compute, "Compute device (default: the virtual-VRAM one, else the first non-CPU device)");
  auto* units = sub->add_option("--units", r->units_file, "JSON list of {\"name\", \"bytes\"} in model order");
  sub->add_option("--model", r->model_file, "Weight file read for its headers only: .safetensors, model.safetensors.index.json, .gguf, .bin/.pt")
      ->excludes(units);
  sub->add_option("--group", r->groups, "Regex coarsening units, e.g. 'blocks\\.\\d+' (repeatable)");
  sub->add_option("--head", r->heads, "Regex of head units kept on the compute device, e.g. 'embed|wte|wpe' (repeatable)");
  sub->add_option("--prefetch", r->prefetch, "Units fetched ahead of the one running, as the runtime's prefetch_depth; the window is largest streamed unit x (this + 1) (default 1)");
  sub->add_option("--reserve", r->reserve, "Bytes the compute device keeps free for activations, e.g. 1.5gb (default 0)");
  sub->add_option("--tiny-ppm", r->tiny_ppm, "Units below this many millionths of the model stay on compute (default 100 = 0.01%)");
  sub->add_flag("--json", r->json, "Print the plan as JSON");
  sub->add_flag("--strict", r->strict, "Asking a device for more than it has is an error, not a clamped warning");
  sub->add_flag("--predict", r->predict, "Add the predicted step time, exposed copy time and slowdown vs all-resident");
  sub->add_option("--profile", r->profile_file, "Profile JSON from 'distorch profile --out FILE' (default: built-in conservative figures)");
  r->depth_given = sub->add_option("--depth", r->depth, "Prefetch depth of the prediction (default: --prefetch)");
  r->ms_given = sub->add_option("--compute-ms-per-unit", r->compute_ms_per_unit, "Compute time of every unit, in milliseconds (for --predict)")
      ->check(CLI::NonNegativeNumber);
  r->gbps_given = sub->add_option("--compute-gbps", r->compute_gbps, "Compute time = unit bytes / this many GB/s (for --predict)")
      ->check(CLI::PositiveNumber);
  sub->add_flag("--pageable", r->pageable, "Predict CPU homes in pageable memory instead of pinned");
  sub->add_flag("--suggest", r->suggest, "Propose the smallest offload that fits, as a bytes-mode allocation string");
  sub->footer(plan_help);
  sub->callback([r, set_action] {
    set_action([r] {
      std::vector<distorch::grouping_rule> grouping;
      for (const auto& g : r->groups) grouping.push_back({g});
      if (!r->model_file.empty()) return print_plan(distorch::inventory_of_file(r->model_file, grouping), *r);
      if (r->units_file.empty()) throw distorch::cli::usage_error("plan needs a model: give --units FILE.json or --model FILE");
      return print_plan(distorch::read_units_file(r->units_file, grouping), *r);
    });
  });
}}};

}  // namespace
