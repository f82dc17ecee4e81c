// DiagnoseConnection (client.h): gRPC's text of a failed connection, and where that is ambiguous
// a TLS handshake of the client's own with OpenSSL, put into words that say what to change.
#include <netdb.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <memory>
#include <optional>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "client/cpp/client.h"

namespace tscale::client {
namespace {

// How long the probe waits to connect, and for each step of the handshake.
constexpr int kProbeSeconds = 3;
// How long it waits after the handshake for an alert: with TLS 1.3 a server checks the client's
// certificate after the client has finished its part, and says so in an alert.
constexpr int kAlertWaitMs = 1000;

// What the probe's handshake found.
struct Probe {
  enum Kind {
    kNoAnswer,      // no connection: nothing to say beyond gRPC's text
    kNotTls,        // the peer answered the ClientHello with something other than TLS
    kTls,           // a complete handshake, and no alert after it
    kVerifyFailed,  // the server's certificate did not verify (verify_result says why)
    kAlert,         // the server ended the handshake with an alert (alert, alert_text)
    kClosed,        // the server closed the connection right after the handshake
  };
  Kind kind = kNoAnswer;
  long verify_result = X509_V_OK;
  int alert = 0;
  std::string alert_text;
};

// HOST and PORT of a gRPC target: "HOST:PORT", "[IPV6]:PORT", "dns:///HOST:PORT",
// "ipv4:HOST:PORT", "ipv6:[IPV6]:PORT"; false for anything else (unix sockets, lists).
bool HostPort(absl::string_view target, std::string* host, std::string* port) {
  for (absl::string_view scheme : {"dns:///", "dns:", "ipv4:", "ipv6:"}) {
    if (absl::ConsumePrefix(&target, scheme)) break;
  }
  if (absl::StrContains(target, ",") || absl::StrContains(target, "/")) return false;
  const size_t colon = target.rfind(':');
  if (colon == absl::string_view::npos || colon == 0) return false;
  absl::string_view h = target.substr(0, colon);
  if (absl::ConsumePrefix(&h, "[") && !absl::ConsumeSuffix(&h, "]")) return false;
  int number = 0;
  if (!absl::SimpleAtoi(target.substr(colon + 1), &number) || number <= 0 || number > 65535) {
    return false;
  }
  *host = std::string(h);
  *port = std::string(target.substr(colon + 1));
  return true;
}

bool IsIpAddress(const std::string& host) {
  addrinfo hints = {};
  hints.ai_flags = AI_NUMERICHOST;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), nullptr, &hints, &found) != 0) return false;
  freeaddrinfo(found);
  return true;
}

void SetTimeout(int fd, int ms) {
  timeval tv = {ms / 1000, (ms % 1000) * 1000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

// A TCP connection to host:port within kProbeSeconds; -1 when none.
int Connect(const std::string& host, const std::string& port) {
  addrinfo hints = {};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &found) != 0) return -1;
  int fd = -1;
  for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    SetTimeout(fd, kProbeSeconds * 1000);  // Linux bounds connect() by the send timeout
    if (connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(found);
  return fd;
}

struct SslCtxFree {
  void operator()(SSL_CTX* ctx) const { SSL_CTX_free(ctx); }
};
struct SslFree {
  void operator()(SSL* ssl) const { SSL_free(ssl); }
};
struct BioFree {
  void operator()(BIO* bio) const { BIO_free(bio); }
};

// Adds the PEM certificates of `pem` to the context's trust store; false when none parse.
bool TrustPem(SSL_CTX* ctx, const std::string& pem) {
  std::unique_ptr<BIO, BioFree> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  X509_STORE* store = SSL_CTX_get_cert_store(ctx);
  int added = 0;
  while (X509* cert = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) {
    if (X509_STORE_add_cert(store, cert) == 1) ++added;
    X509_free(cert);
  }
  ERR_clear_error();  // the end of the text reads as an error
  return added > 0;
}

// The client certificate chain and key of `pem_chain` and `pem_key`; false when they do not
// parse (gRPC's own text then says more).
bool UseClientCertificate(SSL_CTX* ctx, const std::string& pem_chain, const std::string& pem_key) {
  std::unique_ptr<BIO, BioFree> chain(
      BIO_new_mem_buf(pem_chain.data(), static_cast<int>(pem_chain.size())));
  X509* leaf = PEM_read_bio_X509(chain.get(), nullptr, nullptr, nullptr);
  if (leaf == nullptr || SSL_CTX_use_certificate(ctx, leaf) != 1) {
    X509_free(leaf);
    return false;
  }
  X509_free(leaf);
  while (X509* extra = PEM_read_bio_X509(chain.get(), nullptr, nullptr, nullptr)) {
    if (SSL_CTX_add_extra_chain_cert(ctx, extra) != 1) X509_free(extra);  // owned once added
  }
  std::unique_ptr<BIO, BioFree> key(
      BIO_new_mem_buf(pem_key.data(), static_cast<int>(pem_key.size())));
  EVP_PKEY* pkey = PEM_read_bio_PrivateKey(key.get(), nullptr, nullptr, nullptr);
  const bool ok = pkey != nullptr && SSL_CTX_use_PrivateKey(ctx, pkey) == 1;
  EVP_PKEY_free(pkey);
  ERR_clear_error();
  return ok;
}

// The reason of the last OpenSSL error of this thread, with its alert when it is one.
void ReadAlert(Probe* probe) {
  const unsigned long err = ERR_peek_last_error();
  const int reason = ERR_GET_REASON(err);
  if (err != 0 && reason >= SSL_AD_REASON_OFFSET) {
    probe->kind = Probe::kAlert;
    probe->alert = reason - SSL_AD_REASON_OFFSET;
    const char* text = ERR_reason_error_string(err);
    probe->alert_text = text != nullptr ? absl::AsciiStrToLower(text) : "";
  }
}

// A TLS handshake with host:port as `tls` sets it up; with `verify` false, one that checks
// nothing and presents no certificate (is there TLS at all?).
Probe Handshake(const std::string& host, const std::string& port, const TlsOptions& tls,
                bool verify) {
  Probe probe;
  ERR_clear_error();
  std::unique_ptr<SSL_CTX, SslCtxFree> ctx(SSL_CTX_new(TLS_client_method()));
  if (ctx == nullptr) return probe;
  SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION);
  if (verify) {
    if (tls.root_certs.empty() || !TrustPem(ctx.get(), tls.root_certs)) {
      SSL_CTX_set_default_verify_paths(ctx.get());
    }
    SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
    if (!tls.cert_chain.empty() && !tls.private_key.empty() &&
        !UseClientCertificate(ctx.get(), tls.cert_chain, tls.private_key)) {
      return probe;
    }
  } else {
    SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_NONE, nullptr);
  }
  const int fd = Connect(host, port);
  if (fd < 0) return probe;
  std::unique_ptr<SSL, SslFree> ssl(SSL_new(ctx.get()));
  if (ssl == nullptr) {
    close(fd);
    return probe;
  }
  SSL_set_fd(ssl.get(), fd);
  static const unsigned char kAlpn[] = {2, 'h', '2'};
  SSL_set_alpn_protos(ssl.get(), kAlpn, sizeof kAlpn);
  const std::string name = verify && !tls.server_name.empty() ? tls.server_name : host;
  if (!IsIpAddress(name)) SSL_set_tlsext_host_name(ssl.get(), name.c_str());
  if (verify) {
    if (IsIpAddress(name)) {
      X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl.get()), name.c_str());
    } else {
      SSL_set1_host(ssl.get(), name.c_str());
    }
  }
  if (SSL_connect(ssl.get()) == 1) {
    probe.kind = Probe::kTls;
    // A gRPC server that accepts the client sends its HTTP/2 settings at once; one that refuses
    // the client's certificate (checked after the handshake in TLS 1.3) sends an alert, or
    // closes the connection without a word.
    SetTimeout(fd, kAlertWaitMs);
    char byte;
    ERR_clear_error();
    errno = 0;
    const int n = SSL_read(ssl.get(), &byte, 1);
    if (n <= 0) {
      const int error = SSL_get_error(ssl.get(), n);
      const bool timed_out =
          error == SSL_ERROR_WANT_READ ||
          (error == SSL_ERROR_SYSCALL && (errno == EAGAIN || errno == EWOULDBLOCK));
      if (!timed_out) {
        probe.kind = Probe::kClosed;
        ReadAlert(&probe);  // unless it said why
      }
    }
  } else {
    const unsigned long err = ERR_peek_last_error();
    if (ERR_GET_REASON(err) == SSL_R_CERTIFICATE_VERIFY_FAILED) {
      probe.kind = Probe::kVerifyFailed;
      probe.verify_result = SSL_get_verify_result(ssl.get());
    } else {
      probe.kind = Probe::kNotTls;  // no TLS came back: bytes of another protocol, or a close
      ReadAlert(&probe);            // unless it was an alert: TLS after all
    }
  }
  ERR_clear_error();
  close(fd);
  return probe;
}

std::string NotTls(const std::string& address) {
  return absl::StrCat("TLS: ", address,
                      " does not speak TLS (a plaintext server?): connect without the TLS "
                      "options (--tls, --tls-ca, ...), or start the server with --tls-cert and "
                      "--tls-key");
}

std::string UntrustedCa(const std::string& address, absl::string_view why) {
  return absl::StrCat("TLS: the certificate of ", address,
                      " is not signed by a CA this client trusts (", why,
                      "): give the CA that signed it (--tls-ca FILE)");
}

std::string WrongName(const std::string& address, absl::string_view name) {
  return absl::StrCat("TLS: the certificate of ", address, " does not name ", name,
                      ": connect by a name the certificate holds, or, through a tunnel or proxy, "
                      "give that name with --tls-server-name NAME");
}

}  // namespace

std::optional<std::string> DiagnoseConnection(const std::string& address, const TlsOptions& tls,
                                              bool tls_known, absl::string_view grpc_message) {
  // OpenSSL's reasons come as "certificate verify failed" or "CERTIFICATE_VERIFY_FAILED".
  std::string text = absl::AsciiStrToLower(grpc_message);
  std::replace(text.begin(), text.end(), '_', ' ');
  // Only failures to set a connection up; a refused or unreachable address is left to retries.
  const bool setup = absl::StrContains(text, "failed to connect to all addresses") ||
                     absl::StrContains(text, "handshake") || absl::StrContains(text, "peer name");
  if (!setup) return std::nullopt;
  for (absl::string_view transient :
       {"connection refused", "dns resolution failed", "no route to host", "network is unreachable",
        "connection timed out", "timeout occurred"}) {
    if (absl::StrContains(text, transient)) return std::nullopt;
  }
  const bool tls_on = tls_known ? tls.enabled : true;
  std::string host, port;
  const bool can_probe = tls_known && HostPort(address, &host, &port);
  const std::string& shown = address.empty() ? std::string("the server") : address;

  // gRPC's text is clear in these cases.
  if (const size_t at = text.find("peer name "); at != std::string::npos) {
    const std::string name(grpc_message.substr(at + 10, text.find(' ', at + 10) - at - 10));
    return WrongName(shown, name);
  }
  if (absl::StrContains(text, "wrong version number") ||
      absl::StrContains(text, "packet length too long") ||
      absl::StrContains(text, "http request")) {
    return NotTls(shown);
  }
  if (absl::StrContains(text, "certificate verify failed")) {
    if (can_probe) {
      const Probe probe = Handshake(host, port, tls, /*verify=*/true);
      if (probe.kind == Probe::kVerifyFailed) {
        const long v = probe.verify_result;
        if (v == X509_V_ERR_HOSTNAME_MISMATCH || v == X509_V_ERR_IP_ADDRESS_MISMATCH) {
          return WrongName(shown, tls.server_name.empty() ? host : tls.server_name);
        }
        if (v == X509_V_ERR_CERT_HAS_EXPIRED || v == X509_V_ERR_CERT_NOT_YET_VALID) {
          return absl::StrCat("TLS: the certificate of ", shown, " is not valid now (",
                              X509_verify_cert_error_string(v), ")");
        }
        return UntrustedCa(shown, X509_verify_cert_error_string(v));
      }
    }
    return UntrustedCa(shown, "certificate verify failed");
  }

  // Ambiguous ("Socket closed", "tcp handshaker shutdown", a reset): the handshake tells.
  if (!can_probe) return std::nullopt;
  if (!tls_on) {
    const Probe probe = Handshake(host, port, tls, /*verify=*/false);
    if (probe.kind == Probe::kTls || probe.kind == Probe::kAlert || probe.kind == Probe::kClosed) {
      return absl::StrCat("TLS: ", shown,
                          " speaks TLS and this client connected in plaintext: use TLS (--tls-ca "
                          "FILE with the CA that signed the server's certificate, or --tls for "
                          "the system's CAs)");
    }
    return std::nullopt;
  }
  const Probe probe = Handshake(host, port, tls, /*verify=*/true);
  const bool has_certificate = !tls.cert_chain.empty();
  switch (probe.kind) {
    case Probe::kNotTls:
      return NotTls(shown);
    case Probe::kVerifyFailed:
      if (probe.verify_result == X509_V_ERR_HOSTNAME_MISMATCH ||
          probe.verify_result == X509_V_ERR_IP_ADDRESS_MISMATCH) {
        return WrongName(shown, tls.server_name.empty() ? host : tls.server_name);
      }
      return UntrustedCa(shown, X509_verify_cert_error_string(probe.verify_result));
    case Probe::kClosed:
      if (!has_certificate) {
        return absl::StrCat("TLS: ", shown,
                            " requires a client certificate (mutual TLS): give --tls-cert FILE "
                            "and --tls-key FILE");
      }
      return absl::StrCat("TLS: ", shown,
                          " refused this client's certificate (mutual TLS; it closed the "
                          "connection after the handshake): use one signed by the CA the server "
                          "trusts (its --tls-client-ca)");
    case Probe::kAlert:
      if (!has_certificate &&
          (probe.alert == SSL_AD_CERTIFICATE_REQUIRED || probe.alert == SSL_AD_HANDSHAKE_FAILURE ||
           probe.alert == SSL_AD_BAD_CERTIFICATE)) {
        return absl::StrCat("TLS: ", shown,
                            " requires a client certificate (mutual TLS): give --tls-cert FILE "
                            "and --tls-key FILE");
      }
      if (has_certificate &&
          (probe.alert == SSL_AD_UNKNOWN_CA || probe.alert == SSL_AD_BAD_CERTIFICATE ||
           probe.alert == SSL_AD_CERTIFICATE_UNKNOWN || probe.alert == SSL_AD_DECRYPT_ERROR ||
           probe.alert == SSL_AD_HANDSHAKE_FAILURE || probe.alert == SSL_AD_CERTIFICATE_REQUIRED)) {
        return absl::StrCat("TLS: ", shown, " refused this client's certificate (mutual TLS; ",
                            probe.alert_text,
                            "): use one signed by the CA the server trusts (its --tls-client-ca)");
      }
      return absl::StrCat("TLS: ", shown, " ended the TLS handshake (", probe.alert_text, ")");
    case Probe::kTls:
    case Probe::kNoAnswer:
      break;
  }
  return std::nullopt;
}

}  // namespace tscale::client
