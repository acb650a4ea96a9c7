#include "reference.h"

#include <cmath>
#include <cstring>
#include <limits>

namespace kvdn::kernels::reference {

float Bf16ToFloat(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7fc0;
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

float Fp16ToFloat(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -24);
  } else if (exp == 31) {
    v = man ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    v = std::ldexp(static_cast<float>(man | 0x400), static_cast<int>(exp) - 25);
  }
  return sign ? -v : v;
}

uint16_t FloatToFp16(float f) {
  // Through the exact binary16 grid: scale, round to nearest even, rebuild the bits.
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  float a = std::fabs(f);
  if (std::isnan(f)) return 0x7e00;
  if (a >= 65520.f) return sign | 0x7c00;
  if (a < std::ldexp(1.f, -14)) {  // subnormal: units of 2^-24
    const float units = std::nearbyint(a * std::ldexp(1.f, 24));
    return sign | static_cast<uint16_t>(units);
  }
  int e;
  std::frexp(a, &e);                                          // a = m * 2^e, m in [0.5, 1)
  const float units = std::nearbyint(std::ldexp(a, 11 - e));  // in [1024, 2048]
  uint32_t man = static_cast<uint32_t>(units);
  int exp = e - 1 + 15;
  if (man == 2048) {
    man = 1024;
    ++exp;
  }
  if (exp >= 31) return sign | 0x7c00;
  return sign | static_cast<uint16_t>(exp << 10) | static_cast<uint16_t>(man & 0x3ff);
}

namespace {

// Byte offset of the row (kv, block, slot, head) in K (kv 0) or V (kv 1); combined: in K.
int64_t RowOffset(const PagedKvLayer& c, int kv, int64_t block, int slot, int head,
                  int64_t row_bytes) {
  switch (c.layout) {
    case PagedKvLayout::kNhdCombined:
      return (((block * 2 + kv) * c.block_size + slot) * c.num_kv_heads + head) * row_bytes;
    case PagedKvLayout::kHnd:
      return ((block * c.num_kv_heads + head) * c.block_size + slot) * row_bytes;
    case PagedKvLayout::kNhd:
    default:
      return ((block * c.block_size + slot) * c.num_kv_heads + head) * row_bytes;
  }
}

template <bool kInject>
void Copy(uint8_t* chunk, const PagedKvLayer& c, uint8_t* cache_k, uint8_t* cache_v,
          const int32_t* table, int32_t first, int32_t n) {
  const int64_t row_bytes = int64_t{c.head_dim} * static_cast<int64_t>(DtypeSize(c.dtype));
  for (int kv = 0; kv < 2; ++kv) {
    for (int64_t t = 0; t < n; ++t) {
      const int64_t pos = first + t;
      const int32_t block = table[pos / c.block_size];
      if (block < 0 || block >= c.num_blocks) continue;
      const int slot = static_cast<int>(pos % c.block_size);
      for (int h = 0; h < c.num_kv_heads; ++h) {
        uint8_t* base = kv == 0 || c.layout == PagedKvLayout::kNhdCombined ? cache_k : cache_v;
        uint8_t* row = base + RowOffset(c, kv, block, slot, h, row_bytes);
        uint8_t* crow = chunk + ((kv * int64_t{n} + t) * c.num_kv_heads + h) * row_bytes;
        if (kInject) {
          std::memcpy(row, crow, row_bytes);
        } else {
          std::memcpy(crow, row, row_bytes);
        }
      }
    }
  }
}

}  // namespace

void InjectLayer(const uint8_t* src, const PagedKvLayer& cache, uint8_t* cache_k, uint8_t* cache_v,
                 const int32_t* block_table, int32_t first_token, int32_t num_tokens) {
  Copy<true>(const_cast<uint8_t*>(src), cache, cache_k, cache_v, block_table, first_token,
             num_tokens);
}

void ExtractLayer(const PagedKvLayer& cache, const uint8_t* cache_k, const uint8_t* cache_v,
                  const int32_t* block_table, int32_t first_token, int32_t num_tokens,
                  uint8_t* dst) {
  Copy<false>(dst, cache, const_cast<uint8_t*>(cache_k), const_cast<uint8_t*>(cache_v), block_table,
              first_token, num_tokens);
}

std::vector<double> DecodeAttention(const uint16_t* q, const uint16_t* k_cache,
                                    const uint16_t* v_cache, const int32_t* block_tables,
                                    const int32_t* context_lens, int batch, int q_heads,
                                    int kv_heads, int head_dim, int block_size,
                                    int max_blocks_per_seq, bool bf16, double scale) {
  auto f = [bf16](uint16_t x) -> double { return bf16 ? Bf16ToFloat(x) : Fp16ToFloat(x); };
  std::vector<double> out(static_cast<size_t>(batch) * q_heads * head_dim, 0.0);
  const int group = q_heads / kv_heads;
  std::vector<double> scores;
  for (int b = 0; b < batch; ++b) {
    const int ctx = context_lens[b];
    for (int h = 0; h < q_heads; ++h) {
      const int kvh = h / group;
      const uint16_t* qr = q + (static_cast<size_t>(b) * q_heads + h) * head_dim;
      scores.assign(ctx, 0.0);
      double mx = -std::numeric_limits<double>::infinity();
      auto row = [&](const uint16_t* cache, int t) {
        const int64_t block =
            block_tables[static_cast<size_t>(b) * max_blocks_per_seq + t / block_size];
        return cache + ((block * block_size + t % block_size) * kv_heads + kvh) * head_dim;
      };
      for (int t = 0; t < ctx; ++t) {
        const uint16_t* kr = row(k_cache, t);
        double s = 0;
        for (int d = 0; d < head_dim; ++d) s += f(qr[d]) * f(kr[d]);
        scores[t] = s * scale;
        mx = std::max(mx, scores[t]);
      }
      double denom = 0;
      for (int t = 0; t < ctx; ++t) denom += std::exp(scores[t] - mx);
      double* o = &out[(static_cast<size_t>(b) * q_heads + h) * head_dim];
      for (int t = 0; t < ctx; ++t) {
        const double w = std::exp(scores[t] - mx) / denom;
        const uint16_t* vr = row(v_cache, t);
        for (int d = 0; d < head_dim; ++d) o[d] += w * f(vr[d]);
      }
    }
  }
  return out;
}

}  // namespace kvdn::kernels::reference
