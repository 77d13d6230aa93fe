// distorch lora: inspect adapter files (format per key group, rank, alpha, targets, matched and
// unmatched keys against a model), and bake adapters into a new safetensors file tensor by tensor
// (lora/merge_file.hpp), so that peak memory is one tensor plus the adapters, never the whole model.
// Adapters and models are read by io/open.hpp, so .safetensors and PyTorch .bin/.pt both work.
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
#include "distorch/device/discover.hpp"
#include "distorch/io/open.hpp"
#include "distorch/lora/binding.hpp"
#include "distorch/lora/load_adapter.hpp"
#include "distorch/lora/merge_file.hpp"
#include "progress.hpp"

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
  bool json = false;
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
      if (!std::isfinite(value)) throw usage_error("adapter strength in '" + spec + "' is not finite (fix: write PATH:STRENGTH with a number such as 0.8)");
      return {spec.substr(0, colon), value};
    }
  }
  return {spec, 1.0};
}

/// The merge device, checked to exist here: LibTorch would otherwise fail deep inside the merge
/// with a multi-line message and no hint that the device was the problem.
c10::Device merge_device(const std::string& text) {
  std::optional<c10::Device> device;
  try {
    device = c10::Device(text);
  } catch (const std::exception&) {
    throw usage_error("--device '" + text + "' is not a device name (fix: use cpu, cuda:0, ...)");
  }
  if (device->is_cpu()) return *device;
  const int count = distorch::torch_device_count(device->type());
  const int index = device->has_index() ? device->index() : 0;
  if (index >= count)
    throw usage_error("--device '" + text + "': this LibTorch sees " + std::to_string(count) + " device(s) of that type" +
                      " (fix: merge on cpu, or on a device that is present)");
  return *device;
}

int run_apply(const apply_args& args) {
  if (args.adapters.empty())
    throw usage_error("lora apply: no adapter given (fix: distorch lora apply MODEL LORA[:STRENGTH]... --out OUT)");
  distorch::merge_file_options options;
  options.binding.strict = args.strict;
  options.compute_device = merge_device(args.device);
  const auto model = distorch::open_weights(args.model);
  distorch::adapter_set adapters;
  std::vector<std::pair<std::string, double>> specs;
  for (const auto& spec : args.adapters) {
    const auto [path, strength] = adapter_spec(spec);
    specs.emplace_back(path, strength);
    adapters.push_back({std::make_shared<distorch::adapter>(distorch::load_adapter(path)), strength, 1.0});
  }
  distorch::merge_file_report report;
  {
    // Merging a large model takes minutes; the bar draws on stderr only when it is a terminal.
    distorch::cli::progress_bar bar;
    options.progress = bar.callback();
    report = distorch::merge_to_file(*model, adapters, args.out, options);
  }
  if (args.json) {
    nlohmann::ordered_json out{{"out", args.out}, {"model", args.model}, {"device", options.compute_device.str()}};
    auto& list = out["adapters"] = nlohmann::ordered_json::array();
    for (const auto& [path, strength] : specs) list.push_back({{"file", path}, {"strength", strength}});
    out["tensors"] = report.tensors;
    out["patched"] = report.patched;
    out["matched"] = report.binding.matched.size();
    auto& un = out["unmatched"] = nlohmann::ordered_json::array();
    for (const auto& u : report.binding.unmatched) un.push_back({{"adapter", specs.at(u.adapter_index).first}, {"key", u.key}, {"reason", u.reason}});
    std::cout << out.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << '\n';
    return distorch::cli::exit_ok;
  }
  std::cout << "wrote:     " << args.out << "\nadapters: ";
  for (const auto& [path, strength] : specs) std::cout << ' ' << path << " (strength " << strength << ')';
  std::cout << "\ntensors:   " << report.tensors << " written, " << report.patched << " merged ("
            << report.binding.matched.size() << " adapter targets)\nunmatched: " << report.binding.unmatched.size()
            << " adapter keys\n";
  for (const auto& u : report.binding.unmatched) std::cout << "  " << u.key << "  (" << u.reason << ")\n";
  return distorch::cli::exit_ok;
}

distorch::cli::command_registration lora_command{{"lora", 40, [](CLI::App& app, auto set_action) {
  auto* lora = app.add_subcommand("lora", "Inspect LoRA / LoHa / LoKr adapters, or bake them into a model file");
  lora->require_subcommand(1);
  lora->footer(
      "Adapters: .safetensors or PyTorch .bin/.pt state dicts, in kohya, PEFT, diffusers or plain module naming.\n"
      "Examples:\n"
      "  distorch lora inspect style.safetensors --model sdxl.safetensors\n"
      "  distorch lora apply sdxl.safetensors style.safetensors:0.8 --out merged.safetensors");

  auto* inspect = lora->add_subcommand("inspect", "Show an adapter's key groups (format, rank, alpha, scale) and its targets");
  auto iargs = std::make_shared<inspect_args>();
  inspect->add_option("LORA", iargs->adapter, "The adapter file: .safetensors, or a PyTorch .bin/.pt state dict")->required();
  inspect->add_option("--model", iargs->model, "Match the keys against this model file (any format 'distorch inspect' reads)");
  inspect->add_flag("--json", iargs->json, "Print as JSON");
  inspect->footer(
      "Examples:\n"
      "  distorch lora inspect style.safetensors\n"
      "  distorch lora inspect adapter_model.bin\n"
      "  distorch lora inspect style.safetensors --model sdxl.safetensors --json\n"
      "Exit codes: 0 ok, 1 bad input (unreadable file, malformed adapter), 2 internal error.");
  inspect->callback([iargs, set_action] { set_action([iargs] { return run_inspect(*iargs); }); });

  auto* apply = lora->add_subcommand("apply", "Merge adapters into a model and write a new safetensors file");
  auto aargs = std::make_shared<apply_args>();
  apply->add_option("MODEL", aargs->model, "The model file: .safetensors, model.safetensors.index.json or .bin/.pt")->required();
  apply->add_option("LORA", aargs->adapters,
                    "Adapters (.safetensors or .bin/.pt) as PATH[:STRENGTH], applied in order (strength 1 when omitted)")
      ->required();
  apply->add_option("--out", aargs->out, "The merged .safetensors file to write (replaced atomically)")->required();
  apply->add_option("--device", aargs->device, "Where to merge: cpu (default), cuda:0, ...");
  apply->add_flag("--strict", aargs->strict, "Fail when an adapter key matches no model tensor");
  apply->add_flag("--json", aargs->json, "Print the summary as JSON");
  apply->footer(
      "Tensors are merged one at a time in fp32 and written in the model's dtype; a progress bar shows\n"
      "on stderr when it is a terminal.\n"
      "Examples:\n"
      "  distorch lora apply sdxl.safetensors style.safetensors:0.8 detail.safetensors:0.5 --out merged.safetensors\n"
      "  distorch lora apply model.safetensors adapter_model.bin --out merged.safetensors --json\n"
      "  distorch lora apply flux.safetensors lora.safetensors --out merged.safetensors --device cuda:0 --strict\n"
      "Exit codes: 0 ok, 1 bad input (unreadable file, shape mismatch, unmatched key with --strict), 2 internal error.");
  apply->callback([aargs, set_action] { set_action([aargs] { return run_apply(*aargs); }); });
}}};

}  // namespace
