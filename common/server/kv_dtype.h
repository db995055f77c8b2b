// KvDtype at the service edge: the API's ape.v1.KvDtype enum and the
// --kv_dtype flag of both servers. The one name mapping is KvDtypeName /
// ParseKvDtype (common/kv); the enum values are the block format's.
#ifndef APESERVE_COMMON_SERVER_KV_DTYPE_H_
#define APESERVE_COMMON_SERVER_KV_DTYPE_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "ape/v1/encoder.pb.h"
#include "common/kv/kv_block.h"

namespace ape {

// kv_block_format.md stores dtype "as ape.v1.KvDtype".
static_assert(static_cast<int>(KvDtype::kFloat16) == v1::KV_DTYPE_FLOAT16);
static_assert(static_cast<int>(KvDtype::kFloat32) == v1::KV_DTYPE_FLOAT32);
static_assert(static_cast<int>(KvDtype::kInt8) == v1::KV_DTYPE_INT8);

// A request's dtype: KV_DTYPE_UNSPECIFIED is `unspecified` (the server's
// --kv_dtype); INVALID_ARGUMENT for a value this build does not know.
inline absl::StatusOr<KvDtype> KvDtypeFromProto(v1::KvDtype dtype, KvDtype unspecified) {
  switch (dtype) {
    case v1::KV_DTYPE_UNSPECIFIED: return unspecified;
    case v1::KV_DTYPE_FLOAT16: return KvDtype::kFloat16;
    case v1::KV_DTYPE_FLOAT32: return KvDtype::kFloat32;
    case v1::KV_DTYPE_INT8: return KvDtype::kInt8;
    default: return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", static_cast<int>(dtype)));
  }
}

inline v1::KvDtype KvDtypeToProto(KvDtype dtype) {
  switch (dtype) {
    case KvDtype::kFloat16: return v1::KV_DTYPE_FLOAT16;
    case KvDtype::kInt8: return v1::KV_DTYPE_INT8;
    case KvDtype::kFloat32: break;
  }
  return v1::KV_DTYPE_FLOAT32;
}

// ABSL_FLAG(ape::KvDtype, ...): "float16", "float32" or "int8" (absl finds these by
// argument-dependent lookup); any other value stops the server while its
// flags are parsed, with absl's message naming the flag.
inline bool AbslParseFlag(absl::string_view text, KvDtype* dtype, std::string* error) {
  absl::StatusOr<KvDtype> parsed = ParseKvDtype(text);
  if (!parsed.ok()) {
    *error = std::string(parsed.status().message());
    return false;
  }
  *dtype = *parsed;
  return true;
}
inline std::string AbslUnparseFlag(KvDtype dtype) { return KvDtypeName(dtype); }

}  // namespace ape

#endif  // APESERVE_COMMON_SERVER_KV_DTYPE_H_
