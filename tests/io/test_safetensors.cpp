// Tests for io/safetensors.hpp, io/safetensors_writer.hpp and io/safetensors_index.hpp (pure, no
// LibTorch). Files are hand-built byte vectors: an 8-byte little-endian length, JSON, data.
#include <doctest/doctest.h>

#include "support/test_files.hpp"

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "distorch/io/mapped_file.hpp"
#include "distorch/io/safetensors.hpp"
#include "distorch/io/safetensors_index.hpp"
#include "distorch/io/safetensors_writer.hpp"

namespace {

using distorch_test::temp_dir;

using bytes_t = std::vector<std::byte>;

void put_u64(bytes_t& out, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::byte>((v >> (8 * i)) & 0xFF));
}

/// A file with header `json` (length as given, or its real length) and `data_bytes` bytes of data
/// counting up from 0.
bytes_t file_of(std::string_view json, std::size_t data_bytes = 0, std::optional<std::uint64_t> n = std::nullopt) {
  bytes_t out;
  put_u64(out, n.value_or(json.size()));
  for (const char c : json) out.push_back(static_cast<std::byte>(c));
  for (std::size_t i = 0; i < data_bytes; ++i) out.push_back(static_cast<std::byte>(i & 0xFF));
  return out;
}

distorch::safetensors_header parse(const bytes_t& file) { return distorch::parse_safetensors(file, "test.safetensors"); }

/// The format_error a file raises (fails the test when none is raised).
distorch::error_info rejection(const bytes_t& file) {
  try {
    (void)parse(file);
  } catch (const distorch::format_error& e) {
    CHECK(std::string(e.what()).find('\n') == std::string::npos);
    CHECK_FALSE(e.info().fix.empty());
    return e.info();
  }
  FAIL("the file was accepted");
  return {};
}

}  // namespace

// ---- accepted files -----------------------------------------------------------------------------

TEST_CASE("a minimal file parses: metadata, dtype, shape, offsets relative to the data buffer") {
  const std::string json =
      R"({"__metadata__":{"format":"pt","note":"x"},"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
      R"("b":{"dtype":"BF16","shape":[2],"data_offsets":[24,28]}})";
  const auto h = parse(file_of(json, 28));
  CHECK(h.json_bytes == json.size());
  CHECK(h.data_offset == 8 + json.size());
  CHECK(h.data_bytes == 28);
  CHECK(h.metadata == std::map<std::string, std::string>{{"format", "pt"}, {"note", "x"}});
  REQUIRE(h.tensors.size() == 2);
  CHECK(h.tensors[0].name == "w");
  CHECK(h.tensors[0].type == distorch::dtype::f32);
  CHECK(h.tensors[0].shape == std::vector<std::int64_t>{2, 3});
  CHECK(h.tensors[0].begin == 0);
  CHECK(h.tensors[0].end == 24);
  CHECK(h.tensors[1].dtype_name == "BF16");
  CHECK(h.tensors[1].bytes() == 4);
  const auto records = h.records();
  REQUIRE(records.size() == 2);
  CHECK(records[1].name == "b");
  CHECK(records[1].type == distorch::dtype::bf16);
  CHECK(distorch::inventory::record_bytes(records[0]) == 24);
}

TEST_CASE("JSON padded with leading and trailing whitespace is accepted") {
  const std::string json = std::string(" \n\t") + R"({"w":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}})" + "        ";
  const auto h = parse(file_of(json, 3));
  REQUIRE(h.tensors.size() == 1);
  CHECK(h.tensors[0].type == distorch::dtype::u8);
  CHECK(h.data_offset == 8 + json.size());
}

TEST_CASE("empty tensors and 0-d tensors are accepted") {
  const auto h = parse(file_of(
      R"({"scalar":{"dtype":"F64","shape":[],"data_offsets":[0,8]},"empty":{"dtype":"F32","shape":[0,5],"data_offsets":[8,8]},)"
      R"("also_empty":{"dtype":"I64","shape":[4,0],"data_offsets":[8,8]}})",
      8));
  REQUIRE(h.tensors.size() == 3);
  CHECK(h.tensors[0].name == "scalar");
  CHECK(h.tensors[0].shape.empty());
  CHECK(h.tensors[0].bytes() == 8);
  // Ties at one offset keep header order.
  CHECK(h.tensors[1].name == "empty");
  CHECK(h.tensors[2].name == "also_empty");
  CHECK(h.tensors[1].bytes() == 0);
  CHECK(h.records()[0].numel() == 1);
}

TEST_CASE("a header with no tensors and no data is a valid, empty file") {
  const auto h = parse(file_of("{}"));
  CHECK(h.tensors.empty());
  CHECK(h.metadata.empty());
}

TEST_CASE("tensors come out in data-offset order, whatever the header order") {
  const auto h = parse(file_of(
      R"({"c":{"dtype":"U8","shape":[1],"data_offsets":[2,3]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]},)"
      R"("b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})",
      3));
  REQUIRE(h.tensors.size() == 3);
  CHECK(h.tensors[0].name == "b");
  CHECK(h.tensors[1].name == "a");
  CHECK(h.tensors[2].name == "c");
  REQUIRE(h.find("a") != nullptr);
  CHECK(h.find("a")->begin == 1);
  CHECK(h.find("zz") == nullptr);
}

TEST_CASE("every dtype name of the specification parses with its size") {
  for (const auto& d : distorch::safetensors_dtypes) {
    CAPTURE(d.name);
    // 16 elements make whole bytes for every kind, sub-byte ones included.
    const std::uint64_t bytes = 16 * d.bits / 8;
    const auto json = std::string(R"({"t":{"dtype":")") + std::string(d.name) + R"(","shape":[4,4],"data_offsets":[0,)" +
                      std::to_string(bytes) + "]}}";
    const auto h = parse(file_of(json, bytes));
    REQUIRE(h.tensors.size() == 1);
    CHECK(h.tensors[0].type == d.type);
    CHECK(distorch::inventory::record_bytes(h.records()[0]) == bytes);
  }
  CHECK(distorch::safetensors_dtype("F8_E4M3")->type == distorch::dtype::f8_e4m3);
  CHECK(distorch::safetensors_dtype_name(distorch::dtype::boolean) == "BOOL");
  CHECK(distorch::safetensors_dtype_name(distorch::dtype::opaque).empty());
}

TEST_CASE("a file read as a prefix plus the full size parses like the whole file") {
  const auto file = file_of(R"({"w":{"dtype":"I32","shape":[4],"data_offsets":[0,16]}})", 16);
  const auto whole = parse(file);
  const std::span<const std::byte> prefix(file.data(), static_cast<std::size_t>(whole.data_offset));
  const auto h = distorch::parse_safetensors(prefix, "p", file.size());
  CHECK(h.tensors == whole.tensors);
  CHECK(h.data_bytes == 16);
  // Too short a prefix is an error, never a read past the span.
  CHECK_THROWS_AS(distorch::parse_safetensors(prefix.first(4), "p", file.size()), distorch::format_error);
  CHECK_THROWS_AS(distorch::parse_safetensors(prefix.first(20), "p", file.size()), distorch::format_error);
}

// ---- rejected files: one test per rule ----------------------------------------------------------

TEST_CASE("reject: a file shorter than 8 bytes") {
  for (std::size_t n = 0; n < 8; ++n) {
    CAPTURE(n);
    const bytes_t file(n, std::byte{0});
    const auto info = rejection(file);
    REQUIRE(info.position.has_value());
    CHECK(info.position->value == 0);
    CHECK(info.problem.find("shorter than") != std::string::npos);
  }
}

TEST_CASE("reject: header length above 100,000,000") {
  auto file = file_of("{}", 0, 100'000'001);
  const auto info = rejection(file);
  CHECK(info.problem.find("100,000,000") != std::string::npos);
  // The limit itself is allowed by the length rule (and then fails only for running past the end).
  CHECK(rejection(file_of("{}", 0, 100'000'000)).problem.find("past the end") != std::string::npos);
}

TEST_CASE("reject: header length running past the end of the file") {
  const auto info = rejection(file_of("{}", 0, 3));
  CHECK(info.problem.find("past the end") != std::string::npos);
}

TEST_CASE("reject: header length that would overflow when 8 is added") {
  const auto info = rejection(file_of("{}", 0, std::numeric_limits<std::uint64_t>::max()));
  CHECK(info.position->value == 0);
  const auto info2 = rejection(file_of("{}", 0, std::numeric_limits<std::uint64_t>::max() - 7));
  CHECK(info2.position->value == 0);
}

TEST_CASE("reject: invalid UTF-8 in the header, at the offending byte") {
  std::string json = R"({"w?":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})";
  json[3] = static_cast<char>(0xFF);
  auto info = rejection(file_of(json, 1));
  CHECK(info.problem.find("UTF-8") != std::string::npos);
  REQUIRE(info.position.has_value());
  CHECK(info.position->value == 8 + 3);
  // Overlong encoding of '/', a UTF-16 surrogate, and a truncated sequence at the end.
  for (const std::string& bad : {std::string("\xC0\xAF"), std::string("\xED\xA0\x80"), std::string("\xE2\x82")}) {
    const std::string j = R"({"__metadata__":{"k":")" + bad + R"("}})";
    CHECK(rejection(file_of(j)).problem.find("UTF-8") != std::string::npos);
  }
  std::string truncated = "{} \xE2\x82";
  CHECK(rejection(file_of(truncated)).position->value == 8 + 3);
  // Valid multi-byte names are fine.
  const auto h = parse(file_of("{\"gr\xC3\xBC\xC3\x9F\xE2\x82\xAC\xF0\x9F\x98\x80\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1));
  CHECK(h.tensors[0].name == "gr\xC3\xBC\xC3\x9F\xE2\x82\xAC\xF0\x9F\x98\x80");
}

TEST_CASE("reject: invalid JSON, at its offset") {
  const auto info = rejection(file_of(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]})", 1));  // one brace short
  CHECK(info.problem.find("not valid JSON") != std::string::npos);
  REQUIRE(info.position.has_value());
  CHECK(info.position->value >= 8);
  CHECK(rejection(file_of("")).problem.find("not valid JSON") != std::string::npos);
  CHECK(rejection(file_of("{} {}")).problem.find("not valid JSON") != std::string::npos);
}

TEST_CASE("reject: a number too large for any JSON type (the JSON library's range error becomes a format_error)") {
  const auto info = rejection(file_of(R"({"w":{"dtype":"U8","shape":[1E400],"data_offsets":[0,1]}})", 1));
  CHECK(info.problem.find("not valid JSON") != std::string::npos);
}

TEST_CASE("reject: a header that is JSON but not an object") {
  CHECK(rejection(file_of("[1,2]")).problem.find("not a JSON object") != std::string::npos);
}

TEST_CASE("reject: a header nested deeper than any safetensors header") {
  const std::string deep = R"({"__metadata__":)" + std::string(40, '[') + std::string(40, ']') + "}";
  CHECK(rejection(file_of(deep)).problem.find("nests deeper") != std::string::npos);
}

TEST_CASE("reject: duplicate tensor names") {
  const auto info = rejection(file_of(
      R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})", 2));
  CHECK(info.subject == "w");
  CHECK(info.problem.find("twice") != std::string::npos);
}

TEST_CASE("reject: a key repeated inside a tensor entry") {
  const auto info = rejection(file_of(R"({"w":{"dtype":"U8","dtype":"I8","shape":[1],"data_offsets":[0,1]}})", 1));
  CHECK(info.subject == "dtype");
}

TEST_CASE("reject: shape element count times dtype size overflowing") {
  // 2^32 * 2^32 elements overflow the count itself.
  auto info = rejection(file_of(R"({"w":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,1]}})", 1));
  CHECK(info.subject == "w");
  CHECK(info.problem.find("overflows") != std::string::npos);
  // 2^62 elements fit, but times 8 bytes do not.
  info = rejection(file_of(R"({"w":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,1]}})", 1));
  CHECK(info.problem.find("overflows") != std::string::npos);
  // A dimension beyond int64.
  info = rejection(file_of(R"({"w":{"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,1]}})", 1));
  CHECK(info.problem.find("overflows") != std::string::npos);
}

TEST_CASE("reject: data_offsets with end before begin") {
  const auto info = rejection(file_of(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[4,2]}})", 4));
  CHECK(info.subject == "w");
  CHECK(info.problem.find("not ordered") != std::string::npos);
}

TEST_CASE("reject: overlapping data_offsets") {
  const auto info = rejection(file_of(
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
      12));
  CHECK(info.subject == "b");
  CHECK(info.problem.find("overlaps") != std::string::npos);
}

TEST_CASE("reject: a hole between tensors") {
  const std::string json =
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})";
  const auto info = rejection(file_of(json, 12));
  CHECK(info.subject == "b");
  CHECK(info.problem.find("hole") != std::string::npos);
  REQUIRE(info.position.has_value());
  CHECK(info.position->value == 8 + json.size() + 4);
}

TEST_CASE("reject: a hole before the first tensor") {
  const auto info = rejection(file_of(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8));
  CHECK(info.subject == "a");
  CHECK(info.problem.find("hole") != std::string::npos);
}

TEST_CASE("reject: data_offsets whose size does not match shape x dtype") {
  const auto info = rejection(file_of(R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})", 12));
  CHECK(info.subject == "w");
  CHECK(info.problem.find("needs 16") != std::string::npos);
}

TEST_CASE("reject: trailing bytes after the last tensor") {
  const std::string json = R"({"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})";
  const auto info = rejection(file_of(json, 5));
  CHECK(info.problem.find("3 trailing bytes") != std::string::npos);
  CHECK(info.position->value == 8 + json.size() + 2);
  CHECK(rejection(file_of("{}", 1)).problem.find("trailing") != std::string::npos);
}

TEST_CASE("reject: tensor data running past the end of the file") {
  const auto info = rejection(file_of(R"({"w":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}})", 5));
  CHECK(info.subject == "w");
  CHECK(info.problem.find("past the") != std::string::npos);
}

TEST_CASE("reject: unknown dtype strings") {
  for (const std::string& name : std::vector<std::string>{"F128", "f32", "FLOAT", ""}) {
    const auto info = rejection(file_of(R"({"w":{"dtype":")" + name + R"(","shape":[1],"data_offsets":[0,1]}})", 1));
    CHECK(info.subject == "w");
    CHECK(info.problem.find("unknown dtype") != std::string::npos);
  }
}

TEST_CASE("reject: sub-byte tensors that do not fill whole bytes") {
  const auto info = rejection(file_of(R"({"w":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}})", 1));
  CHECK(info.problem.find("whole number of bytes") != std::string::npos);
}

TEST_CASE("reject: malformed tensor entries") {
  CHECK(rejection(file_of(R"({"w":[1,2]})")).problem.find("not a JSON object") != std::string::npos);
  CHECK(rejection(file_of(R"({"w":{"dtype":"U8","shape":[1]}})", 1)).problem.find("lacks") != std::string::npos);
  CHECK(rejection(file_of(R"({"w":{"dtype":5,"shape":[1],"data_offsets":[0,1]}})", 1)).problem.find("dtype") != std::string::npos);
  CHECK(rejection(file_of(R"({"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}})", 1)).problem.find("shape") != std::string::npos);
  CHECK(rejection(file_of(R"({"w":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}})", 1)).problem.find("shape") != std::string::npos);
  CHECK(rejection(file_of(R"({"w":{"dtype":"U8","shape":1,"data_offsets":[0,1]}})", 1)).problem.find("shape") != std::string::npos);
  CHECK(rejection(file_of(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}})", 1)).problem.find("pair") != std::string::npos);
  CHECK(rejection(file_of(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}})", 1)).problem.find("begin") != std::string::npos);
}

TEST_CASE("reject: __metadata__ that is not an object of strings") {
  CHECK(rejection(file_of(R"({"__metadata__":{"n":1}})")).subject == "__metadata__.n");
  CHECK(rejection(file_of(R"({"__metadata__":"x"})")).subject == "__metadata__");
}

TEST_CASE("the UTF-8 check accepts every valid form and names the first bad byte") {
  auto check = [](std::string_view s) { return distorch::detail::first_invalid_utf8(std::as_bytes(std::span(s.data(), s.size()))); };
  CHECK_FALSE(check("plain ascii").has_value());
  CHECK_FALSE(check("\xC2\x80\xDF\xBF\xE0\xA0\x80\xEF\xBF\xBF\xF0\x90\x80\x80\xF4\x8F\xBF\xBF").has_value());
  CHECK(check("ab\x80") == std::optional<std::size_t>(2));      // lone continuation byte
  CHECK(check("\xF4\x90\x80\x80") == std::optional<std::size_t>(0));  // above U+10FFFF
  CHECK(check("\xF5\x80\x80\x80") == std::optional<std::size_t>(0));
  CHECK(check("\xE0\x80\x80") == std::optional<std::size_t>(0));  // overlong
  CHECK(check("a\xC3") == std::optional<std::size_t>(1));         // truncated
}

// ---- the writer --------------------------------------------------------------------------------

TEST_CASE("the writer lays tensors out sorted by element size then name, header padded to 8") {
  const std::vector<std::uint8_t> u8{1, 2, 3};
  const std::vector<double> f64{1.5, -2.25};
  const std::vector<std::uint16_t> bf16{0x3F80, 0x4000, 0x4040};
  const std::vector<float> f32{0.5f};
  const std::vector<distorch::safetensors_entry> entries{
      {"z_bytes", distorch::dtype::u8, {3}, std::as_bytes(std::span(u8))},
      {"b_half", distorch::dtype::bf16, {3}, std::as_bytes(std::span(bf16))},
      {"y_double", distorch::dtype::f64, {2}, std::as_bytes(std::span(f64))},
      {"a_float", distorch::dtype::f32, {}, std::as_bytes(std::span(f32))},
  };
  const auto file = distorch::serialize_safetensors(entries, {{"format", "pt"}});
  const auto h = parse(file);
  CHECK(h.data_offset % 8 == 0);
  REQUIRE(h.tensors.size() == 4);
  CHECK(h.tensors[0].name == "y_double");
  CHECK(h.tensors[1].name == "a_float");
  CHECK(h.tensors[2].name == "b_half");
  CHECK(h.tensors[3].name == "z_bytes");
  CHECK(h.metadata.at("format") == "pt");
  for (const auto& t : h.tensors) {
    CAPTURE(t.name);
    CHECK((h.data_offset + t.begin) % distorch::dtype_size(t.type) == 0);
  }
  // Bytes land where the header says, unchanged.
  const auto* d = file.data() + h.data_offset;
  CHECK(std::memcmp(d + h.tensors[0].begin, f64.data(), 16) == 0);
  CHECK(std::memcmp(d + h.tensors[2].begin, bf16.data(), 6) == 0);
  CHECK(std::memcmp(d + h.tensors[3].begin, u8.data(), 3) == 0);
  CHECK(h.tensors[1].shape.empty());
  // The padding is spaces after the JSON.
  const std::string_view text(reinterpret_cast<const char*>(file.data()) + 8, static_cast<std::size_t>(h.json_bytes));
  CHECK(text.find_first_not_of(' ', text.rfind('}') + 1) == std::string_view::npos);
}

TEST_CASE("the writer rejects duplicate names, wrong byte counts, reserved names and nameless dtypes") {
  const std::vector<float> f{1, 2};
  const auto span = std::as_bytes(std::span(f));
  auto rejected = [](std::vector<distorch::safetensors_entry> e) {
    try {
      (void)distorch::serialize_safetensors(e);
    } catch (const distorch::format_error& err) {
      return err.info().subject;
    }
    return std::string("<accepted>");
  };
  CHECK(rejected({{"a", distorch::dtype::f32, {2}, span}, {"a", distorch::dtype::f32, {2}, span}}) == "a");
  CHECK(rejected({{"b", distorch::dtype::f32, {3}, span}}) == "b");
  CHECK(rejected({{"__metadata__", distorch::dtype::f32, {2}, span}}) == "__metadata__");
  CHECK(rejected({{"c", distorch::dtype::opaque, {8}, span}}) == "c");
  CHECK(rejected({{"d", distorch::dtype::f32, {-2}, span}}) == "d");
}

TEST_CASE("write_safetensors replaces the file atomically; an old mapping keeps its bytes") {
  temp_dir dir{"st"};
  const auto path = dir / "model.safetensors";
  const std::vector<float> first{1, 2, 3, 4};
  const std::vector<float> second{9, 8};
  distorch::safetensors_entry e1{"w", distorch::dtype::f32, {4}, std::as_bytes(std::span(first))};
  distorch::write_safetensors(path, std::span(&e1, 1), {{"v", "1"}});
  const auto old_map = distorch::mapped_file::open(path);
  const auto old_header = distorch::parse_safetensors(old_map->bytes(), path);

  distorch::safetensors_entry e2{"w", distorch::dtype::f32, {2}, std::as_bytes(std::span(second))};
  distorch::write_safetensors(path, std::span(&e2, 1), {{"v", "2"}});
  // The old mapping still holds the first file's bytes in full.
  CHECK(old_header.metadata.at("v") == "1");
  CHECK(std::memcmp(old_map->data() + old_header.data_offset, first.data(), 16) == 0);
  const auto fresh = distorch::mapped_file::open(path);
  const auto h = distorch::parse_safetensors(fresh->bytes(), path);
  CHECK(h.metadata.at("v") == "2");
  CHECK(std::memcmp(fresh->data() + h.data_offset, second.data(), 8) == 0);
  // No temporary file is left behind.
  std::size_t files = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator(dir.path)) ++files;
  CHECK(files == 1);
}

TEST_CASE("a failed write leaves the target untouched and no temporary file") {
  temp_dir dir{"st"};
  const auto path = dir / "keep.safetensors";
  const std::vector<float> v{1, 2};
  distorch::safetensors_entry good{"w", distorch::dtype::f32, {2}, std::as_bytes(std::span(v))};
  distorch::write_safetensors(path, std::span(&good, 1));
  const auto before = std::filesystem::file_size(path);
  distorch::safetensors_entry bad{"w", distorch::dtype::f32, {3}, std::as_bytes(std::span(v))};
  CHECK_THROWS_AS(distorch::write_safetensors(path, std::span(&bad, 1)), distorch::format_error);
  CHECK(std::filesystem::file_size(path) == before);
  CHECK_THROWS_AS(distorch::write_safetensors(dir / "no/such/dir/x.safetensors", std::span(&good, 1)),
                  distorch::format_error);
  // Renaming onto a directory fails after the data is written; the temporary file must go.
  std::filesystem::create_directory(dir / "a_dir");
  CHECK_THROWS_AS(distorch::write_safetensors(dir / "a_dir", std::span(&good, 1)), distorch::format_error);
  std::size_t files = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator(dir.path)) ++files;
  CHECK(files == 2);  // keep.safetensors and a_dir
}

// ---- the sharded index -------------------------------------------------------------------------

TEST_CASE("an index parses: metadata printed as strings, weight map in order, shards sorted") {
  const auto index = distorch::parse_safetensors_index(
      R"({"metadata": {"total_size": 1234, "name": "m"}, "weight_map": {"b.w": "model-00002-of-00002.safetensors", "a.w": "model-00001-of-00002.safetensors", "a.b": "model-00001-of-00002.safetensors"}})",
      "i.json");
  CHECK(index.metadata.at("total_size") == "1234");
  CHECK(index.metadata.at("name") == "m");
  REQUIRE(index.weight_map.size() == 3);
  CHECK(index.weight_map[0].first == "b.w");
  CHECK(index.shards() == std::vector<std::string>{"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"});
}

TEST_CASE("reject: malformed indexes") {
  auto problem = [](std::string_view text) {
    try {
      (void)distorch::parse_safetensors_index(text, "i.json");
    } catch (const distorch::format_error& e) {
      return e.info().problem + " / " + e.info().subject;
    }
    return std::string("<accepted>");
  };
  CHECK(problem(R"({"metadata": {}})").find("no weight_map") != std::string::npos);
  CHECK(problem(R"({"weight_map": []})").find("no weight_map") != std::string::npos);
  CHECK(problem(R"({"weight_map": {"w": 3}})").find("not a file name / w") != std::string::npos);
  CHECK(problem(R"({"weight_map": {"w": "../x.safetensors"}})").find("leaves") != std::string::npos);
  CHECK(problem(R"({"weight_map": {"w": "/etc/x.safetensors"}})").find("leaves") != std::string::npos);
  CHECK(problem(R"({"weight_map": {"w": "a//b"}})").find("leaves") != std::string::npos);
  CHECK(problem(R"({"weight_map": {"w": ""}})").find("leaves") != std::string::npos);
  CHECK(problem(R"({"weight_map": {"w": "a.st", "w": "b.st"}})").find("twice in the index / w") != std::string::npos);
  CHECK(problem(R"({"weight_map": {"w": "a.st"})").find("not valid JSON") != std::string::npos);
  CHECK(problem("{\"weight_map\": {\"\xFF\": \"a.st\"}}").find("UTF-8") != std::string::npos);
  CHECK(problem(R"([1])").find("not a JSON object") != std::string::npos);
  CHECK(problem(R"({"weight_map": {"w": "sub/dir/a.st"}})") == "<accepted>");
}
