#pragma once
/// \file
/// An allowlisted unpickler for the `data.pkl` record of PyTorch zip checkpoints (.bin / .pt).
/// It understands exactly what `torch.save` writes for a state dict and nothing more: dicts and
/// `collections.OrderedDict`, tensors rebuilt by `torch._utils._rebuild_tensor_v2` and
/// `_rebuild_parameter`, and storages named by persistent ids. Any other global (`os.system`,
/// `builtins.eval`, ...) is a `format_error` naming it. Nothing is ever called, imported or
/// emulated: the result is a plain description of tensors and storages, which io/torch_zip.hpp
/// turns into tensors. Pure C++20 without LibTorch, so libFuzzer (clang) can build it.
///
/// Example:
/// \code
///   std::span<const std::byte> pickle = ...;             // the bytes of archive/data.pkl
///   distorch::pickled_state_dict sd = distorch::unpickle_state_dict(pickle);
///   for (const auto& t : sd.tensors)
///     std::cout << t.name << " -> data/" << sd.storages[t.storage].key << '\n';
/// \endcode

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "distorch/core/error.hpp"
#include "distorch/model/dtype.hpp"

namespace distorch::inline v0 {

/// Bounds the unpickler enforces, so a hostile pickle cannot exhaust memory or the call stack.
/// The defaults hold any real state dict (a million tensors) with room to spare.
/// \code
///   distorch::pickle_limits tight;
///   tight.max_nesting = 8;   // reject dicts nested deeper than 8 levels
///   auto sd = distorch::unpickle_state_dict(bytes, "data.pkl", tight);
/// \endcode
struct pickle_limits {
  std::size_t max_input_bytes = std::size_t{1} << 30;  ///< size of the pickle itself
  std::size_t max_values = std::size_t{1} << 25;  ///< values pushed, memoized or tensor dims (each costs ≤ 64 bytes)
  std::size_t max_nesting = 64;                        ///< dict/list depth between the root and a tensor
  std::size_t max_dims = 64;                           ///< dimensions of one tensor
  std::size_t max_name_length = 4096;                  ///< bytes of one flattened tensor name
  std::size_t max_total_name_bytes = std::size_t{1} << 28;  ///< bytes of all tensor names together
};

/// One storage, i.e. one `data/<key>` record of the archive, as named by a persistent id.
struct pickled_storage {
  std::string key;           ///< record name under `data/`, "0", "1", ...
  dtype type = dtype::f32;   ///< from the storage class (`torch.HalfStorage` → f16)
  std::uint64_t numel = 0;   ///< elements; the record holds numel × dtype_size bytes
  std::string location;      ///< where it was saved from: "cpu", "cuda:0", ...

  /// Bytes the storage's record must hold.
  std::uint64_t nbytes() const noexcept { return numel * dtype_size(type); }
  friend bool operator==(const pickled_storage&, const pickled_storage&) = default;
};

/// One tensor of the state dict: a strided view of a storage (shape, stride and offset are in
/// elements, as in `Tensor.as_strided`). Bounds are already checked against the storage.
struct pickled_tensor {
  std::string name;                  ///< dotted name, nested dicts joined by '.'
  std::size_t storage = 0;           ///< index into `pickled_state_dict::storages`
  dtype type = dtype::f32;
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> stride;
  std::int64_t storage_offset = 0;
  bool requires_grad = false;
  bool parameter = false;            ///< saved as a `torch.nn.Parameter`

  /// Elements of the tensor: the product of its shape (1 for a 0-d tensor).
  std::int64_t numel() const noexcept {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  friend bool operator==(const pickled_tensor&, const pickled_tensor&) = default;
};

/// What `unpickle_state_dict` finds: tensors in the order of the pickled dict, and the storages
/// they view in the order they were first named. Several tensors may view one storage.
struct pickled_state_dict {
  std::vector<pickled_tensor> tensors;
  std::vector<pickled_storage> storages;
};

namespace detail {

enum class pickle_kind : std::uint8_t { none, boolean, integer, real, string, tuple, list, dict, global, storage, tensor };

constexpr std::string_view pickle_kind_name(pickle_kind k) noexcept {
  switch (k) {
    case pickle_kind::none: return "None";
    case pickle_kind::boolean: return "bool";
    case pickle_kind::integer: return "int";
    case pickle_kind::real: return "float";
    case pickle_kind::string: return "str";
    case pickle_kind::tuple: return "tuple";
    case pickle_kind::list: return "list";
    case pickle_kind::dict: return "dict";
    case pickle_kind::global: return "global";
    case pickle_kind::storage: return "storage";
    case pickle_kind::tensor: return "tensor";
  }
  return "?";
}

enum class pickle_global : std::uint8_t { ordered_dict, rebuild_tensor_v2, rebuild_parameter, storage_class };

/// A value on the unpickler's stack. Containers, strings, storages and tensors live in arenas
/// and are referred to by index: memo hits then alias one object as Python would, no value is
/// ever deep-copied, and destruction is never recursive.
struct pickle_value {
  pickle_kind kind = pickle_kind::none;
  pickle_global global = pickle_global::ordered_dict;  ///< kind == global
  dtype storage_type = dtype::f32;                     ///< global == storage_class
  std::int64_t integer = 0;                            ///< int, bool, or the arena index
  double real = 0;
};

/// The torch storage classes `torch.save` names in persistent ids.
constexpr std::pair<std::string_view, dtype> torch_storage_classes[] = {
    {"FloatStorage", dtype::f32},   {"HalfStorage", dtype::f16},  {"BFloat16Storage", dtype::bf16},
    {"DoubleStorage", dtype::f64},  {"LongStorage", dtype::i64},  {"IntStorage", dtype::i32},
    {"ShortStorage", dtype::i16},   {"CharStorage", dtype::i8},   {"ByteStorage", dtype::u8},
    {"BoolStorage", dtype::boolean},
};

/// Python's name of an opcode byte, for messages; "" when the byte is no pickle opcode.
constexpr std::string_view pickle_opcode_name(std::uint8_t op) noexcept {
  switch (op) {
    case '(': return "MARK";            case '.': return "STOP";          case '0': return "POP";
    case '1': return "POP_MARK";        case '2': return "DUP";           case 'F': return "FLOAT";
    case 'I': return "INT";             case 'J': return "BININT";        case 'K': return "BININT1";
    case 'L': return "LONG";            case 'M': return "BININT2";       case 'N': return "NONE";
    case 'P': return "PERSID";          case 'Q': return "BINPERSID";     case 'R': return "REDUCE";
    case 'S': return "STRING";          case 'T': return "BINSTRING";     case 'U': return "SHORT_BINSTRING";
    case 'V': return "UNICODE";         case 'X': return "BINUNICODE";    case 'a': return "APPEND";
    case 'b': return "BUILD";           case 'c': return "GLOBAL";        case 'd': return "DICT";
    case '}': return "EMPTY_DICT";      case 'e': return "APPENDS";       case 'g': return "GET";
    case 'h': return "BINGET";          case 'i': return "INST";          case 'j': return "LONG_BINGET";
    case 'l': return "LIST";            case ']': return "EMPTY_LIST";    case 'o': return "OBJ";
    case 'p': return "PUT";             case 'q': return "BINPUT";        case 'r': return "LONG_BINPUT";
    case 's': return "SETITEM";         case 't': return "TUPLE";         case ')': return "EMPTY_TUPLE";
    case 'u': return "SETITEMS";        case 'G': return "BINFLOAT";      case 0x80: return "PROTO";
    case 0x81: return "NEWOBJ";         case 0x82: return "EXT1";         case 0x83: return "EXT2";
    case 0x84: return "EXT4";           case 0x85: return "TUPLE1";       case 0x86: return "TUPLE2";
    case 0x87: return "TUPLE3";         case 0x88: return "NEWTRUE";      case 0x89: return "NEWFALSE";
    case 0x8a: return "LONG1";          case 0x8b: return "LONG4";        case 'B': return "BINBYTES";
    case 'C': return "SHORT_BINBYTES";  case 0x8c: return "SHORT_BINUNICODE"; case 0x8d: return "BINUNICODE8";
    case 0x8e: return "BINBYTES8";      case 0x8f: return "EMPTY_SET";    case 0x90: return "ADDITEMS";
    case 0x91: return "FROZENSET";      case 0x92: return "NEWOBJ_EX";    case 0x93: return "STACK_GLOBAL";
    case 0x94: return "MEMOIZE";        case 0x95: return "FRAME";        case 0x96: return "BYTEARRAY8";
    case 0x97: return "NEXT_BUFFER";    case 0x98: return "READONLY_BUFFER";
    default: return "";
  }
}

class state_dict_unpickler {
 public:
  state_dict_unpickler(std::span<const std::byte> input, std::string_view source, const pickle_limits& limits)
      : in_(input), source_(source), limits_(limits) {}

  pickled_state_dict run() {
    if (in_.size() > limits_.max_input_bytes)
      fail_at(0, std::string(source_), "the pickle is " + std::to_string(in_.size()) + " bytes, over the limit of " +
                                           std::to_string(limits_.max_input_bytes),
              "raise pickle_limits::max_input_bytes if this checkpoint is trusted to be that large");
    const pickle_value root = execute();
    return flatten(root);
  }

 private:
  struct tensor_entry {
    std::size_t storage = 0;
    std::vector<std::int64_t> shape, stride;
    std::int64_t storage_offset = 0;
    bool requires_grad = false;
    bool parameter = false;
  };

  // ---- errors ----------------------------------------------------------------------------------
  [[noreturn]] void fail_at(std::size_t offset, std::string subject, std::string problem, std::string fix) const {
    throw format_error({"unpickling " + std::string(source_), std::move(subject), error_position{"offset", offset},
                        std::move(problem), std::move(fix)});
  }
  [[noreturn]] void fail(std::string problem, std::string fix = kResaveFix) const {
    fail_at(op_offset_, std::string(op_name_), std::move(problem), std::move(fix));
  }
  [[noreturn]] void truncated() const {
    fail_at(pos_, std::string(op_name_), "the pickle ends in the middle of " + std::string(op_name_) + " (truncated file?)",
            "copy or download the checkpoint again; the file is incomplete");
  }
  static inline const std::string kResaveFix =
      "this is not a state dict torch.save writes; load it in Python and save model.state_dict() with torch.save";

  // ---- input -----------------------------------------------------------------------------------
  void need(std::size_t n) const {
    if (in_.size() - pos_ < n) truncated();
  }
  std::uint8_t u8() {
    need(1);
    return static_cast<std::uint8_t>(in_[pos_++]);
  }
  std::uint64_t little_endian(std::size_t n) {
    need(n);
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < n; ++i) v |= std::uint64_t{static_cast<std::uint8_t>(in_[pos_ + i])} << (8 * i);
    pos_ += n;
    return v;
  }
  std::string bytes(std::size_t n) {
    need(n);
    std::string s(reinterpret_cast<const char*>(in_.data() + pos_), n);
    pos_ += n;
    return s;
  }
  std::string line() {
    const std::size_t start = pos_;
    while (pos_ < in_.size() && in_[pos_] != std::byte{'\n'}) ++pos_;
    if (pos_ == in_.size()) truncated();
    std::string s(reinterpret_cast<const char*>(in_.data() + start), pos_ - start);
    ++pos_;
    return s;
  }

  // ---- stack -----------------------------------------------------------------------------------
  void push(pickle_value v) {
    count_values(1);
    stack_.push_back(v);
  }
  pickle_value pop() {
    if (stack_.size() <= floor()) fail("stack underflow: " + std::string(op_name_) + " needs a value the stack does not hold");
    pickle_value v = stack_.back();
    stack_.pop_back();
    return v;
  }
  pickle_value& top() {
    if (stack_.size() <= floor()) fail("stack underflow: " + std::string(op_name_) + " needs a value the stack does not hold");
    return stack_.back();
  }
  // Values below the innermost MARK belong to an enclosing construct and may not be popped.
  std::size_t floor() const { return marks_.empty() ? 0 : marks_.back(); }
  std::vector<pickle_value> pop_mark() {
    if (marks_.empty()) fail(std::string(op_name_) + " without a preceding MARK");
    const std::size_t mark = marks_.back();
    marks_.pop_back();
    std::vector<pickle_value> items(stack_.begin() + static_cast<std::ptrdiff_t>(mark), stack_.end());
    stack_.resize(mark);
    return items;
  }

  pickle_value make(pickle_kind kind, std::int64_t integer = 0) {
    pickle_value v;
    v.kind = kind;
    v.integer = integer;
    return v;
  }
  pickle_value new_string(std::string s) {
    strings_.push_back(std::move(s));
    return make(pickle_kind::string, static_cast<std::int64_t>(strings_.size() - 1));
  }
  pickle_value new_sequence(pickle_kind kind, std::vector<pickle_value> items) {
    sequences_.push_back(std::move(items));
    sequence_origin_.push_back(op_offset_);
    return make(kind, static_cast<std::int64_t>(sequences_.size() - 1));
  }
  pickle_value new_dict() {
    dicts_.emplace_back();
    dict_origin_.push_back(op_offset_);
    return make(pickle_kind::dict, static_cast<std::int64_t>(dicts_.size() - 1));
  }
  pickle_value new_tensor(tensor_entry t) {
    count_values(t.shape.size() + t.stride.size());  // a memoized argument tuple is cheap to repeat
    tensors_.push_back(std::move(t));
    return make(pickle_kind::tensor, static_cast<std::int64_t>(tensors_.size() - 1));
  }
  const std::string& str(const pickle_value& v) const { return strings_[static_cast<std::size_t>(v.integer)]; }
  const std::vector<pickle_value>& seq(const pickle_value& v) const {
    return sequences_[static_cast<std::size_t>(v.integer)];
  }

  void expect(const pickle_value& v, pickle_kind kind, std::string_view what) const {
    if (v.kind != kind)
      fail(std::string(what) + " must be a " + std::string(pickle_kind_name(kind)) + ", not a " +
           std::string(pickle_kind_name(v.kind)));
  }

  // ---- the machine -----------------------------------------------------------------------------
  pickle_value execute() {
    while (true) {
      op_offset_ = pos_;
      op_name_ = "opcode";
      if (pos_ >= in_.size()) {
        fail_at(pos_, "STOP", "the pickle ends without a STOP opcode (truncated file?)",
                "copy or download the checkpoint again; the file is incomplete");
      }
      const std::uint8_t op = u8();
      op_name_ = pickle_opcode_name(op);
      switch (op) {
        case 0x80: {  // PROTO
          const auto protocol = u8();
          if (protocol > 5) fail("pickle protocol " + std::to_string(protocol) + " is newer than 5", kResaveFix);
          break;
        }
        case 0x95:  // FRAME: an advisory length prefix; the opcodes inside are read as usual
          if (little_endian(8) > in_.size() - pos_) truncated();
          break;
        case '.': {  // STOP
          const pickle_value root = pop();
          if (pos_ != in_.size())
            fail_at(pos_, "STOP", std::to_string(in_.size() - pos_) + " bytes follow the STOP opcode",
                    "torch.save writes nothing after STOP; the record is corrupt");
          return root;
        }
        case '(':  // MARK
          marks_.push_back(stack_.size());
          break;
        case 'N': push(make(pickle_kind::none)); break;
        case 0x88: push(make(pickle_kind::boolean, 1)); break;  // NEWTRUE
        case 0x89: push(make(pickle_kind::boolean, 0)); break;  // NEWFALSE
        case 'K': push(make(pickle_kind::integer, u8())); break;  // BININT1
        case 'M': push(make(pickle_kind::integer, static_cast<std::int64_t>(little_endian(2)))); break;  // BININT2
        case 'J':  // BININT: signed 32-bit
          push(make(pickle_kind::integer, static_cast<std::int32_t>(static_cast<std::uint32_t>(little_endian(4)))));
          break;
        case 0x8a: {  // LONG1: n-byte two's complement, little-endian
          const std::size_t n = u8();
          if (n > 8) fail("an integer of " + std::to_string(n) + " bytes does not fit in 64 bits");
          need(n);
          std::uint64_t v = little_endian(n);
          if (n > 0 && n < 8 && (v >> (8 * n - 1)) != 0) v |= ~std::uint64_t{0} << (8 * n);  // sign-extend
          push(make(pickle_kind::integer, static_cast<std::int64_t>(v)));
          break;
        }
        case 'G': {  // BINFLOAT: big-endian IEEE double
          need(8);
          std::uint64_t bits = 0;
          for (int i = 0; i < 8; ++i) bits = (bits << 8) | static_cast<std::uint8_t>(in_[pos_ + i]);
          pos_ += 8;
          pickle_value v = make(pickle_kind::real);
          v.real = std::bit_cast<double>(bits);
          push(v);
          break;
        }
        case 'X': {  // BINUNICODE
          const auto n = little_endian(4);
          push(new_string(bytes(static_cast<std::size_t>(n))));
          break;
        }
        case 0x8c:  // SHORT_BINUNICODE
        case 'U': {  // SHORT_BINSTRING
          const std::size_t n = u8();
          push(new_string(bytes(n)));
          break;
        }
        case ')': push(new_sequence(pickle_kind::tuple, {})); break;
        case ']': push(new_sequence(pickle_kind::list, {})); break;
        case '}': push(new_dict()); break;
        case 't': push(new_sequence(pickle_kind::tuple, pop_mark())); break;
        case 0x85:
        case 0x86:
        case 0x87: {  // TUPLE1..3
          const std::size_t n = op - 0x84u;
          if (stack_.size() < floor() + n)
            fail("stack underflow: " + std::string(op_name_) + " needs " + std::to_string(n) + " values");
          std::vector<pickle_value> items(stack_.end() - static_cast<std::ptrdiff_t>(n), stack_.end());
          stack_.resize(stack_.size() - n);
          push(new_sequence(pickle_kind::tuple, std::move(items)));
          break;
        }
        case 'a': {  // APPEND
          const pickle_value item = pop();
          const pickle_value& list = top();
          expect(list, pickle_kind::list, "the target of APPEND");
          sequences_[static_cast<std::size_t>(list.integer)].push_back(item);
          break;
        }
        case 'e': {  // APPENDS
          auto items = pop_mark();
          const pickle_value& list = top();
          expect(list, pickle_kind::list, "the target of APPENDS");
          auto& target = sequences_[static_cast<std::size_t>(list.integer)];
          target.insert(target.end(), items.begin(), items.end());
          break;
        }
        case 's': {  // SETITEM
          const pickle_value value = pop();
          const pickle_value key = pop();
          const pickle_value& dict = top();
          expect(dict, pickle_kind::dict, "the target of SETITEM");
          dicts_[static_cast<std::size_t>(dict.integer)].emplace_back(key, value);
          break;
        }
        case 'u': {  // SETITEMS
          auto items = pop_mark();
          if (items.size() % 2 != 0) fail("SETITEMS needs key/value pairs but got an odd number of values");
          const pickle_value& dict = top();
          expect(dict, pickle_kind::dict, "the target of SETITEMS");
          auto& target = dicts_[static_cast<std::size_t>(dict.integer)];
          for (std::size_t i = 0; i < items.size(); i += 2) target.emplace_back(items[i], items[i + 1]);
          break;
        }
        case 'q': memo_put(u8()); break;                                       // BINPUT
        case 'r': memo_put(static_cast<std::uint32_t>(little_endian(4))); break;  // LONG_BINPUT
        case 0x94: memo_put(static_cast<std::uint32_t>(memo_.size())); break;   // MEMOIZE
        case 'h': memo_get(u8()); break;                                       // BINGET
        case 'j': memo_get(static_cast<std::uint32_t>(little_endian(4))); break;  // LONG_BINGET
        case 'c': {  // GLOBAL "module\nname\n"
          std::string module = line();
          std::string name = line();
          push(resolve_global(module, name));
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          const pickle_value name = pop();
          const pickle_value module = pop();
          expect(module, pickle_kind::string, "the module of STACK_GLOBAL");
          expect(name, pickle_kind::string, "the name of STACK_GLOBAL");
          push(resolve_global(str(module), str(name)));
          break;
        }
        case 'Q': {  // BINPERSID
          const pickle_value pid = pop();
          push(persistent_storage(pid));
          break;
        }
        case 'R': {  // REDUCE
          const pickle_value args = pop();
          const pickle_value callable = pop();
          push(reduce(callable, args));
          break;
        }
        case 0x81: {  // NEWOBJ: cls.__new__(cls, *args); only OrderedDict() is meaningful here
          const pickle_value args = pop();
          const pickle_value cls = pop();
          if (cls.kind != pickle_kind::global || cls.global != pickle_global::ordered_dict)
            fail("NEWOBJ can only create a collections.OrderedDict, not a " + std::string(pickle_kind_name(cls.kind)));
          expect(args, pickle_kind::tuple, "the arguments of NEWOBJ");
          if (!seq(args).empty()) fail("collections.OrderedDict is created with arguments; torch.save never does that");
          push(new_dict());
          break;
        }
        case 'b': {  // BUILD: only the instance dict of an OrderedDict (state_dict()._metadata)
          const pickle_value state = pop();
          const pickle_value& target = top();
          if (target.kind != pickle_kind::dict)
            fail("BUILD can only set the attributes of an OrderedDict, not of a " +
                 std::string(pickle_kind_name(target.kind)));
          if (state.kind != pickle_kind::dict && state.kind != pickle_kind::none)
            fail("the state BUILD gives an OrderedDict must be a dict, not a " + std::string(pickle_kind_name(state.kind)));
          break;  // `_metadata` (module versions) says nothing about the tensors: ignored
        }
        default: {
          const auto name = pickle_opcode_name(op);
          char hex[8];
          std::snprintf(hex, sizeof hex, "0x%02x", op);
          fail_at(op_offset_, name.empty() ? std::string(hex) : std::string(name),
                  name.empty() ? "byte " + std::string(hex) + " is not a pickle opcode"
                               : "opcode " + std::string(name) + " (" + hex +
                                     ") is outside the weights-only set torch.save uses for state dicts",
                  kResaveFix);
        }
      }
    }
  }

  void memo_put(std::uint32_t index) {
    count_values(1);
    memo_[index] = top();
  }
  void count_values(std::size_t n) {
    values_created_ += n;
    if (values_created_ > limits_.max_values)
      fail("the pickle creates more than " + std::to_string(limits_.max_values) + " values",
           "raise pickle_limits::max_values if this checkpoint is trusted to be that large");
  }
  void memo_get(std::uint32_t index) {
    const auto it = memo_.find(index);
    if (it == memo_.end())
      fail("memo index " + std::to_string(index) + " was never stored (the memo holds " +
           std::to_string(memo_.size()) + " entries)");
    push(it->second);
  }

  pickle_value resolve_global(const std::string& module, const std::string& name) {
    pickle_value v = make(pickle_kind::global);
    if (module == "collections" && name == "OrderedDict") {
      v.global = pickle_global::ordered_dict;
      return v;
    }
    if (module == "torch._utils" && name == "_rebuild_tensor_v2") {
      v.global = pickle_global::rebuild_tensor_v2;
      return v;
    }
    if (module == "torch._utils" && name == "_rebuild_parameter") {
      v.global = pickle_global::rebuild_parameter;
      return v;
    }
    if (module == "torch") {
      for (const auto& [cls, type] : torch_storage_classes) {
        if (name == cls) {
          v.global = pickle_global::storage_class;
          v.storage_type = type;
          return v;
        }
      }
    }
    fail_at(op_offset_, module + "." + name,
            "global '" + module + "." + name +
                "' is not allowed: a weights-only checkpoint may name only collections.OrderedDict, "
                "torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter and the torch.*Storage classes, "
                "and distorch never imports or runs anything a pickle names",
            "if the file is trusted, load it in Python and save only tensors: torch.save(model.state_dict(), path)");
  }

  // ('storage', torch.XStorage, key, location, numel): how torch.save names a storage record.
  pickle_value persistent_storage(const pickle_value& pid) {
    expect(pid, pickle_kind::tuple, "the persistent id");
    const auto& f = seq(pid);
    if (f.size() != 5) fail("a storage persistent id has 5 fields, this one has " + std::to_string(f.size()));
    expect(f[0], pickle_kind::string, "field 0 of the persistent id");
    if (str(f[0]) != "storage") fail("persistent id of type '" + str(f[0]) + "' is not a storage");
    if (f[1].kind != pickle_kind::global || f[1].global != pickle_global::storage_class)
      fail("field 1 of the persistent id must be a torch.*Storage class");
    expect(f[2], pickle_kind::string, "the storage key");
    expect(f[3], pickle_kind::string, "the storage location");
    expect(f[4], pickle_kind::integer, "the storage size");
    const std::string& key = str(f[2]);
    // The key becomes a record name (data/<key>): keep it to the characters torch writes.
    if (key.empty() || key.size() > 64 ||
        key.find_first_not_of("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-") != std::string::npos)
      fail("storage key '" + key.substr(0, 64) + "' is not a plain record name");
    const dtype type = f[1].storage_type;
    const std::int64_t numel = f[4].integer;
    if (numel < 0 || static_cast<std::uint64_t>(numel) > std::uint64_t(std::numeric_limits<std::int64_t>::max()) / dtype_size(type))
      fail("storage '" + key + "' claims " + std::to_string(numel) + " elements, which is no valid byte size");
    const auto [it, fresh] = storage_index_.try_emplace(key, storages_.size());
    if (fresh) {
      storages_.push_back({key, type, static_cast<std::uint64_t>(numel), str(f[3])});
    } else {
      const auto& known = storages_[it->second];
      if (known.type != type || known.numel != static_cast<std::uint64_t>(numel))
        fail("storage '" + key + "' is named twice with different types or sizes (" +
             std::string(dtype_name(known.type)) + "[" + std::to_string(known.numel) + "] and " +
             std::string(dtype_name(type)) + "[" + std::to_string(numel) + "])");
    }
    return make(pickle_kind::storage, static_cast<std::int64_t>(it->second));
  }

  pickle_value reduce(const pickle_value& callable, const pickle_value& args) {
    if (callable.kind != pickle_kind::global)
      fail("REDUCE calls a " + std::string(pickle_kind_name(callable.kind)) + "; only allowlisted globals can be called");
    expect(args, pickle_kind::tuple, "the arguments of REDUCE");
    const auto& a = seq(args);
    switch (callable.global) {
      case pickle_global::ordered_dict:
        if (!a.empty()) fail("collections.OrderedDict is called with arguments; torch.save never does that");
        return new_dict();
      case pickle_global::rebuild_tensor_v2: return rebuild_tensor(a);
      case pickle_global::rebuild_parameter: {
        if (a.size() != 3) fail("_rebuild_parameter takes 3 arguments, got " + std::to_string(a.size()));
        expect(a[0], pickle_kind::tensor, "argument 1 of _rebuild_parameter (data)");
        expect(a[1], pickle_kind::boolean, "argument 2 of _rebuild_parameter (requires_grad)");
        expect_no_hooks(a[2], "_rebuild_parameter");
        tensor_entry t = tensors_[static_cast<std::size_t>(a[0].integer)];
        t.requires_grad = a[1].integer != 0;
        t.parameter = true;
        return new_tensor(std::move(t));
      }
      case pickle_global::storage_class: break;
    }
    fail("a torch storage class is called; storages may appear only inside persistent ids");
  }

  void expect_no_hooks(const pickle_value& v, std::string_view fn) const {
    expect(v, pickle_kind::dict, "the backward_hooks argument of " + std::string(fn));
    if (!dicts_[static_cast<std::size_t>(v.integer)].empty())
      fail(std::string(fn) + " is given backward hooks, which are Python code; distorch loads data only");
  }

  std::vector<std::int64_t> int_tuple(const pickle_value& v, std::string_view what) const {
    expect(v, pickle_kind::tuple, what);
    const auto& items = seq(v);
    if (items.size() > limits_.max_dims)
      fail(std::string(what) + " has " + std::to_string(items.size()) + " dimensions, over the limit of " +
           std::to_string(limits_.max_dims));
    std::vector<std::int64_t> out;
    out.reserve(items.size());
    for (const auto& item : items) {
      expect(item, pickle_kind::integer, std::string("every entry of ") + std::string(what));
      if (item.integer < 0) fail(std::string(what) + " holds the negative value " + std::to_string(item.integer));
      out.push_back(item.integer);
    }
    return out;
  }

  // _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
  pickle_value rebuild_tensor(const std::vector<pickle_value>& a) {
    if (a.size() != 6 && a.size() != 7)
      fail("_rebuild_tensor_v2 takes 6 or 7 arguments, got " + std::to_string(a.size()));
    expect(a[0], pickle_kind::storage, "argument 1 of _rebuild_tensor_v2 (storage)");
    expect(a[1], pickle_kind::integer, "argument 2 of _rebuild_tensor_v2 (storage_offset)");
    tensor_entry t;
    t.storage = static_cast<std::size_t>(a[0].integer);
    t.storage_offset = a[1].integer;
    t.shape = int_tuple(a[2], "argument 3 of _rebuild_tensor_v2 (size)");
    t.stride = int_tuple(a[3], "argument 4 of _rebuild_tensor_v2 (stride)");
    expect(a[4], pickle_kind::boolean, "argument 5 of _rebuild_tensor_v2 (requires_grad)");
    t.requires_grad = a[4].integer != 0;
    expect_no_hooks(a[5], "_rebuild_tensor_v2");
    if (a.size() == 7 && a[6].kind != pickle_kind::none &&
        !(a[6].kind == pickle_kind::dict && dicts_[static_cast<std::size_t>(a[6].integer)].empty()))
      fail("_rebuild_tensor_v2 is given tensor metadata, which distorch cannot apply");
    if (t.shape.size() != t.stride.size())
      fail("size has " + std::to_string(t.shape.size()) + " dimensions but stride has " + std::to_string(t.stride.size()));
    check_bounds(t);
    return new_tensor(std::move(t));
  }

  // Every element the view can address must lie inside the storage.
  void check_bounds(const tensor_entry& t) const {
    const auto& storage = storages_[t.storage];
    if (t.storage_offset < 0) fail("storage_offset " + std::to_string(t.storage_offset) + " is negative");
    std::int64_t numel = 1, last = t.storage_offset;
    bool empty = false;
    for (std::size_t d = 0; d < t.shape.size(); ++d) {
      if (t.shape[d] == 0) empty = true;
      if (__builtin_mul_overflow(numel, t.shape[d], &numel))
        fail("the element count of the tensor overflows 64 bits");
    }
    if (!empty) {
      for (std::size_t d = 0; d < t.shape.size(); ++d) {
        std::int64_t reach = 0;
        if (__builtin_mul_overflow(t.shape[d] - 1, t.stride[d], &reach) || __builtin_add_overflow(last, reach, &last))
          fail("the extent of the tensor view overflows 64 bits");
      }
    }
    const auto limit = static_cast<std::int64_t>(storage.numel);
    if (empty ? t.storage_offset > limit : last >= limit)
      fail("the tensor view (offset " + std::to_string(t.storage_offset) + ", last element " + std::to_string(last) +
               ") reaches past the end of storage '" + storage.key + "' of " + std::to_string(storage.numel) + " elements");
  }

  // ---- the result ------------------------------------------------------------------------------
  // Containers are walked once each. Reaching one again (a dict saved under two keys, or a list
  // that contains itself) is harmless when it named no tensor and an error when it did, since its
  // tensors would need two names; walking it again would also let a few bytes of shared
  // references expand exponentially.
  enum class walk_state : std::uint8_t { unseen, open, no_tensors, with_tensors };

  struct flattener {
    const state_dict_unpickler& self;
    pickled_state_dict out;
    std::unordered_set<std::string> names;
    std::vector<walk_state> dict_state, sequence_state;
    std::size_t name_bytes = 0;
    std::size_t values = 0;

    [[noreturn]] void fail_in(std::size_t origin, std::string subject, std::string problem, std::string fix) const {
      self.fail_at(origin, std::move(subject), std::move(problem), std::move(fix));
    }

    std::string child_name(const std::string& prefix, const std::string& key, std::size_t origin) const {
      if ((prefix.empty() ? key.size() : prefix.size() + 1 + key.size()) > self.limits_.max_name_length)
        fail_in(origin, (prefix.empty() ? key : prefix).substr(0, 64) + "...",
                "a tensor name is longer than the limit of " + std::to_string(self.limits_.max_name_length) + " bytes",
                "raise pickle_limits::max_name_length if such names are expected");
      return prefix.empty() ? key : prefix + "." + key;
    }

    static bool may_hold_tensors(const pickle_value& v) {
      return v.kind == pickle_kind::tensor || v.kind == pickle_kind::dict || v.kind == pickle_kind::list ||
             v.kind == pickle_kind::tuple;
    }

    void visit(const pickle_value& v, const std::string& name, std::size_t depth, std::size_t origin) {
      if (v.kind == pickle_kind::tensor) return emit(v, name, origin);
      const bool is_dict = v.kind == pickle_kind::dict;
      const auto index = static_cast<std::size_t>(v.integer);
      auto& state = (is_dict ? dict_state : sequence_state)[index];
      const std::size_t here = (is_dict ? self.dict_origin_ : self.sequence_origin_)[index];
      if (state == walk_state::open || state == walk_state::no_tensors) return;
      if (state == walk_state::with_tensors)
        fail_in(here, name.empty() ? std::string("<root>") : name.substr(0, 64),
                "the same " + std::string(pickle_kind_name(v.kind)) +
                    " of tensors appears twice in the checkpoint, so its tensors would have two names",
                "save each sub-dict once, e.g. torch.save(model.state_dict(), path)");
      if (depth > self.limits_.max_nesting)
        fail_in(here, name.substr(0, 64),
                "containers are nested more than " + std::to_string(self.limits_.max_nesting) + " levels deep",
                "raise pickle_limits::max_nesting if the checkpoint is trusted, or save a flat state dict");
      state = walk_state::open;
      const std::size_t before = out.tensors.size();
      if (is_dict) {
        for (const auto& [key, value] : self.dicts_[index]) {
          if (!may_hold_tensors(value)) continue;  // epochs, learning rates, config strings...
          std::string component;
          if (key.kind == pickle_kind::string) component = self.str(key);
          else if (key.kind == pickle_kind::integer) component = std::to_string(key.integer);
          else
            fail_in(here, name.empty() ? std::string("<root>") : name.substr(0, 64),
                    "a dict key of type " + std::string(pickle_kind_name(key.kind)) + " cannot name a tensor",
                    "save a dict whose keys are strings, such as model.state_dict()");
          visit(value, child_name(name, component, here), depth + 1, here);
        }
      } else {
        const auto& items = self.sequences_[index];
        for (std::size_t i = 0; i < items.size(); ++i)
          if (may_hold_tensors(items[i])) visit(items[i], child_name(name, std::to_string(i), here), depth + 1, here);
      }
      state = out.tensors.size() == before ? walk_state::no_tensors : walk_state::with_tensors;  // vectors never grow here
    }

    void emit(const pickle_value& v, const std::string& name, std::size_t origin) {
      if (name.empty())
        fail_in(origin, "<root>", "a tensor has an empty name", "save a dict of named tensors such as model.state_dict()");
      if (!names.insert(name).second)
        fail_in(origin, name, "two tensors flatten to the same name",
                "rename the keys so that nested names joined by '.' stay unique");
      const auto& t = self.tensors_[static_cast<std::size_t>(v.integer)];
      name_bytes += name.size();
      values += 1 + t.shape.size() + t.stride.size();
      if (name_bytes > self.limits_.max_total_name_bytes || values > self.limits_.max_values)
        fail_in(origin, name, "the flattened state dict is larger than pickle_limits allows",
                "raise pickle_limits::max_total_name_bytes or max_values if the checkpoint is trusted");
      out.tensors.push_back({name, t.storage, self.storages_[t.storage].type, t.shape, t.stride, t.storage_offset,
                             t.requires_grad, t.parameter});
    }
  };

  pickled_state_dict flatten(const pickle_value& root) const {
    if (root.kind != pickle_kind::dict)
      fail_at(0, std::string(source_),
              "the checkpoint holds a " + std::string(pickle_kind_name(root.kind)) + ", not a dict of tensors",
              "save a dict such as model.state_dict() or {'model': model.state_dict()}");
    flattener f{*this, {}, {}, std::vector<walk_state>(dicts_.size()), std::vector<walk_state>(sequences_.size()), 0, 0};
    f.visit(root, std::string{}, 0, 0);
    f.out.storages = storages_;
    return std::move(f.out);
  }

  std::span<const std::byte> in_;
  std::string_view source_;
  pickle_limits limits_;
  std::size_t pos_ = 0;
  std::size_t op_offset_ = 0;
  std::string_view op_name_ = "opcode";
  std::size_t values_created_ = 0;

  std::vector<pickle_value> stack_;
  std::vector<std::size_t> marks_;
  std::unordered_map<std::uint32_t, pickle_value> memo_;
  std::vector<std::string> strings_;
  std::vector<std::vector<pickle_value>> sequences_;
  std::vector<std::size_t> sequence_origin_;
  std::vector<std::vector<std::pair<pickle_value, pickle_value>>> dicts_;
  std::vector<std::size_t> dict_origin_;
  std::vector<tensor_entry> tensors_;
  std::vector<pickled_storage> storages_;
  std::unordered_map<std::string, std::size_t> storage_index_;
};

}  // namespace detail

/// Reads the `data.pkl` pickle of a PyTorch zip checkpoint into a description of its tensors and
/// storages, without executing anything. Nested dicts (`{"model": {...}}`) and lists flatten to
/// dotted names (`model.layer.weight`, `layers.0.weight`); entries that hold no tensor (epochs,
/// learning rates, strings) are skipped. `source` names the input in error messages.
///
/// Throws `format_error` with the byte offset for a truncated pickle, an opcode outside the
/// weights-only set, a memo index never stored, stack underflow, a global not on the allowlist,
/// arguments of the wrong type, a tensor view outside its storage, and inputs over `limits`.
/// \code
///   auto sd = distorch::unpickle_state_dict(data_pkl_bytes, "model.pt/data.pkl");
///   const distorch::pickled_tensor& w = sd.tensors.front();
///   const distorch::pickled_storage& s = sd.storages[w.storage];   // record "data/" + s.key
/// \endcode
inline pickled_state_dict unpickle_state_dict(std::span<const std::byte> pickle, std::string_view source = "data.pkl",
                                              const pickle_limits& limits = {}) {
  return detail::state_dict_unpickler(pickle, source, limits).run();
}

}  // namespace distorch::inline v0
