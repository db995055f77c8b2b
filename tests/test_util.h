// Helpers shared by the tests: paths to tests/data/ and temp files.
#ifndef APESERVE_TESTS_TEST_UTIL_H_
#define APESERVE_TESTS_TEST_UTIL_H_

#include <gtest/gtest.h>
#include <unistd.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

namespace ape::testing {

// A file of tests/data/ (see its README for where each came from).
inline std::string TestData(const std::string& name) { return std::string(APE_TEST_DATA) + "/" + name; }

inline std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A file in a private temp dir, removed when the object goes away.
class TempFile {
 public:
  explicit TempFile(const std::string& contents, const std::string& suffix = "") {
    char dir[] = "/tmp/apeserve-test-XXXXXX";
    dir_ = mkdtemp(dir);
    path_ = dir_ + "/file" + suffix;
    std::ofstream(path_, std::ios::binary) << contents;
  }
  ~TempFile() {
    std::remove(path_.c_str());
    rmdir(dir_.c_str());
  }
  const std::string& path() const { return path_; }

 private:
  std::string dir_, path_;
};

// stories260K with its window widened to `context_length`: the header's
// seq_len, and the legacy freq_cis table at the end grown to match (it is
// read and ignored). Long prompts are then inside the window, and slow.
inline std::string WideWindowModel(int context_length) {
  std::string bytes = ReadAll(TestData("stories260K.bin"));
  int32_t h[7];  // dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (> 0: tied), seq_len
  std::memcpy(h, bytes.data(), sizeof(h));
  EXPECT_GT(h[5], 0);  // tied classifier: freq_cis is the last array
  bytes.append(static_cast<size_t>(context_length - h[6]) * (h[0] / h[3]) * sizeof(float), '\0');
  h[6] = context_length;
  std::memcpy(bytes.data(), h, sizeof(h));
  return bytes;
}

// The peak resident memory of a process (VmHWM in /proc/<pid>/status), bytes.
inline int64_t PeakRss(pid_t pid) {
  const std::string status = ReadAll("/proc/" + std::to_string(pid) + "/status");
  const size_t at = status.find("VmHWM:");
  return at == std::string::npos ? -1 : std::stoll(status.substr(at + 6)) * 1024;
}

}  // namespace ape::testing

#endif  // APESERVE_TESTS_TEST_UTIL_H_
