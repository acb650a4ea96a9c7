// kvdn::kernels against the CPU references (kernels/reference): copies bit for bit, attention
// within 1e-2 relative error of fp64. GTEST_SKIP without a GPU; run on the GPU machine.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kvdn/kernels/decode_attention.h"
#include "kvdn/kernels/paged_kv.h"
#include "kvdn/testing/status_matchers.h"
#include "reference.h"

namespace kvdn::kernels {
namespace {

using ::kvdn::testing::StatusIs;
using ::testing::HasSubstr;

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << cudaGetErrorString(cudaGetLastError())

bool HaveGpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

// A device buffer that frees itself.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (cudaMalloc(&p_, std::max<size_t>(bytes, 16)) != cudaSuccess) p_ = nullptr;
  }
  ~DeviceBuffer() { cudaFree(p_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* get() const { return p_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }
  cudaError_t Upload(const void* src) {
    return cudaMemcpy(p_, src, bytes_, cudaMemcpyHostToDevice);
  }
  cudaError_t Download(void* dst) const {
    return cudaMemcpy(dst, p_, bytes_, cudaMemcpyDeviceToHost);
  }

 private:
  void* p_ = nullptr;
  size_t bytes_;
};

std::vector<uint8_t> Random(size_t n, std::mt19937_64& rng) {
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

// The cache the bad-argument tests start from: 2 blocks of 16 tokens, 1 head of 32 (NHD).
PagedKvLayer TinyCache(void* k, void* v) {
  PagedKvLayer cache;
  cache.k = k;
  cache.v = v;
  cache.num_blocks = 2;
  cache.block_size = 16;
  cache.num_kv_heads = 1;
  cache.head_dim = 32;
  return cache;
}

// Sets the copy kernel for its lifetime; kAuto again after (also when an assertion returns).
class CopyKernelScope {
 public:
  explicit CopyKernelScope(CopyKernel kernel) { SetCopyKernel(kernel); }
  ~CopyKernelScope() { SetCopyKernel(CopyKernel::kAuto); }
  CopyKernelScope(const CopyKernelScope&) = delete;
  CopyKernelScope& operator=(const CopyKernelScope&) = delete;
};

class KernelsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  }
};

struct CopyCase {
  PagedKvLayout layout;
  int block_size;
  int heads;
  int head_dim;
  Dtype dtype;
  int first_token;
  int num_tokens;
  int bad_every = 0;  // > 0: every bad_every-th block-table entry is out of range (skipped)
};

std::string Name(const CopyCase& c) {
  return std::string(LayoutName(c.layout)) + " bs=" + std::to_string(c.block_size) +
         " H=" + std::to_string(c.heads) + " D=" + std::to_string(c.head_dim) +
         (c.dtype == Dtype::kBFloat16 ? " bf16" : " fp16") +
         " first=" + std::to_string(c.first_token) + " n=" + std::to_string(c.num_tokens) +
         (c.bad_every > 0 ? " bad_every=" + std::to_string(c.bad_every) : "");
}

// Injects a random chunk layer into a poisoned cache, then extracts it into a poisoned buffer;
// both compared bit for bit with the CPU reference run on the same inputs.
void RunCopyCase(const CopyCase& c, uint64_t seed) {
  SCOPED_TRACE(Name(c));
  std::mt19937_64 rng(seed);
  const int end = c.first_token + c.num_tokens;
  const int table_len = (end + c.block_size - 1) / c.block_size + 1;
  const int num_blocks = table_len + 5;
  std::vector<int32_t> table(num_blocks);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), rng);
  table.resize(table_len);
  for (int i = 1; c.bad_every > 0 && i < table_len; i += c.bad_every) {
    table[i] = i % 2 == 1 ? -1 : num_blocks + i;
  }
  PagedKvLayer cache;
  cache.layout = c.layout;
  cache.num_blocks = num_blocks;
  cache.block_size = c.block_size;
  cache.num_kv_heads = c.heads;
  cache.head_dim = c.head_dim;
  cache.dtype = c.dtype;
  const size_t elem = DtypeSize(c.dtype);
  const size_t tensor = size_t{static_cast<size_t>(num_blocks)} * c.block_size * c.heads *
                        c.head_dim * elem * (c.layout == PagedKvLayout::kNhdCombined ? 2 : 1);
  const size_t layer = ChunkLayerBytes(cache, c.num_tokens);
  const bool two = c.layout != PagedKvLayout::kNhdCombined;

  // Inject.
  std::vector<uint8_t> src = Random(layer, rng);
  std::vector<uint8_t> k_host(tensor, 0xCD), v_host(two ? tensor : 0, 0xCD);
  DeviceBuffer d_src(layer), d_k(tensor), d_v(two ? tensor : 16), d_table(table.size() * 4);
  CUDA_OK(d_src.Upload(src.data()));
  CUDA_OK(d_k.Upload(k_host.data()));
  if (two) {
    CUDA_OK(d_v.Upload(v_host.data()));
  }
  CUDA_OK(d_table.Upload(table.data()));
  cache.k = d_k.get();
  cache.v = two ? d_v.get() : nullptr;
  TokenRange range{d_table.as<int32_t>(), table_len, c.first_token, c.num_tokens};
  ASSERT_OK(InjectLayer(d_src.get(), cache, range, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  reference::InjectLayer(src.data(), cache, k_host.data(), two ? v_host.data() : nullptr,
                         table.data(), c.first_token, c.num_tokens);
  std::vector<uint8_t> k_got(tensor), v_got(two ? tensor : 0);
  CUDA_OK(d_k.Download(k_got.data()));
  if (two) {
    CUDA_OK(d_v.Download(v_got.data()));
  }
  EXPECT_EQ(std::memcmp(k_got.data(), k_host.data(), tensor), 0) << "K differs after inject";
  if (two) {
    EXPECT_EQ(std::memcmp(v_got.data(), v_host.data(), tensor), 0) << "V after inject";
  }

  // Extract from a fully random cache.
  k_host = Random(tensor, rng);
  if (two) v_host = Random(tensor, rng);
  CUDA_OK(d_k.Upload(k_host.data()));
  if (two) {
    CUDA_OK(d_v.Upload(v_host.data()));
  }
  std::vector<uint8_t> want(layer, 0xAB), got(layer);
  CUDA_OK(d_src.Upload(want.data()));  // poison
  ASSERT_OK(ExtractLayer(cache, range, d_src.get(), nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  reference::ExtractLayer(cache, k_host.data(), two ? v_host.data() : nullptr, table.data(),
                          c.first_token, c.num_tokens, want.data());
  CUDA_OK(d_src.Download(got.data()));
  EXPECT_EQ(std::memcmp(got.data(), want.data(), layer), 0) << "extract differs";
}

// Both copy kernels (on sm_90 and later kAuto runs the bulk-copy one for the NHD layouts where
// rows are 16-byte aligned): every layout, block sizes 1..64 and odd ones, partial first and last
// blocks, rows of 144 and 14 bytes, tokens of up to 32 KiB over all heads (one row a stage) and of
// 64 KiB (the vector kernel), block tables with entries out of range.
TEST_F(KernelsTest, InjectExtractMatchTheReferenceBitForBit) {
  for (CopyKernel kernel : {CopyKernel::kAuto, CopyKernel::kVector}) {
    SCOPED_TRACE(kernel == CopyKernel::kAuto ? "kAuto" : "kVector");
    const CopyKernelScope scope(kernel);
    uint64_t seed = 1;
    for (PagedKvLayout layout :
         {PagedKvLayout::kNhd, PagedKvLayout::kNhdCombined, PagedKvLayout::kHnd}) {
      for (int bs : {1, 3, 16, 17, 64}) {
        for (Dtype dt : {Dtype::kBFloat16, Dtype::kFloat16}) {
          for (auto [first, n] : {std::pair{0, 256}, std::pair{5, 255}, std::pair{37, 1}}) {
            RunCopyCase({layout, bs, 8, 128, dt, first, n}, seed++);
          }
        }
        RunCopyCase({layout, bs, 8, 128, Dtype::kBFloat16, 3, 300, 3}, seed++);
      }
      // Odd head shapes take the narrower vector paths (144-byte rows: 16; 14-byte rows: 2).
      RunCopyCase({layout, 16, 3, 72, Dtype::kBFloat16, 3, 100}, seed++);
      RunCopyCase({layout, 5, 2, 7, Dtype::kFloat16, 1, 33}, seed++);
      RunCopyCase({layout, 16, 32, 128, Dtype::kBFloat16, 0, 4096}, seed++);
      RunCopyCase({layout, 16, 128, 128, Dtype::kBFloat16, 7, 70, 4}, seed++);
      RunCopyCase({layout, 16, 256, 128, Dtype::kBFloat16, 7, 70}, seed++);
    }
  }
}

// The sweep above ran the kernels these paths name: on sm_90+ kAuto moves whole token rows by
// bulk copies where a token's heads are contiguous and transposes HND pages by tensor maps.
TEST_F(KernelsTest, CopyPathsAreTheOnesTheSweepMeantToRun) {
  int dev = 0, major = 0;
  CUDA_OK(cudaGetDevice(&dev));
  CUDA_OK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  DeviceBuffer k(1 << 20), v(1 << 20);
  auto cache = [&](PagedKvLayout layout, int bs, int heads, int dim) {
    PagedKvLayer c;
    c.k = k.get();
    c.v = layout == PagedKvLayout::kNhdCombined ? nullptr : v.get();
    c.layout = layout;
    c.num_blocks = 4;
    c.block_size = bs;
    c.num_kv_heads = heads;
    c.head_dim = dim;
    return c;
  };
  const CopyPath bulk = major >= 9 ? CopyPath::kBulkRows : CopyPath::kVector;
  const CopyPath tmap = major >= 9 ? CopyPath::kTensorMap : CopyPath::kVector;
  EXPECT_EQ(PlannedCopyPath(cache(PagedKvLayout::kNhd, 16, 8, 128)), bulk);
  EXPECT_EQ(PlannedCopyPath(cache(PagedKvLayout::kNhdCombined, 64, 8, 128)), bulk);
  EXPECT_EQ(PlannedCopyPath(cache(PagedKvLayout::kHnd, 1, 8, 128)), bulk);
  EXPECT_EQ(PlannedCopyPath(cache(PagedKvLayout::kHnd, 16, 8, 128)), tmap);
  EXPECT_EQ(PlannedCopyPath(cache(PagedKvLayout::kHnd, 17, 128, 128)), tmap);
  // 144-byte rows x 3 heads: not a multiple of 128 bytes; 64 KiB token rows: over two stages.
  EXPECT_EQ(PlannedCopyPath(cache(PagedKvLayout::kHnd, 16, 3, 72)), CopyPath::kVector);
  EXPECT_EQ(PlannedCopyPath(cache(PagedKvLayout::kHnd, 16, 256, 128)), CopyPath::kVector);
  EXPECT_EQ(PlannedCopyPath(cache(PagedKvLayout::kNhd, 16, 256, 128)), CopyPath::kVector);
  const CopyKernelScope vector(CopyKernel::kVector);
  EXPECT_EQ(PlannedCopyPath(cache(PagedKvLayout::kHnd, 16, 8, 128)), CopyPath::kVector);
  EXPECT_STREQ(CopyPathName(CopyPath::kTensorMap), "tensor map");
}

TEST_F(KernelsTest, BadBlockTableEntriesAreSkippedNotWritten) {
  PagedKvLayer cache;
  cache.num_blocks = 4;
  cache.block_size = 2;
  cache.num_kv_heads = 1;
  cache.head_dim = 8;
  const size_t tensor = 4 * 2 * 8 * 2;
  std::vector<uint8_t> poison(tensor, 0xCD);
  DeviceBuffer k(tensor), v(tensor), src(ChunkLayerBytes(cache, 8)), table(4 * 4);
  CUDA_OK(k.Upload(poison.data()));
  CUDA_OK(v.Upload(poison.data()));
  std::vector<uint8_t> data(ChunkLayerBytes(cache, 8), 0x11);
  CUDA_OK(src.Upload(data.data()));
  const std::vector<int32_t> bad = {-1, 4, 1000, -7};
  CUDA_OK(table.Upload(bad.data()));
  cache.k = k.get();
  cache.v = v.get();
  ASSERT_OK(InjectLayer(src.get(), cache, {table.as<int32_t>(), 4, 0, 8}, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<uint8_t> got(tensor);
  CUDA_OK(k.Download(got.data()));
  EXPECT_EQ(got, poison);
  CUDA_OK(v.Download(got.data()));
  EXPECT_EQ(got, poison);
}

TEST_F(KernelsTest, BadCopyArgumentsAreInvalidArgument) {
  DeviceBuffer k(4096), v(4096), src(4096), table(64);
  const PagedKvLayer cache = TinyCache(k.get(), v.get());
  TokenRange r{table.as<int32_t>(), 2, 0, 32};
  EXPECT_OK(InjectLayer(src.get(), cache, r, nullptr));
  EXPECT_THAT(InjectLayer(src.get(), cache, {table.as<int32_t>(), 2, 1, 32}, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("the table has 2")));
  EXPECT_THAT(InjectLayer(nullptr, cache, r, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("src is null")));
  EXPECT_THAT(ExtractLayer(cache, r, nullptr, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dst is null")));
  PagedKvLayer no_v = cache;
  no_v.v = nullptr;
  EXPECT_THAT(InjectLayer(src.get(), no_v, r, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("cache.v is null")));
  PagedKvLayer combined = cache;
  combined.layout = PagedKvLayout::kNhdCombined;
  EXPECT_THAT(InjectLayer(src.get(), combined, r, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("must be null")));
  PagedKvLayer zero = cache;
  zero.head_dim = 0;
  EXPECT_THAT(InjectLayer(src.get(), zero, r, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("head_dim")));
  EXPECT_THAT(InjectLayer(src.get(), cache, {nullptr, 2, 0, 32}, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("block_table is null")));
  EXPECT_THAT(InjectLayer(src.get(), cache, {table.as<int32_t>(), 2, -1, 3}, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("negative")));
}

// InjectChunkLayer (many chunks' layer in one launch, from payloads that lie apart) writes what
// InjectLayer writes chunk by chunk, in every layout, for aligned and misaligned payloads, and
// so it does from payloads in page-locked host memory (read over PCIe: how the connector loads
// out of kvdnd's mapped host tier), with either kernel; bad sources are refused naming the
// source.
TEST_F(KernelsTest, InjectChunkLayerWritesWhatInjectLayerWritesChunkByChunk) {
  constexpr int kLayers = 3, kTpc = 32, kHeads = 4, kDim = 64;
  const std::vector<int> tokens = {32, 32, 32, 32, 9};
  uint64_t seed = 100;
  for (PagedKvLayout layout :
       {PagedKvLayout::kNhd, PagedKvLayout::kNhdCombined, PagedKvLayout::kHnd}) {
    for (int bs : {16, 7, 1}) {
      for (size_t misalign : {size_t{64}, size_t{66}}) {  // 16-byte or only 2-byte aligned
        SCOPED_TRACE(std::string(LayoutName(layout)) + " bs=" + std::to_string(bs) +
                     " misalign=" + std::to_string(misalign));
        std::mt19937_64 rng(seed++);
        const int total = kTpc * 4 + 9;
        const int table_len = (total + bs - 1) / bs;
        const int num_blocks = table_len + 3;
        std::vector<int32_t> table(num_blocks);
        std::iota(table.begin(), table.end(), 0);
        std::shuffle(table.begin(), table.end(), rng);
        table.resize(table_len);
        PagedKvLayer cache;
        cache.layout = layout;
        cache.num_blocks = num_blocks;
        cache.block_size = bs;
        cache.num_kv_heads = kHeads;
        cache.head_dim = kDim;
        const bool two = layout != PagedKvLayout::kNhdCombined;
        const size_t tensor =
            size_t{static_cast<size_t>(num_blocks)} * bs * kHeads * kDim * 2 * (two ? 1 : 2);
        // Whole chunk payloads in slots of one pool, in reverse order, 8 KiB apart.
        const size_t slot = 8192 + static_cast<size_t>(kLayers) * ChunkLayerBytes(cache, kTpc);
        std::vector<size_t> offsets;
        for (size_t i = 0; i < tokens.size(); ++i)
          offsets.push_back((tokens.size() - 1 - i) * slot);
        const size_t pool_bytes = tokens.size() * slot;
        std::vector<uint8_t> pool = Random(pool_bytes, rng);
        DeviceBuffer d_pool(pool_bytes), d_table(table.size() * 4);
        CUDA_OK(d_pool.Upload(pool.data()));
        CUDA_OK(d_table.Upload(table.data()));
        std::vector<ChunkSource> sources;
        int first = 0;
        for (size_t i = 0; i < tokens.size(); ++i) {
          sources.push_back({d_pool.as<uint8_t>() + offsets[i] + misalign, first, tokens[i]});
          first += tokens[i];
        }
        DeviceBuffer d_sources(sources.size() * sizeof(ChunkSource));
        CUDA_OK(d_sources.Upload(sources.data()));
        // The same payloads in page-locked host memory.
        void* h_pool = nullptr;
        CUDA_OK(cudaHostAlloc(&h_pool, pool_bytes, cudaHostAllocDefault));
        std::unique_ptr<void, cudaError_t (*)(void*)> h_pool_owner(h_pool, cudaFreeHost);
        std::memcpy(h_pool, pool.data(), pool_bytes);
        std::vector<ChunkSource> host_sources = sources;
        for (size_t i = 0; i < tokens.size(); ++i) {
          host_sources[i].payload = static_cast<uint8_t*>(h_pool) + offsets[i] + misalign;
        }
        DeviceBuffer d_host_sources(host_sources.size() * sizeof(ChunkSource));
        CUDA_OK(d_host_sources.Upload(host_sources.data()));
        std::vector<uint8_t> poison(tensor, 0xCD);
        DeviceBuffer ak(tensor), av(tensor), bk(tensor), bv(tensor), ck(tensor), cv(tensor);
        for (DeviceBuffer* b : {&ak, &av, &bk, &bv}) CUDA_OK(b->Upload(poison.data()));
        for (int l = 0; l < kLayers; ++l) {
          PagedKvLayer a = cache, b = cache;
          a.k = ak.get();
          a.v = two ? av.get() : nullptr;
          b.k = bk.get();
          b.v = two ? bv.get() : nullptr;
          // The bulk-copy kernel (where it runs) against the vector kernel chunk by chunk.
          ASSERT_OK(InjectChunkLayer(sources, d_sources.as<ChunkSource>(), l, a,
                                     d_table.as<int32_t>(), table_len, nullptr));
          const CopyKernelScope vector(CopyKernel::kVector);
          for (const ChunkSource& src : sources) {
            const uint8_t* layer_src =
                static_cast<const uint8_t*>(src.payload) +
                static_cast<size_t>(l) * ChunkLayerBytes(cache, src.num_tokens);
            ASSERT_OK(InjectLayer(
                layer_src, b, {d_table.as<int32_t>(), table_len, src.first_token, src.num_tokens},
                nullptr));
          }
          CUDA_OK(cudaDeviceSynchronize());
          std::vector<uint8_t> got(tensor), want(tensor);
          CUDA_OK(ak.Download(got.data()));
          CUDA_OK(bk.Download(want.data()));
          EXPECT_TRUE(got == want) << "layer " << l << " K";
          EXPECT_FALSE(got == poison) << "layer " << l << ": nothing written";
          if (two) {
            CUDA_OK(av.Download(got.data()));
            CUDA_OK(bv.Download(want.data()));
            EXPECT_TRUE(got == want) << "layer " << l << " V";
          }
          for (CopyKernel kernel : {CopyKernel::kVector, CopyKernel::kAuto}) {
            const CopyKernelScope automatic(CopyKernel::kAuto);  // the argument picks
            CUDA_OK(ck.Upload(poison.data()));
            CUDA_OK(cv.Upload(poison.data()));
            PagedKvLayer c = cache;
            c.k = ck.get();
            c.v = two ? cv.get() : nullptr;
            ASSERT_OK(InjectChunkLayer(host_sources, d_host_sources.as<ChunkSource>(), l, c,
                                       d_table.as<int32_t>(), table_len, nullptr, kernel));
            CUDA_OK(cudaDeviceSynchronize());
            std::vector<uint8_t> from_host(tensor), want_k(tensor);
            CUDA_OK(bk.Download(want_k.data()));
            CUDA_OK(ck.Download(from_host.data()));
            EXPECT_TRUE(from_host == want_k)
                << "layer " << l << " K from host memory, kernel " << static_cast<int>(kernel);
            if (two) {
              CUDA_OK(bv.Download(want.data()));
              CUDA_OK(cv.Download(from_host.data()));
              EXPECT_TRUE(from_host == want) << "layer " << l << " V from host memory";
            }
          }
        }
      }
    }
  }
  // Bad sources.
  DeviceBuffer k(4096), v(4096), src(4096), table(64), dev(64);
  const PagedKvLayer cache = TinyCache(k.get(), v.get());
  const std::vector<ChunkSource> one = {{src.get(), 0, 32}};
  const auto* d = dev.as<ChunkSource>();
  EXPECT_THAT(InjectChunkLayer(one, nullptr, 0, cache, table.as<int32_t>(), 2, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("device_sources is null")));
  EXPECT_THAT(InjectChunkLayer(one, d, -1, cache, table.as<int32_t>(), 2, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layer -1 is negative")));
  const std::vector<ChunkSource> past = {{src.get(), 0, 16}, {src.get(), 16, 32}};
  EXPECT_THAT(InjectChunkLayer(past, d, 0, cache, table.as<int32_t>(), 2, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("sources[1]: tokens up to")));
  const std::vector<ChunkSource> null_payload = {{src.get(), 0, 8}, {nullptr, 8, 8}};
  EXPECT_THAT(
      InjectChunkLayer(null_payload, d, 0, cache, table.as<int32_t>(), 2, nullptr),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("sources[1].payload is null")));
  const std::vector<ChunkSource> too_many(65536, ChunkSource{src.get(), 0, 1});
  EXPECT_THAT(InjectChunkLayer(too_many, d, 0, cache, table.as<int32_t>(), 2, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("at most 65535")));
}

TEST_F(KernelsTest, PrefetchRespectsTheBudgetAndWritesNothing) {
  std::mt19937_64 rng(3);
  PagedKvLayer cache;
  cache.num_blocks = 64;
  cache.block_size = 16;
  cache.num_kv_heads = 8;
  cache.head_dim = 128;
  const size_t tensor = size_t{64} * 16 * 8 * 128 * 2;
  auto kh = Random(tensor, rng), vh = Random(tensor, rng);
  DeviceBuffer k(tensor), v(tensor), table(64 * 4);
  CUDA_OK(k.Upload(kh.data()));
  CUDA_OK(v.Upload(vh.data()));
  std::vector<int32_t> t(64);
  std::iota(t.begin(), t.end(), 0);
  std::shuffle(t.begin(), t.end(), rng);
  CUDA_OK(table.Upload(t.data()));
  cache.k = k.get();
  cache.v = v.get();
  uint64_t bytes = 0;
  ASSERT_OK(PrefetchL2(cache, {table.as<int32_t>(), 64, 0, 1024}, 0, nullptr, &bytes));
  EXPECT_EQ(bytes, tensor * 2);
  ASSERT_OK(PrefetchL2(cache, {table.as<int32_t>(), 64, 0, 1024}, 1 << 20, nullptr, &bytes));
  EXPECT_EQ(bytes, 1u << 20);  // 16 blocks x (K + V) x 32 KiB
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<uint8_t> got(tensor);
  CUDA_OK(k.Download(got.data()));
  EXPECT_EQ(got, kh);
  CUDA_OK(v.Download(got.data()));
  EXPECT_EQ(got, vh);
  PagedKvLayer odd = cache;
  odd.head_dim = 4;  // 8-byte blocks
  odd.num_kv_heads = 1;
  odd.block_size = 1;
  EXPECT_THAT(PrefetchL2(odd, {table.as<int32_t>(), 64, 0, 16}, 0, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("16-byte aligned blocks")));
  // The batched form: 2 sequences x 32 blocks of the same table (contexts 512 and 100 tokens).
  DeviceBuffer lens(8);
  const std::vector<int32_t> ctx_lens = {512, 100};
  CUDA_OK(lens.Upload(ctx_lens.data()));
  ASSERT_OK(
      PrefetchL2Batch(cache, table.as<int32_t>(), 32, lens.as<int32_t>(), 2, 0, nullptr, &bytes));
  EXPECT_EQ(bytes, 2u * 32 * 2 * 32768);
  ASSERT_OK(PrefetchL2Batch(cache, table.as<int32_t>(), 32, lens.as<int32_t>(), 2, 1 << 20, nullptr,
                            &bytes));
  EXPECT_EQ(bytes, 1u << 20);  // 8 blocks per sequence
  EXPECT_THAT(PrefetchL2Batch(cache, table.as<int32_t>(), 32, nullptr, 2, 0, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("context_lens")));
  EXPECT_THAT(PrefetchL2Batch(cache, table.as<int32_t>(), 0, lens.as<int32_t>(), 2, 0, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_blocks_per_seq 0")));
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(k.Download(got.data()));
  EXPECT_EQ(got, kh);
  // A range starting mid-block prefetches the whole first and last blocks.
  ASSERT_OK(PrefetchL2(cache, {table.as<int32_t>(), 64, 5, 20}, 0, nullptr, &bytes));
  EXPECT_EQ(bytes, 2u * 2 * 32768);  // blocks 0 and 1, K and V, 32 KiB each
}

// What a case passes as DecodeAttentionArgs::sum_context_lens: nothing, the true sum, or an
// understated one (half of it; 1), which must still give correct results.
enum class SumHint { kNone, kTrue, kHalf, kOne };

struct AttnCase {
  int q_heads;
  int kv_heads;
  Dtype dtype;
  int block_size;
  std::vector<int> contexts;  // per sequence
  PrefetchMode prefetch;
  int splits;        // 0 = auto
  int lanes = 0;     // lanes per token (0 = default; CUDA-core kernel only)
  int distance = 0;  // prefetch distance (0 = default; CUDA-core kernel only)
  DecodeKernel kernel = DecodeKernel::kAuto;
  PagedKvLayout layout = PagedKvLayout::kNhd;
  SumHint sum = SumHint::kNone;
};

int64_t SumOf(const std::vector<int>& contexts, SumHint hint) {
  const int64_t sum = std::accumulate(contexts.begin(), contexts.end(), int64_t{0});
  switch (hint) {
    case SumHint::kNone:
      return 0;
    case SumHint::kTrue:
      return sum;
    case SumHint::kHalf:
      return sum / 2;
    case SumHint::kOne:
      return 1;
  }
  return 0;
}

// The NHD cache `nhd` ([blocks][bs][heads][D]; `v` too for the combined layout) in `layout`.
std::vector<uint16_t> ToLayout(const std::vector<uint16_t>& nhd, const std::vector<uint16_t>& v,
                               PagedKvLayout layout, int blocks, int bs, int heads, int D) {
  if (layout == PagedKvLayout::kNhd) return nhd;
  std::vector<uint16_t> out(layout == PagedKvLayout::kNhdCombined ? 2 * nhd.size() : nhd.size());
  for (int blk = 0; blk < blocks; ++blk) {
    for (int slot = 0; slot < bs; ++slot) {
      for (int h = 0; h < heads; ++h) {
        const size_t src = ((static_cast<size_t>(blk) * bs + slot) * heads + h) * D;
        if (layout == PagedKvLayout::kHnd) {
          std::copy_n(&nhd[src], D, &out[((static_cast<size_t>(blk) * heads + h) * bs + slot) * D]);
        } else {
          for (int kv = 0; kv < 2; ++kv) {
            const size_t dst = (((static_cast<size_t>(blk) * 2 + kv) * bs + slot) * heads + h) *
                               static_cast<size_t>(D);
            std::copy_n(kv == 0 ? &nhd[src] : &v[src], D, &out[dst]);
          }
        }
      }
    }
  }
  return out;
}

void RunAttention(const AttnCase& c, uint64_t seed) {
  const bool bf16 = c.dtype == Dtype::kBFloat16;
  const int batch = static_cast<int>(c.contexts.size());
  const int max_ctx = *std::max_element(c.contexts.begin(), c.contexts.end());
  SCOPED_TRACE(::testing::Message()
               << c.q_heads << "/" << c.kv_heads << (bf16 ? " bf16" : " fp16")
               << " bs=" << c.block_size << " batch=" << batch << " max_ctx=" << max_ctx
               << " prefetch=" << PrefetchModeName(c.prefetch) << " splits=" << c.splits
               << " lanes=" << c.lanes << " kernel=" << DecodeKernelName(c.kernel)
               << " layout=" << LayoutName(c.layout) << " sum=" << static_cast<int>(c.sum));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto to16 = [&](float f) { return bf16 ? reference::FloatToBf16(f) : reference::FloatToFp16(f); };
  const int D = 128;
  const int max_blocks = std::max(1, (max_ctx + c.block_size - 1) / c.block_size);
  const int num_blocks = batch * max_blocks + 3;
  std::vector<int32_t> pool(num_blocks);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng);
  std::vector<int32_t> tables(static_cast<size_t>(batch) * max_blocks);
  for (size_t i = 0; i < tables.size(); ++i) tables[i] = pool[i];
  const size_t cache_elems = static_cast<size_t>(num_blocks) * c.block_size * c.kv_heads * D;
  std::vector<uint16_t> q(static_cast<size_t>(batch) * c.q_heads * D), k(cache_elems),
      v(cache_elems);
  for (auto& x : q) x = to16(normal(rng));
  for (auto& x : k) x = to16(normal(rng));
  for (auto& x : v) x = to16(normal(rng));
  const bool combined = c.layout == PagedKvLayout::kNhdCombined;
  const std::vector<uint16_t> k_dev =
      ToLayout(k, v, c.layout, num_blocks, c.block_size, c.kv_heads, D);
  const std::vector<uint16_t> v_dev =
      combined ? std::vector<uint16_t>{}
               : ToLayout(v, v, c.layout, num_blocks, c.block_size, c.kv_heads, D);
  DeviceBuffer dq(q.size() * 2), dk(k_dev.size() * 2), dv(std::max<size_t>(v_dev.size(), 1) * 2),
      dt(tables.size() * 4), dctx(c.contexts.size() * 4), dout(q.size() * 2);
  CUDA_OK(dq.Upload(q.data()));
  CUDA_OK(dk.Upload(k_dev.data()));
  if (!combined) {
    CUDA_OK(dv.Upload(v_dev.data()));
  }
  CUDA_OK(dt.Upload(tables.data()));
  CUDA_OK(dctx.Upload(c.contexts.data()));
  CUDA_OK(cudaMemset(dout.get(), 0xFF, q.size() * 2));  // NaN in both formats
  DecodeAttentionArgs a;
  a.q = dq.get();
  a.k_cache = dk.get();
  a.v_cache = combined ? nullptr : dv.get();
  a.layout = c.layout;
  a.block_tables = dt.as<int32_t>();
  a.context_lens = dctx.as<int32_t>();
  a.out = dout.get();
  a.batch = batch;
  a.num_q_heads = c.q_heads;
  a.num_kv_heads = c.kv_heads;
  a.block_size = c.block_size;
  a.num_blocks = num_blocks;
  a.max_blocks_per_seq = max_blocks;
  a.max_context_len = max_ctx;
  a.dtype = c.dtype;
  a.prefetch = c.prefetch;
  a.num_splits = c.splits;
  a.lanes_per_token = c.lanes;
  a.prefetch_distance = c.distance;
  a.kernel = c.kernel;
  a.sum_context_lens = SumOf(c.contexts, c.sum);
  ASSERT_OK_AND_ASSIGN(DecodePlan plan, PlanDecodeAttention(a));
  EXPECT_EQ(plan.kernel, c.kernel == DecodeKernel::kCudaCore ? DecodeKernel::kCudaCore
                                                             : DecodeKernel::kTensorCore);
  DeviceBuffer ws(plan.workspace_bytes);
  a.workspace = ws.get();
  a.workspace_bytes = plan.workspace_bytes;
  ASSERT_OK(PagedDecodeAttention(a, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<uint16_t> out(q.size());
  CUDA_OK(dout.Download(out.data()));
  const std::vector<double> ref = reference::DecodeAttention(
      q.data(), k.data(), v.data(), tables.data(), c.contexts.data(), batch, c.q_heads, c.kv_heads,
      D, c.block_size, max_blocks, bf16, 1.0 / std::sqrt(128.0));
  double num = 0, den = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double o = bf16 ? reference::Bf16ToFloat(out[i]) : reference::Fp16ToFloat(out[i]);
    ASSERT_FALSE(std::isnan(o)) << "output " << i << " not written";
    num += (o - ref[i]) * (o - ref[i]);
    den += ref[i] * ref[i];
  }
  const double rel = den == 0 ? std::sqrt(num) : std::sqrt(num / den);
  EXPECT_LT(rel, 1e-2) << "relative error " << rel << " (" << plan.num_splits << " splits"
                       << (plan.packed_splits ? ", packed" : "") << ")";
}

// Runs `cases` (each with its seed) on as many threads as the host has cores, at most 16: the
// time goes to the host (random data, layouts, the fp64 reference), one case at a time took 5
// minutes on a 16-core host. Assertions in the workers are gtest's own (thread-safe with
// pthreads); a case's failure names its shape through RunAttention's SCOPED_TRACE.
void RunAttentionCases(const std::vector<std::pair<AttnCase, uint64_t>>& cases) {
  const int threads =
      static_cast<int>(std::clamp<unsigned>(std::thread::hardware_concurrency(), 1u, 16u));
  std::atomic<size_t> next{0};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&] {
      for (size_t i = next++; i < cases.size(); i = next++) {
        RunAttention(cases[i].first, cases[i].second);
      }
    });
  }
  for (std::thread& w : workers) w.join();
}

TEST_F(KernelsTest, DecodeAttentionMatchesTheFp64Reference) {
  uint64_t seed = 100;
  std::vector<std::pair<AttnCase, uint64_t>> cases;
  const std::vector<std::vector<int>> batches = {
      {1}, {17}, {4096}, {1000, 1, 0, 333, 2048, 15, 16, 17}};
  for (DecodeKernel kernel : {DecodeKernel::kTensorCore, DecodeKernel::kCudaCore}) {
    for (auto [qh, kvh] :
         {std::pair{32, 8}, std::pair{64, 8}, std::pair{32, 32}, std::pair{8, 4}}) {
      for (Dtype dt : {Dtype::kBFloat16, Dtype::kFloat16}) {
        // Every block size for the Llama-3-8B shape (7: tiles cross blocks); 16 for the others.
        for (int bs : qh == 32 && kvh == 8 ? std::vector<int>{16, 64, 7} : std::vector<int>{16}) {
          for (const auto& ctx : batches) {
            for (PrefetchMode pf : {PrefetchMode::kOff, PrefetchMode::kOn}) {
              cases.push_back({{qh, kvh, dt, bs, ctx, pf, 0, 0, 0, kernel}, seed++});
            }
          }
        }
      }
    }
    // The other cache layouts (tensor-core kernel): block sizes on and off the tile grid.
    if (kernel == DecodeKernel::kTensorCore) {
      for (PagedKvLayout layout : {PagedKvLayout::kHnd, PagedKvLayout::kNhdCombined}) {
        for (Dtype dt : {Dtype::kBFloat16, Dtype::kFloat16}) {
          for (int bs : {16, 7}) {
            for (const auto& ctx : batches) {
              for (PrefetchMode pf : {PrefetchMode::kOff, PrefetchMode::kOn}) {
                cases.push_back({{32, 8, dt, bs, ctx, pf, 0, 0, 0, kernel, layout}, seed++});
              }
            }
          }
        }
      }
    }
    // A large batch (79 sequences) of random lengths.
    std::mt19937 rng(5);
    std::vector<int> ctx(79);
    for (int& x : ctx) x = static_cast<int>(rng() % 1500);
    cases.push_back(
        {{32, 8, Dtype::kBFloat16, 16, ctx, PrefetchMode::kAuto, 0, 0, 0, kernel}, seed++});
  }
  RunAttentionCases(cases);
}

// Small shapes at the edges (also what compute-sanitizer runs): empty and one-token sequences,
// forced split counts including more splits than blocks, a token count off the block grid.
TEST_F(KernelsTest, DecodeAttentionEdgeCases) {
  uint64_t seed = 900;
  std::vector<std::pair<AttnCase, uint64_t>> cases;
  const DecodeKernel cc = DecodeKernel::kCudaCore;
  for (int splits : {1, 2, 3, 64}) {
    for (PrefetchMode pf : {PrefetchMode::kOff, PrefetchMode::kOn}) {
      for (int lanes : {8, 16}) {
        cases.push_back(
            {{32, 8, Dtype::kBFloat16, 16, {3000, 70, 1, 0}, pf, splits, lanes, 0, cc}, seed++});
      }
    }
  }
  for (int lanes : {8, 16}) {
    cases.push_back(
        {{32, 32, Dtype::kFloat16, 16, {999, 2}, PrefetchMode::kOn, 0, lanes, 0, cc}, seed++});
    cases.push_back(
        {{16, 8, Dtype::kBFloat16, 64, {4000, 2}, PrefetchMode::kOff, 0, lanes, 0, cc}, seed++});
  }
  cases.push_back(
      {{8, 8, Dtype::kFloat16, 5, {1, 2, 3, 4, 5, 6, 7}, PrefetchMode::kOn, 0, 0, 0, cc}, seed++});
  cases.push_back({{16, 2, Dtype::kBFloat16, 64, {0}, PrefetchMode::kAuto, 0, 0, 0, cc}, seed++});
  for (int distance : {2, 5}) {
    cases.push_back({{32,
                      8,
                      Dtype::kBFloat16,
                      16,
                      {3000, 70, 1},
                      PrefetchMode::kOn,
                      0,
                      8,
                      distance,
                      DecodeKernel::kCudaCore},
                     seed++});
  }
  // The tensor-core kernel: forced splits (more splits than tiles too), tiles that end
  // mid-block and mid-tile, one-token and empty sequences, odd block sizes (rows of one tile in
  // several blocks), every group size.
  const DecodeKernel tc = DecodeKernel::kTensorCore;
  for (int splits : {1, 2, 3, 64}) {
    for (PrefetchMode pf : {PrefetchMode::kOff, PrefetchMode::kOn}) {
      cases.push_back(
          {{32, 8, Dtype::kBFloat16, 16, {3000, 70, 1, 0}, pf, splits, 0, 0, tc}, seed++});
      cases.push_back(
          {{32, 8, Dtype::kFloat16, 48, {3001, 33, 17, 0}, pf, splits, 0, 0, tc}, seed++});
    }
  }
  for (int bs : {1, 3, 17, 32}) {
    cases.push_back(
        {{32, 8, Dtype::kBFloat16, bs, {700, 31, 16, 15, 1}, PrefetchMode::kAuto, 0, 0, 0, tc},
         seed++});
    for (PagedKvLayout layout : {PagedKvLayout::kHnd, PagedKvLayout::kNhdCombined}) {
      cases.push_back({{32,
                        8,
                        Dtype::kFloat16,
                        bs,
                        {700, 31, 16, 15, 1, 0},
                        PrefetchMode::kOn,
                        3,
                        0,
                        0,
                        tc,
                        layout},
                       seed++});
    }
  }
  cases.push_back({{32,
                    32,
                    Dtype::kBFloat16,
                    16,
                    {999, 2},
                    PrefetchMode::kOn,
                    0,
                    0,
                    0,
                    tc,
                    PagedKvLayout::kHnd},
                   seed++});
  cases.push_back(
      {{8, 8, Dtype::kFloat16, 5, {1, 2, 3, 4, 5, 6, 7}, PrefetchMode::kOn, 0, 0, 0, tc}, seed++});
  cases.push_back({{16, 2, Dtype::kBFloat16, 64, {0}, PrefetchMode::kAuto, 0, 0, 0, tc}, seed++});
  cases.push_back(
      {{16, 8, Dtype::kBFloat16, 64, {4000, 2}, PrefetchMode::kOn, 0, 0, 0, tc}, seed++});
  RunAttentionCases(cases);
}

// Arguments that PlanDecodeAttention accepts as to their pointers, all in `buf` (plans only:
// nothing is launched with them), for the Llama-3-8B heads; the caller sets the shape.
DecodeAttentionArgs ArgsFor(DeviceBuffer& buf) {
  DecodeAttentionArgs a;
  a.q = a.k_cache = a.v_cache = buf.get();
  a.out = buf.get();
  a.block_tables = a.context_lens = buf.as<int32_t>();
  a.num_q_heads = 32;
  a.num_kv_heads = 8;
  a.block_size = 16;
  return a;
}

// A batch of short sequences and a few long ones, with sum_context_lens: the long ones get more
// splits, packed (tensor-core kernel); results as without it, also when the sum is understated
// (the kernel then makes its splits longer to fit what was launched) and for the baseline kernel,
// which ignores it. A uniform batch plans the same with the sum as without.
TEST_F(KernelsTest, SkewedBatchesSplitByTheSumOfTheirLengths) {
  DeviceBuffer buf(1 << 20);
  DecodeAttentionArgs a = ArgsFor(buf);
  a.num_blocks = 1 << 16;
  a.max_blocks_per_seq = 2048;
  a.max_context_len = 32768;
  a.batch = 32;
  ASSERT_OK_AND_ASSIGN(DecodePlan uniform, PlanDecodeAttention(a));
  a.sum_context_lens = int64_t{32} * 32768;  // every sequence as long as the longest
  ASSERT_OK_AND_ASSIGN(DecodePlan same, PlanDecodeAttention(a));
  EXPECT_EQ(same.num_splits, uniform.num_splits);
  EXPECT_EQ(same.split_tokens, uniform.split_tokens);
  EXPECT_FALSE(same.packed_splits);
  EXPECT_EQ(same.workspace_bytes, uniform.workspace_bytes);
  a.sum_context_lens = int64_t{32} * 32768 * 3 / 4 + 1;  // nearly uniform: planned as uniform
  ASSERT_OK_AND_ASSIGN(DecodePlan nearly, PlanDecodeAttention(a));
  EXPECT_EQ(nearly.num_splits, uniform.num_splits);
  EXPECT_FALSE(nearly.packed_splits);
  // One sequence of 32K and 31 of 1K: without the sum, one split each (32 x 8 CTAs fill the
  // GPU), and the long sequence's 8 CTAs read 16 MiB each while the others read 0.5.
  a.sum_context_lens = 32768 + 31 * 1024;
  ASSERT_OK_AND_ASSIGN(DecodePlan skewed, PlanDecodeAttention(a));
  EXPECT_TRUE(skewed.packed_splits);
  EXPECT_GT(skewed.num_splits, uniform.num_splits);
  EXPECT_LE(skewed.split_tokens, 4096);
  EXPECT_EQ(skewed.work_items,
            (a.sum_context_lens + skewed.split_tokens - 1) / skewed.split_tokens + a.batch);
  EXPECT_EQ(skewed.ctas, skewed.work_items * a.num_kv_heads);
  EXPECT_EQ(skewed.workspace_bytes,
            static_cast<size_t>(skewed.work_items) * a.num_q_heads * 129 * sizeof(float));
  a.kernel = DecodeKernel::kCudaCore;  // the baseline splits uniformly
  ASSERT_OK_AND_ASSIGN(DecodePlan cuda_core, PlanDecodeAttention(a));
  EXPECT_FALSE(cuda_core.packed_splits);

  uint64_t seed = 1300;
  std::vector<std::pair<AttnCase, uint64_t>> cases;
  std::vector<int> one_long(24, 100);
  one_long[5] = 6000;
  one_long[9] = 0;
  one_long[23] = 1;
  std::vector<int> ragged(40);
  std::mt19937 rng(11);
  for (int& x : ragged) x = static_cast<int>(rng() % 300);
  ragged[0] = 4000;
  ragged[39] = 2500;
  const DecodeKernel tc = DecodeKernel::kTensorCore;
  for (SumHint sum : {SumHint::kTrue, SumHint::kHalf, SumHint::kOne}) {
    for (const auto& ctx : {one_long, ragged}) {
      cases.push_back({{32, 8, Dtype::kBFloat16, 16, ctx, PrefetchMode::kOff, 0, 0, 0, tc,
                        PagedKvLayout::kNhd, sum},
                       seed++});
      cases.push_back({{32, 8, Dtype::kFloat16, 7, ctx, PrefetchMode::kAuto, 0, 0, 0, tc,
                        PagedKvLayout::kHnd, sum},
                       seed++});
      cases.push_back({{64, 8, Dtype::kBFloat16, 64, ctx, PrefetchMode::kOn, 0, 0, 0, tc,
                        PagedKvLayout::kNhdCombined, sum},
                       seed++});
      cases.push_back({{32, 32, Dtype::kFloat16, 16, ctx, PrefetchMode::kOff, 0, 0, 0, tc,
                        PagedKvLayout::kNhd, sum},
                       seed++});
    }
  }
  // Forced split counts with the sum (splits of the longest), and the baseline kernel.
  for (int splits : {2, 7, 64}) {
    cases.push_back({{32, 8, Dtype::kBFloat16, 16, one_long, PrefetchMode::kOff, splits, 0, 0, tc,
                      PagedKvLayout::kNhd, SumHint::kTrue},
                     seed++});
  }
  cases.push_back({{32, 8, Dtype::kBFloat16, 16, ragged, PrefetchMode::kAuto, 0, 0, 0,
                    DecodeKernel::kCudaCore, PagedKvLayout::kNhd, SumHint::kTrue},
                   seed++});
  RunAttentionCases(cases);
}

// The engine's step: the kernel just before attention on the stream writes the KV it reads
// (here InjectLayer, as a cache write or a kvdn Load would), and with splits the combine runs as
// a programmatic dependent of the attention kernel. The cache starts as NaN and the workspace
// uninitialized, so a read before the writer or a combine before its inputs shows.
TEST_F(KernelsTest, AttentionReadsWhatTheKernelBeforeItWrote) {
  for (int ctx : {8192, 40000}) {
    SCOPED_TRACE(ctx);
    const int qh = 32, kvh = 8, D = 128, bs = 16, batch = 2;
    const int max_blocks = (ctx + bs - 1) / bs, num_blocks = batch * max_blocks;
    std::mt19937_64 rng(ctx);
    std::normal_distribution<float> normal(0.f, 1.f);
    std::vector<int32_t> tables(num_blocks);
    std::iota(tables.begin(), tables.end(), 0);
    std::shuffle(tables.begin(), tables.end(), rng);
    // Per sequence, a chunk layer [K|V][token][kv_head][dim] to inject; host caches for the
    // reference built from the same values.
    const size_t row = static_cast<size_t>(kvh) * D;
    const size_t cache_elems = static_cast<size_t>(num_blocks) * bs * row;
    std::vector<uint16_t> q(static_cast<size_t>(batch) * qh * D), kc(cache_elems), vc(cache_elems);
    std::vector<std::vector<uint16_t>> chunks(batch, std::vector<uint16_t>(2 * ctx * row));
    for (auto& x : q) x = reference::FloatToBf16(normal(rng));
    for (int b = 0; b < batch; ++b) {
      for (auto& x : chunks[b]) x = reference::FloatToBf16(normal(rng));
      for (int t = 0; t < ctx; ++t) {
        const size_t slot = static_cast<size_t>(tables[b * max_blocks + t / bs]) * bs + t % bs;
        std::copy_n(&chunks[b][t * row], row, &kc[slot * row]);
        std::copy_n(&chunks[b][(ctx + t) * row], row, &vc[slot * row]);
      }
    }
    const std::vector<int> ctxs(batch, ctx);
    DeviceBuffer dq(q.size() * 2), dk(cache_elems * 2), dv(cache_elems * 2), dt(tables.size() * 4),
        dctx(batch * 4), dout(q.size() * 2), dchunk(chunks[0].size() * 2);
    CUDA_OK(dq.Upload(q.data()));
    CUDA_OK(dt.Upload(tables.data()));
    CUDA_OK(dctx.Upload(ctxs.data()));
    CUDA_OK(cudaMemset(dk.get(), 0xFF, cache_elems * 2));  // NaN until injected
    CUDA_OK(cudaMemset(dv.get(), 0xFF, cache_elems * 2));
    CUDA_OK(cudaMemset(dout.get(), 0xFF, q.size() * 2));
    DecodeAttentionArgs a;
    a.q = dq.get();
    a.k_cache = dk.get();
    a.v_cache = dv.get();
    a.block_tables = dt.as<int32_t>();
    a.context_lens = dctx.as<int32_t>();
    a.out = dout.get();
    a.batch = batch;
    a.num_q_heads = qh;
    a.num_kv_heads = kvh;
    a.block_size = bs;
    a.num_blocks = num_blocks;
    a.max_blocks_per_seq = max_blocks;
    a.max_context_len = ctx;
    ASSERT_OK_AND_ASSIGN(DecodePlan plan, PlanDecodeAttention(a));
    EXPECT_EQ(plan.kernel, DecodeKernel::kTensorCore);
    EXPECT_GT(plan.num_splits, 1);
    DeviceBuffer ws(std::max<size_t>(plan.workspace_bytes, 16));
    a.workspace = ws.get();
    a.workspace_bytes = plan.workspace_bytes;
    cudaStream_t stream;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    PagedKvLayer cache;
    cache.k = dk.get();
    cache.v = dv.get();
    cache.num_blocks = num_blocks;
    cache.block_size = bs;
    cache.num_kv_heads = kvh;
    cache.head_dim = D;
    for (int b = 0; b < batch; ++b) {
      CUDA_OK(cudaStreamSynchronize(stream));  // dchunk is reused
      CUDA_OK(dchunk.Upload(chunks[b].data()));
      const TokenRange r{dt.as<int32_t>() + b * max_blocks, max_blocks, 0, ctx};
      ASSERT_OK(InjectLayer(dchunk.get(), cache, r, stream));
    }
    ASSERT_OK(PagedDecodeAttention(a, stream));
    CUDA_OK(cudaStreamSynchronize(stream));
    CUDA_OK(cudaStreamDestroy(stream));
    std::vector<uint16_t> out(q.size());
    CUDA_OK(dout.Download(out.data()));
    const std::vector<double> ref =
        reference::DecodeAttention(q.data(), kc.data(), vc.data(), tables.data(), ctxs.data(),
                                   batch, qh, kvh, D, bs, max_blocks, true, 1.0 / std::sqrt(128.0));
    double num = 0, den = 0;
    for (size_t i = 0; i < out.size(); ++i) {
      const double o = reference::Bf16ToFloat(out[i]);
      ASSERT_FALSE(std::isnan(o)) << "output " << i << " read KV before it was written";
      num += (o - ref[i]) * (o - ref[i]);
      den += ref[i] * ref[i];
    }
    EXPECT_LT(std::sqrt(num / den), 1e-2);
  }
}

TEST_F(KernelsTest, BadAttentionArgumentsAreInvalidArgument) {
  DeviceBuffer buf(1 << 20);
  DecodeAttentionArgs a = ArgsFor(buf);
  a.batch = 1;
  a.num_blocks = 4;
  a.max_blocks_per_seq = 4;
  a.max_context_len = 64;
  EXPECT_OK(PlanDecodeAttention(a).status());
  auto bad = [&](auto mutate, const char* what) {
    DecodeAttentionArgs b = a;
    mutate(b);
    EXPECT_THAT(PlanDecodeAttention(b).status(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(what)));
  };
  bad([](auto& b) { b.num_q_heads = 12; }, "multiple of num_kv_heads");
  bad([](auto& b) { b.num_q_heads = 128; }, "supported: 1, 2, 4, 8");
  bad([](auto& b) { b.head_dim = 64; }, "128 only");
  bad([](auto& b) { b.dtype = Dtype::kFloat32; }, "bf16 or fp16");
  bad([](auto& b) { b.max_context_len = 65; }, "max_context_len 65");
  bad([](auto& b) { b.q = nullptr; }, "non-null");
  bad([](auto& b) { b.out = static_cast<char*>(b.out) + 2; }, "16-byte aligned");
  bad([](auto& b) { b.batch = 0; }, "batch 0");
  bad([](auto& b) { b.lanes_per_token = 4; }, "lanes_per_token 4");
  bad([](auto& b) { b.prefetch_distance = 65; }, "prefetch_distance 65");
  bad([](auto& b) { b.tc_stages = 5; }, "tc_stages 5");
  bad([](auto& b) { b.sum_context_lens = -1; }, "sum_context_lens -1 outside [0, batch x");
  bad([](auto& b) { b.sum_context_lens = 65; },
      "sum_context_lens 65 outside [0, batch x "
      "max_context_len = 64]");
  bad([](auto& b) { b.v_cache = nullptr; }, "v_cache must be non-null for layout NHD");
  bad([](auto& b) { b.layout = PagedKvLayout::kNhdCombined; },
      "v_cache must be null for layout NHD-combined");
  bad([](auto& b) { b.layout = static_cast<PagedKvLayout>(7); }, "layout 7");
  bad(
      [](auto& b) {
        b.layout = PagedKvLayout::kHnd;
        b.kernel = DecodeKernel::kCudaCore;
      },
      "cuda-core kernel reads layout NHD only");
  DecodeAttentionArgs c = a;
  c.num_splits = 4;
  EXPECT_THAT(PagedDecodeAttention(c, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("workspace of 0 bytes")));
  ASSERT_OK_AND_ASSIGN(DecodePlan plan, PlanDecodeAttention(c));
  c.workspace = static_cast<char*>(buf.get()) + 4;  // the partial outputs are read as float4
  c.workspace_bytes = plan.workspace_bytes;
  EXPECT_THAT(PagedDecodeAttention(c, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("16-byte aligned")));
}

}  // namespace
}  // namespace kvdn::kernels
