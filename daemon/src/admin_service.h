// Internal to daemon/: AdminService (kvdnctl's API).
#ifndef KVDN_DAEMON_SRC_ADMIN_SERVICE_H_
#define KVDN_DAEMON_SRC_ADMIN_SERVICE_H_

#include <functional>

#include "kvdn/v1/admin_service.grpc.pb.h"
#include "src/server_state.h"

namespace kvdn::daemon {

// All methods are gRPC callback methods run on the blocking pool (gRPC's synchronous server held
// about one unary call in 1000-3000 for ~100 ms before its handler; kv_service.h).
class AdminServiceImpl final : public v1::AdminService::CallbackService {
 public:
  // `drain` runs the daemon's drain (stop admitting, wait, flush); returns calls in flight.
  AdminServiceImpl(ServerState* state, std::function<uint32_t()> drain)
      : state_(*state), drain_(std::move(drain)) {}

  grpc::ServerUnaryReactor* GetStats(grpc::CallbackServerContext* ctx,
                                     const v1::GetStatsRequest* req,
                                     v1::GetStatsResponse* resp) override;
  grpc::ServerUnaryReactor* ListChunks(grpc::CallbackServerContext* ctx,
                                       const v1::ListChunksRequest* req,
                                       v1::ListChunksResponse* resp) override;
  grpc::ServerUnaryReactor* InspectChunk(grpc::CallbackServerContext* ctx,
                                         const v1::InspectChunkRequest* req,
                                         v1::InspectChunkResponse* resp) override;
  grpc::ServerUnaryReactor* Evict(grpc::CallbackServerContext* ctx, const v1::EvictRequest* req,
                                  v1::EvictResponse* resp) override;
  grpc::ServerUnaryReactor* GetConfig(grpc::CallbackServerContext* ctx,
                                      const v1::GetConfigRequest* req,
                                      v1::GetConfigResponse* resp) override;
  grpc::ServerUnaryReactor* ListMembers(grpc::CallbackServerContext* ctx,
                                        const v1::ListMembersRequest* req,
                                        v1::ListMembersResponse* resp) override;
  grpc::ServerUnaryReactor* Drain(grpc::CallbackServerContext* ctx, const v1::DrainRequest* req,
                                  v1::DrainResponse* resp) override;

 private:
  // Runs `body` (returning absl::Status) on the blocking pool as call `method`, once admitted.
  template <typename Body>
  grpc::ServerUnaryReactor* OnPool(grpc::CallbackServerContext* ctx, Method method, Body body);
  absl::Status DoGetStats(grpc::ServerContextBase* ctx, const v1::GetStatsRequest* req,
                          v1::GetStatsResponse* resp);
  absl::Status DoListChunks(grpc::ServerContextBase* ctx, const v1::ListChunksRequest* req,
                            v1::ListChunksResponse* resp);
  absl::Status DoInspectChunk(grpc::ServerContextBase* ctx, const v1::InspectChunkRequest* req,
                              v1::InspectChunkResponse* resp);
  absl::Status DoEvict(grpc::ServerContextBase* ctx, const v1::EvictRequest* req,
                       v1::EvictResponse* resp);
  absl::Status DoGetConfig(grpc::ServerContextBase* ctx, const v1::GetConfigRequest* req,
                           v1::GetConfigResponse* resp);
  absl::Status DoListMembers(grpc::ServerContextBase* ctx, const v1::ListMembersRequest* req,
                             v1::ListMembersResponse* resp);
  absl::Status DoDrain(grpc::ServerContextBase* ctx, const v1::DrainRequest* req,
                       v1::DrainResponse* resp);

  ServerState& state_;
  std::function<uint32_t()> drain_;
};

}  // namespace kvdn::daemon

#endif  // KVDN_DAEMON_SRC_ADMIN_SERVICE_H_
