// Internal to transfer/: owning wrappers for UCX's C handles (STYLE.md 9), and status conversion.
#ifndef KVDN_TRANSFER_SRC_UCX_HANDLES_H_
#define KVDN_TRANSFER_SRC_UCX_HANDLES_H_

#include <ucp/api/ucp.h>

#include <memory>
#include <string>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace kvdn::transfer::ucx {

struct ConfigDeleter {
  void operator()(ucp_config_t* c) const { ucp_config_release(c); }
};
struct ContextDeleter {
  void operator()(ucp_context_h c) const { ucp_cleanup(c); }
};
struct WorkerDeleter {
  void operator()(ucp_worker_h w) const { ucp_worker_destroy(w); }
};
struct RkeyDeleter {
  void operator()(ucp_rkey_h k) const { ucp_rkey_destroy(k); }
};
struct RkeyBufferDeleter {
  void operator()(void* b) const { ucp_rkey_buffer_release(b); }
};

using Config = std::unique_ptr<ucp_config_t, ConfigDeleter>;
using Context = std::unique_ptr<std::remove_pointer_t<ucp_context_h>, ContextDeleter>;
using Worker = std::unique_ptr<std::remove_pointer_t<ucp_worker_h>, WorkerDeleter>;
// A remote key unpacked on an endpoint; destroy it before the endpoint closes.
using RemoteKey = std::unique_ptr<std::remove_pointer_t<ucp_rkey_h>, RkeyDeleter>;

// A worker's address, released back to the worker. The worker must outlive it.
class WorkerAddress {
 public:
  WorkerAddress(ucp_worker_h worker, ucp_address_t* address, size_t length)
      : worker_(worker), address_(address), length_(length) {}
  ~WorkerAddress() {
    if (address_ != nullptr) ucp_worker_release_address(worker_, address_);
  }
  WorkerAddress(const WorkerAddress&) = delete;
  WorkerAddress& operator=(const WorkerAddress&) = delete;
  absl::string_view bytes() const {
    return absl::string_view(reinterpret_cast<const char*>(address_), length_);
  }

 private:
  ucp_worker_h worker_;
  ucp_address_t* address_;
  size_t length_;
};

// Memory mapped (registered) with a context; unmapped on destruction. The context must outlive it.
class MemHandle {
 public:
  MemHandle(ucp_context_h context, ucp_mem_h memh) : context_(context), memh_(memh) {}
  ~MemHandle() {
    if (memh_ != nullptr) ucp_mem_unmap(context_, memh_);
  }
  MemHandle(const MemHandle&) = delete;
  MemHandle& operator=(const MemHandle&) = delete;
  ucp_mem_h get() const { return memh_; }
  // The packed remote key of this memory, for a peer's one-sided access (RDMA). INTERNAL on error.
  absl::StatusOr<std::string> PackRemoteKey() const {
    void* buffer = nullptr;
    size_t size = 0;
    const ucs_status_t st = ucp_rkey_pack(context_, memh_, &buffer, &size);
    if (st != UCS_OK) {
      return absl::InternalError(absl::StrCat("ucp_rkey_pack: ", ucs_status_string(st)));
    }
    std::unique_ptr<void, RkeyBufferDeleter> owned(buffer);
    return std::string(static_cast<const char*>(buffer), size);
  }

 private:
  ucp_context_h context_;
  ucp_mem_h memh_;
};

// UCX status -> absl::Status, with `what` naming the operation. Peer and connection failures are
// UNAVAILABLE (retry, maybe elsewhere); a cancelled operation is CANCELLED; the rest INTERNAL.
inline absl::Status FromUcs(ucs_status_t st, absl::string_view what) {
  if (st == UCS_OK) return absl::OkStatus();
  const std::string msg = absl::StrCat(what, ": ", ucs_status_string(st));
  switch (st) {
    case UCS_ERR_CANCELED:
      return absl::CancelledError(msg);
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_REJECTED:
    case UCS_ERR_NOT_CONNECTED:
    case UCS_ERR_TIMED_OUT:
    case UCS_ERR_IO_ERROR:
    case UCS_ERR_NO_RESOURCE:
      return absl::UnavailableError(msg);
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_EXCEEDS_LIMIT:
      return absl::ResourceExhaustedError(msg);
    case UCS_ERR_INVALID_PARAM:
    case UCS_ERR_INVALID_ADDR:
      return absl::InvalidArgumentError(msg);
    default:
      return absl::InternalError(msg);
  }
}

}  // namespace kvdn::transfer::ucx

#endif  // KVDN_TRANSFER_SRC_UCX_HANDLES_H_
