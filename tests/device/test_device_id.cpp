#include "distorch/device/device_id.hpp"

#include <doctest/doctest.h>

#include <unordered_set>

using distorch::device_id;
using distorch::device_kind;

TEST_CASE("device_id parses and prints the strings PyTorch users write") {
  struct row { const char* text; device_kind kind; int index; const char* printed; };
  const row rows[] = {
      {"cpu", device_kind::cpu, -1, "cpu"},      {"cuda:0", device_kind::cuda, 0, "cuda:0"},
      {"cuda", device_kind::cuda, 0, "cuda:0"},  {"cuda:7", device_kind::cuda, 7, "cuda:7"},
      {"mps", device_kind::mps, -1, "mps"},      {"xpu:1", device_kind::xpu, 1, "xpu:1"},
      {"npu:0", device_kind::npu, 0, "npu:0"},   {"mlu:2", device_kind::mlu, 2, "mlu:2"},
      {"sim:3", device_kind::sim, 3, "sim:3"},   {"cpu:0", device_kind::cpu, -1, "cpu"},
      {"xpu", device_kind::xpu, 0, "xpu:0"},
  };
  for (const auto& r : rows) {
    CAPTURE(r.text);
    const auto id = device_id::parse(r.text);
    CHECK(id.kind == r.kind);
    CHECK(id.index == r.index);
    CHECK(id.str() == r.printed);
    CHECK(device_id::parse(id.str()) == id);
  }
}

TEST_CASE("device_id rejects bad names with allocation_error and a column") {
  struct row { const char* text; std::size_t column; };
  const row rows[] = {{"cuda:-1", 6}, {"cuda:x", 6}, {"gpu", 1}, {"", 1}, {"cuda:", 6}, {"sim", 4},
                      {"CUDA:0", 1}, {"cuda:1x", 7}, {"mps:1", 5}, {"cuda:99999999", 6}};
  for (const auto& r : rows) {
    CAPTURE(r.text);
    auto result = device_id::try_parse(r.text);
    CHECK_FALSE(result.ok());
    CHECK(result.index + 1 == r.column);
    CHECK_THROWS_AS(device_id::parse(r.text), distorch::allocation_error);
  }
}

TEST_CASE("device_id orders, compares and hashes") {
  CHECK(device_id::cpu() < device_id::cuda(0));
  CHECK(device_id::cuda(0) < device_id::cuda(1));
  CHECK(device_id::sim(0) == device_id::parse("sim:0"));
  std::unordered_set<device_id> set{device_id::cpu(), device_id::cuda(0), device_id::cuda(0)};
  CHECK(set.size() == 2);
  CHECK(device_id::sim(1).is_host_backed());
  CHECK_FALSE(device_id::cuda(1).is_host_backed());
}
