// Replays the chunk decoder fuzzer's corpus (tests/fuzz/corpus/chunk_decode) through the fuzz
// target in every build, so its properties are checked without clang's libFuzzer too.
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

#include "gtest/gtest.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

TEST(ChunkDecodeCorpusTest, EveryCorpusFilePassesTheFuzzTarget) {
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(KVDN_CHUNK_DECODE_CORPUS)) {
    std::ifstream in(e.path(), std::ios::binary);
    std::vector<uint8_t> data((std::istreambuf_iterator<char>(in)), {});
    EXPECT_EQ(LLVMFuzzerTestOneInput(data.data(), data.size()), 0) << e.path();
    ++files;
  }
  EXPECT_GE(files, 6);
}

}  // namespace
