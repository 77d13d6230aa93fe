// Tests for the LibTorch side of safetensors: io/torch_tensor.hpp, io/safetensors_source.hpp,
// io/open.hpp, io/file_inventory.hpp and io/state_dict.hpp. The reference files are written at
// test time by the pinned environment's torch and the real `safetensors` package (independent of
// distorch's writer), plus one file built by hand from the specification for the layouts that
// package never writes; values are compared against float64 dumps made by Python.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/nn/module.h>

#include "distorch/io/file_inventory.hpp"
#include "distorch/io/open.hpp"
#include "distorch/io/safetensors_source.hpp"
#include "distorch/io/safetensors_writer.hpp"
#include "distorch/io/state_dict.hpp"
#include "distorch/io/torch_tensor.hpp"

#include <doctest/doctest.h>

#include "support/test_files.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

namespace {

using distorch_test::temp_dir;
using distorch_test::python;
using distorch_test::read_file;

namespace fs = std::filesystem;

void write_all(const std::string& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// The reference writer and checker. `write DIR`: writes DIR/ref.safetensors with
// safetensors.torch.save_file (metadata format=pt, writer=python), DIR/ref.order listing its tensors
// in file order as the safetensors package reports it (offset_keys), DIR/<name>.f64 holding each
// tensor's values as float64, and DIR/handmade.safetensors. The hand-made file is kept on purpose:
// the safetensors package always sorts tensors by dtype, aligns every one and writes its header in
// file order, so only a hand writer gives a header in reverse offset order and tensors laid out
// (in list order) so that some are misaligned. `check FILE`: verifies a file written by distorch
// against the same tensors: its layout rules from the raw header (sorting, alignment, padding,
// contiguity: properties the safetensors package does not check), and its metadata, dtypes, shapes
// and bytes as read back by safetensors.safe_open and safetensors.torch.load_file, bit for bit.
constexpr const char* reference_script = R"PY(
import json, struct, sys, torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

def tensors():
    g = torch.Generator().manual_seed(1234)
    return [
        ("layers.0.weight", torch.randn(3, 5, generator=g, dtype=torch.float32), "F32"),
        ("layers.0.bias", torch.randn(5, generator=g, dtype=torch.float64), "F64"),
        ("layers.1.half", torch.randn(4, 2, generator=g).half(), "F16"),
        ("layers.1.bf", torch.randn(7, generator=g).bfloat16(), "BF16"),
        ("ints.i64", torch.randint(-2**40, 2**40, (3,), generator=g, dtype=torch.int64), "I64"),
        ("ints.i32", torch.randint(-2**31, 2**31 - 1, (2, 2), generator=g, dtype=torch.int32), "I32"),
        ("ints.i16", torch.randint(-2**15, 2**15 - 1, (3,), generator=g, dtype=torch.int16), "I16"),
        ("ints.i8", torch.randint(-128, 127, (5,), generator=g, dtype=torch.int8), "I8"),
        ("ints.u8", torch.randint(0, 255, (6,), generator=g, dtype=torch.uint8), "U8"),
        ("mask", torch.randint(0, 2, (3,), generator=g).bool(), "BOOL"),
        ("scalar", torch.tensor(2.5, dtype=torch.float32), "F32"),
        ("empty", torch.zeros(0, 4), "F32"),
    ]

def raw(t):
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()

mode, target = sys.argv[1], sys.argv[2]
if mode == "write":
    for name, t, st in tensors():
        open(target + "/" + name + ".f64", "wb").write(t.double().numpy().tobytes())
    save_file({name: t for name, t, _ in tensors()}, target + "/ref.safetensors",
              metadata={"format": "pt", "writer": "python"})
    with safe_open(target + "/ref.safetensors", framework="pt") as f:
        open(target + "/ref.order", "w").write("\n".join(f.offset_keys()) + "\n")
    # The hand-made file (see above): list order in the data, header in reverse, padded to 8.
    header, data = {}, b""
    for name, t, st in tensors():
        b = raw(t)
        header[name] = {"dtype": st, "shape": list(t.shape), "data_offsets": [len(data), len(data) + len(b)]}
        data += b
    ordered = {"__metadata__": {"format": "pt", "writer": "hand"}}
    for k in reversed(list(header)):
        ordered[k] = header[k]
    js = json.dumps(ordered).encode()
    js += b" " * ((8 - len(js) % 8) % 8)
    open(target + "/handmade.safetensors", "wb").write(struct.pack("<Q", len(js)) + js + data)
else:
    # Layout rules of distorch's writer, from the raw header.
    blob = open(target, "rb").read()
    (n,) = struct.unpack("<Q", blob[:8])
    assert (8 + n) % 8 == 0, "header not padded to 8"
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__")
    assert meta == {"format": "pt", "writer": "distorch"}, meta
    size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    layout = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    assert [k for k, _ in layout] == sorted(header, key=lambda k: (-size[header[k]["dtype"]], k)), "layout not sorted"
    end = 0
    for name, e in layout:
        b, e_ = e["data_offsets"]
        assert b == end, "not contiguous at " + name
        assert (8 + n + b) % size[e["dtype"]] == 0, "misaligned " + name
        end = e_
    assert 8 + n + end == len(blob), "trailing bytes"
    expected = {name: (t, st) for name, t, st in tensors()}
    assert set(expected) == set(header), "names differ"
    for name, e in header.items():
        t, st = expected[name]
        b, e_ = e["data_offsets"]
        assert e["dtype"] == st and e["shape"] == list(t.shape), name
        assert blob[8 + n + b:8 + n + e_] == raw(t), "bytes differ for " + name
    # The same file read back by the safetensors package itself.
    with safe_open(target, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "writer": "distorch"}, f.metadata()
        assert set(f.keys()) == set(expected), "safe_open names differ"
        for name in f.keys():
            t, _ = expected[name]
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and list(got.shape) == list(t.shape), "safe_open: " + name
            assert raw(got) == raw(t), "safe_open bytes differ for " + name
    loaded = load_file(target)
    assert set(loaded) == set(expected), "load_file names differ"
    for name, got in loaded.items():
        t, _ = expected[name]
        assert got.dtype == t.dtype and got.shape == t.shape and raw(got) == raw(t), "load_file: " + name
    print("OK")
)PY";

std::string run_reference(const temp_dir& dir, const std::string& mode, const std::string& target) {
  write_all(dir / "reference.py", reference_script);
  const std::string out = dir / "python.out";
  const std::string cmd = python() + " " + (dir / "reference.py") + " " + mode + " " + target + " > " + out + " 2>&1";
  const int rc = std::system(cmd.c_str());
  const auto text = read_file(out);
  INFO(text);
  REQUIRE(rc == 0);
  return text;
}

/// The reference file's tensor names in file order, as the safetensors package reports them.
std::vector<std::string> reference_file_order(const temp_dir& dir) {
  std::vector<std::string> names;
  std::istringstream lines(read_file(dir / "ref.order"));
  for (std::string line; std::getline(lines, line);)
    if (!line.empty()) names.push_back(line);
  return names;
}

/// float64 reference values written by Python for one tensor.
std::vector<double> reference_values(const temp_dir& dir, const std::string& name) {
  const auto bytes = read_file(dir / (name + ".f64"));
  std::vector<double> v(bytes.size() / 8);
  std::memcpy(v.data(), bytes.data(), v.size() * 8);
  return v;
}

std::vector<double> values_of(const at::Tensor& t) {
  const auto d = t.to(at::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

/// A hand-built file: u64 length, JSON, data.
std::string st_file(const std::string& json, const std::string& data) {
  std::string out(8, '\0');
  std::uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out + json + data;
}

const std::vector<std::string> reference_names{"layers.0.weight", "layers.0.bias", "layers.1.half", "layers.1.bf",
                                               "ints.i64", "ints.i32", "ints.i16", "ints.i8", "ints.u8", "mask",
                                               "scalar", "empty"};

}  // namespace

TEST_CASE("a file written by the safetensors package loads with exact values, dtypes and metadata") {
  temp_dir dir{"stt"};
  run_reference(dir, "write", dir.path.string());
  distorch::safetensors_source src(dir / "ref.safetensors");
  CHECK(src.format() == "safetensors");
  CHECK(src.metadata().at("format") == "pt");
  CHECK(src.metadata().at("writer") == "python");
  REQUIRE(src.records().size() == reference_names.size());
  // Records follow file order (the package sorts by dtype, then name): neither list order nor
  // the alphabetical order of a parsed JSON object.
  const auto order = reference_file_order(dir);
  REQUIRE(order.size() == reference_names.size());
  auto alphabetical = reference_names;
  std::sort(alphabetical.begin(), alphabetical.end());
  CHECK(order != reference_names);
  CHECK(order != alphabetical);
  for (std::size_t i = 0; i < order.size(); ++i) CHECK(src.records()[i].name == order[i]);
  const std::map<std::string, at::ScalarType> dtypes{
      {"layers.0.weight", at::kFloat}, {"layers.0.bias", at::kDouble}, {"layers.1.half", at::kHalf},
      {"layers.1.bf", at::kBFloat16},  {"ints.i64", at::kLong},        {"ints.i32", at::kInt},
      {"ints.i16", at::kShort},        {"ints.i8", at::kChar},         {"ints.u8", at::kByte},
      {"mask", at::kBool},             {"scalar", at::kFloat},         {"empty", at::kFloat}};
  for (const auto& name : reference_names) {
    CAPTURE(name);
    const auto t = src.load(name);
    CHECK((t.scalar_type() == dtypes.at(name)));
    CHECK(t.sizes().vec() == src.descriptor(name).shape);
    CHECK(values_of(t) == reference_values(dir, name));
  }
  CHECK(src.load("scalar").dim() == 0);
  CHECK(src.load("empty").numel() == 0);
}

TEST_CASE("aligned tensors are zero-copy views; misaligned ones are copies with the same values") {
  temp_dir dir{"stt"};
  run_reference(dir, "write", dir.path.string());
  // The safetensors package aligns every tensor, so there even the F64 is a zero-copy view.
  {
    distorch::safetensors_source packaged(dir / "ref.safetensors");
    const auto& bias = packaged.descriptor("layers.0.bias");
    REQUIRE((packaged.header().data_offset + bias.begin) % 8 == 0);
    const auto b = packaged.load("layers.0.bias");
    CHECK(distorch::shares_mapping(b, *packaged.file()));
    CHECK(values_of(b) == reference_values(dir, "layers.0.bias"));
  }
  // Misaligned tensors only come from the hand-made file (the package never writes one). Its
  // header lists the tensors in reverse; records still follow file order, which is list order.
  distorch::safetensors_source src(dir / "handmade.safetensors");
  CHECK(src.metadata().at("writer") == "hand");
  REQUIRE(src.records().size() == reference_names.size());
  for (std::size_t i = 0; i < reference_names.size(); ++i) CHECK(src.records()[i].name == reference_names[i]);
  for (const auto& name : reference_names) {
    CAPTURE(name);
    CHECK(values_of(src.load(name)) == reference_values(dir, name));
  }
  // Python padded the header to 8, so the first tensor (F32 at buffer offset 0) is aligned and
  // the F64 after 15 floats (buffer offset 60) is not.
  const auto& first = src.descriptor("layers.0.weight");
  const auto& bias = src.descriptor("layers.0.bias");
  REQUIRE((src.header().data_offset + first.begin) % 4 == 0);
  REQUIRE((src.header().data_offset + bias.begin) % 8 != 0);
  const auto w = src.load("layers.0.weight");
  const auto b = src.load("layers.0.bias");
  CHECK(distorch::shares_mapping(w, *src.file()));
  CHECK(static_cast<const std::byte*>(w.data_ptr()) == src.file()->data() + src.header().data_offset + first.begin);
  CHECK_FALSE(distorch::shares_mapping(b, *src.file()));
  CHECK(reinterpret_cast<std::uintptr_t>(b.data_ptr()) % 8 == 0);
  CHECK(values_of(b) == reference_values(dir, "layers.0.bias"));
  const auto loc = src.locate("layers.0.bias");
  REQUIRE(loc.has_value());
  CHECK(loc->offset == src.header().data_offset + bias.begin);
  CHECK(loc->bytes == 40);
  CHECK(loc->stored_type == "F64");
  CHECK_FALSE(src.locate("nope").has_value());
}

TEST_CASE("a view keeps the mapping alive after its source is gone, and writes never reach the file") {
  temp_dir dir{"stt"};
  run_reference(dir, "write", dir.path.string());
  const auto before = read_file(dir / "ref.safetensors");
  at::Tensor w;
  {
    distorch::safetensors_source src(dir / "ref.safetensors");
    w = src.load("layers.0.weight");
  }
  CHECK(values_of(w) == reference_values(dir, "layers.0.weight"));
  w.fill_(7.0);  // copy-on-write page: private to this process
  CHECK(values_of(w) == std::vector<double>(15, 7.0));
  CHECK(read_file(dir / "ref.safetensors") == before);
  distorch::safetensors_source again(dir / "ref.safetensors");
  CHECK(values_of(again.load("layers.0.weight")) == reference_values(dir, "layers.0.weight"));
}

TEST_CASE("replacing a file with the writer leaves tensors viewing the old file intact") {
  temp_dir dir{"stt"};
  const auto path = dir / "m.safetensors";
  distorch::save_safetensors(path, {{"w", at::arange(16, at::kFloat)}});
  distorch::safetensors_source old_src(path);
  const auto old_view = old_src.load("w");
  distorch::safetensors_source not_yet_mapped(path);  // maps only at its first load, after the replacement
  REQUIRE(distorch::shares_mapping(old_view, *old_src.file()));
  distorch::save_safetensors(path, {{"w", at::ones({4}, at::kFloat)}, {"extra", at::zeros({2}, at::kLong)}});
  CHECK(values_of(old_view) == values_of(at::arange(16, at::kFloat)));
  CHECK(values_of(old_src.load("w")) == values_of(at::arange(16, at::kFloat)));
  CHECK_FALSE(not_yet_mapped.mapped());
  CHECK(values_of(not_yet_mapped.load("w")) == values_of(at::arange(16, at::kFloat)));
  distorch::safetensors_source fresh(path);
  CHECK(fresh.records().size() == 2);
  CHECK(values_of(fresh.load("w")) == std::vector<double>(4, 1.0));
}

TEST_CASE("files written by distorch pass Python's independent check of layout and bytes") {
  temp_dir dir{"stt"};
  run_reference(dir, "write", dir.path.string());
  distorch::safetensors_source src(dir / "ref.safetensors");
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& r : src.records()) tensors.emplace_back(r.name, src.load(r.name));
  // A non-contiguous view must be written in logical order.
  const auto path = dir / "ours.safetensors";
  distorch::save_safetensors(path, tensors, {{"format", "pt"}, {"writer", "distorch"}});
  CHECK(run_reference(dir, "check", path).find("OK") != std::string::npos);
}

TEST_CASE("save_safetensors writes non-contiguous tensors in logical order and rejects dtypes the format lacks") {
  temp_dir dir{"stt"};
  const auto t = at::arange(6, at::kFloat).reshape({2, 3}).t();
  distorch::save_safetensors(dir / "t.safetensors", {{"t", t}});
  distorch::safetensors_source src(dir / "t.safetensors");
  const auto back = src.load("t");
  CHECK(back.sizes().vec() == std::vector<std::int64_t>{3, 2});
  CHECK(back.equal(t));
  CHECK_THROWS_AS(distorch::save_safetensors(dir / "q.safetensors", {{"q", at::empty({2}, at::kComplexHalf)}}),
                  distorch::format_error);
  CHECK_FALSE(fs::exists(dir / "q.safetensors"));
}

TEST_CASE("float8 and sub-byte tensors parse; materializing them where LibTorch lacks the dtype is a format_error") {
  temp_dir dir{"stt"};
  const auto path = dir / "f8.safetensors";
  write_all(path, st_file(R"({"f8":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]},)"
                          R"("f4":{"dtype":"F4","shape":[4],"data_offsets":[4,6]}})",
                          "\x38\x40\x44\x48\x11\x22"));
  distorch::safetensors_source src(path);
  REQUIRE(src.records().size() == 2);
  CHECK(src.records()[0].type == distorch::dtype::f8_e4m3);
  CHECK(distorch::inventory::record_bytes(src.records()[1]) == 2);
  try {
    (void)src.load("f4");
    FAIL("a sub-byte tensor was materialized");
  } catch (const distorch::format_error& e) {
    CHECK(e.info().subject == "f4");
    CHECK(e.info().problem.find("has no dtype") != std::string::npos);
  }
#ifndef DISTORCH_TORCH_HAS_FLOAT8
  try {
    (void)src.load("f8");
    FAIL("float8 was materialized on a LibTorch without float8");
  } catch (const distorch::format_error& e) {
    CHECK(e.info().subject == "f8");
    CHECK(e.info().problem.find("has no dtype float8_e4m3fn") != std::string::npos);
  }
#else
  const auto f8 = src.load("f8");
  CHECK(values_of(f8) == std::vector<double>{1.0, 2.0, 3.0, 4.0});  // E4M3: 0x38=1, 0x40=2, 0x44=3, 0x48=4
#endif
  CHECK_THROWS_AS((void)src.load("missing"), distorch::format_error);
}

// Writes f8.safetensors with the safetensors package (every bit pattern of both float8 kinds, and
// float32 values cast by torch), plus each tensor's raw bytes (.raw) and its float32 view (.f32).
constexpr const char* float8_script = R"PY(
import sys, torch
from safetensors.torch import save_file
out = sys.argv[1]
g = torch.Generator().manual_seed(7)
every = torch.arange(256, dtype=torch.uint8)
tensors = {
    "e4m3.every": every.clone().view(torch.float8_e4m3fn).reshape(16, 16),
    "e5m2.every": every.clone().view(torch.float8_e5m2),
    "e4m3.cast": (torch.randn(3, 5, generator=g) * 40).to(torch.float8_e4m3fn),
    "e5m2.cast": (torch.randn(2, 3, 4, generator=g) * 1000).to(torch.float8_e5m2),
}
save_file(tensors, out + "/f8.safetensors", metadata={"format": "pt"})
for name, t in tensors.items():
    open(out + "/" + name + ".raw", "wb").write(t.contiguous().view(torch.uint8).numpy().tobytes())
    open(out + "/" + name + ".f32", "wb").write(t.float().numpy().tobytes())
)PY";

TEST_CASE("float8 written by the safetensors package loads bit for bit from LibTorch 2.1; older LibTorch names the version needed") {
  temp_dir dir{"stt-f8"};
  REQUIRE_MESSAGE(distorch_test::run_python(dir, "write_f8.py", float8_script, dir.path.string()) == 0,
                  read_file(dir / "write_f8.py.log"));
  distorch::safetensors_source src(dir / "f8.safetensors");
  struct expected_tensor {
    const char* name;
    distorch::dtype type;
    std::vector<std::int64_t> shape;
  };
  const expected_tensor expected[] = {{"e4m3.every", distorch::dtype::f8_e4m3, {16, 16}},
                                      {"e5m2.every", distorch::dtype::f8_e5m2, {256}},
                                      {"e4m3.cast", distorch::dtype::f8_e4m3, {3, 5}},
                                      {"e5m2.cast", distorch::dtype::f8_e5m2, {2, 3, 4}}};
  REQUIRE(src.records().size() == 4);
  for (const auto& e : expected) {
    const std::string name = e.name;
    CAPTURE(name);
    const auto it = std::find_if(src.records().begin(), src.records().end(), [&](const auto& r) { return r.name == name; });
    REQUIRE(it != src.records().end());
    CHECK(it->type == e.type);  // the header parses on every LibTorch
    CHECK(it->shape == e.shape);
    const std::string raw = read_file(dir / (name + ".raw"));
    const std::string f32 = read_file(dir / (name + ".f32"));
#if defined(DISTORCH_TORCH_HAS_FLOAT8)
    const at::Tensor t = src.load(name).contiguous();
    CHECK((t.scalar_type() == (e.type == distorch::dtype::f8_e4m3 ? at::kFloat8_e4m3fn : at::kFloat8_e5m2)));
    CHECK(t.sizes().vec() == e.shape);
    REQUIRE(raw.size() == static_cast<std::size_t>(t.numel()));
    CHECK(std::memcmp(t.data_ptr(), raw.data(), raw.size()) == 0);  // the bytes Python wrote
    // LibTorch's float32 view of them is Python's, bit for bit (NaN for NaN).
    const at::Tensor widened = t.to(at::kFloat).contiguous();
    REQUIRE(f32.size() == static_cast<std::size_t>(widened.numel()) * 4);
    std::size_t mismatches = 0;
    for (std::int64_t k = 0; k < widened.numel(); ++k) {
      float want = 0;
      std::memcpy(&want, f32.data() + 4 * k, 4);
      const float got = widened.data_ptr<float>()[k];
      if (std::isnan(want) ? !std::isnan(got) : std::memcmp(&want, &got, 4) != 0) ++mismatches;
    }
    CHECK(mismatches == 0);
#else
    try {
      (void)src.load(name);
      FAIL("float8 was materialized on a LibTorch without float8");
    } catch (const distorch::format_error& e) {
      CHECK(e.info().subject == name);
      CHECK(e.info().problem.find("float8 dtypes only from 2.1") != std::string::npos);
      CHECK(e.info().problem.find(TORCH_VERSION) != std::string::npos);
      CHECK(e.info().fix.find("LibTorch 2.1 or newer") != std::string::npos);
    }
#endif
  }
}

TEST_CASE("open_weights picks the reader from the content and says clearly what it cannot read") {
  temp_dir dir{"stt"};
  distorch::save_safetensors(dir / "a.weights", {{"w", at::ones({2})}});  // no telling extension
  auto src = distorch::open_weights(dir / "a.weights");
  CHECK(src->format() == "safetensors");
  CHECK(src->contains("w"));
  auto problem = [&](const std::string& name, std::string_view bytes) {
    write_all(dir / name, bytes);
    try {
      (void)distorch::open_weights(dir / name);
    } catch (const distorch::format_error& e) {
      CHECK(std::string(e.what()).find(dir / name) != std::string::npos);
      return e.info().problem;
    }
    return std::string("<opened>");
  };
  // A GGUF or zip magic with nothing behind it reaches the GGUF / zip reader, which says what is wrong.
  CHECK(problem("m.gguf", std::string("GGUF\x03\0\0\0", 8)) != "<opened>");
  CHECK(problem("m.bin", std::string("PK\x03\x04rest", 8)) != "<opened>");
  CHECK(problem("old.pt", std::string("\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19\x2e", 15)).find("legacy") !=
        std::string::npos);
  CHECK(problem("x.txt", "hello world").find("not a safetensors") != std::string::npos);
  CHECK(problem("t.safetensors", "tiny").find("shorter than") != std::string::npos);
  CHECK(problem("i.json", "{\"weight_map\": 3}").find("weight_map") != std::string::npos);
  CHECK_THROWS_AS((void)distorch::open_weights(dir / "does-not-exist"), distorch::format_error);
}

TEST_CASE("a sharded checkpoint opens as one source through its index") {
  temp_dir dir{"stt"};
  fs::create_directory(dir.path / "sub");
  distorch::save_safetensors(dir / "model-00001-of-00002.safetensors",
                             {{"blocks.0.w", at::arange(4, at::kFloat)}, {"embed.w", at::ones({3})}}, {{"format", "pt"}});
  distorch::save_safetensors(dir / "sub/model-00002-of-00002.safetensors", {{"blocks.1.w", at::full_like(at::ones({2}), 5.0)}});
  write_all(dir / "model.safetensors.index.json",
            R"({"metadata": {"total_size": 28}, "weight_map": {"blocks.0.w": "model-00001-of-00002.safetensors", )"
            R"("blocks.1.w": "sub/model-00002-of-00002.safetensors", "embed.w": "model-00001-of-00002.safetensors"}})");
  auto src = distorch::open_weights(dir / "model.safetensors.index.json");
  CHECK(src->format() == "safetensors-index");
  REQUIRE(src->records().size() == 3);
  CHECK(src->metadata().at("total_size") == "28");
  CHECK(src->metadata().at("format") == "pt");
  CHECK(values_of(src->load("blocks.1.w")) == std::vector<double>{5.0, 5.0});
  CHECK(values_of(src->load("blocks.0.w")) == std::vector<double>{0, 1, 2, 3});
  CHECK(src->locate("blocks.1.w")->file == dir / "sub/model-00002-of-00002.safetensors");
  CHECK_THROWS_AS((void)src->load("nope"), distorch::format_error);
  const auto inv = distorch::inventory_of_file(dir / "model.safetensors.index.json", std::vector<distorch::grouping_rule>{{R"(blocks\.\d+)"}});
  CHECK(inv.total_bytes() == (4 + 3 + 2) * 4);

  auto rejected = [&](const std::string& index_text) {
    write_all(dir / "bad.index.json", index_text);
    try {
      (void)distorch::open_weights(dir / "bad.index.json");
    } catch (const distorch::format_error& e) {
      return e.info().subject + ": " + e.info().problem;
    }
    return std::string("<opened>");
  };
  // The index places a tensor in a shard that lacks it.
  CHECK(rejected(R"({"weight_map": {"blocks.0.w": "model-00001-of-00002.safetensors", "embed.w": "model-00001-of-00002.safetensors", )"
                 R"("blocks.1.w": "model-00001-of-00002.safetensors"}})")
            .find("blocks.1.w: the index places") == 0);
  // A shard holds a tensor the index does not list.
  CHECK(rejected(R"({"weight_map": {"blocks.0.w": "model-00001-of-00002.safetensors"}})").find("embed.w:") == 0);
  // A shard that does not exist.
  CHECK(rejected(R"({"weight_map": {"x": "missing.safetensors"}})").find("No such file") != std::string::npos);
}

TEST_CASE("inventory_of_file reads headers only and groups like a module inventory") {
  temp_dir dir{"stt"};
  distorch::save_safetensors(dir / "m.safetensors", {{"blocks.0.attn.w", at::ones({4, 4})},
                                                     {"blocks.0.mlp.w", at::ones({8, 4})},
                                                     {"blocks.1.attn.w", at::ones({4, 4})},
                                                     {"head.w", at::ones({2, 4}, at::kHalf)}});
  {
    distorch::safetensors_source src(dir / "m.safetensors");
    CHECK(src.records().size() == 4);
    CHECK_FALSE(src.mapped());
    (void)src.load("head.w");
    CHECK(src.mapped());
  }
  const auto loads_before = distorch::detail::safetensors_loads.load();
  const std::vector<distorch::grouping_rule> rules{{R"(blocks\.\d+)"}};
  const auto inv = distorch::inventory_of_file(dir / "m.safetensors", rules);
  CHECK(distorch::detail::safetensors_loads.load() == loads_before);
  const auto expected = distorch::inventory::from_records(distorch::safetensors_source(dir / "m.safetensors").records(), rules);
  CHECK(inv == expected);
  REQUIRE(inv.index_of("blocks.0") >= 0);
  CHECK(inv[static_cast<std::size_t>(inv.index_of("blocks.0"))].bytes == (16 + 32) * 4);
  CHECK(inv[static_cast<std::size_t>(inv.index_of("head"))].bytes == 16);
  // The counter does move when tensors are loaded, so it can catch a header-only path that reads.
  (void)distorch::open_weights(dir / "m.safetensors")->load("head.w");
  CHECK(distorch::detail::safetensors_loads.load() == loads_before + 1);

  // A 64 GiB checkpoint whose data is a hole: planning from it reads nothing and takes no memory.
  const std::uint64_t huge = 64ull << 30;
  const std::string json = R"({"blocks.0.w":{"dtype":"BF16","shape":[16384,1048576],"data_offsets":[0,)" + std::to_string(huge / 2) +
                           R"(]},"blocks.1.w":{"dtype":"BF16","shape":[16384,1048576],"data_offsets":[)" + std::to_string(huge / 2) +
                           "," + std::to_string(huge) + "]}}";
  const auto header = st_file(json, "");
  write_all(dir / "huge.safetensors", header);
  fs::resize_file(dir / "huge.safetensors", header.size() + huge);
  const auto big = distorch::inventory_of_file(dir / "huge.safetensors", rules);
  CHECK(big.size() == 2);
  CHECK(big.total_bytes() == huge);
}

namespace {

struct Block : torch::nn::Module {
  at::Tensor weight, bias, steps;
  Block() {
    weight = register_parameter("weight", at::zeros({3, 2}));
    bias = register_parameter("bias", at::zeros({3}));
    steps = register_buffer("steps", at::zeros({}, at::kLong));
  }
};

struct Net : torch::nn::Module {
  std::shared_ptr<Block> first, second;
  at::Tensor scale;
  Net() {
    first = register_module("first", std::make_shared<Block>());
    second = register_module("second", std::make_shared<Block>());
    scale = register_buffer("scale", at::zeros({2}));
  }
};

/// A checkpoint for Net under a prefix, with distinct values per tensor.
std::vector<std::pair<std::string, at::Tensor>> net_checkpoint(const std::string& prefix) {
  return {{prefix + "first.weight", at::arange(6, at::kFloat).reshape({3, 2})},
          {prefix + "first.bias", at::arange(3, at::kFloat).add(10)},
          {prefix + "first.steps", at::full_like(at::zeros({}, at::kLong), 7)},
          {prefix + "second.weight", at::arange(6, at::kDouble).reshape({3, 2}).mul(2)},  // cast on load
          {prefix + "second.bias", at::arange(3, at::kFloat).sub(5)},
          {prefix + "second.steps", at::full_like(at::zeros({}, at::kLong), 9)},
          {prefix + "scale", at::arange(2, at::kFloat).add(0.5)}};
}

bool all_zero(Net& net) {
  for (const auto& p : net.named_parameters()) if (p.value().abs().sum().item<double>() != 0) return false;
  for (const auto& b : net.named_buffers()) if (b.value().abs().sum().item<double>() != 0) return false;
  return true;
}

}  // namespace

TEST_CASE("load_state_dict strips a prefix and fills parameters and buffers in place") {
  temp_dir dir{"stt"};
  const auto ckpt = net_checkpoint("model.diffusion_model.");
  distorch::save_safetensors(dir / "n.safetensors", ckpt);
  Net net;
  auto* weight_impl = net.first->weight.unsafeGetTensorImpl();
  const auto* weight_data = net.first->weight.data_ptr();
  const auto src = distorch::open_weights(dir / "n.safetensors");
  distorch::load_options opt;
  opt.strip_prefixes = {"model.diffusion_model."};
  const auto report = distorch::load_state_dict(net, *src, opt);
  CHECK(report.complete());
  CHECK(report.loaded.size() == 7);
  // Same tensor object and storage, new values, still a parameter that requires grad.
  CHECK(net.first->weight.unsafeGetTensorImpl() == weight_impl);
  CHECK(net.first->weight.data_ptr() == weight_data);
  CHECK(net.first->weight.requires_grad());
  for (const auto& [name, value] : ckpt) {
    const auto module_name = name.substr(std::string("model.diffusion_model.").size());
    const at::Tensor* target = net.named_parameters().find(module_name);
    if (target == nullptr) target = net.named_buffers().find(module_name);
    REQUIRE(target != nullptr);
    CAPTURE(module_name);
    CHECK(values_of(*target) == values_of(value));
  }
  CHECK((net.second->weight.scalar_type() == at::kFloat));  // converted to the parameter's dtype
}

TEST_CASE("load_state_dict adds prefixes and skips unprefixed tensors when asked") {
  temp_dir dir{"stt"};
  auto ckpt = net_checkpoint("");
  std::vector<std::pair<std::string, at::Tensor>> file;
  for (auto& [name, t] : ckpt)
    if (name.rfind("first.", 0) == 0) file.emplace_back("unet." + name.substr(6), t);
  file.emplace_back("vae.decoder.w", at::ones({5}));
  distorch::save_safetensors(dir / "p.safetensors", file);
  Net net;
  distorch::load_options opt;
  opt.strict = false;
  opt.strip_prefixes = {"unet."};
  opt.only_prefixed = true;
  opt.add_prefix = "first.";
  const auto report = distorch::load_state_dict(net, *distorch::open_weights(dir / "p.safetensors"), opt);
  CHECK(report.loaded.size() == 3);
  CHECK(report.skipped == std::vector<std::string>{"vae.decoder.w"});
  CHECK(report.unexpected.empty());
  CHECK(report.missing.size() == 4);  // second.* and scale
  CHECK(values_of(net.first->bias) == std::vector<double>{10, 11, 12});
}

TEST_CASE("strict load_state_dict names every missing, unexpected and mis-shaped tensor and writes nothing") {
  temp_dir dir{"stt"};
  auto ckpt = net_checkpoint("");
  ckpt.erase(ckpt.begin() + 4);                         // second.bias missing
  ckpt.emplace_back("third.weight", at::ones({1}));     // unexpected
  ckpt[0].second = at::ones({2, 3});                     // first.weight mis-shaped
  distorch::save_safetensors(dir / "s.safetensors", ckpt);
  const auto src = distorch::open_weights(dir / "s.safetensors");
  Net net;
  try {
    (void)distorch::load_state_dict(net, *src);
    FAIL("a mismatched checkpoint loaded in strict mode");
  } catch (const distorch::format_error& e) {
    const auto& p = e.info().problem;
    CHECK(p.find("missing from the file: second.bias") != std::string::npos);
    CHECK(p.find("not in the module: third.weight") != std::string::npos);
    CHECK(p.find("first.weight (file [2, 3], module [3, 2])") != std::string::npos);
  }
  CHECK(all_zero(net));

  distorch::load_options lenient;
  lenient.strict = false;
  const auto report = distorch::load_state_dict(net, *src, lenient);
  CHECK(report.missing == std::vector<std::string>{"second.bias"});
  CHECK(report.unexpected == std::vector<std::string>{"third.weight"});
  REQUIRE(report.mismatched.size() == 1);
  CHECK(report.mismatched[0].name == "first.weight");
  CHECK(report.loaded.size() == 5);
  CHECK(values_of(net.first->weight) == std::vector<double>(6, 0.0));  // the mismatch was left alone
  CHECK(values_of(net.scale) == std::vector<double>{0.5, 1.5});
}

TEST_CASE("load_state_dict rejects two file tensors landing on one module tensor") {
  temp_dir dir{"stt"};
  auto ckpt = net_checkpoint("");
  ckpt.emplace_back("m.scale", at::ones({2}));
  distorch::save_safetensors(dir / "d.safetensors", ckpt);
  Net net;
  distorch::load_options opt;
  opt.strip_prefixes = {"m."};
  opt.strict = false;
  CHECK_THROWS_AS((void)distorch::load_state_dict(net, *distorch::open_weights(dir / "d.safetensors"), opt),
                  distorch::format_error);
  CHECK(all_zero(net));
}

TEST_CASE("load_state_dict casts floating tensors to a requested dtype, keeping identity") {
  temp_dir dir{"stt"};
  distorch::save_safetensors(dir / "c.safetensors", net_checkpoint(""));
  Net net;
  auto* impl = net.second->weight.unsafeGetTensorImpl();
  distorch::load_options opt;
  opt.dtype = at::kHalf;
  (void)distorch::load_state_dict(net, *distorch::open_weights(dir / "c.safetensors"), opt);
  CHECK((net.second->weight.scalar_type() == at::kHalf));
  CHECK(net.second->weight.unsafeGetTensorImpl() == impl);
  CHECK((net.named_parameters()["second.weight"].scalar_type() == at::kHalf));
  CHECK(values_of(net.second->weight) == std::vector<double>{0, 2, 4, 6, 8, 10});
  CHECK((net.first->steps.scalar_type() == at::kLong));  // integer buffers keep their dtype
  CHECK(net.first->steps.item<std::int64_t>() == 7);
}

TEST_CASE("a tensor that cannot be materialized fails the load before anything is written") {
  temp_dir dir{"stt"};
  // Every Net tensor present as F32, plus "scale" stored as a sub-byte kind LibTorch cannot hold.
  auto ckpt = net_checkpoint("");
  ckpt.pop_back();
  distorch::save_safetensors(dir / "base.safetensors", ckpt);
  distorch::safetensors_source base(dir / "base.safetensors");
  std::string json = "{";
  std::string data;
  for (const auto& t : base.header().tensors) {
    json += "\"" + t.name + "\":{\"dtype\":\"" + t.dtype_name + "\",\"shape\":" + nlohmann::json(t.shape).dump() +
            ",\"data_offsets\":[" + std::to_string(t.begin) + "," + std::to_string(t.end) + "]},";
  }
  const auto end = base.header().data_bytes;
  data.assign(reinterpret_cast<const char*>(base.file()->data() + base.header().data_offset), end);
  json += "\"scale\":{\"dtype\":\"F4\",\"shape\":[2],\"data_offsets\":[" + std::to_string(end) + "," + std::to_string(end + 1) + "]}}";
  write_all(dir / "bad.safetensors", st_file(json, data + "\x11"));
  Net net;
  CHECK_THROWS_AS((void)distorch::load_state_dict(net, *distorch::open_weights(dir / "bad.safetensors")), distorch::format_error);
  CHECK(all_zero(net));
}
