// GGUF parser, ggml type table and dequantization. Files are hand-built byte vectors (a small
// writer below, independent of the parser); every reject rule has its own case. Dequantization is
// checked bit for bit against per-element references written here from the published block
// layouts, on random blocks.
#include "distorch/io/ggml_dequant.hpp"
#include "distorch/io/ggml_types.hpp"
#include "distorch/io/gguf.hpp"

#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

using distorch::format_error;
using distorch::ggml_type;
using distorch::gguf_value_type;
using distorch::parse_gguf;

namespace {

using byte_vector = std::vector<std::byte>;

// ---- a little-endian writer and a GGUF builder -------------------------------------------------

struct writer {
  byte_vector out;
  writer& u8(std::uint8_t v) {
    out.push_back(std::byte{v});
    return *this;
  }
  writer& le(std::uint64_t v, int width) {
    for (int i = 0; i < width; ++i) u8(static_cast<std::uint8_t>((v >> (8 * i)) & 0xff));
    return *this;
  }
  writer& u16(std::uint16_t v) { return le(v, 2); }
  writer& u32(std::uint32_t v) { return le(v, 4); }
  writer& u64(std::uint64_t v) { return le(v, 8); }
  writer& i64(std::int64_t v) { return le(static_cast<std::uint64_t>(v), 8); }
  writer& f32(float v) { return u32(std::bit_cast<std::uint32_t>(v)); }
  writer& f64(double v) { return u64(std::bit_cast<std::uint64_t>(v)); }
  writer& str(std::string_view s) {
    u64(s.size());
    for (char c : s) u8(static_cast<std::uint8_t>(c));
    return *this;
  }
  writer& append(const byte_vector& b) {
    out.insert(out.end(), b.begin(), b.end());
    return *this;
  }
  writer& pad_to(std::uint64_t alignment) {
    while (out.size() % alignment != 0) u8(0);
    return *this;
  }
};

// Value type ids of the GGUF specification, written out here rather than taken from the parser.
enum : std::uint32_t { t_u8 = 0, t_i8, t_u16, t_i16, t_u32, t_i32, t_f32, t_bool, t_str, t_arr, t_u64, t_i64, t_f64 };
// ggml type ids of ggml.h.
enum : std::uint32_t { g_f32 = 0, g_f16 = 1, g_q4_0 = 2, g_q8_0 = 8, g_q4_k = 12, g_i8 = 24, g_f64 = 28, g_bf16 = 30 };

struct tensor_spec {
  std::string name;
  std::vector<std::int64_t> dims;
  std::uint32_t type = g_f32;
  byte_vector data;
  std::optional<std::uint64_t> offset;  // default: the padded end of the previous tensor
};

struct gguf_builder {
  std::uint32_t version = 3;
  std::uint64_t alignment = 32;  // the padding this builder writes (general.alignment is separate)
  writer kv;
  std::uint64_t n_kv = 0;
  std::vector<tensor_spec> tensors;
  std::optional<std::uint64_t> n_tensors_override, n_kv_override;
  bool write_data = true;

  writer& key(std::string_view k, std::uint32_t type) {
    ++n_kv;
    return kv.str(k).u32(type);
  }
  gguf_builder& add_u32(std::string_view k, std::uint32_t v) {
    key(k, t_u32).u32(v);
    return *this;
  }
  gguf_builder& add_string(std::string_view k, std::string_view v) {
    key(k, t_str).str(v);
    return *this;
  }
  gguf_builder& add_i32_array(std::string_view k, const std::vector<std::int32_t>& values) {
    auto& w = key(k, t_arr).u32(t_i32).u64(values.size());
    for (auto v : values) w.u32(static_cast<std::uint32_t>(v));
    return *this;
  }
  gguf_builder& add_tensor(std::string name, std::vector<std::int64_t> dims, std::uint32_t type, byte_vector data,
                           std::optional<std::uint64_t> offset = std::nullopt) {
    tensors.push_back({std::move(name), std::move(dims), type, std::move(data), offset});
    return *this;
  }

  std::uint64_t padded(std::uint64_t n) const { return (n + alignment - 1) / alignment * alignment; }

  byte_vector build() const {
    writer w;
    for (char c : std::string_view("GGUF")) w.u8(static_cast<std::uint8_t>(c));
    w.u32(version).u64(n_tensors_override.value_or(tensors.size())).u64(n_kv_override.value_or(n_kv)).append(kv.out);
    std::uint64_t running = 0;
    for (const auto& t : tensors) {
      w.str(t.name).u32(static_cast<std::uint32_t>(t.dims.size()));
      for (auto d : t.dims) w.i64(d);
      w.u32(t.type).u64(t.offset.value_or(running));
      running += padded(t.data.size());
    }
    if (!write_data) return w.out;
    if (!tensors.empty()) w.pad_to(alignment);
    for (const auto& t : tensors) w.append(t.data).pad_to(alignment);
    return w.out;
  }
};

byte_vector f32_data(const std::vector<float>& values) {
  writer w;
  for (float v : values) w.f32(v);
  return w.out;
}

byte_vector zeros(std::size_t n) { return byte_vector(n, std::byte{0}); }

// The problem text of the format_error that parsing `file` throws, or "" when it parses.
std::string reject_reason(const byte_vector& file, std::uint64_t* offset = nullptr) {
  try {
    (void)parse_gguf(file, "test.gguf");
  } catch (const format_error& e) {
    if (offset != nullptr && e.info().position) *offset = e.info().position->value;
    return e.info().problem + " | " + e.info().subject + " | " + e.info().fix;
  }
  return "";
}

#define CHECK_REJECTS(file, text)                        \
  do {                                                   \
    const std::string reason_ = reject_reason(file);     \
    INFO("reason: " << reason_);                         \
    CHECK(reason_.find(text) != std::string::npos);      \
  } while (0)

gguf_builder one_f32_tensor() {
  gguf_builder b;
  b.add_tensor("w", {2, 3}, g_f32, f32_data({1, 2, 3, 4, 5, 6}));
  return b;
}

}  // namespace

// ---- accepted files ----------------------------------------------------------------------------

TEST_CASE("gguf: an empty v3 file has no metadata, no tensors and its data section right after the header") {
  gguf_builder b;
  const auto file = parse_gguf(b.build());
  CHECK(file.version == 3);
  CHECK(file.metadata.empty());
  CHECK(file.tensors.empty());
  CHECK(file.alignment == 32);
  CHECK(file.data_offset == 4 + 4 + 8 + 8);  // no padding without tensors, as gguf.cpp
  CHECK(file.data_size == 0);
}

TEST_CASE("gguf: version 2 and version 3 files with the same content parse to the same values") {
  gguf_builder b = one_f32_tensor();
  b.add_string("general.architecture", "llama").add_u32("llama.block_count", 2);
  b.version = 2;
  const auto v2 = parse_gguf(b.build());
  b.version = 3;
  const auto v3 = parse_gguf(b.build());
  CHECK(v2.version == 2);
  CHECK(v3.version == 3);
  CHECK(v2.metadata == v3.metadata);
  CHECK(v2.tensors == v3.tensors);
  CHECK(*v2.find("general.architecture")->get_string() == "llama");
  CHECK(v2.find("llama.block_count")->get_int() == 2);
}

TEST_CASE("gguf: all 13 value types as scalars, and arrays of each element type") {
  gguf_builder b;
  b.key("u8", t_u8).u8(200);
  b.key("i8", t_i8).u8(0x80);
  b.key("u16", t_u16).u16(65000);
  b.key("i16", t_i16).u16(0xfffe);
  b.key("u32", t_u32).u32(4000000000u);
  b.key("i32", t_i32).u32(static_cast<std::uint32_t>(-123456));
  b.key("f32", t_f32).f32(1.5f);
  b.key("bool", t_bool).u8(1);
  b.key("str", t_str).str("héllo");
  b.key("u64", t_u64).u64(std::numeric_limits<std::uint64_t>::max());
  b.key("i64", t_i64).i64(-(std::int64_t{1} << 40));
  b.key("f64", t_f64).f64(-0.25);
  b.key("arr_u8", t_arr).u32(t_u8).u64(3).u8(1).u8(2).u8(255);
  b.key("arr_i8", t_arr).u32(t_i8).u64(2).u8(0xff).u8(7);
  b.key("arr_u16", t_arr).u32(t_u16).u64(1).u16(513);
  b.key("arr_i16", t_arr).u32(t_i16).u64(1).u16(0x8000);
  b.key("arr_u32", t_arr).u32(t_u32).u64(2).u32(1).u32(0xffffffffu);
  b.key("arr_i32", t_arr).u32(t_i32).u64(2).u32(static_cast<std::uint32_t>(-5)).u32(5);
  b.key("arr_f32", t_arr).u32(t_f32).u64(2).f32(0.5f).f32(-2.0f);
  b.key("arr_bool", t_arr).u32(t_bool).u64(3).u8(0).u8(1).u8(2);
  b.key("arr_str", t_arr).u32(t_str).u64(3).str("a").str("").str("ccc");
  b.key("arr_u64", t_arr).u32(t_u64).u64(1).u64(1ull << 63);
  b.key("arr_i64", t_arr).u32(t_i64).u64(1).i64(-1);
  b.key("arr_f64", t_arr).u32(t_f64).u64(1).f64(3.25);
  b.key("arr_empty", t_arr).u32(t_u32).u64(0);
  const auto f = parse_gguf(b.build());
  REQUIRE(f.metadata.size() == 25);
  CHECK(f.metadata[0].key == "u8");  // file order kept
  CHECK(f.find("u8")->get_int() == 200);
  CHECK(f.find("i8")->get_int() == -128);
  CHECK(f.find("u16")->get_int() == 65000);
  CHECK(f.find("i16")->get_int() == -2);
  CHECK(f.find("u32")->get_int() == 4000000000ll);
  CHECK(f.find("i32")->get_int() == -123456);
  CHECK(f.find("f32")->get_float() == 1.5);
  CHECK(f.find("f32")->type == gguf_value_type::f32);
  CHECK(f.find("bool")->get_bool() == true);
  CHECK(*f.find("str")->get_string() == "héllo");
  CHECK_FALSE(f.find("u64")->get_int().has_value());  // above INT64_MAX
  CHECK(f.find("u64")->numbers[0] == std::numeric_limits<std::uint64_t>::max());
  CHECK(f.find("i64")->get_int() == -(std::int64_t{1} << 40));
  CHECK(f.find("f64")->get_float() == -0.25);
  CHECK(f.find("arr_u8")->is_array);
  CHECK(f.find("arr_u8")->size() == 3);
  CHECK(f.find("arr_u8")->get_int(2) == 255);
  CHECK(f.find("arr_i8")->get_int(0) == -1);
  CHECK(f.find("arr_u16")->get_int(0) == 513);
  CHECK(f.find("arr_i16")->get_int(0) == -32768);
  CHECK(f.find("arr_u32")->get_int(1) == 0xffffffffll);
  CHECK(f.find("arr_i32")->get_int(0) == -5);
  CHECK(f.find("arr_f32")->get_float(1) == -2.0);
  CHECK(f.find("arr_bool")->get_bool(0) == false);
  CHECK(f.find("arr_bool")->get_bool(2) == true);  // nonzero is true, as in gguf.cpp
  CHECK(*f.find("arr_str")->get_string(2) == "ccc");
  CHECK(f.find("arr_str")->get_string(1)->empty());
  CHECK(f.find("arr_u64")->numbers[0] == 1ull << 63);
  CHECK(f.find("arr_i64")->get_int(0) == -1);
  CHECK(f.find("arr_f64")->get_float(0) == 3.25);
  CHECK(f.find("arr_empty")->size() == 0);
  CHECK(f.find("missing") == nullptr);
  // Printed forms, as weight_source::metadata() shows them.
  CHECK(f.find("i8")->to_string() == "-128");
  CHECK(f.find("f32")->to_string() == "1.5");
  CHECK(f.find("bool")->to_string() == "true");
  CHECK(f.find("u64")->to_string() == "18446744073709551615");
  CHECK(f.find("arr_str")->to_string() == "[\"a\", \"\", \"ccc\"]");
  CHECK(f.find("arr_u8")->to_string(2) == "[1, 2, ... (3 items)]");
  CHECK(f.find("arr_empty")->to_string() == "[]");
}

TEST_CASE("gguf: tensor infos give dims, reversed PyTorch shape, bytes and aligned file offsets") {
  gguf_builder b;
  b.add_string("general.name", "t");
  b.add_tensor("a.weight", {2, 3}, g_f32, f32_data({1, 2, 3, 4, 5, 6}));           // 24 bytes → padded 32
  b.add_tensor("b.weight", {64, 2}, g_q8_0, zeros(4 * 34));                        // 136 bytes
  b.add_tensor("c.scalar", {}, g_f16, zeros(2));                                   // n_dims 0: one element
  b.add_tensor("d.empty", {0, 5}, g_q4_k, {});                                     // no elements
  const auto bytes = b.build();
  const auto f = parse_gguf(bytes);
  REQUIRE(f.tensors.size() == 4);
  CHECK(f.data_offset % 32 == 0);
  const auto& a = f.tensors[0];
  CHECK(a.dims == std::vector<std::int64_t>{2, 3});
  CHECK(a.shape == std::vector<std::int64_t>{3, 2});
  CHECK(a.bytes == 24);
  CHECK(a.offset == 0);
  CHECK(a.file_offset == f.data_offset);
  const auto& q = f.tensors[1];
  CHECK(q.type == ggml_type::q8_0);
  CHECK(q.bytes == 136);
  CHECK(q.offset == 32);
  CHECK(q.numel == 128);
  CHECK(q.shape == std::vector<std::int64_t>{2, 64});
  CHECK(f.tensors[2].shape.empty());
  CHECK(f.tensors[2].numel == 1);
  CHECK(f.tensors[2].offset == 32 + 160);
  CHECK(f.tensors[3].numel == 0);
  CHECK(f.tensors[3].bytes == 0);
  CHECK(f.data_size == 32 + 160 + 32);
  CHECK(f.find_tensor("b.weight") == &f.tensors[1]);
  CHECK(f.find_tensor("nope") == nullptr);
  // The data of a tensor is where the file put it.
  const auto data = distorch::gguf_tensor_bytes(bytes, a);
  float second = 0;
  std::memcpy(&second, data.data() + 4, 4);
  CHECK(second == 2.0f);
  CHECK_THROWS_AS(distorch::gguf_tensor_bytes(std::span(bytes).first(40), a), format_error);
}

TEST_CASE("gguf: general.alignment moves the data section and every tensor to its multiple") {
  gguf_builder b;
  b.alignment = 64;
  b.add_u32("general.alignment", 64);
  b.add_tensor("x", {3}, g_f32, f32_data({1, 2, 3}));
  b.add_tensor("y", {1}, g_f32, f32_data({4}));
  const auto f = parse_gguf(b.build());
  CHECK(f.alignment == 64);
  CHECK(f.data_offset % 64 == 0);
  CHECK(f.tensors[1].offset == 64);
  CHECK(f.data_size == 128);
}

TEST_CASE("gguf: inventory records use plain dtypes for unquantized types and opaque with bytes for blocks") {
  gguf_builder b;
  b.add_tensor("blk.0.w", {32, 2}, g_q4_0, zeros(2 * 18));
  b.add_tensor("blk.0.b", {4}, g_bf16, zeros(8));
  b.add_tensor("blk.1.i", {4}, g_i8, zeros(4));
  b.add_tensor("out.w", {2}, g_f64, zeros(16));
  const auto records = distorch::gguf_records(parse_gguf(b.build()));
  REQUIRE(records.size() == 4);
  CHECK(records[0].type == distorch::dtype::opaque);
  CHECK(records[0].bytes == 36);
  CHECK(records[0].shape == std::vector<std::int64_t>{2, 32});
  CHECK(records[1].type == distorch::dtype::bf16);
  CHECK(records[1].bytes == 0);  // computed from dtype and shape
  CHECK(records[2].type == distorch::dtype::i8);
  CHECK(records[3].type == distorch::dtype::f64);
  const std::vector<distorch::grouping_rule> blocks{{R"(blk\.\d+)"}};
  const auto inv = distorch::inventory::from_records(records, blocks);
  REQUIRE(inv.size() == 3);
  CHECK(inv[0].bytes == 36 + 8);
  CHECK(inv[1].bytes == 4);
}

TEST_CASE("gguf: comfy.gguf.orig_shape.<name> replaces the reversed dims as the PyTorch shape") {
  gguf_builder b;
  b.add_tensor("conv.weight", {32, 3}, g_f16, zeros(192));
  b.add_tensor("other", {4}, g_f32, zeros(16));
  b.add_i32_array("comfy.gguf.orig_shape.conv.weight", {2, 3, 4, 4});
  b.add_i32_array("comfy.gguf.orig_shape.not_a_tensor", {7});
  const auto f = parse_gguf(b.build());
  CHECK(f.tensors[0].shape == std::vector<std::int64_t>{2, 3, 4, 4});
  CHECK(f.tensors[0].dims == std::vector<std::int64_t>{32, 3});
  CHECK(f.tensors[1].shape == std::vector<std::int64_t>{4});
  CHECK(distorch::gguf_records(f)[0].shape == std::vector<std::int64_t>{2, 3, 4, 4});
}

TEST_CASE("gguf: an orig_shape that does not hold the tensor's elements is rejected") {
  gguf_builder b;
  b.add_tensor("w", {4}, g_f32, zeros(16));
  b.add_i32_array("comfy.gguf.orig_shape.w", {3, 2});
  CHECK_REJECTS(b.build(), "does not hold the tensor's 4 elements");
}

TEST_CASE("gguf: an orig_shape that is not an integer array is rejected") {
  gguf_builder b;
  b.add_tensor("w", {4}, g_f32, zeros(16));
  b.add_string("comfy.gguf.orig_shape.w", "2,2");
  CHECK_REJECTS(b.build(), "must be an integer array");
}

TEST_CASE("gguf: an orig_shape with a negative dimension is rejected") {
  gguf_builder b;
  b.add_tensor("w", {4}, g_f32, zeros(16));
  b.add_i32_array("comfy.gguf.orig_shape.w", {-2, -2});
  CHECK_REJECTS(b.build(), "negative");
}

TEST_CASE("gguf: a 63-byte tensor name is the longest accepted") {
  gguf_builder b;
  b.add_tensor(std::string(63, 'n'), {1}, g_f32, zeros(4));
  CHECK(parse_gguf(b.build()).tensors[0].name.size() == 63);
}

// ---- one case per reject rule ------------------------------------------------------------------

TEST_CASE("gguf reject: a file shorter than the magic") {
  CHECK_REJECTS(byte_vector(3, std::byte{'G'}), "too few for the GGUF magic");
}

TEST_CASE("gguf reject: wrong magic") {
  auto file = gguf_builder{}.build();
  file[3] = std::byte{'X'};
  std::uint64_t offset = 99;
  CHECK(reject_reason(file, &offset).find("not 'GGUF'") != std::string::npos);
  CHECK(offset == 0);
}

TEST_CASE("gguf reject: a pre-GGUF ggjt file says how to convert it") {
  writer w;
  w.u32(0x67676a74).u32(3);  // 'ggjt' as the old format wrote it
  CHECK_REJECTS(w.out, "convert_llama_ggml_to_gguf");
}

TEST_CASE("gguf reject: a file that ends inside the version") {
  auto file = gguf_builder{}.build();
  file.resize(6);
  CHECK_REJECTS(file, "ends inside the version");
}

TEST_CASE("gguf reject: version 0") {
  gguf_builder b;
  b.version = 0;
  CHECK_REJECTS(b.build(), "version 0");
}

TEST_CASE("gguf reject: a big-endian (byte-swapped) version") {
  gguf_builder b;
  b.version = 0x03000000;
  CHECK_REJECTS(b.build(), "big-endian");
}

TEST_CASE("gguf reject: version 1 with a clear message") {
  gguf_builder b;
  b.version = 1;
  CHECK_REJECTS(b.build(), "GGUF version 1 is no longer supported");
}

TEST_CASE("gguf reject: a version newer than 3") {
  gguf_builder b;
  b.version = 4;
  CHECK_REJECTS(b.build(), "newer than");
}

TEST_CASE("gguf reject: a file that ends inside the counts") {
  auto file = gguf_builder{}.build();
  file.resize(20);
  CHECK_REJECTS(file, "ends inside the metadata key/value count");
}

TEST_CASE("gguf reject: a tensor count the remaining bytes cannot hold, up to UINT64_MAX") {
  gguf_builder b;
  b.n_tensors_override = 2;  // 2 infos need at least 48 bytes; the file has 8 after the count
  CHECK_REJECTS(b.build(), "tensor count 2 cannot fit");
  b.n_tensors_override = std::numeric_limits<std::uint64_t>::max();
  CHECK_REJECTS(b.build(), "tensor count 18446744073709551615 cannot fit");
}

TEST_CASE("gguf reject: a key/value count the remaining bytes cannot hold") {
  gguf_builder b;
  b.add_u32("a", 1);
  b.n_kv_override = 3;
  CHECK_REJECTS(b.build(), "metadata key/value count 3 cannot fit");
  b.n_kv_override = std::uint64_t{1} << 63;  // negative as gguf.cpp's int64
  CHECK_REJECTS(b.build(), "cannot fit");
}

TEST_CASE("gguf reject: an empty key") {
  gguf_builder b;
  b.add_u32("", 1);
  CHECK_REJECTS(b.build(), "the key is empty");
}

TEST_CASE("gguf reject: a duplicate key") {
  gguf_builder b;
  b.add_u32("general.x", 1).add_u32("general.x", 2);
  CHECK_REJECTS(b.build(), "the key appears twice | general.x");
}

TEST_CASE("gguf reject: a string longer than 1 GiB") {
  gguf_builder b;
  b.key("k", t_str).u64((std::uint64_t{1} << 30) + 1);
  b.kv.append(zeros(16));
  CHECK_REJECTS(b.build(), "more than the 1 GiB");
}

TEST_CASE("gguf reject: a string longer than the rest of the file") {
  gguf_builder b;
  b.key("k", t_str).u64(100).append(zeros(10));
  CHECK_REJECTS(b.build(), "claims 100 bytes but only 10 remain");
}

TEST_CASE("gguf reject: an unknown value type") {
  gguf_builder b;
  b.key("k", 13).u32(0);
  CHECK_REJECTS(b.build(), "value type 13 is not a GGUF value type");
}

TEST_CASE("gguf reject: an array of arrays") {
  gguf_builder b;
  b.key("k", t_arr).u32(t_arr).u64(1).u32(t_u8).u64(1).u8(0);
  CHECK_REJECTS(b.build(), "arrays of arrays");
}

TEST_CASE("gguf reject: an unknown array element type") {
  gguf_builder b;
  b.key("k", t_arr).u32(77).u64(0);
  CHECK_REJECTS(b.build(), "array element type 77");
}

TEST_CASE("gguf reject: an array longer than 2^30 elements") {
  gguf_builder b;
  b.key("k", t_arr).u32(t_u8).u64((std::uint64_t{1} << 30) + 1);
  CHECK_REJECTS(b.build(), "exceeds the 2^30 elements");
}

TEST_CASE("gguf reject: an array longer than the rest of the file") {
  gguf_builder b;
  b.key("k", t_arr).u32(t_u32).u64(5).u32(1).u32(2);  // 20 bytes claimed, 8 present
  CHECK_REJECTS(b.build(), "needs at least 20 bytes but only 8 remain");
}

TEST_CASE("gguf reject: a string array whose length prefixes alone exceed the file") {
  gguf_builder b;
  b.key("k", t_arr).u32(t_str).u64(1000).str("x");
  CHECK_REJECTS(b.build(), "array of 1000 str");
}

TEST_CASE("gguf reject: a scalar value cut off by the end of the file") {
  gguf_builder b;
  b.key("k", t_u64).u32(7);  // 4 of 8 bytes
  CHECK_REJECTS(b.build(), "ends inside the value");
}

TEST_CASE("gguf reject: general.alignment that is not a u32") {
  gguf_builder b;
  b.key("general.alignment", t_i32).u32(32);
  CHECK_REJECTS(b.build(), "must be a u32 but is a i32");
}

TEST_CASE("gguf reject: general.alignment given as an array") {
  gguf_builder b;
  b.key("general.alignment", t_arr).u32(t_u32).u64(1).u32(32);
  CHECK_REJECTS(b.build(), "must be a u32 but is an array of u32");
}

TEST_CASE("gguf reject: general.alignment zero") {
  gguf_builder b;
  b.add_u32("general.alignment", 0);
  CHECK_REJECTS(b.build(), "alignment 0 is not a nonzero power of two");
}

TEST_CASE("gguf reject: general.alignment not a power of two") {
  gguf_builder b;
  b.add_u32("general.alignment", 48);
  CHECK_REJECTS(b.build(), "alignment 48 is not a nonzero power of two");
}

TEST_CASE("gguf reject: a tensor name of 64 bytes or more") {
  gguf_builder b;
  b.add_tensor(std::string(64, 'n'), {1}, g_f32, zeros(4));
  CHECK_REJECTS(b.build(), "shorter than 64");
}

TEST_CASE("gguf reject: a duplicate tensor name") {
  gguf_builder b;
  b.add_tensor("w", {1}, g_f32, zeros(4)).add_tensor("w", {1}, g_f32, zeros(4));
  CHECK_REJECTS(b.build(), "tensor name appears twice | w");
}

TEST_CASE("gguf reject: more than 4 dimensions") {
  gguf_builder b;
  b.add_tensor("w", {1, 1, 1, 1, 1}, g_f32, zeros(4));
  CHECK_REJECTS(b.build(), "5 dimensions");
}

TEST_CASE("gguf reject: a negative dimension") {
  gguf_builder b;
  b.add_tensor("w", {4, -1}, g_f32, zeros(4));
  CHECK_REJECTS(b.build(), "dimension 1 is negative");
}

TEST_CASE("gguf reject: an element count that overflows int64") {
  gguf_builder b;
  b.add_tensor("w", {std::int64_t{1} << 32, std::int64_t{1} << 31}, g_i8, {});
  CHECK_REJECTS(b.build(), "overflows int64");
}

TEST_CASE("gguf: a zero dimension beside huge ones is an empty tensor, not an overflow") {
  gguf_builder b;
  b.add_tensor("w", {std::int64_t{1} << 62, std::int64_t{1} << 62, 0}, g_f32, {});
  const auto f = parse_gguf(b.build());
  CHECK(f.tensors[0].numel == 0);
  CHECK(f.tensors[0].bytes == 0);
}

TEST_CASE("gguf reject: an unknown ggml type id") {
  gguf_builder b;
  b.add_tensor("w", {1}, 43, zeros(4));
  CHECK_REJECTS(b.build(), "ggml type id 43 is unknown");
  gguf_builder negative;
  negative.add_tensor("w", {1}, 0xffffffffu, zeros(4));  // -1 as gguf.cpp's int32
  CHECK_REJECTS(negative.build(), "is unknown");
}

TEST_CASE("gguf reject: a type id ggml removed") {
  for (std::uint32_t id : {4u, 5u, 31u, 32u, 33u, 36u, 37u, 38u}) {
    gguf_builder b;
    b.add_tensor("w", {32}, id, zeros(18));
    INFO("id " << id);
    CHECK_REJECTS(b.build(), "was removed from GGUF files");
  }
}

TEST_CASE("gguf reject: a row length that is not a multiple of the block size") {
  gguf_builder b;
  b.add_tensor("w", {48, 2}, g_q4_0, zeros(100));
  CHECK_REJECTS(b.build(), "row length 48 is not a multiple of the Q4_0 block size 32");
}

TEST_CASE("gguf reject: a byte size that overflows 64 bits") {
  gguf_builder b;
  b.add_tensor("w", {std::int64_t{1} << 62}, g_f64, {});
  CHECK_REJECTS(b.build(), "byte size of dimensions");
}

TEST_CASE("gguf reject: a data section whose alignment padding starts past the end of the file") {
  gguf_builder b;
  b.add_tensor("w", {1}, g_f32, zeros(4));
  b.write_data = false;
  const auto file = b.build();
  REQUIRE(file.size() % 32 != 0);
  CHECK_REJECTS(file, "past the end of the");
}

TEST_CASE("gguf reject: offsets that are not each the padded end of the previous tensor") {
  gguf_builder first;
  first.add_tensor("a", {1}, g_f32, zeros(4), 32);  // the first tensor must start at 0
  CHECK_REJECTS(first.build(), "data offset 32 is not where the previous tensor's padded data ends (0)");
  gguf_builder unpadded;
  unpadded.add_tensor("a", {1}, g_f32, zeros(4)).add_tensor("b", {1}, g_f32, zeros(4), 4);
  CHECK_REJECTS(unpadded.build(), "data offset 4 is not where the previous tensor's padded data ends (32)");
  gguf_builder overlapping;
  overlapping.add_tensor("a", {16}, g_f32, zeros(64)).add_tensor("b", {1}, g_f32, zeros(4), 32);
  CHECK_REJECTS(overlapping.build(), "(64)");
}

TEST_CASE("gguf reject: a data section size that overflows when padded") {
  gguf_builder b;
  b.add_tensor("w", {(std::int64_t{1} << 61) - 1}, g_f64, {});  // 2^64 - 8 bytes, padding wraps
  CHECK_REJECTS(b.build(), "data section size overflows");
}

TEST_CASE("gguf reject: tensor data that runs past the end of the file") {
  gguf_builder b;
  b.add_tensor("a", {1}, g_f32, zeros(4)).add_tensor("b", {8}, g_f32, zeros(32));
  auto file = b.build();
  file.resize(file.size() - 8);
  CHECK_REJECTS(file, "run past the end of the");
  // The last tensor's padding may be missing: llama.cpp's loader checks the tensor's own bytes only.
  gguf_builder tight;
  tight.add_tensor("a", {1}, g_f32, f32_data({7}));
  auto tight_file = tight.build();
  tight_file.resize(tight_file.size() - 28);
  CHECK(parse_gguf(tight_file).tensors[0].bytes == 4);
}

TEST_CASE("gguf reject: a file cut off inside the tensor infos") {
  auto file = one_f32_tensor().build();
  file.resize(4 + 4 + 8 + 8 + 8 + 1 + 4 + 8);  // name and n_dims, then half the dims
  CHECK_REJECTS(file, "ends inside a dimension");
}

TEST_CASE("gguf reject: every error names the file and carries a byte offset") {
  gguf_builder b;
  b.add_u32("general.alignment", 3);
  try {
    (void)parse_gguf(b.build(), "model.gguf");
    FAIL("no error");
  } catch (const format_error& e) {
    CHECK(e.info().subject == "general.alignment");
    CHECK(e.info().doing.find("model.gguf") != std::string::npos);
    REQUIRE(e.info().position.has_value());
    CHECK(e.info().position->kind == "offset");
    CHECK_FALSE(e.info().fix.empty());
  }
}

// ---- the type table ----------------------------------------------------------------------------

TEST_CASE("ggml type table: ids, block elements and block bytes of ggml.h / gguf-py") {
  struct row {
    std::uint32_t id;
    const char* name;
    std::uint32_t elements, bytes;
  };
  // (block size, type size) as listed by gguf-py's GGML_QUANT_SIZES.
  const row expected[] = {
      {0, "F32", 1, 4},        {1, "F16", 1, 2},        {2, "Q4_0", 32, 18},     {3, "Q4_1", 32, 20},
      {6, "Q5_0", 32, 22},     {7, "Q5_1", 32, 24},     {8, "Q8_0", 32, 34},     {9, "Q8_1", 32, 40},
      {10, "Q2_K", 256, 84},   {11, "Q3_K", 256, 110},  {12, "Q4_K", 256, 144},  {13, "Q5_K", 256, 176},
      {14, "Q6_K", 256, 210},  {15, "Q8_K", 256, 292},  {16, "IQ2_XXS", 256, 66}, {17, "IQ2_XS", 256, 74},
      {18, "IQ3_XXS", 256, 98}, {19, "IQ1_S", 256, 50}, {20, "IQ4_NL", 32, 18},  {21, "IQ3_S", 256, 110},
      {22, "IQ2_S", 256, 82},  {23, "IQ4_XS", 256, 136}, {24, "I8", 1, 1},       {25, "I16", 1, 2},
      {26, "I32", 1, 4},       {27, "I64", 1, 8},       {28, "F64", 1, 8},       {29, "IQ1_M", 256, 56},
      {30, "BF16", 1, 2},      {34, "TQ1_0", 256, 54},  {35, "TQ2_0", 256, 66},  {39, "MXFP4", 32, 17},
      {40, "NVFP4", 64, 36},   {41, "Q1_0", 128, 18},   {42, "Q2_0", 64, 18},
  };
  for (const auto& r : expected) {
    const auto* t = distorch::ggml_traits(r.id);
    REQUIRE(t != nullptr);
    INFO(std::string(r.name));
    CHECK(t->name == r.name);
    CHECK(t->block_elements == r.elements);
    CHECK(t->block_bytes == r.bytes);
    CHECK_FALSE(t->removed);
  }
  for (std::uint32_t id : {4u, 5u, 31u, 32u, 33u, 36u, 37u, 38u}) CHECK(distorch::ggml_traits(id)->removed);
  CHECK(distorch::ggml_traits(43u) == nullptr);
  CHECK(distorch::ggml_traits(static_cast<ggml_type>(99)).name == "unknown");
  CHECK(distorch::ggml_row_bytes(ggml_type::q4_k, 512) == 288u);
  CHECK_FALSE(distorch::ggml_row_bytes(ggml_type::q4_k, 100).has_value());
  CHECK_FALSE(distorch::ggml_row_bytes(ggml_type::q4_2, 32).has_value());
}

// ---- dequantization ----------------------------------------------------------------------------

namespace {

// Independent references, element by element, from the published layouts.
float ref_half(std::uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 10) & 31, mantissa = h & 1023;
  double v = 0;
  if (exponent == 0) v = std::ldexp(static_cast<double>(mantissa), -24);
  else if (exponent == 31) v = mantissa != 0 ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else v = std::ldexp(static_cast<double>(1024 + mantissa), exponent - 25);
  return static_cast<float>(sign != 0 ? -v : v);
}

float ref_bf16(std::uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 7) & 255, mantissa = h & 127;
  double v = 0;
  if (exponent == 0) v = std::ldexp(static_cast<double>(mantissa), -133);
  else if (exponent == 255) v = mantissa != 0 ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else v = std::ldexp(static_cast<double>(128 + mantissa), exponent - 134);
  return static_cast<float>(sign != 0 ? -v : v);
}

std::uint16_t half_at(const std::uint8_t* p) { return static_cast<std::uint16_t>(p[0] + 256 * p[1]); }
float scale_at(const std::uint8_t* p) { return ref_half(half_at(p)); }

// The 4-bit element `i` of 32 stored as 16 bytes: the first 16 in low nibbles, the next 16 in high.
int nibble32(const std::uint8_t* qs, int i) { return i < 16 ? (qs[i] & 15) : (qs[i - 16] >> 4); }

const int iq4nl_codebook[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

float ref_q4_0(const std::uint8_t* b, int i) { return static_cast<float>(nibble32(b + 2, i) - 8) * scale_at(b); }
float ref_q4_1(const std::uint8_t* b, int i) {
  return static_cast<float>(nibble32(b + 4, i)) * scale_at(b) + scale_at(b + 2);
}
int fifth_bit(const std::uint8_t* qh, int i) { return (qh[i / 8] >> (i % 8)) & 1; }  // bit i of 32, little-endian
float ref_q5_0(const std::uint8_t* b, int i) {
  return static_cast<float>((nibble32(b + 6, i) | (fifth_bit(b + 2, i) << 4)) - 16) * scale_at(b);
}
float ref_q5_1(const std::uint8_t* b, int i) {
  return static_cast<float>(nibble32(b + 8, i) | (fifth_bit(b + 4, i) << 4)) * scale_at(b) + scale_at(b + 2);
}
float ref_q8_0(const std::uint8_t* b, int i) { return static_cast<float>(static_cast<std::int8_t>(b[2 + i])) * scale_at(b); }

// Q2_K: 256 elements in two halves of 128; in each half, 4 bit-pair planes of 32 bytes, each plane
// two groups of 16 with their own 4-bit scale (low nibble) and 4-bit min (high nibble).
float ref_q2_k(const std::uint8_t* b, int i) {
  const int half = i / 128, plane = (i % 128) / 32, lane = i % 32, group = half * 8 + plane * 2 + lane / 16;
  const int q = (b[16 + half * 32 + lane] >> (2 * plane)) & 3;
  const float d = scale_at(b + 80), dmin = scale_at(b + 82);
  const float dl = d * static_cast<float>(b[group] & 15);
  const float ml = dmin * static_cast<float>(b[group] >> 4);
  return dl * static_cast<float>(q) - ml;
}

// Q3_K: like Q2_K's planes, plus a high bit per element in hmask (bit plane = half*4 + plane),
// subtracting 4 when it is clear; 16 signed 6-bit scales (offset 32) in 12 bytes.
float ref_q3_k(const std::uint8_t* b, int i) {
  const int half = i / 128, plane = (i % 128) / 32, lane = i % 32, group = half * 8 + plane * 2 + lane / 16;
  const std::uint8_t* sc = b + 96;
  const int low4 = group < 8 ? (sc[group] & 15) : (sc[group - 8] >> 4);
  const int high2 = (sc[8 + group % 4] >> (2 * (group / 4))) & 3;
  const int scale = (low4 | (high2 << 4)) - 32;
  const int q = (b[32 + half * 32 + lane] >> (2 * plane)) & 3;
  const int high_bit = (b[lane] >> (half * 4 + plane)) & 1;
  const float dl = scale_at(b + 108) * static_cast<float>(scale);
  return dl * static_cast<float>(q - (high_bit != 0 ? 0 : 4));
}

// The 6-bit scale and min of group g (0..7) of Q4_K / Q5_K, from the 12-byte layout: bytes 0-3 hold
// scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; groups 4-7 take their low 4 bits from the
// nibbles of bytes 8-11 and their top 2 bits from the top bits of bytes 0-3 (scales) and 4-7 (mins).
void k_scale_min(const std::uint8_t* sc, int g, int& scale, int& min) {
  if (g < 4) {
    scale = sc[g] & 63;
    min = sc[4 + g] & 63;
  } else {
    scale = (sc[8 + g - 4] & 15) | ((sc[g - 4] >> 6) << 4);
    min = (sc[8 + g - 4] >> 4) | ((sc[g] >> 6) << 4);
  }
}

float ref_q4_k(const std::uint8_t* b, int i) {
  const int chunk = i / 64, high = (i % 64) / 32, lane = i % 32, group = chunk * 2 + high;
  int scale = 0, min = 0;
  k_scale_min(b + 4, group, scale, min);
  const std::uint8_t byte = b[16 + chunk * 32 + lane];
  const int q = high != 0 ? byte >> 4 : byte & 15;
  const float d1 = scale_at(b) * static_cast<float>(scale);
  const float m1 = scale_at(b + 2) * static_cast<float>(min);
  return d1 * static_cast<float>(q) - m1;
}

float ref_q5_k(const std::uint8_t* b, int i) {
  const int chunk = i / 64, high = (i % 64) / 32, lane = i % 32, group = chunk * 2 + high;
  int scale = 0, min = 0;
  k_scale_min(b + 4, group, scale, min);
  const std::uint8_t byte = b[48 + chunk * 32 + lane];
  const int q = (high != 0 ? byte >> 4 : byte & 15) + 16 * ((b[16 + lane] >> group) & 1);
  const float d1 = scale_at(b) * static_cast<float>(scale);
  const float m1 = scale_at(b + 2) * static_cast<float>(min);
  return d1 * static_cast<float>(q) - m1;
}

// Q6_K: two halves of 128; in each, four quarters of 32: quarters 0/1 take the low nibbles of
// ql[0..31] / ql[32..63], quarters 2/3 the high nibbles; 2 high bits per element from qh; signed
// 8-bit scales per 16 elements; values offset by 32.
float ref_q6_k(const std::uint8_t* b, int i) {
  const int half = i / 128, quarter = (i % 128) / 32, lane = i % 32;
  const std::uint8_t low_byte = b[half * 64 + (quarter % 2) * 32 + lane];
  const int low4 = quarter < 2 ? (low_byte & 15) : (low_byte >> 4);
  const int high2 = (b[128 + half * 32 + lane] >> (2 * quarter)) & 3;
  const int q = (low4 | (high2 << 4)) - 32;
  const int scale = static_cast<std::int8_t>(b[192 + half * 8 + quarter * 2 + lane / 16]);
  return scale_at(b + 208) * static_cast<float>(scale) * static_cast<float>(q);
}

float ref_iq4_nl(const std::uint8_t* b, int i) {
  return scale_at(b) * static_cast<float>(iq4nl_codebook[nibble32(b + 2, i)]);
}

float ref_iq4_xs(const std::uint8_t* b, int i) {
  const int sub = i / 32;
  const int low4 = (b[4 + sub / 2] >> (4 * (sub % 2))) & 15;
  const int high2 = (half_at(b + 2) >> (2 * sub)) & 3;
  const float dl = scale_at(b) * static_cast<float>((low4 | (high2 << 4)) - 32);
  return dl * static_cast<float>(iq4nl_codebook[nibble32(b + 8 + sub * 16, i % 32)]);
}

std::uint16_t random_finite_half(std::mt19937& rng) {
  const auto sign = static_cast<std::uint16_t>(rng() & 1);
  const auto exponent = static_cast<std::uint16_t>(rng() % 31);  // 0..30: zero, subnormal or normal
  const auto mantissa = static_cast<std::uint16_t>(rng() & 1023);
  return static_cast<std::uint16_t>((sign << 15) | (exponent << 10) | mantissa);
}

struct quant_case {
  ggml_type type;
  std::vector<int> half_fields;  // byte offsets of fp16 scales in a block
  float (*reference)(const std::uint8_t*, int);
};

void check_against_reference(const quant_case& c, unsigned seed) {
  const auto& traits = distorch::ggml_traits(c.type);
  const int blocks = 5;
  std::mt19937 rng(seed);
  std::vector<std::uint8_t> data(static_cast<std::size_t>(blocks) * traits.block_bytes);
  for (auto& byte : data) byte = static_cast<std::uint8_t>(rng());
  for (int blk = 0; blk < blocks; ++blk)
    for (int field : c.half_fields) {
      const auto h = random_finite_half(rng);
      data[blk * traits.block_bytes + field] = static_cast<std::uint8_t>(h & 0xff);
      data[blk * traits.block_bytes + field + 1] = static_cast<std::uint8_t>(h >> 8);
    }
  std::vector<float> got(static_cast<std::size_t>(blocks) * traits.block_elements);
  distorch::ggml_dequantize(c.type, std::as_bytes(std::span(data)), got, "t");
  int mismatches = 0, nonzero = 0;
  for (int blk = 0; blk < blocks; ++blk)
    for (std::uint32_t i = 0; i < traits.block_elements; ++i) {
      const float expected = c.reference(data.data() + blk * traits.block_bytes, static_cast<int>(i));
      const float actual = got[blk * traits.block_elements + i];
      if (std::bit_cast<std::uint32_t>(expected) != std::bit_cast<std::uint32_t>(actual)) {
        if (mismatches == 0) MESSAGE(std::string(traits.name) << " block " << blk << " element " << i << ": " << actual << " vs " << expected);
        ++mismatches;
      }
      nonzero += actual != 0.0f;
    }
  CHECK(mismatches == 0);
  CHECK(nonzero > static_cast<int>(got.size()) / 2);  // random blocks give mostly nonzero values
}

}  // namespace

TEST_CASE("dequant: fp16 to fp32 is exact for all 65536 halves, subnormals and infinities included") {
  int mismatches = 0;
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const float got = distorch::fp16_to_fp32(static_cast<std::uint16_t>(h));
    const float expected = ref_half(static_cast<std::uint16_t>(h));
    if (std::isnan(expected)) {
      const auto bits = std::bit_cast<std::uint32_t>(got);
      // NaN: sign and payload kept, quiet bit set.
      const std::uint32_t want = ((h & 0x8000u) << 16) | 0x7f800000u | ((h & 0x3ffu) << 13) | 0x00400000u;
      mismatches += bits != want;
    } else {
      mismatches += std::bit_cast<std::uint32_t>(got) != std::bit_cast<std::uint32_t>(expected);
    }
  }
  CHECK(mismatches == 0);
  CHECK(distorch::fp16_to_fp32(0x0001) == std::ldexp(1.0f, -24));
  CHECK(distorch::fp16_to_fp32(0x7bff) == 65504.0f);
  CHECK(std::isinf(distorch::fp16_to_fp32(0xfc00)));
  CHECK(std::signbit(distorch::fp16_to_fp32(0x8000)));
}

TEST_CASE("dequant: bf16 to fp32 is exact for all 65536 values") {
  int mismatches = 0;
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const float got = distorch::bf16_to_fp32(static_cast<std::uint16_t>(h));
    const float expected = ref_bf16(static_cast<std::uint16_t>(h));
    if (std::isnan(expected)) mismatches += !std::isnan(got) || (std::bit_cast<std::uint32_t>(got) >> 16) != h;
    else mismatches += std::bit_cast<std::uint32_t>(got) != std::bit_cast<std::uint32_t>(expected);
  }
  CHECK(mismatches == 0);
}

TEST_CASE("dequant: hand-worked blocks of Q8_0 and Q4_0") {
  std::vector<std::uint8_t> q8(34, 0);
  q8[0] = 0x00, q8[1] = 0x38;  // d = 0.5
  q8[2] = static_cast<std::uint8_t>(-3);
  q8[33] = 127;
  std::vector<float> out(32);
  distorch::ggml_dequantize(ggml_type::q8_0, std::as_bytes(std::span(q8)), out);
  CHECK(out[0] == -1.5f);
  CHECK(out[1] == 0.0f);
  CHECK(out[31] == 63.5f);
  std::vector<std::uint8_t> q4(18, 0x88);  // every nibble 8: zero
  q4[0] = 0x00, q4[1] = 0x40;              // d = 2
  q4[2] = 0x1f;                            // element 0: 15 - 8, element 16: 1 - 8
  distorch::ggml_dequantize(ggml_type::q4_0, std::as_bytes(std::span(q4)), out);
  CHECK(out[0] == 14.0f);
  CHECK(out[16] == -14.0f);
  CHECK(out[5] == 0.0f);
}

TEST_CASE("dequant: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 match the block formulas bit for bit") {
  const quant_case cases[] = {
      {ggml_type::q4_0, {0}, ref_q4_0},
      {ggml_type::q4_1, {0, 2}, ref_q4_1},
      {ggml_type::q5_0, {0}, ref_q5_0},
      {ggml_type::q5_1, {0, 2}, ref_q5_1},
      {ggml_type::q8_0, {0}, ref_q8_0},
  };
  for (const auto& c : cases)
    for (unsigned seed : {1u, 2u, 3u}) {
      INFO(std::string(distorch::ggml_type_name(c.type)) << " seed " << seed);
      check_against_reference(c, seed);
    }
}

TEST_CASE("dequant: Q2_K Q3_K Q4_K Q5_K Q6_K match the block formulas bit for bit") {
  const quant_case cases[] = {
      {ggml_type::q2_k, {80, 82}, ref_q2_k},
      {ggml_type::q3_k, {108}, ref_q3_k},
      {ggml_type::q4_k, {0, 2}, ref_q4_k},
      {ggml_type::q5_k, {0, 2}, ref_q5_k},
      {ggml_type::q6_k, {208}, ref_q6_k},
  };
  for (const auto& c : cases)
    for (unsigned seed : {11u, 12u, 13u}) {
      INFO(std::string(distorch::ggml_type_name(c.type)) << " seed " << seed);
      check_against_reference(c, seed);
    }
}

TEST_CASE("dequant: IQ4_NL and IQ4_XS match the block formulas bit for bit") {
  const quant_case cases[] = {
      {ggml_type::iq4_nl, {0}, ref_iq4_nl},
      {ggml_type::iq4_xs, {0}, ref_iq4_xs},
  };
  for (const auto& c : cases)
    for (unsigned seed : {21u, 22u, 23u}) {
      INFO(std::string(distorch::ggml_type_name(c.type)) << " seed " << seed);
      check_against_reference(c, seed);
    }
}

TEST_CASE("dequant: F32 F16 BF16 F64 and the integer types convert element by element") {
  std::mt19937 rng(5);
  std::vector<std::uint8_t> raw(64 * 8);
  for (auto& b : raw) b = static_cast<std::uint8_t>(rng());
  const auto bytes = std::as_bytes(std::span(raw));
  std::vector<float> out(64);
  auto element = [&](int width, int i) {
    std::uint64_t v = 0;
    for (int k = 0; k < width; ++k) v |= static_cast<std::uint64_t>(raw[i * width + k]) << (8 * k);
    return v;
  };
  auto same = [](float a, float b) { return std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b) || (std::isnan(a) && std::isnan(b)); };
  int bad = 0;
  distorch::ggml_dequantize(ggml_type::f32, bytes.first(256), out);
  for (int i = 0; i < 64; ++i) bad += !same(out[i], std::bit_cast<float>(static_cast<std::uint32_t>(element(4, i))));
  distorch::ggml_dequantize(ggml_type::f16, bytes.first(128), out);
  for (int i = 0; i < 64; ++i) bad += !same(out[i], ref_half(static_cast<std::uint16_t>(element(2, i))));
  distorch::ggml_dequantize(ggml_type::bf16, bytes.first(128), out);
  for (int i = 0; i < 64; ++i) bad += !same(out[i], ref_bf16(static_cast<std::uint16_t>(element(2, i))));
  distorch::ggml_dequantize(ggml_type::f64, bytes, out);
  for (int i = 0; i < 64; ++i) bad += !same(out[i], static_cast<float>(std::bit_cast<double>(element(8, i))));
  distorch::ggml_dequantize(ggml_type::i8, bytes.first(64), out);
  for (int i = 0; i < 64; ++i) bad += out[i] != static_cast<float>(static_cast<std::int8_t>(element(1, i)));
  distorch::ggml_dequantize(ggml_type::i16, bytes.first(128), out);
  for (int i = 0; i < 64; ++i) bad += out[i] != static_cast<float>(static_cast<std::int16_t>(element(2, i)));
  distorch::ggml_dequantize(ggml_type::i32, bytes.first(256), out);
  for (int i = 0; i < 64; ++i) bad += out[i] != static_cast<float>(static_cast<std::int32_t>(element(4, i)));
  distorch::ggml_dequantize(ggml_type::i64, bytes, out);
  for (int i = 0; i < 64; ++i) bad += out[i] != static_cast<float>(static_cast<std::int64_t>(element(8, i)));
  CHECK(bad == 0);
}

TEST_CASE("dequant: a known type without a conversion is a format_error naming the type") {
  for (auto t : {ggml_type::iq2_xxs, ggml_type::q8_k, ggml_type::tq1_0, ggml_type::mxfp4, ggml_type::q4_2}) {
    const auto& traits = distorch::ggml_traits(t);
    std::vector<std::byte> bytes(traits.block_bytes == 0 ? 18 : traits.block_bytes);
    std::vector<float> out(traits.block_elements == 0 ? 32 : traits.block_elements);
    CHECK_FALSE(distorch::ggml_can_dequantize(t));
    try {
      distorch::ggml_dequantize(t, bytes, out, "blk.0.w");
      FAIL("no error");
    } catch (const format_error& e) {
      CHECK(e.info().subject == "blk.0.w");
      CHECK(e.info().problem.find(std::string(traits.name)) != std::string::npos);
    }
  }
}

TEST_CASE("dequant: bytes that do not hold the requested elements are a format_error") {
  std::vector<std::byte> bytes(34);
  std::vector<float> out(64);
  CHECK_THROWS_AS(distorch::ggml_dequantize(ggml_type::q8_0, bytes, out), format_error);  // one block for two
  std::vector<float> partial(16);
  CHECK_THROWS_AS(distorch::ggml_dequantize(ggml_type::q8_0, bytes, partial), format_error);  // half a block
}

TEST_CASE("dequant: tensor bytes from a parsed file dequantize to the reference") {
  std::mt19937 rng(77);
  byte_vector block(144);
  for (auto& b : block) b = std::byte{static_cast<std::uint8_t>(rng())};
  block[0] = std::byte{0x00}, block[1] = std::byte{0x3c};  // d = 1
  block[2] = std::byte{0x00}, block[3] = std::byte{0x38};  // dmin = 0.5
  gguf_builder b;
  b.add_tensor("pad", {3}, g_f32, zeros(12));  // so the Q4_K tensor is not at the data start
  b.add_tensor("q", {256}, g_q4_k, block);
  const auto bytes = b.build();
  const auto f = parse_gguf(bytes);
  const auto& t = *f.find_tensor("q");
  std::vector<float> out(static_cast<std::size_t>(t.numel));
  distorch::ggml_dequantize(t.type, distorch::gguf_tensor_bytes(bytes, t), out, t.name);
  const auto* raw = reinterpret_cast<const std::uint8_t*>(block.data());
  int bad = 0;
  for (int i = 0; i < 256; ++i) bad += std::bit_cast<std::uint32_t>(out[i]) != std::bit_cast<std::uint32_t>(ref_q4_k(raw, i));
  CHECK(bad == 0);
}
