// UcxTransport between two workers (in this process, or in a child process that dies), over
// shared memory and over tcp: payloads arrive bit for bit, deadlines and dead peers end transfers,
// bad input gets a precise status.
#include "kvdn/transfer/ucx_transport.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <future>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "kvdn/common/mutex.h"
#include "kvdn/testing/status_matchers.h"
#include "kvdn/transfer/fault_injection.h"

namespace kvdn::transfer {
namespace {

using ::kvdn::testing::StatusIs;
using ::testing::HasSubstr;

constexpr uint16_t kData = 1;
constexpr uint16_t kBye = 2;

std::vector<uint8_t> RandomBytes(size_t n, uint64_t seed) {
  std::vector<uint8_t> v(n);
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i < n; i += 8) {
    const uint64_t r = rng();
    std::memcpy(v.data() + i, &r, std::min<size_t>(8, n - i));
  }
  return v;
}

// A blocking wrapper over a done callback.
struct Waiter {
  std::promise<absl::Status> p;
  std::future<absl::Status> f = p.get_future();
  DoneCallback Callback() {
    return [this](absl::Status st) { p.set_value(std::move(st)); };
  }
  absl::Status Wait() { return f.get(); }
};

// Incoming messages queued for the test thread.
class Inbox {
 public:
  MessageHandler Handler() {
    return [this](std::unique_ptr<Incoming> in) {
      MutexLock lock(&mu_);
      q_.push_back(std::move(in));
      cv_.SignalAll();
    };
  }
  std::unique_ptr<Incoming> Pop(absl::Duration timeout = absl::Seconds(20)) {
    const absl::Time end = absl::Now() + timeout;
    MutexLock lock(&mu_);
    while (q_.empty() && absl::Now() < end) cv_.WaitWithTimeout(&mu_, end - absl::Now());
    if (q_.empty()) return nullptr;
    auto in = std::move(q_.front());
    q_.erase(q_.begin());
    return in;
  }

 private:
  Mutex mu_;
  CondVar cv_;
  std::vector<std::unique_ptr<Incoming>> q_ ABSL_GUARDED_BY(mu_);
};

class UcxTransportTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    UcxTransportOptions o;
    o.transports = GetParam();
    o.name = "a";
    ASSERT_OK_AND_ASSIGN(a_, UcxTransport::Create(o));
    o.name = "b";
    ASSERT_OK_AND_ASSIGN(b_, UcxTransport::Create(o));
    b_->SetHandler(kData, inbox_.Handler());
    ASSERT_OK_AND_ASSIGN(peer_, a_->Connect(b_->address(), {getpid()}));
  }

  // Sends `data` from a to b and receives it into a fresh buffer; both statuses must be OK.
  void RoundTrip(const std::vector<uint8_t>& data, const std::string& header) {
    Waiter sent;
    a_->Send(peer_, kData, header, ByteSpan(data), nullptr, absl::Now() + absl::Seconds(20),
             sent.Callback());
    auto in = inbox_.Pop();
    ASSERT_NE(in, nullptr) << "no message for " << data.size() << " bytes";
    EXPECT_EQ(in->header(), header);
    ASSERT_EQ(in->payload_bytes(), data.size());
    std::vector<uint8_t> got(data.size(), 0xEE);
    Waiter received;
    b_->Receive(std::move(in), MutableByteSpan(got), nullptr, absl::Now() + absl::Seconds(20),
                received.Callback());
    ASSERT_OK(received.Wait());
    ASSERT_OK(sent.Wait());
    ASSERT_TRUE(got == data) << "payload of " << data.size() << " bytes differs";
  }

  Inbox inbox_;
  std::unique_ptr<UcxTransport> a_;
  std::unique_ptr<UcxTransport> b_;
  PeerId peer_ = 0;
};

TEST_P(UcxTransportTest, PayloadsOfEverySizeArriveBitForBit) {
  const size_t sizes[] = {0,        1,          7, 64, 4095, 8192, 8193, 65537, (1u << 20) + 3,
                          4u << 20, (32u << 20)};
  uint64_t seed = 1;
  for (size_t n : sizes) {
    RoundTrip(RandomBytes(n, seed++), absl::StrCat("header-", n));
  }
  std::mt19937_64 rng(7);
  for (int i = 0; i < 12; ++i) {
    const size_t n = rng() % (3u << 20) + 1;
    RoundTrip(RandomBytes(n, seed++), "random");
  }
  EXPECT_THAT(a_->Describe(), HasSubstr("peers=["));
}

TEST_P(UcxTransportTest, RegisteredMemoryOnBothSides) {
  std::vector<uint8_t> src = RandomBytes(9u << 20, 3);
  std::vector<uint8_t> dst(src.size() + 4096, 0);
  ASSERT_OK_AND_ASSIGN(auto src_region, a_->Register(src.data(), src.size()));
  ASSERT_OK_AND_ASSIGN(auto dst_region, b_->Register(dst.data(), dst.size()));
  Waiter sent;
  // A slice from the middle of each region.
  const ByteSpan payload(src.data() + 4096, 5u << 20);
  a_->Send(peer_, kData, "h", payload, src_region.get(), absl::Now() + absl::Seconds(20),
           sent.Callback());
  auto in = inbox_.Pop();
  ASSERT_NE(in, nullptr);
  Waiter received;
  b_->Receive(std::move(in), MutableByteSpan(dst.data() + 100, payload.size()), dst_region.get(),
              absl::Now() + absl::Seconds(20), received.Callback());
  ASSERT_OK(received.Wait());
  ASSERT_OK(sent.Wait());
  EXPECT_EQ(std::memcmp(dst.data() + 100, payload.data(), payload.size()), 0);
}

TEST_P(UcxTransportTest, ManyConcurrentTransfers) {
  constexpr int kN = 48;
  std::vector<std::vector<uint8_t>> data;
  std::vector<Waiter> sent(kN);
  for (int i = 0; i < kN; ++i) data.push_back(RandomBytes(100000 + i * 20011, 100 + i));
  for (int i = 0; i < kN; ++i) {
    a_->Send(peer_, kData, std::to_string(i), ByteSpan(data[i]), nullptr,
             absl::Now() + absl::Seconds(30), sent[i].Callback());
  }
  std::vector<std::vector<uint8_t>> got(kN);
  std::vector<Waiter> received(kN);
  for (int k = 0; k < kN; ++k) {
    auto in = inbox_.Pop();
    ASSERT_NE(in, nullptr);
    const int i = std::stoi(in->header());
    got[i].resize(in->payload_bytes());
    b_->Receive(std::move(in), MutableByteSpan(got[i]), nullptr, absl::Now() + absl::Seconds(30),
                received[i].Callback());
  }
  for (int i = 0; i < kN; ++i) {
    ASSERT_OK(received[i].Wait());
    ASSERT_OK(sent[i].Wait());
    EXPECT_TRUE(got[i] == data[i]) << i;
  }
}

TEST_P(UcxTransportTest, BadInputGetsPreciseErrors) {
  EXPECT_THAT(a_->Connect("garbage", {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not a kvdn UCX address")));
  std::string corrupted = b_->address();
  corrupted[corrupted.size() / 2] ^= 0x5a;
  EXPECT_THAT(a_->Connect(corrupted, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("checksum")));
  std::vector<uint8_t> data = RandomBytes(1000, 1);
  {
    Waiter w;
    a_->Send(peer_ + 7, kData, "h", ByteSpan(data), nullptr, absl::Now() + absl::Seconds(5),
             w.Callback());
    EXPECT_THAT(w.Wait(), StatusIs(absl::StatusCode::kNotFound, HasSubstr("no peer")));
  }
  {
    Waiter w;
    a_->Send(peer_, kData, std::string(a_->max_header_bytes() + 1, 'h'), ByteSpan(data), nullptr,
             absl::Now() + absl::Seconds(5), w.Callback());
    EXPECT_THAT(w.Wait(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("header")));
  }
  {
    std::vector<uint8_t> other(4096);
    ASSERT_OK_AND_ASSIGN(auto region, a_->Register(other.data(), other.size()));
    Waiter w;
    a_->Send(peer_, kData, "h", ByteSpan(data), region.get(), absl::Now() + absl::Seconds(5),
             w.Callback());
    EXPECT_THAT(w.Wait(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("outside")));
  }
  {
    Waiter sent;
    a_->Send(peer_, kData, "h", ByteSpan(data), nullptr, absl::Now() + absl::Seconds(5),
             sent.Callback());
    auto in = inbox_.Pop();
    ASSERT_NE(in, nullptr);
    std::vector<uint8_t> small(10);
    Waiter w;
    b_->Receive(std::move(in), MutableByteSpan(small), nullptr, absl::Now() + absl::Seconds(5),
                w.Callback());
    EXPECT_THAT(w.Wait(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("1000")));
    (void)sent.Wait();  // discarded: ends one way or the other, without hanging
  }
  // Disconnected: the id is stale.
  a_->Disconnect(peer_);
  Waiter w;
  a_->Send(peer_, kData, "h", ByteSpan(data), nullptr, absl::Now() + absl::Seconds(5),
           w.Callback());
  EXPECT_THAT(w.Wait(), StatusIs(absl::StatusCode::kNotFound));
  // The transport still works.
  ASSERT_OK_AND_ASSIGN(peer_, a_->Connect(b_->address(), {getpid()}));
  RoundTrip(RandomBytes(3 << 20, 9), "again");
}

TEST_P(UcxTransportTest, AReceiverThatNeverReceivesCostsTheSenderItsDeadline) {
  std::vector<uint8_t> data = RandomBytes(8u << 20, 5);
  Waiter sent;
  const absl::Time start = absl::Now();
  a_->Send(peer_, kData, "h", ByteSpan(data), nullptr, start + absl::Milliseconds(500),
           sent.Callback());
  auto held = inbox_.Pop();  // held, never received
  ASSERT_NE(held, nullptr);
  if (a_->detects_peer_failure()) {
    // Cancelled at the deadline, its connection closed after the grace.
    const absl::Status st = sent.Wait();
    EXPECT_FALSE(st.ok());
    EXPECT_LT(absl::Now() - start, absl::Seconds(3)) << st;
    held.reset();
    return;
  }
  // Shared memory: the receiver lives and may still read the sender's memory, so the send stays
  // in flight (the buffer must not be reused) until the receiver lets go of the payload.
  EXPECT_EQ(sent.f.wait_for(std::chrono::milliseconds(1500)), std::future_status::timeout);
  held.reset();
  // Discarded: the send ends (UCX reports it done; the protocol above answers with a status).
  ASSERT_EQ(sent.f.wait_for(std::chrono::seconds(3)), std::future_status::ready);
}

TEST_P(UcxTransportTest, FaultInjectionFailsAndDelays) {
  FaultPolicy policy;
  policy.fail_after_n = 2;
  policy.delay = absl::Milliseconds(50);
  FaultInjectingTransport faulty(std::move(a_), policy);
  std::vector<uint8_t> data = RandomBytes(200000, 2);
  for (int i = 0; i < 3; ++i) {
    Waiter sent;
    const absl::Time start = absl::Now();
    faulty.Send(peer_, kData, "h", ByteSpan(data), nullptr, start + absl::Seconds(10),
                sent.Callback());
    if (i < 2) {
      auto in = inbox_.Pop();
      ASSERT_NE(in, nullptr);
      std::vector<uint8_t> got(data.size());
      Waiter r;
      b_->Receive(std::move(in), MutableByteSpan(got), nullptr, start + absl::Seconds(10),
                  r.Callback());
      ASSERT_OK(r.Wait());
      ASSERT_OK(sent.Wait());
      EXPECT_GE(absl::Now() - start, absl::Milliseconds(50));
      EXPECT_TRUE(got == data);
    } else {
      EXPECT_THAT(sent.Wait(),
                  StatusIs(absl::StatusCode::kUnavailable, HasSubstr("injected fault")));
    }
  }
  EXPECT_EQ(faulty.failed(), 1);
}

// ---- a peer in another process, killed mid-transfer ----

// The child: connects to the parent, sends one 32 MiB message, then waits to be killed.
[[noreturn]] void RunChild(const std::string& tls, const std::string& parent_hex) {
  UcxTransportOptions o;
  o.transports = tls;
  o.name = "child";
  auto t = UcxTransport::Create(o);
  if (!t.ok()) _exit(2);
  auto peer = (*t)->Connect(absl::HexStringToBytes(parent_hex), {getppid()});
  if (!peer.ok()) _exit(3);
  static std::vector<uint8_t> data = RandomBytes(32u << 20, 11);
  (*t)->Send(*peer, kData, "from-child", ByteSpan(data), nullptr, absl::Now() + absl::Hours(1),
             [](absl::Status) {});
  for (;;) pause();
}

TEST_P(UcxTransportTest, APeerKilledMidTransferFailsItWithinTheDeadline) {
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // A fresh process image: UCX and gtest threads do not survive fork.
    execl("/proc/self/exe", "ucx_transport_test", "--child", GetParam().c_str(),
          absl::BytesToHexString(b_->address()).c_str(), nullptr);
    _exit(1);
  }
  auto in = inbox_.Pop();
  ASSERT_NE(in, nullptr) << "the child sent nothing";
  ASSERT_EQ(in->payload_bytes(), 32u << 20);
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  int wstatus = 0;
  ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
  std::vector<uint8_t> got(in->payload_bytes());
  Waiter received;
  const absl::Time start = absl::Now();
  b_->Receive(std::move(in), MutableByteSpan(got), nullptr, start + absl::Seconds(2),
              received.Callback());
  const absl::Status st = received.Wait();
  EXPECT_FALSE(st.ok()) << "a dead peer's payload cannot arrive";
  EXPECT_LT(absl::Now() - start, absl::Seconds(5)) << st;
  // The transport goes on serving others.
  RoundTrip(RandomBytes(1 << 20, 12), "after");
}

INSTANTIATE_TEST_SUITE_P(Transports, UcxTransportTest,
                         ::testing::Values(std::string("posix,cma"), std::string("tcp"),
                                           std::string("tcp,cma")),
                         [](const auto& param_info) {
                           std::string n = param_info.param;
                           std::replace(n.begin(), n.end(), ',', '_');
                           return n;
                         });

// How shared-memory peers are known to be gone: a running process lives; one that exited is gone
// before its parent waits for it (a zombie) and after.
TEST(ProcessAliveTest, RunningLivesExitedIsGoneZombieOrNot) {
  EXPECT_TRUE(ProcessAlive(getpid()));
  EXPECT_FALSE(ProcessAlive(0));
  EXPECT_FALSE(ProcessAlive(-1));
  const pid_t sleeper = fork();
  ASSERT_GE(sleeper, 0);
  if (sleeper == 0) {
    pause();
    _exit(0);
  }
  const pid_t quitter = fork();
  ASSERT_GE(quitter, 0);
  if (quitter == 0) _exit(0);
  // Not waited for yet: a zombie once it has exited.
  siginfo_t info{};
  ASSERT_EQ(waitid(P_PID, static_cast<id_t>(quitter), &info, WEXITED | WNOWAIT), 0);
  EXPECT_TRUE(ProcessAlive(sleeper));
  EXPECT_FALSE(ProcessAlive(quitter)) << "a zombie counts as gone";
  ASSERT_EQ(waitpid(quitter, nullptr, 0), quitter);
  EXPECT_FALSE(ProcessAlive(quitter));
  ASSERT_EQ(kill(sleeper, SIGKILL), 0);
  ASSERT_EQ(waitpid(sleeper, nullptr, 0), sleeper);
  EXPECT_FALSE(ProcessAlive(sleeper));
}

TEST(UcxTransportCreate, UnknownTransportIsNamed) {
  UcxTransportOptions o;
  o.transports = "tcp,infiniband";
  EXPECT_THAT(UcxTransport::Create(o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'infiniband'")));
}

// What UCX (1.13, built with debug logging as Debian's is) reports while this test binary, run
// anew with `env` in front, creates a UcxTransport over `transports`.
std::string UcxLogOfCreate(const std::string& env, const std::string& transports = "tcp") {
  const std::string cmd = absl::StrCat("env UCX_LOG_LEVEL=debug ", env, " /proc/", getpid(),
                                       "/exe --create-child ", transports, " 2>&1");
  FILE* f = popen(cmd.c_str(), "r");
  std::string out;
  if (f == nullptr) return out;
  char buf[4096];
  for (size_t n; (n = fread(buf, 1, sizeof(buf), f)) > 0;) out.append(buf, n);
  EXPECT_EQ(pclose(f), 0) << out.substr(out.size() - std::min<size_t>(out.size(), 400));
  return out;
}

// kvdn's own UCX settings (UcxTunedSettings) reach the transport UCX opens — a UCT setting under
// a name ucp_config_modify accepts but no transport knows would only draw UCX's warning — a
// setting the environment makes wins over kvdn's, and a context without tcp gets no tcp setting
// (UCX would warn at each of its workers).
TEST(UcxTransportCreate, KvdnsSettingsReachUcxAndTheEnvironmentWins) {
  unsetenv("UCX_TCP_RX_SEG_SIZE");
  const std::vector<std::string> settings = UcxTunedSettings();
  EXPECT_THAT(settings, ::testing::Contains("UCX_TCP_RX_SEG_SIZE=256K"));
  const std::string ours = UcxLogOfCreate("");
  EXPECT_TRUE(absl::StrContains(ours, "apply UCT configuration RX_SEG_SIZE=256K"))
      << "UCX did not apply kvdn's tcp receive segment size";
  EXPECT_FALSE(absl::StrContains(ours, "invalid configuration"))
      << ours.substr(ours.find("invalid configuration"), 80);

  const std::string theirs = UcxLogOfCreate("UCX_TCP_RX_SEG_SIZE=128K");
  EXPECT_TRUE(absl::StrContains(theirs, "\ncreated\n")) << "the child made no transport";
  EXPECT_FALSE(absl::StrContains(theirs, "RX_SEG_SIZE=256K")) << "kvdn's value over the user's";
  for (const char* tls : {"posix,cma", "^tcp"}) {
    const std::string shm = UcxLogOfCreate("", tls);
    EXPECT_TRUE(absl::StrContains(shm, "\ncreated\n")) << tls << ": the child made no transport";
    EXPECT_FALSE(absl::StrContains(shm, "RX_SEG_SIZE")) << tls << ": a tcp setting given";
  }
  const std::string env_shm = UcxLogOfCreate("UCX_TLS=posix,cma", "");
  EXPECT_FALSE(absl::StrContains(env_shm, "RX_SEG_SIZE")) << "UCX_TLS=posix,cma: a tcp setting";
  // Describe() (kvdnctl stats) names what kvdn gave UCX.
  for (const auto& [tls, tcp] : {std::pair{"tcp", true}, std::pair{"posix,cma", false}}) {
    UcxTransportOptions o;
    o.transports = tls;
    ASSERT_OK_AND_ASSIGN(auto t, UcxTransport::Create(o));
    EXPECT_TRUE(absl::StrContains(t->Describe(), "settings=UCX_KEEPALIVE_INTERVAL=2s"))
        << t->Describe();
    EXPECT_EQ(absl::StrContains(t->Describe(), "UCX_TCP_RX_SEG_SIZE=256K"), tcp) << t->Describe();
  }
  ASSERT_EQ(setenv("UCX_TCP_RX_SEG_SIZE", "128K", 1), 0);
  EXPECT_THAT(UcxTunedSettings(), ::testing::Not(::testing::Contains("UCX_TCP_RX_SEG_SIZE=256K")));
  EXPECT_EQ(UcxTunedSettings().size(), settings.size() - 1);
  unsetenv("UCX_TCP_RX_SEG_SIZE");
}

}  // namespace
}  // namespace kvdn::transfer

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "--child") {
    kvdn::transfer::RunChild(argv[2], argv[3]);
  }
  if (argc >= 2 && std::string(argv[1]) == "--create-child") {
    kvdn::transfer::UcxTransportOptions o;
    o.transports = argc >= 3 ? argv[2] : "";
    auto t = kvdn::transfer::UcxTransport::Create(o);
    std::printf("%s\n", t.ok() ? "created" : t.status().ToString().c_str());
    return t.ok() ? 0 : 1;
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
