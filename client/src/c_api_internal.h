// What the two halves of the C interface (c_api.cc, and c_api_connector.cc or its stand-in built
// without CUDA) share: the handle types and the per-thread error message.
#ifndef KVDN_CLIENT_SRC_C_API_INTERNAL_H_
#define KVDN_CLIENT_SRC_C_API_INTERNAL_H_

#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <new>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvdn/client/client.h"
#include "kvdn/client/kvdn_c.h"

struct kvdn_client {
  std::unique_ptr<kvdn::client::Client> client;
};

namespace kvdn::client::c_api {

// Records `status`'s message as the thread's last error (or clears it) and returns its code.
int Fail(const absl::Status& status);
inline int Ok() { return Fail(absl::OkStatus()); }

// Runs `body` (returning a status code) so that no C++ exception reaches a C caller.
template <typename F>
int Guard(F&& body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return Fail(absl::ResourceExhaustedError("kvdn: out of memory"));
  } catch (const std::exception& e) {
    return Fail(absl::InternalError(absl::StrCat("kvdn: ", e.what())));
  } catch (...) {
    return Fail(absl::InternalError("kvdn: unknown exception"));
  }
}

inline absl::Status CheckTokens(const int32_t* tokens, size_t num_tokens) {
  if (tokens == nullptr && num_tokens > 0) {
    return absl::InvalidArgumentError(absl::StrCat("tokens is null with num_tokens ", num_tokens));
  }
  return absl::OkStatus();
}

}  // namespace kvdn::client::c_api

#endif  // KVDN_CLIENT_SRC_C_API_INTERNAL_H_
