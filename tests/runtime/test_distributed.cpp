// DistributedModule: bit-identical parity for every policy form, prefetch depths 0/1/2, three
// model shapes, with and without LoRA; every adapter kind lora/ reads merged during the load and
// re-merged by strength changes; transactions under injected failures; replan; loading from
// safetensors and from GGUF (quantized units kept quantized at home or not); progress reports.
#include "models.hpp"

#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <set>

#include "distorch/io/gguf_source.hpp"
#include "distorch/io/open.hpp"
#include "distorch/io/torch_tensor.hpp"
#include "distorch/lora/adapter.hpp"
#include "distorch/lora/patcher.hpp"
#include "distorch/runtime/distributed_module.hpp"

#include <doctest/doctest.h>

#include "support/test_files.hpp"

namespace {

using distorch::device_id;

using test_models::twin;

std::shared_ptr<const distorch::adapter> make_adapter(std::string name, std::map<std::string, at::Tensor> tensors) {
  return std::make_shared<const distorch::adapter>(distorch::adapter::from_tensors(std::move(name), std::move(tensors)));
}

// A LoRA (kohya key names, alpha 2, rank 4) on every other weight of dimension >= 2.
distorch::adapter_set make_lora(torch::nn::Module& m, double strength = 0.7) {
  at::manual_seed(99);
  std::map<std::string, at::Tensor> tensors;
  int k = 0;
  const std::string suffix = ".weight";
  for (const auto& p : m.named_parameters(true)) {
    const auto& w = p.value();
    const auto& name = p.key();
    if (w.dim() < 2 || !name.ends_with(suffix) || (k++ % 2) != 0) continue;
    const std::string module = name.substr(0, name.size() - suffix.size());
    const std::int64_t rank = 4;
    tensors.emplace(module + ".lora_up.weight", at::randn({w.size(0), rank}).mul(0.1));
    tensors.emplace(module + ".lora_down.weight", at::randn({rank, w.numel() / w.size(0)}).mul(0.1));
    tensors.emplace(module + ".alpha", at::full({}, 2.0, at::kFloat));
  }
  return {{make_adapter("test-lora", std::move(tensors)), strength}};
}

// The reference: the model's own weights merged through lora/ directly (its stateless patch), with
// no runtime involved.
void merge_reference(torch::nn::Module& m, const distorch::adapter_set& adapters) {
  std::map<std::string, at::Tensor> tensors;
  for (const auto& p : m.named_parameters(true)) tensors.emplace(p.key(), p.value().detach().clone());
  distorch::patch(tensors, adapters, at::kCPU);
  for (const auto& p : m.named_parameters(true)) p.value().set_data(tensors.at(p.key()));
}

std::string gigabytes(std::uint64_t bytes) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.12f", static_cast<double>(bytes) / static_cast<double>(1ull << 30));
  return buffer;
}

// Every policy form, sized relative to the model so that all three devices get units.
std::vector<std::string> policy_forms(std::uint64_t model_bytes) {
  const auto b = [](std::uint64_t n) { return std::to_string(n) + "b"; };
  return {
      "sim:0," + b(model_bytes / 4) + ";sim:1," + b(model_bytes / 4) + ";cpu,*",  // bytes
      "sim:0,1%;sim:1,1%;cpu,2%",                                                 // ratio
      "sim:0,0.4;sim:1,0.5;cpu,0.5",                                               // fraction
      "sim:0;" + gigabytes(model_bytes / 2) + ";sim:1,cpu",                        // virtual VRAM
      "auto",                                                                     // auto
  };
}

template <class Module>
void check_parity(const char* shape_name, std::function<Module()> make, const at::Tensor& input) {
  auto probe = make();
  const auto probe_units = distorch::bind_units(*probe).units;
  const std::uint64_t model_bytes = probe_units.total_bytes();
  std::uint64_t largest_unit = 0;
  for (const auto& u : probe_units.units()) largest_unit = std::max(largest_unit, u.bytes);
  int streamed_forms = 0;
  for (const auto& policy : policy_forms(model_bytes)) {
    bool form_streamed = false;
    for (std::size_t depth : {0u, 1u, 2u}) {
      for (bool lora : {false, true}) {
        const std::string shape = shape_name;
        CAPTURE(shape);
        CAPTURE(policy);
        CAPTURE(depth);
        CAPTURE(lora);
        auto [model, reference] = twin(make);
        distorch::distribute_spec spec;
        spec.compute = device_id::sim(0);
        spec.streaming.prefetch_depth = depth;
        if (lora) {
          spec.adapters = make_lora(*model);
          merge_reference(*reference, spec.adapters);
        }
        // auto fills the compute device first, so it gets a small one; the others leave room.
        const std::uint64_t auto_capacity = model_bytes * 6 / 10 + (depth + 1) * largest_unit;
        auto pool = test_models::sim_pool(policy == "auto" ? auto_capacity : 2 * model_bytes, model_bytes / 3);
        distorch::DistributedModule dm(model, pool, distorch::policy_from_string(policy), spec);
        const at::Tensor expected = reference->forward(input);
        for (int pass = 0; pass < 2; ++pass) CHECK(test_models::bit_identical(dm.forward(input), expected));
        bool any_streamed = false;
        for (const auto& u : dm.plan().units) any_streamed = any_streamed || u.device != device_id::sim(0);
        // Whatever the planner decided, every streamed unit was fetched while the model ran.
        CHECK((dm.stats().fetches > 0) == any_streamed);
        form_streamed = form_streamed || any_streamed;
        CHECK(pool.peak(device_id::sim(0)) <= pool.capacity(device_id::sim(0)));
      }
    }
    streamed_forms += form_streamed ? 1 : 0;
  }
  CHECK(streamed_forms >= 3);  // most forms really spread this model
}

}  // namespace

TEST_CASE("parity: MLP stack, bit for bit, every policy form, depths 0/1/2, with and without LoRA") {
  check_parity<torch::nn::Sequential>("mlp", [] { return test_models::mlp_stack(32, 6); }, (test_models::deterministic(), at::randn({5, 32})));
}

TEST_CASE("parity: transformer with attention, bit for bit, every policy form, depths 0/1/2, with and without LoRA") {
  check_parity<distorch::demo::tiny_transformer>("transformer", [] { return test_models::transformer(); },
                                                 (test_models::deterministic(), at::randn({2, 5, 16})));
}

TEST_CASE("parity: conv net, bit for bit, every policy form, depths 0/1/2, with and without LoRA") {
  check_parity<torch::nn::Sequential>("conv", [] { return test_models::conv_net(); },
                                      (test_models::deterministic(), at::randn({2, 3, 8, 8})));
}

TEST_CASE("load is transactional: a failure at any allocation of any unit leaves the model intact and nothing booked") {
  auto [model, reference] = twin([] { return test_models::transformer(); });
  const std::uint64_t before = test_models::checksum(*model);
  std::vector<const void*> pointers;
  for (const auto& p : model->named_parameters(true)) pointers.push_back(p.value().data_ptr());
  const std::uint64_t model_bytes = distorch::bind_units(*model).units.total_bytes();

  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.adapters = make_lora(*model);
  const std::string policy = "sim:0," + std::to_string(model_bytes / 3) + "b;sim:1," + std::to_string(model_bytes / 3) + "b;cpu,*";

  // Count the allocations of a successful load first.
  std::size_t total = 0;
  {
    auto pool = test_models::sim_pool(model_bytes, model_bytes);
    pool.set_probe([&](const device_id&, std::uint64_t, std::string_view) { ++total; });
    auto [m, r] = twin([] { return test_models::transformer(); });
    distorch::DistributedModule dm(m, pool, distorch::policy_from_string(policy), spec);
  }
  const std::size_t units = distorch::bind_units(*model).units.size();
  REQUIRE(total >= units);

  std::set<std::string> failed_units;
  for (std::size_t k = 0; k < total; ++k) {
    CAPTURE(k);
    auto pool = test_models::sim_pool(model_bytes, model_bytes);
    std::size_t n = 0;
    pool.set_probe([&](const device_id& d, std::uint64_t, std::string_view doing) {
      if (n++ == k) {
        failed_units.insert(std::string(doing));
        throw distorch::device_error({std::string(doing), d.str(), std::nullopt, "injected failure", "none: this is a test"});
      }
    });
    CHECK_THROWS_AS(distorch::DistributedModule(model, pool, distorch::policy_from_string(policy), spec), distorch::device_error);
    CHECK(test_models::checksum(*model) == before);
    std::size_t i = 0;
    for (const auto& p : model->named_parameters(true)) CHECK(p.value().data_ptr() == pointers[i++]);
    for (const auto& d : pool.devices()) CHECK(d.budget->used() == 0);
  }
  // Every unit had a failure injected into its load.
  const auto bound = distorch::bind_units(*model);
  for (const auto& u : bound.units.units()) {
    CAPTURE(u.name);
    CHECK(std::any_of(failed_units.begin(), failed_units.end(),
                      [&](const std::string& doing) { return doing.find("'" + u.name + "'") != std::string::npos; }));
  }

  // A bad adapter in the middle of the model (its factors do not fit blocks.1.fc1.weight):
  // lora_error naming the key, before any tensor moves; model intact, nothing booked.
  spec.adapters = make_lora(*model);
  spec.adapters.push_back({make_adapter("bad", {{"blocks.1.fc1.lora_up.weight", at::randn({3, 2})},
                                                {"blocks.1.fc1.lora_down.weight", at::randn({2, 5})}}),
                           1.0});
  auto pool = test_models::sim_pool(model_bytes, model_bytes);
  std::size_t reservations = 0;
  pool.set_probe([&](const device_id&, std::uint64_t, std::string_view) { ++reservations; });
  try {
    distorch::DistributedModule dm(model, pool, distorch::policy_from_string(policy), spec);
    FAIL("expected lora_error");
  } catch (const distorch::lora_error& e) {
    CHECK(e.info().subject == "blocks.1.fc1.lora_up.weight");
    CHECK(e.info().problem.find("blocks.1.fc1.weight") != std::string::npos);
  }
  pool.set_probe({});
  CHECK(reservations == 0);
  CHECK(test_models::checksum(*model) == before);
  std::size_t j = 0;
  for (const auto& p : model->named_parameters(true)) CHECK(p.value().data_ptr() == pointers[j++]);
  for (const auto& d : pool.devices()) CHECK(d.budget->used() == 0);

  // And the model still loads and matches afterwards.
  spec.adapters = {};
  distorch::DistributedModule dm(model, pool, distorch::policy_from_string(policy), spec);
  const at::Tensor x = at::randn({1, 3, 16});
  CHECK(test_models::bit_identical(dm.forward(x), reference->forward(x)));
}

TEST_CASE("replan moves units without reloading, keeps parity, and rolls back on failure") {
  auto [model, reference] = twin([] { return test_models::mlp_stack(32, 6); });
  const std::uint64_t model_bytes = distorch::bind_units(*model).units.total_bytes();
  auto pool = test_models::sim_pool(model_bytes, model_bytes);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0," + std::to_string(model_bytes / 2) + "b;cpu,*"), spec);
  const at::Tensor x = at::randn({4, 32});
  const at::Tensor expected = reference->forward(x);
  CHECK(test_models::bit_identical(dm.forward(x), expected));
  const auto first = dm.plan();

  dm.replan(distorch::policy_from_string("sim:0," + std::to_string(model_bytes / 4) + "b;sim:1,*"));
  CHECK(dm.plan() != first);
  CHECK(test_models::bit_identical(dm.forward(x), expected));
  std::uint64_t on_sim1 = 0, on_cpu = 0;
  for (const auto& u : dm.plan().units) {
    if (u.device == device_id::sim(1)) on_sim1 += u.bytes;
    if (u.device == device_id::cpu()) on_cpu += u.bytes;
  }
  CHECK(on_sim1 > 0);
  CHECK(on_cpu == 0);
  CHECK(pool.used(device_id::sim(1)) == on_sim1);
  CHECK(pool.used(device_id::cpu()) == 0);

  // A failure half way through a replan: no unit moved, nothing leaked, still correct. (A replan
  // attempt drops the copies fetched ahead for the next forward, so count without them.)
  dm.residency().release_all();
  const auto before_plan = dm.plan();
  const auto used0 = pool.used(device_id::sim(0)), used1 = pool.used(device_id::sim(1));
  std::size_t n = 0;
  pool.set_probe([&](const device_id& d, std::uint64_t, std::string_view doing) {
    if (n++ == 2) throw distorch::device_error({std::string(doing), d.str(), std::nullopt, "injected", "none"});
  });
  CHECK_THROWS_AS(dm.replan(distorch::policy_from_string("sim:0,1%;cpu,3%")), distorch::device_error);
  pool.set_probe({});
  CHECK(dm.plan() == before_plan);
  CHECK(pool.used(device_id::sim(0)) == used0);
  CHECK(pool.used(device_id::sim(1)) == used1);
  CHECK(pool.used(device_id::cpu()) == 0);
  CHECK(test_models::bit_identical(dm.forward(x), expected));
}

TEST_CASE("set_strengths and set_adapters re-merge only the units the adapters touch") {
  auto [model, reference] = twin([] { return test_models::mlp_stack(32, 6); });
  const std::uint64_t model_bytes = distorch::bind_units(*model).units.total_bytes();
  auto pool = test_models::sim_pool(model_bytes, model_bytes);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.adapters = make_lora(*model, 0.5);
  distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0," + std::to_string(model_bytes / 2) + "b;sim:1,*"), spec);
  const at::Tensor x = at::randn({4, 32});

  dm.set_strengths({{"test-lora", 1.25}});
  std::vector<std::size_t> touched;
  for (std::size_t i = 0; i < dm.units().size(); ++i)
    for (const auto& t : dm.units()[i].tensors)
      if (dm.adapter_binding().patches_for(t.name) != nullptr) touched.push_back(i);
  CHECK(dm.last_remerged() == touched);
  CHECK(touched.size() < dm.units().size());
  auto [unused, fresh] = twin([] { return test_models::mlp_stack(32, 6); });
  merge_reference(*fresh, make_lora(*fresh, 1.25));
  CHECK(test_models::bit_identical(dm.forward(x), fresh->forward(x)));

  // An unknown adapter name: lora_error, nothing re-merged.
  CHECK_THROWS_AS(dm.set_strengths({{"no-such-adapter", 1.0}}), distorch::lora_error);
  CHECK(test_models::bit_identical(dm.forward(x), fresh->forward(x)));

  // Removing every adapter restores the unpatched weights bit for bit.
  dm.set_adapters({});
  CHECK(dm.last_remerged() == touched);
  auto [unused2, plain] = twin([] { return test_models::mlp_stack(32, 6); });
  CHECK(test_models::bit_identical(dm.forward(x), plain->forward(x)));
}

namespace {

// One adapter of each kind lora/ reads, each on its own Linear of mlp_stack(32, 6) (modules "0",
// "2", "4", "6", "8", "10"): LoHa on 0, LoKr on 4, DoRA on 6, and full diffs (weight + bias) with a
// set_weight on 8 and 10.
distorch::adapter_set every_kind() {
  at::manual_seed(4321);
  auto r = [](std::initializer_list<std::int64_t> shape, double scale) { return at::randn(shape).mul(scale); };
  auto scalar = [](double v) { return at::full({}, v, at::kFloat); };
  auto loha = make_adapter("loha", {{"0.hada_w1_a", r({32, 4}, 0.3)}, {"0.hada_w1_b", r({4, 32}, 0.3)},
                                    {"0.hada_w2_a", r({32, 4}, 0.3)}, {"0.hada_w2_b", r({4, 32}, 0.3)}, {"0.alpha", scalar(2)}});
  auto lokr = make_adapter("lokr", {{"4.lokr_w1", r({4, 4}, 0.2)}, {"4.lokr_w2_a", r({8, 2}, 0.2)}, {"4.lokr_w2_b", r({2, 8}, 0.2)},
                                    {"4.alpha", scalar(1)}});
  auto dora = make_adapter("dora", {{"6.lora_up.weight", r({32, 4}, 0.1)}, {"6.lora_down.weight", r({4, 32}, 0.1)},
                                    {"6.alpha", scalar(4)}, {"6.dora_scale", r({32, 1}, 0.2).add(1.0)}});
  auto diff = make_adapter("diff", {{"8.diff", r({32, 32}, 0.05)}, {"8.diff_b", r({32}, 0.05)}, {"10.set_weight", r({32, 32}, 0.1)}});
  return {{loha, 0.9}, {lokr, 0.6}, {dora, 0.8}, {diff, 1.1}};
}

}  // namespace

TEST_CASE("LoHa, LoKr, DoRA, diff and set_weight adapters merge during the load, bit-identical to lora/ merging directly") {
  const auto all = every_kind();
  std::vector<distorch::adapter_set> cases;
  for (const auto& use : all) cases.push_back({use});
  cases.push_back(all);
  for (const auto& adapters : cases) {
    CAPTURE(adapters.size());
    CAPTURE(adapters.front().file->name());
    auto [model, reference] = twin([] { return test_models::mlp_stack(32, 6); });
    const std::uint64_t model_bytes = distorch::bind_units(*model).units.total_bytes();
    merge_reference(*reference, adapters);
    for (std::size_t depth : {0u, 2u}) {
      CAPTURE(depth);
      auto [m, unused] = twin([] { return test_models::mlp_stack(32, 6); });
      auto pool = test_models::sim_pool(model_bytes, model_bytes);
      distorch::distribute_spec spec;
      spec.compute = device_id::sim(0);
      spec.adapters = adapters;
      spec.streaming.prefetch_depth = depth;
      const std::string third = std::to_string(model_bytes / 3) + "b";
      distorch::DistributedModule dm(m, pool, distorch::policy_from_string("sim:0," + third + ";sim:1," + third + ";cpu,*"), spec);
      std::set<device_id> homes;
      for (const auto& u : dm.plan().units) homes.insert(u.device);
      CHECK(homes.size() == 3);  // resident, donor-GPU and host homes all took patched units
      const at::Tensor x = (test_models::deterministic(), at::randn({5, 32}));
      for (int pass = 0; pass < 2; ++pass) CHECK(test_models::bit_identical(dm.forward(x), reference->forward(x)));
      CHECK(dm.adapter_binding().report().unmatched.empty());
    }
  }
}

TEST_CASE("set_strengths on one adapter re-merges only its units from the pristine weights; strength 0 is no adapter, bit for bit") {
  auto [model, plain] = twin([] { return test_models::mlp_stack(32, 6); });
  const std::uint64_t model_bytes = distorch::bind_units(*model).units.total_bytes();
  auto pool = test_models::sim_pool(model_bytes, model_bytes);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.adapters = every_kind();
  distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0," + std::to_string(model_bytes / 3) + "b;cpu,*"), spec);
  const at::Tensor x = (test_models::deterministic(), at::randn({3, 32}));

  // Tensors whose home copy is replaced show up as new data pointers; every other stays put.
  auto pointers = [&] {
    std::map<std::string, const void*> out;
    for (const auto& [name, device, ptr] : dm.fingerprint()) out[name] = ptr;
    return out;
  };
  const auto unit_of = [&](const std::string& module) {
    for (std::size_t i = 0; i < dm.units().size(); ++i)
      if (dm.units()[i].name == module) return i;
    FAIL("no unit " << module);
    return std::size_t{0};
  };
  for (const auto& [adapter_name, module] : std::vector<std::pair<std::string, std::string>>{{"lokr", "4"}, {"dora", "6"}, {"loha", "0"}}) {
    CAPTURE(adapter_name);
    const auto before = pointers();
    dm.set_strengths({{adapter_name, 0.35}});
    CHECK(dm.last_remerged() == std::vector<std::size_t>{unit_of(module)});
    const auto after = pointers();
    for (const auto& [name, ptr] : before) {
      CAPTURE(name);
      CHECK((ptr != after.at(name)) == name.starts_with(module + "."));
    }
  }
  // The diff adapter touches two units (8 and 10).
  dm.set_strengths({{"diff", 0.5}});
  CHECK(dm.last_remerged() == std::vector<std::size_t>{unit_of("8"), unit_of("10")});
  // Unchanged strengths re-merge nothing.
  dm.set_strengths({{"diff", 0.5}});
  CHECK(dm.last_remerged().empty());

  auto expected = every_kind();
  for (auto& use : expected) use.strength = use.file->name() == "diff" ? 0.5 : 0.35;
  auto [unused, merged] = twin([] { return test_models::mlp_stack(32, 6); });
  merge_reference(*merged, expected);
  CHECK(test_models::bit_identical(dm.forward(x), merged->forward(x)));

  // Every strength 0 (by index this time): the unpatched model, bit for bit, DoRA and set_weight included.
  for (std::size_t k = 0; k < dm.spec().adapters.size(); ++k) dm.set_strength(k, 0.0);
  CHECK(test_models::bit_identical(dm.forward(x), plain->forward(x)));
  CHECK_THROWS_AS(dm.set_strength(dm.spec().adapters.size(), 1.0), distorch::lora_error);

  // A replacement set that does not fit: lora_error, and the model keeps its weights.
  CHECK_THROWS_AS(dm.set_adapters({{make_adapter("wrong", {{"2.diff", at::randn({32, 31})}}), 1.0}}), distorch::lora_error);
  CHECK(test_models::bit_identical(dm.forward(x), plain->forward(x)));
  CHECK(dm.spec().adapters.size() == 4);
}

TEST_CASE("weights load from safetensors files unit by unit; a missing tensor fails before anything moves") {
  auto [generated, reference] = twin([] { return test_models::transformer(); });
  distorch_test::temp_dir dir{"runtime"};
  const std::string path = dir / "model.safetensors";
  distorch::save_safetensors(path, distorch::demo::named_tensors(*generated));
  std::shared_ptr<const distorch::weight_source> source = distorch::open_weights(path);

  at::manual_seed(5);
  auto model = test_models::transformer();  // different values: they must come from the file
  const std::uint64_t model_bytes = distorch::bind_units(*model).units.total_bytes();
  auto pool = test_models::sim_pool(model_bytes, model_bytes);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.weights = {source};
  spec.streaming.prefetch_depth = 2;
  std::vector<std::tuple<std::string, std::uint64_t, std::uint64_t, std::string>> reports;
  spec.progress = [&](const distorch::progress_report& r) {
    reports.emplace_back(std::string(r.task), r.done, r.total, std::string(r.unit));
  };
  {
    distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0,30%;sim:1,30%;cpu,40%"), spec);
    // One "loading" report per unit, counting up to the number of units.
    const std::uint64_t n = dm.units().size();
    REQUIRE(reports.size() == n);
    for (std::uint64_t i = 0; i < n; ++i) CHECK((reports[i] == std::make_tuple(std::string("loading"), i + 1, n, std::string("units"))));
    const at::Tensor x = at::randn({2, 4, 16});
    CHECK(test_models::bit_identical(dm.forward(x), reference->forward(x)));
    // Peak on the compute device: its resident units + at most one unit in flight (+ the window).
    std::uint64_t resident = 0, largest = 0;
    for (const auto& u : dm.plan().units) {
      if (u.device == device_id::sim(0)) resident += u.bytes;
      largest = std::max(largest, u.bytes);
    }
    CHECK(pool.peak(device_id::sim(0)) <= resident + 3 * largest);
    CHECK(pool.peak(device_id::sim(0)) < model_bytes);
  }

  // A file that lacks a tensor: format_error naming it, model untouched.
  auto tensors = distorch::demo::named_tensors(*generated);
  tensors.erase(tensors.begin() + 3);
  const std::string missing_name = distorch::demo::named_tensors(*generated)[3].first;
  const std::string partial = dir / "partial.safetensors";
  distorch::save_safetensors(partial, tensors);
  at::manual_seed(6);
  auto other = test_models::transformer();
  const auto before = test_models::checksum(*other);
  spec.weights = {distorch::open_weights(partial)};
  spec.progress = {};
  try {
    distorch::DistributedModule dm(other, pool, distorch::policy_from_string("sim:0,30%;cpu,70%"), spec);
    FAIL("expected format_error");
  } catch (const distorch::format_error& e) {
    CHECK(e.info().subject == missing_name);
  }
  CHECK(test_models::checksum(*other) == before);
  for (const auto& d : pool.devices()) CHECK(d.budget->used() == 0);
}

namespace {

// `write_mlp_gguf.py OUT WIDTH DEPTH`: a GGUF v3 file with the tensors of mlp_stack(WIDTH, DEPTH),
// written byte by byte from the specification (numpy only, independent of distorch): the weights
// of Linear 0, 4, ... in Q8_0, of Linear 2, 6, ... in Q4_0, every bias in F32.
constexpr const char* mlp_gguf_script = R"PY(
import struct, sys
import numpy as np

out, width, depth = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(20241122)

def gstr(s):
    b = s.encode()
    return struct.pack('<Q', len(b)) + b

def q8_0(n):
    # per block of 32: an fp16 scale d and 32 int8 quants; value = q * d
    blocks = n // 32
    d = rng.uniform(0.0005, 0.004, blocks).astype(np.float16)
    qs = rng.integers(-127, 128, (blocks, 32), dtype=np.int8)
    return b''.join(d[b:b + 1].tobytes() + qs[b].tobytes() for b in range(blocks))

def q4_0(n):
    # per block of 32: d and 16 bytes; element j < 16 is the low nibble of byte j, j + 16 its high one
    blocks = n // 32
    d = rng.uniform(0.001, 0.03, blocks).astype(np.float16)
    nib = rng.integers(0, 16, (blocks, 32))
    packed = (nib[:, :16] | (nib[:, 16:] << 4)).astype(np.uint8)
    return b''.join(d[b:b + 1].tobytes() + packed[b].tobytes() for b in range(blocks))

tensors = []
for i in range(depth):
    name = str(2 * i)
    quantized = q8_0 if i % 2 == 0 else q4_0
    tensors.append((name + '.weight', [width, width], 8 if i % 2 == 0 else 2, quantized(width * width)))
    tensors.append((name + '.bias', [width], 0, rng.standard_normal(width).astype(np.float32).tobytes()))

alignment = 32
kvs = [gstr('general.architecture') + struct.pack('<I', 8) + gstr('distorch-test'),
       gstr('general.alignment') + struct.pack('<II', 4, alignment)]
blob = b'GGUF' + struct.pack('<IQQ', 3, len(tensors), len(kvs)) + b''.join(kvs)
offset = 0
for name, dims, type_id, data in tensors:
    blob += gstr(name) + struct.pack('<I', len(dims)) + b''.join(struct.pack('<q', d) for d in reversed(dims))
    blob += struct.pack('<IQ', type_id, offset)
    offset += (len(data) + alignment - 1) // alignment * alignment
blob += b'\0' * ((-len(blob)) % alignment)
for _, _, _, data in tensors:
    blob += data + b'\0' * ((-len(data)) % alignment)
with open(out, 'wb') as f:
    f.write(blob)
print('OK')
)PY";

std::string write_mlp_gguf(const distorch_test::temp_dir& dir, int width, int depth) {
  dir.write("write_mlp_gguf.py", mlp_gguf_script);
  const std::string path = dir / "mlp.gguf";
  const std::string command = distorch_test::python() + " " + (dir / "write_mlp_gguf.py") + " " + path + " " +
                              std::to_string(width) + " " + std::to_string(depth) + " > " + (dir / "log.txt") + " 2>&1";
  if (std::system(command.c_str()) != 0) FAIL("the Python GGUF writer failed: " << distorch_test::read_file(dir / "log.txt"));
  return path;
}

// The reference: a plain model whose weights are the file's, dequantized by io/ and loaded as is.
void load_dequantized(torch::nn::Module& m, const distorch::weight_source& file) {
  for (const auto& p : m.named_parameters(true)) p.value().set_data(file.load(p.key()));
}

}  // namespace

TEST_CASE("GGUF: quantized units stay quantized at home with keep_quantized, are dequantized after the fetch, and match io/'s dequantization bit for bit") {
  constexpr int width = 64, depth = 4;
  distorch_test::temp_dir dir{"runtime-gguf"};
  const std::string path = write_mlp_gguf(dir, width, depth);
  std::shared_ptr<const distorch::gguf_source> file = std::make_shared<distorch::gguf_source>(path);
  auto reference = test_models::mlp_stack(width, depth);
  load_dequantized(*reference, *file);
  const at::Tensor x = (test_models::deterministic(), at::randn({3, width}));
  const at::Tensor expected = reference->forward(x);

  const std::uint64_t model_bytes = distorch::bind_units(*reference).units.total_bytes();
  const std::uint64_t unit_bytes = model_bytes / depth;
  // The head unit stays on the compute device, the other three stream from the CPU.
  const std::string policy = "sim:0," + std::to_string(unit_bytes) + "b;cpu,*";
  // The stored size of a unit: its weight as the file holds it (in whole float32 words: the blocks
  // rest in a float32 carrier) plus its float32 bias.
  auto stored_bytes = [&](const std::string& module) { return (file->info(module + ".weight").bytes + 3) / 4 * 4 + width * 4; };

  struct outcome {
    std::uint64_t fetched_per_forward = 0;
    std::uint64_t streamed_home_bytes = 0;  // the plan's bytes of the units not on the compute device
    std::uint64_t cpu_used = 0;
  };
  auto run = [&](bool keep_quantized, const distorch::adapter_set& adapters, const at::Tensor& want) {
    CAPTURE(keep_quantized);
    at::manual_seed(17);
    auto model = test_models::mlp_stack(width, depth);  // other values: every weight must come from the file
    auto pool = test_models::sim_pool(2 * model_bytes);
    distorch::distribute_spec spec;
    spec.compute = device_id::sim(0);
    spec.weights = {file};
    spec.keep_quantized = keep_quantized;
    spec.adapters = adapters;
    distorch::DistributedModule dm(model, pool, distorch::policy_from_string(policy), spec);
    REQUIRE(dm.plan().units.size() == depth);
    CHECK(dm.plan().units[0].device == device_id::sim(0));
    for (std::size_t i = 1; i < depth; ++i) CHECK(dm.plan().units[i].device == device_id::cpu());
    outcome o;
    for (const auto& u : dm.plan().units)
      if (u.device != device_id::sim(0)) o.streamed_home_bytes += u.bytes;
    o.cpu_used = pool.used(device_id::cpu());
    CHECK(test_models::bit_identical(dm.forward(x), want));
    dm.reset_stats();
    CHECK(test_models::bit_identical(dm.forward(x), want));
    o.fetched_per_forward = dm.stats().bytes_fetched;
    // Compute-homed and dequantized units hold float32 on sim:0; nothing fetched stays there but
    // what was fetched ahead for the next forward.
    CHECK(pool.used(device_id::sim(0)) == unit_bytes + test_models::fetched_ahead(dm.residency()));
    CHECK(pool.peak(device_id::sim(0)) <= pool.capacity(device_id::sim(0)));

    // Moving every unit to the compute device dequantizes the quantized ones there; parity holds.
    dm.replan(distorch::policy_from_string("sim:0," + std::to_string(model_bytes + 16) + "b;cpu,*"));
    for (const auto& u : dm.plan().units) CHECK(u.device == device_id::sim(0));
    CHECK(pool.used(device_id::sim(0)) == model_bytes);
    CHECK(pool.used(device_id::cpu()) == 0);
    CHECK(test_models::bit_identical(dm.forward(x), want));
    return o;
  };

  const outcome full = run(false, {}, expected);
  const outcome compact = run(true, {}, expected);
  const std::uint64_t quantized_streamed = stored_bytes("2") + stored_bytes("4") + stored_bytes("6");
  CHECK(full.streamed_home_bytes == 3 * unit_bytes);
  CHECK(full.fetched_per_forward == 3 * unit_bytes);
  CHECK(full.cpu_used == 3 * unit_bytes);
  CHECK(compact.streamed_home_bytes == quantized_streamed);
  CHECK(compact.fetched_per_forward == quantized_streamed);
  CHECK(compact.cpu_used == quantized_streamed);
  CHECK(compact.fetched_per_forward * 3 < full.fetched_per_forward);  // Q8_0 / Q4_0 are ~4-7x smaller than float32

  // An adapter on a streamed quantized weight: that weight is dequantized, merged and kept in
  // float32 at home (no exact re-quantization exists); the others stay quantized.
  at::manual_seed(5);
  const distorch::adapter_set lora{{make_adapter("on-4", {{"4.lora_up.weight", at::randn({width, 4}).mul(0.05)},
                                                          {"4.lora_down.weight", at::randn({4, width}).mul(0.05)}}),
                                    0.75}};
  auto merged = test_models::mlp_stack(width, depth);
  load_dequantized(*merged, *file);
  merge_reference(*merged, lora);
  const at::Tensor expected_merged = merged->forward(x);
  CHECK_FALSE(test_models::bit_identical(expected_merged, expected));
  const outcome patched = run(true, lora, expected_merged);
  CHECK(patched.streamed_home_bytes == stored_bytes("2") + unit_bytes + stored_bytes("6"));
  CHECK(patched.fetched_per_forward == patched.streamed_home_bytes);
}

TEST_CASE("Load-Patch-Distribute sends a tensor over the compute device's link only when an adapter patches it") {
  auto [model, reference] = twin([] { return test_models::mlp_stack(32, 6); });
  const auto adapters = make_lora(*model);  // patches every other weight
  merge_reference(*reference, adapters);
  auto pool = test_models::sim_pool(1 << 20);
  std::uint64_t to_compute = 0;
  pool.set_probe([&](const device_id& id, std::uint64_t bytes, std::string_view) {
    if (id == device_id::sim(0)) to_compute += bytes;
  });
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.adapters = adapters;
  distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0,30%;cpu,70%"), spec);
  pool.set_probe({});
  // What had to cross: the resident units, and of the others only the tensors an adapter patches.
  std::uint64_t resident = 0, patched_elsewhere = 0;
  for (std::size_t i = 0; i < dm.units().size(); ++i) {
    const auto& u = dm.units().units()[i];
    if (dm.plan().units[i].device == device_id::sim(0)) {
      resident += u.bytes;
      continue;
    }
    for (const auto& t : u.tensors)
      if (dm.adapter_binding().patches_for(t.name) != nullptr) patched_elsewhere += t.bytes;
  }
  CHECK(resident > 0);
  CHECK(patched_elsewhere > 0);
  CHECK(to_compute == resident + patched_elsewhere);
  CHECK(to_compute < dm.units().total_bytes());
  const at::Tensor x = at::randn({3, 32});
  CHECK(test_models::bit_identical(dm.forward(x), reference->forward(x)));
}
