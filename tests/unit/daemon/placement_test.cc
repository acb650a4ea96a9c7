// Rendezvous placement: deterministic, distinct owners, balanced, and a join or leave moves only
// the chunks of the node that joined or left.
#include "kvdn/daemon/placement.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <set>

#include "kvdn/testing/chunks.h"

namespace kvdn::daemon {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;

std::vector<std::string> Nodes(int n) {
  std::vector<std::string> out;
  for (int i = 0; i < n; ++i) out.push_back("node-" + std::to_string(i));
  return out;
}

TEST(PlacementTest, DeterministicDistinctAndBounded) {
  const Placement p(Nodes(5));
  const Placement same({"node-4", "node-3", "node-2", "node-1", "node-0", "node-2"});
  EXPECT_EQ(same.members(), p.members());  // order and duplicates do not matter
  for (uint64_t i = 0; i < 200; ++i) {
    const ChunkKey k = testing::KeyFor(i);
    const auto owners = p.Owners(k, 3);
    ASSERT_EQ(owners.size(), 3u);
    EXPECT_EQ(std::set<std::string>(owners.begin(), owners.end()).size(), 3u);
    EXPECT_EQ(owners, same.Owners(k, 3));
    EXPECT_EQ(p.Owners(k, 1)[0], owners[0]);  // the owner does not depend on R
  }
  EXPECT_EQ(p.Owners(testing::KeyFor(1), 9).size(), 5u);  // R above the member count: all
  EXPECT_THAT(p.Owners(testing::KeyFor(1), 0), IsEmpty());
  EXPECT_THAT(Placement({}).Owners(testing::KeyFor(1), 2), IsEmpty());
  EXPECT_THAT(Placement({"solo"}).Owners(testing::KeyFor(1), 2), ElementsAre("solo"));
}

TEST(PlacementTest, OwnersAreBalanced) {
  const Placement p(Nodes(5));
  std::map<std::string, int> owned;
  const int keys = 50000;
  for (int i = 0; i < keys; ++i) ++owned[p.Owners(testing::KeyFor(i), 1)[0]];
  ASSERT_EQ(owned.size(), 5u);
  for (const auto& [node, n] : owned) {
    EXPECT_NEAR(n, keys / 5, keys / 5 * 0.05) << node;  // within 5% of a fair share
  }
}

TEST(PlacementTest, AJoinOrLeaveMovesOnlyThatNodesChunks) {
  const Placement five(Nodes(5));
  std::vector<std::string> four_nodes = Nodes(5);
  four_nodes.erase(four_nodes.begin() + 2);  // node-2 leaves
  const Placement four(four_nodes);
  std::vector<std::string> six_nodes = Nodes(5);
  six_nodes.push_back("node-new");
  const Placement six(six_nodes);
  int moved_leave = 0, moved_join = 0;
  for (int i = 0; i < 20000; ++i) {
    const ChunkKey k = testing::KeyFor(i);
    const std::string before = five.Owners(k, 1)[0];
    const std::string after_leave = four.Owners(k, 1)[0];
    if (before != "node-2") {
      EXPECT_EQ(after_leave, before);
    } else {
      ++moved_leave;
      // The leaver's chunks go to their second choice: the replica that already holds them.
      EXPECT_EQ(after_leave, five.Owners(k, 2)[1]);
    }
    const std::string after_join = six.Owners(k, 1)[0];
    if (after_join != before) {
      EXPECT_EQ(after_join, "node-new");
      ++moved_join;
    }
  }
  EXPECT_NEAR(moved_leave, 20000 / 5, 20000 / 5 * 0.1);
  EXPECT_NEAR(moved_join, 20000 / 6, 20000 / 6 * 0.1);
}

}  // namespace
}  // namespace kvdn::daemon
