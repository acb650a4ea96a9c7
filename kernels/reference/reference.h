// CPU references for kvdn::kernels (STYLE.md 13): the same functions, written plainly, on host
// memory. Copies are compared bit for bit; attention within a stated tolerance of this fp64
// version.
#ifndef KVDN_KERNELS_REFERENCE_REFERENCE_H_
#define KVDN_KERNELS_REFERENCE_REFERENCE_H_

#include <cstdint>
#include <vector>

#include "kvdn/kernels/paged_kv.h"

namespace kvdn::kernels::reference {

// 16-bit float conversions (round to nearest even).
float Bf16ToFloat(uint16_t b);
uint16_t FloatToBf16(float f);
float Fp16ToFloat(uint16_t h);
uint16_t FloatToFp16(float f);

// Host versions of InjectLayer / ExtractLayer: `cache_k` / `cache_v` are host copies of the
// cache tensors (cache.k / cache.v are ignored), `block_table` a host array.
void InjectLayer(const uint8_t* src, const PagedKvLayer& cache, uint8_t* cache_k, uint8_t* cache_v,
                 const int32_t* block_table, int32_t first_token, int32_t num_tokens);
void ExtractLayer(const PagedKvLayer& cache, const uint8_t* cache_k, const uint8_t* cache_v,
                  const int32_t* block_table, int32_t first_token, int32_t num_tokens,
                  uint8_t* dst);

// fp64 paged decode attention over 16-bit inputs (bf16 or fp16 bit patterns), NHD layout.
// Returns out[b][q_head][dim] as doubles.
std::vector<double> DecodeAttention(const uint16_t* q, const uint16_t* k_cache,
                                    const uint16_t* v_cache, const int32_t* block_tables,
                                    const int32_t* context_lens, int batch, int q_heads,
                                    int kv_heads, int head_dim, int block_size,
                                    int max_blocks_per_seq, bool bf16, double scale);

}  // namespace kvdn::kernels::reference

#endif  // KVDN_KERNELS_REFERENCE_REFERENCE_H_
