// ApePreset: reading <model>.ape.json (versions 1 and 2) from real files,
// and For() (the table interpolated in log2 of the key, clamped).
#include "common/engine/ape_preset.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "tests/test_util.h"

namespace ape {
namespace {

using ::ape::testing::TempFile;

absl::StatusOr<ApePreset> Load(const std::string& json) {
  TempFile f(json, ".ape.json");
  return LoadApePreset(f.path());
}

// Rows 2 -> (0.6, 0.8), 8 -> (1.0, 1.2), 32 -> (0.5, 1.0), keyed by `by`.
std::string ThreeRows(const std::string& by) {
  return "{\"version\": 2, \"temperature\": 0.7, \"scale\": 0.95, \"by\": \"" + by +
         "\", \"table\": ["
         "{\"" +
         by +
         "\": 2, \"temperature\": 0.6, \"scale\": 0.8},"
         "{\"" +
         by +
         "\": 8, \"temperature\": 1.0, \"scale\": 1.2},"
         "{\"" +
         by +
         "\": 32, \"temperature\": 0.5, \"scale\": 1.0}],"
         "\"source\": \"test\", \"interpolation\": \"ignored\"}";
}

void ExpectPair(std::pair<float, float> got, double t, double s) {
  EXPECT_NEAR(got.first, t, 1e-6);
  EXPECT_NEAR(got.second, s, 1e-6);
}

TEST(ApePresetTest, VersionOneIsOneFixedPair) {
  auto p = Load(R"({"temperature": 0.8, "scale": 0.7, "source": "x", "grid": [1, 2]})");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->version, 1);
  EXPECT_TRUE(p->table.empty());
  for (int n : {0, 1, 2, 8, 100, 100000}) ExpectPair(p->For(n, 17 * n), 0.8, 0.7);

  auto explicit_v1 = Load(R"({"version": 1, "temperature": 0.5, "scale": 1.5})");
  ASSERT_TRUE(explicit_v1.ok()) << explicit_v1.status();
  ExpectPair(explicit_v1->For(64, 1000), 0.5, 1.5);

  // Version 1 may leave a value out: the default (0.9) applies.
  auto partial = Load(R"({"temperature": 0.4})");
  ASSERT_TRUE(partial.ok()) << partial.status();
  ExpectPair(partial->For(4, 60), 0.4, 0.9);
}

TEST(ApePresetTest, CheckedInPresetLoads) {
  auto p = LoadApePreset(std::string(APE_SOURCE_DIR) + "/models/apeserve-qa.gguf.ape.json");
  ASSERT_TRUE(p.ok()) << p.status();
  const auto [t, s] = p->For(8, 130);
  EXPECT_GE(t, kMinApeParam);
  EXPECT_LE(t, kMaxApeParam);
  EXPECT_GE(s, kMinApeParam);
  EXPECT_LE(s, kMaxApeParam);
}

TEST(ApePresetTest, VersionTwoRowsAreExact) {
  auto p = Load(ThreeRows("contexts"));
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->version, 2);
  EXPECT_EQ(p->by, ApePresetKey::kContexts);
  ASSERT_EQ(p->table.size(), 3u);
  EXPECT_EQ(p->table[1].at, 8);
  ExpectPair(p->For(2, 999), 0.6, 0.8);
  ExpectPair(p->For(8, 1), 1.0, 1.2);
  ExpectPair(p->For(32, 0), 0.5, 1.0);
}

TEST(ApePresetTest, InterpolatesLinearlyInLog2) {
  auto p = Load(ThreeRows("contexts"));
  ASSERT_TRUE(p.ok()) << p.status();
  // 4 is halfway between 2 and 8 in log2; 16 halfway between 8 and 32.
  ExpectPair(p->For(4, 0), 0.8, 1.0);
  ExpectPair(p->For(16, 0), 0.75, 1.1);
  // 3: log2(3/2) / log2(8/2) of the way, not (3-2)/(8-2).
  const double f = std::log2(1.5) / 2;
  ExpectPair(p->For(3, 0), 0.6 + f * 0.4, 0.8 + f * 0.4);
  EXPECT_GT(std::abs(p->For(3, 0).first - (0.6 + 0.4 / 6)), 0.01);
  // Between rows the values stay between the rows' values.
  for (int n = 2; n <= 32; ++n) {
    const auto [t, s] = p->For(n, 0);
    EXPECT_GE(t, 0.5f - 1e-6f) << n;
    EXPECT_LE(t, 1.0f + 1e-6f) << n;
    EXPECT_GE(s, 0.8f - 1e-6f) << n;
    EXPECT_LE(s, 1.2f + 1e-6f) << n;
  }
}

TEST(ApePresetTest, ClampsAtTheEndsAndFallsBackAtZero) {
  auto p = Load(ThreeRows("contexts"));
  ASSERT_TRUE(p.ok()) << p.status();
  ExpectPair(p->For(1, 10), 0.6, 0.8);   // below the first row
  ExpectPair(p->For(33, 10), 0.5, 1.0);  // above the last row
  ExpectPair(p->For(1 << 20, 1 << 30), 0.5, 1.0);
  ExpectPair(p->For(0, 0), 0.7, 0.95);  // no contexts: the fixed fallback
  ExpectPair(p->For(-3, 0), 0.7, 0.95);
}

TEST(ApePresetTest, KeyedByContextTokens) {
  auto p = Load(ThreeRows("context_tokens"));
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->by, ApePresetKey::kContextTokens);
  // The tokens are the key; the number of contexts plays no part, except
  // that one context takes the first row however long it is.
  ExpectPair(p->For(100, 4), 0.8, 1.0);
  ExpectPair(p->For(3, 1000), 0.5, 1.0);
  ExpectPair(p->For(1, 4), 0.6, 0.8);  // the first row, not 4 tokens' interpolation
  ExpectPair(p->For(1, 1000), 0.6, 0.8);
  ExpectPair(p->For(5, 0), 0.7, 0.95);
}

TEST(ApePresetTest, OneRowIsConstant) {
  auto p = Load(R"({"version": 2, "temperature": 0.7, "scale": 0.95, "by": "contexts",
                    "table": [{"contexts": 16, "temperature": 0.3, "scale": 1.9}]})");
  ASSERT_TRUE(p.ok()) << p.status();
  for (int n : {1, 15, 16, 17, 1000}) ExpectPair(p->For(n, 0), 0.3, 1.9);
  ExpectPair(p->For(0, 0), 0.7, 0.95);
}

TEST(ApePresetTest, MissingFileIsNotFoundAndPresetForModelDefaults) {
  EXPECT_EQ(LoadApePreset("/nonexistent/dir/m.gguf.ape.json").status().code(), absl::StatusCode::kNotFound);
  auto d = PresetForModel("/nonexistent/dir/m.gguf");
  ASSERT_TRUE(d.ok()) << d.status();
  ExpectPair(d->For(8, 100), 0.9, 0.9);

  // An existing <model>.ape.json is read, and a broken one is an error.
  TempFile model("not a model", ".gguf");
  {
    TempFile preset(ThreeRows("contexts"), "");
    ASSERT_EQ(std::rename(preset.path().c_str(), (model.path() + ".ape.json").c_str()), 0);
    auto p = PresetForModel(model.path());
    ASSERT_TRUE(p.ok()) << p.status();
    ExpectPair(p->For(4, 0), 0.8, 1.0);
  }
  {
    std::ofstream(model.path() + ".ape.json") << R"({"version": 2})";
    auto p = PresetForModel(model.path());
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
    std::remove((model.path() + ".ape.json").c_str());
  }
}

// Every malformed file: INVALID_ARGUMENT whose message names the file and
// the field at fault.
TEST(ApePresetTest, MalformedFilesAreRejectedNamingTheField) {
  const std::string head = R"({"version": 2, "temperature": 0.8, "scale": 0.9, "by": "contexts", )";
  const std::string ok_row = R"({"contexts": 2, "temperature": 0.8, "scale": 0.9})";
  struct Case {
    std::string json, field;
  };
  const std::vector<Case> cases = {
      {"", "not a JSON object"},
      {"{\"temperature\": 0.8", "not a JSON object"},
      {"[0.8, 0.9]", "not a JSON object"},
      // Version 1 values.
      {R"({"temperature": "0.8"})", "temperature"},
      {R"({"temperature": 0.01})", "temperature"},
      {R"({"scale": 2.5})", "scale"},
      {R"({"scale": -1})", "scale"},
      // Version.
      {R"({"version": 3, "temperature": 0.8, "scale": 0.9})", "version"},
      {R"({"version": 0, "temperature": 0.8, "scale": 0.9})", "version"},
      {R"({"version": "2", "temperature": 0.8, "scale": 0.9})", "version"},
      {R"({"version": 2.0, "temperature": 0.8, "scale": 0.9})", "version"},
      // A table without version 2.
      {R"({"temperature": 0.8, "scale": 0.9, "by": "contexts", "table": [)" + ok_row + "]}", "table"},
      {R"({"version": 1, "temperature": 0.8, "scale": 0.9, "by": "contexts"})", "by"},
      // Version 2: the fallback.
      {R"({"version": 2, "scale": 0.9, "by": "contexts", "table": [)" + ok_row + "]}", "temperature"},
      {R"({"version": 2, "temperature": 0.8, "by": "contexts", "table": [)" + ok_row + "]}", "scale"},
      {R"({"version": 2, "temperature": 3, "scale": 0.9, "by": "contexts", "table": [)" + ok_row + "]}", "temperature"},
      // Version 2: "by".
      {R"({"version": 2, "temperature": 0.8, "scale": 0.9, "table": [)" + ok_row + "]}", "by"},
      {R"({"version": 2, "temperature": 0.8, "scale": 0.9, "by": "documents", "table": [)" + ok_row + "]}", "by"},
      {R"({"version": 2, "temperature": 0.8, "scale": 0.9, "by": 1, "table": [)" + ok_row + "]}", "by"},
      // Version 2: the table.
      {R"({"version": 2, "temperature": 0.8, "scale": 0.9, "by": "contexts"})", "table"},
      {head + R"("table": []})", "table"},
      {head + R"("table": {"contexts": 2}})", "table"},
      {head + R"("table": [[2, 0.8, 0.9]]})", "table[0]"},
      // Rows.
      {head + R"("table": [{"temperature": 0.8, "scale": 0.9}]})", "table[0].contexts"},
      {head + R"("table": [{"contexts": 2, "scale": 0.9}]})", "table[0].temperature"},
      {head + R"("table": [{"contexts": 2, "temperature": 0.8}]})", "table[0].scale"},
      {head + R"("table": [{"contexts": 2, "temperature": 0.8, "scale": 0.9, "note": 1}]})", "table[0].note"},
      // The key of the other keying is not a row field of this one.
      {head + R"("table": [{"context_tokens": 2, "temperature": 0.8, "scale": 0.9}]})", "table[0].context_tokens"},
      {head + R"("table": [{"contexts": 0, "temperature": 0.8, "scale": 0.9}]})", "table[0].contexts"},
      {head + R"("table": [{"contexts": -4, "temperature": 0.8, "scale": 0.9}]})", "table[0].contexts"},
      {head + R"("table": [{"contexts": 2.5, "temperature": 0.8, "scale": 0.9}]})", "table[0].contexts"},
      {head + R"("table": [{"contexts": 2.0, "temperature": 0.8, "scale": 0.9}]})", "table[0].contexts"},
      {head + R"("table": [{"contexts": "2", "temperature": 0.8, "scale": 0.9}]})", "table[0].contexts"},
      {head + R"("table": [{"contexts": 1e30, "temperature": 0.8, "scale": 0.9}]})", "table[0].contexts"},
      {head + R"("table": [{"contexts": 18446744073709551615, "temperature": 0.8, "scale": 0.9}]})",
       "table[0].contexts"},
      {head + R"("table": [{"contexts": 2, "temperature": 0.04, "scale": 0.9}]})", "table[0].temperature"},
      {head + R"("table": [{"contexts": 2, "temperature": 0.8, "scale": 2.01}]})", "table[0].scale"},
      {head + R"("table": [{"contexts": 2, "temperature": 0.8, "scale": null}]})", "table[0].scale"},
      {head + R"("table": [{"contexts": 2, "temperature": true, "scale": 0.9}]})", "table[0].temperature"},
      // Order: strictly increasing keys.
      {head + "\"table\": [" + ok_row + R"(, {"contexts": 1, "temperature": 0.8, "scale": 0.9}]})",
       "table[1].contexts"},
      {head + "\"table\": [" + ok_row + ", " + ok_row + "]}", "table[1].contexts"},
      {head + "\"table\": [" + ok_row + R"(, {"contexts": 4, "temperature": 0.8, "scale": 0.9}, )" +
           R"({"contexts": 3, "temperature": 0.8, "scale": 0.9}]})",
       "table[2].contexts"},
  };
  for (const Case& c : cases) {
    TempFile f(c.json, ".ape.json");
    auto p = LoadApePreset(f.path());
    ASSERT_FALSE(p.ok()) << c.json;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << c.json << "\n" << p.status();
    const std::string msg(p.status().message());
    EXPECT_NE(msg.find(f.path()), std::string::npos) << msg;
    EXPECT_NE(msg.find(c.field), std::string::npos) << "want '" << c.field << "' in: " << msg;
  }
}

TEST(ApePresetTest, TooManyRows) {
  std::string rows;
  for (int i = 1; i <= kMaxApePresetRows + 1; ++i) {
    if (i > 1) rows += ",";
    rows += "{\"contexts\": " + std::to_string(i) + ", \"temperature\": 0.8, \"scale\": 0.9}";
  }
  auto p = Load(R"({"version": 2, "temperature": 0.8, "scale": 0.9, "by": "contexts", "table": [)" + rows + "]}");
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find("table"), std::string::npos);
  // One row fewer is fine.
  rows = rows.substr(0, rows.rfind(",{"));
  EXPECT_TRUE(
      Load(R"({"version": 2, "temperature": 0.8, "scale": 0.9, "by": "contexts", "table": [)" + rows + "]}").ok());
}

}  // namespace
}  // namespace ape
