// Streaming: nn::Streamed keeps forward signatures, donor-homed units are resident exactly while
// they run, the learned order drives prefetch, no simulated device exceeds its capacity, and
// views::streamed stages blocks of a custom loop.
#include "models.hpp"

#include <torch/nn/modules/container/any.h>

#include "distorch/placement/planner.hpp"
#include "distorch/runtime/distributed_module.hpp"
#include "distorch/runtime/streamed_view.hpp"
#include "support/captured_log.hpp"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "distorch/memory/accounting_allocator.hpp"
#include "distorch/runtime/host_staging.hpp"
#include "distorch/runtime/staging_ring.hpp"

#include <doctest/doctest.h>

#include <chrono>

#include <algorithm>
#include <set>
#include <sstream>
#include <type_traits>

using distorch::device_id;

TEST_CASE("Streamed<Impl>::forward has exactly Impl::forward's parameter and result types") {
  using S = distorch::nn::Streamed<torch::nn::LinearImpl>;
  static_assert(std::is_same_v<decltype(&S::forward), at::Tensor (S::*)(const at::Tensor&)>);
  using C = distorch::nn::Streamed<torch::nn::ConvTranspose2dImpl>;
  static_assert(std::is_same_v<decltype(&C::forward),
                               at::Tensor (C::*)(const at::Tensor&, const c10::optional<at::IntArrayRef>&)>);
  using L = distorch::nn::Streamed<torch::nn::LSTMImpl>;
  static_assert(std::is_base_of_v<torch::nn::LSTMImpl, L>);
  // Every alias names a streamed implementation of its LibTorch layer.
  static_assert(std::is_base_of_v<torch::nn::MultiheadAttentionImpl, distorch::nn::MultiheadAttention::ContainedType>);
  static_assert(std::is_base_of_v<torch::nn::BatchNorm3dImpl, distorch::nn::BatchNorm3d::ContainedType>);
  static_assert(std::is_base_of_v<torch::nn::EmbeddingBagImpl, distorch::nn::EmbeddingBag::ContainedType>);
  static_assert(std::is_base_of_v<torch::nn::TransformerImpl, distorch::nn::Transformer::ContainedType>);
  static_assert(std::is_base_of_v<torch::nn::GRUCellImpl, distorch::nn::GRUCell::ContainedType>);
  // The norm layers link and print as LibTorch prints them.
  distorch::nn::BatchNorm1d bn(4);
  distorch::nn::InstanceNorm2d in(torch::nn::InstanceNorm2dOptions(3));
  std::ostringstream text;
  text << *bn << ' ' << *in;
  CHECK(text.str() == "torch::nn::BatchNorm1d(4, eps=1e-05, momentum=0.1, affine=true, track_running_stats=true) "
                      "torch::nn::InstanceNorm2d(3, eps=1e-05, momentum=0.1, affine=false, track_running_stats=false)");
}

TEST_CASE("unattached streamed layers compute what the LibTorch layers compute, also inside Sequential and AnyModule") {
  test_models::deterministic();
  distorch::nn::Linear streamed(8, 4);
  torch::nn::Linear plain(8, 4);
  plain->weight.set_data(streamed->weight.detach().clone());
  plain->bias.set_data(streamed->bias.detach().clone());
  const at::Tensor x = at::randn({3, 8});
  CHECK(test_models::bit_identical(streamed(x), plain(x)));

  torch::nn::Sequential seq(streamed, torch::nn::ReLU());
  CHECK(test_models::bit_identical(seq->forward(x), plain(x).relu()));

  // MultiheadAttention: AnyModule fills its default arguments through the inherited declaration.
  distorch::nn::MultiheadAttention mha(torch::nn::MultiheadAttentionOptions(8, 2));
  torch::nn::AnyModule any(mha);
  const at::Tensor q = at::randn({5, 1, 8});
  auto [out, weights] = any.forward<std::tuple<at::Tensor, at::Tensor>>(q, q, q);
  auto [direct, direct_weights] = mha->forward(q, q, q, {}, true, {}, true);
  CHECK(test_models::bit_identical(out, direct));
  CHECK(test_models::bit_identical(weights, direct_weights));
}

namespace {

// A Linear that calls back at the start of its forward, to look at residency from the inside.
struct probe_linear_impl : torch::nn::LinearImpl {
  using torch::nn::LinearImpl::LinearImpl;
  std::function<void()> on_forward;
  at::Tensor forward(const at::Tensor& x) {
    if (on_forward) on_forward();
    return torch::nn::LinearImpl::forward(x);
  }
};
using probe_linear = torch::nn::ModuleHolder<distorch::nn::Streamed<probe_linear_impl>>;

struct probe_model_impl : torch::nn::Module {
  std::vector<probe_linear> layers;
  explicit probe_model_impl(int n) {
    for (int i = 0; i < n; ++i) layers.push_back(register_module("l" + std::to_string(i), probe_linear(16, 16)));
  }
  at::Tensor forward(at::Tensor x) {
    for (auto& l : layers) x = l(x).tanh();
    return x;
  }
};
TORCH_MODULE_IMPL(probe_model, probe_model_impl);

// Plan: every other unit on the donor sim:1, the rest on the compute device sim:0.
distorch::placement_plan alternate_plan(const distorch::inventory& inv) {
  distorch::placement_plan plan;
  plan.compute = device_id::sim(0);
  plan.policy = "alternate (test)";
  for (std::size_t i = 0; i < inv.size(); ++i)
    plan.units.push_back({inv[i].name, i % 2 == 1 ? device_id::sim(1) : device_id::sim(0), inv[i].bytes,
                          distorch::placement_reason::policy});
  return plan;
}

}  // namespace

TEST_CASE("a donor-homed unit is resident exactly while it runs, and fetch and release show in the accounting") {
  for (std::size_t depth : {0u, 1u, 2u}) {
    CAPTURE(depth);
    test_models::deterministic();
    probe_model model(6);
    probe_model reference(6);
    for (std::size_t i = 0; i < model->layers.size(); ++i) {
      reference->layers[i]->weight.set_data(model->layers[i]->weight.detach().clone());
      reference->layers[i]->bias.set_data(model->layers[i]->bias.detach().clone());
    }
    auto pool = test_models::sim_pool(1 << 20);
    distorch::distribute_spec spec;
    spec.compute = device_id::sim(0);
    spec.streaming.prefetch_depth = depth;
    const auto inv = distorch::bind_units(*model).units;
    distorch::DistributedModule<probe_model> dm(model, pool, alternate_plan(inv), spec);
    auto& manager = dm.residency();

    std::uint64_t resident_bytes = 0;
    for (std::size_t i = 0; i < inv.size(); ++i)
      if (!manager.streams(i)) resident_bytes += inv[i].bytes;
    CHECK(pool.used(device_id::sim(0)) == resident_bytes);

    int checked = 0;
    for (std::size_t i = 0; i < model->layers.size(); ++i) {
      auto* layer = model->layers[i].get();
      const std::size_t unit = dm.units_of(*layer).at(0);
      const void* home_ptr = manager.unit(unit).home_data.at(0).data.data_ptr();
      layer->on_forward = [&, unit, layer, home_ptr] {
        for (std::size_t u = 0; u < manager.size(); ++u) {
          if (!manager.streams(u)) continue;
          CHECK(manager.resident(u) == (u == unit));  // exactly the running unit is staged
        }
        if (manager.streams(unit)) {
          CHECK(layer->weight.data_ptr() != home_ptr);  // a separate copy on sim:0
          CHECK(layer->weight.device().is_cpu());
        }
        std::uint64_t fetched = 0;
        for (std::size_t u = 0; u < manager.size(); ++u)
          if (manager.streams(u) && manager.fetched(u)) fetched += inv[u].bytes;
        CHECK(pool.used(device_id::sim(0)) == resident_bytes + fetched);
        ++checked;
      };
    }
    const at::Tensor x = at::randn({4, 16});
    for (int pass = 0; pass < 2; ++pass) {
      const at::Tensor y = dm.forward(x);
      CHECK(test_models::bit_identical(y, reference->forward(x)));
      for (std::size_t u = 0; u < manager.size(); ++u) CHECK(!manager.resident(u) == manager.streams(u));
      // Everything that ran was released; with depth > 0 the next forward's first units are fetched ahead.
      std::uint64_t ahead = 0;
      for (std::size_t u = 0; u < manager.size(); ++u)
        if (manager.streams(u) && manager.fetched(u)) ahead += inv[u].bytes;
      CHECK(pool.used(device_id::sim(0)) == resident_bytes + ahead);
      CHECK((depth == 0) == (ahead == 0));
    }
    CHECK(checked == 12);
    CHECK(pool.peak(device_id::sim(0)) <= pool.capacity(device_id::sim(0)));
    for (auto& l : model->layers) l->on_forward = nullptr;
  }
}

TEST_CASE("the execution order is learned on the first forward and drives prefetch on the second") {
  test_models::deterministic();
  probe_model model(8);
  auto pool = test_models::sim_pool(1 << 20);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.streaming.prefetch_depth = 1;
  const auto inv = distorch::bind_units(*model).units;
  distorch::DistributedModule<probe_model> dm(model, pool, alternate_plan(inv), spec);
  std::vector<distorch::residency_event> events;
  dm.residency().set_trace([&](distorch::residency_event e) { events.push_back(e); });

  std::size_t streamed_units = 0;
  for (std::size_t i = 0; i < inv.size(); ++i) streamed_units += dm.residency().streams(i) ? 1 : 0;
  REQUIRE(streamed_units == 4);

  const at::Tensor x = at::randn({2, 16});
  dm.forward(x);
  auto first = dm.stats();
  CHECK(first.prefetch_hits == 0);
  CHECK(first.prefetch_misses == streamed_units);
  // The learned order holds the streamed units (the odd ones) in the sequence they ran.
  auto order = dm.residency().learned_order();
  CHECK(order == std::vector<std::size_t>{1, 3, 5, 7});
  CHECK(!dm.residency().learning());
  CHECK(dm.residency().fetched(1));  // the end of the first forward fetched the next one's first unit
  // While learning nothing is prefetched; the pass's end prefetches the first unit of the next.
  CHECK(std::count_if(events.begin(), events.end(), [](auto e) { return e.kind == distorch::residency_event_kind::prefetch; }) == 1);
  CHECK((events.back().kind == distorch::residency_event_kind::prefetch && events.back().unit == 1));

  dm.reset_stats();
  events.clear();
  dm.forward(x);
  auto second = dm.stats();
  // Every streamed unit has a predecessor in the learned order (unit 0 is compute-homed).
  CHECK(second.prefetch_hits == streamed_units);
  CHECK(second.prefetch_misses == 0);
  // Each streamed unit was prefetched while the streamed unit before it in the order ran, before
  // it entered; unit 1, the first, at the end of the previous forward: nothing fetched it here
  // before it entered (the last unit's entry then prefetched it again, for the next forward).
  auto first_event = [&](distorch::residency_event_kind kind, std::size_t unit) {
    return std::find_if(events.begin(), events.end(), [&](auto e) { return e.kind == kind && e.unit == unit; });
  };
  const auto enter1 = first_event(distorch::residency_event_kind::enter, 1);
  CHECK(std::none_of(events.begin(), enter1, [](auto e) {
    return e.unit == 1 && (e.kind == distorch::residency_event_kind::fetch || e.kind == distorch::residency_event_kind::prefetch);
  }));
  for (std::size_t u = 3; u < inv.size(); u += 2) {
    auto pre = first_event(distorch::residency_event_kind::prefetch, u);
    REQUIRE(pre != events.end());
    CHECK(first_event(distorch::residency_event_kind::enter, u - 2) < pre);
    CHECK(pre < first_event(distorch::residency_event_kind::enter, u));
  }
}

TEST_CASE("no simulated device ever exceeds its capacity, even with the compute device sized to the plan") {
  for (std::size_t depth : {0u, 1u, 2u}) {
    CAPTURE(depth);
    test_models::deterministic();
    auto model = test_models::mlp_stack(64, 8);
    const auto inv = distorch::bind_units(*model).units;
    std::uint64_t largest = 0, total = inv.total_bytes();
    for (const auto& u : inv.units()) largest = std::max(largest, u.bytes);
    // Room for a quarter of the model + the window the planner asks for, and not a byte more.
    const std::uint64_t capacity = total / 4 + largest * (depth + 1) + largest;
    auto pool = test_models::sim_pool(capacity, 1 << 20);
    distorch::distribute_spec spec;
    spec.compute = device_id::sim(0);
    spec.streaming.prefetch_depth = depth;
    spec.planning.tiny_ppm = 0;
    distorch::DistributedModule dm(model, pool, distorch::policy_from_string("sim:0," + std::to_string(total / 4) + "b;sim:1,*"), spec);
    const at::Tensor x = at::randn({3, 64});
    for (int i = 0; i < 3; ++i) dm.forward(x);
    CHECK(pool.peak(device_id::sim(0)) <= capacity);
    CHECK(pool.peak(device_id::sim(1)) <= pool.capacity(device_id::sim(1)));
    CHECK(dm.stats().fetches > 0);
  }
}

TEST_CASE("views::streamed yields each block resident and prefetches the next ones") {
  test_models::deterministic();
  auto model = test_models::transformer();
  auto reference = test_models::transformer();
  test_models::copy_weights(*model, *reference);
  auto pool = test_models::sim_pool(1 << 20);
  distorch::distribute_spec spec;
  spec.compute = device_id::sim(0);
  spec.streaming.prefetch_depth = 1;
  spec.grouping = {{R"(blocks\.\d+)"}};
  spec.planning.tiny_ppm = 0;
  // All three blocks live on the donor.
  const auto inv = distorch::bind_units(*model, spec.grouping).units;
  distorch::placement_plan plan;
  plan.compute = device_id::sim(0);
  for (const auto& u : inv.units())
    plan.units.push_back({u.name, u.name.rfind("blocks.", 0) == 0 ? device_id::sim(1) : device_id::sim(0), u.bytes,
                          distorch::placement_reason::policy});
  distorch::DistributedModule<distorch::demo::tiny_transformer> dm(model, pool, plan, spec);

  const at::Tensor x = at::randn({1, 4, 16});
  at::Tensor expected = reference->forward(x);
  at::Tensor h = dm.module()->embed(x);
  int index = 0;
  for (auto& block : model->blocks | distorch::views::streamed(dm)) {
    const auto units = dm.units_of(*block);
    REQUIRE(units.size() == 1);
    CHECK(dm.residency().resident(units[0]));
    if (index + 1 < 3) CHECK(dm.residency().fetched(dm.units_of(*model->blocks[index + 1])[0]));  // prefetched
    h = block->as<distorch::demo::attention_block_impl>()->forward(h);
    ++index;
  }
  CHECK(index == 3);
  for (std::size_t u = 0; u < inv.size(); ++u) CHECK(dm.residency().resident(u) == !dm.residency().streams(u));
  at::Tensor y = model->head(model->norm(h));
  CHECK(test_models::bit_identical(y, expected));
  CHECK(dm.stats().prefetch_hits == 2);
  CHECK(dm.stats().prefetch_misses == 1);

  // Leaving the loop early releases the block that was running.
  for (auto& block : *model->blocks | distorch::views::streamed(dm)) {
    (void)block;
    break;
  }
  for (std::size_t u = 0; u < inv.size(); ++u) CHECK(dm.residency().resident(u) == !dm.residency().streams(u));
}

// ---------------------------------------------------------------------------------------------
// after_fetch transforms, deferred release within a pass, the host staging ring, host staging
// choice, copy timing.


namespace {

// A home copy of `t` booked on `id` of `pool`, the way a distributed module places units.
distorch::held_tensor at_home(const distorch::device_pool& pool, const device_id& id, const at::Tensor& t) {
  return distorch::booked_copy_allocator{}.copy_to(t, pool, pool.at(id), {false, false, "placing a test unit"});
}

// A unit homed on `home` with one handle per tensor, the handles pointing at the home copies.
distorch::residency_unit home_unit(const distorch::device_pool& pool, const device_id& home, std::string name,
                                   const std::vector<at::Tensor>& tensors) {
  distorch::residency_unit u;
  u.name = std::move(name);
  u.home = home;
  for (const auto& t : tensors) {
    u.home_data.push_back(at_home(pool, home, t));
    u.handles.push_back(u.home_data.back().data.detach());  // the module's own handle, sharing the home bytes
    u.bytes += static_cast<std::uint64_t>(t.numel()) * t.element_size();
  }
  return u;
}

std::vector<distorch::residency_unit> just(distorch::residency_unit u) {
  std::vector<distorch::residency_unit> units;
  units.push_back(std::move(u));
  return units;
}

at::Tensor int8_tensor(std::int64_t n, int seed) {
  at::Tensor t = at::empty({n}, at::kChar);
  auto* p = t.data_ptr<std::int8_t>();
  for (std::int64_t i = 0; i < n; ++i) p[i] = static_cast<std::int8_t>((i * 37 + seed * 11) % 255 - 127);
  return t;
}

}  // namespace

TEST_CASE("after_fetch: a unit kept as int8 at home is fetched as stored and transformed on the compute device") {
  auto pool = test_models::sim_pool(1 << 20);
  const at::Tensor quantized = int8_tensor(1000, 1);
  const at::Tensor raw = int8_tensor(24, 2);
  const double scale = 0.0625;
  auto unit = home_unit(pool, device_id::sim(1), "q", {quantized, raw});
  unit.after_fetch.resize(2);
  int calls = 0;
  unit.after_fetch[0] = [&](const at::Tensor& fetched) {
    ++calls;
    CHECK((fetched.scalar_type() == at::kChar));
    return fetched.to(at::kFloat).mul(scale);
  };  // handle 1 has no transform: it holds the fetched copy
  at::Tensor weight = unit.handles[0], other = unit.handles[1];
  const void* home_ptr = unit.home_data[0].data.data_ptr();
  const std::uint64_t home_bytes = pool.used(device_id::sim(1));
  distorch::residency_manager manager(pool, device_id::sim(0), just(std::move(unit)), {.prefetch_depth = 0});

  manager.enter(0);
  CHECK(calls == 1);
  CHECK((weight.scalar_type() == at::kFloat));
  CHECK(weight.data_ptr() != home_ptr);
  // Independent reference: the stored bytes in float64, times the scale, rounded to float once.
  const auto* q = quantized.data_ptr<std::int8_t>();
  const auto* w = weight.data_ptr<float>();
  bool same = true;
  for (std::int64_t i = 0; i < quantized.numel(); ++i) same = same && w[i] == static_cast<float>(static_cast<double>(q[i]) * scale);
  CHECK(same);
  CHECK((other.scalar_type() == at::kChar));
  CHECK(test_models::bit_identical(other, raw));
  // The books hold what is really on sim:0: the float tensor and the untransformed copy.
  CHECK(pool.used(device_id::sim(0)) == 1000 * sizeof(float) + 24);
  CHECK(manager.held_bytes(0) == 1000 * sizeof(float) + 24);
  CHECK(pool.peak(device_id::sim(0)) == 1000 + 24 + 1000 * sizeof(float));  // the copy, briefly with its transform
  const auto s = manager.stats();
  CHECK(s.fetches == 1);
  CHECK(s.bytes_fetched == 1000 + 24);  // what crossed the link
  manager.leave(0);
  CHECK(pool.used(device_id::sim(0)) == 0);
  CHECK((weight.scalar_type() == at::kChar));
  CHECK(weight.data_ptr() == home_ptr);
  CHECK(pool.used(device_id::sim(1)) == home_bytes);
}

TEST_CASE("after_fetch: rejected transforms leave nothing booked and the handles at home") {
  auto pool = test_models::sim_pool(8192);
  const at::Tensor quantized = int8_tensor(1000, 3);
  SUBCASE("one transform per tensor, or none") {
    auto unit = home_unit(pool, device_id::sim(1), "q", {quantized, quantized});
    unit.after_fetch.resize(1);
    CHECK_THROWS_AS(distorch::residency_manager(pool, device_id::sim(0), just(std::move(unit))), distorch::device_error);
  }
  std::function<at::Tensor(const at::Tensor&)> bad;
  SUBCASE("a transform that throws") { bad = [](const at::Tensor& t) { return t.view({7, -1}); }; }
  SUBCASE("a transform that returns a tensor on another device") {
    bad = [](const at::Tensor& t) { return at::empty(t.sizes(), t.options().device(c10::DeviceType::Meta)); };
  }
  SUBCASE("a transform whose result does not fit the compute device") {
    bad = [](const at::Tensor& t) { return t.to(at::kDouble); };  // 8000 bytes next to the 1000-byte copy
  }
  SUBCASE("a transform that returns nothing") { bad = [](const at::Tensor&) { return at::Tensor(); }; }
  if (bad) {
    auto unit = home_unit(pool, device_id::sim(1), "q", {quantized});
    unit.after_fetch = {bad};
    at::Tensor handle = unit.handles[0];
    const void* home_ptr = unit.home_data[0].data.data_ptr();
    distorch::residency_manager manager(pool, device_id::sim(0), just(std::move(unit)), {.prefetch_depth = 0});
    CHECK_THROWS_AS(manager.enter(0), distorch::device_error);
    CHECK(pool.used(device_id::sim(0)) == 0);
    CHECK(!manager.resident(0));
    CHECK(!manager.running(0));
    CHECK(handle.data_ptr() == home_ptr);
  }
}

TEST_CASE("inside a pass a unit re-entered while still staged is not fetched again") {
  auto pool = test_models::sim_pool(1 << 20);
  std::vector<distorch::residency_unit> units;
  units.push_back(home_unit(pool, device_id::sim(1), "a", {at::randn({64})}));
  units.push_back(home_unit(pool, device_id::sim(0), "b", {at::randn({64})}));
  units.push_back(home_unit(pool, device_id::sim(1), "c", {at::randn({64})}));
  distorch::residency_manager manager(pool, device_id::sim(0), std::move(units), {.prefetch_depth = 0});
  // Outside a pass: each leave releases.
  for (int k = 0; k < 3; ++k) {
    manager.enter(0);
    manager.leave(0);
  }
  CHECK(manager.stats().fetches == 3);
  CHECK(!manager.resident(0));
  manager.reset_stats();
  {
    auto pass = manager.pass();
    for (int k = 0; k < 3; ++k) {
      manager.enter(0);
      manager.leave(0);
      CHECK(manager.resident(0));  // kept for re-entry
    }
    CHECK(manager.stats().fetches == 1);
    CHECK(manager.stats().reentries == 2);
    manager.enter(1);  // another unit enters: the kept one goes home
    CHECK(!manager.resident(0));
    CHECK(pool.used(device_id::sim(0)) == 64 * sizeof(float));  // only b, homed on the compute device
    manager.leave(1);
    manager.enter(2);
    manager.leave(2);
    CHECK(manager.resident(2));
  }
  CHECK(!manager.resident(2));  // the pass ended
  CHECK(manager.stats().fetches == 2);
  CHECK(manager.stats().releases == 2);
}

namespace {

struct three_layer_block_impl : torch::nn::Module {
  distorch::nn::Linear fc1{register_module("fc1", distorch::nn::Linear(16, 32))};
  distorch::nn::Linear fc2{register_module("fc2", distorch::nn::Linear(32, 32))};
  distorch::nn::Linear fc3{register_module("fc3", distorch::nn::Linear(32, 16))};
  at::Tensor forward(const at::Tensor& x) { return fc3(fc2(fc1(x).relu()).relu()) + x; }
};
TORCH_MODULE_IMPL(three_layer_block, three_layer_block_impl);

struct block_stack_impl : torch::nn::Module {
  torch::nn::ModuleList blocks{register_module("blocks", torch::nn::ModuleList())};
  distorch::nn::Linear head{register_module("head", distorch::nn::Linear(16, 4))};
  explicit block_stack_impl(int n) {
    for (int i = 0; i < n; ++i) blocks->push_back(three_layer_block());
  }
  at::Tensor forward(at::Tensor x) {
    for (const auto& b : *blocks) x = b->as<three_layer_block_impl>()->forward(x);
    return head(x);
  }
};
TORCH_MODULE_IMPL(block_stack, block_stack_impl);

}  // namespace

TEST_CASE("a grouped block driven only by its three inner layers is fetched once per forward") {
  for (std::size_t depth : {0u, 1u, 2u}) {
    CAPTURE(depth);
    test_models::deterministic();
    block_stack model(3), reference(3);
    test_models::copy_weights(*model, *reference);
    auto pool = test_models::sim_pool(1 << 20);
    distorch::distribute_spec spec;
    spec.compute = device_id::sim(0);
    spec.streaming.prefetch_depth = depth;
    spec.grouping = {{R"(blocks\.\d+)"}};
    spec.planning.tiny_ppm = 0;
    const auto inv = distorch::bind_units(*model, spec.grouping).units;
    distorch::placement_plan plan;
    plan.compute = device_id::sim(0);
    std::size_t blocks = 0;
    for (const auto& u : inv.units()) {
      const bool block = u.name.rfind("blocks.", 0) == 0;
      blocks += block ? 1 : 0;
      plan.units.push_back({u.name, block ? device_id::sim(1) : device_id::sim(0), u.bytes, distorch::placement_reason::policy});
    }
    REQUIRE(blocks == 3);
    distorch::DistributedModule<block_stack> dm(model, pool, plan, spec);
    const std::uint64_t resident = pool.used(device_id::sim(0));
    const at::Tensor x = at::randn({2, 16});
    const at::Tensor expected = reference->forward(x);
    for (int pass = 0; pass < 2; ++pass) {
      dm.reset_stats();
      CHECK(test_models::bit_identical(dm.forward(x), expected));  // forward is one pass
      const auto s = dm.stats();
      // Once per block; the first (learning) forward also fetches the next one's first `depth` blocks ahead.
      CHECK(s.fetches == blocks + (pass == 0 ? std::min<std::size_t>(depth, blocks) : 0));
      CHECK(s.prefetch_hits + s.prefetch_misses == blocks);
      CHECK(s.reentries == 2 * blocks);  // fc2 and fc3 found their block staged
      CHECK(s.releases == blocks);
      for (std::size_t u = 0; u < inv.size(); ++u) CHECK(dm.residency().resident(u) == !dm.residency().streams(u));
      CHECK(pool.used(device_id::sim(0)) == resident + test_models::fetched_ahead(dm.residency()));
    }
    CHECK(pool.peak(device_id::sim(0)) <= pool.capacity(device_id::sim(0)));
  }
}

TEST_CASE("staging_ring: bounded bytes, chunked bit-identical copies, slot reuse") {
  distorch::simulated_device host_books(device_id::cpu(), 1 << 20);
  auto host = distorch::accounting_for(host_books);
  const std::uint64_t ask = 1001;
  distorch::staging_ring ring(host, ask, 2);
  CHECK(ring.slots() == 2);
  CHECK(ring.slot_bytes() == ask / 2);
  CHECK(ring.bytes() <= ask);
  CHECK(host_books.used() == ring.bytes());

  const at::Tensor source = at::randn({750});  // 3000 bytes: six slot-sized chunks
  const std::uint64_t bytes = source.numel() * source.element_size();
  at::Tensor out = at::empty_like(source);
  ring.copy(source, out, std::nullopt);
  CHECK(test_models::bit_identical(out, source));
  const auto chunks = (bytes + ring.slot_bytes() - 1) / ring.slot_bytes();
  CHECK(ring.stats().chunks == chunks);
  CHECK(ring.stats().bytes == bytes);
  CHECK(ring.stats().slot_reuses == chunks - ring.slots());
  CHECK(ring.stats().slot_waits == 0);  // synchronous copies never leave a slot in flight
  CHECK(host_books.peak() == ring.bytes());  // no hidden host staging

  // A tensor smaller than a slot is one chunk; an empty one none.
  at::Tensor small = at::randn({3}), small_out = at::empty_like(small);
  ring.copy(small, small_out, std::nullopt);
  CHECK(test_models::bit_identical(small_out, small));
  CHECK(ring.stats().chunks == chunks + 1);
  at::Tensor empty = at::empty({0}), empty_out = at::empty({0});
  ring.copy(empty, empty_out, std::nullopt);
  CHECK(ring.stats().chunks == chunks + 1);

  // Rejected: mismatched sizes, strided tensors, rings that cannot be split.
  at::Tensor wrong = at::empty({749});
  CHECK_THROWS_AS(ring.copy(source, wrong, std::nullopt), distorch::device_error);
  at::Tensor strided = at::randn({10, 10}).t();
  at::Tensor strided_out = at::empty({10, 10});
  CHECK_THROWS_AS(ring.copy(strided, strided_out, std::nullopt), distorch::device_error);
  CHECK_THROWS_AS(distorch::staging_ring(host, 1000, 0), distorch::device_error);
  CHECK_THROWS_AS(distorch::staging_ring(host, 1, 2), distorch::device_error);
  distorch::simulated_device tiny(device_id::cpu(), 100);
  auto tiny_host = distorch::accounting_for(tiny);
  CHECK_THROWS_AS(distorch::staging_ring(tiny_host, 1000, 2), distorch::device_error);
}

TEST_CASE("CPU-homed units fetched through a staging ring: bounded ring, bit-identical output, chunking and stats") {
  for (std::size_t depth : {0u, 1u, 2u}) {
    CAPTURE(depth);
    test_models::deterministic();
    auto model = test_models::mlp_stack(64, 4);  // Linear(64, 64): a 16 KiB weight, larger than the ring
    auto reference = test_models::mlp_stack(64, 4);
    test_models::copy_weights(*model, *reference);
    auto pool = test_models::sim_pool(1 << 20);
    distorch::distribute_spec spec;
    spec.compute = device_id::sim(0);
    spec.streaming.prefetch_depth = depth;
    spec.streaming.staging_ring_bytes = 6000;
    spec.streaming.staging_ring_slots = 3;
    const auto inv = distorch::bind_units(*model).units;
    distorch::placement_plan plan;
    plan.compute = device_id::sim(0);
    for (std::size_t i = 0; i < inv.size(); ++i)
      plan.units.push_back({inv[i].name, i % 2 == 0 ? device_id::cpu() : device_id::sim(1), inv[i].bytes,
                            distorch::placement_reason::policy});
    const std::uint64_t host_before = pool.used(device_id::cpu());
    distorch::DistributedModule<torch::nn::Sequential> dm(model, pool, plan, spec);
    const auto* ring = dm.residency().ring();
    REQUIRE(ring != nullptr);
    CHECK(ring->bytes() <= spec.streaming.staging_ring_bytes);
    CHECK(ring->slots() == 3);
    // The host books hold the CPU homes and the ring, nothing more.
    std::uint64_t cpu_homes = 0, expected_chunks = 0, ring_bytes = 0;
    for (std::size_t i = 0; i < dm.residency().size(); ++i) {
      const auto& u = dm.residency().unit(i);
      if (!u.home.is_cpu()) continue;
      for (const auto& h : u.home_data) {
        const std::uint64_t b = h.data.numel() * h.data.element_size();
        cpu_homes += b;
        ring_bytes += b;
        expected_chunks += (b + ring->slot_bytes() - 1) / ring->slot_bytes();
      }
    }
    CHECK(pool.used(device_id::cpu()) == host_before + cpu_homes + ring->bytes());
    const at::Tensor x = at::randn({3, 64});
    dm.forward(x);
    dm.reset_stats();
    CHECK(test_models::bit_identical(dm.forward(x), reference->forward(x)));
    const auto s = dm.stats();
    CHECK(s.ring_chunks == expected_chunks);  // each CPU-homed unit once per forward
    CHECK(s.ring_bytes == ring_bytes);
    CHECK(s.bytes_fetched > s.ring_bytes);   // sim:1-homed units are copied directly
    CHECK(ring->stats().slot_reuses > 0);
    CHECK(pool.peak(device_id::sim(0)) <= pool.capacity(device_id::sim(0)));
    CHECK(pool.peak(device_id::cpu()) <= pool.capacity(device_id::cpu()));
  }
}

TEST_CASE("choose_host_staging: pinning every CPU home only when it fits, else a bounded ring") {
  distorch::streaming_options o;
  const std::uint64_t gib = 1ull << 30, mib = 1ull << 20;
  const distorch::memory_figures host{16 * gib, 12 * gib};
  auto c = distorch::choose_host_staging(o, true, 6 * gib, 100 * mib, host);
  CHECK(c.pin_homes);
  CHECK(c.ring_bytes == 0);
  // More than half the RAM: a ring of twice the largest unit instead.
  c = distorch::choose_host_staging(o, true, 9 * gib, 100 * mib, host);
  CHECK(!c.pin_homes);
  CHECK(c.ring_bytes == 2 * 100 * mib);
  CHECK(c.reason.find("does not fit") != std::string::npos);
  // Under the limit but more than is free now.
  c = distorch::choose_host_staging(o, true, 6 * gib, 100 * mib, distorch::memory_figures{16 * gib, 5 * gib});
  CHECK(!c.pin_homes);
  // The fallback ring is clamped.
  CHECK(distorch::choose_host_staging(o, true, 9 * gib, 4 * gib, host).ring_bytes == distorch::fallback_ring_max);
  CHECK(distorch::choose_host_staging(o, true, 9 * gib, 1, host).ring_bytes == distorch::fallback_ring_min);
  // Unknown host memory: not risked.
  CHECK(!distorch::choose_host_staging(o, true, 1 * mib, 1 * mib, std::nullopt).pin_homes);
  // An explicit limit.
  o.pinned_limit = 4 * gib;
  CHECK(!distorch::choose_host_staging(o, true, 6 * gib, 100 * mib, host).pin_homes);
  o.pinned_limit = 0;
  // A ring asked for, pinning off, or a device that copies synchronously: nothing is pinned.
  o.staging_ring_bytes = 64 * mib;
  c = distorch::choose_host_staging(o, true, 1 * gib, 100 * mib, host);
  CHECK(!c.pin_homes);
  CHECK(c.ring_bytes == 64 * mib);
  o.staging_ring_bytes = 0;
  o.pinned_host = false;
  CHECK((distorch::choose_host_staging(o, true, 1 * gib, 100 * mib, host) == distorch::host_staging_choice{false, 0, "pinned host memory is off"}));
  o.pinned_host = true;
  CHECK(!distorch::choose_host_staging(o, false, 1 * gib, 100 * mib, host).pin_homes);
  CHECK(!distorch::choose_host_staging(o, true, 0, 0, host).pin_homes);
}

TEST_CASE("copy time on the CPU is the time the synchronous copies took") {
  auto pool = test_models::sim_pool(64 << 20, 64 << 20);
  std::vector<distorch::residency_unit> units;
  units.push_back(home_unit(pool, device_id::sim(1), "big", {at::randn({1 << 20})}));
  distorch::residency_manager manager(pool, device_id::sim(0), std::move(units), {.prefetch_depth = 0});
  const auto start = std::chrono::steady_clock::now();
  for (int k = 0; k < 3; ++k) {
    manager.enter(0);
    manager.leave(0);
  }
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const auto s = manager.stats();
  CHECK(s.fetches == 3);
  CHECK(s.copy_seconds > 0);      // 4 MiB copied three times takes measurable time
  CHECK(s.copy_seconds <= wall);  // and no more than the whole loop
  CHECK(s.wait_seconds >= s.copy_seconds);  // each entry waited for its own synchronous copy
}

TEST_CASE("a real device is planned against what it has free now, never more than its books allow") {
  constexpr std::uint64_t MiB = 1ull << 20;
  distorch::device_pool pool;
  std::uint64_t free_now = 64 * MiB;  // another program holds most of this 80 GiB GPU
  pool.add(distorch::real_device(distorch::device_info{device_id::cuda(0), 80ull << 30, 80ull << 30, false, "a shared GPU"}),
           [&] { return free_now; });
  pool.add_host();
  auto topo = pool.topo();
  CHECK(topo.find(device_id::cuda(0))->total_bytes == 80ull << 30);
  CHECK(topo.find(device_id::cuda(0))->free_bytes == 64 * MiB);
  // The host: what the OS has available, never its total.
  const auto ram = distorch::host_memory();
  REQUIRE(ram.has_value());
  CHECK(topo.find(device_id::cpu())->free_bytes < ram->total);

  // 16 units of 8 MiB: "auto" keeps on cuda:0 what fits its 64 MiB free beside the 16 MiB window
  // (the unit that runs and one ahead) and the 8 MiB reserve, 5 units; the total would keep all.
  std::vector<distorch::unit> units;
  for (int i = 0; i < 16; ++i) units.push_back({"blocks." + std::to_string(i), {}, 8 * MiB});
  const distorch::inventory model(units);
  const auto plan = distorch::make_plan(model, topo, device_id::cuda(0), "auto", {.prefetch_depth = 1, .reserve = 8 * MiB});
  CHECK(plan.allotment(device_id::cuda(0))->placed_bytes == 40 * MiB);
  CHECK(plan.allotment(device_id::cuda(0))->window == 16 * MiB);
  try {
    (void)distorch::make_plan(model, topo, device_id::cuda(0), "cuda:0,*", {});
    FAIL("expected placement_error");
  } catch (const distorch::placement_error& e) {
    CHECK(e.info().subject == "cuda:0");
    CHECK(std::string(e.what()).find("64.00 MiB free") != std::string::npos);
  }
  // Books still count: with the device free again, what this pool booked is not free.
  free_now = 80ull << 30;
  auto held = pool.reserve(device_id::cuda(0), 100 * MiB, "a test booking");
  CHECK(pool.topo().find(device_id::cuda(0))->free_bytes == (80ull << 30) - 100 * MiB);
}

TEST_CASE("a backend without a stream pool gets synchronous copies and one warning, not an error") {
  distorch_test::captured_log log;
  // Meta's device guard has no stream pool, as MPS's has not: copies to such a device are synchronous.
  const c10::Device meta(c10::DeviceType::Meta);
  CHECK_FALSE(distorch::detail::copy_stream_for(meta, "meta (test)").has_value());
  CHECK_FALSE(distorch::detail::copy_stream_for(meta, "meta (test)").has_value());
  REQUIRE(log.warnings.size() == 1);
  CHECK(log.warnings[0].find("meta (test) has no stream pool") != std::string::npos);
  CHECK(log.warnings[0].find("synchronous") != std::string::npos);
}
