// Internal to daemon/: AdminService (kvdnctl's API).
#ifndef KVDN_DAEMON_SRC_ADMIN_SERVICE_H_
#define KVDN_DAEMON_SRC_ADMIN_SERVICE_H_

#include <functional>

#include "kvdn/v1/admin_service.grpc.pb.h"
#include "src/server_state.h"

namespace kvdn::daemon {

class AdminServiceImpl final : public v1::AdminService::Service {
 public:
  // `drain` runs the daemon's drain (stop admitting, wait, flush); returns calls in flight.
  AdminServiceImpl(ServerState* state, std::function<uint32_t()> drain)
      : state_(*state), drain_(std::move(drain)) {}

  grpc::Status GetStats(grpc::ServerContext* ctx, const v1::GetStatsRequest* req,
                        v1::GetStatsResponse* resp) override;
  grpc::Status ListChunks(grpc::ServerContext* ctx, const v1::ListChunksRequest* req,
                          v1::ListChunksResponse* resp) override;
  grpc::Status InspectChunk(grpc::ServerContext* ctx, const v1::InspectChunkRequest* req,
                            v1::InspectChunkResponse* resp) override;
  grpc::Status Evict(grpc::ServerContext* ctx, const v1::EvictRequest* req,
                     v1::EvictResponse* resp) override;
  grpc::Status GetConfig(grpc::ServerContext* ctx, const v1::GetConfigRequest* req,
                         v1::GetConfigResponse* resp) override;
  grpc::Status ListMembers(grpc::ServerContext* ctx, const v1::ListMembersRequest* req,
                           v1::ListMembersResponse* resp) override;
  grpc::Status Drain(grpc::ServerContext* ctx, const v1::DrainRequest* req,
                     v1::DrainResponse* resp) override;

 private:
  ServerState& state_;
  std::function<uint32_t()> drain_;
};

}  // namespace kvdn::daemon

#endif  // KVDN_DAEMON_SRC_ADMIN_SERVICE_H_
