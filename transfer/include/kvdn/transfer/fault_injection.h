// FaultInjectingTransport: a Transport decorator for tests (STYLE.md 8, after LevelDB's
// FaultInjectionTestEnv). It wraps a real transport and, by a FaultPolicy, fails operations,
// drops sends on the floor, or delays them — so tests can show that a failing or slow data plane
// costs at most a deadline, releases what it held, and corrupts nothing.
#ifndef KVDN_TRANSFER_FAULT_INJECTION_H_
#define KVDN_TRANSFER_FAULT_INJECTION_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <random>
#include <thread>

#include "absl/time/time.h"
#include "kvdn/common/mutex.h"
#include "kvdn/transfer/transport.h"

namespace kvdn::transfer {

struct FaultPolicy {
  // Sends and receives after the first fail_after_n fail with UNAVAILABLE ("injected fault")
  // without reaching the wrapped transport. Negative: never.
  int64_t fail_after_n = -1;
  // Probability that a send is dropped: it reports OK at its deadline but never leaves (the peer
  // sees nothing). 0: never.
  double drop_rate = 0.0;
  // Every send and receive is handed to the wrapped transport this much later.
  absl::Duration delay = absl::ZeroDuration();
  uint64_t seed = 1;
};

// Thread-safe, as the wrapped transport. The policy can change at any time.
class FaultInjectingTransport final : public Transport {
 public:
  FaultInjectingTransport(std::unique_ptr<Transport> base, FaultPolicy policy);
  ~FaultInjectingTransport() override;

  void SetPolicy(FaultPolicy policy);
  // Operations seen (sends + receives), failed and dropped so far.
  int64_t operations() const { return ops_.load(); }
  int64_t failed() const { return failed_.load(); }
  int64_t dropped() const { return dropped_.load(); }
  Transport* base() const { return base_.get(); }

  TransportCaps caps() const override { return base_->caps(); }
  std::string address() const override { return base_->address(); }
  std::string Describe() const override;
  size_t max_header_bytes() const override { return base_->max_header_bytes(); }
  void SetHandler(uint16_t type, MessageHandler handler) override;
  void SetPeerFailureHandler(PeerFailureHandler handler) override;
  absl::StatusOr<PeerId> Connect(absl::string_view address, const ConnectOptions& options) override;
  void Disconnect(PeerId peer) override;
  absl::StatusOr<std::unique_ptr<MemoryRegion>> Register(void* base, size_t size) override;
  void Send(PeerId peer, uint16_t type, std::string header, ByteSpan payload,
            const MemoryRegion* region, absl::Time deadline, DoneCallback done) override;
  void Receive(std::unique_ptr<Incoming> incoming, MutableByteSpan dst, const MemoryRegion* region,
               absl::Time deadline, DoneCallback done) override;

 private:
  enum class Fate { kPass, kFail, kDrop };
  Fate Decide(bool is_send);
  // Runs fn at `when` on the timer thread (now when `when` has passed).
  void At(absl::Time when, absl::AnyInvocable<void() &&> fn);
  void TimerLoop();

  const std::unique_ptr<Transport> base_;
  std::atomic<int64_t> ops_{0};
  std::atomic<int64_t> failed_{0};
  std::atomic<int64_t> dropped_{0};

  mutable Mutex mu_;
  CondVar cv_;
  FaultPolicy policy_ ABSL_GUARDED_BY(mu_);
  std::mt19937_64 rng_ ABSL_GUARDED_BY(mu_);
  struct Timed {
    absl::Time when;
    uint64_t seq;
    absl::AnyInvocable<void() &&> fn;
  };
  std::vector<Timed> timers_ ABSL_GUARDED_BY(mu_);
  uint64_t next_seq_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread timer_thread_;
};

}  // namespace kvdn::transfer

#endif  // KVDN_TRANSFER_FAULT_INJECTION_H_
