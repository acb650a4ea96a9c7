// Certificates for TLS tests, made with the openssl command in a temp dir: a CA, a kvdnd
// certificate it signs (subjectAltName DNS:kvdnd.test and IP:127.0.0.1), a client certificate it
// signs, and a second CA that signs nothing here (a client trusting it must fail).
#ifndef KVDN_TESTS_INTEGRATION_TEST_CERTS_H_
#define KVDN_TESTS_INTEGRATION_TEST_CERTS_H_

#include <fstream>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "daemon_process.h"

namespace kvdn::testing {

struct TestCerts {
  std::string ca;           // CA certificate (PEM)
  std::string server_cert;  // kvdnd's, for kvdnd.test and 127.0.0.1
  std::string server_key;
  std::string client_cert;  // a client's, signed by the same CA
  std::string client_key;
  std::string other_ca;  // an unrelated CA
};

inline absl::StatusOr<TestCerts> MakeTestCerts(const std::string& dir) {
  TestCerts c{dir + "/ca.pem",     dir + "/server.pem", dir + "/server.key",
              dir + "/client.pem", dir + "/client.key", dir + "/other-ca.pem"};
  std::ofstream(dir + "/server.ext") << "subjectAltName=DNS:kvdnd.test,IP:127.0.0.1\n";
  std::ofstream(dir + "/client.ext") << "extendedKeyUsage=clientAuth\n";
  const std::string key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
  const std::string d = dir + "/";
  const std::string cmds[] = {
      absl::StrCat("openssl req -x509 ", key, " -keyout ", d, "ca.key -out ", c.ca,
                   " -days 2 -subj /CN=kvdn-test-ca"),
      absl::StrCat("openssl req -x509 ", key, " -keyout ", d, "other-ca.key -out ", c.other_ca,
                   " -days 2 -subj /CN=kvdn-other-ca"),
      absl::StrCat("openssl req ", key, " -keyout ", c.server_key, " -out ", d,
                   "server.csr -subj /CN=kvdnd.test"),
      absl::StrCat("openssl x509 -req -in ", d, "server.csr -CA ", c.ca, " -CAkey ", d,
                   "ca.key -CAcreateserial -out ", c.server_cert, " -days 2 -extfile ", d,
                   "server.ext"),
      absl::StrCat("openssl req ", key, " -keyout ", c.client_key, " -out ", d,
                   "client.csr -subj /CN=kvdn-test-client"),
      absl::StrCat("openssl x509 -req -in ", d, "client.csr -CA ", c.ca, " -CAkey ", d,
                   "ca.key -CAcreateserial -out ", c.client_cert, " -days 2 -extfile ", d,
                   "client.ext"),
  };
  for (const std::string& cmd : cmds) {
    std::string err;
    auto [rc, out] = RunCommand(cmd, &err);
    if (rc != 0) return absl::InternalError(absl::StrCat(cmd, ": ", err));
  }
  return c;
}

}  // namespace kvdn::testing

#endif  // KVDN_TESTS_INTEGRATION_TEST_CERTS_H_
