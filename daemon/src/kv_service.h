// Internal to daemon/: KvService and PeerService on the tiered store. The chunk streams (Put/Get)
// are shared by both: PeerService.Fetch is Get and Replicate is Put, from local tiers only.
// Every method is a gRPC callback method (gRPC's synchronous server held about one unary call in
// 1000-3000 for ~100 ms before its handler, 2026-12-02, bench/results/
// connector-2026-12-02-round-trips.md; the callback API did not). A method runs on gRPC's thread
// where it cannot block (the index, leases of chunks in memory, reservations that need no disk
// write) and on the blocking pool where it may (disk I/O, a hash over a whole chunk, UCX, asking
// peers). Get/Fetch and Put/Replicate are raw: their frames go out as slices over the leased
// arena bytes and come in straight from gRPC's slices into the reservation (proto/get_frames.h).
#ifndef KVDN_DAEMON_SRC_KV_SERVICE_H_
#define KVDN_DAEMON_SRC_KV_SERVICE_H_

#include "kvdn/v1/kv_service.grpc.pb.h"
#include "kvdn/v1/peer_service.grpc.pb.h"
#include "src/server_state.h"

namespace kvdn::daemon {

class KvServiceImpl final
    : public v1::KvService::WithCallbackMethod_Lookup<v1::KvService::WithRawCallbackMethod_Put<
          v1::KvService::WithRawCallbackMethod_Get<v1::KvService::WithCallbackMethod_Reserve<
              v1::KvService::WithCallbackMethod_Commit<v1::KvService::WithCallbackMethod_Release<
                  v1::KvService::WithCallbackMethod_GetDescriptor<
                      v1::KvService::WithCallbackMethod_GetDescriptors<
                          v1::KvService::WithCallbackMethod_Delete<
                              v1::KvService::WithCallbackMethod_OpenDataPlane<
                                  v1::KvService::WithCallbackMethod_CloseDataPlane<
                                      v1::KvService::WithCallbackMethod_MapHostTier<
                                          v1::KvService::Service>>>>>>>>>>>> {
 public:
  explicit KvServiceImpl(ServerState* state) : state_(*state) {}

  grpc::ServerUnaryReactor* Lookup(grpc::CallbackServerContext* ctx, const v1::LookupRequest* req,
                                   v1::LookupResponse* resp) override;
  grpc::ServerReadReactor<grpc::ByteBuffer>* Put(grpc::CallbackServerContext* ctx,
                                                 grpc::ByteBuffer* response) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Get(grpc::CallbackServerContext* ctx,
                                                  const grpc::ByteBuffer* request) override;
  grpc::ServerUnaryReactor* Reserve(grpc::CallbackServerContext* ctx, const v1::ReserveRequest* req,
                                    v1::ReserveResponse* resp) override;
  grpc::ServerUnaryReactor* Commit(grpc::CallbackServerContext* ctx, const v1::CommitRequest* req,
                                   v1::CommitResponse* resp) override;
  grpc::ServerUnaryReactor* Release(grpc::CallbackServerContext* ctx, const v1::ReleaseRequest* req,
                                    v1::ReleaseResponse* resp) override;
  grpc::ServerUnaryReactor* GetDescriptor(grpc::CallbackServerContext* ctx,
                                          const v1::GetDescriptorRequest* req,
                                          v1::GetDescriptorResponse* resp) override;
  grpc::ServerUnaryReactor* GetDescriptors(grpc::CallbackServerContext* ctx,
                                           const v1::GetDescriptorsRequest* req,
                                           v1::GetDescriptorsResponse* resp) override;
  grpc::ServerUnaryReactor* Delete(grpc::CallbackServerContext* ctx, const v1::DeleteRequest* req,
                                   v1::DeleteResponse* resp) override;
  grpc::ServerUnaryReactor* OpenDataPlane(grpc::CallbackServerContext* ctx,
                                          const v1::OpenDataPlaneRequest* req,
                                          v1::OpenDataPlaneResponse* resp) override;
  grpc::ServerUnaryReactor* CloseDataPlane(grpc::CallbackServerContext* ctx,
                                           const v1::CloseDataPlaneRequest* req,
                                           v1::CloseDataPlaneResponse* resp) override;
  grpc::ServerUnaryReactor* MapHostTier(grpc::CallbackServerContext* ctx,
                                        const v1::MapHostTierRequest* req,
                                        v1::MapHostTierResponse* resp) override;

 private:
  ServerState& state_;
};

class PeerServiceImpl final
    : public v1::PeerService::WithCallbackMethod_Lookup<
          v1::PeerService::WithRawCallbackMethod_Fetch<
              v1::PeerService::WithRawCallbackMethod_Replicate<
                  v1::PeerService::WithCallbackMethod_Probe<v1::PeerService::Service>>>> {
 public:
  explicit PeerServiceImpl(ServerState* state) : state_(*state) {}

  grpc::ServerUnaryReactor* Lookup(grpc::CallbackServerContext* ctx, const v1::LookupRequest* req,
                                   v1::LookupResponse* resp) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Fetch(grpc::CallbackServerContext* ctx,
                                                    const grpc::ByteBuffer* request) override;
  grpc::ServerReadReactor<grpc::ByteBuffer>* Replicate(grpc::CallbackServerContext* ctx,
                                                       grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* Probe(grpc::CallbackServerContext* ctx, const v1::LookupRequest* req,
                                  v1::ProbeResponse* resp) override;

 private:
  ServerState& state_;
};

}  // namespace kvdn::daemon

#endif  // KVDN_DAEMON_SRC_KV_SERVICE_H_
