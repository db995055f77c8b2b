// Tests of quant.h against simpler things:
//   - QuantizeRow against llama-quantize's own files, bit for bit;
//   - DequantizeRow against decoders written here from quant.h's layout
//     comment, and QuantizeRow -> DequantizeRow against per-type error bounds;
//   - DotRows of every ISA's kernels (AVX2; AVX-512 when the CPU has it,
//     skipped with a message otherwise) and DotRowsBatch against
//     DotRowsReference, within a float summation bound;
//   - PrepareActivations: the dot product's error against float activations
//     within the bound the activation rounding allows.
#include "common/engine/quant.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/engine/gguf.h"
#include "common/engine/half.h"
#include "tests/test_util.h"

namespace ape {
namespace {

using Bytes = std::vector<uint8_t>;

const GgmlType kWeightTypes[] = {GgmlType::kF32,  GgmlType::kF16,  GgmlType::kBF16, GgmlType::kQ8_0, GgmlType::kQ4_0,
                                 GgmlType::kQ5_0, GgmlType::kQ5_1, GgmlType::kQ4_K, GgmlType::kQ5_K, GgmlType::kQ6_K};

const char* Name(GgmlType t) { return GgmlTypeName(static_cast<uint32_t>(t)); }
int BlockElements(GgmlType t) { return GgmlBlockElements(static_cast<uint32_t>(t)); }
size_t RowBytes(GgmlType t, int64_t n) { return GgmlRowBytes(static_cast<uint32_t>(t), n); }

std::vector<float> RandomFloats(std::mt19937& rng, int64_t n, float sigma) {
  std::normal_distribution<float> normal(0.f, sigma);
  std::vector<float> x(n);
  for (float& v : x) v = normal(rng);
  return x;
}

Bytes Quantize(GgmlType t, const std::vector<float>& x) {
  Bytes out(RowBytes(t, x.size()));
  QuantizeRow(t, x.data(), out.data(), x.size());
  return out;
}

std::vector<float> Dequantize(GgmlType t, const uint8_t* row, int64_t n) {
  std::vector<float> out(n);
  DequantizeRow(t, row, out.data(), n);
  return out;
}

// ---------------------------------------------------------------------------
// Bit-identity with llama-quantize
// ---------------------------------------------------------------------------
// tests/data/families/models/tiny-random-*-TYPE.gguf were made by
// `llama-quantize --pure F32.gguf OUT.gguf TYPE` (no importance matrix):
// every 2-D matrix in TYPE; llama.cpp 34af94cd for F16 ... Q6_K, a later
// llama.cpp (tests/data/README.md) for Q5_0, Q5_1 and Q5_K. Quantizing the
// F32 file's matrices row by row must give the same bytes.

struct Gguf {
  std::string bytes;
  GgufFile file;
};

Gguf LoadModel(const std::string& family, const std::string& type) {
  const std::string path = testing::TestData("families/models/tiny-random-" + family + "-" + type + ".gguf");
  Gguf g;
  g.bytes = testing::ReadAll(path);
  auto file =
      GgufFile::Parse(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(g.bytes.data()), g.bytes.size()), path);
  EXPECT_TRUE(file.ok()) << file.status();
  if (file.ok()) g.file = *std::move(file);
  return g;
}

struct FixtureCase {
  const char* file_type;
  GgmlType type;
};

class LlamaQuantizeTest : public ::testing::TestWithParam<FixtureCase> {};

TEST_P(LlamaQuantizeTest, RowsAreBitIdentical) {
  const FixtureCase c = GetParam();
  for (const std::string family : {"qwen2", "qwen3", "llama31"}) {
    const Gguf f32 = LoadModel(family, "F32");
    const Gguf quant = LoadModel(family, c.file_type);
    int matrices = 0;
    for (const GgufTensor& src : f32.file.tensors()) {
      if (src.dims.size() != 2) continue;
      auto dst = quant.file.FindTensor(src.name);
      ASSERT_TRUE(dst.ok()) << family << " " << src.name;
      ASSERT_EQ((*dst)->type, static_cast<uint32_t>(c.type)) << src.name;
      const int64_t n = src.dims[0], rows = src.dims[1];
      const size_t row_bytes = RowBytes(c.type, n);
      ASSERT_EQ((*dst)->data.size(), row_bytes * rows);
      Bytes mine(row_bytes);
      int differing_rows = 0;
      for (int64_t r = 0; r < rows; ++r) {
        QuantizeRow(c.type, reinterpret_cast<const float*>(src.data.data()) + r * n, mine.data(), n);
        if (std::memcmp(mine.data(), (*dst)->data.data() + r * row_bytes, row_bytes) != 0) ++differing_rows;
      }
      EXPECT_EQ(differing_rows, 0) << family << " " << src.name << " (" << rows << " rows of " << n << ")";
      ++matrices;
    }
    EXPECT_GE(matrices, 8) << family;
  }
}

INSTANTIATE_TEST_SUITE_P(Types, LlamaQuantizeTest,
                         ::testing::Values(FixtureCase{"F16", GgmlType::kF16}, FixtureCase{"BF16", GgmlType::kBF16},
                                           FixtureCase{"Q8_0", GgmlType::kQ8_0}, FixtureCase{"Q4_0", GgmlType::kQ4_0},
                                           FixtureCase{"Q4_K", GgmlType::kQ4_K}, FixtureCase{"Q6_K", GgmlType::kQ6_K},
                                           FixtureCase{"Q5_0", GgmlType::kQ5_0}, FixtureCase{"Q5_1", GgmlType::kQ5_1},
                                           FixtureCase{"Q5_K", GgmlType::kQ5_K}),
                         [](const auto& info) { return std::string(info.param.file_type); });

// ---------------------------------------------------------------------------
// Decoders written from quant.h's layout comment, in double
// ---------------------------------------------------------------------------

double F16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return HalfToFloat(h);
}

// x = scaled - offset per element (offset is 0 except Q4_K's dmin*m), so
// tests know the size of the terms the kernels add.
struct Decoded {
  std::vector<double> scaled, offset;
  double at(int64_t i) const { return scaled[i] - offset[i]; }
};

Decoded DecodeByLayout(GgmlType t, const uint8_t* row, int64_t n) {
  Decoded out{std::vector<double>(n), std::vector<double>(n, 0.0)};
  for (int64_t i = 0; i < n; ++i) {
    if (t == GgmlType::kF32) {
      float f;
      std::memcpy(&f, row + 4 * i, 4);
      out.scaled[i] = f;
    } else if (t == GgmlType::kF16) {
      out.scaled[i] = F16(row + 2 * i);
    } else if (t == GgmlType::kBF16) {
      const uint32_t u = (static_cast<uint32_t>(row[2 * i + 1]) << 24) | (static_cast<uint32_t>(row[2 * i]) << 16);
      float f;
      std::memcpy(&f, &u, 4);
      out.scaled[i] = f;
    } else if (t == GgmlType::kQ8_0) {
      const uint8_t* b = row + 34 * (i / 32);
      out.scaled[i] = F16(b) * static_cast<int8_t>(b[2 + i % 32]);
    } else if (t == GgmlType::kQ4_0) {
      const uint8_t* b = row + 18 * (i / 32);
      const int j = i % 32;
      const int q = j < 16 ? b[2 + j] & 15 : b[2 + j - 16] >> 4;
      out.scaled[i] = F16(b) * (q - 8);
    } else if (t == GgmlType::kQ5_0) {
      const uint8_t* b = row + 22 * (i / 32);
      const int j = i % 32;
      const int low = j < 16 ? b[6 + j] & 15 : b[6 + j - 16] >> 4;
      const int fifth = (b[2 + j / 8] >> (j % 8)) & 1;
      out.scaled[i] = F16(b) * ((low | fifth << 4) - 16);
    } else if (t == GgmlType::kQ5_1) {
      const uint8_t* b = row + 24 * (i / 32);
      const int j = i % 32;
      const int low = j < 16 ? b[8 + j] & 15 : b[8 + j - 16] >> 4;
      const int fifth = (b[4 + j / 8] >> (j % 8)) & 1;
      out.scaled[i] = F16(b) * (low | fifth << 4);
      out.offset[i] = -F16(b + 2);
    } else if (t == GgmlType::kQ4_K || t == GgmlType::kQ5_K) {
      const bool q5 = t == GgmlType::kQ5_K;
      const uint8_t* b = row + (q5 ? 176 : 144) * (i / 256);
      const uint8_t* scales = b + 4;
      const int e = i % 256, s = e / 32, c = e / 64;
      int sc, m;
      if (s < 4) {
        sc = scales[s] & 63;
        m = scales[s + 4] & 63;
      } else {
        sc = (scales[s + 4] & 15) | (scales[s - 4] >> 6) << 4;
        m = (scales[s + 4] >> 4) | (scales[s] >> 6) << 4;
      }
      const uint8_t byte = b[(q5 ? 48 : 16) + 32 * c + e % 32];
      int q = (e % 64) < 32 ? byte & 15 : byte >> 4;
      if (q5) q |= ((b[16 + e % 32] >> (2 * c + (e % 64) / 32)) & 1) << 4;  // qh[l], bit 2c (+1 for the high nibble)
      out.scaled[i] = F16(b) * sc * q;
      out.offset[i] = F16(b + 2) * m;
    } else if (t == GgmlType::kQ6_K) {
      const uint8_t* b = row + 210 * (i / 256);
      const int e = i % 256, h = e / 128, k = (e % 128) / 32, l = e % 32;
      const uint8_t low = b[64 * h + 32 * (k % 2) + l];
      const int q = (k < 2 ? low & 15 : low >> 4) | ((b[128 + 32 * h + l] >> (2 * k)) & 3) << 4;
      out.scaled[i] = F16(b + 208) * static_cast<int8_t>(b[192 + e / 16]) * (q - 32);
    } else if (t == GgmlType::kQ8_K) {
      const uint8_t* b = row + 292 * (i / 256);
      float d;
      std::memcpy(&d, b, 4);
      out.scaled[i] = static_cast<double>(d) * static_cast<int8_t>(b[4 + i % 256]);
    }
  }
  return out;
}

// Random bytes of a row of type t, with the float fields (and F32/F16/BF16
// values) set to sane numbers; every quant field takes all its values.
Bytes RandomRow(GgmlType t, int64_t n, std::mt19937& rng) {
  Bytes row(RowBytes(t, n));
  for (uint8_t& b : row) b = static_cast<uint8_t>(rng());
  std::uniform_real_distribution<float> scale(1e-4f, 2e-3f), value(-1.f, 1.f);
  auto put16 = [&](size_t at, uint16_t v) { std::memcpy(row.data() + at, &v, 2); };
  switch (t) {
    case GgmlType::kF32:
      for (int64_t i = 0; i < n; ++i) {
        const float f = value(rng);
        std::memcpy(row.data() + 4 * i, &f, 4);
      }
      break;
    case GgmlType::kF16:
      for (int64_t i = 0; i < n; ++i) put16(2 * i, FloatToHalf(value(rng)));
      break;
    case GgmlType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        const float f = value(rng);
        uint32_t u;
        std::memcpy(&u, &f, 4);
        put16(2 * i, static_cast<uint16_t>(u >> 16));
      }
      break;
    case GgmlType::kQ8_0:
      for (int64_t b = 0; b < n / 32; ++b) put16(34 * b, FloatToHalf(scale(rng)));
      break;
    case GgmlType::kQ4_0:
      for (int64_t b = 0; b < n / 32; ++b) put16(18 * b, FloatToHalf(scale(rng)));
      break;
    case GgmlType::kQ5_0:
      for (int64_t b = 0; b < n / 32; ++b) put16(22 * b, FloatToHalf(scale(rng)));
      break;
    case GgmlType::kQ5_1:
      for (int64_t b = 0; b < n / 32; ++b) {
        put16(24 * b, FloatToHalf(scale(rng)));
        put16(24 * b + 2, FloatToHalf(-16 * scale(rng)));
      }
      break;
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K: {
      const int block = t == GgmlType::kQ4_K ? 144 : 176;
      for (int64_t b = 0; b < n / 256; ++b) {
        put16(block * b, FloatToHalf(scale(rng)));
        put16(block * b + 2, FloatToHalf(scale(rng)));
      }
      break;
    }
    case GgmlType::kQ6_K:
      for (int64_t b = 0; b < n / 256; ++b) put16(210 * b + 208, FloatToHalf(scale(rng) * 0.1f));
      break;
    default: ADD_FAILURE() << "no random rows of " << Name(t);
  }
  return row;
}

// `rows` random rows (RandomRow) back to back from byte `offset` on (1: an
// odd address, as rows of a file may be).
Bytes RandomRows(GgmlType t, int64_t n, int rows, std::mt19937& rng, size_t offset) {
  const size_t row_bytes = RowBytes(t, n);
  Bytes w(offset + rows * row_bytes);
  for (int r = 0; r < rows; ++r) {
    const Bytes row = RandomRow(t, n, rng);
    std::memcpy(w.data() + offset + r * row_bytes, row.data(), row_bytes);
  }
  return w;
}

TEST(DequantizeRowTest, MatchesTheLayoutComment) {
  std::mt19937 rng(1);
  for (GgmlType t : kWeightTypes) {
    const int64_t n = 1024;
    const Bytes row = RandomRow(t, n, rng);
    const std::vector<float> got = Dequantize(t, row.data(), n);
    const Decoded want = DecodeByLayout(t, row.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      // Float rounding of a product of at most three factors.
      const double tol = 4 * FLT_EPSILON * (std::fabs(want.scaled[i]) + std::fabs(want.offset[i]));
      ASSERT_NEAR(got[i], want.at(i), tol) << Name(t) << " element " << i;
    }
  }
}

TEST(DequantizeRowTest, Q8KMatchesTheLayout) {
  std::mt19937 rng(2);
  const std::vector<float> x = RandomFloats(rng, 512, 1.f);
  const Bytes q = Quantize(GgmlType::kQ8_K, x);
  const std::vector<float> got = Dequantize(GgmlType::kQ8_K, q.data(), 512);
  const Decoded want = DecodeByLayout(GgmlType::kQ8_K, q.data(), 512);
  for (int i = 0; i < 512; ++i) ASSERT_NEAR(got[i], want.at(i), 2 * FLT_EPSILON * std::fabs(want.at(i))) << i;
}

// ---------------------------------------------------------------------------
// Quantization round trips
// ---------------------------------------------------------------------------

TEST(QuantizeRowTest, HalfAndBfloatRoundToNearestEven) {
  // 1 + 2^-11 is halfway between two halves: ties go to the even one (1);
  // 1 + 3 * 2^-11 goes up to 1 + 2^-9 (even mantissa).
  const std::vector<float> x = {1.f + 0x1p-11f, 1.f + 3 * 0x1p-11f, 1.f + 0x1p-8f, 1.f + 3 * 0x1p-8f, -2.5f};
  const Bytes h = Quantize(GgmlType::kF16, x);
  const std::vector<float> hf = Dequantize(GgmlType::kF16, h.data(), x.size());
  EXPECT_EQ(hf[0], 1.f);
  EXPECT_EQ(hf[1], 1.f + 0x1p-9f);
  EXPECT_EQ(hf[4], -2.5f);
  const Bytes b = Quantize(GgmlType::kBF16, x);
  const std::vector<float> bf = Dequantize(GgmlType::kBF16, b.data(), x.size());
  EXPECT_EQ(bf[2], 1.f);
  EXPECT_EQ(bf[3], 1.f + 0x1p-6f);
  EXPECT_EQ(bf[4], -2.5f);
  const float nan = std::nanf("");
  const Bytes bn = Quantize(GgmlType::kBF16, {nan, nan});
  EXPECT_TRUE(std::isnan(Dequantize(GgmlType::kBF16, bn.data(), 2)[0]));
}

// Largest |x| of the block of `block` elements holding element i.
float BlockAmax(const std::vector<float>& x, int64_t i, int block) {
  const int64_t start = i / block * block;
  float amax = 0;
  for (int64_t j = start; j < start + block; ++j) amax = std::max(amax, std::fabs(x[j]));
  return amax;
}

// The grid of K-quant element i: its value is step * l - offset for one
// l in lmin..lmax.
struct Grid {
  double step, offset;
  int lmin, lmax;
};

Grid GridOf(GgmlType t, const uint8_t* row, int64_t i) {
  if (t == GgmlType::kQ4_K || t == GgmlType::kQ5_K) {
    const uint8_t* b = row + (t == GgmlType::kQ4_K ? 144 : 176) * (i / 256);
    const int s = i % 256 / 32;
    const uint8_t* scales = b + 4;
    const int sc = s < 4 ? scales[s] & 63 : (scales[s + 4] & 15) | (scales[s - 4] >> 6) << 4;
    const int m = s < 4 ? scales[s + 4] & 63 : (scales[s + 4] >> 4) | (scales[s] >> 6) << 4;
    return {F16(b) * sc, F16(b + 2) * m, 0, t == GgmlType::kQ4_K ? 15 : 31};
  }
  const uint8_t* b = row + 210 * (i / 256);
  return {F16(b + 208) * static_cast<int8_t>(b[192 + i % 256 / 16]), 0, -32, 31};
}

// Bounds per element, from how each quantizer rounds:
//   F16 / BF16: half an ulp, 2^-11 / 2^-8 relative (2^-25 absolute for
//         F16 subnormals).
//   Q8_0: d = amax/127 rounded to f16 (2^-11 relative), x/d rounded:
//         |err| <= d/2 + 127 * 2^-11 d.
//   Q4_0: d = amax/8; x/d truncated from x/d + 8.5 and capped at 15, so
//         |err| <= d (at the cap, +amax lands on 7d), plus 8 * 2^-11 d.
//   Q5_0: the same with d = amax/16, cap 31: |err| <= d + 16 * 2^-11 d.
//   Q5_1: d = (max - min)/31, rounded: |err| <= d/2, plus the f16
//         roundings of d (31 * 2^-11 d) and of min (2^-11 |min|).
//   Q4_K / Q5_K / Q6_K: every element is rounded to the nearest level of
//         its sub-block's grid (d*sc*l - dmin*m, l in 0..15 or 0..31;
//         d*sc*(l - 32), l in 0..63): within half a step of it, or clamped
//         to the end level when outside the grid.
TEST(QuantizeRowTest, RoundTripErrorBounds) {
  std::mt19937 rng(3);
  const int64_t n = 4096;
  std::vector<float> x = RandomFloats(rng, n, 0.02f);
  x[100] = 0.3f;                                 // an outlier in one block
  for (int64_t i = 512; i < 768; ++i) x[i] = 0;  // an all-zero K block
  for (GgmlType t : kWeightTypes) {
    const Bytes q = Quantize(t, x);
    const std::vector<float> y = Dequantize(t, q.data(), n);
    double err2 = 0, x2 = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double err = std::fabs(static_cast<double>(y[i]) - x[i]);
      err2 += err * err;
      x2 += static_cast<double>(x[i]) * x[i];
      double bound = 0;
      switch (t) {
        case GgmlType::kF32: bound = 0; break;
        case GgmlType::kF16: bound = std::max(0x1p-11 * std::fabs(x[i]), 0x1p-25); break;  // subnormals: 2^-25
        case GgmlType::kBF16: bound = 0x1p-8 * std::fabs(x[i]); break;
        case GgmlType::kQ8_0: bound = BlockAmax(x, i, 32) / 127 * (0.5 + 127 * 0x1p-11) * 1.0001; break;
        case GgmlType::kQ4_0: bound = BlockAmax(x, i, 32) / 8 * (1 + 8 * 0x1p-11) * 1.0001; break;
        case GgmlType::kQ5_0: bound = BlockAmax(x, i, 32) / 16 * (1 + 16 * 0x1p-11) * 1.0001; break;
        case GgmlType::kQ5_1: {
          const int64_t start = i / 32 * 32;
          const float lo = *std::min_element(x.begin() + start, x.begin() + start + 32);
          const float hi = *std::max_element(x.begin() + start, x.begin() + start + 32);
          bound = ((hi - lo) / 31 * (0.5 + 32 * 0x1p-11) + std::fabs(lo) * 0x1p-11) * 1.0001;
          break;
        }
        case GgmlType::kQ4_K:
        case GgmlType::kQ5_K:
        case GgmlType::kQ6_K: {
          const Grid g = GridOf(t, q.data(), i);
          double nearest = 1e30;
          for (int l = g.lmin; l <= g.lmax; ++l) nearest = std::min(nearest, std::fabs(g.step * l - g.offset - x[i]));
          // The quantizer divides in float: a near-tie may go either way.
          bound = nearest + 1e-5 * std::fabs(g.step);
          break;
        }
        default: break;
      }
      ASSERT_LE(err, bound + 1e-12) << Name(t) << " element " << i << " x " << x[i];
    }
    const double rel_rms = std::sqrt(err2 / x2);
    // Typical relative RMS errors on Gaussian data (measured, with margin).
    const double rms_bound = t == GgmlType::kQ4_0   ? 0.12
                             : t == GgmlType::kQ5_0 ? 0.06
                             : t == GgmlType::kQ5_1 ? 0.05
                             : t == GgmlType::kQ4_K ? 0.10
                             : t == GgmlType::kQ5_K ? 0.05
                             : t == GgmlType::kQ6_K ? 0.03
                             : t == GgmlType::kQ8_0 ? 0.01
                                                    : 0.005;
    EXPECT_LE(rel_rms, rms_bound) << Name(t);
    printf("%-5s relative RMS round-trip error %.5f\n", Name(t), rel_rms);
  }
}

// A Q5_0 block worked by hand from GGML's quantize_row_q5_0_ref (the
// fixtures check whole files; this pins the layout's bit positions). The
// value of largest magnitude is -1.6, so d = -1.6 / -16 = 0.1 and
// q = min(31, int(x / d + 16.5)).
TEST(QuantizeRowTest, Q5_0BlockByHand) {
  std::vector<float> x(32, 0.f);
  x[0] = -1.6f;   // q = 0
  x[1] = 1.5f;    // q = int(31.5) = 31: low 15, fifth bit set
  x[2] = 0.04f;   // q = int(16.9) = 16: low 0, fifth bit set
  x[17] = -0.3f;  // q = int(13.5) = 13: low 13 (high nibble of qs[1]), no fifth bit
  const Bytes q = Quantize(GgmlType::kQ5_0, x);
  ASSERT_EQ(q.size(), 22u);
  EXPECT_EQ(F16(q.data()), static_cast<double>(HalfToFloat(FloatToHalf(0.1f))));
  uint32_t qh;
  std::memcpy(&qh, q.data() + 2, 4);
  // Zeros give 16 (fifth bit set): every bit but those of elements 0 and 17.
  EXPECT_EQ(qh, ~((1u << 0) | (1u << 17)));
  EXPECT_EQ(q[6 + 0], 0x00);          // elements 0 and 16: 0, 16 -> low nibbles 0, 0
  EXPECT_EQ(q[6 + 1], 15 | 13 << 4);  // elements 1 and 17
  EXPECT_EQ(q[6 + 2], 0x00);          // elements 2 and 18: 16, 16
  const std::vector<float> y = Dequantize(GgmlType::kQ5_0, q.data(), 32);
  const float d = HalfToFloat(FloatToHalf(0.1f));
  EXPECT_EQ(y[0], -16 * d);
  EXPECT_EQ(y[1], 15 * d);
  EXPECT_EQ(y[2], 0.f);
  EXPECT_EQ(y[17], -3 * d);
}

// Q5_1, by hand from GGML's quantize_row_q5_1_ref: min -1, max 2.1, so
// d = 3.1 / 31 = 0.1 and q = int((x - min) / d + 0.5).
TEST(QuantizeRowTest, Q5_1BlockByHand) {
  std::vector<float> x(32, 0.f);  // zeros: q = int(10.5) = 10
  x[0] = -1.f;                    // q = 0
  x[1] = 2.1f;                    // q = 31: low 15, fifth bit set
  x[18] = 0.56f;                  // q = int(16.1) = 16: low 0, fifth bit set
  const Bytes q = Quantize(GgmlType::kQ5_1, x);
  ASSERT_EQ(q.size(), 24u);
  EXPECT_EQ(F16(q.data()), static_cast<double>(HalfToFloat(FloatToHalf(3.1f / 31))));
  EXPECT_EQ(F16(q.data() + 2), -1.0);
  uint32_t qh;
  std::memcpy(&qh, q.data() + 4, 4);
  EXPECT_EQ(qh, (1u << 1) | (1u << 18));
  EXPECT_EQ(q[8 + 0], 0 | 10 << 4);   // elements 0 and 16
  EXPECT_EQ(q[8 + 1], 15 | 10 << 4);  // elements 1 and 17
  EXPECT_EQ(q[8 + 2], 10 | 0 << 4);   // elements 2 and 18
  const std::vector<float> y = Dequantize(GgmlType::kQ5_1, q.data(), 32);
  const float d = HalfToFloat(FloatToHalf(3.1f / 31));
  EXPECT_EQ(y[0], -1.f);
  EXPECT_EQ(y[1], 31 * d - 1.f);
  EXPECT_EQ(y[18], 16 * d - 1.f);
}

TEST(QuantizeRowTest, Q8KBlockSumsAndScale) {
  std::mt19937 rng(4);
  std::vector<float> x = RandomFloats(rng, 768, 1.f);
  for (int i = 256; i < 512; ++i) x[i] = 0;
  const Bytes q = Quantize(GgmlType::kQ8_K, x);
  for (int b = 0; b < 3; ++b) {
    const uint8_t* block = q.data() + 292 * b;
    float d;
    std::memcpy(&d, block, 4);
    if (b == 1) {
      EXPECT_EQ(d, 0.f);
      continue;
    }
    for (int s = 0; s < 16; ++s) {
      int sum = 0;
      for (int j = 0; j < 16; ++j) sum += static_cast<int8_t>(block[4 + 16 * s + j]);
      int16_t bsum;
      std::memcpy(&bsum, block + 260 + 2 * s, 2);
      EXPECT_EQ(bsum, sum) << "block " << b << " sum " << s;
    }
    // The largest |x| maps to -127 exactly.
    EXPECT_FLOAT_EQ(std::fabs(d) * 127, BlockAmax(x, 256 * b, 256));
  }
}

// ---------------------------------------------------------------------------
// Dot products: every ISA's kernels against DotRowsReference
// ---------------------------------------------------------------------------
// The integer kernels sum each block exactly, as the reference does, and
// scale it by the same float product; they differ from it only in the order
// the block terms are added in float (8 lanes, then across them; the
// reference adds them one by one). With M the sum of the terms' magnitudes
// and c the number of terms in the reference's chain (blocks), both sums
// are within c * eps * M of the exact one (Higham), so
// |fast - reference| <= (2c + 16) * eps * M. The float kernels add chains
// of n/16 products per lane against a double reference: c = n/8 covers them.

struct IsaGuard {
  ~IsaGuard() { ForceKernelIsaForTesting(""); }
};

// Magnitude of the terms of dot(row, activations): sum_i (|scaled| + |offset|) |a_i|.
double TermMagnitude(GgmlType t, const uint8_t* row, const uint8_t* act, int64_t n) {
  const Decoded w = DecodeByLayout(t, row, n);
  std::vector<double> a(n);
  if (ActivationType(t) == GgmlType::kF32) {
    for (int64_t i = 0; i < n; ++i) {
      float f;
      std::memcpy(&f, act + 4 * i, 4);  // act may be unaligned
      a[i] = f;
    }
  } else {
    a = DecodeByLayout(ActivationType(t), act, n).scaled;
  }
  double m = 0;
  for (int64_t i = 0; i < n; ++i) m += (std::fabs(w.scaled[i]) + std::fabs(w.offset[i])) * std::fabs(a[i]);
  return m;
}

class DotRowsTest : public ::testing::TestWithParam<const char*> {};

TEST_P(DotRowsTest, MatchesReference) {
  IsaGuard restore;
  if (!ForceKernelIsaForTesting(GetParam())) GTEST_SKIP() << "this CPU has no " << GetParam() << " kernels";
  EXPECT_STREQ(KernelIsa(), GetParam());
  std::mt19937 rng(5);
  for (GgmlType t : kWeightTypes) {
    const int block = BlockElements(t) == 1 ? 32 : BlockElements(t);
    std::vector<int64_t> sizes = {block, 2 * block, 3 * block, 4096, 4096 + block, 5632};
    if (BlockElements(t) == 1) sizes.insert(sizes.end(), {1, 7, 15, 17, 33, 2047});
    for (int64_t n : sizes) {
      if (n % BlockElements(t) != 0) continue;
      const size_t row_bytes = RowBytes(t, n);
      for (int rows : {1, 2, 3, 4, 5, 7, 11}) {
        // Rows and activations start at odd addresses.
        const Bytes w = RandomRows(t, n, rows, rng, 1);
        Bytes act(ActivationBytes(t, n) + 3);
        const std::vector<float> x = RandomFloats(rng, n, 1.f);
        PrepareActivations(t, x.data(), n, act.data() + 3);
        std::vector<float> fast(rows), ref(rows);
        DotRows(t, w.data() + 1, row_bytes, rows, act.data() + 3, n, fast.data());
        DotRowsReference(t, w.data() + 1, row_bytes, rows, act.data() + 3, n, ref.data());
        const int64_t chain = BlockElements(t) == 1 ? n / 8 : n / BlockElements(t);
        for (int r = 0; r < rows; ++r) {
          const double m = TermMagnitude(t, w.data() + 1 + r * row_bytes, act.data() + 3, n);
          const double tol = (2 * chain + 16) * FLT_EPSILON * m;
          ASSERT_NEAR(fast[r], ref[r], tol) << Name(t) << " n " << n << " rows " << rows << " row " << r;
        }
      }
    }
  }
}

// Rows quantized by QuantizeRow (the shapes real models have), all-zero
// activations and an all-zero row.
TEST_P(DotRowsTest, QuantizedRowsAndZeros) {
  IsaGuard restore;
  if (!ForceKernelIsaForTesting(GetParam())) GTEST_SKIP() << "this CPU has no " << GetParam() << " kernels";
  std::mt19937 rng(6);
  const int64_t n = 2048;
  const int rows = 6;
  for (GgmlType t : kWeightTypes) {
    const size_t row_bytes = RowBytes(t, n);
    Bytes w(rows * row_bytes);
    for (int r = 0; r < rows; ++r) {
      std::vector<float> v = RandomFloats(rng, n, 0.02f);
      if (r == 2) std::fill(v.begin(), v.end(), 0.f);
      QuantizeRow(t, v.data(), w.data() + r * row_bytes, n);
    }
    for (bool zero_x : {false, true}) {
      std::vector<float> x = RandomFloats(rng, n, 1.f);
      if (zero_x) std::fill(x.begin(), x.end(), 0.f);
      Bytes act(ActivationBytes(t, n));
      PrepareActivations(t, x.data(), n, act.data());
      std::vector<float> fast(rows), ref(rows);
      DotRows(t, w.data(), row_bytes, rows, act.data(), n, fast.data());
      DotRowsReference(t, w.data(), row_bytes, rows, act.data(), n, ref.data());
      for (int r = 0; r < rows; ++r) {
        const double m = TermMagnitude(t, w.data() + r * row_bytes, act.data(), n);
        const int64_t chain = BlockElements(t) == 1 ? n / 8 : n / BlockElements(t);
        EXPECT_NEAR(fast[r], ref[r], (2.0 * chain + 16) * FLT_EPSILON * m) << Name(t) << " row " << r;
        if (zero_x || r == 2) { EXPECT_EQ(fast[r], 0.f) << Name(t) << " row " << r; }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Isa, DotRowsTest, ::testing::Values("avx2", "avx512-vnni"),
                         [](const auto& info) { return std::string(info.param) == "avx2" ? "Avx2" : "Avx512Vnni"; });

// DotRowsBatch against the reference, token by token, with padded strides
// and odd addresses; same tolerance as above.
TEST(DotRowsBatchTest, MatchesReferencePerToken) {
  std::mt19937 rng(8);
  for (GgmlType t : kWeightTypes) {
    for (int64_t n : {int64_t{256}, int64_t{2048}, int64_t{2304}}) {
      const size_t row_bytes = RowBytes(t, n);
      for (auto [rows, tokens] : {std::pair{1, 1}, std::pair{5, 3}, std::pair{13, 9}, std::pair{70, 6}}) {
        const Bytes w = RandomRows(t, n, rows, rng, 1);
        const size_t act_stride = ActivationBytes(t, n) + 5;
        Bytes act(tokens * act_stride + 3);
        for (int j = 0; j < tokens; ++j) {
          PrepareActivations(t, RandomFloats(rng, n, 1.f).data(), n, act.data() + 3 + j * act_stride);
        }
        const size_t y_stride = rows + 3;
        std::vector<float> y(tokens * y_stride, -1.f), ref(rows);
        DotRowsBatch(t, w.data() + 1, row_bytes, rows, act.data() + 3, act_stride, tokens, n, y.data(), y_stride);
        const int64_t chain = BlockElements(t) == 1 ? n / 8 : n / BlockElements(t);
        for (int j = 0; j < tokens; ++j) {
          const uint8_t* a = act.data() + 3 + j * act_stride;
          DotRowsReference(t, w.data() + 1, row_bytes, rows, a, n, ref.data());
          for (int r = 0; r < rows; ++r) {
            const double m = TermMagnitude(t, w.data() + 1 + r * row_bytes, a, n);
            ASSERT_NEAR(y[j * y_stride + r], ref[r], (2 * chain + 16) * FLT_EPSILON * m)
                << Name(t) << " n " << n << " row " << r << " token " << j;
          }
          for (size_t r = rows; r < y_stride; ++r) ASSERT_EQ(y[j * y_stride + r], -1.f) << "padding written";
        }
      }
    }
  }
}

// FloatGemm (prefill with float weights) against the reference, token by
// token: row lengths with and without a tail past the last 8 elements, row
// and token counts that leave every remainder of the 4 x 3 tiles, padded
// strides; nothing written outside the results. One accumulator of n/8
// products per lane, then across the lanes: the same bound as above.
TEST(FloatGemmTest, MatchesReferencePerToken) {
  std::mt19937 rng(10);
  for (GgmlType t : {GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16}) {
    for (int64_t n : {int64_t{8}, int64_t{13}, int64_t{896}, int64_t{2051}}) {
      const size_t row_bytes = RowBytes(t, n);
      for (auto [rows, tokens] : {std::pair{1, 1}, std::pair{5, 3}, std::pair{13, 7}, std::pair{70, 20}}) {
        const Bytes w = RandomRows(t, n, rows, rng, 1);
        const size_t ldx = n + 3, ldy = rows + 2;
        std::vector<float> x(tokens * ldx);
        for (int j = 0; j < tokens; ++j) {
          const std::vector<float> v = RandomFloats(rng, n, 1.f);
          std::copy(v.begin(), v.end(), x.begin() + j * ldx);
        }
        std::vector<float> y(tokens * ldy, -1.f), ref(rows);
        FloatGemm(t, w.data() + 1, row_bytes, rows, x.data(), ldx, tokens, n, y.data(), ldy);
        for (int j = 0; j < tokens; ++j) {
          const uint8_t* a = reinterpret_cast<const uint8_t*>(x.data() + j * ldx);
          DotRowsReference(t, w.data() + 1, row_bytes, rows, a, n, ref.data());
          for (int r = 0; r < rows; ++r) {
            const double m = TermMagnitude(t, w.data() + 1 + r * row_bytes, a, n);
            ASSERT_NEAR(y[j * ldy + r], ref[r], (2 * (n / 8) + 16) * FLT_EPSILON * m)
                << Name(t) << " n " << n << " rows " << rows << " row " << r << " token " << j;
          }
          for (size_t r = rows; r < ldy; ++r) ASSERT_EQ(y[j * ldy + r], -1.f) << "padding written";
        }
      }
    }
  }
}

// Decode batches: every token's results from DotRowsBatch, for any token
// count up to 16 and row counts that leave every remainder, are
// bit-identical to DotRows for that token alone (with each ISA's kernels).
// So are prefill-sized batches (24, 40 tokens), and long rows with an odd
// block count (the kernels that walk a token group's activations in slices
// and pair blocks).
TEST(DotRowsBatchTest, BitIdenticalToDotRowsPerToken) {
  std::mt19937 rng(9);
  constexpr int kMaxTokens = 40;
  for (const char* isa : {"avx2", "avx512-vnni"}) {
    if (!ForceKernelIsaForTesting(isa)) {
      std::printf("skipping %s: not on this CPU\n", isa);
      continue;
    }
    for (GgmlType t : kWeightTypes) {
      for (const int64_t n : {int64_t{512}, 4608 + int64_t{BlockElements(t)}}) {
        const size_t row_bytes = RowBytes(t, n);
        const int rows = 23;
        const Bytes w = RandomRows(t, n, rows, rng, 0);
        const size_t act_stride = ActivationBytes(t, n);
        Bytes act(kMaxTokens * act_stride);
        for (int j = 0; j < kMaxTokens; ++j)
          PrepareActivations(t, RandomFloats(rng, n, 1.f).data(), n, act.data() + j * act_stride);
        std::vector<float> alone(kMaxTokens * rows);
        for (int j = 0; j < kMaxTokens; ++j)
          DotRows(t, w.data(), row_bytes, rows, act.data() + j * act_stride, n, &alone[j * rows]);
        for (int tokens : {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 24, kMaxTokens}) {
          std::vector<float> y(tokens * rows);
          DotRowsBatch(t, w.data(), row_bytes, rows, act.data(), act_stride, tokens, n, y.data(), rows);
          for (int j = 0; j < tokens; ++j) {
            for (int r = 0; r < rows; ++r) {
              ASSERT_EQ(y[j * rows + r], alone[j * rows + r])
                  << isa << " " << Name(t) << " n " << n << " tokens " << tokens << " token " << j << " row " << r;
            }
          }
        }
      }
    }
  }
  ForceKernelIsaForTesting(nullptr);
}

// The pair kernels (Q8_0, Q4_0, Q5_0, Q5_1) sum their byte products with
// vpdpbusd under the AVX-512 kernels and with maddubs under AVX2: the same
// exact integers, so the same bits, for one token and for batches.
TEST(DotRowsBatchTest, PairKernelsGiveTheSameBitsOnEveryIsa) {
  if (!ForceKernelIsaForTesting("avx512-vnni")) GTEST_SKIP() << "this CPU has no avx512-vnni kernels";
  std::mt19937 rng(12);
  for (GgmlType t : {GgmlType::kQ8_0, GgmlType::kQ4_0, GgmlType::kQ5_0, GgmlType::kQ5_1}) {
    for (const int64_t n : {int64_t{32}, int64_t{896}, int64_t{4608 + 32}}) {
      const size_t row_bytes = RowBytes(t, n);
      constexpr int kRows = 19, kTokens = 11;
      const Bytes w = RandomRows(t, n, kRows, rng, 0);
      const size_t act_stride = ActivationBytes(t, n);
      Bytes act(kTokens * act_stride);
      for (int j = 0; j < kTokens; ++j)
        PrepareActivations(t, RandomFloats(rng, n, 1.f).data(), n, act.data() + j * act_stride);
      std::vector<float> got[2];
      for (int v = 0; v < 2; ++v) {
        ASSERT_TRUE(ForceKernelIsaForTesting(v == 0 ? "avx2" : "avx512-vnni"));
        got[v].resize(kTokens * kRows + kRows);
        DotRowsBatch(t, w.data(), row_bytes, kRows, act.data(), act_stride, kTokens, n, got[v].data(), kRows);
        DotRows(t, w.data(), row_bytes, kRows, act.data(), n, got[v].data() + kTokens * kRows);
      }
      EXPECT_EQ(std::memcmp(got[0].data(), got[1].data(), got[0].size() * sizeof(float)), 0) << Name(t) << " n " << n;
    }
  }
  ForceKernelIsaForTesting(nullptr);
}

TEST(KernelIsaTest, NamesAKnownPath) {
  const std::string isa = KernelIsa();
  EXPECT_TRUE(isa == "avx2" || isa == "avx512-vnni") << isa;
  EXPECT_FALSE(ForceKernelIsaForTesting("sse2"));
  EXPECT_EQ(KernelIsa(), isa);
}

// ---------------------------------------------------------------------------
// Activation quantization
// ---------------------------------------------------------------------------
// dot(row, PrepareActivations(x)) against dot(DequantizeRow(row), x): the
// only difference is the activations' rounding (plus float summation).
//   Q8_0: d = amax/127, rounded to f16 (2^-11 relative), x * 127/amax
//         rounded to nearest: |x - a| <= d/2 + 127 * 2^-11 * d = 0.5621 d.
//   Q8_K: d = amax/127 kept in float: |x - a| <= d/2 (times 1 + 2^-20).
// So |error| <= sum_i |w_i| * bound(block of i) + summation slack.
TEST(PrepareActivationsTest, DotErrorWithinActivationRounding) {
  std::mt19937 rng(7);
  const int64_t n = 4096;
  for (GgmlType t : kWeightTypes) {
    const Bytes row = Quantize(t, RandomFloats(rng, n, 0.02f));
    const std::vector<float> w = Dequantize(t, row.data(), n);
    std::vector<float> x = RandomFloats(rng, n, 1.f);
    x[10] = 8.f;  // an outlier widens its block's step
    Bytes act(ActivationBytes(t, n));
    PrepareActivations(t, x.data(), n, act.data());
    float got;
    DotRows(t, row.data(), RowBytes(t, n), 1, act.data(), n, &got);
    double exact = 0, bound = 0, magnitude = 0;
    const GgmlType a = ActivationType(t);
    const int block = a == GgmlType::kQ8_0 ? 32 : 256;
    for (int64_t i = 0; i < n; ++i) {
      exact += static_cast<double>(w[i]) * x[i];
      magnitude += std::fabs(static_cast<double>(w[i]) * x[i]);
      const double d = BlockAmax(x, i, block) / 127;
      if (a == GgmlType::kQ8_0) bound += std::fabs(w[i]) * d * (0.5 + 127 * 0x1p-11);
      if (a == GgmlType::kQ8_K) bound += std::fabs(w[i]) * d * 0.5 * (1 + 0x1p-20);
    }
    const int64_t chain = BlockElements(t) == 1 ? n / 8 : n / BlockElements(t);
    bound += (2.0 * chain + 16) * FLT_EPSILON * magnitude;
    EXPECT_NEAR(got, exact, bound) << Name(t);
    printf("%-5s |dot error| %.3g, bound %.3g\n", Name(t), std::fabs(got - exact), bound);
  }
}

// Q8_0 activations as GGML's x86 quantize_row_q8_0: inverse scale
// 127/amax, ties to even (the weight quantizer rounds them away from zero).
TEST(PrepareActivationsTest, Q8_0RoundsTiesToEven) {
  std::vector<float> x(32, 0.f);
  x[0] = 127.f;  // amax: d = 1, inverse scale 1
  x[1] = 2.5f;
  x[2] = -3.5f;
  x[3] = 0.5f;
  Bytes act(ActivationBytes(GgmlType::kQ4_0, 32));
  PrepareActivations(GgmlType::kQ4_0, x.data(), 32, act.data());
  EXPECT_EQ(F16(act.data()), 1.0);
  EXPECT_EQ(static_cast<int8_t>(act[2]), 127);
  EXPECT_EQ(static_cast<int8_t>(act[3]), 2);
  EXPECT_EQ(static_cast<int8_t>(act[4]), -4);
  EXPECT_EQ(static_cast<int8_t>(act[5]), 0);
  const Bytes weights = Quantize(GgmlType::kQ8_0, x);  // the reference: away from zero
  EXPECT_EQ(static_cast<int8_t>(weights[3]), 3);
  EXPECT_EQ(static_cast<int8_t>(weights[4]), -4);
}

TEST(PrepareActivationsTest, FloatTypesCopy) {
  const std::vector<float> x = {1.5f, -2.f, 3.25f};
  for (GgmlType t : {GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16}) {
    ASSERT_EQ(ActivationType(t), GgmlType::kF32);
    ASSERT_EQ(ActivationBytes(t, 3), 12u);
    std::vector<float> out(3);
    PrepareActivations(t, x.data(), 3, reinterpret_cast<uint8_t*>(out.data()));
    EXPECT_EQ(out, x);
  }
  EXPECT_EQ(ActivationBytes(GgmlType::kQ4_0, 64), 68u);
  EXPECT_EQ(ActivationBytes(GgmlType::kQ6_K, 512), 584u);
}

}  // namespace
}  // namespace ape
