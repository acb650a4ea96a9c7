// A program outside the kvdn tree that finds the installed SDK with find_package(kvdn).
#include <cstdio>

#include "kvdn/client/client.h"
int main() {
  kvdn::client::ClientOptions o;
  o.target = "unix:/nonexistent.sock";
  o.model = {"m", 2, 2, 64, kvdn::Dtype::kBFloat16, 16};
  o.deadline = absl::Milliseconds(300);
  auto c = kvdn::client::Client::Connect(o);
  std::vector<int32_t> t(40, 1);
  auto r = (*c)->Lookup(t);
  std::printf("lookup: %s\n", r.status().ToString().c_str());
  return r.status().code() == absl::StatusCode::kUnavailable ||
                 r.status().code() == absl::StatusCode::kDeadlineExceeded
             ? 0
             : 1;
}
