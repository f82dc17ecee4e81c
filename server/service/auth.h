// Bearer tokens (--auth-token-file): one token per line; blank lines and lines starting with '#'
// are ignored. Clients send `authorization: Bearer <token>`. Tokens are compared in constant time
// (every token, every byte), and the file can be read again while the server runs (SIGHUP).
#ifndef TSCALE_SERVER_SERVICE_AUTH_H_
#define TSCALE_SERVER_SERVICE_AUTH_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace tscale::service {

class TokenAuth {
 public:
  // Reads the tokens. InvalidArgument (naming the flag) when the file cannot be read or holds
  // no token.
  static absl::StatusOr<std::unique_ptr<TokenAuth>> Load(const std::string& path);

  // Reads the file again; on an error the tokens in use stay.
  absl::Status Reload();

  // OkStatus for an `authorization` value "Bearer <a token of the file>", Unauthenticated
  // otherwise (the message never repeats what came).
  absl::Status Check(absl::string_view authorization) const;

  size_t size() const;

 private:
  explicit TokenAuth(std::string path) : path_(std::move(path)) {}
  static absl::StatusOr<std::vector<std::string>> Read(const std::string& path);

  const std::string path_;
  mutable absl::Mutex mu_;
  std::vector<std::string> tokens_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tscale::service

#endif  // TSCALE_SERVER_SERVICE_AUTH_H_
