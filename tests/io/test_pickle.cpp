// Tests for io/pickle.hpp, the allowlisted unpickler, on hand-built pickles: what it accepts is
// checked field by field, and every class of bad input has its own case. Real torch.save output
// is covered by test_torch_zip.cpp.
#include <doctest/doctest.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "distorch/io/pickle.hpp"

namespace {

// A tiny pickle writer, opcode by opcode, mirroring what Python's pickle module emits.
struct pickle_writer {
  std::vector<std::byte> bytes;

  pickle_writer& raw(std::initializer_list<int> values) {
    for (int v : values) bytes.push_back(static_cast<std::byte>(v));
    return *this;
  }
  pickle_writer& text(const std::string& s) {
    for (char c : s) bytes.push_back(static_cast<std::byte>(c));
    return *this;
  }
  pickle_writer& u32(std::uint32_t v) { return raw({int(v & 0xff), int(v >> 8 & 0xff), int(v >> 16 & 0xff), int(v >> 24)}); }
  pickle_writer& proto(int p = 2) { return raw({0x80, p}); }
  pickle_writer& mark() { return raw({'('}); }
  pickle_writer& stop() { return raw({'.'}); }
  pickle_writer& str(const std::string& s) {
    raw({'X'}).u32(static_cast<std::uint32_t>(s.size()));
    return text(s);
  }
  pickle_writer& global(const std::string& module, const std::string& name) { return raw({'c'}).text(module + "\n" + name + "\n"); }
  pickle_writer& integer(std::int64_t v) {
    if (v >= 0 && v < 256) return raw({'K', int(v)});
    if (v >= INT32_MIN && v <= INT32_MAX) return raw({'J'}).u32(static_cast<std::uint32_t>(v));
    raw({0x8a, 8});
    for (int i = 0; i < 8; ++i) raw({int(static_cast<std::uint64_t>(v) >> (8 * i) & 0xff)});
    return *this;
  }
  pickle_writer& ints(std::initializer_list<std::int64_t> values) {
    mark();
    for (auto v : values) integer(v);
    return raw({'t'});
  }
  pickle_writer& ordered_dict() { return global("collections", "OrderedDict").raw({')', 'R'}); }
  pickle_writer& pid(const std::string& cls, const std::string& key, std::int64_t numel) {
    mark().str("storage").global("torch", cls).str(key).str("cpu").integer(numel).raw({'t'});
    return raw({'Q'});
  }
  // torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())
  pickle_writer& tensor(const std::string& cls, const std::string& key, std::int64_t numel, std::int64_t offset,
                        std::initializer_list<std::int64_t> shape, std::initializer_list<std::int64_t> stride,
                        bool requires_grad = false) {
    global("torch._utils", "_rebuild_tensor_v2").mark().pid(cls, key, numel).integer(offset).ints(shape).ints(stride);
    raw({requires_grad ? 0x88 : 0x89});
    return ordered_dict().raw({'t', 'R'});
  }
  pickle_writer& f32(const std::string& key, std::int64_t numel) { return tensor("FloatStorage", key, numel, 0, {numel}, {1}); }
  // An OrderedDict with entries written by `body`, closed by SETITEMS, then STOP.
  template <class Body>
  pickle_writer& state_dict(Body body) {
    proto().ordered_dict().mark();
    body(*this);
    return raw({'u'}).stop();
  }
};

distorch::pickled_state_dict parse(const pickle_writer& w, const distorch::pickle_limits& limits = {}) {
  return distorch::unpickle_state_dict(w.bytes, "test.pkl", limits);
}

// The error a pickle raises; fails the test when it raises none.
distorch::error_info rejection(const pickle_writer& w, const distorch::pickle_limits& limits = {}) {
  try {
    (void)parse(w, limits);
  } catch (const distorch::format_error& e) {
    return e.info();
  }
  FAIL("the pickle was accepted");
  return {};
}

bool mentions(const distorch::error_info& info, const std::string& part) {
  return info.problem.find(part) != std::string::npos || info.subject.find(part) != std::string::npos;
}

// A valid state dict, used as the base that the rejection cases damage.
pickle_writer two_views() {
  pickle_writer w;
  return w.state_dict([](pickle_writer& p) {
    p.str("a.weight").tensor("FloatStorage", "0", 12, 0, {3, 4}, {4, 1});
    p.str("a.col").tensor("FloatStorage", "0", 12, 1, {3}, {4}, true);
    p.str("b").tensor("HalfStorage", "1", 2, 0, {2}, {1});
  });
}

}  // namespace

TEST_CASE("a state dict is described tensor by tensor, views sharing their storage") {
  const auto sd = parse(two_views());
  REQUIRE(sd.tensors.size() == 3);
  REQUIRE(sd.storages.size() == 2);
  CHECK(sd.storages[0] == distorch::pickled_storage{"0", distorch::dtype::f32, 12, "cpu"});
  CHECK(sd.storages[1] == distorch::pickled_storage{"1", distorch::dtype::f16, 2, "cpu"});
  CHECK(sd.storages[0].nbytes() == 48);
  const auto& w = sd.tensors[0];
  CHECK(w.name == "a.weight");
  CHECK(w.storage == 0);
  CHECK(w.type == distorch::dtype::f32);
  CHECK(w.shape == std::vector<std::int64_t>{3, 4});
  CHECK(w.stride == std::vector<std::int64_t>{4, 1});
  CHECK(w.storage_offset == 0);
  CHECK_FALSE(w.requires_grad);
  const auto& col = sd.tensors[1];
  CHECK(col.name == "a.col");
  CHECK(col.storage == 0);
  CHECK(col.storage_offset == 1);
  CHECK(col.stride == std::vector<std::int64_t>{4});
  CHECK(col.requires_grad);
  CHECK(sd.tensors[2].storage == 1);
  CHECK(sd.tensors[2].type == distorch::dtype::f16);
}

TEST_CASE("every storage class maps to its dtype") {
  for (const auto& [cls, type] : distorch::detail::torch_storage_classes) {
    pickle_writer w;
    w.state_dict([&](pickle_writer& p) { p.str("t").tensor(std::string(cls), "0", 3, 0, {3}, {1}); });
    const auto sd = parse(w);
    CHECK(sd.storages.at(0).type == type);
    CHECK(sd.tensors.at(0).type == type);
  }
}

TEST_CASE("integers decode from BININT1, BININT2, BININT and LONG1") {
  auto numel_of = [](std::initializer_list<int> encoded) {
    pickle_writer w;
    w.proto().ordered_dict().mark().str("t").global("torch._utils", "_rebuild_tensor_v2").mark();
    w.mark().str("storage").global("torch", "ByteStorage").str("0").str("cpu").raw(encoded).raw({'t', 'Q'});
    w.integer(0).ints({0}).ints({1}).raw({0x89}).ordered_dict().raw({'t', 'R', 'u'}).stop();
    return parse(w).storages.at(0).numel;
  };
  CHECK(numel_of({'K', 200}) == 200);
  CHECK(numel_of({'M', 0x34, 0x12}) == 0x1234);
  CHECK(numel_of({'J', 0x78, 0x56, 0x34, 0x12}) == 0x12345678);
  CHECK(numel_of({0x8a, 5, 0, 0, 0, 0, 2}) == (std::uint64_t{2} << 32));
  CHECK(numel_of({0x8a, 0}) == 0);
  // Negative values decode as negative and are then refused as sizes.
  pickle_writer w;
  w.proto().ordered_dict().mark().str("t").global("torch._utils", "_rebuild_tensor_v2").mark();
  w.mark().str("storage").global("torch", "ByteStorage").str("0").str("cpu").raw({0x8a, 1, 0xff}).raw({'t', 'Q'});
  CHECK(mentions(rejection(w), "-1 elements"));
}

TEST_CASE("nested dicts and lists flatten to dotted names; other values are skipped") {
  pickle_writer w;
  w.proto().raw({'}'}).mark();
  w.str("epoch").integer(7);
  w.str("lr").raw({'G', 0x3f, 0xe0, 0, 0, 0, 0, 0, 0});  // 0.5
  w.str("tag").raw({'U', 1}).text("x");
  w.str("none").raw({'N'});
  w.str("model").raw({'}'}).mark().str("enc").raw({'}'}).str("w").f32("0", 2).raw({'s'});
  w.str("dec.w").f32("1", 3).raw({'u'});
  w.str("layers").raw({']'}).mark().f32("2", 1).raw({'N'}).f32("3", 1).raw({'e'});
  w.str("state").raw({'}'}).integer(0).raw({'}'}).str("m").f32("4", 1).raw({'s', 's'});
  w.raw({'u'}).stop();
  const auto sd = parse(w);
  std::vector<std::string> names;
  for (const auto& t : sd.tensors) names.push_back(t.name);
  CHECK(names == std::vector<std::string>{"model.enc.w", "model.dec.w", "layers.0", "layers.2", "state.0.m"});
}

TEST_CASE("a Parameter keeps its requires_grad and is marked as a parameter") {
  pickle_writer w;
  w.state_dict([](pickle_writer& p) {
    p.str("p").global("torch._utils", "_rebuild_parameter").mark().f32("0", 2).raw({0x88}).ordered_dict().raw({'t', 'R'});
  });
  const auto sd = parse(w);
  REQUIRE(sd.tensors.size() == 1);
  CHECK(sd.tensors[0].parameter);
  CHECK(sd.tensors[0].requires_grad);
}

TEST_CASE("protocol 4 opcodes (FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL) and NEWOBJ are read") {
  pickle_writer w;
  w.proto(4).raw({0x95, 0, 0, 0, 0, 0, 0, 0, 0});
  w.raw({0x8c, 11}).text("collections").raw({0x94, 0x8c, 11}).text("OrderedDict").raw({0x94, 0x93, 0x94});
  w.raw({')', 0x81, 0x94});  // OrderedDict created through NEWOBJ
  w.raw({0x8c, 1}).text("w").f32("0", 4).raw({'s'});
  w.raw({0x8c, 1}).text("v").raw({'h', 2, ')', 'R', 's'});  // memo 2 holds the OrderedDict class
  w.stop();
  const auto sd = parse(w);
  REQUIRE(sd.tensors.size() == 1);
  CHECK(sd.tensors[0].name == "w");
}

TEST_CASE("BUILD with the instance dict of an OrderedDict (state_dict()._metadata) is accepted") {
  pickle_writer w;
  w.proto().ordered_dict().mark().str("w").f32("0", 1).raw({'u'});
  w.raw({'}'}).str("_metadata").ordered_dict().str("").raw({'}'}).str("version").integer(1).raw({'s', 's', 's', 'b'});
  w.stop();
  const auto sd = parse(w);
  REQUIRE(sd.tensors.size() == 1);
  CHECK(sd.tensors[0].name == "w");
}

TEST_CASE("truncated input: every proper prefix of a valid pickle is rejected") {
  const pickle_writer whole = two_views();
  for (std::size_t n = 0; n < whole.bytes.size(); ++n) {
    pickle_writer prefix;
    prefix.bytes.assign(whole.bytes.begin(), whole.bytes.begin() + static_cast<std::ptrdiff_t>(n));
    INFO("prefix of " << n << " bytes");
    const auto info = rejection(prefix);
    REQUIRE(info.position.has_value());
    CHECK(info.position->kind == "offset");
    CHECK(info.position->value <= n);
  }
}

TEST_CASE("a string or frame longer than the input is truncation, not an allocation") {
  pickle_writer w;
  w.proto().raw({'X'}).u32(0xFFFFFFF0u).text("abc");
  CHECK(mentions(rejection(w), "truncated"));
  pickle_writer frame;
  frame.proto(4).raw({0x95, 0, 0, 0, 0, 0, 0, 0, 0x40});
  CHECK(mentions(rejection(frame), "truncated"));
}

TEST_CASE("bytes that are no opcode are rejected with their offset") {
  pickle_writer w;
  w.proto().raw({0xff});
  const auto info = rejection(w);
  CHECK(info.subject == "0xff");
  CHECK(info.position->value == 2);
  CHECK(mentions(info, "not a pickle opcode"));
}

TEST_CASE("opcodes outside the weights-only set are rejected by name") {
  const std::pair<int, const char*> unsupported[] = {
      {'i', "INST"}, {'o', "OBJ"}, {'B', "BINBYTES"}, {0x8f, "EMPTY_SET"}, {0x82, "EXT1"}, {'P', "PERSID"},
      {'2', "DUP"},  {'0', "POP"}, {'I', "INT"},      {0x92, "NEWOBJ_EX"}, {'S', "STRING"}, {0x97, "NEXT_BUFFER"}};
  for (const auto& [op, name] : unsupported) {
    pickle_writer w;
    w.proto().raw({'N', op});
    const auto info = rejection(w);
    CHECK(info.subject == name);
    CHECK(info.position->value == 3);
    CHECK(mentions(info, "outside the weights-only set"));
  }
}

TEST_CASE("a memo index that was never stored is rejected") {
  pickle_writer w;
  w.proto().raw({'N', 'q', 0, 'h', 3});
  const auto info = rejection(w);
  CHECK(info.subject == "BINGET");
  CHECK(info.position->value == 5);
  CHECK(mentions(info, "memo index 3 was never stored"));
  pickle_writer far;
  far.proto().raw({'j'}).u32(70000);
  CHECK(mentions(rejection(far), "memo index 70000"));
}

TEST_CASE("stack underflow is rejected for each opcode that pops") {
  const std::vector<std::vector<int>> programs = {
      {'R'},                  // REDUCE on an empty stack
      {'.'},                  // STOP with nothing to return
      {'N', 0x86},            // TUPLE2 with one value
      {']', '(', 'N', 'a'},   // APPEND may not reach the list below the MARK
      {'}', 'N', 's'},        // SETITEM with one value and no dict under it
      {'(', 'N', 'b'},        // BUILD with no target above the MARK
      {'q', 0},               // BINPUT with nothing to store
      {'(', 0x93},            // STACK_GLOBAL with no strings
  };
  for (std::size_t i = 0; i < programs.size(); ++i) {
    pickle_writer w;
    w.proto();
    for (int op : programs[i]) w.raw({op});
    INFO("program " << i);
    const auto info = rejection(w);
    CHECK(mentions(info, "stack underflow"));
    CHECK(info.position->value == w.bytes.size() - (programs[i].back() == 0 ? 2 : 1));
  }
  pickle_writer no_mark;
  no_mark.proto().raw({'N', 't'});
  CHECK(mentions(rejection(no_mark), "without a preceding MARK"));
  pickle_writer odd;
  odd.proto().raw({'}', '(', 'N', 'u'});
  CHECK(mentions(rejection(odd), "odd number"));
}

TEST_CASE("globals outside the allowlist are rejected by name, through GLOBAL and STACK_GLOBAL") {
  const std::pair<const char*, const char*> forbidden[] = {
      {"os", "system"},          {"posix", "system"},           {"builtins", "eval"},
      {"subprocess", "Popen"},   {"torch._utils", "_rebuild_qtensor"}, {"torch", "FloatTensor"},
      {"torch.nn.modules.linear", "Linear"}, {"collections", "defaultdict"}, {"torch", "load"}};
  for (const auto& [module, name] : forbidden) {
    const std::string full = std::string(module) + "." + name;
    pickle_writer w;
    w.proto().global(module, name).str("touch /tmp/pwned").raw({0x85, 'R', '.'});
    auto info = rejection(w);
    CHECK(info.subject == full);
    CHECK(info.position->value == 2);
    CHECK(mentions(info, "global '" + full + "' is not allowed"));
    pickle_writer stacked;
    stacked.proto(4).raw({0x8c, int(std::string(module).size())}).text(module);
    stacked.raw({0x8c, int(std::string(name).size())}).text(name).raw({0x93});
    info = rejection(stacked);
    CHECK(info.subject == full);
  }
}

TEST_CASE("excessive sizes are rejected before anything is allocated") {
  SUBCASE("an integer wider than 64 bits") {
    pickle_writer w;
    w.proto().raw({0x8a, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9});
    CHECK(mentions(rejection(w), "does not fit in 64 bits"));
  }
  SUBCASE("a storage whose byte size overflows") {
    pickle_writer w;
    w.state_dict([](pickle_writer& p) { p.str("t").tensor("FloatStorage", "0", std::int64_t{1} << 62, 0, {1}, {1}); });
    CHECK(mentions(rejection(w), "no valid byte size"));
  }
  SUBCASE("a shape whose element count overflows") {
    pickle_writer w;
    w.state_dict([](pickle_writer& p) {
      p.str("t").tensor("ByteStorage", "0", 10, 0, {std::int64_t{1} << 40, std::int64_t{1} << 40}, {0, 0});
    });
    CHECK(mentions(rejection(w), "overflows 64 bits"));
  }
  SUBCASE("too many dimensions") {
    pickle_writer w;
    w.proto().global("torch._utils", "_rebuild_tensor_v2").mark().pid("FloatStorage", "0", 1).integer(0).mark();
    for (int i = 0; i < 65; ++i) w.integer(1);
    w.raw({'t'});
    w.ints({1}).raw({0x89}).ordered_dict().raw({'t', 'R'});
    CHECK(mentions(rejection(w), "65 dimensions"));
  }
  SUBCASE("an input over max_input_bytes") {
    distorch::pickle_limits limits;
    limits.max_input_bytes = 16;
    CHECK(mentions(rejection(two_views(), limits), "over the limit of 16"));
  }
  SUBCASE("more values than max_values") {
    distorch::pickle_limits limits;
    limits.max_values = 10;
    pickle_writer w;
    w.proto();
    for (int i = 0; i < 20; ++i) w.raw({'N'});
    CHECK(mentions(rejection(w, limits), "more than 10 values"));
  }
  SUBCASE("a tensor name over max_name_length") {
    distorch::pickle_limits limits;
    limits.max_name_length = 8;
    pickle_writer w;
    w.state_dict([](pickle_writer& p) { p.str("a_rather_long_name").f32("0", 1); });
    CHECK(mentions(rejection(w, limits), "longer than the limit of 8"));
  }
}

TEST_CASE("tensor views that reach outside their storage are rejected") {
  auto view = [](std::int64_t numel, std::int64_t offset, std::initializer_list<std::int64_t> shape,
                 std::initializer_list<std::int64_t> stride) {
    pickle_writer w;
    return w.state_dict([&](pickle_writer& p) { p.str("t").tensor("FloatStorage", "0", numel, offset, shape, stride); });
  };
  CHECK(parse(view(12, 0, {3, 4}, {4, 1})).tensors.size() == 1);
  CHECK(parse(view(12, 2, {2, 2}, {5, 1})).tensors.size() == 1);    // last element 2 + 5 + 1 = 8
  CHECK(parse(view(12, 12, {0, 4}, {4, 1})).tensors.size() == 1);   // empty, at the very end
  CHECK(mentions(rejection(view(12, 1, {3, 4}, {4, 1})), "past the end of storage '0' of 12 elements"));
  CHECK(mentions(rejection(view(12, 0, {3, 4}, {5, 1})), "past the end"));
  CHECK(mentions(rejection(view(12, 13, {0}, {1})), "past the end"));
  CHECK(mentions(rejection(view(12, 0, {3, 4}, {4})), "size has 2 dimensions but stride has 1"));
  CHECK(mentions(rejection(view(12, 0, {3, 2}, {std::int64_t{1} << 62, 1})), "overflows"));
}

TEST_CASE("negative sizes, strides and offsets are rejected") {
  pickle_writer shape;
  shape.state_dict([](pickle_writer& p) { p.str("t").tensor("FloatStorage", "0", 4, 0, {-1}, {1}); });
  CHECK(mentions(rejection(shape), "negative value -1"));
  pickle_writer offset;
  offset.state_dict([](pickle_writer& p) { p.str("t").tensor("FloatStorage", "0", 4, -2, {1}, {1}); });
  CHECK(mentions(rejection(offset), "storage_offset -2 is negative"));
}

TEST_CASE("nesting deeper than the limit is rejected; shallower nesting joins names") {
  auto nested = [](int depth) {
    pickle_writer w;
    w.proto();
    for (int i = 0; i < depth; ++i) w.raw({'}'}).str("k");
    w.f32("0", 1);
    for (int i = 0; i < depth; ++i) w.raw({'s'});
    return w.stop();
  };
  const auto sd = parse(nested(10));
  REQUIRE(sd.tensors.size() == 1);
  CHECK(sd.tensors[0].name == "k.k.k.k.k.k.k.k.k.k");
  CHECK(mentions(rejection(nested(100)), "nested more than 64 levels"));
  distorch::pickle_limits limits;
  limits.max_nesting = 5;
  CHECK(mentions(rejection(nested(10), limits), "nested more than 5 levels"));
}

TEST_CASE("wrong argument types to _rebuild_tensor_v2 are rejected") {
  auto call = [](auto args) {
    pickle_writer w;
    w.proto().global("torch._utils", "_rebuild_tensor_v2").mark();
    args(w);
    return w.raw({'t', 'R', '.'});
  };
  auto rest = [](pickle_writer& w) { w.integer(0).ints({2}).ints({1}).raw({0x89}).ordered_dict(); };
  CHECK(mentions(rejection(call([&](pickle_writer& w) { w.integer(5); rest(w); })),
                 "argument 1 of _rebuild_tensor_v2 (storage) must be a storage, not a int"));
  CHECK(mentions(rejection(call([&](pickle_writer& w) {
                   w.pid("FloatStorage", "0", 2).str("0").ints({2}).ints({1}).raw({0x89}).ordered_dict();
                 })),
                 "(storage_offset) must be a int, not a str"));
  CHECK(mentions(rejection(call([&](pickle_writer& w) {
                   w.pid("FloatStorage", "0", 2).integer(0).raw({']'}).ints({1}).raw({0x89}).ordered_dict();
                 })),
                 "(size) must be a tuple, not a list"));
  CHECK(mentions(rejection(call([&](pickle_writer& w) {
                   w.pid("FloatStorage", "0", 2).integer(0).ints({2}).mark().str("1").raw({'t', 0x89}).ordered_dict();
                 })),
                 "every entry of argument 4"));
  CHECK(mentions(rejection(call([&](pickle_writer& w) {
                   w.pid("FloatStorage", "0", 2).integer(0).ints({2}).ints({1}).integer(1).ordered_dict();
                 })),
                 "(requires_grad) must be a bool, not a int"));
  CHECK(mentions(rejection(call([&](pickle_writer& w) {
                   w.pid("FloatStorage", "0", 2).integer(0).ints({2}).ints({1}).raw({0x89, 'N'});
                 })),
                 "backward_hooks argument of _rebuild_tensor_v2 must be a dict"));
  CHECK(mentions(rejection(call([&](pickle_writer& w) {
                   w.pid("FloatStorage", "0", 2).integer(0).ints({2}).ints({1}).raw({0x89, '}'}).str("h").integer(1);
                   w.raw({'s'});
                 })),
                 "backward hooks"));
  CHECK(mentions(rejection(call([&](pickle_writer& w) { w.pid("FloatStorage", "0", 2).integer(0); })),
                 "takes 6 or 7 arguments, got 2"));
  CHECK(mentions(rejection(call([&](pickle_writer& w) {
                   rest(w.pid("FloatStorage", "0", 2));
                   w.raw({'}'}).str("m").integer(1).raw({'s'});
                 })),
                 "tensor metadata"));
  pickle_writer args_not_tuple;
  args_not_tuple.proto().global("torch._utils", "_rebuild_tensor_v2").raw({']', 'R'});
  CHECK(mentions(rejection(args_not_tuple), "arguments of REDUCE must be a tuple"));
}

TEST_CASE("wrong arguments to _rebuild_parameter, OrderedDict and storage classes are rejected") {
  pickle_writer param;
  param.proto().global("torch._utils", "_rebuild_parameter").mark().integer(1).raw({0x88}).ordered_dict().raw({'t', 'R'});
  CHECK(mentions(rejection(param), "argument 1 of _rebuild_parameter (data) must be a tensor"));
  pickle_writer od;
  od.proto().global("collections", "OrderedDict").integer(1).raw({0x85, 'R'});
  CHECK(mentions(rejection(od), "called with arguments"));
  pickle_writer storage;
  storage.proto().global("torch", "FloatStorage").raw({')', 'R'});
  CHECK(mentions(rejection(storage), "only inside persistent ids"));
  pickle_writer call_int;
  call_int.proto().integer(3).raw({')', 'R'});
  CHECK(mentions(rejection(call_int), "REDUCE calls a int"));
  pickle_writer newobj;
  newobj.proto().global("torch", "FloatStorage").raw({')', 0x81});
  CHECK(mentions(rejection(newobj), "NEWOBJ can only create a collections.OrderedDict"));
  pickle_writer build;
  build.proto().raw({']', '}', 'b'});
  CHECK(mentions(rejection(build), "BUILD can only set the attributes of an OrderedDict, not of a list"));
}

TEST_CASE("malformed persistent ids are rejected") {
  auto with_pid = [](auto fields) {
    pickle_writer w;
    w.proto().mark();
    fields(w);
    return w.raw({'t', 'Q'});
  };
  CHECK(mentions(rejection(with_pid([](pickle_writer& w) { w.str("storage"); })), "has 5 fields, this one has 1"));
  CHECK(mentions(rejection(with_pid([](pickle_writer& w) {
                   w.str("module").global("torch", "FloatStorage").str("0").str("cpu").integer(1);
                 })),
                 "'module' is not a storage"));
  CHECK(mentions(rejection(with_pid([](pickle_writer& w) {
                   w.str("storage").global("collections", "OrderedDict").str("0").str("cpu").integer(1);
                 })),
                 "must be a torch.*Storage class"));
  CHECK(mentions(rejection(with_pid([](pickle_writer& w) {
                   w.str("storage").global("torch", "FloatStorage").str("../etc/passwd").str("cpu").integer(1);
                 })),
                 "not a plain record name"));
  CHECK(mentions(rejection(with_pid([](pickle_writer& w) {
                   w.str("storage").global("torch", "FloatStorage").integer(0).str("cpu").integer(1);
                 })),
                 "storage key must be a str"));
  pickle_writer not_tuple;
  not_tuple.proto().str("storage").raw({'Q'});
  CHECK(mentions(rejection(not_tuple), "persistent id must be a tuple"));
  pickle_writer twice;
  twice.state_dict([](pickle_writer& p) {
    p.str("a").tensor("FloatStorage", "0", 4, 0, {4}, {1});
    p.str("b").tensor("HalfStorage", "0", 4, 0, {4}, {1});
  });
  CHECK(mentions(rejection(twice), "named twice with different types or sizes"));
}

TEST_CASE("a root that is not a dict is rejected") {
  pickle_writer tensor_root;
  tensor_root.proto().f32("0", 2).stop();
  CHECK(mentions(rejection(tensor_root), "holds a tensor, not a dict of tensors"));
  pickle_writer list_root;
  list_root.proto().raw({']', '.'});
  CHECK(mentions(rejection(list_root), "holds a list"));
}

TEST_CASE("names that collide after flattening are rejected") {
  pickle_writer w;
  w.state_dict([](pickle_writer& p) {
    p.str("a.b").f32("0", 1);
    p.str("a").raw({'}'}).str("b").f32("1", 1).raw({'s'});
  });
  const auto info = rejection(w);
  CHECK(info.subject == "a.b");
  CHECK(mentions(info, "flatten to the same name"));
}

TEST_CASE("dict keys that cannot name a tensor are rejected") {
  pickle_writer w;
  w.proto().raw({'}', 'G', 0x3f, 0xe0, 0, 0, 0, 0, 0, 0}).f32("0", 1).raw({'s', '.'});
  CHECK(mentions(rejection(w), "dict key of type float"));
  pickle_writer empty;
  empty.proto().raw({'}'}).str("").f32("0", 1).raw({'s', '.'});
  CHECK(mentions(rejection(empty), "empty name"));
}

TEST_CASE("shared containers: harmless without tensors, rejected with them, and cycles end") {
  pickle_writer shared_config;  // {"a": [1], "b": <same list>, "w": tensor}
  shared_config.proto().raw({'}'}).mark().str("a").raw({']', 'K', 1, 'a', 'q', 0}).str("b").raw({'h', 0});
  shared_config.str("w").f32("0", 1).raw({'u', '.'});
  CHECK(parse(shared_config).tensors.size() == 1);

  pickle_writer shared_tensors;  // {"a": {"w": t}, "b": <same dict>}
  shared_tensors.proto().raw({'}'}).mark().str("a").raw({'}'}).str("w").f32("0", 1).raw({'s', 'q', 0});
  shared_tensors.str("b").raw({'h', 0, 'u', '.'});
  CHECK(mentions(rejection(shared_tensors), "appears twice"));

  pickle_writer cycle;  // l = [t]; l.append(l); {"l": l}
  cycle.proto().raw({'}'}).str("l").raw({']', 'q', 0}).f32("0", 1).raw({'a', 'h', 0, 'a', 's', '.'});
  const auto sd = parse(cycle);
  REQUIRE(sd.tensors.size() == 1);
  CHECK(sd.tensors[0].name == "l.0");

  // Doubling: d1 = {"a": d0, "b": d0}, d2 = {"a": d1, "b": d1}, ... 2^40 paths, no tensors.
  pickle_writer bomb;
  bomb.proto().raw({'}', 'r'}).u32(0);
  for (std::uint32_t i = 1; i <= 40; ++i)
    bomb.raw({'}', '('}).str("a").raw({'j'}).u32(i - 1).str("b").raw({'j'}).u32(i - 1).raw({'u', 'r'}).u32(i);
  bomb.raw({'.'});
  CHECK(parse(bomb).tensors.empty());
}

TEST_CASE("bytes after STOP and protocols newer than 5 are rejected") {
  pickle_writer trailing = two_views();
  trailing.raw({'N'});
  CHECK(mentions(rejection(trailing), "1 bytes follow the STOP opcode"));
  pickle_writer newer;
  newer.proto(6);
  CHECK(mentions(rejection(newer), "protocol 6"));
}

TEST_CASE("errors carry the source name, the offset and a fix") {
  pickle_writer w;
  w.proto().global("os", "system");
  try {
    (void)distorch::unpickle_state_dict(w.bytes, "model.pt:data.pkl");
    FAIL("accepted");
  } catch (const distorch::format_error& e) {
    CHECK(e.info().doing == "unpickling model.pt:data.pkl");
    CHECK(e.info().subject == "os.system");
    CHECK(e.info().position->value == 2);
    CHECK_FALSE(e.info().fix.empty());
    CHECK(std::string(e.what()).find('\n') == std::string::npos);
  }
}
