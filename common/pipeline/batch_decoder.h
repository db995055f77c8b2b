// Continuous batching (placeholder).
#ifndef APESERVE_COMMON_PIPELINE_BATCH_DECODER_H_
#define APESERVE_COMMON_PIPELINE_BATCH_DECODER_H_
#endif
