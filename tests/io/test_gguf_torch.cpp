// Tests for io/gguf_source.hpp, the LibTorch side of GGUF. The GGUF files are written at test time
// by a Python script (struct + numpy + torch of Debian's python3-torch), byte by byte from the
// specification and independent of distorch; it also dumps every tensor's expected values as
// float64, computed with numpy's own float16 and float32 arithmetic.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/zeros.h>

#include "distorch/io/gguf_source.hpp"

#include <doctest/doctest.h>

#include "support/test_files.hpp"

#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

namespace {

using distorch_test::temp_dir;

namespace fs = std::filesystem;

// `write DIR`: DIR/model.gguf (GGUF v3, alignment 32) and DIR/misaligned.gguf (alignment 1, an F32
// tensor at an offset that is not a multiple of 4), plus DIR/<tensor>.f64 with expected values.
constexpr const char* writer_script = R"PY(
import struct, sys
import numpy as np
import torch

out = sys.argv[1]
rng = np.random.default_rng(20240601)

def gstr(s):
    b = s.encode()
    return struct.pack('<Q', len(b)) + b

def write_gguf(path, kvs, tensors, alignment):
    head = b'GGUF' + struct.pack('<IQQ', 3, len(tensors), len(kvs)) + b''.join(kvs)
    offset = 0
    infos = b''
    for name, dims, type_id, data in tensors:
        infos += gstr(name) + struct.pack('<I', len(dims)) + b''.join(struct.pack('<q', d) for d in dims)
        infos += struct.pack('<IQ', type_id, offset)
        offset += (len(data) + alignment - 1) // alignment * alignment
    blob = head + infos
    blob += b'\0' * ((-len(blob)) % alignment)
    data_start = len(blob)
    for _, _, _, data in tensors:
        blob += data + b'\0' * ((-len(data)) % alignment)
    with open(path, 'wb') as f:
        f.write(blob)
    return data_start

def ref(name, values):
    np.asarray(values, dtype=np.float64).tofile(f'{out}/{name}.f64')

tensors = []
def add(name, shape, type_id, data, values=None, dims=None):
    tensors.append((name, list(reversed(shape)) if dims is None else dims, type_id, data))
    if values is not None:
        ref(name, values)

a = rng.standard_normal((3, 5)).astype(np.float32)
add('plain.f32', (3, 5), 0, a.tobytes(), a)
h = rng.standard_normal((4, 8)).astype(np.float16)
add('plain.f16', (4, 8), 1, h.tobytes(), h.astype(np.float64))
bf = torch.randn(6, generator=torch.Generator().manual_seed(3)).bfloat16()
add('plain.bf16', (6,), 30, bf.view(torch.int16).numpy().tobytes(), bf.double().numpy())
i32 = rng.integers(-2**31, 2**31 - 1, (2, 3), dtype=np.int32)
add('plain.i32', (2, 3), 26, i32.tobytes(), i32)
f64 = rng.standard_normal(3)
add('plain.f64', (3,), 28, f64.tobytes(), f64)
i8 = rng.integers(-128, 128, 5, dtype=np.int8)
add('plain.i8', (5,), 24, i8.tobytes(), i8)

# Q8_0: per block an fp16 scale d and 32 int8 quants; value = q * d in float32.
d = rng.uniform(-2, 2, 4).astype(np.float16)
qs = rng.integers(-128, 128, (4, 32), dtype=np.int8)
data = b''.join(d[b:b+1].tobytes() + qs[b].tobytes() for b in range(4))
add('q.q8_0', (2, 64), 8, data, (qs.astype(np.float32) * d.astype(np.float32)[:, None]).reshape(2, 64))

# Q4_0: per block d and 16 bytes; element j < 16 is the low nibble of byte j, element j + 16 its
# high nibble; value = (nibble - 8) * d.
d = rng.uniform(-2, 2, 2).astype(np.float16)
nib = rng.integers(0, 16, (2, 32))
packed = (nib[:, :16] | (nib[:, 16:] << 4)).astype(np.uint8)
data = b''.join(d[b:b+1].tobytes() + packed[b].tobytes() for b in range(2))
add('q.q4_0', (2, 32), 2, data, ((nib - 8).astype(np.float32) * d.astype(np.float32)[:, None]).reshape(2, 32))

# A ComfyUI-style tensor stored flat, with its original 4-d shape in the metadata.
conv = rng.standard_normal(96).astype(np.float16)
add('conv.w', (3, 32), 1, conv.tobytes(), conv.astype(np.float64).reshape(2, 3, 4, 4))

# A type distorch reads but cannot dequantize, a larger Q4_K, and an empty tensor.
add('q.iq2_xxs', (256,), 16, rng.integers(0, 256, 66, dtype=np.uint8).tobytes())
big = rng.integers(0, 256, (32, 144), dtype=np.uint8)
big[:, 0:4] = np.frombuffer(rng.uniform(0, 1, 64).astype(np.float16).tobytes(), dtype=np.uint8).reshape(32, 4)
add('q.q4_k_big', (16, 512), 12, big.tobytes())
add('q.empty', (0, 64), 8, b'')

kvs = [
    gstr('general.architecture') + struct.pack('<I', 8) + gstr('distorch-test'),
    gstr('general.alignment') + struct.pack('<II', 4, 32),
    gstr('test.answer') + struct.pack('<Ii', 5, 42),
    gstr('test.list') + struct.pack('<IIQff', 9, 6, 2, 0.5, 1.5),
    gstr('comfy.gguf.orig_shape.conv.w') + struct.pack('<IIQiiii', 9, 5, 4, 2, 3, 4, 4),
]
write_gguf(f'{out}/model.gguf', kvs, tensors, 32)

# Alignment 1: tensor 'b' (F32) starts right after the few bytes of 'a', off a multiple of 4.
kvs = [gstr('general.alignment') + struct.pack('<II', 4, 1)]
for n in (1, 2, 3, 5, 6, 7):
    probe = [('a', [n], 24, bytes(range(1, n + 1))), ('b', [4], 0, b'')]
    header = len(b'GGUF') + 20 + len(kvs[0]) + sum(8 + len(t[0]) + 4 + 8 * len(t[1]) + 12 for t in probe)
    if (header + n) % 4 != 0:
        break
bvals = np.array([1.5, -2.25, 3.0, 1e-3], dtype=np.float32)
write_gguf(f'{out}/misaligned.gguf', kvs, [('a', [n], 24, bytes(range(1, n + 1))), ('b', [4], 0, bvals.tobytes())], 1)
ref('b', bvals)
print('OK')
)PY";

struct fixture {
  temp_dir dir{"gguf"};
  fixture() {
    if (distorch_test::run_python(dir, "write_gguf.py", writer_script, dir.path.string()) != 0)
      FAIL("the Python writer failed: " << distorch_test::read_file(dir / "write_gguf.py.log"));
  }
  std::vector<double> expected(const std::string& name) const {
    const std::string bytes = distorch_test::read_file(dir / (name + ".f64"));
    std::vector<double> values(bytes.size() / sizeof(double));
    std::memcpy(values.data(), bytes.data(), values.size() * sizeof(double));
    return values;
  }
};

// Element-wise comparison of a tensor with expected float64 values; NaN never occurs here.
int mismatches(const at::Tensor& t, const std::vector<double>& expected) {
  const at::Tensor d = t.to(at::kDouble).contiguous();
  if (static_cast<std::size_t>(d.numel()) != expected.size()) return -1;
  const double* p = d.data_ptr<double>();
  int bad = 0;
  for (std::size_t i = 0; i < expected.size(); ++i) bad += p[i] != expected[i];
  return bad;
}

bool shares(const at::Tensor& t, const distorch::mapped_file& file) {
  const auto* p = static_cast<const std::byte*>(t.data_ptr());
  return p >= file.data() && p < file.data() + file.size();
}

}  // namespace

TEST_CASE("gguf_source: an independently written file loads with the right dtypes, shapes and values") {
  fixture f;
  distorch::gguf_source src(f.dir / "model.gguf");
  struct expectation {
    const char* name;
    at::ScalarType type;
    std::vector<std::int64_t> shape;
  };
  const expectation cases[] = {
      {"plain.f32", at::kFloat, {3, 5}},  {"plain.f16", at::kHalf, {4, 8}},  {"plain.bf16", at::kBFloat16, {6}},
      {"plain.i32", at::kInt, {2, 3}},    {"plain.f64", at::kDouble, {3}},   {"plain.i8", at::kChar, {5}},
      {"q.q8_0", at::kFloat, {2, 64}},    {"q.q4_0", at::kFloat, {2, 32}},  {"conv.w", at::kHalf, {2, 3, 4, 4}},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    const at::Tensor t = src.load(c.name);
    CHECK((t.scalar_type() == c.type));
    CHECK(t.sizes().vec() == c.shape);
    CHECK(t.device().is_cpu());
    CHECK(mismatches(t, f.expected(c.name)) == 0);
  }
  const at::Tensor empty = src.load("q.empty");
  CHECK(empty.sizes().vec() == std::vector<std::int64_t>{0, 64});
  CHECK((empty.scalar_type() == at::kFloat));
}

TEST_CASE("gguf_source: unquantized tensors are zero-copy views that outlive the source") {
  fixture f;
  const auto mapping = distorch::mapped_file::open(f.dir / "model.gguf");
  at::Tensor view;
  {
    distorch::gguf_source src(mapping);
    view = src.load("plain.f32");
    CHECK(shares(view, *mapping));
    CHECK(src.load("plain.f32").data_ptr() == view.data_ptr());
    CHECK_FALSE(shares(src.load("q.q8_0"), *mapping));  // dequantized into its own memory
  }
  CHECK(mismatches(view, f.expected("plain.f32")) == 0);  // the source is gone, the mapping is not
}

TEST_CASE("gguf_source: records, metadata and locations come from the header") {
  fixture f;
  distorch::gguf_source src(f.dir / "model.gguf");
  CHECK(src.format() == "gguf");
  CHECK(src.path() == f.dir / "model.gguf");
  const auto& records = src.records();
  REQUIRE(records.size() == 12);
  CHECK(records[0].name == "plain.f32");
  CHECK(records[0].type == distorch::dtype::f32);
  CHECK(records[2].type == distorch::dtype::bf16);
  CHECK(records[6].name == "q.q8_0");
  CHECK(records[6].type == distorch::dtype::opaque);
  CHECK(records[6].bytes == 4 * 34);
  CHECK(records[8].shape == std::vector<std::int64_t>{2, 3, 4, 4});
  CHECK(src.contains("q.q4_k_big"));
  CHECK(src.metadata().at("general.architecture") == "distorch-test");
  CHECK(src.metadata().at("test.answer") == "42");
  CHECK(src.metadata().at("test.list") == "[0.5, 1.5]");
  CHECK(src.gguf().alignment == 32);
  const auto location = src.locate("q.q8_0");
  REQUIRE(location.has_value());
  CHECK(location->stored_type == "Q8_0");
  CHECK(location->bytes == 136);
  CHECK(location->offset == src.info("q.q8_0").file_offset);
  CHECK(location->offset % 32 == 0);
  CHECK_FALSE(src.locate("missing").has_value());
}

TEST_CASE("gguf_source: a quantized load keeps the bytes; dequantizing a copy later gives load's values") {
  fixture f;
  distorch::quantized_tensor q;
  at::Tensor loaded;
  {
    distorch::gguf_source src(f.dir / "model.gguf");
    q = src.load_quantized("q.q4_k_big");
    loaded = src.load("q.q4_k_big");
    CHECK(q.type == distorch::ggml_type::q4_k);
    CHECK(q.shape == std::vector<std::int64_t>{16, 512});
    CHECK((q.data.scalar_type() == at::kByte));
    CHECK(q.data.dim() == 1);
    CHECK(q.data.numel() == 32 * 144);
  }
  // As if fetched from a donor device: new storage holding the same bytes.
  distorch::quantized_tensor moved{q.data.clone(), q.type, q.shape, q.name};
  q = {};
  const at::Tensor values = distorch::dequantize(moved);
  CHECK((values.scalar_type() == at::kFloat));
  CHECK(values.sizes().vec() == std::vector<std::int64_t>{16, 512});
  CHECK(at::equal(values, loaded));
  // And the same as one serial pass of the pure dequantizer over the bytes.
  std::vector<float> serial(16 * 512);
  distorch::ggml_dequantize(distorch::ggml_type::q4_k,
                            std::span<const std::byte>(static_cast<const std::byte*>(moved.data.data_ptr()), 32 * 144), serial);
  CHECK(std::memcmp(serial.data(), values.data_ptr<float>(), serial.size() * sizeof(float)) == 0);
}

TEST_CASE("gguf_source: a quantized load of a plain type dequantizes to float32 values") {
  fixture f;
  distorch::gguf_source src(f.dir / "model.gguf");
  const auto q = src.load_quantized("plain.f16");
  CHECK(q.data.numel() == 64);
  const at::Tensor values = distorch::dequantize(q);
  CHECK((values.scalar_type() == at::kFloat));
  CHECK(mismatches(values, f.expected("plain.f16")) == 0);
  const auto empty = src.load_quantized("q.empty");
  CHECK(empty.data.numel() == 0);
  CHECK(distorch::dequantize(empty).sizes().vec() == std::vector<std::int64_t>{0, 64});
}

TEST_CASE("gguf_source: a type without a float32 conversion loads quantized, and only quantized") {
  fixture f;
  distorch::gguf_source src(f.dir / "model.gguf");
  try {
    (void)src.load("q.iq2_xxs");
    FAIL("no error");
  } catch (const distorch::format_error& e) {
    CHECK(e.info().subject == "q.iq2_xxs");
    CHECK(e.info().problem.find("IQ2_XXS") != std::string::npos);
    CHECK(e.info().fix.find("load_quantized") != std::string::npos);
  }
  const auto q = src.load_quantized("q.iq2_xxs");
  CHECK(q.type == distorch::ggml_type::iq2_xxs);
  CHECK(q.data.numel() == 66);
  CHECK_THROWS_AS(distorch::dequantize(q), distorch::format_error);
}

TEST_CASE("gguf_source: an unknown tensor name is a format_error") {
  fixture f;
  distorch::gguf_source src(f.dir / "model.gguf");
  CHECK_THROWS_AS(src.load("nope"), distorch::format_error);
  CHECK_THROWS_AS(src.load_quantized("nope"), distorch::format_error);
  CHECK_THROWS_AS(src.info("nope"), distorch::format_error);
}

TEST_CASE("dequantize: bytes that are not uint8 are rejected") {
  distorch::quantized_tensor q{at::zeros({34}, at::kFloat), distorch::ggml_type::q8_0, {32}, "w"};
  CHECK_THROWS_AS(distorch::dequantize(q), distorch::format_error);
  q.data = at::Tensor();
  CHECK_THROWS_AS(distorch::dequantize(q), distorch::format_error);
}

TEST_CASE("dequantize: a byte count that does not match type and shape is rejected") {
  distorch::quantized_tensor q{at::zeros({34}, at::kByte), distorch::ggml_type::q8_0, {64}, "w"};
  CHECK_THROWS_AS(distorch::dequantize(q), distorch::format_error);
  q.shape = {16};  // half a block
  CHECK_THROWS_AS(distorch::dequantize(q), distorch::format_error);
  q.shape = {32};
  CHECK(distorch::dequantize(q).sizes().vec() == std::vector<std::int64_t>{32});
}

TEST_CASE("dequantize: a negative dimension is rejected") {
  distorch::quantized_tensor q{at::zeros({34}, at::kByte), distorch::ggml_type::q8_0, {-32, -1}, "w"};
  CHECK_THROWS_AS(distorch::dequantize(q), distorch::format_error);
}

TEST_CASE("gguf_source: a tensor misaligned for its dtype (general.alignment 1) is copied, with its values") {
  fixture f;
  const auto mapping = distorch::mapped_file::open(f.dir / "misaligned.gguf");
  distorch::gguf_source src(mapping);
  CHECK(src.gguf().alignment == 1);
  REQUIRE(src.info("b").file_offset % 4 != 0);
  const at::Tensor b = src.load("b");
  CHECK_FALSE(shares(b, *mapping));
  CHECK(reinterpret_cast<std::uintptr_t>(b.data_ptr()) % 4 == 0);
  CHECK(mismatches(b, f.expected("b")) == 0);
}

TEST_CASE("gguf_source: a malformed file is a format_error naming the path") {
  temp_dir dir{"gguf"};
  const std::string path = dir / "bad.gguf";
  {
    std::ofstream out(path, std::ios::binary);
    out << "GGUF" << std::string("\x01\x00\x00\x00", 4);  // version 1
  }
  try {
    distorch::gguf_source src(path);
    FAIL("no error");
  } catch (const distorch::format_error& e) {
    CHECK(e.info().subject == path);
    CHECK(e.info().problem.find("version 1") != std::string::npos);
  }
  CHECK_THROWS_AS(distorch::gguf_source(dir / "missing.gguf"), distorch::format_error);
}
