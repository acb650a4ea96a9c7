// The C interface's client half (kvdn_c.h): thin calls into kvdn::client::Client.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "c_api_internal.h"

namespace kvdn::client::c_api {
namespace {

thread_local std::string last_error;

std::string Str(const char* s) { return s == nullptr ? std::string() : std::string(s); }

}  // namespace

int Fail(const absl::Status& status) {
  if (status.ok()) {
    last_error.clear();
  } else {
    last_error = std::string(status.message());
  }
  return static_cast<int>(status.code());
}

}  // namespace kvdn::client::c_api

using kvdn::client::c_api::CheckTokens;
using kvdn::client::c_api::Fail;
using kvdn::client::c_api::Guard;
using kvdn::client::c_api::Ok;
using kvdn::client::c_api::Str;

extern "C" {

int kvdn_abi_version(void) { return KVDN_C_ABI_VERSION; }

const char* kvdn_last_error(void) { return kvdn::client::c_api::last_error.c_str(); }

void kvdn_client_options_init(kvdn_client_options* options) {
  if (options == nullptr) return;
  const kvdn::client::ClientOptions d;
  *options = kvdn_client_options{};
  options->tokens_per_chunk = d.model.tokens_per_chunk;
  options->dtype = static_cast<uint32_t>(d.model.dtype);
  options->deadline_seconds = absl::ToDoubleSeconds(d.deadline);
  options->max_attempts = d.max_attempts;
  options->parallel_streams = d.parallel_streams;
  options->data_plane = KVDN_DATA_PLANE_AUTO;
  options->data_plane_lanes = d.data_plane_lanes;
  options->part_bytes = d.part_bytes;
  options->receive_pool_bytes = d.receive_pool_bytes;
}

int kvdn_client_connect(const kvdn_client_options* options, kvdn_client** out) {
  return Guard([&] {
    if (options == nullptr || out == nullptr) {
      return Fail(absl::InvalidArgumentError("options and out must not be null"));
    }
    *out = nullptr;
    kvdn::client::ClientOptions o;
    o.target = Str(options->target);
    if (options->ns != nullptr) o.ns = options->ns;
    o.token = Str(options->token);
    o.model.model_name = Str(options->model_name);
    o.model.num_layers = options->num_layers;
    o.model.num_kv_heads = options->num_kv_heads;
    o.model.head_dim = options->head_dim;
    if (options->dtype > 255) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("model dtype ", options->dtype, " is not a kvdn dtype code")));
    }
    o.model.dtype = static_cast<kvdn::Dtype>(options->dtype);
    o.model.tokens_per_chunk = options->tokens_per_chunk;
    if (!(options->deadline_seconds > 0)) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("deadline_seconds must be > 0, got ", options->deadline_seconds)));
    }
    o.deadline = absl::Seconds(options->deadline_seconds);
    o.max_attempts = options->max_attempts;
    o.parallel_streams = options->parallel_streams;
    switch (options->data_plane) {
      case KVDN_DATA_PLANE_AUTO:
        o.data_plane = kvdn::client::ClientOptions::DataPlane::kAuto;
        break;
      case KVDN_DATA_PLANE_GRPC:
        o.data_plane = kvdn::client::ClientOptions::DataPlane::kGrpc;
        break;
      case KVDN_DATA_PLANE_UCX:
        o.data_plane = kvdn::client::ClientOptions::DataPlane::kUcx;
        break;
      default:
        return Fail(absl::InvalidArgumentError(absl::StrCat(
            "data_plane ", options->data_plane, " is not one of auto (0), grpc (1), ucx (2)")));
    }
    o.data_plane_lanes = options->data_plane_lanes;
    o.part_bytes = options->part_bytes;
    o.receive_pool_bytes = options->receive_pool_bytes;
    o.ucx_transports = Str(options->ucx_transports);
    o.tls.ca_file = Str(options->tls_ca_file);
    o.tls.cert_file = Str(options->tls_cert_file);
    o.tls.key_file = Str(options->tls_key_file);
    o.tls.server_name = Str(options->tls_server_name);
    auto client = kvdn::client::Client::Connect(o);
    if (!client.ok()) return Fail(client.status());
    *out = new kvdn_client{std::move(*client)};
    return Ok();
  });
}

void kvdn_client_close(kvdn_client* client) { delete client; }

int kvdn_client_lookup(kvdn_client* client, const int32_t* tokens, size_t num_tokens,
                       size_t* matched) {
  return Guard([&] {
    if (client == nullptr || matched == nullptr) {
      return Fail(absl::InvalidArgumentError("client and matched must not be null"));
    }
    if (auto s = CheckTokens(tokens, num_tokens); !s.ok()) return Fail(s);
    auto r = client->client->Lookup(absl::MakeConstSpan(tokens, num_tokens));
    if (!r.ok()) return Fail(r.status());
    *matched = *r;
    return Ok();
  });
}

int kvdn_client_chunk_payload_sizes(kvdn_client* client, size_t num_tokens, uint64_t* sizes,
                                    size_t capacity, size_t* count) {
  return Guard([&] {
    if (client == nullptr || count == nullptr || (sizes == nullptr && capacity > 0)) {
      return Fail(absl::InvalidArgumentError(
          "client and count must not be null, nor sizes with a capacity"));
    }
    const std::vector<uint64_t> all = client->client->ChunkPayloadSizes(num_tokens);
    for (size_t i = 0; i < all.size() && i < capacity; ++i) sizes[i] = all[i];
    *count = all.size();
    return Ok();
  });
}

int kvdn_client_save(kvdn_client* client, const int32_t* tokens, size_t num_tokens,
                     const void* const* payloads, const uint64_t* sizes, size_t num_payloads,
                     size_t first_chunk, kvdn_save_result* out) {
  return Guard([&] {
    if (client == nullptr || out == nullptr) {
      return Fail(absl::InvalidArgumentError("client and out must not be null"));
    }
    if (auto s = CheckTokens(tokens, num_tokens); !s.ok()) return Fail(s);
    if (num_payloads > 0 && (payloads == nullptr || sizes == nullptr)) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("payloads and sizes must not be null with num_payloads ", num_payloads)));
    }
    std::vector<kvdn::ByteSpan> spans(num_payloads);
    for (size_t j = 0; j < num_payloads; ++j) {
      if (payloads[j] == nullptr && sizes[j] > 0) {
        return Fail(absl::InvalidArgumentError(absl::StrCat("payloads[", j, "] is null")));
      }
      spans[j] = kvdn::ByteSpan(static_cast<const uint8_t*>(payloads[j]), sizes[j]);
    }
    auto r = client->client->Save(absl::MakeConstSpan(tokens, num_tokens), spans, first_chunk);
    if (!r.ok()) return Fail(r.status());
    *out = kvdn_save_result{r->chunks_stored, r->chunks_present, r->bytes_sent};
    return Ok();
  });
}

int kvdn_client_load(kvdn_client* client, const int32_t* tokens, size_t num_tokens,
                     void* const* buffers, const uint64_t* sizes, size_t num_buffers,
                     size_t first_chunk, kvdn_load_result* out) {
  return Guard([&] {
    if (client == nullptr || out == nullptr) {
      return Fail(absl::InvalidArgumentError("client and out must not be null"));
    }
    if (auto s = CheckTokens(tokens, num_tokens); !s.ok()) return Fail(s);
    if (num_buffers > 0 && (buffers == nullptr || sizes == nullptr)) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("buffers and sizes must not be null with num_buffers ", num_buffers)));
    }
    std::vector<kvdn::MutableByteSpan> spans(num_buffers);
    for (size_t j = 0; j < num_buffers; ++j) {
      if (buffers[j] == nullptr && sizes[j] > 0) {
        return Fail(absl::InvalidArgumentError(absl::StrCat("buffers[", j, "] is null")));
      }
      spans[j] = kvdn::MutableByteSpan(static_cast<uint8_t*>(buffers[j]), sizes[j]);
    }
    auto r = client->client->Load(absl::MakeConstSpan(tokens, num_tokens), spans, first_chunk);
    if (!r.ok()) return Fail(r.status());
    *out = kvdn_load_result{r->tokens, r->chunks, r->bytes};
    return Ok();
  });
}

int kvdn_client_data_plane(kvdn_client* client, char* buf, size_t capacity) {
  return Guard([&] {
    if (client == nullptr || (buf == nullptr && capacity > 0)) {
      return Fail(absl::InvalidArgumentError("client must not be null, nor buf with a capacity"));
    }
    const std::string s = client->client->DataPlaneInUse();
    if (capacity > 0) {
      const size_t n = std::min(s.size(), capacity - 1);
      std::memcpy(buf, s.data(), n);
      buf[n] = '\0';
    }
    return Ok();
  });
}

}  // extern "C"
