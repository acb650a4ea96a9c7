// UcxTransport: the Transport on UCX (ucp). Payloads move as active messages in rendezvous mode
// (ucp_am_send_nbx / ucp_am_recv_data_nbx): the receiver pulls the bytes into its own buffer — an
// RDMA read on InfiniBand/RoCE, UCX's zero-copy streaming on TCP, a single copy through shared
// memory or CMA on one host. Small payloads go eagerly with the header. One worker with one
// progress thread; every UCX call happens on that thread (the worker is single-threaded), others
// post work to it.
#ifndef KVDN_TRANSFER_UCX_TRANSPORT_H_
#define KVDN_TRANSFER_UCX_TRANSPORT_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "kvdn/transfer/transport.h"

namespace kvdn::transfer {

struct UcxTransportOptions {
  // UCX transports to use, as UCX_TLS spells them ("tcp", "posix,cma", "rc,ud", ...). Empty: UCX
  // chooses among all it finds (the UCX_TLS environment variable, when set, applies then).
  //
  // Failure detection follows from it. With any transport that can leave the host (the default),
  // connections use UCX's peer error handling (UCP_ERR_HANDLING_MODE_PEER): a dead peer fails its
  // transfers at once — without it UCX 1.13 aborts the process when a tcp peer dies. With shared
  // memory only ("posix,cma", "sm"), connections go without it, because it costs UCX 1.13 its
  // shared-memory and zero-copy paths (transfer/README.md has the measurements); a dead peer is
  // then noticed by its process id
  // (ConnectOptions::peer_pid).
  std::string transports;
  // A name for logs and Describe().
  std::string name = "kvdn";
  // After the progress thread finds no work, it polls this long before sleeping on the worker's
  // event fd: lower latency for back-to-back transfers, at the cost of a busy core. It yields the
  // core on each empty poll, so where progress threads outnumber cores the threads with work run.
  absl::Duration poll_before_sleep = absl::Microseconds(50);
  // Time a cancelled transfer gets to end before its peer's connection is closed to end it.
  absl::Duration cancel_grace = absl::Milliseconds(500);
};

class UcxTransport final : public Transport {
 public:
  // Creates the UCX context and worker and starts the progress thread. INVALID_ARGUMENT: unknown
  // transports in options.transports. UNAVAILABLE: UCX finds no usable transport.
  static absl::StatusOr<std::unique_ptr<UcxTransport>> Create(const UcxTransportOptions& options);
  // Ends every transfer (UNAVAILABLE), closes every connection, stops the progress thread.
  // REQUIRES: every MemoryRegion from Register is destroyed first.
  ~UcxTransport() override;

  TransportCaps caps() const override;
  std::string address() const override;
  std::string Describe() const override;
  size_t max_header_bytes() const override;
  void SetHandler(uint16_t type, MessageHandler handler) override;
  void SetPeerFailureHandler(PeerFailureHandler handler) override;
  absl::StatusOr<PeerId> Connect(absl::string_view address, const ConnectOptions& options) override;
  // True when connections use UCX's peer error handling (see UcxTransportOptions::transports).
  bool detects_peer_failure() const;
  void Disconnect(PeerId peer) override;
  absl::StatusOr<std::unique_ptr<MemoryRegion>> Register(void* base, size_t size) override;
  void Send(PeerId peer, uint16_t type, std::string header, ByteSpan payload,
            const MemoryRegion* region, absl::Time deadline, DoneCallback done) override;
  void Receive(std::unique_ptr<Incoming> incoming, MutableByteSpan dst, const MemoryRegion* region,
               absl::Time deadline, DoneCallback done) override;

  struct Impl;

 private:
  explicit UcxTransport(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;  // shared with payloads not yet received and with regions
};

// The settings kvdn gives UCX, spelled as environment entries ("UCX_TCP_RX_SEG_SIZE=256K";
// transfer/README.md says why each), less those this process's environment sets (the
// environment wins). UcxTransport::Create applies them; a benchmark hands them to ucx_perftest so
// that its ceiling runs UCX as kvdn does.
std::vector<std::string> UcxTunedSettings();

// The inode of a process's namespace of `kind` ("pid", "net", ...; /proc/<pid>/ns/<kind>), 0 when
// unreadable. `pid` "self" for this process. UCX's shared memory works only between processes
// in one pid namespace; its wake-ups only within one network namespace.
uint64_t NamespaceId(const std::string& pid, const char* kind);

// Whether process `pid` (of this pid namespace) still runs: false for pid <= 0, for a pid with no
// process, and for a zombie (exited, not yet waited for).
bool ProcessAlive(int pid);

}  // namespace kvdn::transfer

#endif  // KVDN_TRANSFER_UCX_TRANSPORT_H_
