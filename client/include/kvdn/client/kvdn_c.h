/* kvdn's C interface: the client SDK (client.h) and the engine connector (kv_connector.h) behind a
 * stable C ABI, for engines and bindings that are not C++ (the Python package in python/ loads it
 * with ctypes, so one build serves every Python version).
 *
 *   kvdn_client_options o;
 *   kvdn_client_options_init(&o);
 *   o.ns = "tenant-a"; o.model_name = "llama-3-8b"; o.num_layers = 32; ...
 *   kvdn_client* c;
 *   if (kvdn_client_connect(&o, &c) != KVDN_OK) fprintf(stderr, "%s\n", kvdn_last_error());
 *   size_t cached;
 *   kvdn_client_lookup(c, tokens, n, &cached);
 *   kvdn_client_close(c);
 *
 * Errors: every call that can fail returns a status code (kvdn_status: the absl/gRPC codes, 0 is
 * OK) and, on failure, sets the calling thread's message, read with kvdn_last_error() (valid until
 * the thread's next kvdn call). The codes mean what the C++ API documents for the same call.
 *
 * Ownership: objects made by kvdn_*_connect/_create/_start_load/_start_save are freed by the
 * matching kvdn_*_close/_free (NULL is accepted there). A connector must be freed before its
 * client, a load or save before its connector. Pointers passed in are borrowed for the call (a
 * load's view: until the load has been waited on or freed).
 *
 * Thread-safety: as the C++ objects: a client and a connector may be shared by threads; one load
 * is used by one thread at a time.
 */
#ifndef KVDN_CLIENT_KVDN_C_H_
#define KVDN_CLIENT_KVDN_C_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define KVDN_C_EXPORT __attribute__((visibility("default")))
#else
#define KVDN_C_EXPORT
#endif

/* The version of this interface: bumped whenever a struct or signature below changes, so a binding
 * refuses a library it was not written for. */
#define KVDN_C_ABI_VERSION 2
KVDN_C_EXPORT int kvdn_abi_version(void);

/* absl::StatusCode / grpc::StatusCode values. */
typedef enum {
  KVDN_OK = 0,
  KVDN_CANCELLED = 1,
  KVDN_UNKNOWN = 2,
  KVDN_INVALID_ARGUMENT = 3,
  KVDN_DEADLINE_EXCEEDED = 4,
  KVDN_NOT_FOUND = 5,
  KVDN_ALREADY_EXISTS = 6,
  KVDN_PERMISSION_DENIED = 7,
  KVDN_RESOURCE_EXHAUSTED = 8,
  KVDN_FAILED_PRECONDITION = 9,
  KVDN_ABORTED = 10,
  KVDN_OUT_OF_RANGE = 11,
  KVDN_UNIMPLEMENTED = 12,
  KVDN_INTERNAL = 13,
  KVDN_UNAVAILABLE = 14,
  KVDN_DATA_LOSS = 15,
  KVDN_UNAUTHENTICATED = 16,
} kvdn_status;

/* The message of the calling thread's last failed call ("" when none). */
KVDN_C_EXPORT const char* kvdn_last_error(void);

/* kvdn::Dtype codes (common/chunk_key.h). */
enum { KVDN_DTYPE_FLOAT16 = 1, KVDN_DTYPE_BFLOAT16 = 2, KVDN_DTYPE_FLOAT32 = 3 };
/* ClientOptions::DataPlane. */
enum { KVDN_DATA_PLANE_AUTO = 0, KVDN_DATA_PLANE_GRPC = 1, KVDN_DATA_PLANE_UCX = 2 };

/* kvdn::client::ClientOptions; kvdn_client_options_init sets the C++ defaults. Strings may be NULL
 * (empty). */
typedef struct {
  const char* target; /* NULL/"": $KVDN_TARGET, else the local daemon's unix socket */
  const char* ns;     /* the tenant; "default" */
  const char* token;  /* NULL/"": $KVDN_TOKEN, else $KVDN_TOKEN_FILE's contents, else none */
  const char* model_name;
  uint32_t num_layers;
  uint32_t num_kv_heads;
  uint32_t head_dim;
  uint32_t dtype; /* KVDN_DTYPE_* */
  uint32_t tokens_per_chunk;
  double deadline_seconds; /* each call's deadline, retries included */
  int32_t max_attempts;
  int32_t parallel_streams; /* 0: automatic */
  int32_t data_plane;       /* KVDN_DATA_PLANE_* */
  int32_t data_plane_lanes; /* 0: automatic */
  uint64_t part_bytes;
  uint64_t receive_pool_bytes;
  const char* ucx_transports;
  /* TLS over a TCP target (TlsOptions; NULL/"" ca file: none). */
  const char* tls_ca_file;
  const char* tls_cert_file;
  const char* tls_key_file;
  const char* tls_server_name;
} kvdn_client_options;

typedef struct {
  size_t chunks_stored;
  size_t chunks_present;
  uint64_t bytes_sent;
} kvdn_save_result;

typedef struct {
  size_t tokens;
  size_t chunks;
  uint64_t bytes;
} kvdn_load_result;

typedef struct kvdn_client kvdn_client;

KVDN_C_EXPORT void kvdn_client_options_init(kvdn_client_options* options);
/* Client::Connect. INVALID_ARGUMENT naming the field; connecting is lazy (UNAVAILABLE shows on the
 * first call). */
KVDN_C_EXPORT int kvdn_client_connect(const kvdn_client_options* options, kvdn_client** out);
KVDN_C_EXPORT void kvdn_client_close(kvdn_client* client);

/* Client::Lookup: tokens, from the start, whose KV is stored. */
KVDN_C_EXPORT int kvdn_client_lookup(kvdn_client* client, const int32_t* tokens, size_t num_tokens,
                                     size_t* matched);
/* Client::ChunkPayloadSizes: the payload bytes of each chunk covering num_tokens tokens. Writes
 * min(count, capacity) sizes and sets *count to how many chunks there are (call with capacity 0 to
 * ask). */
KVDN_C_EXPORT int kvdn_client_chunk_payload_sizes(kvdn_client* client, size_t num_tokens,
                                                  uint64_t* sizes, size_t capacity, size_t* count);
/* Client::Save: payloads[j] (sizes[j] bytes) is chunk first_chunk + j of tokens. */
KVDN_C_EXPORT int kvdn_client_save(kvdn_client* client, const int32_t* tokens, size_t num_tokens,
                                   const void* const* payloads, const uint64_t* sizes,
                                   size_t num_payloads, size_t first_chunk, kvdn_save_result* out);
/* Client::Load: the longest stored run of chunks from first_chunk on, at most num_buffers, chunk
 * first_chunk + j into buffers[j] (sizes[j] bytes, ChunkPayloadSizes' size). DATA_LOSS: a chunk
 * failed verification; the buffers are not to be used. */
KVDN_C_EXPORT int kvdn_client_load(kvdn_client* client, const int32_t* tokens, size_t num_tokens,
                                   void* const* buffers, const uint64_t* sizes, size_t num_buffers,
                                   size_t first_chunk, kvdn_load_result* out);
/* Client::DataPlaneInUse into buf (NUL-terminated, truncated to capacity). */
KVDN_C_EXPORT int kvdn_client_data_plane(kvdn_client* client, char* buf, size_t capacity);

/* ---- The engine connector (KvConnector). A library built without CUDA returns
 * FAILED_PRECONDITION from these, saying so. ---- */

/* kvdn::kernels::PagedKvLayout. */
enum { KVDN_LAYOUT_NHD = 0, KVDN_LAYOUT_NHD_COMBINED = 1, KVDN_LAYOUT_HND = 2 };

/* kvdn::kernels::PagedKvLayer: one layer of the engine's paged KV cache (device pointers). */
typedef struct {
  void* k;
  void* v; /* NULL for KVDN_LAYOUT_NHD_COMBINED */
  int32_t layout;
  int32_t num_blocks;
  int32_t block_size;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t dtype; /* KVDN_DTYPE_* */
} kvdn_paged_layer;

/* kvdn::client::PagedKvView: every layer of the model, and the request's block table (device
 * int32, block ids for positions [0, block_table_len * block_size)). */
typedef struct {
  const kvdn_paged_layer* layers;
  size_t num_layers;
  const int32_t* block_table;
  int32_t block_table_len;
} kvdn_paged_view;

typedef struct {
  uint64_t host_staging_bytes;
  uint64_t device_staging_bytes;
  uint64_t l2_prefetch_bytes;
  int32_t use_gpu_tier;
  int32_t map_host_tier; /* ABI 2 */
} kvdn_connector_options;

typedef struct kvdn_connector kvdn_connector;
typedef struct kvdn_load kvdn_load;

KVDN_C_EXPORT void kvdn_connector_options_init(kvdn_connector_options* options);
/* KvConnector::Create, on the calling thread's current CUDA device. */
KVDN_C_EXPORT int kvdn_connector_create(kvdn_client* client, const kvdn_connector_options* options,
                                        kvdn_connector** out);
KVDN_C_EXPORT void kvdn_connector_free(kvdn_connector* connector);
/* KvConnector::StartLoad: returns at once with the load in flight. */
KVDN_C_EXPORT int kvdn_connector_start_load(kvdn_connector* connector, const int32_t* tokens,
                                            size_t num_tokens, const kvdn_paged_view* view,
                                            kvdn_load** out);
/* PagedLoad::WaitLayer: `stream` (a cudaStream_t; NULL the legacy default stream) waits on the GPU
 * for layer `layer`. */
KVDN_C_EXPORT int kvdn_load_wait_layer(kvdn_load* load, int32_t layer, void* stream);
/* PagedLoad::Wait: the whole load copied; the tokens now in the cache. */
KVDN_C_EXPORT int kvdn_load_wait(kvdn_load* load, kvdn_load_result* out);
/* PagedLoad::stats, after kvdn_load_wait: where the chunks came from and the host time went
 * (seconds). */
typedef struct {
  size_t gpu_tier_chunks;
  double descriptors;
  double lookup;
  double fetch;
  double stall;
  double enqueue;
  size_t host_tier_chunks; /* ABI 2 */
} kvdn_load_stats;
KVDN_C_EXPORT int kvdn_load_get_stats(kvdn_load* load, kvdn_load_stats* out);
/* Waits for the load to finish enqueuing (never for the GPU), then frees it. */
KVDN_C_EXPORT void kvdn_load_free(kvdn_load* load);
/* KvConnector::Save: the chunks of tokens past the stored prefix, from the cache, once the work on
 * `stream` so far is done; blocks until stored. */
KVDN_C_EXPORT int kvdn_connector_save(kvdn_connector* connector, const int32_t* tokens,
                                      size_t num_tokens, const kvdn_paged_view* view, void* stream,
                                      kvdn_save_result* out);

/* KvConnector::StartSave: returns once the chunks past the stored prefix are being gathered from
 * the cache, with `stream` made to wait for that gather on the GPU (the engine may reuse the
 * blocks at once); the stores into kvdnd go on behind. Errors found before the gather return
 * here. */
typedef struct kvdn_save kvdn_save;
KVDN_C_EXPORT int kvdn_connector_start_save(kvdn_connector* connector, const int32_t* tokens,
                                            size_t num_tokens, const kvdn_paged_view* view,
                                            void* stream, kvdn_save** out);
/* PagedSave::Done: *done = 1 once the save has ended (stored or failed), else 0; never blocks. */
KVDN_C_EXPORT int kvdn_save_done(kvdn_save* save, int32_t* done);
/* PagedSave::Wait: blocks until the save ends; what was stored, or its error. */
KVDN_C_EXPORT int kvdn_save_wait(kvdn_save* save, kvdn_save_result* out);
/* Waits for the save to end, then frees it. */
KVDN_C_EXPORT void kvdn_save_free(kvdn_save* save);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVDN_CLIENT_KVDN_C_H_ */
