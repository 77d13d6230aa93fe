// Tests of memory/allocator.hpp, accounting_allocator.hpp, pinned_host_allocator.hpp,
// memory_space_access.hpp and snapshot.hpp. LibTorch headers come before doctest.
#include "distorch/memory/accounting_allocator.hpp"
#include "distorch/memory/allocator.hpp"
#include "distorch/memory/memory_space_access.hpp"
#include "distorch/memory/pinned_host_allocator.hpp"
#include "distorch/memory/snapshot.hpp"

#include <ATen/ops/arange.h>
#include <ATen/ops/zeros.h>

#include <atomic>
#include <latch>
#include <sstream>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

using distorch::device_id;
using distorch::device_kind;

namespace {

// Element size written out by hand, independent of c10::elementSize.
std::uint64_t expected_bytes(std::initializer_list<std::int64_t> shape, std::uint64_t element_size) {
  std::uint64_t n = element_size;
  for (auto d : shape) n *= static_cast<std::uint64_t>(d);
  return n;
}

// An inner allocator that fails on request, to check that a failed inner allocation undoes the charge.
struct failing_allocator {
  device_id device() const { return device_id::sim(9); }
  at::Tensor allocate(at::IntArrayRef shape, at::ScalarType type) {
    if (fail) throw distorch::device_error({"allocating", "sim:9", std::nullopt, "injected failure", "none"});
    return distorch::device_allocator(device_id::sim(9)).allocate(shape, type);
  }
  bool fail = true;
};
static_assert(distorch::allocator<failing_allocator>);

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

}  // namespace

TEST_CASE("tensor_bytes: numel times element size") {
  CHECK(distorch::tensor_bytes({1024, 1024}, at::kHalf) == expected_bytes({1024, 1024}, 2));
  CHECK(distorch::tensor_bytes({3, 5, 7}, at::kDouble) == expected_bytes({3, 5, 7}, 8));
  CHECK(distorch::tensor_bytes({}, at::kFloat) == 4);  // a scalar
  CHECK(distorch::tensor_bytes({0, 1000}, at::kFloat) == 0);
  CHECK(distorch::tensor_bytes({13}, at::kBFloat16) == 26);
}

TEST_CASE("tensor_bytes: a negative dimension is a device_error") {
  CHECK_THROWS_AS(distorch::tensor_bytes({4, -1}, at::kFloat), distorch::device_error);
  try {
    distorch::tensor_bytes({4, -1}, at::kFloat, device_id::sim(1));
  } catch (const distorch::device_error& e) {
    CHECK(e.info().subject == "sim:1");
    CHECK(std::string(e.what()).find("dimension 1") != std::string::npos);
  }
}

TEST_CASE("tensor_bytes: a size overflowing 63 bits is a device_error") {
  CHECK_THROWS_AS(distorch::tensor_bytes({1ll << 32, 1ll << 32}, at::kFloat), distorch::device_error);
  CHECK_THROWS_AS(distorch::tensor_bytes({std::numeric_limits<std::int64_t>::max(), 2}, at::kByte), distorch::device_error);
  CHECK(distorch::tensor_bytes({1ll << 30, 1ll << 30}, at::kByte) == (1ull << 60));
}

TEST_CASE("device_allocator: allocates on its device with the requested shape and dtype") {
  distorch::device_allocator cpu(device_id::cpu());
  at::Tensor t = cpu.allocate({3, 4}, at::kBFloat16);
  CHECK(t.device().is_cpu());
  CHECK((t.scalar_type() == at::kBFloat16));
  CHECK(t.sizes() == at::IntArrayRef({3, 4}));
  CHECK(t.is_contiguous());
  CHECK(t.nbytes() == expected_bytes({3, 4}, 2));
  distorch::device_allocator sim(device_id::sim(4));
  CHECK(sim.device() == device_id::sim(4));
  CHECK(sim.allocate({8}, at::kFloat).device().is_cpu());
  distorch::device_allocator played(device_id::cuda(0), c10::Device(c10::DeviceType::CPU));
  CHECK(played.device() == device_id::cuda(0));
  CHECK(played.allocate({2}, at::kFloat).device().is_cpu());
}

TEST_CASE("device_allocator: an allocation the host cannot satisfy is a device_error, not a crash") {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  // The sanitizers' allocators abort on oversized requests instead of failing them, so there is no
  // out-of-memory to turn into an error under them.
  MESSAGE("skipped under a sanitizer");
  return;
#endif
  distorch::device_allocator cpu(device_id::cpu());
  try {
    (void)cpu.allocate({1ll << 50}, at::kByte);  // 1 PiB: beyond any address space this runs in
    FAIL("expected device_error");
  } catch (const distorch::device_error& e) {
    CHECK(e.info().subject == "cpu");
    CHECK(std::string(e.what()).find("1125899906842624 bytes") != std::string::npos);
  }
}

TEST_CASE("device_allocator: a bad shape is a device_error") {
  distorch::device_allocator cpu(device_id::cpu());
  CHECK_THROWS_AS((void)cpu.allocate({2, -3}, at::kFloat), distorch::device_error);
}

TEST_CASE("device_allocator: a device LibTorch lacks is a device_error") {
  if (distorch::torch_device_count(c10::DeviceType::CUDA) > 0) return;  // only meaningful without CUDA
  distorch::device_allocator gpu(device_id::cuda(0));
  CHECK_THROWS_AS((void)gpu.allocate({4}, at::kFloat), distorch::device_error);
}

TEST_CASE("accounting_allocator: charges each tensor's bytes and gives them back when it dies") {
  distorch::accounting_allocator alloc(distorch::device_allocator(device_id::sim(0)), 1ull << 20);
  static_assert(distorch::allocator<decltype(alloc)>);
  CHECK(alloc.device() == device_id::sim(0));
  {
    at::Tensor a = alloc.allocate({64, 32}, at::kFloat);
    CHECK(alloc.used() == expected_bytes({64, 32}, 4));
    at::Tensor b = alloc.allocate({10}, at::kDouble);
    CHECK(alloc.used() == expected_bytes({64, 32}, 4) + 80);
    CHECK(a.sizes() == at::IntArrayRef({64, 32}));
    CHECK((a.scalar_type() == at::kFloat));
    a.copy_(at::arange(64 * 32, at::TensorOptions().dtype(at::kFloat)).reshape({64, 32}));
    CHECK(a[63][31].item<float>() == 64 * 32 - 1);
    b.reset();
    CHECK(alloc.used() == expected_bytes({64, 32}, 4));
  }
  CHECK(alloc.used() == 0);
  CHECK(alloc.peak() == expected_bytes({64, 32}, 4) + 80);
}

TEST_CASE("accounting_allocator: views keep the charge until the last one dies") {
  distorch::accounting_allocator alloc(distorch::device_allocator(device_id::cpu()), 4096);
  at::Tensor view;
  {
    at::Tensor whole = alloc.allocate({16, 16}, at::kFloat);
    view = whole.slice(0, 0, 2);
  }
  CHECK(alloc.used() == 1024);
  view.reset();
  CHECK(alloc.used() == 0);
}

TEST_CASE("accounting_allocator: exceeding the budget is a device_error naming device, request and remainder") {
  distorch::accounting_allocator alloc(distorch::device_allocator(device_id::sim(2)), 1000);
  at::Tensor held = alloc.allocate({100}, at::kFloat);  // 400 bytes
  try {
    (void)alloc.allocate({200}, at::kFloat);  // 800 bytes, 600 remain
    FAIL("expected device_error");
  } catch (const distorch::device_error& e) {
    const std::string message = e.what();
    CHECK(e.info().subject == "sim:2");
    CHECK(message.find("800 bytes") != std::string::npos);
    CHECK(message.find("600 bytes") != std::string::npos);
    CHECK(message.find("[200]") != std::string::npos);
  }
  CHECK(alloc.used() == 400);  // nothing charged for the refused tensor
}

TEST_CASE("accounting_allocator: a failing inner allocator leaves no charge behind") {
  distorch::accounting_allocator alloc(failing_allocator{}, 1ull << 20);
  CHECK_THROWS_AS((void)alloc.allocate({128}, at::kFloat), distorch::device_error);
  CHECK(alloc.used() == 0);
}

TEST_CASE("accounting_allocator: a simulated device's account is the one charged") {
  distorch::simulated_device gpu(device_id::parse("cuda:0"), 10'000, "what-if");
  auto alloc = distorch::accounting_for(gpu);
  CHECK(alloc.device() == device_id::cuda(0));
  {
    at::Tensor t = alloc.allocate({50, 50}, at::kFloat);
    CHECK(t.device().is_cpu());  // simulated: the bytes live in host RAM
    CHECK(gpu.used() == 10'000);
    CHECK_THROWS_AS((void)alloc.allocate({1}, at::kByte), distorch::device_error);
    CHECK_THROWS_AS(gpu.reserve(1), distorch::device_error);
  }
  CHECK(gpu.used() == 0);
}

TEST_CASE("accounting_allocator: set_data onto an accounted tensor moves the charge with the storage") {
  distorch::accounting_allocator alloc(distorch::device_allocator(device_id::sim(0)), 1 << 16);
  at::Tensor parameter = at::zeros({8, 8});
  {
    at::Tensor fetched = alloc.allocate({8, 8}, at::kFloat);
    fetched.fill_(3.0f);
    parameter.set_data(fetched);
  }
  CHECK(alloc.used() == 256);  // the parameter now owns the accounted storage
  CHECK(parameter.sum().item<float>() == 3.0f * 64);
  parameter.set_data(at::zeros({8, 8}));
  CHECK(alloc.used() == 0);
}

TEST_CASE("accounting_allocator: zero-size tensors cost nothing") {
  distorch::accounting_allocator alloc(distorch::device_allocator(device_id::cpu()), 0);
  at::Tensor t = alloc.allocate({0, 7}, at::kFloat);
  CHECK(t.numel() == 0);
  CHECK(alloc.used() == 0);
  CHECK_THROWS_AS((void)alloc.allocate({1}, at::kFloat), distorch::device_error);
}

TEST_CASE("accounting_allocator: allocations and frees from several threads leak no accounting") {
  distorch::simulated_device gpu(device_id::sim(0), 64 * 1024);
  constexpr int threads_count = 4;
  std::latch all_holding(threads_count);
  std::atomic<std::uint64_t> refused{0};
  std::vector<at::Tensor> handed_over(threads_count);
  std::vector<std::thread> threads;
  for (int t = 0; t < threads_count; ++t) {
    threads.emplace_back([&, t] {
      auto alloc = distorch::accounting_for(gpu);
      handed_over[static_cast<std::size_t>(t)] = alloc.allocate({256}, at::kFloat);  // 1 KiB each, freed by main
      all_holding.arrive_and_wait();
      for (int i = 0; i < 500; ++i) {
        try {
          at::Tensor x = alloc.allocate({(i % 13 + 1) * 64}, at::kFloat);
          x.fill_(static_cast<float>(i));
        } catch (const distorch::device_error&) {
          ++refused;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(gpu.used() == threads_count * 1024u);
  CHECK(gpu.peak() >= threads_count * 1024u);
  CHECK(gpu.peak() <= gpu.capacity());
  handed_over.clear();  // storages allocated on other threads die here
  CHECK(gpu.used() == 0);
}

TEST_CASE("pinned_host_allocator: without CUDA it reports that pinned memory needs CUDA") {
  static_assert(distorch::allocator<distorch::pinned_host_allocator>);
  distorch::pinned_host_allocator pinned;
  CHECK(pinned.device() == device_id::cpu());
  const bool cuda = distorch::torch_device_count(c10::DeviceType::CUDA) > 0;
  CHECK(distorch::pinned_available() == cuda);
  if (cuda) {
    at::Tensor t = pinned.allocate({1024}, at::kFloat);
    CHECK(t.is_pinned());
    return;
  }
  try {
    (void)pinned.allocate({1024}, at::kFloat);
    FAIL("expected device_error");
  } catch (const distorch::device_error& e) {
    CHECK(std::string(e.what()).find("pinned memory needs CUDA") != std::string::npos);
    CHECK(e.info().fix.find("device_allocator") != std::string::npos);
  }
}

TEST_CASE("memory_space_access: host kinds share memory, accelerators copy on streams") {
  using distorch::memory_space_access;
  static_assert(memory_space_access<device_kind::cpu, device_kind::sim>::accessible);
  static_assert(memory_space_access<device_kind::sim, device_kind::sim>::same_memory);
  static_assert(!memory_space_access<device_kind::cpu, device_kind::sim>::async_copy);
  static_assert(!memory_space_access<device_kind::cpu, device_kind::cuda>::accessible);
  static_assert(memory_space_access<device_kind::cpu, device_kind::cuda>::async_copy);
  static_assert(memory_space_access<device_kind::cuda, device_kind::cuda>::async_copy);
  static_assert(!memory_space_access<device_kind::cuda, device_kind::xpu>::same_memory);
  for (auto from : {device_kind::cpu, device_kind::cuda, device_kind::mps, device_kind::xpu, device_kind::sim})
    for (auto to : {device_kind::cpu, device_kind::cuda, device_kind::mps, device_kind::xpu, device_kind::sim}) {
      const auto a = distorch::access_between(from, to);
      CHECK(a == distorch::access_between(to, from));  // symmetric
      CHECK(a.same_memory == (distorch::host_backed(from) && distorch::host_backed(to)));
      CHECK(a.accessible != a.async_copy);             // in place, or by an async copy
    }
}

TEST_CASE("snapshot: measures used and total of simulated devices at named checkpoints") {
  distorch::simulated_device gpu(device_id::parse("cuda:0"), 1ull << 30);
  distorch::simulated_device host(device_id::cpu(), 4ull << 30);
  std::vector<distorch::simulated_device> devices{gpu, host};
  distorch::memory_series series;
  series.take("empty", devices);
  auto held = gpu.reserve_scoped(256ull << 20);
  host.reserve(3000);
  series.take("loaded", devices);
  REQUIRE(series.snapshots().size() == 2);
  const auto& loaded = series.snapshots()[1];
  CHECK(loaded.name == "loaded");
  REQUIRE(loaded.devices.size() == 2);
  CHECK(loaded.devices[0].device == device_id::cuda(0));
  CHECK(loaded.devices[0].used == 256ull << 20);
  CHECK(loaded.devices[0].total == 1ull << 30);
  CHECK(loaded.devices[1].used == 3000);
  CHECK_FALSE(loaded.devices[0].torch_allocated);  // simulated: LibTorch reports nothing
  CHECK(series.snapshots()[0].devices[0].used == 0);
}

TEST_CASE("snapshot: real devices from discover() are measured too") {
  distorch::memory_series series;
  const auto& s = series.take("now");
  REQUIRE_FALSE(s.devices.empty());
  CHECK(s.devices[0].device == device_id::cpu());
  CHECK(s.devices[0].total == distorch::host_memory()->total);
  CHECK(s.devices[0].used > 0);
  CHECK(s.devices[0].used <= s.devices[0].total);
}

TEST_CASE("snapshot: the table is one aligned series") {
  distorch::memory_series series;
  series.add({"start", {{device_id::cuda(0), 0, 24ull << 30, 0, 0}, {device_id::cpu(), 5ull << 30, 64ull << 30, {}, {}}}});
  series.add({"after loading the model", {{device_id::cuda(0), 12ull << 30, 24ull << 30, 11ull << 30, 12ull << 30},
                                          {device_id::cpu(), 9ull << 30, 64ull << 30, {}, {}}}});
  const auto lines = lines_of(series.table());
  REQUIRE(lines.size() == 5);
  CHECK(lines[0].find("checkpoint") == 0);
  // Text columns start at the same place on every line; byte columns end at the same place.
  const auto device_column = lines[0].find("device");
  for (std::size_t i = 1; i < lines.size(); ++i) {
    const bool is_cuda = i % 2 == 1;
    CHECK(lines[i].find(is_cuda ? "cuda:0" : "cpu") == device_column);
  }
  CHECK(lines[3].find("after loading the model") == 0);
  CHECK(lines[3].find("11.00 GiB") != std::string::npos);
  CHECK(lines[3].find("12.00 GiB") != std::string::npos);
  const auto reserved_end = lines[0].size();
  CHECK(lines[1].size() == reserved_end);  // right-aligned last column ends under its header
  CHECK(lines[3].size() == reserved_end);
  CHECK(lines[2].back() == '-');  // cpu: not reported
  CHECK(lines[4].size() == reserved_end);
  const auto total_end = lines[0].find("torch allocated") - 2;
  for (std::size_t i = 1; i < lines.size(); ++i) CHECK(lines[i].substr(total_end - 3, 3) == "GiB");
}

TEST_CASE("snapshot: JSON carries exact bytes and null for unreported figures") {
  distorch::memory_series series;
  series.add({"a", {{device_id::sim(1), 123, 456, {}, {}}, {device_id::cuda(0), 7, 8, 5, 6}}});
  const auto j = series.json();
  REQUIRE(j["snapshots"].size() == 1);
  const auto& devices = j["snapshots"][0]["devices"];
  CHECK(j["snapshots"][0]["name"].get<std::string>() == "a");
  CHECK(devices[0]["device"].get<std::string>() == "sim:1");
  CHECK(devices[0]["used"].get<std::uint64_t>() == 123);
  CHECK(devices[0]["total"].get<std::uint64_t>() == 456);
  CHECK(devices[0]["torch_allocated"].is_null());
  CHECK(devices[0]["torch_reserved"].is_null());
  CHECK(devices[1]["torch_allocated"].get<std::uint64_t>() == 5);
  CHECK(devices[1]["torch_reserved"].get<std::uint64_t>() == 6);
  CHECK((nlohmann::json::parse(j.dump()) == j));
}
