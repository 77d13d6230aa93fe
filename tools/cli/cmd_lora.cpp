// distorch lora: inspect adapter files (format per key group, rank, alpha, targets, matched and
// unmatched keys against a model), and bake adapters into a new safetensors file tensor by tensor
// (lora/merge_file.hpp), so that peak memory is one tensor plus the adapters, never the whole model.
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "distorch/io/open.hpp"
#include "distorch/lora/binding.hpp"
#include "distorch/lora/load_adapter.hpp"
#include "distorch/lora/merge_file.hpp"

namespace {

using distorch::cli::usage_error;

// ---- inspect -------------------------------------------------------------------------------------

struct inspect_args {
  std::string adapter;
  std::string model;
  bool json = false;
};

nlohmann::ordered_json group_json(const distorch::adapter& a, const distorch::adapter_group& g) {
  nlohmann::ordered_json j{{"key", g.keys.base},
                           {"kind", g.keys.kind ? std::string(distorch::adapter_kind_name(*g.keys.kind)) : "diff_b"},
                           {"naming", g.keys.naming}};
  if (g.rank > 0) j["rank"] = g.rank;
  j["alpha"] = g.alpha ? nlohmann::ordered_json(*g.alpha) : nlohmann::ordered_json(nullptr);
  j["scale"] = g.scale;
  j["dora"] = g.keys.dora();
  j["bias"] = g.keys.patches_bias();
  auto& tensors = j["tensors"] = nlohmann::ordered_json::object();
  for (const auto& name : g.keys.names)
    if (!name.empty()) tensors[name] = a.tensor(name).sizes().vec();
  return j;
}

int run_inspect(const inspect_args& args) {
  const auto a = std::make_shared<distorch::adapter>(distorch::load_adapter(args.adapter));
  std::optional<distorch::adapter_binding> binding;
  if (!args.model.empty()) {
    const auto model = distorch::open_weights(args.model);
    distorch::binding_options options;
    options.warn_unmatched = false;  // listed below instead
    binding = distorch::adapter_binding::bind(model->records(), {{a}}, options);
  }
  std::map<std::string, std::vector<const distorch::matched_key*>> targets;
  if (binding)
    for (const auto& m : binding->report().matched) targets[m.key].push_back(&m);

  if (args.json) {
    nlohmann::ordered_json out{{"adapter", a->name()}, {"tensor_count", a->tensors().size()}};
    if (a->peft()) out["peft_config"] = {{"lora_alpha", a->peft()->lora_alpha ? nlohmann::ordered_json(*a->peft()->lora_alpha) : nullptr},
                                         {"use_rslora", a->peft()->use_rslora}};
    auto& groups = out["groups"] = nlohmann::ordered_json::array();
    for (const auto& g : a->groups()) {
      auto j = group_json(*a, g);
      if (binding) {
        auto& t = j["targets"] = nlohmann::ordered_json::array();
        for (const auto* m : targets[g.keys.base]) t.push_back({{"tensor", m->tensor}, {"convention", distorch::key_convention_name(m->convention)}});
      }
      groups.push_back(std::move(j));
    }
    out["unrecognized"] = a->unrecognized();
    if (binding) {
      out["model"] = args.model;
      out["matched"] = binding->report().matched.size();
      auto& un = out["unmatched"] = nlohmann::ordered_json::array();
      for (const auto& u : binding->report().unmatched) un.push_back({{"key", u.key}, {"reason", u.reason}});
    }
    std::cout << out.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << '\n';
    return distorch::cli::exit_ok;
  }

  std::cout << "adapter:  " << a->name() << "\ntensors:  " << a->tensors().size() << "\ngroups:   " << a->groups().size() << '\n';
  if (a->peft())
    std::cout << "peft:     lora_alpha " << (a->peft()->lora_alpha ? std::to_string(*a->peft()->lora_alpha) : "-")
              << (a->peft()->use_rslora ? ", rslora" : "") << '\n';
  std::map<std::string, std::size_t> kinds;
  for (const auto& g : a->groups()) ++kinds[g.keys.kind ? std::string(distorch::adapter_kind_name(*g.keys.kind)) : "diff_b"];
  std::cout << "kinds:   ";
  for (const auto& [k, n] : kinds) std::cout << ' ' << k << " × " << n;
  std::cout << "\n\n";
  std::vector<std::array<std::string, 6>> rows{{"KEY", "KIND", "RANK", "ALPHA", "SCALE", binding ? "TARGET" : "NAMING"}};
  for (const auto& g : a->groups()) {
    std::ostringstream scale;
    scale << g.scale;
    std::string alpha = "-";
    if (g.alpha) {
      std::ostringstream s;
      s << *g.alpha;
      alpha = s.str();
    }
    std::string kind = g.keys.kind ? std::string(distorch::adapter_kind_name(*g.keys.kind)) : "diff_b";
    if (g.keys.dora()) kind += "+dora";
    if (g.keys.kind && g.keys.patches_bias()) kind += "+bias";
    std::string last = g.keys.naming;
    if (binding) {
      last.clear();
      for (const auto* m : targets[g.keys.base])
        last += (last.empty() ? "" : ", ") + m->tensor + " (" + std::string(distorch::key_convention_name(m->convention)) + ")";
      if (last.empty()) last = "(unmatched)";
    }
    rows.push_back({g.keys.base, kind, g.rank > 0 ? std::to_string(g.rank) : "-", alpha, scale.str(), last});
  }
  std::array<std::size_t, 5> w{};
  for (const auto& r : rows)
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = std::max(w[i], r[i].size());
  for (const auto& r : rows) {
    for (std::size_t i = 0; i < w.size(); ++i) std::cout << std::left << std::setw(static_cast<int>(w[i])) << r[i] << "  ";
    std::cout << r[5] << '\n';
  }
  if (!a->unrecognized().empty()) {
    std::cout << "\nunrecognized keys (" << a->unrecognized().size() << "):\n";
    for (const auto& k : a->unrecognized()) std::cout << "  " << k << '\n';
  }
  if (binding) {
    const auto& rep = binding->report();
    std::cout << "\nmodel:    " << args.model << "\nmatched:  " << rep.matched.size() << " targets\nunmatched: "
              << rep.unmatched.size() << " keys\n";
    for (const auto& u : rep.unmatched) std::cout << "  " << u.key << "  (" << u.reason << ")\n";
  }
  return distorch::cli::exit_ok;
}

// ---- apply ---------------------------------------------------------------------------------------

struct apply_args {
  std::string model;
  std::vector<std::string> adapters;
  std::string out;
  std::string device = "cpu";
  bool strict = false;
};

/// "path[:strength]": the strength is the part after the last ':' when it parses as a number, so
/// paths that contain ':' still work.
std::pair<std::string, double> adapter_spec(const std::string& spec) {
  const auto colon = spec.rfind(':');
  if (colon != std::string::npos && colon + 1 < spec.size()) {
    const std::string tail = spec.substr(colon + 1);
    double value = 0;
    const auto [end, ec] = std::from_chars(tail.data(), tail.data() + tail.size(), value);
    if (ec == std::errc() && end == tail.data() + tail.size()) {
      if (!std::isfinite(value)) throw usage_error("adapter strength in '" + spec + "' is not finite");
      return {spec.substr(0, colon), value};
    }
  }
  return {spec, 1.0};
}

int run_apply(const apply_args& args) {
  if (args.adapters.empty()) throw usage_error("name at least one adapter: distorch lora apply MODEL LORA[:STRENGTH] --out OUT");
  distorch::merge_file_options options;
  options.binding.strict = args.strict;
  try {
    options.compute_device = c10::Device(args.device);
  } catch (const std::exception&) {
    throw usage_error("'" + args.device + "' is not a device (use cpu, cuda:0, ...)");
  }
  const auto model = distorch::open_weights(args.model);
  distorch::adapter_set adapters;
  for (const auto& spec : args.adapters) {
    const auto [path, strength] = adapter_spec(spec);
    adapters.push_back({std::make_shared<distorch::adapter>(distorch::load_adapter(path)), strength, 1.0});
  }
  const auto report = distorch::merge_to_file(*model, adapters, args.out, options);
  std::cerr << "distorch: merged " << adapters.size() << " adapter(s) into " << report.patched << " of " << report.tensors
            << " tensors; wrote " << args.out << '\n';
  return distorch::cli::exit_ok;
}

distorch::cli::command_registration lora_command{{"lora", 40, [](CLI::App& app, auto set_action) {
  auto* lora = app.add_subcommand("lora", "Inspect LoRA / LoHa / LoKr adapters, or bake them into a model file");
  lora->require_subcommand(1);

  auto* inspect = lora->add_subcommand("inspect", "Show an adapter's key groups (format, rank, alpha, scale) and its targets");
  auto iargs = std::make_shared<inspect_args>();
  inspect->add_option("LORA", iargs->adapter, "The adapter file (.safetensors)")->required();
  inspect->add_option("--model", iargs->model, "Match the keys against this model file");
  inspect->add_flag("--json", iargs->json, "Print as JSON");
  inspect->footer(
      "Examples:\n"
      "  distorch lora inspect style.safetensors\n"
      "  distorch lora inspect style.safetensors --model sdxl.safetensors --json");
  inspect->callback([iargs, set_action] { set_action([iargs] { return run_inspect(*iargs); }); });

  auto* apply = lora->add_subcommand("apply", "Merge adapters into a model and write a new safetensors file");
  auto aargs = std::make_shared<apply_args>();
  apply->add_option("MODEL", aargs->model, "The model file (.safetensors or model.safetensors.index.json)")->required();
  apply->add_option("LORA", aargs->adapters, "Adapters as PATH[:STRENGTH], applied in order (strength 1 when omitted)")->required();
  apply->add_option("--out", aargs->out, "The merged file to write (replaced atomically)")->required();
  apply->add_option("--device", aargs->device, "Where to merge: cpu (default), cuda:0, ...");
  apply->add_flag("--strict", aargs->strict, "Fail when an adapter key matches no model tensor");
  apply->footer(
      "Examples:\n"
      "  distorch lora apply sdxl.safetensors style.safetensors:0.8 detail.safetensors:0.5 --out merged.safetensors\n"
      "  distorch lora apply flux.safetensors lora.safetensors --out merged.safetensors --device cuda:0 --strict");
  apply->callback([aargs, set_action] { set_action([aargs] { return run_apply(*aargs); }); });
}}};

}  // namespace
