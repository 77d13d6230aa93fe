// Tests for io/torch_zip.hpp and io/torch_zip_source.hpp against checkpoints written at test time
// by the real torch.save of Debian's python3-torch ($DISTORCH_PYTHON). The same Python script
// writes every tensor's values as raw little-endian bytes, the independent reference.
#include <ATen/core/Tensor.h>

#include "distorch/io/torch_zip.hpp"
#include "distorch/io/torch_zip_source.hpp"

#include <doctest/doctest.h>

#include "support/test_files.hpp"

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;

// Writes every checkpoint the tests read, plus manifest.txt: one line per tensor,
// "tag<TAB>name<TAB>dtype<TAB>shape<TAB>requires_grad<TAB>raw file".
constexpr const char* writer_script = R"PY(
import collections, os, sys, zipfile
import numpy as np
import torch

out = sys.argv[1]
torch.manual_seed(7)
manifest = open(os.path.join(out, "manifest.txt"), "w")
counter = [0]

def reference(tag, sd):
    for name, t in sd.items():
        t = t.detach()
        raw = t.contiguous().flatten().view(torch.uint8).numpy().tobytes()
        counter[0] += 1
        raw_name = "%s.%d.raw" % (tag, counter[0])
        with open(os.path.join(out, raw_name), "wb") as f:
            f.write(raw)
        dtype = str(t.dtype).replace("torch.", "")
        shape = ",".join(str(d) for d in t.shape)
        manifest.write("%s\t%s\t%s\t%s\t%d\t%s\n" % (tag, name, dtype, shape, int(sd[name].requires_grad), raw_name))

def path(name):
    return os.path.join(out, name)

dtypes = collections.OrderedDict()
dtypes["f32"] = torch.randn(3, 4)
dtypes["f16"] = torch.randn(5).half()
dtypes["bf16"] = torch.randn(2, 3).bfloat16()
dtypes["f64"] = torch.randn(4, dtype=torch.float64)
dtypes["i64"] = torch.tensor([-(2**40), 3, 2**50], dtype=torch.int64)
dtypes["i32"] = torch.tensor([-7, 2**30], dtype=torch.int32)
dtypes["i16"] = torch.tensor([-300, 300], dtype=torch.int16)
dtypes["i8"] = torch.tensor([-128, 5, 127], dtype=torch.int8)
dtypes["u8"] = torch.tensor([0, 200, 255], dtype=torch.uint8)
dtypes["flag"] = torch.tensor([True, False, True])
dtypes["scalar"] = torch.tensor(2.5)
dtypes["empty"] = torch.zeros(0, 3)
torch.save(dtypes, path("dtypes.pt"))
reference("dtypes", dtypes)

base = torch.arange(40, dtype=torch.float32)
views = collections.OrderedDict()
views["v.slice"] = base[2:8].view(2, 3)
views["v.strided"] = base.view(5, 8)[:, 1::3]
views["v.transposed"] = base.view(5, 8).t()
views["other"] = torch.randn(3)
torch.save(views, path("views.pt"))
reference("views", views)

params = collections.OrderedDict()
params["lin.weight"] = torch.nn.Parameter(torch.randn(3, 2))
params["lin.bias"] = torch.nn.Parameter(torch.randn(3), requires_grad=False)
params["grad"] = torch.randn(2, requires_grad=True)
torch.save(params, path("params.pt"))
reference("params", params)

t1, t2, t3, t4 = torch.randn(2), torch.randn(3), torch.randn(4), torch.randn(1)
nested = {"model": {"enc": {"w": t1}, "dec.w": t2}, "epoch": 7, "lr": 0.1, "tag": "x", "none": None,
          "opt": {"state": {0: {"exp_avg": t3}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
          "list": [t4, None]}
torch.save(nested, path("nested.pt"))
reference("nested", collections.OrderedDict([("model.enc.w", t1), ("model.dec.w", t2),
                                             ("opt.state.0.exp_avg", t3), ("list.0", t4)]))

torch.save(views, path("proto4.pt"), pickle_protocol=4)
reference("proto4", views)

torch.save(dtypes, path("legacy.pt"), _use_new_zipfile_serialization=False)

class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + path("pwned"),))
torch.save({"w": torch.ones(2), "x": Evil()}, path("evil.pt"))

# Rewrites a torch.save archive record by record with Python's zipfile, which neither aligns nor
# (when asked) stores: edit(name, bytes) returns new bytes, or None to drop the record.
def rewrite(src, dst, edit, compression=zipfile.ZIP_STORED, extra=()):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        prefix = zin.namelist()[0].split("/")[0]
        replaced = set(name for name, _ in extra)
        for name in zin.namelist():
            if name.split("/", 1)[1] in replaced:
                continue
            data = edit(name.split("/", 1)[1], zin.read(name))
            if data is not None:
                zout.writestr(name, data)
        for name, data in extra:
            zout.writestr(prefix + "/" + name, data)

# Big-endian bytes, deflated, with byteorder "big": what torch.save writes on s390x.
swapped = collections.OrderedDict()
swapped["f"] = torch.randn(3, 2)
swapped["h"] = torch.randn(3).half()
swapped["l"] = torch.tensor([1, -2, 2**40])
swapped["b"] = torch.tensor([True, False])
swapped["c"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
torch.save(swapped, path("little.pt"))
sizes = {str(i): t.element_size() for i, t in enumerate(swapped.values())}
def to_big(name, data):
    if name.startswith("data/"):
        size = sizes[name[5:]]
        return np.frombuffer(data, dtype="<u%d" % size).byteswap().tobytes() if size > 1 else data
    return data
rewrite(path("little.pt"), path("bigendian.pt"), to_big, zipfile.ZIP_DEFLATED, [("byteorder", b"big")])
reference("bigendian", swapped)
rewrite(path("little.pt"), path("unaligned.pt"), lambda n, d: d)
reference("unaligned", swapped)

rewrite(path("little.pt"), path("missing.pt"), lambda n, d: None if n == "data/1" else d)
rewrite(path("little.pt"), path("wrongsize.pt"), lambda n, d: d[:-2] if n == "data/0" else d)
rewrite(path("little.pt"), path("badbool.pt"), lambda n, d: b"\x02\x00" if n == "data/3" else d)
rewrite(path("little.pt"), path("badorder.pt"), lambda n, d: d, extra=[("byteorder", b"middle")])
whole = open(path("dtypes.pt"), "rb").read()
open(path("truncated.pt"), "wb").write(whole[: len(whole) // 2])
open(path("notzip.pt"), "wb").write(b"this is a text file, not a checkpoint\n")

manifest.close()
)PY";

struct reference_tensor {
  std::string name, dtype;
  std::vector<std::int64_t> shape;
  bool requires_grad = false;
  std::string raw;
};

using distorch_test::python;
using distorch_test::read_file;

// Runs the writer once per test binary in a fresh folder, removed when the binary exits.
struct checkpoints {
  distorch_test::temp_dir folder{"torchzip"};
  fs::path dir = folder.path;
  std::map<std::string, std::vector<reference_tensor>> manifest;

  checkpoints() {
    std::ofstream(dir / "writer.py") << writer_script;
    const std::string command = python() + " " + (dir / "writer.py").string() + " " + dir.string();
    REQUIRE(std::system(command.c_str()) == 0);
    std::istringstream lines(read_file(dir / "manifest.txt"));
    for (std::string line; std::getline(lines, line);) {
      std::vector<std::string> f;
      std::istringstream fields(line);
      for (std::string x; std::getline(fields, x, '\t');) f.push_back(x);
      REQUIRE(f.size() == 6);
      reference_tensor r{f[1], f[2], {}, f[4] == "1", read_file(dir / f[5])};
      std::istringstream dims(f[3]);
      for (std::string d; std::getline(dims, d, ',');) r.shape.push_back(std::stoll(d));
      manifest[f[0]].push_back(std::move(r));
    }
  }
  std::string operator()(const std::string& name) const { return (dir / name).string(); }
};

const checkpoints& files() {
  static const checkpoints instance;
  return instance;
}

std::string bytes_of(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), static_cast<std::size_t>(c.numel()) * c.element_size());
}

// Every tensor of `tag`, in order, with the reference's name, dtype, shape and bytes.
void check_against_reference(const distorch::torch_zip_file& ckpt, const std::string& tag) {
  const auto& expected = files().manifest.at(tag);
  const auto tensors = ckpt.tensors();
  REQUIRE(tensors.size() == expected.size());
  for (std::size_t i = 0; i < expected.size(); ++i) {
    INFO(tag << ": " << expected[i].name);
    CHECK(tensors[i].first == expected[i].name);
    CHECK(distorch::dtype_name(ckpt.state_dict().tensors[i].type) == expected[i].dtype);
    CHECK(tensors[i].second.sizes().vec() == expected[i].shape);
    CHECK(bytes_of(tensors[i].second) == expected[i].raw);
    CHECK(ckpt.state_dict().tensors[i].requires_grad == expected[i].requires_grad);
  }
}

std::string error_of(const std::string& path) {
  try {
    (void)distorch::torch_zip_file::open(path);
  } catch (const distorch::format_error& e) {
    return e.what();
  }
  return "no error";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("torch.save state dicts of every dtype read back bit for bit, zero-copy") {
  const auto ckpt = distorch::torch_zip_file::open(files()("dtypes.pt"));
  check_against_reference(*ckpt, "dtypes");
  CHECK_FALSE(ckpt->big_endian());
  for (std::size_t i = 0; i < ckpt->state_dict().storages.size(); ++i) CHECK(ckpt->zero_copy(i));
  // The scalar is 0-d and the empty tensor has no elements, as saved.
  CHECK(ckpt->tensor("scalar").dim() == 0);
  CHECK(ckpt->tensor("empty").numel() == 0);
}

TEST_CASE("views of one storage are loaded as views of one storage") {
  const auto ckpt = distorch::torch_zip_file::open(files()("views.pt"));
  check_against_reference(*ckpt, "views");
  const auto& sd = ckpt->state_dict();
  REQUIRE(sd.storages.size() == 2);
  CHECK(sd.storages[0].numel == 40);
  const at::Tensor slice = ckpt->tensor("v.slice"), strided = ckpt->tensor("v.strided"),
                   transposed = ckpt->tensor("v.transposed"), other = ckpt->tensor("other");
  CHECK(slice.storage_offset() == 2);
  CHECK(strided.strides().vec() == std::vector<std::int64_t>{8, 3});
  CHECK(strided.storage_offset() == 1);
  CHECK(transposed.strides().vec() == std::vector<std::int64_t>{1, 8});
  CHECK(slice.is_alias_of(strided));
  CHECK(slice.is_alias_of(transposed));
  CHECK_FALSE(slice.is_alias_of(other));
  // Loading one view twice gives the same storage, not a second copy.
  CHECK(ckpt->tensor("v.slice").is_alias_of(transposed));
}

TEST_CASE("a torch.nn.Parameter loads with its requires_grad flag") {
  const auto ckpt = distorch::torch_zip_file::open(files()("params.pt"));
  check_against_reference(*ckpt, "params");
  const auto& t = ckpt->state_dict().tensors;
  REQUIRE(t.size() == 3);
  CHECK(t[0].parameter);
  CHECK(t[0].requires_grad);
  CHECK(t[1].parameter);
  CHECK_FALSE(t[1].requires_grad);
  CHECK_FALSE(t[2].parameter);
  CHECK(t[2].requires_grad);
}

TEST_CASE("nested dicts and lists flatten to dotted names; other entries are skipped") {
  const auto ckpt = distorch::torch_zip_file::open(files()("nested.pt"));
  check_against_reference(*ckpt, "nested");
}

TEST_CASE("pickle protocol 4 files (FRAME, MEMOIZE, STACK_GLOBAL) read back") {
  const auto ckpt = distorch::torch_zip_file::open(files()("proto4.pt"));
  check_against_reference(*ckpt, "proto4");
  CHECK(ckpt->tensor("v.slice").is_alias_of(ckpt->tensor("v.strided")));
}

TEST_CASE("byteorder 'big' and deflated records are byte-swapped copies with the right values") {
  const auto ckpt = distorch::torch_zip_file::open(files()("bigendian.pt"));
  CHECK(ckpt->big_endian());
  check_against_reference(*ckpt, "bigendian");
  for (std::size_t i = 0; i < ckpt->state_dict().storages.size(); ++i) CHECK_FALSE(ckpt->zero_copy(i));
}

TEST_CASE("records written unaligned by another zip writer still read correctly") {
  const auto ckpt = distorch::torch_zip_file::open(files()("unaligned.pt"));
  check_against_reference(*ckpt, "unaligned");
}

TEST_CASE("the legacy (non-zip) format is rejected with how to convert it") {
  const std::string message = error_of(files()("legacy.pt"));
  CHECK(contains(message, "format_error"));
  CHECK(contains(message, "legacy torch.save format"));
  CHECK(contains(message, "torch.save(torch.load(path), new_path)"));
}

TEST_CASE("a forbidden global is rejected by name and nothing is executed") {
  const fs::path marker = files().dir / "pwned";
  const std::string message = error_of(files()("evil.pt"));
  CHECK(contains(message, "global 'posix.system' is not allowed"));
  CHECK(contains(message, "at offset"));
  CHECK_FALSE(fs::exists(marker));
  // Control: Python's own unpickler does run this payload, so the check above can fail.
  const std::string command = python() + " -c \"import torch,sys; torch.load(sys.argv[1], weights_only=False)\" " + files()("evil.pt");
  CHECK(std::system(command.c_str()) == 0);
  CHECK(fs::exists(marker));
  fs::remove(marker);
}

TEST_CASE("a storage record that is missing is named") {
  const std::string message = error_of(files()("missing.pt"));
  CHECK(contains(message, "no record 'data/1'"));
}

TEST_CASE("a storage record whose size differs from data.pkl is rejected") {
  const std::string message = error_of(files()("wrongsize.pt"));
  CHECK(contains(message, "data/0"));
  CHECK(contains(message, "6 float32 elements (24 bytes)"));
}

TEST_CASE("a bool storage holding a byte other than 0 or 1 is rejected when loaded") {
  const auto ckpt = distorch::torch_zip_file::open(files()("badbool.pt"));
  CHECK_THROWS_WITH_AS(ckpt->tensor("b"), doctest::Contains("neither 0 nor 1"), distorch::format_error);
  CHECK(ckpt->tensor("c").numel() == 3);
}

TEST_CASE("a byteorder record other than little or big is rejected") {
  CHECK(contains(error_of(files()("badorder.pt")), "byteorder is 'middle'"));
}

TEST_CASE("a truncated archive is rejected") {
  const std::string message = error_of(files()("truncated.pt"));
  CHECK(contains(message, "format_error"));
  CHECK(contains(message, files()("truncated.pt")));
}

TEST_CASE("a file that is no zip archive is rejected") {
  CHECK(contains(error_of(files()("notzip.pt")), "not a PyTorch zip checkpoint"));
  CHECK(contains(error_of(files()("does-not-exist.pt")), "opening file"));
}

TEST_CASE("damaged bytes in the zip headers and data.pkl give format errors, never a crash") {
  // Every byte of the first local header and of the central directory (the last ~360 bytes of
  // this four-record archive), set to 0x00 and to 0xff in turn: each file must either load
  // completely or raise a format_error. (Damage inside data.pkl fails its checksum.)
  const std::string original = read_file(files()("views.pt"));
  const fs::path damaged = files().dir / "damaged.pt";
  std::vector<std::size_t> offsets;
  for (std::size_t i = 0; i < 64 && i < original.size(); ++i) offsets.push_back(i);
  for (std::size_t i = original.size() > 360 ? original.size() - 360 : 0; i < original.size(); ++i) offsets.push_back(i);
  std::size_t rejected = 0, loaded = 0;
  for (const std::size_t at : offsets) {
    for (const char value : {'\x00', '\xff'}) {
      if (original[at] == value) continue;
      std::string bytes = original;
      bytes[at] = value;
      std::ofstream(damaged, std::ios::binary | std::ios::trunc) << bytes;
      try {
        const auto ckpt = distorch::torch_zip_file::open(damaged.string());
        for (auto& named : ckpt->tensors()) (void)bytes_of(named.second);
        ++loaded;
      } catch (const distorch::format_error&) {
        ++rejected;
      } catch (const std::exception& e) {
        FAIL("offset " << at << ": not a format_error: " << e.what());
      }
    }
  }
  fs::remove(damaged);
  CHECK(rejected > 0);  // headers and the pickle do get damaged
  CHECK(loaded > 0);    // and bytes the readers do not depend on (timestamps, CRCs of data) do not matter
}

TEST_CASE("a data.pkl that no longer matches its zip checksum is rejected") {
  // Renaming a tensor in place keeps the pickle valid; only the checksum can tell.
  std::string bytes = read_file(files()("views.pt"));
  const auto at = bytes.find("v.slice");
  REQUIRE(at != std::string::npos);
  bytes[at] = 'w';
  const fs::path renamed = files().dir / "renamed.pt";
  std::ofstream(renamed, std::ios::binary) << bytes;
  const std::string message = error_of(renamed.string());
  fs::remove(renamed);
  CHECK(contains(message, "record 'data.pkl'"));
  CHECK(contains(message, "do not match the checksum"));
}

TEST_CASE("unknown tensor names and storage indices are format errors") {
  const auto ckpt = distorch::torch_zip_file::open(files()("views.pt"));
  CHECK_THROWS_WITH_AS(ckpt->tensor("nope"), doctest::Contains("no tensor named 'nope'"), distorch::format_error);
  CHECK_THROWS_AS(ckpt->storage(99), distorch::format_error);
}

TEST_CASE("torch_zip_source lists records from the pickle and loads tensors by name") {
  const distorch::torch_zip_source src(files()("views.pt"));
  const distorch::weight_source& ws = src;
  CHECK(ws.format() == "torch-zip");
  CHECK(ws.path() == files()("views.pt"));
  CHECK(ws.metadata().at("byteorder") == "little");
  CHECK(ws.metadata().at("archive_version") == "3");
  const auto& expected = files().manifest.at("views");
  REQUIRE(ws.records().size() == expected.size());
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const auto& r = ws.records()[i];
    CHECK(r.name == expected[i].name);
    CHECK(distorch::dtype_name(r.type) == expected[i].dtype);
    CHECK(r.shape == expected[i].shape);
    CHECK(r.bytes == expected[i].raw.size());
    CHECK(bytes_of(ws.load(r.name)) == expected[i].raw);
  }
  // The three views share storage 0 (40 floats); "other" has its own and no key.
  CHECK(ws.records()[0].storage_key != 0);
  CHECK(ws.records()[0].storage_key == ws.records()[2].storage_key);
  CHECK(ws.records()[0].storage_bytes == 160);
  CHECK(ws.records()[3].storage_key == 0);
  CHECK(ws.contains("v.strided"));
  CHECK_THROWS_AS(ws.load("missing"), distorch::format_error);
}

TEST_CASE("torch_zip_source locates a contiguous tensor's bytes in the file") {
  const distorch::torch_zip_source src(files()("views.pt"));
  const auto where = src.locate("v.slice");
  REQUIRE(where.has_value());
  CHECK(where->file == files()("views.pt"));
  CHECK(where->stored_type == "float32");
  const std::string whole = read_file(files()("views.pt"));
  REQUIRE(where->offset + where->bytes <= whole.size());
  CHECK(whole.substr(where->offset, where->bytes) == files().manifest.at("views")[0].raw);
  CHECK_FALSE(src.locate("missing").has_value());
  // Deflated records have no place in the file to point at.
  const distorch::torch_zip_source deflated(files()("bigendian.pt"));
  CHECK_FALSE(deflated.locate("f").has_value());
}
