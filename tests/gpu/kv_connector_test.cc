// KvConnector (the engine side, client/include/kvdn/client/kv_connector.h) against a real kvdnd:
// a request's KV saved from one paged cache loads into another — another layout, block size and
// block table — bit for bit, layer by layer in stream order; a load stops where the stored prefix
// does; bad views are refused before anything moves. GTEST_SKIP without a GPU; run on the GPU
// machine with KVDN_KVDND naming the packed kvdnd.
#include "kvdn/client/kv_connector.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "daemon_process.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvdn/client/client.h"
#include "kvdn/kernels/decode_attention.h"
#include "kvdn/testing/chunks.h"
#include "kvdn/testing/status_matchers.h"

namespace kvdn {
namespace {

using ::kvdn::client::KvConnector;
using ::kvdn::client::PagedKvView;
using ::kvdn::kernels::PagedKvLayout;
using ::kvdn::testing::DaemonProcess;
using ::kvdn::testing::StatusIs;
using ::kvdn::testing::TempDir;
using ::testing::HasSubstr;

bool HaveGpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define CUDA_OK(call) ASSERT_EQ((call), cudaSuccess) << #call

constexpr uint32_t kLayers = 3;
constexpr uint32_t kKvHeads = 4;
constexpr uint32_t kHeadDim = 128;  // what the decode attention reads
constexpr uint32_t kTokensPerChunk = 32;

ModelSpec Model() {
  return ModelSpec{"connector-test", kLayers,          kKvHeads,
                   kHeadDim,         Dtype::kBFloat16, kTokensPerChunk};
}

std::vector<int32_t> Tokens(size_t n, uint32_t seed) {
  std::vector<int32_t> t(n);
  std::mt19937 rng(seed);
  for (auto& x : t) x = static_cast<int32_t>(rng() % 128000);
  return t;
}

// One engine's paged cache on the GPU (every layer the same shape) and a block table that puts
// the request's positions in shuffled blocks.
class DeviceCache {
 public:
  DeviceCache(PagedKvLayout layout, int32_t block_size, int32_t num_blocks, uint32_t seed,
              bool random)
      : layout_(layout), block_size_(block_size), num_blocks_(num_blocks) {
    const size_t elems = static_cast<size_t>(num_blocks) * block_size * kKvHeads * kHeadDim;
    const int tensors = layout == PagedKvLayout::kNhdCombined ? 1 : 2;
    const size_t per_tensor = elems * (tensors == 1 ? 2 : 1);
    std::mt19937_64 rng(seed);
    for (uint32_t l = 0; l < kLayers; ++l) {
      for (int t = 0; t < tensors; ++t) {
        std::vector<uint16_t> host(per_tensor, 0);
        if (random) {  // bf16 of floats in [-2, 2): every byte pattern of a value, none NaN
          for (auto& x : host) {
            const float f = static_cast<float>(static_cast<int64_t>(rng() % 65536) - 32768) / 16384;
            uint32_t bits;
            std::memcpy(&bits, &f, 4);
            x = static_cast<uint16_t>(bits >> 16);
          }
        }
        void* d = nullptr;
        EXPECT_EQ(cudaMalloc(&d, per_tensor * 2), cudaSuccess);
        EXPECT_EQ(cudaMemcpy(d, host.data(), per_tensor * 2, cudaMemcpyHostToDevice), cudaSuccess);
        buffers_.push_back(d);
        host_size_ = per_tensor;
      }
    }
    table_.resize(num_blocks);
    std::iota(table_.begin(), table_.end(), 0);
    std::shuffle(table_.begin(), table_.end(), std::mt19937(seed + 1));
    EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_table_), table_.size() * 4), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(d_table_, table_.data(), table_.size() * 4, cudaMemcpyHostToDevice),
              cudaSuccess);
  }
  ~DeviceCache() {
    for (void* b : buffers_) (void)cudaFree(b);
    (void)cudaFree(d_table_);
  }

  PagedKvView View() const {
    PagedKvView v;
    const int tensors = layout_ == PagedKvLayout::kNhdCombined ? 1 : 2;
    for (uint32_t l = 0; l < kLayers; ++l) {
      kernels::PagedKvLayer c;
      c.k = buffers_[l * tensors];
      c.v = tensors == 2 ? buffers_[l * tensors + 1] : nullptr;
      c.layout = layout_;
      c.num_blocks = num_blocks_;
      c.block_size = block_size_;
      c.num_kv_heads = kKvHeads;
      c.head_dim = kHeadDim;
      c.dtype = Dtype::kBFloat16;
      v.layers.push_back(c);
    }
    v.block_table = d_table_;
    v.block_table_len = num_blocks_;
    return v;
  }

  // Overwrites every byte of the cache on `stream` (an engine reusing its blocks).
  void Scribble(cudaStream_t stream) const {
    for (void* b : buffers_) {
      EXPECT_EQ(cudaMemsetAsync(b, 0xA5, host_size_ * 2, stream), cudaSuccess);
    }
  }

  // Layer l's K (kv = 0) or V (kv = 1) of every position, read back: [position][head][dim].
  std::vector<uint16_t> Read(uint32_t l, int kv, size_t positions) const {
    const int tensors = layout_ == PagedKvLayout::kNhdCombined ? 1 : 2;
    std::vector<uint16_t> all(host_size_);
    EXPECT_EQ(cudaMemcpy(all.data(), buffers_[l * tensors + (tensors == 2 ? kv : 0)],
                         all.size() * 2, cudaMemcpyDeviceToHost),
              cudaSuccess);
    std::vector<uint16_t> out(positions * kKvHeads * kHeadDim);
    for (size_t p = 0; p < positions; ++p) {
      const size_t blk = static_cast<size_t>(table_[p / block_size_]);
      const size_t slot = p % block_size_;
      for (size_t h = 0; h < kKvHeads; ++h) {
        size_t at = 0;
        switch (layout_) {
          case PagedKvLayout::kNhd:
            at = ((blk * block_size_ + slot) * kKvHeads + h) * kHeadDim;
            break;
          case PagedKvLayout::kNhdCombined:
            at = (((blk * 2 + kv) * block_size_ + slot) * kKvHeads + h) * kHeadDim;
            break;
          case PagedKvLayout::kHnd:
            at = ((blk * kKvHeads + h) * block_size_ + slot) * kHeadDim;
            break;
        }
        std::memcpy(&out[(p * kKvHeads + h) * kHeadDim], &all[at], kHeadDim * 2);
      }
    }
    return out;
  }

 private:
  PagedKvLayout layout_;
  int32_t block_size_;
  int32_t num_blocks_;
  std::vector<void*> buffers_;
  size_t host_size_ = 0;
  std::vector<int32_t> table_;
  int32_t* d_table_ = nullptr;
};

class KvConnectorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
    std::string err;
    // Loads fetch chunks (and verify them) here; ChunksInASharedHostTierAreCopiedStraightOutOfIt
    // and AttentionRightAfterWaitLayerSeesTheLoadedKv also run a kvdnd that shares its host tier.
    ASSERT_TRUE(daemon_.Start({}, &err)) << err;
    CUDA_OK(cudaStreamCreate(&stream_));
  }
  void TearDown() override {
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  }

  std::unique_ptr<client::Client> Connect(
      uint64_t pool_bytes,
      client::ClientOptions::DataPlane plane = client::ClientOptions::DataPlane::kAuto) {
    client::ClientOptions o;
    o.target = daemon_.unix_target();
    o.ns = "engine";
    o.model = Model();
    o.receive_pool_bytes = pool_bytes;
    o.data_plane = plane;
    auto c = client::Client::Connect(o);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : nullptr;
  }

  // Small staging: windows of two chunks, so a request moves in several rounds.
  static client::ConnectorOptions SmallStaging() {
    client::ConnectorOptions o;
    const uint64_t chunk = 2ull * kLayers * kTokensPerChunk * kKvHeads * kHeadDim * 2;
    o.host_staging_bytes = 4 * chunk;
    o.device_staging_bytes = 2 * chunk;
    return o;
  }

  static void ExpectSameKv(const DeviceCache& a, const DeviceCache& b, size_t positions) {
    for (uint32_t l = 0; l < kLayers; ++l) {
      for (int kv = 0; kv < 2; ++kv) {
        EXPECT_TRUE(a.Read(l, kv, positions) == b.Read(l, kv, positions))
            << "layer " << l << (kv ? " V" : " K") << " differs";
      }
    }
  }

  // Attention on each layer right after WaitLayer over a cache loaded from kvdnd at `target`
  // equals, bit for bit, attention over the cache it was saved from; `mapped` chunks of the 7
  // came out of the shared host tier.
  void AttentionRightAfterWaitLayer(const std::string& target, size_t mapped);

  TempDir dir_;
  DaemonProcess daemon_{dir_.path()};
  cudaStream_t stream_ = nullptr;
};

struct Shape {
  PagedKvLayout save_layout;
  int32_t save_block;
  PagedKvLayout load_layout;
  int32_t load_block;
  bool pool;
};

TEST_F(KvConnectorTest, SavedFromOneCacheLoadsIntoAnotherBitForBit) {
  // 6 full chunks and a tail of 8 tokens; saved from one layout, loaded into another.
  const std::vector<Shape> shapes = {
      {PagedKvLayout::kNhd, 16, PagedKvLayout::kHnd, 16, true},
      {PagedKvLayout::kHnd, 64, PagedKvLayout::kNhdCombined, 7, true},
      {PagedKvLayout::kNhdCombined, 1, PagedKvLayout::kNhd, 3, false},
  };
  uint32_t seed = 1;
  for (const Shape& s : shapes) {
    SCOPED_TRACE(std::string(kernels::LayoutName(s.save_layout)) + " -> " +
                 kernels::LayoutName(s.load_layout) + (s.pool ? " (pool)" : " (no pool)"));
    auto c = Connect(s.pool ? 64 << 20 : 0);
    ASSERT_NE(c, nullptr);
    ASSERT_OK_AND_ASSIGN(auto conn, KvConnector::Create(c.get(), SmallStaging()));
    EXPECT_EQ(conn->window_chunks(), 2u);
    const auto tokens = Tokens(6 * kTokensPerChunk + 8, seed);
    const int32_t blocks_a =
        static_cast<int32_t>((tokens.size() + s.save_block - 1) / s.save_block) + 5;
    const int32_t blocks_b =
        static_cast<int32_t>((tokens.size() + s.load_block - 1) / s.load_block) + 3;
    DeviceCache a(s.save_layout, s.save_block, blocks_a, seed + 10, /*random=*/true);
    DeviceCache b(s.load_layout, s.load_block, blocks_b, seed + 20, /*random=*/false);

    ASSERT_OK_AND_ASSIGN(client::SaveResult saved, conn->Save(tokens, a.View(), stream_));
    EXPECT_EQ(saved.chunks_stored, 7u);
    EXPECT_EQ(saved.chunks_present, 0u);
    ASSERT_OK_AND_ASSIGN(client::SaveResult again, conn->Save(tokens, a.View(), stream_));
    EXPECT_EQ(again.chunks_stored, 0u);
    EXPECT_EQ(again.chunks_present, 7u);
    ASSERT_OK_AND_ASSIGN(size_t hit, c->Lookup(tokens));
    EXPECT_EQ(hit, tokens.size());

    // Layer by layer: the engine's stream copies each layer away right after WaitLayer; what it
    // copied must already be the loaded KV.
    ASSERT_OK_AND_ASSIGN(auto load, conn->StartLoad(tokens, b.View()));
    const PagedKvView vb = b.View();
    std::vector<void*> snapshots;
    const size_t bytes_per_tensor = static_cast<size_t>(blocks_b) * s.load_block * kKvHeads *
                                    kHeadDim * 2 *
                                    (s.load_layout == PagedKvLayout::kNhdCombined ? 2 : 1);
    for (uint32_t l = 0; l < kLayers; ++l) {
      ASSERT_OK(load->WaitLayer(static_cast<int>(l), stream_));
      void* snap = nullptr;
      CUDA_OK(cudaMalloc(&snap, bytes_per_tensor));
      CUDA_OK(cudaMemcpyAsync(snap, vb.layers[l].k, bytes_per_tensor, cudaMemcpyDeviceToDevice,
                              stream_));
      snapshots.push_back(snap);
    }
    ASSERT_OK_AND_ASSIGN(client::LoadResult loaded, load->Wait());
    EXPECT_EQ(loaded.tokens, tokens.size());
    EXPECT_EQ(loaded.chunks, 7u);
    EXPECT_EQ(loaded.bytes, c->PayloadBytes(kTokensPerChunk) * 6 + c->PayloadBytes(8));
    CUDA_OK(cudaStreamSynchronize(stream_));
    ExpectSameKv(a, b, tokens.size());
    for (uint32_t l = 0; l < kLayers; ++l) {
      std::vector<uint8_t> snap(bytes_per_tensor), now(bytes_per_tensor);
      CUDA_OK(cudaMemcpy(snap.data(), snapshots[l], bytes_per_tensor, cudaMemcpyDeviceToHost));
      CUDA_OK(cudaMemcpy(now.data(), vb.layers[l].k, bytes_per_tensor, cudaMemcpyDeviceToHost));
      EXPECT_TRUE(snap == now) << "layer " << l << ": the engine's stream ran ahead of its load";
      (void)cudaFree(snapshots[l]);
    }
    ++seed;
  }
}

TEST_F(KvConnectorTest, ALoadStopsWhereTheStoredPrefixDoesAndLeavesTheRestAlone) {
  auto c = Connect(64 << 20);
  ASSERT_NE(c, nullptr);
  ASSERT_OK_AND_ASSIGN(auto conn, KvConnector::Create(c.get(), SmallStaging()));
  const auto tokens = Tokens(10 * kTokensPerChunk, 7);
  DeviceCache a(PagedKvLayout::kNhd, 16, 40, 3, /*random=*/true);
  DeviceCache b(PagedKvLayout::kNhd, 16, 40, 4, /*random=*/false);
  // Stored: the first 5 chunks only (the request's prefix of 160 tokens).
  const std::vector<int32_t> prefix(tokens.begin(), tokens.begin() + 5 * kTokensPerChunk);
  ASSERT_OK_AND_ASSIGN(client::SaveResult saved, conn->Save(prefix, a.View(), stream_));
  EXPECT_EQ(saved.chunks_stored, 5u);
  ASSERT_OK_AND_ASSIGN(client::LoadResult loaded, conn->Load(tokens, b.View(), stream_));
  EXPECT_EQ(loaded.tokens, 5u * kTokensPerChunk);
  EXPECT_EQ(loaded.chunks, 5u);
  CUDA_OK(cudaStreamSynchronize(stream_));
  ExpectSameKv(a, b, 5 * kTokensPerChunk);
  // Past the prefix the cache is as it was (zeros).
  for (uint32_t l = 0; l < kLayers; ++l) {
    const std::vector<uint16_t> all = b.Read(l, 0, tokens.size());
    EXPECT_TRUE(std::all_of(all.begin() + 5 * kTokensPerChunk * kKvHeads * kHeadDim, all.end(),
                            [](uint16_t x) { return x == 0; }))
        << "layer " << l;
  }
  // Saving the whole request now stores only what is missing.
  ASSERT_OK_AND_ASSIGN(client::SaveResult rest, conn->Save(tokens, a.View(), stream_));
  EXPECT_EQ(rest.chunks_present, 5u);
  EXPECT_EQ(rest.chunks_stored, 5u);
  // Nothing stored: a load of another request moves nothing, and every layer is released.
  const auto other = Tokens(3 * kTokensPerChunk, 99);
  ASSERT_OK_AND_ASSIGN(auto load, conn->StartLoad(other, b.View()));
  for (int l = 0; l < static_cast<int>(kLayers); ++l) EXPECT_OK(load->WaitLayer(l, stream_));
  ASSERT_OK_AND_ASSIGN(client::LoadResult none, load->Wait());
  EXPECT_EQ(none.tokens, 0u);
  EXPECT_THAT(load->WaitLayer(static_cast<int>(kLayers), stream_),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("the model has 3 layers")));
  EXPECT_THAT(load->WaitLayer(-1, stream_), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(KvConnectorTest, BadViewsAreRefusedBeforeAnythingMoves) {
  auto c = Connect(64 << 20);
  ASSERT_NE(c, nullptr);
  ASSERT_OK_AND_ASSIGN(auto conn, KvConnector::Create(c.get(), SmallStaging()));
  const auto tokens = Tokens(4 * kTokensPerChunk, 11);
  DeviceCache a(PagedKvLayout::kNhd, 16, 16, 5, /*random=*/true);
  struct Case {
    std::string what;
    std::function<void(PagedKvView&)> mutate;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"a layer missing", [](PagedKvView& v) { v.layers.pop_back(); }, "has 2 layers"},
      {"kv heads", [](PagedKvView& v) { v.layers[1].num_kv_heads = 8; },
       "layers[1].num_kv_heads is 8; the model has 4"},
      {"head_dim", [](PagedKvView& v) { v.layers[2].head_dim = 64; },
       "layers[2].head_dim is 64; the model has 128"},
      {"dtype", [](PagedKvView& v) { v.layers[0].dtype = Dtype::kFloat16; }, "layers[0].dtype"},
      {"null k", [](PagedKvView& v) { v.layers[0].k = nullptr; }, "layers[0].k is null"},
      {"null v", [](PagedKvView& v) { v.layers[1].v = nullptr; }, "layers[1].v is null"},
      {"v with the combined layout",
       [](PagedKvView& v) { v.layers[0].layout = PagedKvLayout::kNhdCombined; },
       "must be null for the combined layout"},
      {"unknown layout", [](PagedKvView& v) { v.layers[0].layout = static_cast<PagedKvLayout>(7); },
       "layout 7 is not a layout"},
      {"block size 0", [](PagedKvView& v) { v.layers[0].block_size = 0; }, "block_size 0"},
      {"block sizes differ", [](PagedKvView& v) { v.layers[2].block_size = 32; },
       "one block table serves all"},
      {"no block table", [](PagedKvView& v) { v.block_table = nullptr; }, "block_table is null"},
      {"block table too short", [](PagedKvView& v) { v.block_table_len = 7; },
       "has 7 blocks of 16 tokens, covering 112 positions; the request has 128 tokens"},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.what);
    PagedKvView v = a.View();
    k.mutate(v);
    EXPECT_THAT(conn->StartLoad(tokens, v).status(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(k.message)));
    EXPECT_THAT(conn->Save(tokens, v, stream_).status(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(k.message)));
    EXPECT_THAT(conn->StartSave(tokens, v, stream_).status(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(k.message)));
  }
  // A block-table entry outside the cache would store garbage as this prefix's KV: refused, and
  // nothing of the request is stored.
  DeviceCache bad(PagedKvLayout::kNhd, 16, 16, 6, /*random=*/true);
  PagedKvView v = bad.View();
  const int32_t outside = 16;
  CUDA_OK(cudaMemcpy(const_cast<int32_t*>(v.block_table) + 5, &outside, 4, cudaMemcpyHostToDevice));
  EXPECT_THAT(conn->Save(tokens, v, stream_).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("block_table[5] is 16, not one of the 16 blocks")));
  EXPECT_THAT(conn->StartSave(tokens, v, stream_).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("block_table[5] is 16, not one of the 16 blocks")));
  ASSERT_OK_AND_ASSIGN(size_t hit, c->Lookup(tokens));
  EXPECT_EQ(hit, 0u);
  // Staging too small for a chunk.
  client::ConnectorOptions tiny;
  tiny.host_staging_bytes = 4096;
  EXPECT_THAT(KvConnector::Create(c.get(), tiny).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("must hold two chunks")));
  client::ConnectorOptions huge;
  huge.host_staging_bytes = uint64_t{1} << 30;  // more than the 64 MiB pool
  EXPECT_THAT(KvConnector::Create(c.get(), huge).status(),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("has no room for")));
  // The daemon and the connector still serve.
  ASSERT_OK_AND_ASSIGN(client::SaveResult saved, conn->Save(tokens, a.View(), stream_));
  EXPECT_EQ(saved.chunks_stored, 4u);
}

// StartSave returns once the gather is enqueued and orders the engine's stream after it: the
// engine overwriting every block right away (on its stream) does not reach what is saved. With
// default staging the save fits two windows (the stores run after StartSave returns); with
// windows of two chunks it takes five (StartSave waits for the first three to be stored). A
// load of another prefix meanwhile is served while the stores go on. A handle destroyed without
// Wait still ends the save.
TEST_F(KvConnectorTest, AStartedSaveLetsTheEngineReuseItsBlocksAtOnce) {
  auto c = Connect(64 << 20);
  ASSERT_NE(c, nullptr);
  int round = 0;
  for (const bool small : {false, true}) {
    SCOPED_TRACE(small ? "windows of two chunks" : "default staging");
    client::ConnectorOptions o = small ? SmallStaging() : client::ConnectorOptions{};
    if (!small) o.host_staging_bytes = 32 << 20;  // within the client's 64 MiB pool
    ASSERT_OK_AND_ASSIGN(auto conn, KvConnector::Create(c.get(), o));
    const auto tokens = Tokens(10 * kTokensPerChunk - 5, 300 + round);
    const uint32_t seed = 310 + round;
    DeviceCache a(PagedKvLayout::kNhd, 16, 24, seed, /*random=*/true);
    const DeviceCache original(PagedKvLayout::kNhd, 16, 24, seed, /*random=*/true);
    const auto earlier = Tokens(6 * kTokensPerChunk, 330 + round);
    ASSERT_OK(conn->Save(earlier, original.View(), stream_).status());
    ASSERT_OK_AND_ASSIGN(auto save, conn->StartSave(tokens, a.View(), stream_));
    a.Scribble(stream_);  // the engine's next step, reusing every block
    {                     // and loading another prefix while the save's stores go on
      DeviceCache c2(PagedKvLayout::kNhd, 16, 24, seed + 2, /*random=*/false);
      ASSERT_OK_AND_ASSIGN(client::LoadResult other, conn->Load(earlier, c2.View(), stream_));
      CUDA_OK(cudaStreamSynchronize(stream_));
      EXPECT_EQ(other.tokens, earlier.size());
      ExpectSameKv(original, c2, earlier.size());
    }
    ASSERT_OK_AND_ASSIGN(client::SaveResult saved, save->Wait());
    EXPECT_TRUE(save->Done());
    EXPECT_EQ(saved.chunks_stored, 10u);
    DeviceCache b(PagedKvLayout::kHnd, 16, 24, seed + 1, /*random=*/false);
    ASSERT_OK_AND_ASSIGN(client::LoadResult loaded, conn->Load(tokens, b.View(), stream_));
    CUDA_OK(cudaStreamSynchronize(stream_));
    EXPECT_EQ(loaded.tokens, tokens.size());
    ExpectSameKv(original, b, tokens.size());
    // Destroyed without Wait: the save still ends, whole.
    const auto more = Tokens(4 * kTokensPerChunk, 320 + round);
    { ASSERT_OK(conn->StartSave(more, original.View(), stream_).status()); }
    ASSERT_OK_AND_ASSIGN(size_t hit, c->Lookup(more));
    EXPECT_EQ(hit, more.size());
    // Nothing new to store: done at once.
    ASSERT_OK_AND_ASSIGN(auto again, conn->StartSave(tokens, original.View(), stream_));
    ASSERT_OK_AND_ASSIGN(client::SaveResult none, again->Wait());
    EXPECT_EQ(none.chunks_stored, 0u);
    EXPECT_EQ(none.chunks_present, 10u);
    ++round;
  }
}

// kvdnd with a GPU tier on this GPU: a load leases the chunks there (promoting them from host
// memory) and injects them device to device through CUDA IPC, bit for bit; with the GPU tier
// nearly full of chunks others hold, the first chunks come from it and the rest through host
// memory; use_gpu_tier = false reads through host memory only. No lease is left.
TEST_F(KvConnectorTest, ChunksInTheDaemonsGpuTierAreReadInPlace) {
  DaemonProcess gpu_daemon(dir_.path() + "/gpu");
  std::filesystem::create_directories(dir_.path() + "/gpu");
  std::string err;
  ASSERT_TRUE(gpu_daemon.Start({"--gpu-tier-bytes", std::to_string(4 << 20)}, &err)) << err;
  client::ClientOptions o;
  o.target = gpu_daemon.unix_target();
  o.ns = "engine";
  o.model = Model();
  o.receive_pool_bytes = 64 << 20;
  ASSERT_OK_AND_ASSIGN(auto c, client::Client::Connect(o));
  ASSERT_OK_AND_ASSIGN(auto conn, KvConnector::Create(c.get(), SmallStaging()));
  const auto tokens = Tokens(6 * kTokensPerChunk + 8, 31);
  DeviceCache a(PagedKvLayout::kNhd, 16, 20, 41, /*random=*/true);
  ASSERT_OK_AND_ASSIGN(client::SaveResult saved, conn->Save(tokens, a.View(), stream_));
  EXPECT_EQ(saved.chunks_stored, 7u);
  {
    DeviceCache b(PagedKvLayout::kHnd, 16, 20, 42, /*random=*/false);
    ASSERT_OK_AND_ASSIGN(auto load, conn->StartLoad(tokens, b.View()));
    ASSERT_OK_AND_ASSIGN(client::LoadResult loaded, load->Wait());
    EXPECT_EQ(loaded.tokens, tokens.size());
    EXPECT_EQ(load->stats().gpu_tier_chunks, 7u);
    ExpectSameKv(a, b, tokens.size());
  }
  {
    client::ConnectorOptions host_only = SmallStaging();
    host_only.use_gpu_tier = false;
    ASSERT_OK_AND_ASSIGN(auto conn2, KvConnector::Create(c.get(), host_only));
    DeviceCache b(PagedKvLayout::kNhd, 7, 40, 43, /*random=*/false);
    ASSERT_OK_AND_ASSIGN(auto load, conn2->StartLoad(tokens, b.View()));
    ASSERT_OK_AND_ASSIGN(client::LoadResult loaded, load->Wait());
    EXPECT_EQ(loaded.tokens, tokens.size());
    EXPECT_EQ(load->stats().gpu_tier_chunks, 0u);
    ExpectSameKv(a, b, tokens.size());
  }
  // Fill the GPU tier with chunks of another request, each held by a lease, until one no longer
  // fits; then let two go: room for at most two of ours.
  const auto filler = Tokens(60 * kTokensPerChunk, 77);
  DeviceCache f(PagedKvLayout::kNhd, 16, 130, 44, /*random=*/true);
  ASSERT_OK(conn->Save(filler, f.View(), stream_).status());
  ASSERT_OK_AND_ASSIGN(std::vector<ChunkKey> keys,
                       ChunkKeysForTokens("engine", Model(), filler, /*include_tail=*/true));
  std::vector<client::TransferDescriptor> held;
  for (const ChunkKey& k : keys) {
    ASSERT_OK_AND_ASSIGN(client::TransferDescriptor d,
                         c->AcquireDescriptor(k, absl::Seconds(60), /*accept_gpu=*/true));
    if (!d.gpu) {
      ASSERT_OK(c->ReleaseDescriptor(d));
      break;
    }
    held.push_back(d);
  }
  ASSERT_GT(held.size(), 2u);
  ASSERT_LT(held.size(), keys.size()) << "the GPU tier never filled";
  for (int i = 0; i < 2; ++i) {
    ASSERT_OK(c->ReleaseDescriptor(held.back()));
    held.pop_back();
  }
  {
    DeviceCache b(PagedKvLayout::kNhdCombined, 16, 20, 45, /*random=*/false);
    ASSERT_OK_AND_ASSIGN(auto load, conn->StartLoad(tokens, b.View()));
    ASSERT_OK_AND_ASSIGN(client::LoadResult loaded, load->Wait());
    EXPECT_EQ(loaded.tokens, tokens.size());
    // The released fillers make room for one or two of ours, as the tier's eviction goes.
    EXPECT_GE(load->stats().gpu_tier_chunks, 1u);
    EXPECT_LE(load->stats().gpu_tier_chunks, 2u) << "the rest through host memory";
    ExpectSameKv(a, b, tokens.size());
  }
  for (const auto& d : held) ASSERT_OK(c->ReleaseDescriptor(d));
  // A kvdnd told not to map its GPU tier into engines serves the same load through host memory.
  {
    DaemonProcess no_ipc(dir_.path() + "/no-ipc");
    std::filesystem::create_directories(dir_.path() + "/no-ipc");
    ASSERT_TRUE(
        no_ipc.Start({"--gpu-tier-bytes", std::to_string(4 << 20), "--no-gpu-tier-ipc"}, &err))
        << err;
    client::ClientOptions n = o;
    n.target = no_ipc.unix_target();
    ASSERT_OK_AND_ASSIGN(auto nc, client::Client::Connect(n));
    ASSERT_OK_AND_ASSIGN(auto nconn, KvConnector::Create(nc.get(), SmallStaging()));
    ASSERT_OK(nconn->Save(tokens, a.View(), stream_).status());
    for (int round = 0; round < 2; ++round) {
      DeviceCache b(PagedKvLayout::kNhd, 16, 20, 46 + round, /*random=*/false);
      ASSERT_OK_AND_ASSIGN(auto load, nconn->StartLoad(tokens, b.View()));
      ASSERT_OK_AND_ASSIGN(client::LoadResult loaded, load->Wait());
      EXPECT_EQ(loaded.tokens, tokens.size());
      EXPECT_EQ(load->stats().gpu_tier_chunks, 0u);
      ExpectSameKv(a, b, tokens.size());
    }
  }
  // A client on TCP may not ask for GPU memory.
  client::ClientOptions tcp = o;
  tcp.target = gpu_daemon.tcp_target();
  tcp.receive_pool_bytes = 0;
  ASSERT_OK_AND_ASSIGN(auto remote, client::Client::Connect(tcp));
  EXPECT_THAT(remote->AcquireDescriptor(keys[0], absl::Seconds(1), /*accept_gpu=*/true).status(),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("CUDA IPC")));
}

// namespace_gpu_share through kvdnd: a tenant loading far more than the GPU tier holds keeps to
// its share (/metrics' kvdn_namespace_gpu_bytes) and leaves the other tenant's chunks in place;
// its chunks past the share come through host memory, bit for bit.
TEST_F(KvConnectorTest, ATenantPastItsGpuShareLeavesTheOthersChunksInPlace) {
  DaemonProcess gpu_daemon(dir_.path() + "/share");
  std::filesystem::create_directories(dir_.path() + "/share");
  const std::string cfg = dir_.path() + "/share.json";
  std::ofstream(cfg) << R"({"namespace_gpu_share": 0.5})";
  std::string err;
  ASSERT_TRUE(
      gpu_daemon.Start({"--gpu-tier-bytes", std::to_string(4 << 20), "--config", cfg}, &err))
      << err;
  auto connect = [&](const std::string& ns) {
    client::ClientOptions o;
    o.target = gpu_daemon.unix_target();
    o.ns = ns;
    o.model = Model();
    o.receive_pool_bytes = 64 << 20;
    return client::Client::Connect(o);
  };
  ASSERT_OK_AND_ASSIGN(auto quiet, connect("quiet"));
  ASSERT_OK_AND_ASSIGN(auto noisy, connect("noisy"));
  ASSERT_OK_AND_ASSIGN(auto q_conn, KvConnector::Create(quiet.get(), SmallStaging()));
  ASSERT_OK_AND_ASSIGN(auto n_conn, KvConnector::Create(noisy.get(), SmallStaging()));
  auto gpu_bytes = [&](const std::string& ns) {
    return testing::MetricSample(gpu_daemon.http_port(),
                                 "kvdn_namespace_gpu_bytes{namespace=\"" + ns + "\"}");
  };
  const auto q_tokens = Tokens(4 * kTokensPerChunk, 231);
  DeviceCache qa(PagedKvLayout::kNhd, 16, 10, 232, /*random=*/true);
  ASSERT_OK(q_conn->Save(q_tokens, qa.View(), stream_).status());
  auto load = [&](KvConnector& conn, const std::vector<int32_t>& tokens, const DeviceCache& from,
                  int32_t blocks, uint32_t seed) -> uint64_t {
    DeviceCache b(PagedKvLayout::kNhd, 16, blocks, seed, /*random=*/false);
    auto l = conn.StartLoad(tokens, b.View());
    EXPECT_OK(l.status());
    if (!l.ok()) return 0;
    auto loaded = (*l)->Wait();
    EXPECT_OK(loaded.status());
    if (loaded.ok()) {
      EXPECT_EQ(loaded->tokens, tokens.size());
    }
    ExpectSameKv(from, b, tokens.size());
    return (*l)->stats().gpu_tier_chunks;
  };
  EXPECT_EQ(load(*q_conn, q_tokens, qa, 10, 233), 4u);
  const double quiet_bytes = gpu_bytes("quiet");
  EXPECT_GT(quiet_bytes, 0);
  // 40 chunks of ~193 KiB: about 7.5 MiB against the tier's 4 MiB and the share's 2 MiB.
  const auto n_tokens = Tokens(40 * kTokensPerChunk, 241);
  DeviceCache na(PagedKvLayout::kNhd, 16, 82, 242, /*random=*/true);
  ASSERT_OK(n_conn->Save(n_tokens, na.View(), stream_).status());
  for (int round = 0; round < 2; ++round) {
    const uint64_t in_place = load(*n_conn, n_tokens, na, 82, 243 + round);
    EXPECT_GT(in_place, 0u);
    EXPECT_LT(in_place, 40u) << "the rest through host memory";
    EXPECT_GT(gpu_bytes("noisy"), 0);
    EXPECT_LE(gpu_bytes("noisy"), 2 << 20);
    EXPECT_EQ(gpu_bytes("quiet"), quiet_bytes);
  }
  EXPECT_EQ(load(*q_conn, q_tokens, qa, 10, 250), 4u);
  EXPECT_EQ(gpu_bytes("quiet"), quiet_bytes);
}

// With kvdnd's host tier shared (--share-host-tier), a load injects the chunks it holds there into
// the cache straight out of the mapped tier, layer by layer (the tail chunk too), and the cache
// holds the same KV bit for bit as through the fetch path (the connector with map_host_tier off,
// same daemon). A prefix partly stored on this daemon and partly not goes mapped as far as it can
// and stops there. After kvdnd restarts, the connector maps the new arena on its own and the chunks
// (back from its disk tier) load again.
TEST_F(KvConnectorTest, ChunksInASharedHostTierAreCopiedStraightOutOfIt) {
  DaemonProcess shared(dir_.path() + "/shared");
  std::filesystem::create_directories(dir_.path() + "/shared");
  std::string err;
  ASSERT_TRUE(shared.Start({"--share-host-tier"}, &err)) << err;
  client::ClientOptions o;
  o.target = shared.unix_target();
  o.ns = "engine";
  o.model = Model();
  o.receive_pool_bytes = 64 << 20;
  ASSERT_OK_AND_ASSIGN(auto c, client::Client::Connect(o));
  ASSERT_OK_AND_ASSIGN(auto conn, KvConnector::Create(c.get(), SmallStaging()));
  client::ConnectorOptions fetching = SmallStaging();
  fetching.map_host_tier = false;
  ASSERT_OK_AND_ASSIGN(auto fetch_conn, KvConnector::Create(c.get(), fetching));
  const auto tokens = Tokens(5 * kTokensPerChunk + 8, 301);  // 5 whole chunks and a tail
  DeviceCache a(PagedKvLayout::kNhd, 16, 24, 302, /*random=*/true);
  ASSERT_OK(conn->Save(tokens, a.View(), stream_).status());
  auto load = [&](KvConnector& k, const std::vector<int32_t>& t, size_t* mapped) {
    DeviceCache b(PagedKvLayout::kHnd, 16, 24, 303, /*random=*/false);
    auto l = k.StartLoad(t, b.View());
    EXPECT_TRUE(l.ok()) << l.status();
    if (!l.ok()) return size_t{0};
    absl::StatusOr<client::LoadResult> r = (*l)->Wait();
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return size_t{0};
    *mapped = (*l)->stats().host_tier_chunks;
    ExpectSameKv(a, b, r->tokens);
    return r->tokens;
  };
  size_t mapped = 99;
  EXPECT_EQ(load(*conn, tokens, &mapped), tokens.size());
  EXPECT_EQ(mapped, 6u);
  EXPECT_EQ(load(*fetch_conn, tokens, &mapped), tokens.size());
  EXPECT_EQ(mapped, 0u);
  // The first 3 chunks stored, the rest not: mapped as far as the prefix is stored.
  std::vector<int32_t> partly(tokens.begin(), tokens.begin() + 3 * kTokensPerChunk);
  const auto more = Tokens(2 * kTokensPerChunk, 304);
  partly.insert(partly.end(), more.begin(), more.end());
  EXPECT_EQ(load(*conn, partly, &mapped), 3u * kTokensPerChunk);
  EXPECT_EQ(mapped, 3u);

  ASSERT_EQ(shared.Stop(), 0);
  ASSERT_TRUE(shared.Start({"--share-host-tier"}, &err)) << err;
  EXPECT_EQ(load(*conn, tokens, &mapped), tokens.size());
  EXPECT_EQ(mapped, 6u);
}

// With tenant tokens, the GPU tier's CUDA IPC handle (which maps every tenant's chunks into the
// engine) goes only to a token with kvdn:all-namespaces: an engine whose token reaches its own
// namespace loads the same KV through host memory.
TEST_F(KvConnectorTest, OnlyATokenForEveryNamespaceMapsTheGpuTier) {
  DaemonProcess gpu_daemon(dir_.path() + "/auth");
  std::filesystem::create_directories(dir_.path() + "/auth");
  const std::string tokens = dir_.path() + "/tokens";
  std::ofstream(tokens) << "engine-token-0123456789ab engine\n"
                        << "fleet-token-0123456789abc kvdn:all-namespaces\n";
  const std::string cfg = dir_.path() + "/auth.json";
  std::ofstream(cfg) << R"({"auth_tokens_file": ")" << tokens << R"("})";
  std::string err;
  ASSERT_TRUE(
      gpu_daemon.Start({"--gpu-tier-bytes", std::to_string(4 << 20), "--config", cfg}, &err))
      << err;
  const auto tokens_ids = Tokens(3 * kTokensPerChunk + 8, 131);
  DeviceCache a(PagedKvLayout::kNhd, 16, 20, 141, /*random=*/true);
  for (const char* token : {"engine-token-0123456789ab", "fleet-token-0123456789abc"}) {
    SCOPED_TRACE(token);
    client::ClientOptions o;
    o.target = gpu_daemon.unix_target();
    o.ns = "engine";
    o.model = Model();
    o.receive_pool_bytes = 64 << 20;
    o.token = token;
    ASSERT_OK_AND_ASSIGN(auto c, client::Client::Connect(o));
    ASSERT_OK_AND_ASSIGN(auto conn, KvConnector::Create(c.get(), SmallStaging()));
    ASSERT_OK(conn->Save(tokens_ids, a.View(), stream_).status());
    DeviceCache b(PagedKvLayout::kNhd, 16, 20, 142, /*random=*/false);
    ASSERT_OK_AND_ASSIGN(auto load, conn->StartLoad(tokens_ids, b.View()));
    ASSERT_OK_AND_ASSIGN(client::LoadResult loaded, load->Wait());
    EXPECT_EQ(loaded.tokens, tokens_ids.size());
    const bool fleet = std::string(token).starts_with("fleet");
    EXPECT_EQ(load->stats().gpu_tier_chunks, fleet ? 4u : 0u);
    ExpectSameKv(a, b, tokens_ids.size());
    ASSERT_OK_AND_ASSIGN(
        auto d, c->AcquireDescriptor(ChunkKeysForTokens("engine", Model(), tokens_ids).value()[0],
                                     absl::Seconds(5), /*accept_gpu=*/true));
    EXPECT_EQ(d.gpu.has_value(), fleet);
    ASSERT_OK(c->ReleaseDescriptor(d));
  }
}

// What an engine does with a load: its decode attention on layer l right after WaitLayer(l), on
// its own stream, while later layers may still be on their way. The output over the loaded cache
// equals, bit for bit, the output over the cache the KV was saved from (same layout and block
// size, other blocks).
// Both ways a load reads kvdnd's host tier: fetched (window by window, layers released with the
// last window) and injected straight out of the shared tier (layer by layer, each released once
// injected).
TEST_F(KvConnectorTest, AttentionRightAfterWaitLayerSeesTheLoadedKv) {
  DaemonProcess shared(dir_.path() + "/shared-attention");
  std::filesystem::create_directories(dir_.path() + "/shared-attention");
  std::string err;
  ASSERT_TRUE(shared.Start({"--share-host-tier"}, &err)) << err;
  for (const std::string& target : {daemon_.unix_target(), shared.unix_target()}) {
    SCOPED_TRACE(target);
    AttentionRightAfterWaitLayer(target, target == shared.unix_target() ? 7u : 0u);
  }
}

void KvConnectorTest::AttentionRightAfterWaitLayer(const std::string& target, size_t mapped) {
  client::ClientOptions o;
  o.target = target;
  o.ns = "engine";
  o.model = Model();
  o.receive_pool_bytes = 64 << 20;
  ASSERT_OK_AND_ASSIGN(auto c, client::Client::Connect(o));
  ASSERT_OK_AND_ASSIGN(auto conn, KvConnector::Create(c.get(), SmallStaging()));
  const auto tokens = Tokens(6 * kTokensPerChunk + 8, 61);
  const int32_t ctx = static_cast<int32_t>(tokens.size());
  DeviceCache a(PagedKvLayout::kNhd, 16, 20, 62, /*random=*/true);
  DeviceCache b(PagedKvLayout::kNhd, 16, 24, 63, /*random=*/false);
  ASSERT_OK(conn->Save(tokens, a.View(), stream_).status());
  constexpr int kQHeads = 4 * kKvHeads;
  std::vector<uint16_t> q(kQHeads * kHeadDim);
  std::mt19937 rng(64);
  for (auto& x : q) x = static_cast<uint16_t>(0x3c00 + rng() % 0x300);  // bf16 in [0.0078, 0.5)
  void* d_q = nullptr;
  void* d_ctx = nullptr;
  CUDA_OK(cudaMalloc(&d_q, q.size() * 2));
  CUDA_OK(cudaMalloc(&d_ctx, 4));
  CUDA_OK(cudaMemcpy(d_q, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_ctx, &ctx, 4, cudaMemcpyHostToDevice));
  auto args_for = [&](const PagedKvView& v, uint32_t l, void* out) {
    kernels::DecodeAttentionArgs g;
    g.q = d_q;
    g.k_cache = v.layers[l].k;
    g.v_cache = v.layers[l].v;
    g.layout = PagedKvLayout::kNhd;
    g.block_tables = v.block_table;
    g.context_lens = static_cast<const int32_t*>(d_ctx);
    g.out = out;
    g.batch = 1;
    g.num_q_heads = kQHeads;
    g.num_kv_heads = kKvHeads;
    g.head_dim = kHeadDim;
    g.block_size = v.layers[l].block_size;
    g.num_blocks = v.layers[l].num_blocks;
    g.max_blocks_per_seq = v.block_table_len;
    g.max_context_len = ctx;
    g.num_splits = 2;  // the same plan over both caches
    return g;
  };
  const size_t out_bytes = size_t{kQHeads} * kHeadDim * 2;
  std::vector<void*> outs_a(kLayers), outs_b(kLayers);
  for (uint32_t l = 0; l < kLayers; ++l) {
    CUDA_OK(cudaMalloc(&outs_a[l], out_bytes));
    CUDA_OK(cudaMalloc(&outs_b[l], out_bytes));
  }
  void* workspace = nullptr;
  {
    ASSERT_OK_AND_ASSIGN(kernels::DecodePlan plan,
                         kernels::PlanDecodeAttention(args_for(a.View(), 0, outs_a[0])));
    CUDA_OK(cudaMalloc(&workspace, std::max<size_t>(plan.workspace_bytes, 16) * 2));
  }
  ASSERT_OK_AND_ASSIGN(auto load, conn->StartLoad(tokens, b.View()));
  for (uint32_t l = 0; l < kLayers; ++l) {
    ASSERT_OK(load->WaitLayer(static_cast<int>(l), stream_));
    kernels::DecodeAttentionArgs g = args_for(b.View(), l, outs_b[l]);
    ASSERT_OK_AND_ASSIGN(kernels::DecodePlan plan, kernels::PlanDecodeAttention(g));
    g.workspace = workspace;
    g.workspace_bytes = plan.workspace_bytes;
    ASSERT_OK(kernels::PagedDecodeAttention(g, stream_));
  }
  ASSERT_OK_AND_ASSIGN(client::LoadResult loaded, load->Wait());
  EXPECT_EQ(loaded.tokens, tokens.size());
  EXPECT_EQ(load->stats().host_tier_chunks, mapped);
  CUDA_OK(cudaStreamSynchronize(stream_));
  for (uint32_t l = 0; l < kLayers; ++l) {
    kernels::DecodeAttentionArgs g = args_for(a.View(), l, outs_a[l]);
    ASSERT_OK_AND_ASSIGN(kernels::DecodePlan plan, kernels::PlanDecodeAttention(g));
    g.workspace = workspace;
    g.workspace_bytes = plan.workspace_bytes;
    ASSERT_OK(kernels::PagedDecodeAttention(g, stream_));
    CUDA_OK(cudaStreamSynchronize(stream_));
    std::vector<uint16_t> ra(out_bytes / 2), rb(out_bytes / 2);
    CUDA_OK(cudaMemcpy(ra.data(), outs_a[l], out_bytes, cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(rb.data(), outs_b[l], out_bytes, cudaMemcpyDeviceToHost));
    EXPECT_TRUE(ra == rb) << "layer " << l << ": attention over the loaded KV differs";
    EXPECT_TRUE(std::any_of(ra.begin(), ra.end(), [](uint16_t x) { return x != 0; }));
    (void)cudaFree(outs_a[l]);
    (void)cudaFree(outs_b[l]);
  }
  (void)cudaFree(workspace);
  (void)cudaFree(d_q);
  (void)cudaFree(d_ctx);
}

}  // namespace
}  // namespace kvdn
