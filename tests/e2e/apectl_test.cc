// apectl as a user runs it: the binary, its stdout and exit codes.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "tests/test_util.h"

namespace ape {
namespace {

using ::ape::testing::ReadAll;
using ::ape::testing::TestData;

struct Result {
  int exit_code;
  std::string out;
};

Result RunCmd(const std::string& cmd) {
  Result r;
  FILE* p = popen(cmd.c_str(), "r");
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::string Apectl() { return std::string(APE_BIN_DIR) + "/apectl"; }

std::string Quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'')
      out += "'\\''";
    else
      out += c;
  }
  return out + "'";
}

TEST(ApectlTest, RunPrintsLlama2cGoldenText) {
  auto golden = nlohmann::json::parse(ReadAll(TestData("stories260K.golden.json")));
  for (const auto& c : golden["cases"]) {
    const int steps = c["steps"];
    const int prompt_len = c["prompt_tokens"].size();
    std::string cmd = Apectl() + " run --model " + TestData("stories260K.bin") + " --tokenizer " +
                      TestData("tok512.bin") + " --prompt " + Quote(c["prompt"]) + " --max-tokens " +
                      std::to_string(steps - prompt_len + 1) + " --temperature 0 2>/dev/null";
    Result r = RunCmd(cmd);
    EXPECT_EQ(r.exit_code, 0);
    EXPECT_EQ(r.out, c["text"].get<std::string>() + "\n") << cmd;
  }
}

TEST(ApectlTest, InfoDescribesTheGgufFixture) {
  Result r =
      RunCmd(Apectl() + " info --model " + TestData("format-fixtures/llama-2-tiny-random.gguf") + " 2>/dev/null");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("architecture:  llama"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("vocab:         32000"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("fingerprint:"), std::string::npos);
}

TEST(ApectlTest, BrokenModelFailsWithMessage) {
  testing::TempFile broken(ReadAll(TestData("format-fixtures/llama-2-tiny-random.gguf")).substr(0, 5000));
  Result r = RunCmd(Apectl() + " info --model " + broken.path() + " 2>&1");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.out.find(broken.path()), std::string::npos) << r.out;
  EXPECT_TRUE(r.out.find("truncated") != std::string::npos || r.out.find("exceeds the file") != std::string::npos)
      << r.out;
}

// --dtype is checked before any call: no server is needed to refuse it.
TEST(ApectlTest, BadDtypeIsRefusedBeforeAnyCall) {
  testing::TempFile doc("Lily had a big red ball.");
  for (const char* cmd : {" encode --dtype fp16 --encoder 127.0.0.1:1 ",
                          " generate --dtype unspecified --decoder 127.0.0.1:1 --query q "}) {
    Result r = RunCmd(Apectl() + cmd + doc.path() + " 2>&1");
    EXPECT_EQ(r.exit_code, 2) << cmd << r.out;
    EXPECT_NE(r.out.find("--dtype must be float16, float32 or int8"), std::string::npos) << r.out;
  }
}

}  // namespace
}  // namespace ape
