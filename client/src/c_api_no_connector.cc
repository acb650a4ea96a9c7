// The C interface's connector calls (kvdn_c.h) in a library built without CUDA: each says so.
#include "c_api_internal.h"

namespace {

int NoCuda(const char* call) {
  return kvdn::client::c_api::Fail(absl::FailedPreconditionError(
      absl::StrCat(call,
                   ": this libkvdn_c was built without CUDA (no engine connector); build "
                   "kvdn on a machine with nvcc")));
}

}  // namespace

extern "C" {

void kvdn_connector_options_init(kvdn_connector_options* options) {
  if (options == nullptr) return;
  *options = kvdn_connector_options{uint64_t{512} << 20, uint64_t{256} << 20, 0, 1};
}

int kvdn_connector_create(kvdn_client*, const kvdn_connector_options*, kvdn_connector** out) {
  if (out != nullptr) *out = nullptr;
  return NoCuda("kvdn_connector_create");
}

void kvdn_connector_free(kvdn_connector*) {}

int kvdn_connector_start_load(kvdn_connector*, const int32_t*, size_t, const kvdn_paged_view*,
                              kvdn_load** out) {
  if (out != nullptr) *out = nullptr;
  return NoCuda("kvdn_connector_start_load");
}

int kvdn_load_wait_layer(kvdn_load*, int32_t, void*) { return NoCuda("kvdn_load_wait_layer"); }

int kvdn_load_wait(kvdn_load*, kvdn_load_result*) { return NoCuda("kvdn_load_wait"); }

int kvdn_load_get_stats(kvdn_load*, kvdn_load_stats*) { return NoCuda("kvdn_load_get_stats"); }

void kvdn_load_free(kvdn_load*) {}

int kvdn_connector_save(kvdn_connector*, const int32_t*, size_t, const kvdn_paged_view*, void*,
                        kvdn_save_result*) {
  return NoCuda("kvdn_connector_save");
}

int kvdn_connector_start_save(kvdn_connector*, const int32_t*, size_t, const kvdn_paged_view*,
                              void*, kvdn_save** out) {
  if (out != nullptr) *out = nullptr;
  return NoCuda("kvdn_connector_start_save");
}

int kvdn_save_done(kvdn_save*, int32_t*) { return NoCuda("kvdn_save_done"); }

int kvdn_save_wait(kvdn_save*, kvdn_save_result*) { return NoCuda("kvdn_save_wait"); }

void kvdn_save_free(kvdn_save*) {}

}  // extern "C"
