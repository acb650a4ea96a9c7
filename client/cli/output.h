// kvdnctl's output: aligned human tables, byte sizes, and JSON of protobuf messages.
#ifndef KVDN_CLIENT_CLI_OUTPUT_H_
#define KVDN_CLIENT_CLI_OUTPUT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "google/protobuf/message.h"

namespace kvdn::cli {

class Table {
 public:
  explicit Table(std::vector<std::string> headers) : headers_(std::move(headers)) {}
  void Add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  // Columns padded to their widest cell; numbers (cells starting with a digit) right-aligned.
  std::string Render() const;

 private:
  std::vector<std::string> headers_;
  std::vector<std::vector<std::string>> rows_;
};

// 1536 -> "1.5 KiB".
std::string HumanBytes(uint64_t n);
// The message in the proto3 JSON mapping, proto field names, all fields printed.
std::string ToJson(const google::protobuf::Message& m);

}  // namespace kvdn::cli

#endif  // KVDN_CLIENT_CLI_OUTPUT_H_
