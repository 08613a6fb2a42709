// Emits pickle opcodes by hand so unit tests can build exactly the streams they need, including
// malformed ones. Opcode bytes as in CPython's Lib/pickletools.py.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace adapter_job::testing {

class PickleBuilder {
 public:
  PickleBuilder& Proto(uint8_t v) { return Op(0x80).U8(v); }
  PickleBuilder& Frame(uint64_t n) { return Op(0x95).LE(n, 8); }
  PickleBuilder& Op(uint8_t op) { return U8(op); }
  PickleBuilder& U8(uint8_t v) {
    bytes_.push_back(static_cast<std::byte>(v));
    return *this;
  }
  PickleBuilder& LE(uint64_t v, int width) {
    for (int i = 0; i < width; ++i) U8(static_cast<uint8_t>(v >> (8 * i)));
    return *this;
  }
  PickleBuilder& Raw(std::string_view s) {
    for (char c : s) U8(static_cast<uint8_t>(c));
    return *this;
  }
  PickleBuilder& Str(std::string_view s) {
    return Op(0x8c).U8(static_cast<uint8_t>(s.size())).Raw(s);
  }
  PickleBuilder& Int1(uint8_t v) { return Op('K').U8(v); }
  PickleBuilder& Int4(int32_t v) { return Op('J').LE(static_cast<uint32_t>(v), 4); }
  PickleBuilder& Long1(std::span<const uint8_t> le) {
    Op(0x8a).U8(static_cast<uint8_t>(le.size()));
    for (uint8_t b : le) U8(b);
    return *this;
  }
  PickleBuilder& StackGlobal(std::string_view module, std::string_view name) {
    return Str(module).Str(name).Op(0x93);
  }
  PickleBuilder& TextGlobal(std::string_view module, std::string_view name) {
    return Op('c').Raw(module).Raw("\n").Raw(name).Raw("\n");
  }
  PickleBuilder& Mark() { return Op('('); }
  PickleBuilder& Memoize() { return Op(0x94); }
  PickleBuilder& BinGet(uint8_t i) { return Op('h').U8(i); }
  PickleBuilder& Stop() { return Op('.'); }
  // torch.Size((dims...)) as pickled by torch: REDUCE(torch.Size, ((d0, ...),)).
  PickleBuilder& TorchSize(std::span<const int64_t> dims) {
    StackGlobal("torch", "Size").Mark();
    for (int64_t d : dims) Int4(static_cast<int32_t>(d));
    return Op('t').Op(0x85).Op('R');
  }

  const std::vector<std::byte>& bytes() const { return bytes_; }

 private:
  std::vector<std::byte> bytes_;
};

}  // namespace adapter_job::testing
