// The decoder's in-process cache of hot KV entries (placeholder).
#ifndef APESERVE_COMMON_PIPELINE_HOT_CACHE_H_
#define APESERVE_COMMON_PIPELINE_HOT_CACHE_H_
#endif
