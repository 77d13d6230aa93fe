// Tests of device/torch_device.hpp, byte_budget.hpp, device.hpp, memory_info.hpp, discover.hpp
// and empty_caches.hpp. LibTorch headers come before doctest (glog's CHECK would replace doctest's).
#include "distorch/device/byte_budget.hpp"
#include "distorch/device/device.hpp"
#include "distorch/device/discover.hpp"
#include "distorch/device/empty_caches.hpp"
#include "distorch/device/memory_info.hpp"
#include "distorch/device/torch_device.hpp"

#include <unistd.h>

#include <atomic>
#include <fstream>
#include <latch>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

using distorch::device_id;
using distorch::device_kind;

TEST_CASE("torch_device: every device kind maps to its c10::Device") {
  CHECK(distorch::to_torch_device(device_id::cpu()) == c10::Device(c10::DeviceType::CPU));
  CHECK(distorch::to_torch_device(device_id::cuda(0)) == c10::Device(c10::DeviceType::CUDA, 0));
  CHECK(distorch::to_torch_device(device_id::parse("cuda:3")) == c10::Device(c10::DeviceType::CUDA, 3));
  CHECK(distorch::to_torch_device(device_id::parse("cuda")) == c10::Device(c10::DeviceType::CUDA, 0));
  CHECK(distorch::to_torch_device(device_id::parse("xpu:1")) == c10::Device(c10::DeviceType::XPU, 1));
  CHECK(distorch::to_torch_device(device_id::parse("mps")) == c10::Device(c10::DeviceType::MPS));
  CHECK(distorch::to_torch_device(device_id::parse("npu:2")) == c10::Device(c10::DeviceType::PrivateUse1, 2));
  CHECK(distorch::to_torch_device(device_id::parse("mlu:0")) == c10::Device(c10::DeviceType::PrivateUse1, 0));
}

TEST_CASE("torch_device: simulated devices compute on the CPU") {
  for (int i : {0, 1, 7, 300}) {
    const auto d = distorch::to_torch_device(device_id::sim(i));
    CHECK(d.is_cpu());
    CHECK_FALSE(d.has_index());
  }
}

TEST_CASE("torch_device: an index LibTorch cannot address is a device_error") {
  const int too_large = static_cast<int>(std::numeric_limits<c10::DeviceIndex>::max()) + 1;
  CHECK_THROWS_AS(distorch::to_torch_device(device_id::cuda(too_large)), distorch::device_error);
  try {
    distorch::to_torch_device(device_id::cuda(too_large));
  } catch (const distorch::device_error& e) {
    CHECK(e.info().subject == "cuda:" + std::to_string(too_large));
    CHECK_FALSE(e.info().fix.empty());
  }
}

TEST_CASE("torch_device: real LibTorch devices map back") {
  CHECK(distorch::from_torch_device(c10::Device(c10::DeviceType::CPU)) == device_id::cpu());
  CHECK(distorch::from_torch_device(c10::Device(c10::DeviceType::CUDA, 2)) == device_id::cuda(2));
  CHECK(distorch::from_torch_device(c10::Device(c10::DeviceType::CUDA)) == device_id::cuda(0));
  CHECK(distorch::from_torch_device(c10::Device(c10::DeviceType::XPU, 1)) == device_id(device_kind::xpu, 1));
  CHECK(distorch::from_torch_device(c10::Device(c10::DeviceType::MPS)) == device_id(device_kind::mps, -1));
  CHECK(distorch::from_torch_device(c10::Device(c10::DeviceType::PrivateUse1, 1)) == device_id(device_kind::npu, 1));
  CHECK(distorch::from_torch_device(c10::Device(c10::DeviceType::PrivateUse1, 1), device_kind::mlu) ==
        device_id(device_kind::mlu, 1));
  // Round trip for every real (non-simulated) id.
  for (const char* text : {"cpu", "cuda:0", "cuda:5", "xpu:0", "mps", "npu:3"}) {
    const auto id = device_id::parse(text);
    CHECK(distorch::from_torch_device(distorch::to_torch_device(id)) == id);
  }
}

TEST_CASE("torch_device: device types distorch does not place onto are rejected") {
  CHECK_THROWS_AS(distorch::from_torch_device(c10::Device(c10::DeviceType::Meta)), distorch::device_error);
  CHECK_THROWS_AS(distorch::from_torch_device(c10::Device(c10::DeviceType::XLA, 0)), distorch::device_error);
  CHECK_THROWS_AS(distorch::from_torch_device(c10::Device(c10::DeviceType::PrivateUse1, 0), device_kind::cuda),
                  distorch::device_error);
}

TEST_CASE("byte_budget: reserve, release, used, available and peak") {
  distorch::byte_budget budget(device_id::sim(0), 1000);
  CHECK(budget.capacity() == 1000);
  budget.reserve(300);
  budget.reserve(500);
  CHECK(budget.used() == 800);
  CHECK(budget.available() == 200);
  budget.release(500);
  CHECK(budget.used() == 300);
  CHECK(budget.peak() == 800);
  budget.reset_peak();
  CHECK(budget.peak() == 300);
  CHECK(budget.try_reserve(700));
  CHECK(budget.available() == 0);
  CHECK_FALSE(budget.try_reserve(1));
  CHECK(budget.used() == 1000);
}

TEST_CASE("byte_budget: exceeding the capacity is a device_error naming device, request and remainder") {
  distorch::byte_budget budget(device_id::parse("cuda:1"), 4096);
  budget.reserve(1000);
  try {
    budget.reserve(3097, "fetching unit blocks.3");
    FAIL("expected device_error");
  } catch (const distorch::device_error& e) {
    const std::string message = e.what();
    CHECK(e.info().subject == "cuda:1");
    CHECK(e.info().doing == "fetching unit blocks.3");
    CHECK(message.find("3097 bytes") != std::string::npos);
    CHECK(message.find("3096 bytes") != std::string::npos);
    CHECK_FALSE(e.info().fix.empty());
  }
  CHECK(budget.used() == 1000);  // a failed reservation takes nothing
}

TEST_CASE("byte_budget: releasing more than is in use is a device_error and changes nothing") {
  distorch::byte_budget budget(device_id::sim(1), 100);
  budget.reserve(40);
  CHECK_THROWS_AS(budget.release(41), distorch::device_error);
  CHECK_FALSE(budget.try_release(41));
  CHECK(budget.used() == 40);
}

TEST_CASE("reservation: gives bytes back on destruction, reset and move") {
  auto budget = std::make_shared<distorch::byte_budget>(device_id::sim(0), 100);
  {
    auto r = distorch::reserve(budget, 60);
    CHECK(budget->used() == 60);
    CHECK(r.bytes() == 60);
    distorch::reservation moved = std::move(r);
    CHECK(budget->used() == 60);
    CHECK_FALSE(r);
    CHECK(moved);
    CHECK_THROWS_AS(distorch::reserve(budget, 41), distorch::device_error);
  }
  CHECK(budget->used() == 0);
  auto a = distorch::reserve(budget, 30);
  auto b = distorch::reserve(budget, 20);
  a = std::move(b);  // a's 30 go back, b's 20 stay held by a
  CHECK(budget->used() == 20);
  a.reset();
  CHECK(budget->used() == 0);
  CHECK(budget->peak() == 60);
}

TEST_CASE("simulated_device: a device on the CPU with its own accounting") {
  distorch::simulated_device gpu(device_id::parse("cuda:0"), 1 << 20, "what-if GPU");
  static_assert(distorch::device<distorch::simulated_device>);
  CHECK(gpu.id() == device_id::cuda(0));
  CHECK(gpu.torch_device().is_cpu());
  CHECK(gpu.capacity() == (1u << 20));
  CHECK(gpu.available() == (1u << 20));
  CHECK(gpu.transfer().mode == distorch::copy_mode::synchronous);
  CHECK(gpu.transfer().stream_device_type == c10::DeviceType::CPU);
  gpu.reserve(1000);
  {
    auto held = gpu.reserve_scoped(24);
    CHECK(gpu.used() == 1024);
    CHECK(gpu.info().free_bytes == (1u << 20) - 1024);
    CHECK(gpu.info().simulated);
    CHECK(gpu.info().name == "what-if GPU");
  }
  CHECK(gpu.used() == 1000);
  gpu.release(1000);
  CHECK(gpu.used() == 0);
  CHECK(gpu.peak() == 1024);
}

TEST_CASE("simulated_device: copies share one account") {
  distorch::simulated_device a(device_id::sim(2), 500);
  distorch::simulated_device b = a;
  a.reserve(200);
  CHECK(b.used() == 200);
  b.release(200);
  CHECK(a.used() == 0);
}

TEST_CASE("simulated_device: exceeding the capacity is a device_error, never a crash") {
  distorch::simulated_device gpu(device_id::sim(0), 1000);
  gpu.reserve(999);
  CHECK_THROWS_AS(gpu.reserve(2), distorch::device_error);
  CHECK_THROWS_AS(gpu.reserve_scoped(2), distorch::device_error);
  CHECK_FALSE(gpu.try_reserve(2));
  CHECK(gpu.used() == 999);
  CHECK_THROWS_AS(gpu.reserve(~0ull), distorch::device_error);
  CHECK(gpu.used() == 999);
  CHECK(gpu.peak() == 999);
}

TEST_CASE("simulated_device: concurrent reserve and release from threads never exceed capacity or leak") {
  constexpr std::uint64_t capacity = 10'000;
  constexpr int thread_count = 8;
  distorch::simulated_device gpu(device_id::sim(0), capacity);
  std::latch all_holding(thread_count);
  std::latch all_checked(thread_count);
  std::atomic<std::uint64_t> refusals{0};
  std::atomic<bool> over_capacity{false};
  std::atomic<bool> overlap_seen{true};
  std::vector<std::thread> threads;
  for (int t = 0; t < thread_count; ++t) {
    threads.emplace_back([gpu, t, &all_holding, &all_checked, &refusals, &over_capacity, &overlap_seen]() mutable {  // each thread holds its own copy
      {
        // Every thread holds 1000 bytes at the same moment: the accounting must see all of them.
        auto held = gpu.reserve_scoped(1000);
        all_holding.arrive_and_wait();
        if (gpu.used() != thread_count * 1000u) overlap_seen = false;
        all_checked.arrive_and_wait();
      }
      std::mt19937_64 rng(static_cast<std::uint64_t>(t) * 7919u + 1);
      std::uniform_int_distribution<std::uint64_t> size(1, 3000);
      for (int i = 0; i < 20'000; ++i) {
        const std::uint64_t n = size(rng);
        if (gpu.try_reserve(n)) {
          if (gpu.used() > capacity) over_capacity = true;
          gpu.release(n);
        } else {
          ++refusals;
        }
        if (i % 97 == 0) {
          try {
            auto held = gpu.reserve_scoped(n);
          } catch (const distorch::device_error&) {
            ++refusals;
          }
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(overlap_seen.load());
  CHECK_FALSE(over_capacity.load());
  CHECK(gpu.used() == 0);
  CHECK(gpu.peak() >= thread_count * 1000u);
  CHECK(gpu.peak() <= capacity);
}

TEST_CASE("simulated_devices: a parsed topology becomes simulated devices with its ids and capacities") {
  const auto topo = distorch::parse_topology("cuda:0=24GiB,cuda:1=12GiB,cpu=64GiB");
  auto devices = distorch::simulated_devices(topo);
  REQUIRE(devices.size() == 3);
  CHECK(devices[0].id() == device_id::cuda(0));
  CHECK(devices[0].capacity() == 24ull << 30);
  CHECK(devices[1].capacity() == 12ull << 30);
  CHECK(devices[2].id() == device_id::cpu());
  CHECK(devices[2].capacity() == 64ull << 30);
  for (const auto& d : devices) {
    CHECK(d.torch_device().is_cpu());
    CHECK(d.used() == 0);
  }
  devices[1].reserve(12ull << 30);
  CHECK_THROWS_AS(devices[1].reserve(1), distorch::device_error);
  CHECK(devices[0].used() == 0);  // separate accounts
}

TEST_CASE("parse_meminfo: reads MemTotal and MemAvailable in kB") {
  const auto m = distorch::parse_meminfo("MemTotal:       16318940 kB\nMemFree:          412344 kB\nMemAvailable:    9123456 kB\n");
  REQUIRE(m);
  CHECK(m->total == 16318940ull * 1024);
  CHECK(m->free == 9123456ull * 1024);
  const auto old_kernel = distorch::parse_meminfo("MemTotal: 2048 kB\nMemFree: 1024 kB\n");
  REQUIRE(old_kernel);
  CHECK(old_kernel->free == 1024ull * 1024);
}

TEST_CASE("parse_meminfo: text without MemTotal gives nothing") {
  CHECK_FALSE(distorch::parse_meminfo(""));
  CHECK_FALSE(distorch::parse_meminfo("MemFree: 10 kB\n"));
  CHECK_FALSE(distorch::parse_meminfo("MemTotalX: 10 kB\n"));
}

TEST_CASE("parse_meminfo: a malformed value or unit gives nothing") {
  CHECK_FALSE(distorch::parse_meminfo("MemTotal: abc kB\n"));
  CHECK_FALSE(distorch::parse_meminfo("MemTotal: 10 MB\n"));
  CHECK_FALSE(distorch::parse_meminfo("MemTotal:\n"));
}

TEST_CASE("parse_meminfo: a value that overflows 64 bits gives nothing") {
  CHECK_FALSE(distorch::parse_meminfo("MemTotal: 99999999999999999999999 kB\n"));
  CHECK_FALSE(distorch::parse_meminfo("MemTotal: 18014398509481984 kB\n"));  // 2^54 kB overflows bytes
}

TEST_CASE("parse_meminfo: free larger than total (a racy or bogus file) is clamped to total") {
  const auto m = distorch::parse_meminfo("MemTotal: 10 kB\nMemAvailable: 20 kB");
  REQUIRE(m);
  CHECK(m->free == m->total);
}

TEST_CASE("host_memory: agrees with sysconf on this machine") {
  const auto ram = distorch::host_memory();
  REQUIRE(ram);
  const auto pages = static_cast<std::uint64_t>(sysconf(_SC_PHYS_PAGES));
  const auto page = static_cast<std::uint64_t>(sysconf(_SC_PAGESIZE));
  const std::uint64_t expected = pages * page;
  // /proc/meminfo's MemTotal and sysconf's physical pages come from the same kernel counter.
  CHECK(ram->total == expected);
  CHECK(ram->free > 0);
  CHECK(ram->free <= ram->total);
}

TEST_CASE("discover: on this CPU machine returns the CPU first with host RAM") {
  const auto topo = distorch::discover();
  REQUIRE_FALSE(topo.devices.empty());
  const auto& cpu = topo.devices.front();
  CHECK(cpu.id == device_id::cpu());
  CHECK_FALSE(cpu.simulated);
  const auto ram = distorch::host_memory();
  REQUIRE(ram);
  CHECK(cpu.total_bytes == ram->total);
  CHECK(cpu.free_bytes > 0);
  CHECK(cpu.free_bytes <= cpu.total_bytes);
  // Every further device is one LibTorch reports.
  const int cuda = distorch::torch_device_count(c10::DeviceType::CUDA);
  int cuda_found = 0;
  for (const auto& d : topo.devices) cuda_found += d.id.kind == device_kind::cuda;
  CHECK(cuda_found == cuda);
  // No ids repeat.
  for (std::size_t i = 0; i < topo.devices.size(); ++i)
    for (std::size_t j = i + 1; j < topo.devices.size(); ++j) CHECK(topo.devices[i].id != topo.devices[j].id);
}

TEST_CASE("real_device: the discovered CPU models the device concept with live free memory") {
  static_assert(distorch::device<distorch::real_device>);
  const distorch::real_device cpu(distorch::discover().devices.front());
  CHECK(cpu.id() == device_id::cpu());
  CHECK(cpu.torch_device().is_cpu());
  CHECK(cpu.capacity() == distorch::host_memory()->total);
  CHECK(cpu.available() > 0);
  CHECK(cpu.available() <= cpu.capacity());
  CHECK(cpu.transfer().mode == distorch::copy_mode::synchronous);
  CHECK_THROWS_AS(distorch::real_device(distorch::device_info{device_id::sim(0), 1, 1, true, "simulated"}), distorch::device_error);
  const distorch::real_device gpu(distorch::device_info{device_id::cuda(1), 100, 50, false, "a GPU"});
  CHECK(gpu.transfer().mode == distorch::copy_mode::stream);
  CHECK(gpu.transfer().stream_device_type == c10::DeviceType::CUDA);
  CHECK(gpu.torch_device() == c10::Device(c10::DeviceType::CUDA, 1));
}

TEST_CASE("cuda runtime queries answer nothing for devices that do not exist") {
  const int n = distorch::cuda_runtime_device_count();
  CHECK(n >= 0);
  CHECK_FALSE(distorch::cuda_memory(-1));
  CHECK_FALSE(distorch::cuda_memory(n));
  CHECK_FALSE(distorch::cuda_device_name(n));
  if (!distorch::cuda_runtime_available()) CHECK(n == 0);
}

TEST_CASE("empty_caches: runs on every machine and clears only devices that exist") {
  std::vector<char*> blocks;
  for (int i = 0; i < 64; ++i) blocks.push_back(new char[256 * 1024]);
  for (char* b : blocks) delete[] b;
  const auto report = distorch::empty_caches();
  const int cuda = distorch::torch_device_count(c10::DeviceType::CUDA);
  CHECK(report.cleared.size() <= static_cast<std::size_t>(cuda));
  for (const auto& id : report.cleared) {
    CHECK(id.kind == device_kind::cuda);
    CHECK(id.index < cuda);
  }
  if (cuda == 0) {
    CHECK(report.cleared.empty());
    CHECK_FALSE(distorch::cuda_empty_cache());
    CHECK_FALSE(distorch::cuda_allocator_stats(0));
  }
  CHECK_FALSE(distorch::cuda_allocator_stats(-1));
}
