// A tiny GGUF v3 writer for tests: builds files the parser must read back,
// independently of the parser's code.
#ifndef APESERVE_TESTS_GGUF_WRITER_H_
#define APESERVE_TESTS_GGUF_WRITER_H_

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace ape::testing {

class GgufWriter {
 public:
  template <typename T>
  static void Put(std::string& out, T v) {
    out.append(reinterpret_cast<const char*>(&v), sizeof(T));
  }
  static void PutStr(std::string& out, const std::string& s) {
    Put<uint64_t>(out, s.size());
    out += s;
  }

  // Raw key/value: `value` is the already-encoded payload of type `type`.
  void KvRaw(const std::string& key, uint32_t type, const std::string& value) {
    PutStr(kv_, key);
    Put<uint32_t>(kv_, type);
    kv_ += value;
    ++n_kv_;
  }
  void KvU32(const std::string& k, uint32_t v) {
    std::string s;
    Put(s, v);
    KvRaw(k, 4, s);
  }
  void KvF32(const std::string& k, float v) {
    std::string s;
    Put(s, v);
    KvRaw(k, 6, s);
  }
  void KvBool(const std::string& k, bool v) {
    std::string s;
    Put<uint8_t>(s, v);
    KvRaw(k, 7, s);
  }
  void KvStr(const std::string& k, const std::string& v) {
    std::string s;
    PutStr(s, v);
    KvRaw(k, 8, s);
  }
  void KvStrArray(const std::string& k, const std::vector<std::string>& v) {
    std::string s;
    Put<uint32_t>(s, 8);
    Put<uint64_t>(s, v.size());
    for (auto& e : v) PutStr(s, e);
    KvRaw(k, 9, s);
  }
  void KvF32Array(const std::string& k, const std::vector<float>& v) {
    std::string s;
    Put<uint32_t>(s, 6);
    Put<uint64_t>(s, v.size());
    for (float e : v) Put(s, e);
    KvRaw(k, 9, s);
  }
  void KvI32Array(const std::string& k, const std::vector<int32_t>& v) {
    std::string s;
    Put<uint32_t>(s, 5);
    Put<uint64_t>(s, v.size());
    for (int32_t e : v) Put(s, e);
    KvRaw(k, 9, s);
  }

  // A tensor with dims (dims[0] fastest) and raw data bytes of ggml `type`.
  void Tensor(const std::string& name, std::vector<uint64_t> dims, uint32_t type, const std::string& data) {
    tensors_.push_back({name, std::move(dims), type, data});
  }
  void TensorF32(const std::string& name, std::vector<uint64_t> dims, const std::vector<float>& v) {
    std::string s(reinterpret_cast<const char*>(v.data()), v.size() * 4);
    Tensor(name, std::move(dims), 0, s);
  }

  std::string Finish(uint32_t alignment = 32) const {
    std::string out;
    Put<uint32_t>(out, 0x46554747);
    Put<uint32_t>(out, 3);
    Put<uint64_t>(out, tensors_.size());
    Put<uint64_t>(out, n_kv_);
    out += kv_;
    uint64_t offset = 0;
    std::vector<uint64_t> offsets;
    for (auto& t : tensors_) {
      PutStr(out, t.name);
      Put<uint32_t>(out, t.dims.size());
      for (auto d : t.dims) Put<uint64_t>(out, d);
      Put<uint32_t>(out, t.type);
      Put<uint64_t>(out, offset);
      offsets.push_back(offset);
      offset += (t.data.size() + alignment - 1) / alignment * alignment;
    }
    out.resize((out.size() + alignment - 1) / alignment * alignment, '\0');
    size_t base = out.size();
    for (size_t i = 0; i < tensors_.size(); ++i) {
      out.resize(base + offsets[i], '\0');
      out += tensors_[i].data;
    }
    return out;
  }

 private:
  struct T {
    std::string name;
    std::vector<uint64_t> dims;
    uint32_t type;
    std::string data;
  };
  std::string kv_;
  uint64_t n_kv_ = 0;
  std::vector<T> tensors_;
};

}  // namespace ape::testing

#endif  // APESERVE_TESTS_GGUF_WRITER_H_
