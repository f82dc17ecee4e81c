#include "server/service/auth.h"

#include <algorithm>
#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace tscale::service {
namespace {

// Equal in time that depends only on the lengths.
bool ConstantTimeEqual(absl::string_view a, absl::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  const size_t n = std::max(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned char>(x ^ y);
  }
  return diff == 0;
}

}  // namespace

absl::StatusOr<std::vector<std::string>> TokenAuth::Read(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat("--auth-token-file: cannot read '", path, "'"));
  }
  std::vector<std::string> tokens;
  for (std::string line; std::getline(in, line);) {
    absl::string_view t = absl::StripAsciiWhitespace(line);
    if (t.empty() || t[0] == '#') continue;
    tokens.emplace_back(t);
  }
  if (tokens.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--auth-token-file: expected at least one token (one per line) in '", path,
        "', got none"));
  }
  return tokens;
}

absl::StatusOr<std::unique_ptr<TokenAuth>> TokenAuth::Load(const std::string& path) {
  auto tokens = Read(path);
  if (!tokens.ok()) return tokens.status();
  std::unique_ptr<TokenAuth> auth(new TokenAuth(path));
  auth->tokens_ = *std::move(tokens);
  return auth;
}

absl::Status TokenAuth::Reload() {
  auto tokens = Read(path_);
  if (!tokens.ok()) return tokens.status();
  absl::MutexLock lock(&mu_);
  tokens_ = *std::move(tokens);
  return absl::OkStatus();
}

absl::Status TokenAuth::Check(absl::string_view authorization) const {
  absl::string_view token = authorization;
  const bool bearer = absl::ConsumePrefix(&token, "Bearer ");
  bool match = false;
  {
    absl::MutexLock lock(&mu_);
    // Every token is compared, so the time says nothing of which one nearly matched.
    for (const std::string& t : tokens_) match |= ConstantTimeEqual(token, t);
  }
  if (bearer && match) return absl::OkStatus();
  return absl::UnauthenticatedError(
      authorization.empty()
          ? "authorization: expected 'Bearer <token>' (the server requires a token), got none"
          : "authorization: expected 'Bearer <token>' with a token the server accepts");
}

size_t TokenAuth::size() const {
  absl::MutexLock lock(&mu_);
  return tokens_.size();
}

}  // namespace tscale::service
