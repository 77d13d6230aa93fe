#pragma once
/// \file
/// The demo that `examples/quickstart` and `distorch demo` run, in one place so both show the same
/// thing. It writes a small transformer and a LoRA for it as safetensors files in a fresh temporary
/// folder, loads them through `DistributedModule` with a bytes policy across the devices found (on
/// a machine without GPUs: a simulated compute device too small for the model, plus the CPU), runs
/// forward several times, and compares against the same model run undistributed with the LoRA
/// merged by lora/ directly. The difference must be exactly 0. `options::progress` receives the
/// load's progress (one "loading" step per unit).
///
/// Example:
/// \code
///   auto result = distorch::demo::run({.forwards = 3});
///   std::cout << result.report;
///   return result.max_abs_diff == 0.0 ? 0 : 1;
/// \endcode

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/randn.h>
#include <nlohmann/json.hpp>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include "distorch/core/bytes.hpp"
#include "distorch/core/progress.hpp"
#include "distorch/device/discover.hpp"
#include "distorch/device/device.hpp"
#include "distorch/io/open.hpp"
#include "distorch/io/torch_tensor.hpp"
#include "distorch/lora/adapter.hpp"
#include "distorch/lora/load_adapter.hpp"
#include "distorch/lora/patcher.hpp"
#include "distorch/placement/plan_io.hpp"
#include "distorch/runtime/distributed_module.hpp"
#include "distorch/runtime/layers.hpp"

namespace distorch::inline v0 {
namespace demo {

/// Pre-norm attention + MLP block, every layer a `distorch::nn` layer.
/// \code
///   distorch::demo::attention_block block(64, 256);
///   at::Tensor y = block->forward(at::randn({2, 8, 64}));
/// \endcode
struct attention_block_impl : torch::nn::Module {
  /// `width` features in and out, `hidden` in the MLP.
  /// \code distorch::demo::attention_block_impl block(64, 256); \endcode
  attention_block_impl(std::int64_t width, std::int64_t hidden)
      : width(width),
        norm1(register_module("norm1", nn::LayerNorm(torch::nn::LayerNormOptions({width})))),
        qkv(register_module("qkv", nn::Linear(width, 3 * width))),
        proj(register_module("proj", nn::Linear(width, width))),
        norm2(register_module("norm2", nn::LayerNorm(torch::nn::LayerNormOptions({width})))),
        fc1(register_module("fc1", nn::Linear(width, hidden))),
        fc2(register_module("fc2", nn::Linear(hidden, width))) {}

  /// x: [batch, tokens, width] -> the same shape.
  /// \code at::Tensor y = block.forward(at::randn({1, 4, 64})); \endcode
  at::Tensor forward(const at::Tensor& x) {
    auto parts = qkv(norm1(x)).chunk(3, -1);
    auto scores = parts[0].matmul(parts[1].transpose(-2, -1)).div(std::sqrt(static_cast<double>(width)));
    auto y = x + proj(scores.softmax(-1).matmul(parts[2]));
    return y + fc2(at::gelu(fc1(norm2(y))));
  }

  std::int64_t width;
  nn::LayerNorm norm1;
  nn::Linear qkv, proj;
  nn::LayerNorm norm2;
  nn::Linear fc1, fc2;
};
/// The holder of `attention_block_impl`. \code distorch::demo::attention_block block(64, 256); \endcode
TORCH_MODULE_IMPL(attention_block, attention_block_impl);

/// Embedding projection, `blocks` attention blocks in a ModuleList, final norm and head.
/// \code
///   distorch::demo::tiny_transformer model(64, 256, 4);
///   at::Tensor y = model->forward(at::randn({2, 8, 64}));
/// \endcode
struct tiny_transformer_impl : torch::nn::Module {
  /// `blocks_count` blocks of `width` features with MLPs of `hidden`.
  /// \code distorch::demo::tiny_transformer_impl model(64, 256, 4); \endcode
  tiny_transformer_impl(std::int64_t width, std::int64_t hidden, int blocks_count)
      : embed(register_module("embed", nn::Linear(width, width))),
        blocks(register_module("blocks", torch::nn::ModuleList())),
        norm(register_module("norm", nn::LayerNorm(torch::nn::LayerNormOptions({width})))),
        head(register_module("head", nn::Linear(width, width))) {
    for (int i = 0; i < blocks_count; ++i) blocks->push_back(attention_block(width, hidden));
  }

  /// x: [batch, tokens, width] -> the same shape.
  /// \code at::Tensor y = model.forward(at::randn({1, 4, 64})); \endcode
  at::Tensor forward(const at::Tensor& x) {
    at::Tensor h = embed(x);
    for (const auto& block : *blocks) h = block->as<attention_block_impl>()->forward(h);
    return head(norm(h));
  }

  nn::Linear embed;
  torch::nn::ModuleList blocks;
  nn::LayerNorm norm;
  nn::Linear head;
};
/// The holder of `tiny_transformer_impl`. \code distorch::demo::tiny_transformer model(64, 256, 4); \endcode
TORCH_MODULE_IMPL(tiny_transformer, tiny_transformer_impl);

/// Every parameter and buffer of a module by name, for writing a weight file.
/// \code distorch::save_safetensors("model.safetensors", distorch::demo::named_tensors(*model)); \endcode
inline std::vector<std::pair<std::string, at::Tensor>> named_tensors(torch::nn::Module& m) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : m.named_parameters(true)) out.emplace_back(p.key(), p.value().detach());
  for (const auto& b : m.named_buffers(true)) out.emplace_back(b.key(), b.value());
  return out;
}

/// A rank-`rank` LoRA on every block's qkv and fc1, as safetensors tensors (kohya key names,
/// `<module>.lora_up.weight` / `.lora_down.weight` / `.alpha`, which lora/ reads).
/// \code distorch::save_safetensors("lora.safetensors", distorch::demo::make_lora(*model, 8)); \endcode
inline std::vector<std::pair<std::string, at::Tensor>> make_lora(torch::nn::Module& model, std::int64_t rank) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : model.named_parameters(true)) {
    const std::string& name = p.key();
    const bool target = name.find(".qkv.weight") != std::string::npos || name.find(".fc1.weight") != std::string::npos;
    if (!target) continue;
    const std::string module = name.substr(0, name.size() - std::string(".weight").size());
    out.emplace_back(module + ".lora_up.weight", at::randn({p.value().size(0), rank}).mul(0.05));
    out.emplace_back(module + ".lora_down.weight", at::randn({rank, p.value().size(1)}).mul(0.05));
    out.emplace_back(module + ".alpha", at::full({}, static_cast<double>(rank) / 2, at::kFloat));
  }
  return out;
}

/// What the demo does. \code distorch::demo::run({.forwards = 5, .prefetch_depth = 1}); \endcode
struct options {
  int forwards = 3;
  std::int64_t width = 64;
  std::int64_t hidden = 256;
  int blocks = 4;
  std::size_t prefetch_depth = 2;
  double lora_strength = 0.8;
  /// Receives the load's progress ("loading", one step per unit); forwarded to
  /// `distribute_spec::progress`.
  progress_callback progress;
};

/// What the demo found; `report` and `json` show all of it.
struct result {
  placement_plan plan;
  streaming_stats stats;
  std::vector<device_usage> memory;
  std::string devices;
  std::uint64_t model_bytes = 0;
  double max_abs_diff = -1;
  bool bit_identical = false;
  std::string report;  ///< the human-readable summary
  nlohmann::json json;
};

namespace detail {

/// A fresh folder under the system temp directory, removed with everything in it on destruction.
class temp_folder {
 public:
  temp_folder() {
    std::string pattern = (std::filesystem::temp_directory_path() / "distorch-demo-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr)
      throw device_error({"creating a temporary folder", pattern, std::nullopt, "mkdtemp failed", "set TMPDIR to a writable folder"});
    path_ = pattern;
  }
  ~temp_folder() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  temp_folder(const temp_folder&) = delete;
  temp_folder& operator=(const temp_folder&) = delete;
  const std::filesystem::path& path() const noexcept { return path_; }

 private:
  std::filesystem::path path_;
};

}  // namespace detail

/// Runs the demo; see the file comment. Throws a distorch::error when something cannot be done.
/// \code auto r = distorch::demo::run(); \endcode
inline result run(const options& opt = {}) {
  detail::temp_folder folder;
  const std::string model_path = (folder.path() / "model.safetensors").string();
  const std::string lora_path = (folder.path() / "lora.safetensors").string();

  // 1. Generate the model and its LoRA, and write them as safetensors.
  at::manual_seed(2024);
  tiny_transformer generated(opt.width, opt.hidden, opt.blocks);
  save_safetensors(model_path, named_tensors(*generated), {{"format", "pt"}});
  save_safetensors(lora_path, make_lora(*generated, 8), {{"format", "pt"}});
  const at::Tensor input = at::randn({2, 8, opt.width});

  std::shared_ptr<const weight_source> weights = open_weights(model_path);
  const adapter_set adapters{{std::make_shared<const adapter>(load_adapter(lora_path)), opt.lora_strength}};

  // 2. The devices: real accelerators when there are any, else a simulated GPU that is too small.
  const topology found = discover();
  std::uint64_t model_bytes = 0;
  for (const auto& [name, t] : named_tensors(*generated)) model_bytes += static_cast<std::uint64_t>(t.numel()) * t.element_size();
  device_pool pool;
  device_id compute = device_id::cpu();
  const device_info* gpu = nullptr;
  for (const auto& d : found.devices)
    if (d.id.kind == device_kind::cuda && gpu == nullptr) gpu = &d;
  if (gpu != nullptr) {
    compute = gpu->id;
    for (const auto& d : found.devices) pool.add(real_device(d));
  } else {
    compute = device_id::sim(0);
    pool.add(simulated_device(compute, model_bytes * 7 / 10, "simulated GPU (70% of the model)"));
    pool.add(real_device(found.devices.front()));
  }
  // Keep 35% of the model on the compute device; the tail goes to the CPU and streams.
  const std::string allocation = compute.str() + "," + std::to_string(model_bytes * 35 / 100) + "b;cpu,*";

  // 3. Load-Patch-Distribute the model from the files, then run it.
  distribute_spec spec;
  spec.compute = compute;
  spec.weights = {weights};
  spec.adapters = adapters;
  spec.streaming.prefetch_depth = opt.prefetch_depth;
  spec.progress = opt.progress;
  at::manual_seed(7);  // a different init: every weight the model uses must come from the file
  tiny_transformer model(opt.width, opt.hidden, opt.blocks);
  DistributedModule dm(model, pool, policy_from_string(allocation), spec);
  const c10::Device where = pool.at(compute).torch_device;
  at::Tensor out;
  for (int i = 0; i < opt.forwards; ++i) out = dm.forward(input.to(where));

  // 4. The same model undistributed, with the LoRA merged by lora/ directly, on the same device.
  at::manual_seed(11);
  tiny_transformer reference(opt.width, opt.hidden, opt.blocks);
  std::map<std::string, at::Tensor> merged;
  for (const auto& [name, t] : named_tensors(*reference))
    merged.emplace(name, weights->load(name).to(where, /*non_blocking=*/false, /*copy=*/true));
  patch(merged, adapters, where);
  for (const auto& p : reference->named_parameters(true)) p.value().set_data(merged.at(p.key()));
  for (const auto& b : reference->named_buffers(true)) b.value().set_data(merged.at(b.key()));
  const at::Tensor expected = reference->forward(input.to(where));

  result r;
  r.plan = dm.plan();
  r.stats = dm.stats();
  r.memory = dm.memory();
  r.devices = pool.topo().str();
  r.model_bytes = model_bytes;
  r.max_abs_diff = (out - expected).abs().max().to(at::kDouble).item<double>();
  r.bit_identical = out.sizes() == expected.sizes() && out.equal(expected);

  std::ostringstream text;
  text << "distorch demo: a " << opt.blocks << "-block transformer (" << format_bytes(model_bytes)
       << ") with a LoRA (strength " << opt.lora_strength << "), loaded from safetensors\n"
       << "devices: " << r.devices << "; computing on " << compute.str() << "\n"
       << "allocation: " << allocation << "\n\n"
       << format_plan_table(r.plan) << "\n"
       << "forward x" << opt.forwards << " with prefetch depth " << opt.prefetch_depth << ": " << r.stats.str() << "\n"
       << "memory:";
  for (const auto& m : r.memory) text << "  " << m.device.str() << " " << format_bytes(m.used) << " (peak " << format_bytes(m.peak) << ")";
  text << "\nmax |distributed - undistributed with LoRA merged| = " << r.max_abs_diff
       << (r.bit_identical ? " (bit-identical)" : " (NOT identical)") << "\n";
  r.report = text.str();

  nlohmann::json memory = nlohmann::json::array();
  for (const auto& m : r.memory)
    memory.push_back({{"device", m.device.str()}, {"used", m.used}, {"peak", m.peak}, {"capacity", m.capacity}});
  r.json = {{"plan", plan_to_json(r.plan)},
            {"allocation", allocation},
            {"compute", compute.str()},
            {"model_bytes", model_bytes},
            {"forwards", opt.forwards},
            {"prefetch_depth", opt.prefetch_depth},
            {"stats",
             {{"fetches", r.stats.fetches},
              {"bytes_fetched", r.stats.bytes_fetched},
              {"copy_seconds", r.stats.copy_seconds},
              {"wait_seconds", r.stats.wait_seconds},
              {"prefetch_hits", r.stats.prefetch_hits},
              {"prefetch_misses", r.stats.prefetch_misses},
              {"late_prefetches", r.stats.late_prefetches},
              {"releases", r.stats.releases}}},
            {"memory", memory},
            {"max_abs_diff", r.max_abs_diff},
            {"bit_identical", r.bit_identical}};
  return r;
}

}  // namespace demo
}  // namespace distorch::inline v0
