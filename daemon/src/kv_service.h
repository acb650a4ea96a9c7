// Internal to daemon/: KvService and PeerService on the tiered store. The chunk streams (Put/Get)
// are shared by both: PeerService.Fetch is Get and Replicate is Put, from local tiers only.
// Get and Fetch are raw callback methods: their frames go out as slices over the leased arena
// bytes (proto/get_frames.h), without a protobuf copy. Lookup, GetDescriptors and Release, the
// calls an engine makes for every request, are callback methods too: gRPC's synchronous server
// held about one call in 1000-3000 for ~100 ms before its handler (2026-12-02,
// bench/results/connector-2026-12-02-round-trips.md), the callback API did not. They run on gRPC's
// thread where they cannot block, else on the blocking pool. The other methods are synchronous.
#ifndef KVDN_DAEMON_SRC_KV_SERVICE_H_
#define KVDN_DAEMON_SRC_KV_SERVICE_H_

#include "kvdn/v1/kv_service.grpc.pb.h"
#include "kvdn/v1/peer_service.grpc.pb.h"
#include "src/server_state.h"

namespace kvdn::daemon {

class KvServiceImpl final
    : public v1::KvService::WithCallbackMethod_Lookup<
          v1::KvService::WithCallbackMethod_GetDescriptors<
              v1::KvService::WithCallbackMethod_Release<
                  v1::KvService::WithRawCallbackMethod_Get<v1::KvService::Service>>>> {
 public:
  explicit KvServiceImpl(ServerState* state) : state_(*state) {}

  grpc::ServerUnaryReactor* Lookup(grpc::CallbackServerContext* ctx, const v1::LookupRequest* req,
                                   v1::LookupResponse* resp) override;
  grpc::Status Put(grpc::ServerContext* ctx, grpc::ServerReader<v1::PutRequest>* reader,
                   v1::PutResponse* resp) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Get(grpc::CallbackServerContext* ctx,
                                                  const grpc::ByteBuffer* request) override;
  grpc::Status Reserve(grpc::ServerContext* ctx, const v1::ReserveRequest* req,
                       v1::ReserveResponse* resp) override;
  grpc::Status Commit(grpc::ServerContext* ctx, const v1::CommitRequest* req,
                      v1::CommitResponse* resp) override;
  grpc::ServerUnaryReactor* Release(grpc::CallbackServerContext* ctx, const v1::ReleaseRequest* req,
                                    v1::ReleaseResponse* resp) override;
  grpc::Status GetDescriptor(grpc::ServerContext* ctx, const v1::GetDescriptorRequest* req,
                             v1::GetDescriptorResponse* resp) override;
  grpc::ServerUnaryReactor* GetDescriptors(grpc::CallbackServerContext* ctx,
                                           const v1::GetDescriptorsRequest* req,
                                           v1::GetDescriptorsResponse* resp) override;
  grpc::Status Delete(grpc::ServerContext* ctx, const v1::DeleteRequest* req,
                      v1::DeleteResponse* resp) override;
  grpc::Status OpenDataPlane(grpc::ServerContext* ctx, const v1::OpenDataPlaneRequest* req,
                             v1::OpenDataPlaneResponse* resp) override;
  grpc::Status CloseDataPlane(grpc::ServerContext* ctx, const v1::CloseDataPlaneRequest* req,
                              v1::CloseDataPlaneResponse* resp) override;

 private:
  ServerState& state_;
};

class PeerServiceImpl final
    : public v1::PeerService::WithRawCallbackMethod_Fetch<v1::PeerService::Service> {
 public:
  explicit PeerServiceImpl(ServerState* state) : state_(*state) {}

  grpc::Status Lookup(grpc::ServerContext* ctx, const v1::LookupRequest* req,
                      v1::LookupResponse* resp) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Fetch(grpc::CallbackServerContext* ctx,
                                                    const grpc::ByteBuffer* request) override;
  grpc::Status Replicate(grpc::ServerContext* ctx, grpc::ServerReader<v1::PutRequest>* reader,
                         v1::PutResponse* resp) override;
  grpc::Status Probe(grpc::ServerContext* ctx, const v1::LookupRequest* req,
                     v1::ProbeResponse* resp) override;

 private:
  ServerState& state_;
};

}  // namespace kvdn::daemon

#endif  // KVDN_DAEMON_SRC_KV_SERVICE_H_
