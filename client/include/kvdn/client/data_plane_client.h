// The client's side of the UCX data plane (proto/kvdn/v1/data_plane.proto), used by the SDK
// (Client) and by kvdnd itself to fetch from and replicate to its peers. Not a stable API for
// engines: use Client. One session with a daemon: Get replies land straight in the caller's buffer
// (the chunk header rides in the reply's header), Put payloads leave straight from the caller's
// buffer. Thread-safe: many threads may Get and Put at once; each call blocks its thread until its
// transfer is over (never past its deadline plus the transport's grace, see transfer/transport.h).
#ifndef KVDN_CLIENT_DATA_PLANE_CLIENT_H_
#define KVDN_CLIENT_DATA_PLANE_CLIENT_H_

#include <atomic>
#include <memory>
#include <optional>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/function_ref.h"
#include "absl/types/span.h"
#include "kvdn/common/bytes.h"
#include "kvdn/common/chunk_key.h"
#include "kvdn/common/mutex.h"
#include "kvdn/transfer/ucx_transport.h"
#include "kvdn/v1/kv_service.grpc.pb.h"

namespace kvdn::client {

// ChunkKey -> its proto form (both payload paths use it).
void KeyToProto(const ChunkKey& key, v1::ChunkKey* out);

class DataPlaneClient {
 public:
  struct Pending;  // a request waiting for its reply (data_plane_client.cc)
  // Where a Get's payload goes, given the chunk's 64-byte header and payload size: a buffer of
  // exactly that size, or the error that ends the Get. Runs on the transport's thread: no blocking.
  using Place =
      absl::FunctionRef<absl::StatusOr<MutableByteSpan>(ByteSpan header, uint64_t payload_bytes)>;
  // Called on the transport's thread as soon as a Get's bytes have landed, before the Get ends:
  // `offset` in the payload, `bytes` where they are in Place's buffer. For work on each part
  // while it is still in that core's cache (summing its blocks for the payload's XXH3).
  using Landed = absl::FunctionRef<void(uint64_t offset, ByteSpan bytes)>;

  // Creates the transport and opens a session. `same_host`: the daemon runs on this host (a unix
  // socket target): shared memory then. `transports`: UCX_TLS names, empty for the default.
  // UNAVAILABLE when the daemon serves no UCX or UCX cannot start. `peer_node`: set by a kvdnd
  // that opens the session for its own clients (OpenDataPlaneRequest.peer_node).
  // `authorization`: the "authorization" metadata of the session's Open and Close calls
  // ("Bearer <token>"), empty for none (or where the stub's channel adds it).
  static absl::StatusOr<std::unique_ptr<DataPlaneClient>> Open(
      v1::KvService::Stub* stub, bool same_host, const std::string& transports,
      absl::Duration deadline, const std::string& peer_node = "",
      const std::string& authorization = "");
  // Closes the session (best effort) and the transport.
  ~DataPlaneClient();
  DataPlaneClient(const DataPlaneClient&) = delete;
  DataPlaneClient& operator=(const DataPlaneClient&) = delete;

  // A whole chunk by key, or the chunk under a lease from GetDescriptor (lease_id != 0; then
  // `key` is unused). Returns the payload size. Daemon errors pass through (NOT_FOUND: unknown key
  // or lease; ABORTED: the lease expired); DEADLINE_EXCEEDED when no reply came in time.
  absl::StatusOr<uint64_t> Get(const ChunkKey& key, uint64_t lease_id, Place place,
                               absl::Time deadline, std::optional<Landed> landed = std::nullopt);

  // A part of a chunk's payload (DataPlaneGetRequest.payload_offset / payload_length).
  struct Part {
    uint64_t offset = 0;
    uint64_t length = 0;  // 0: to the end
  };
  // A Get in flight (StartGet), ended by FinishGet.
  struct Ticket {
    uint64_t request_id = 0;
    std::shared_ptr<Pending> pending;
  };
  // Get in two halves, so that one thread can have several in flight: StartGet sends the request
  // for `part` of the payload; `place` (which must live until FinishGet returns) is then called
  // with the chunk's header and its whole payload's size, and the part lands at its offset in the
  // buffer it returns. FinishGet waits for the end and returns the whole payload's size;
  // `part_bytes`, when given, gets the bytes of this part (less than asked at the payload's end).
  Ticket StartGet(const ChunkKey& key, uint64_t lease_id, Part part, Place place,
                  absl::Time deadline, std::optional<Landed> landed = std::nullopt);
  absl::StatusOr<uint64_t> FinishGet(const Ticket& ticket, absl::Time deadline,
                                     uint64_t* part_bytes = nullptr);

  // One chunk's payload in parts at once, part i over sessions[i] (several lanes, so that the
  // parts' copies run on several cores on both sides): `payload_hint` bytes (the size the caller
  // expects, e.g. from its model; the chunk may be shorter) are cut into sessions.size() parts of
  // whole 4 KiB pages. `place` is called once (the first reply); a part whose chunk header differs
  // from the first one's (the chunk was replaced while the parts were in flight) ends the Get
  // with ABORTED. Waits for every part, also after an error (the parts write into the caller's
  // buffer). Returns the payload size; the first error by part order otherwise.
  static absl::StatusOr<uint64_t> GetInParts(absl::Span<DataPlaneClient* const> sessions,
                                             const ChunkKey& key, uint64_t lease_id,
                                             uint64_t payload_hint, Place place,
                                             absl::Time deadline,
                                             std::optional<Landed> landed = std::nullopt);
  // Stores header + payload under `key`, or writes them into a reservation (reservation_id != 0,
  // left uncommitted). True if stored now, false if already stored.
  absl::StatusOr<bool> Put(const ChunkKey& key, uint64_t reservation_id, ByteSpan chunk_header,
                           ByteSpan payload, absl::Time deadline);

  // Which part of a chunk's payload a Put message carries (DataPlanePutRequest.part): the bytes
  // from `offset` on; into a reservation, or by key as one of `parts` messages sharing `put_id`.
  struct PutPart {
    uint64_t offset = 0;
    uint32_t parts = 0;
    uint64_t put_id = 0;
  };
  // Put in two halves (as StartGet / FinishGet); with `part`, `payload` is that part.
  Ticket StartPut(const ChunkKey& key, uint64_t reservation_id, ByteSpan chunk_header,
                  ByteSpan payload, std::optional<PutPart> part, absl::Time deadline);
  absl::StatusOr<bool> FinishPut(const Ticket& ticket, absl::Time deadline);

  // One chunk stored in parts at once, part i of the payload over sessions[i] (whole 4 KiB
  // pages, the last part the rest), as one Put by key: kvdnd reserves at the first part, commits
  // (verifying the header's checksum) after the last, and answers every part with the result.
  // Whole when the payload makes fewer than two parts. True if stored now; false if the key was
  // stored (or being stored) already. Waits for every part.
  static absl::StatusOr<bool> PutInParts(absl::Span<DataPlaneClient* const> sessions,
                                         const ChunkKey& key, ByteSpan chunk_header,
                                         ByteSpan payload, absl::Time deadline);

  // The daemon's worker address for this session, and the one its descriptors carry (its first
  // lane's; the same with one lane).
  const std::string& daemon_address() const { return daemon_address_; }
  const std::string& descriptor_address() const { return descriptor_address_; }
  const std::string& transports() const { return transports_; }
  // False once the session failed (the daemon died or closed it): open a new one.
  bool healthy() const { return healthy_.load(); }
  // Registers the client's buffer pool: Gets into it and Puts from it name the registration.
  absl::Status RegisterPool(void* base, size_t size) {
    KVDN_ASSIGN_OR_RETURN(pool_, transport_->Register(base, size));
    return absl::OkStatus();
  }

 private:
  DataPlaneClient() = default;
  void OnGetReply(std::unique_ptr<transfer::Incoming> in);
  void OnPutReply(std::unique_ptr<transfer::Incoming> in);
  std::shared_ptr<Pending> Take(uint64_t request_id);
  absl::Status Wait(uint64_t request_id, const std::shared_ptr<Pending>& p, absl::Time deadline);

  // Constant after Open.
  v1::KvService::Stub* stub_ = nullptr;
  std::string authorization_;
  std::unique_ptr<transfer::UcxTransport> transport_;
  transfer::PeerId daemon_ = 0;
  uint64_t session_ = 0;
  std::string daemon_address_;
  std::string descriptor_address_;
  std::string transports_;
  std::unique_ptr<transfer::MemoryRegion> pool_;  // set right after Open, or never

  std::atomic<bool> healthy_{true};
  std::atomic<uint64_t> next_request_{1};
  Mutex mu_;
  absl::flat_hash_map<uint64_t, std::shared_ptr<Pending>> pending_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvdn::client

#endif  // KVDN_CLIENT_DATA_PLANE_CLIENT_H_
