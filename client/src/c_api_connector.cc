// The C interface's connector half (kvdn_c.h): thin calls into kvdn::client::KvConnector. Built
// only with CUDA; c_api_no_connector.cc stands in for it otherwise.
#include <cuda_runtime_api.h>

#include <memory>

#include "absl/strings/str_cat.h"
#include "c_api_internal.h"
#include "kvdn/client/kv_connector.h"

struct kvdn_connector {
  std::unique_ptr<kvdn::client::KvConnector> connector;
};

struct kvdn_load {
  std::unique_ptr<kvdn::client::PagedLoad> load;
};

struct kvdn_save {
  std::unique_ptr<kvdn::client::PagedSave> save;
};

namespace {

using kvdn::client::c_api::CheckTokens;
using kvdn::client::c_api::Fail;
using kvdn::client::c_api::Guard;
using kvdn::client::c_api::Ok;

// The C view as the C++ one; INVALID_ARGUMENT for what the C++ checks cannot see (a null view,
// null layers, a layout or dtype code out of range of its enum's type).
absl::StatusOr<kvdn::client::PagedKvView> ToView(const kvdn_paged_view* view) {
  if (view == nullptr) return absl::InvalidArgumentError("view is null");
  if (view->layers == nullptr && view->num_layers > 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("view.layers is null with num_layers ", view->num_layers));
  }
  kvdn::client::PagedKvView v;
  v.layers.reserve(view->num_layers);
  for (size_t l = 0; l < view->num_layers; ++l) {
    const kvdn_paged_layer& c = view->layers[l];
    if (c.layout < 0 || c.layout > 255) {
      return absl::InvalidArgumentError(
          absl::StrCat("layers[", l, "].layout ", c.layout, " is not a layout code"));
    }
    if (c.dtype < 0 || c.dtype > 255) {
      return absl::InvalidArgumentError(
          absl::StrCat("layers[", l, "].dtype ", c.dtype, " is not a dtype code"));
    }
    kvdn::kernels::PagedKvLayer layer;
    layer.k = c.k;
    layer.v = c.v;
    layer.layout = static_cast<kvdn::kernels::PagedKvLayout>(c.layout);
    layer.num_blocks = c.num_blocks;
    layer.block_size = c.block_size;
    layer.num_kv_heads = c.num_kv_heads;
    layer.head_dim = c.head_dim;
    layer.dtype = static_cast<kvdn::Dtype>(c.dtype);
    v.layers.push_back(layer);
  }
  v.block_table = view->block_table;
  v.block_table_len = view->block_table_len;
  return v;
}

// What every connector call with tokens and a view checks first; the view as C++ takes it.
absl::StatusOr<kvdn::client::PagedKvView> TokensAndView(const kvdn_connector* connector,
                                                        const void* out, const int32_t* tokens,
                                                        size_t num_tokens,
                                                        const kvdn_paged_view* view) {
  if (connector == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("connector and out must not be null");
  }
  if (absl::Status s = CheckTokens(tokens, num_tokens); !s.ok()) return s;
  return ToView(view);
}

kvdn_save_result ToC(const kvdn::client::SaveResult& r) {
  return kvdn_save_result{r.chunks_stored, r.chunks_present, r.bytes_sent};
}
}  // namespace

extern "C" {

void kvdn_connector_options_init(kvdn_connector_options* options) {
  if (options == nullptr) return;
  const kvdn::client::ConnectorOptions d;
  options->host_staging_bytes = d.host_staging_bytes;
  options->device_staging_bytes = d.device_staging_bytes;
  options->l2_prefetch_bytes = d.l2_prefetch_bytes;
  options->use_gpu_tier = d.use_gpu_tier ? 1 : 0;
  options->map_host_tier = d.map_host_tier ? 1 : 0;
}

int kvdn_connector_create(kvdn_client* client, const kvdn_connector_options* options,
                          kvdn_connector** out) {
  return Guard([&] {
    if (client == nullptr || options == nullptr || out == nullptr) {
      return Fail(absl::InvalidArgumentError("client, options and out must not be null"));
    }
    *out = nullptr;
    kvdn::client::ConnectorOptions o;
    o.host_staging_bytes = options->host_staging_bytes;
    o.device_staging_bytes = options->device_staging_bytes;
    o.l2_prefetch_bytes = options->l2_prefetch_bytes;
    o.use_gpu_tier = options->use_gpu_tier != 0;
    o.map_host_tier = options->map_host_tier != 0;
    auto c = kvdn::client::KvConnector::Create(client->client.get(), o);
    if (!c.ok()) return Fail(c.status());
    *out = new kvdn_connector{std::move(*c)};
    return Ok();
  });
}

void kvdn_connector_free(kvdn_connector* connector) { delete connector; }

int kvdn_connector_start_load(kvdn_connector* connector, const int32_t* tokens, size_t num_tokens,
                              const kvdn_paged_view* view, kvdn_load** out) {
  return Guard([&] {
    if (out != nullptr) *out = nullptr;
    auto v = TokensAndView(connector, out, tokens, num_tokens, view);
    if (!v.ok()) return Fail(v.status());
    auto load = connector->connector->StartLoad(absl::MakeConstSpan(tokens, num_tokens), *v);
    if (!load.ok()) return Fail(load.status());
    *out = new kvdn_load{std::move(*load)};
    return Ok();
  });
}

int kvdn_load_wait_layer(kvdn_load* load, int32_t layer, void* stream) {
  return Guard([&] {
    if (load == nullptr) return Fail(absl::InvalidArgumentError("load is null"));
    return Fail(load->load->WaitLayer(layer, static_cast<cudaStream_t>(stream)));
  });
}

int kvdn_load_wait(kvdn_load* load, kvdn_load_result* out) {
  return Guard([&] {
    if (load == nullptr || out == nullptr) {
      return Fail(absl::InvalidArgumentError("load and out must not be null"));
    }
    auto r = load->load->Wait();
    if (!r.ok()) return Fail(r.status());
    *out = kvdn_load_result{r->tokens, r->chunks, r->bytes};
    return Ok();
  });
}

int kvdn_load_get_stats(kvdn_load* load, kvdn_load_stats* out) {
  return Guard([&] {
    if (load == nullptr || out == nullptr) {
      return Fail(absl::InvalidArgumentError("load and out must not be null"));
    }
    const kvdn::client::LoadStats s = load->load->stats();
    *out = kvdn_load_stats{s.gpu_tier_chunks, s.descriptors, s.lookup,          s.fetch,
                           s.stall,           s.enqueue,     s.host_tier_chunks};
    return Ok();
  });
}

void kvdn_load_free(kvdn_load* load) { delete load; }

int kvdn_connector_save(kvdn_connector* connector, const int32_t* tokens, size_t num_tokens,
                        const kvdn_paged_view* view, void* stream, kvdn_save_result* out) {
  return Guard([&] {
    auto v = TokensAndView(connector, out, tokens, num_tokens, view);
    if (!v.ok()) return Fail(v.status());
    auto r = connector->connector->Save(absl::MakeConstSpan(tokens, num_tokens), *v,
                                        static_cast<cudaStream_t>(stream));
    if (!r.ok()) return Fail(r.status());
    *out = ToC(*r);
    return Ok();
  });
}

int kvdn_connector_start_save(kvdn_connector* connector, const int32_t* tokens, size_t num_tokens,
                              const kvdn_paged_view* view, void* stream, kvdn_save** out) {
  return Guard([&] {
    if (out != nullptr) *out = nullptr;
    auto v = TokensAndView(connector, out, tokens, num_tokens, view);
    if (!v.ok()) return Fail(v.status());
    auto save = connector->connector->StartSave(absl::MakeConstSpan(tokens, num_tokens), *v,
                                                static_cast<cudaStream_t>(stream));
    if (!save.ok()) return Fail(save.status());
    *out = new kvdn_save{std::move(*save)};
    return Ok();
  });
}

int kvdn_save_done(kvdn_save* save, int32_t* done) {
  return Guard([&] {
    if (save == nullptr || done == nullptr) {
      return Fail(absl::InvalidArgumentError("save and done must not be null"));
    }
    *done = save->save->Done() ? 1 : 0;
    return Ok();
  });
}

int kvdn_save_wait(kvdn_save* save, kvdn_save_result* out) {
  return Guard([&] {
    if (save == nullptr || out == nullptr) {
      return Fail(absl::InvalidArgumentError("save and out must not be null"));
    }
    auto r = save->save->Wait();
    if (!r.ok()) return Fail(r.status());
    *out = ToC(*r);
    return Ok();
  });
}

void kvdn_save_free(kvdn_save* save) { delete save; }

}  // extern "C"
