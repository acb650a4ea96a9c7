#include "kvdn/transfer/fault_injection.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace kvdn::transfer {

FaultInjectingTransport::FaultInjectingTransport(std::unique_ptr<Transport> base,
                                                 FaultPolicy policy)
    : base_(std::move(base)), policy_(policy), rng_(policy.seed) {
  timer_thread_ = std::thread([this] { TimerLoop(); });
}

FaultInjectingTransport::~FaultInjectingTransport() {
  {
    MutexLock lock(&mu_);
    stop_ = true;
  }
  cv_.SignalAll();
  timer_thread_.join();  // runs what is still queued, so every done is called
}

void FaultInjectingTransport::SetPolicy(FaultPolicy policy) {
  MutexLock lock(&mu_);
  policy_ = policy;
  rng_.seed(policy.seed);
}

FaultInjectingTransport::Fate FaultInjectingTransport::Decide(bool is_send) {
  const int64_t n = ops_.fetch_add(1);
  MutexLock lock(&mu_);
  if (policy_.fail_after_n >= 0 && n >= policy_.fail_after_n) return Fate::kFail;
  if (is_send && policy_.drop_rate > 0 &&
      std::uniform_real_distribution<double>(0, 1)(rng_) < policy_.drop_rate) {
    return Fate::kDrop;
  }
  return Fate::kPass;
}

void FaultInjectingTransport::At(absl::Time when, absl::AnyInvocable<void() &&> fn) {
  {
    MutexLock lock(&mu_);
    timers_.push_back(Timed{when, next_seq_++, std::move(fn)});
  }
  cv_.SignalAll();
}

void FaultInjectingTransport::TimerLoop() {
  MutexLock lock(&mu_);
  for (;;) {
    if (timers_.empty()) {
      if (stop_) return;
      cv_.Wait(&mu_);
      continue;
    }
    auto first =
        std::min_element(timers_.begin(), timers_.end(), [](const Timed& a, const Timed& b) {
          return a.when < b.when || (a.when == b.when && a.seq < b.seq);
        });
    const absl::Time now = absl::Now();
    if (first->when > now && !stop_) {
      cv_.WaitWithTimeout(&mu_, first->when - now);
      continue;
    }
    absl::AnyInvocable<void()&&> fn = std::move(first->fn);
    timers_.erase(first);
    mu_.Unlock();
    std::move(fn)();
    mu_.Lock();
  }
}

std::string FaultInjectingTransport::Describe() const {
  return absl::StrCat("fault-injecting(", base_->Describe(), ")");
}

void FaultInjectingTransport::SetHandler(uint16_t type, MessageHandler handler) {
  base_->SetHandler(type, std::move(handler));
}

void FaultInjectingTransport::SetPeerFailureHandler(PeerFailureHandler handler) {
  base_->SetPeerFailureHandler(std::move(handler));
}

absl::StatusOr<PeerId> FaultInjectingTransport::Connect(absl::string_view address,
                                                        const ConnectOptions& options) {
  return base_->Connect(address, options);
}

void FaultInjectingTransport::Disconnect(PeerId peer) { base_->Disconnect(peer); }

absl::StatusOr<std::unique_ptr<MemoryRegion>> FaultInjectingTransport::Register(void* base,
                                                                                size_t size) {
  return base_->Register(base, size);
}

void FaultInjectingTransport::Send(PeerId peer, uint16_t type, std::string header, ByteSpan payload,
                                   const MemoryRegion* region, absl::Time deadline,
                                   DoneCallback done) {
  absl::Duration delay;
  {
    MutexLock lock(&mu_);
    delay = policy_.delay;
  }
  switch (Decide(/*is_send=*/true)) {
    case Fate::kFail:
      failed_.fetch_add(1);
      At(absl::Now(), [done = std::move(done)]() mutable {
        std::move(done)(absl::UnavailableError("injected fault: send failed"));
      });
      return;
    case Fate::kDrop:
      dropped_.fetch_add(1);
      At(std::min(deadline, absl::Now() + delay),
         [done = std::move(done)]() mutable { std::move(done)(absl::OkStatus()); });
      return;
    case Fate::kPass:
      break;
  }
  At(absl::Now() + delay, [this, peer, type, header = std::move(header), payload, region, deadline,
                           done = std::move(done)]() mutable {
    base_->Send(peer, type, std::move(header), payload, region, deadline, std::move(done));
  });
}

void FaultInjectingTransport::Receive(std::unique_ptr<Incoming> incoming, MutableByteSpan dst,
                                      const MemoryRegion* region, absl::Time deadline,
                                      DoneCallback done) {
  absl::Duration delay;
  {
    MutexLock lock(&mu_);
    delay = policy_.delay;
  }
  if (Decide(/*is_send=*/false) == Fate::kFail) {
    failed_.fetch_add(1);
    incoming.reset();  // discards the payload: the sender's send fails
    At(absl::Now(), [done = std::move(done)]() mutable {
      std::move(done)(absl::UnavailableError("injected fault: receive failed"));
    });
    return;
  }
  At(absl::Now() + delay,
     [this, in = std::move(incoming), dst, region, deadline, done = std::move(done)]() mutable {
       base_->Receive(std::move(in), dst, region, deadline, std::move(done));
     });
}

}  // namespace kvdn::transfer
