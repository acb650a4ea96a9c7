// A program outside the kvdn tree that links the installed engine side (kvdn::connector): it
// builds a PagedKvView and has the connector check it; without a GPU, Create says so.
#include <cstdio>

#include "kvdn/client/kv_connector.h"
int main() {
  kvdn::client::ClientOptions o;
  o.target = "unix:/nonexistent.sock";
  o.model = {"m", 2, 2, 64, kvdn::Dtype::kBFloat16, 16};
  auto c = kvdn::client::Client::Connect(o);
  if (!c.ok()) return 1;
  auto conn = kvdn::client::KvConnector::Create(c->get(), {});
  if (!conn.ok()) {  // no CUDA device here: a clear error, not a crash
    std::printf("connector: %s\n", conn.status().ToString().c_str());
    return conn.status().code() == absl::StatusCode::kInternal ? 0 : 1;
  }
  kvdn::client::PagedKvView view;  // no layers: refused before anything moves
  const std::vector<int32_t> tokens(20, 1);
  auto load = (*conn)->StartLoad(tokens, view);
  std::printf("connector: %s\n", load.status().ToString().c_str());
  return load.status().code() == absl::StatusCode::kInvalidArgument ? 0 : 1;
}
