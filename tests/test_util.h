// Helpers shared by the tests: paths to tests/data/ and temp files.
#ifndef APESERVE_TESTS_TEST_UTIL_H_
#define APESERVE_TESTS_TEST_UTIL_H_

#include <unistd.h>
#include <cstdio>
#include <cstdlib>
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

}  // namespace ape::testing

#endif  // APESERVE_TESTS_TEST_UTIL_H_
