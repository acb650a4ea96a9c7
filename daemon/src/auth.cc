#include "src/auth.h"

#include <openssl/evp.h>

#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kvdn/common/chunk_key.h"

namespace kvdn::daemon {

std::string Sha256(absl::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  if (EVP_Digest(data.data(), data.size(), md, &n, EVP_sha256(), nullptr) != 1 || n != 32) {
    // OpenSSL without SHA-256 cannot happen on a supported system; never match anything then.
    return std::string();
  }
  return std::string(reinterpret_cast<const char*>(md), n);
}

const std::string& Caller::token_id() const {
  static const std::string kNone;
  return grants != nullptr ? grants->id : kNone;
}

absl::Status Caller::CheckNamespace(absl::string_view ns) const {
  if (grants == nullptr || grants->Allows(ns)) return absl::OkStatus();
  return absl::PermissionDeniedError(
      absl::StrCat("the call's token does not grant namespace \"", ns, "\" (auth_tokens_file)"));
}

absl::StatusOr<std::unique_ptr<TokenTable>> TokenTable::Parse(absl::string_view text,
                                                              absl::string_view source) {
  std::unique_ptr<TokenTable> table(new TokenTable());
  absl::flat_hash_map<std::string, int> line_of;  // digest -> line, for duplicates
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    auto bad = [&](absl::string_view why) {
      return absl::InvalidArgumentError(absl::StrCat(source, ":", line_no, ": ", why));
    };
    if (const size_t hash = line.find('#'); hash != absl::string_view::npos) {
      line = line.substr(0, hash);
    }
    line = absl::StripAsciiWhitespace(line);
    if (line.empty()) continue;
    std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (fields.size() != 2) {
      return bad(
          absl::StrCat("need \"<token> <grant>[,<grant>...]\", found ", fields.size(), " fields"));
    }
    const absl::string_view token = fields[0];
    if (token.size() < kMinTokenLength || token.size() > kMaxTokenLength) {
      return bad(absl::StrCat("a token of ", token.size(), " characters; tokens have ",
                              kMinTokenLength, " to ", kMaxTokenLength));
    }
    for (char c : token) {
      if (c < 0x21 || c > 0x7e) return bad("a token has a character outside printable ASCII");
    }
    Grants g;
    for (absl::string_view grant : absl::StrSplit(fields[1], ',')) {
      if (grant == "kvdn:admin") {
        g.admin = true;
      } else if (grant == "kvdn:peer") {
        g.peer = true;
      } else if (grant == "kvdn:all-namespaces") {
        g.all_namespaces = true;
      } else if (absl::StartsWith(grant, "kvdn:")) {
        return bad(absl::StrCat("unknown grant \"", grant,
                                "\" (kvdn:admin, kvdn:peer, kvdn:all-namespaces, or a namespace)"));
      } else if (absl::Status st = ValidateNamespace(grant); !st.ok()) {
        return bad(absl::StrCat("grant \"", grant, "\": ", st.message()));
      } else {
        g.namespaces.insert(std::string(grant));
      }
    }
    std::string digest = Sha256(token);
    if (auto [it, inserted] = line_of.emplace(digest, line_no); !inserted) {
      return bad(absl::StrCat("the token of line ", it->second, " again (one line a token)"));
    }
    if (g.peer && table->peer_token_.empty()) table->peer_token_ = std::string(token);
    g.id = digest;
    table->by_digest_.emplace(std::move(digest), std::move(g));
  }
  if (table->by_digest_.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": no tokens (with none, every call would be refused)"));
  }
  return table;
}

absl::StatusOr<std::unique_ptr<TokenTable>> TokenTable::Load(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return Parse(ss.str(), path);
}

absl::StatusOr<const Grants*> TokenTable::Find(absl::string_view token) const {
  auto it = by_digest_.find(Sha256(token));
  if (it == by_digest_.end()) {
    return absl::UnauthenticatedError(
        "the call's token is not one this kvdnd knows (auth_tokens_file)");
  }
  return &it->second;
}

const Grants* TokenTable::FindById(const std::string& id) const {
  auto it = by_digest_.find(id);
  return it == by_digest_.end() ? nullptr : &it->second;
}

absl::StatusOr<const Grants*> TokenTable::Authenticate(const grpc::ServerContextBase& ctx) const {
  const auto& md = ctx.client_metadata();
  auto it = md.find(kAuthMetadataKey);
  if (it == md.end()) {
    return absl::UnauthenticatedError(
        "this kvdnd requires a token (metadata \"authorization: Bearer <token>\"; SDK: "
        "ClientOptions.token or KVDN_TOKEN_FILE; kvdnctl: --token-file) and the call has none");
  }
  absl::string_view value(it->second.data(), it->second.size());
  constexpr absl::string_view kScheme = "bearer ";
  if (value.size() < kScheme.size() ||
      !absl::EqualsIgnoreCase(value.substr(0, kScheme.size()), kScheme)) {
    return absl::UnauthenticatedError(
        "metadata \"authorization\" is not \"Bearer <token>\" (the only scheme kvdnd takes)");
  }
  return Find(absl::StripAsciiWhitespace(value.substr(kScheme.size())));
}

}  // namespace kvdn::daemon
