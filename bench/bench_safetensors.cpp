// safetensors loading against the plain-I/O baselines it should match:
//  - open + load views + touch every page of a 1 GiB file, vs read() of the same bytes into a
//    buffer (both from the page cache, which the setup warms);
//  - open + load views only (no touch): zero-copy means this cost does not grow with the data;
//  - copying every tensor into fresh tensors, vs memcpy of the same bytes into a fresh buffer
//    and into an already-faulted buffer.
// The file is generated in a fresh /tmp directory before the benchmarks and deleted after.
// Ratios matter, not absolute times: compare rows of one run.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "distorch/io/safetensors_source.hpp"
#include "distorch/io/safetensors_writer.hpp"

namespace {

constexpr std::size_t file_tensors = 64;
constexpr std::size_t tensor_bytes = std::size_t{16} << 20;  // 64 x 16 MiB = 1 GiB
constexpr std::size_t total_bytes = file_tensors * tensor_bytes;

struct bench_file {
  std::filesystem::path dir;
  std::string path;
  bench_file() {
    std::string pattern = (std::filesystem::temp_directory_path() / "distorch-bench-st-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) std::abort();
    dir = pattern;
    path = (dir / "bench.safetensors").string();
    std::vector<std::byte> data(tensor_bytes);
    for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>(i * 2654435761u >> 24);
    std::vector<distorch::safetensors_entry> entries;
    for (std::size_t i = 0; i < file_tensors; ++i)
      entries.push_back({"blocks." + std::to_string(i) + ".weight", distorch::dtype::f32,
                         {static_cast<std::int64_t>(tensor_bytes / 4 / 1024), 1024}, data});
    distorch::write_safetensors(path, entries);
    warm_page_cache();
  }
  ~bench_file() { std::filesystem::remove_all(dir); }
  void warm_page_cache() const {
    std::vector<char> buf(std::size_t{8} << 20);
    const int fd = ::open(path.c_str(), O_RDONLY);
    while (::read(fd, buf.data(), buf.size()) > 0) {
    }
    ::close(fd);
  }
};

bench_file* file = nullptr;

void BM_read_syscall(benchmark::State& state) {
  std::unique_ptr<char[]> buf(new char[total_bytes + 4096]);
  std::memset(buf.get(), 0, total_bytes + 4096);  // fault the destination in once
  for (auto _ : state) {
    const int fd = ::open(file->path.c_str(), O_RDONLY);
    std::size_t got = 0;
    ::ssize_t r = 0;
    while ((r = ::read(fd, buf.get() + got, std::size_t{64} << 20)) > 0) got += static_cast<std::size_t>(r);
    ::close(fd);
    benchmark::DoNotOptimize(buf.get());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(total_bytes));
}

/// Sums one byte per page of each tensor, so every page of the mapping is faulted in.
std::uint64_t touch(const at::Tensor& t) {
  const auto* p = static_cast<const unsigned char*>(t.data_ptr());
  const auto n = static_cast<std::size_t>(t.nbytes());
  std::uint64_t sum = 0;
  for (std::size_t i = 0; i < n; i += 4096) sum += p[i];
  return sum;
}

void BM_open_load_touch(benchmark::State& state) {
  for (auto _ : state) {
    distorch::safetensors_source src(file->path);
    std::uint64_t sum = 0;
    for (const auto& r : src.records()) sum += touch(src.load(r.name));
    benchmark::DoNotOptimize(sum);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(total_bytes));
}

void BM_open_load_views(benchmark::State& state) {
  for (auto _ : state) {
    distorch::safetensors_source src(file->path);
    std::vector<at::Tensor> views;
    for (const auto& r : src.records()) views.push_back(src.load(r.name));
    benchmark::DoNotOptimize(views.data());
  }
}

void BM_copy_into_fresh_tensors(benchmark::State& state) {
  distorch::safetensors_source src(file->path);
  std::vector<at::Tensor> views;
  for (const auto& r : src.records()) views.push_back(src.load(r.name));
  for (const auto& v : views) benchmark::DoNotOptimize(touch(v));  // mapping faulted in already
  for (auto _ : state) {
    for (const auto& v : views) {
      at::Tensor fresh = at::empty(v.sizes(), v.options());
      fresh.copy_(v);
      benchmark::DoNotOptimize(fresh.data_ptr());
    }
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(total_bytes));
}

void BM_memcpy_into_fresh_buffers(benchmark::State& state) {
  distorch::safetensors_source src(file->path);
  std::vector<at::Tensor> views;
  for (const auto& r : src.records()) views.push_back(src.load(r.name));
  for (const auto& v : views) benchmark::DoNotOptimize(touch(v));
  for (auto _ : state) {
    for (const auto& v : views) {
      std::unique_ptr<char[]> dst(new char[tensor_bytes]);
      std::memcpy(dst.get(), v.data_ptr(), tensor_bytes);
      benchmark::DoNotOptimize(dst.get());
      benchmark::ClobberMemory();
    }
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(total_bytes));
}

void BM_memcpy_prefaulted(benchmark::State& state) {
  std::vector<char> src(total_bytes, 1), dst(total_bytes, 0);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), total_bytes);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(total_bytes));
}

}  // namespace

BENCHMARK(BM_read_syscall)->Unit(benchmark::kMillisecond)->MinTime(1.0);
BENCHMARK(BM_open_load_touch)->Unit(benchmark::kMillisecond)->MinTime(1.0);
BENCHMARK(BM_open_load_views)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_copy_into_fresh_tensors)->Unit(benchmark::kMillisecond)->MinTime(1.0);
BENCHMARK(BM_memcpy_into_fresh_buffers)->Unit(benchmark::kMillisecond)->MinTime(1.0);
BENCHMARK(BM_memcpy_prefaulted)->Unit(benchmark::kMillisecond)->MinTime(1.0);

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  bench_file f;
  file = &f;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  file = nullptr;
  return 0;
}
