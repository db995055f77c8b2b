// Weight types kept as the file stores them: block layouts (bit-exact as
// GGUF/GGML define them), row conversions to float32, the reference
// quantizers, and the dot products the matrix kernels are built from.
//
// A row of `n` elements of a block type is n / BlockElements(t) blocks laid
// end to end; every type's row length must be a multiple of its block size.
//
//   F32   4 bytes/element                  F16, BF16   2 bytes/element
//   Q8_0  32 elements in 34 bytes:  f16 d | int8 q[32]            x = d*q
//   Q4_0  32 elements in 18 bytes:  f16 d | u8 qs[16]             x = d*(nibble-8)
//         (element j < 16 is the low nibble of qs[j], element j+16 its high nibble)
//   Q5_0  32 elements in 22 bytes:  f16 d | u32 qh | u8 qs[16]    x = d*(q5-16)
//         (q5 = Q4_0's nibble of element j plus bit j of qh as its fifth bit;
//         llama.cpp's Q4_K_M files hold it where rows are not 256 long)
//   Q5_1  32 elements in 24 bytes:  f16 d | f16 m | u32 qh | u8 qs[16]   x = d*q5 + m
//         (Q5_K_M's fallback for rows not 256 long)
//   Q4_K  256 elements in 144 bytes: f16 d | f16 dmin | u8 scales[12] | u8 qs[128]
//         8 sub-blocks s of 32, each with a 6-bit scale sc and 6-bit min m
//         packed in scales[]; x = d*sc*nibble - dmin*m.
//         s < 4: sc = scales[s] & 63, m = scales[s+4] & 63; s >= 4: the low 4
//         bits of sc and m are the low and high nibble of scales[s+4], their
//         top 2 bits are bits 6-7 of scales[s-4] (sc) and scales[s] (m).
//         qs[32c+l]: low nibble is element 64c+l, high nibble element 64c+32+l
//   Q5_K  256 elements in 176 bytes: f16 d | f16 dmin | u8 scales[12] | u8 qh[32] | u8 qs[128]
//         Q4_K with a fifth bit per element: element 64c+l takes bit 2c of
//         qh[l], element 64c+32+l bit 2c+1; x = d*sc*q5 - dmin*m
//   Q6_K  256 elements in 210 bytes: u8 ql[128] | u8 qh[64] | i8 scales[16] | f16 d
//         16 sub-blocks of 16, x = d*scales[e/16]*(q6 - 32) for element e,
//         q6 = 4 low bits from ql, 2 high bits from qh. In each half h of
//         128 elements, for l < 32 and k < 4, element 128h+32k+l takes the
//         low (k < 2) or high nibble of ql[64h+32(k%2)+l] and bits 2k..2k+1
//         of qh[32h+l]
//   Q8_K  256 elements in 292 bytes: f32 d | int8 qs[256] | i16 bsums[16]
//         (activations only: the partner of Q4_K/Q5_K/Q6_K in dot products;
//         bsums[i] = sum of qs[16i .. 16i+15])
//
// Dot products take the activations in the form their weight type wants
// (ActivationType): float32 for F32/F16/BF16, Q8_0 blocks for Q8_0/Q4_0/Q5_0/Q5_1,
// Q8_K blocks for Q4_K/Q6_K. The kernels pick AVX-512 paths (float
// weights) at run time where the CPU has AVX512F/BW/VL and VNNI, and
// AVX2+FMA+F16C otherwise; every kernel has a plain scalar twin
// (DotRowsReference) that tests compare with.
#ifndef APESERVE_COMMON_ENGINE_QUANT_H_
#define APESERVE_COMMON_ENGINE_QUANT_H_

#include <cstddef>
#include <cstdint>

#include "common/engine/gguf.h"

namespace ape {

// True for the types weights may have: F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q5_1,
// Q4_K, Q5_K, Q6_K.
// (Block sizes: GgmlBlockElements / GgmlBlockBytes / GgmlRowBytes in gguf.h.)
bool IsWeightType(GgmlType t);

// The activation format of dot products with weights of type t.
GgmlType ActivationType(GgmlType t);  // kF32, kQ8_0 or kQ8_K

// Row of n elements of type t -> float32 (t any weight type or Q8_K).
void DequantizeRow(GgmlType t, const uint8_t* row, float* out, int64_t n);

// float32 -> one row of type t (n a multiple of the block size). For Q8_0,
// Q4_0, Q4_K, Q6_K these are GGML's reference quantizers (without an
// importance matrix), so rows are bit-identical to llama-quantize's; F16
// rounds to nearest even; BF16 rounds to nearest even (NaN kept quiet); Q8_K
// is the activation quantizer.
void QuantizeRow(GgmlType t, const float* x, uint8_t* out, int64_t n);

// x (n floats) -> the activation form for weights of type t, into `out`
// (ActivationBytes(t, n) bytes). A plain copy for F32/F16/BF16; Q8_0 as
// llama.cpp's CPU backend makes it (GGML's x86 quantize_row_q8_0: scale
// amax/127, ties to even), Q8_K as GGML's quantize_row_q8_K; quants are in
// -127..127.
size_t ActivationBytes(GgmlType t, int64_t n);
void PrepareActivations(GgmlType t, const float* x, int64_t n, uint8_t* out);

// y[r] = dot(row r, x) for `rows` consecutive rows of type t, `row_bytes`
// apart, each of n elements; `act` from PrepareActivations(t, x, n, ...).
// Single-threaded: callers split rows across threads.
void DotRows(GgmlType t, const uint8_t* w, size_t row_bytes, int rows, const uint8_t* act, int64_t n, float* y);

// Several tokens: y[j * y_stride + r] = dot(row r, token j) for r < rows
// and j < n_tokens, token j's activations (PrepareActivations) at
// act + j * act_stride (a multiple of 4 bytes for float32 activations).
// Each result is bit-identical to DotRows' for that token alone, whatever
// n_tokens is: the kernels run blocks of rows against groups of tokens, and
// every (row, token) result takes the same operations in the same order in
// any block and group. Rows are taken in cache-sized chunks, so each weight
// is read from memory once per call, and a weight block is unpacked once
// per group of up to 4 tokens (8 for Q8_0, Q4_0 (AVX2), Q4_K and Q6_K).
// Single-threaded: callers split rows across threads.
void DotRowsBatch(GgmlType t, const uint8_t* w, size_t row_bytes, int rows, const uint8_t* act, size_t act_stride,
                  int n_tokens, int64_t n, float* y, size_t y_stride);

// Prefill with float weights (t is F32, F16 or BF16): y[j * ldy + r] =
// dot(row r, token j) for r < rows and j < n_tokens, token j's n float32
// activations at x + j * ldx. Tiles of 4 rows x 3 tokens that convert the
// weights in registers (nothing packed): for 17 and more tokens, where the
// DotRowsBatch order (bit-identical to one-token decode) is not needed. Not
// bit-identical to DotRows (one accumulator per result instead of two).
// Single-threaded: callers split rows across threads.
void FloatGemm(GgmlType t, const uint8_t* w, size_t row_bytes, int rows, const float* x, size_t ldx, int n_tokens,
               int64_t n, float* y, size_t ldy);

// The same as DotRows, plain scalar C++: the reference the fast kernels are tested
// against (identical results for integer paths up to float summation order).
void DotRowsReference(GgmlType t, const uint8_t* w, size_t row_bytes, int rows, const uint8_t* act, int64_t n,
                      float* y);

// Which instruction set the kernels use on this CPU ("avx512-vnni",
// "avx2"), for logs and benchmarks.
const char* KernelIsa();

// Tests and benchmarks: use the kernels of `isa` ("avx2", "avx512-vnni")
// from now on, or the detected ones for "" or nullptr. False (and nothing
// changes) if this CPU lacks `isa`. Not thread-safe with running kernels.
bool ForceKernelIsaForTesting(const char* isa);

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_QUANT_H_
