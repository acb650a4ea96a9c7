// The one place absl::Status and grpc::Status convert into each other (STYLE.md 2). Codes map one
// to one (both follow google.rpc.Code); the message passes through unchanged.
#ifndef KVDN_PROTO_GRPC_STATUS_H_
#define KVDN_PROTO_GRPC_STATUS_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace kvdn {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace kvdn

#endif  // KVDN_PROTO_GRPC_STATUS_H_
