// tests/cuda: streaming on a real NVIDIA GPU. Prefetch on a side copy stream, pinned homes, the
// host staging ring, GGUF units kept quantized, donor-GPU copies, two compute streams at once, and
// the CUDA cache release, each checked bit for bit against the undistributed model on cuda:0.
//
// Every case is registered everywhere and skipped (doctest's `skip` decorator, decided at
// registration, so doctest counts it as skipped, never as passed) when LibTorch reports no CUDA
// device or the build has no CUDA code paths (DISTORCH_WITH_CUDA undefined); one line on stdout
// names the reason. Run with --no-skip (-ns) on such a machine and every case fails at its first
// REQUIRE: none can pass without a GPU.
#include "../runtime/models.hpp"

#include <ATen/ops/empty.h>
#include <c10/core/Device.h>
#include <c10/core/Event.h>
#include <c10/core/GradMode.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#if defined(DISTORCH_WITH_CUDA)
// Not c10/cuda/CUDAGuard.h: its inline CUDAGuardImpl calls the CUDA runtime directly, and
// distorch_dep does not link libcudart; c10::StreamGuard reaches the same guard through LibTorch.
#include <ATen/cuda/Sleep.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "distorch/device/cuda_caching_allocator.hpp"
#include "distorch/device/device.hpp"
#include "distorch/device/discover.hpp"
#include "distorch/device/empty_caches.hpp"
#include "distorch/io/gguf_source.hpp"
#include "distorch/memory/pinned_host_allocator.hpp"
#include "distorch/runtime/distributed_module.hpp"

#include <doctest/doctest.h>

#include "support/test_files.hpp"

#include <stdlib.h>

#include <cmath>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <latch>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace {

using distorch::device_id;

const c10::Device cuda0(c10::DeviceType::CUDA, 0);
const c10::Device cuda1(c10::DeviceType::CUDA, 1);

int cuda_devices() {
  static const int n = distorch::torch_device_count(c10::DeviceType::CUDA);
  return n;
}

// Why every case is skipped here, or nullopt when they run.
std::optional<std::string> skip_reason() {
#if defined(DISTORCH_WITH_CUDA)
  if (cuda_devices() == 0) return std::string("LibTorch reports no CUDA device");
  return std::nullopt;
#else
  return std::string("this build has no CUDA code paths (DISTORCH_WITH_CUDA undefined: LibTorch without CUDA, "
                     "or no CUDA runtime headers)");
#endif
}
bool skip_all() { return skip_reason().has_value(); }
bool skip_without_two_gpus() { return skip_all() || cuda_devices() < 2; }

// Prints the reason once per run, before the cases, where meson's log and the console show it.
struct skip_reason_listener : doctest::IReporter {
  explicit skip_reason_listener(const doctest::ContextOptions&) {}
  void test_run_start() override {
    if (const auto why = skip_reason())
      std::cout << "tests/cuda: skipped: " << *why << std::endl;
    else if (cuda_devices() < 2)
      std::cout << "tests/cuda: skipped the donor-GPU case: it needs 2 CUDA devices, LibTorch reports " << cuda_devices()
                << std::endl;
  }
  void report_query(const doctest::QueryData&) override {}
  void test_run_end(const doctest::TestRunStats&) override {}
  void test_case_start(const doctest::TestCaseData&) override {}
  void test_case_reenter(const doctest::TestCaseData&) override {}
  void test_case_end(const doctest::CurrentTestCaseStats&) override {}
  void test_case_exception(const doctest::TestCaseException&) override {}
  void subcase_start(const doctest::SubcaseSignature&) override {}
  void subcase_end() override {}
  void log_assert(const doctest::AssertData&) override {}
  void log_message(const doctest::MessageData&) override {}
  void test_case_skipped(const doctest::TestCaseData&) override {}
};
REGISTER_LISTENER("cuda_skip_reason", 1, skip_reason_listener);

// cuBLAS promises bitwise-reproducible results while several streams run concurrently only with a
// fixed workspace configuration; set before the first cuBLAS handle exists (unless the caller set one).
const bool cublas_workspace_fixed = [] { return ::setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", 0) == 0; }();

// The stream LibTorch queues work on for `device` from this thread now.
c10::Stream current_stream(c10::Device device) { return c10::impl::VirtualGuardImpl(device.type()).getStream(device); }

// The same bits, wherever the two tensors live.
bool same_bits(const at::Tensor& a, const at::Tensor& b) { return test_models::bit_identical(a.cpu(), b.cpu()); }

// Waits (polling, so that it also builds with LibTorch 1.13) until `event` has completed.
[[maybe_unused]] bool wait_for(const c10::Event& event, std::chrono::seconds limit) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (!event.query()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  return true;
}

// One copy the runtime asked its allocator for, with the stream that was current on the target
// device when it was queued: that is the stream the copy runs on.
struct copy_record {
  c10::Device source;
  c10::Device target;
  bool non_blocking = false;
  bool source_pinned = false;
  std::optional<c10::Stream> stream;
};

struct copy_log {
  std::mutex mutex;
  std::vector<copy_record> records;
  void clear() {
    std::lock_guard lock(mutex);
    records.clear();
  }
  // The fetches: load-time copies are blocking, the residency manager's are queued.
  std::vector<copy_record> async_copies() {
    std::lock_guard lock(mutex);
    std::vector<copy_record> out;
    for (const auto& r : records)
      if (r.non_blocking) out.push_back(r);
    return out;
  }
};

// booked_copy_allocator, recording every copy: the runtime's own allocator protocol is how a test
// sees which stream a fetch ran on (the manager keeps its copy stream private).
struct recording_allocator {
  std::shared_ptr<copy_log> log = std::make_shared<copy_log>();
  distorch::held_tensor copy_to(const at::Tensor& source, const distorch::device_pool& pool, const distorch::pool_device& target,
                                const distorch::copy_request& request) const {
    copy_record r{source.device(), target.torch_device, request.non_blocking, source.device().is_cpu() && source.is_pinned(),
                  std::nullopt};
    if (!target.host_backed()) r.stream = current_stream(target.torch_device);
    {
      std::lock_guard lock(log->mutex);
      log->records.push_back(r);
    }
    return distorch::booked_copy_allocator{}.copy_to(source, pool, target, request);
  }
};
static_assert(distorch::unit_allocator<recording_allocator>);

using mlp_module = distorch::DistributedModule<torch::nn::Sequential, distorch::any_policy, recording_allocator>;

// The real devices: cuda:0 .. cuda:(gpus - 1) and the host.
distorch::device_pool cuda_pool(int gpus) {
  distorch::device_pool pool;
  for (const auto& d : distorch::discover().devices)
    if (d.id.kind == distorch::device_kind::cuda && d.id.index < gpus) pool.add(distorch::real_device(d));
  pool.add_host();
  return pool;
}

// The first `resident` units on the compute device, the others homed on `donor`.
distorch::placement_plan plan_for(const distorch::inventory& inv, const device_id& compute, const device_id& donor,
                                  std::size_t resident = 1) {
  distorch::placement_plan plan;
  plan.compute = compute;
  plan.policy = "head on the compute device, the rest on " + donor.str() + " (test)";
  for (std::size_t i = 0; i < inv.size(); ++i)
    plan.units.push_back({inv[i].name, i < resident ? compute : donor, inv[i].bytes, distorch::placement_reason::policy});
  return plan;
}

// A model to distribute (on the CPU, as loaded) and the same weights as a plain model on `device`.
struct twin_models {
  torch::nn::Sequential model;
  torch::nn::Sequential reference;
};
twin_models make_twin(std::int64_t width, int depth, c10::Device device) {
  test_models::deterministic();
  twin_models t{test_models::mlp_stack(width, depth), test_models::mlp_stack(width, depth)};
  test_models::copy_weights(*t.model, *t.reference);
  t.reference->to(device);
  return t;
}

// Bytes at home of the units that stream: what one forward fetches.
std::uint64_t streamed_bytes(const distorch::residency_manager& m) {
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < m.size(); ++i)
    if (m.streams(i))
      for (const auto& h : m.unit(i).home_data) total += static_cast<std::uint64_t>(h.data.numel()) * h.data.element_size();
  return total;
}

// After a forward nothing fetched stays on the compute device: only the resident units are booked there.
void check_all_released(const mlp_module& dm, const distorch::device_pool& pool, std::uint64_t resident_bytes) {
  const auto& m = dm.residency();
  CHECK_FALSE(m.any_running());
  for (std::size_t i = 0; i < m.size(); ++i)
    if (m.streams(i)) {
      CHECK_FALSE(m.fetched(i));
      for (std::size_t t = 0; t < m.unit(i).handles.size(); ++t)
        CHECK(m.unit(i).handles[t].data_ptr() == m.unit(i).home_data[t].data.data_ptr());  // back at home
    }
  CHECK(pool.used(device_id::cuda(0)) == resident_bytes);
}

}  // namespace

TEST_CASE("CUDA prefetch: CPU-homed units are copied ahead of use on a side stream that does not wait for compute; "
          "output bit-identical to the model on cuda:0" *
          doctest::skip(skip_all())) {
  REQUIRE(cuda_devices() >= 1);
  c10::NoGradGuard no_grad;
  constexpr std::int64_t width = 1024;  // 4 MiB per unit
  constexpr int depth = 8;
  auto twin = make_twin(width, depth, cuda0);
  auto pool = cuda_pool(1);
  distorch::distribute_spec spec;
  spec.compute = device_id::cuda(0);
  spec.streaming.prefetch_depth = 2;
  const auto inv = distorch::bind_units(*twin.model).units;
  REQUIRE(inv.size() == depth);
  recording_allocator alloc;
  mlp_module dm(twin.model, pool, plan_for(inv, spec.compute, device_id::cpu()), spec, alloc);
  auto& manager = dm.residency();
  const std::uint64_t streamed = streamed_bytes(manager);
  REQUIRE(streamed == inv.total_bytes() - inv[0].bytes);

  const at::Tensor x = at::randn({64, width}).to(cuda0);
  const at::Tensor expected = twin.reference->forward(x);
  const c10::Stream compute_stream = current_stream(cuda0);

  // The first forward learns the order: every streamed unit is fetched as it enters.
  CHECK(same_bits(dm.forward(x), expected));
  CHECK(dm.stats().prefetch_misses == depth - 1);

  // From the second on, each streamed unit was fetched while the units before it ran.
  dm.reset_stats();
  alloc.log->clear();
  CHECK(same_bits(dm.forward(x), expected));
  const auto s = dm.stats();
  INFO(s.str());
  CHECK(s.prefetch_hits == depth - 1);
  CHECK(s.prefetch_misses == 0);
  CHECK(s.fetches == depth - 1);
  CHECK(s.bytes_fetched == streamed);
  CHECK(s.copy_seconds > 0);  // timed by events on the copy stream
  const auto copies = alloc.log->async_copies();
  REQUIRE(copies.size() == 2 * (depth - 1));  // weight and bias of every streamed unit, queued
  REQUIRE(copies.front().stream.has_value());
  const c10::Stream copy_stream = *copies.front().stream;
  for (const auto& c : copies) {
    CHECK(c.source.is_cpu());
    CHECK(c.source_pinned);  // pinned homes: the copies really are asynchronous
    CHECK(c.target == cuda0);
    REQUIRE(c.stream.has_value());
    CHECK(*c.stream == copy_stream);
  }
  CHECK(copy_stream.device() == cuda0);
  CHECK(copy_stream != compute_stream);
  check_all_released(dm, pool, inv[0].bytes);

#if defined(DISTORCH_WITH_CUDA)
  // The copy stream does not wait for compute: with the compute stream busy for about a second, a
  // prefetch completes while compute still runs.
  {
    c10::Event compute_done(c10::DeviceType::CUDA);
    at::cuda::sleep(2'000'000'000);  // spins one thread ~1 s on the compute stream
    compute_done.record(compute_stream);
    alloc.log->clear();
    REQUIRE(manager.prefetch(1));
    const auto queued = alloc.log->async_copies();
    REQUIRE(queued.size() == 2);
    CHECK(*queued.front().stream == copy_stream);
    c10::Event copied(c10::DeviceType::CUDA);
    copied.record(copy_stream);
    REQUIRE(wait_for(copied, std::chrono::seconds(30)));
    CHECK_MESSAGE(!compute_done.query(), "the prefetch completed only after the busy compute stream: the copy waited for compute");
    REQUIRE(wait_for(compute_done, std::chrono::seconds(60)));
    dm.reset_stats();
    CHECK(same_bits(dm.forward(x), expected));
    const auto after = dm.stats();
    INFO(after.str());
    CHECK(after.prefetch_hits == depth - 1);
    CHECK(after.fetches == depth - 2);  // unit 1 was already there
    check_all_released(dm, pool, inv[0].bytes);
  }
#else
  FAIL("built without DISTORCH_WITH_CUDA: the overlap check needs at::cuda::sleep");
#endif
}

TEST_CASE("pinned homes: CPU-homed units rest in page-locked memory when pinned_host is on and fits; forward is bit-identical" *
          doctest::skip(skip_all())) {
  REQUIRE(cuda_devices() >= 1);
  REQUIRE(distorch::pinned_available());
  c10::NoGradGuard no_grad;
  constexpr std::int64_t width = 512;
  constexpr int depth = 6;
  for (bool pinned : {true, false}) {
    CAPTURE(pinned);
    auto twin = make_twin(width, depth, cuda0);
    auto pool = cuda_pool(1);
    distorch::distribute_spec spec;
    spec.compute = device_id::cuda(0);
    spec.streaming.prefetch_depth = 1;
    spec.streaming.pinned_host = pinned;
    const auto inv = distorch::bind_units(*twin.model).units;
    recording_allocator alloc;
    mlp_module dm(twin.model, pool, plan_for(inv, spec.compute, device_id::cpu()), spec, alloc);
    const auto& manager = dm.residency();
    CHECK(manager.ring() == nullptr);  // a model this small fits: pinned homes, no ring
    auto check_homes = [&] {
      std::size_t homes = 0;
      for (std::size_t i = 0; i < manager.size(); ++i) {
        const auto& u = manager.unit(i);
        if (!u.home.is_cpu()) continue;
        for (std::size_t t = 0; t < u.handles.size(); ++t) {
          CHECK(u.home_data[t].data.is_pinned() == pinned);
          CHECK(u.handles[t].device().is_cpu());
          CHECK(u.handles[t].is_pinned() == pinned);  // the model's own parameters rest there
          ++homes;
        }
      }
      CHECK(homes == 2 * (depth - 1));
    };
    check_homes();
    CHECK(pool.used(device_id::cpu()) >= streamed_bytes(manager));

    const at::Tensor x = at::randn({16, width}).to(cuda0);
    const at::Tensor expected = twin.reference->forward(x);
    alloc.log->clear();
    for (int k = 0; k < 3; ++k) CHECK(same_bits(dm.forward(x), expected));
    const auto copies = alloc.log->async_copies();
    CHECK(copies.size() == 3 * 2 * (depth - 1));
    for (const auto& c : copies) CHECK(c.source_pinned == pinned);
    check_homes();
    check_all_released(dm, pool, inv[0].bytes);
  }
}

TEST_CASE("staging ring: pageable CPU homes reach cuda:0 through a bounded page-locked ring, chunk by chunk, bit-identical" *
          doctest::skip(skip_all())) {
  REQUIRE(cuda_devices() >= 1);
  c10::NoGradGuard no_grad;
  constexpr std::int64_t width = 512;  // a 1 MiB weight: two chunks of a 512 KiB slot; the bias one
  constexpr int depth = 6;
  for (std::size_t prefetch : {0u, 1u, 2u}) {
    CAPTURE(prefetch);
    auto twin = make_twin(width, depth, cuda0);
    auto pool = cuda_pool(1);
    distorch::distribute_spec spec;
    spec.compute = device_id::cuda(0);
    spec.streaming.prefetch_depth = prefetch;
    spec.streaming.staging_ring_bytes = 1 << 20;
    spec.streaming.staging_ring_slots = 2;
    const auto inv = distorch::bind_units(*twin.model).units;
    recording_allocator alloc;
    mlp_module dm(twin.model, pool, plan_for(inv, spec.compute, device_id::cpu()), spec, alloc);
    const auto& manager = dm.residency();
    const auto* ring = manager.ring();
    REQUIRE(ring != nullptr);
    REQUIRE(ring->slots() == 2);
    CHECK(ring->slot_bytes() == 512u << 10);
    for (std::size_t k = 0; k < ring->slots(); ++k) CHECK(ring->slot(k).is_pinned());
    std::uint64_t expected_chunks = 0;
    for (std::size_t i = 0; i < manager.size(); ++i) {
      const auto& u = manager.unit(i);
      if (!u.home.is_cpu()) continue;
      for (const auto& h : u.home_data) {
        CHECK_FALSE(h.data.is_pinned());  // the homes stay pageable: only the ring is locked
        const std::uint64_t b = static_cast<std::uint64_t>(h.data.numel()) * h.data.element_size();
        expected_chunks += (b + ring->slot_bytes() - 1) / ring->slot_bytes();
      }
    }
    CHECK(expected_chunks == 3 * (depth - 1));
    const std::uint64_t streamed = streamed_bytes(manager);

    const at::Tensor x = at::randn({16, width}).to(cuda0);
    const at::Tensor expected = twin.reference->forward(x);
    CHECK(same_bits(dm.forward(x), expected));
    dm.reset_stats();
    alloc.log->clear();
    CHECK(same_bits(dm.forward(x), expected));
    const auto s = dm.stats();
    INFO(s.str());
    CHECK(s.ring_chunks == expected_chunks);  // every streamed unit once per forward
    CHECK(s.ring_bytes == streamed);
    CHECK(s.bytes_fetched == streamed);
    CHECK(alloc.log->async_copies().empty());  // no fetch bypassed the ring
    CHECK(ring->stats().slot_reuses > 0);
    if (prefetch > 0) CHECK(s.prefetch_hits == depth - 1);
    check_all_released(dm, pool, inv[0].bytes);
  }
}

namespace {

// `write_mlp_gguf.py OUT WIDTH DEPTH`: a GGUF v3 file with the tensors of mlp_stack(WIDTH, DEPTH),
// written byte by byte from the specification (numpy only, independent of distorch): the weights
// of Linear 0, 4, ... in Q8_0, of Linear 2, 6, ... in Q4_0, every bias in F32. (The same writer
// as tests/runtime/test_distributed.cpp's.)
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

}  // namespace

TEST_CASE("GGUF kept quantized: streamed units cross to cuda:0 as raw blocks, are dequantized there, and match io/'s "
          "dequantization loaded normally, bit for bit" *
          doctest::skip(skip_all())) {
  REQUIRE(cuda_devices() >= 1);
  c10::NoGradGuard no_grad;
  constexpr int width = 256, depth = 4;
  distorch_test::temp_dir dir{"cuda-gguf"};
  const std::string path = dir / "mlp.gguf";
  const int rc = distorch_test::run_python(dir, "write_mlp_gguf.py", mlp_gguf_script,
                                           path + " " + std::to_string(width) + " " + std::to_string(depth));
  REQUIRE_MESSAGE(rc == 0, "the Python GGUF writer failed: " << distorch_test::read_file(dir / "write_mlp_gguf.py.log"));
  const auto file = std::make_shared<distorch::gguf_source>(path);

  // The reference: the file's weights dequantized by io/ and loaded as is, on cuda:0.
  test_models::deterministic();
  auto reference = test_models::mlp_stack(width, depth);
  for (const auto& p : reference->named_parameters(true)) p.value().set_data(file->load(p.key()));
  reference->to(cuda0);
  const at::Tensor x = at::randn({8, width}).to(cuda0);
  const at::Tensor expected = reference->forward(x);

  // A weight rests in a float32 carrier of its stored bytes (rounded up to whole words); biases are F32.
  auto stored_bytes = [&](const std::string& module) {
    return (file->info(module + ".weight").bytes + 3) / 4 * 4 + static_cast<std::uint64_t>(width) * 4;
  };
  auto run = [&](bool keep_quantized) {
    CAPTURE(keep_quantized);
    at::manual_seed(17);
    auto model = test_models::mlp_stack(width, depth);  // other values: every weight must come from the file
    auto pool = cuda_pool(1);
    distorch::distribute_spec spec;
    spec.compute = device_id::cuda(0);
    spec.weights = {file};
    spec.keep_quantized = keep_quantized;
    spec.streaming.prefetch_depth = 1;
    const auto inv = distorch::bind_units(*model).units;
    REQUIRE(inv.size() == depth);
    mlp_module dm(model, pool, plan_for(inv, spec.compute, device_id::cpu()), spec);
    const auto& manager = dm.residency();
    for (std::size_t i = 1; i < depth; ++i) {
      const auto& u = manager.unit(i);
      CHECK(u.home.is_cpu());
      CHECK(dm.plan().units[i].bytes == (keep_quantized ? stored_bytes(u.name) : inv[i].bytes));
      for (const auto& h : u.home_data) CHECK(h.data.is_pinned());
    }
    CHECK(same_bits(dm.forward(x), expected));
    dm.reset_stats();
    CHECK(same_bits(dm.forward(x), expected));
    const auto s = dm.stats();
    INFO(s.str());
    CHECK(s.prefetch_hits == depth - 1);
    check_all_released(dm, pool, inv[0].bytes);  // the dequantized copies are given back too
    return s.bytes_fetched;
  };
  const std::uint64_t full = run(false);
  const std::uint64_t compact = run(true);
  const std::uint64_t unit_bytes = static_cast<std::uint64_t>(width) * width * 4 + static_cast<std::uint64_t>(width) * 4;
  CHECK(full == 3 * unit_bytes);
  CHECK(compact == stored_bytes("2") + stored_bytes("4") + stored_bytes("6"));
  CHECK(compact * 3 < full);  // Q8_0 / Q4_0 are ~4-7x smaller than float32
}

TEST_CASE("donor GPU: units homed on cuda:1 are copied device to device to cuda:0 on a side stream, bit-identical" *
          doctest::skip(skip_without_two_gpus())) {
  REQUIRE(cuda_devices() >= 2);
  c10::NoGradGuard no_grad;
  constexpr std::int64_t width = 1024;
  constexpr int depth = 6;
  auto twin = make_twin(width, depth, cuda0);
  auto pool = cuda_pool(2);
  distorch::distribute_spec spec;
  spec.compute = device_id::cuda(0);
  spec.streaming.prefetch_depth = 1;
  const auto inv = distorch::bind_units(*twin.model).units;
  recording_allocator alloc;
  mlp_module dm(twin.model, pool, plan_for(inv, spec.compute, device_id::cuda(1)), spec, alloc);
  const auto& manager = dm.residency();
  const std::uint64_t streamed = streamed_bytes(manager);
  auto check_homes = [&] {
    for (std::size_t i = 1; i < manager.size(); ++i) {
      CHECK(manager.unit(i).home == device_id::cuda(1));
      for (const auto& h : manager.unit(i).handles) CHECK(h.device() == cuda1);
    }
    CHECK(pool.used(device_id::cuda(1)) == streamed);
  };
  check_homes();

  const at::Tensor x = at::randn({64, width}).to(cuda0);
  const at::Tensor expected = twin.reference->forward(x);
  const c10::Stream compute_stream = current_stream(cuda0);
  CHECK(same_bits(dm.forward(x), expected));
  dm.reset_stats();
  alloc.log->clear();
  CHECK(same_bits(dm.forward(x), expected));
  const auto s = dm.stats();
  INFO(s.str());
  CHECK(s.prefetch_hits == depth - 1);
  CHECK(s.prefetch_misses == 0);
  CHECK(s.bytes_fetched == streamed);
  const auto copies = alloc.log->async_copies();
  REQUIRE(copies.size() == 2 * (depth - 1));
  for (const auto& c : copies) {
    CHECK(c.source == cuda1);
    CHECK(c.target == cuda0);
    REQUIRE(c.stream.has_value());
    CHECK(c.stream->device() == cuda0);
    CHECK(*c.stream != compute_stream);
  }
  check_homes();
  check_all_released(dm, pool, inv[0].bytes);
}

TEST_CASE("two compute streams: concurrent forwards of one DistributedModule from two threads, each on its own CUDA "
          "stream, match serial runs bit for bit" *
          doctest::skip(skip_all())) {
  REQUIRE(cuda_devices() >= 1);
#if defined(DISTORCH_WITH_CUDA)
  c10::NoGradGuard no_grad;
  constexpr std::int64_t width = 1024;  // 4 MiB units, large batches: copies and compute of similar length
  constexpr int depth = 8;
  auto twin = make_twin(width, depth, cuda0);
  auto pool = cuda_pool(1);
  distorch::distribute_spec spec;
  spec.compute = device_id::cuda(0);
  spec.streaming.prefetch_depth = 1;
  const auto inv = distorch::bind_units(*twin.model).units;
  recording_allocator alloc;
  mlp_module dm(twin.model, pool, plan_for(inv, spec.compute, device_id::cpu()), spec, alloc);
  const at::Tensor xs[2] = {at::randn({2048, width}).to(cuda0), at::randn({2048, width}).to(cuda0)};

  // Learn the order, and find the copy stream so that the compute streams differ from it.
  alloc.log->clear();
  CHECK(same_bits(dm.forward(xs[0]), twin.reference->forward(xs[0])));
  const auto copies = alloc.log->async_copies();
  REQUIRE_FALSE(copies.empty());
  const c10::Stream copy_stream = *copies.front().stream;
  std::vector<c10::cuda::CUDAStream> streams;
  for (int k = 0; k < 128 && streams.size() < 2; ++k) {
    const c10::cuda::CUDAStream s = c10::cuda::getStreamFromPool(false, 0);
    if (c10::Stream(s) != copy_stream && (streams.empty() || streams.front() != s)) streams.push_back(s);
  }
  REQUIRE(streams.size() == 2);

  // Serial runs, each on its own stream: the expected outputs.
  at::Tensor expected[2];
  for (int k = 0; k < 2; ++k) {
    c10::StreamGuard guard(streams[k]);
    expected[k] = dm.forward(xs[k]).cpu();
  }
  for (int k = 0; k < 2; ++k) CHECK(test_models::bit_identical(expected[k], twin.reference->forward(xs[k]).cpu()));

  constexpr int rounds = 20;
  for (int round = 0; round < rounds; ++round) {
    CAPTURE(round);
    at::Tensor got[2];
    std::exception_ptr failed[2];
    std::latch start(2);
    auto work = [&](int k) {
      try {
        c10::StreamGuard guard(streams[k]);
        c10::NoGradGuard thread_no_grad;
        start.arrive_and_wait();
        got[k] = dm.forward(xs[k]).cpu();  // waits for this thread's stream only
      } catch (...) {
        failed[k] = std::current_exception();
      }
    };
    std::thread a(work, 0), b(work, 1);
    a.join();
    b.join();
    for (const auto& f : failed)
      if (f) std::rethrow_exception(f);
    for (int k = 0; k < 2; ++k) CHECK(test_models::bit_identical(got[k], expected[k]));
  }
  INFO(dm.stats().str());
  check_all_released(dm, pool, inv[0].bytes);
#else
  FAIL("built without DISTORCH_WITH_CUDA: this case needs c10::cuda streams");
#endif
}

TEST_CASE("empty_caches and cuda_empty_cache give LibTorch's cached CUDA blocks back" * doctest::skip(skip_all())) {
  REQUIRE(cuda_devices() >= 1);
  REQUIRE(distorch::cuda_allocator_stats_supported());
  constexpr std::uint64_t big = 256ull << 20;
  distorch::cuda_empty_cache();  // start from an empty cache: the block below gets a segment of its own
  for (int round = 0; round < 2; ++round) {
    CAPTURE(round);
    std::optional<distorch::torch_allocator_stats> held;
    {
      at::Tensor t = at::empty({static_cast<std::int64_t>(big)}, at::TensorOptions().dtype(at::kByte).device(cuda0));
      t.fill_(1);
      held = distorch::cuda_allocator_stats(0);
      REQUIRE(held);
      CHECK(held->allocated >= big);
      CHECK(held->reserved >= held->allocated);
    }
    const auto cached = distorch::cuda_allocator_stats(0);
    REQUIRE(cached);
    CHECK(cached->allocated + big <= held->allocated);  // freed...
    CHECK(cached->reserved == held->reserved);          // ...but kept by the caching allocator
    if (round == 0) {
      const auto report = distorch::empty_caches();
      CHECK(std::find(report.cleared.begin(), report.cleared.end(), device_id::cuda(0)) != report.cleared.end());
    } else {
      CHECK(distorch::cuda_empty_cache());
    }
    const auto after = distorch::cuda_allocator_stats(0);
    REQUIRE(after);
    CHECK(after->reserved + big <= cached->reserved);  // the block's segment went back to the driver
    CHECK(after->allocated == cached->allocated);       // live tensors untouched
  }
}

TEST_CASE("pinned homes are booked at the bytes really pinned, unload pins no more than pinned_limit, and free gives "
          "the pinned cache back" *
          doctest::skip(skip_all())) {
  REQUIRE(cuda_devices() >= 1);
  REQUIRE(distorch::pinned_available());
  c10::NoGradGuard no_grad;
  distorch::cuda_empty_host_cache();
  const auto before = distorch::cuda_host_allocator_stats();
  constexpr std::int64_t width = 1000;  // 4,000,000-byte weights: the caching host allocator pins 4 MiB blocks
  constexpr int depth = 6;
  auto twin = make_twin(width, depth, cuda0);
  auto pool = cuda_pool(1);
  distorch::distribute_spec spec;
  spec.compute = device_id::cuda(0);
  const auto inv = distorch::bind_units(*twin.model).units;
  // Room for the five CPU homes as pinned blocks, not for the sixth unit unload() sends there too.
  std::uint64_t pinned_homes = 0;
  for (std::size_t i = 1; i < inv.size(); ++i)
    for (const auto& t : inv[i].tensors) pinned_homes += distorch::pinned_block_bytes(t.bytes);
  spec.streaming.pinned_limit = pinned_homes + (1ull << 20);
  recording_allocator alloc;
  {
    mlp_module dm(twin.model, pool, plan_for(inv, spec.compute, device_id::cpu()), spec, alloc);
    CHECK(pool.used(device_id::cpu()) == pinned_homes);  // booked as pinned, not as the tensors' bytes
    CHECK(pinned_homes > inv.total_bytes() - inv[0].bytes);
    if (const auto after = distorch::cuda_host_allocator_stats(); after && before) {
      const double really = static_cast<double>(after->allocated - before->allocated);
      INFO("pinned by LibTorch: " << really << " bytes, booked: " << pool.used(device_id::cpu()));
      CHECK(std::abs(really - static_cast<double>(pool.used(device_id::cpu()))) <= 0.01 * static_cast<double>(pool.used(device_id::cpu())));
    }
    const at::Tensor x = at::randn({8, width}).to(cuda0);
    const at::Tensor expected = twin.reference->forward(x);
    CHECK(same_bits(dm.forward(x), expected));

    dm.unload();  // every unit to the host: the one that does not fit the limit rests pageable
    std::uint64_t pinned_now = 0;
    for (const auto& u : dm.residency().units())
      for (const auto& h : u.home_data)
        if (h.data.is_pinned()) pinned_now += h.booked.bytes();
    CHECK(pinned_now <= spec.streaming.pinned_limit);
    CHECK_FALSE(dm.residency().unit(0).home_data[0].data.is_pinned());  // its 4 MiB weight would cross the limit
    dm.reload();
    CHECK(same_bits(dm.forward(x), expected));
  }
  const auto report = distorch::empty_caches();
  CHECK(report.pinned_released);
  if (const auto after = distorch::cuda_host_allocator_stats(); after && before) CHECK(after->reserved <= before->reserved);
}
