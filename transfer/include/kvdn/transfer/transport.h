// The data plane's transport: moves messages — a small header and an optional payload — between
// processes, the payload from the sender's memory straight into a buffer the receiver picks after
// reading the header. A protocol that answers carries in its header who to answer (kvdnd's data
// plane: a session id, whose PeerId the daemon got from Connect). kvdnd and the client SDK speak
// their protocol (proto/kvdn/v1/data_plane.proto) over it; UcxTransport is the implementation,
// FaultInjectingTransport a decorator for tests.
//
// Lifecycle of a transfer (post -> poll until done -> release):
//   1. The sender posts Send(peer, type, header, payload, region, deadline, done). The payload's
//      memory must stay untouched until `done` runs.
//   2. The receiver's handler for `type` gets an Incoming with the header and the payload's size.
//      It may answer at once or later, from any thread: Receive(incoming, dst, ...) pulls the
//      payload into dst; dropping the Incoming discards the payload (the sender's `done` then
//      runs; whether with OK or an error is the transport's choice, so protocols answer).
//   3. Each side's progress thread polls until the operation ends and runs `done` exactly once:
//      OK, or an error (UNAVAILABLE: the peer failed or was disconnected; DEADLINE_EXCEEDED: the
//      deadline passed and the operation was cancelled). After `done`, the transport no longer
//      touches the buffer: the caller releases it (a lease, a pool slot).
// `done` is called by the deadline plus a short grace (cancellation, then closing the peer's
// connection if cancelling is not enough), so a transfer never hangs on a peer that died. (On
// shared memory without failure detection, a transfer the peer process leaves half done while it
// lives stays in flight: see ConnectOptions.)
//
// Thread-safety: every method is thread-safe. Handlers and `done` callbacks run on the transport's
// progress thread: they must not block (hand blocking work to another thread; calling Send and
// Receive from them is fine).
#ifndef KVDN_TRANSFER_TRANSPORT_H_
#define KVDN_TRANSFER_TRANSPORT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>

#include "absl/functional/any_invocable.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "kvdn/common/bytes.h"
#include "kvdn/common/status.h"

namespace kvdn::transfer {

// What a transport can do (STYLE.md 7).
struct TransportCaps {
  bool remote = false;      // reaches other hosts (tcp, RDMA), not only this one
  bool one_sided = false;   // an RDMA transport is up: receivers pull payloads without the
                            // sender's CPU (zero copy)
  bool gpu_memory = false;  // payloads may lie in device memory
};

// A connection made by Connect. It carries a generation: after Disconnect or a peer failure the id
// is stale and every call naming it fails with NOT_FOUND, never reaching another peer.
using PeerId = uint64_t;

// Memory registered with a transport once (a daemon's arena, a client's receive pool), so
// transfers from or into it need no registration of their own. Owned by the caller; destroy it
// only after every transfer naming it is done.
class MemoryRegion {
 public:
  virtual ~MemoryRegion() = default;
  uint8_t* base() const { return base_; }
  size_t size() const { return size_; }
  bool Contains(const void* p, size_t n) const {
    const auto* b = static_cast<const uint8_t*>(p);
    return b >= base_ && n <= size_ && static_cast<size_t>(b - base_) <= size_ - n;
  }

 protected:
  MemoryRegion(uint8_t* base, size_t size) : base_(base), size_(size) {}

 private:
  uint8_t* const base_;
  const size_t size_;
};

// A message that arrived. The header is a copy the handler owns; the payload (payload_bytes, maybe
// zero) is still with the sender until Transport::Receive. Destroying an Incoming that was not
// received discards its payload.
class Incoming {
 public:
  Incoming(PeerId peer, uint16_t type, std::string header, uint64_t payload_bytes,
           std::function<void()> discard)
      : peer_(peer),
        type_(type),
        header_(std::move(header)),
        payload_bytes_(payload_bytes),
        discard_(std::move(discard)) {}
  ~Incoming() {
    if (discard_) discard_();
  }
  Incoming(const Incoming&) = delete;
  Incoming& operator=(const Incoming&) = delete;

  // The connection it came over when it is one this side made with Connect (transports pair the
  // two sides' connections when both connect); 0 when unknown.
  PeerId peer() const { return peer_; }
  uint16_t type() const { return type_; }
  const std::string& header() const { return header_; }
  uint64_t payload_bytes() const { return payload_bytes_; }

  // For transports: the payload's handle, and taking over the discard duty.
  void* transport_data = nullptr;
  std::function<void()> TakeDiscard() { return std::exchange(discard_, nullptr); }

 private:
  const PeerId peer_;
  const uint16_t type_;
  const std::string header_;
  const uint64_t payload_bytes_;
  std::function<void()> discard_;
};

struct ConnectOptions {
  // The peer's process id when it runs on this host, else 0. A transport without its own failure
  // detection (UcxTransport on shared memory only) ends a transfer stuck past its deadline once
  // this process is gone; while the process lives, the transfer and the memory it names stay
  // held, since the peer may still read or write that memory.
  int peer_pid = 0;
};

using DoneCallback = absl::AnyInvocable<void(absl::Status) &&>;
using MessageHandler = std::function<void(std::unique_ptr<Incoming>)>;
using PeerFailureHandler = std::function<void(PeerId, const absl::Status&)>;

class Transport {
 public:
  virtual ~Transport() = default;

  virtual TransportCaps caps() const = 0;
  // Opaque bytes a peer passes to Connect to reach this transport.
  virtual std::string address() const = 0;
  // The transports (UCX: tls) that this transport may use, and — once a peer is connected — what
  // it uses per peer, for humans (kvdnctl stats).
  virtual std::string Describe() const = 0;
  // Largest header Send accepts.
  virtual size_t max_header_bytes() const = 0;

  // Sets the handler of messages of `type`. REQUIRES: before the first message of that type can
  // arrive (before Connect, or before giving the address out). Messages of a type without a
  // handler are discarded.
  virtual void SetHandler(uint16_t type, MessageHandler handler) = 0;
  // Called on the progress thread when a connected peer fails (its process died, its connection
  // broke): its PeerId is stale from then on, and its transfers end with UNAVAILABLE.
  virtual void SetPeerFailureHandler(PeerFailureHandler handler) = 0;

  // Connects to `address` (from a peer's address()). INVALID_ARGUMENT: not an address of this
  // transport. UNAVAILABLE: it cannot be reached. REQUIRES: not on the progress thread.
  virtual absl::StatusOr<PeerId> Connect(absl::string_view address,
                                         const ConnectOptions& options) = 0;
  // Closes the connection; its transfers in flight end with UNAVAILABLE. Stale ids are ignored.
  virtual void Disconnect(PeerId peer) = 0;

  // Registers [base, base + size). RESOURCE_EXHAUSTED / INTERNAL when the transport refuses it.
  virtual absl::StatusOr<std::unique_ptr<MemoryRegion>> Register(void* base, size_t size) = 0;

  // Sends header + payload to `peer`. `region` (may be null) is registered memory holding the
  // payload. `done` as the file comment says; INVALID_ARGUMENT for a header over
  // max_header_bytes() or a payload outside `region`; NOT_FOUND for a stale peer.
  virtual void Send(PeerId peer, uint16_t type, std::string header, ByteSpan payload,
                    const MemoryRegion* region, absl::Time deadline, DoneCallback done) = 0;
  // Pulls an Incoming's payload into dst (exactly payload_bytes; else INVALID_ARGUMENT). `region`
  // (may be null) is registered memory holding dst.
  virtual void Receive(std::unique_ptr<Incoming> incoming, MutableByteSpan dst,
                       const MemoryRegion* region, absl::Time deadline, DoneCallback done) = 0;
};

}  // namespace kvdn::transfer

#endif  // KVDN_TRANSFER_TRANSPORT_H_
