// Invariant checks of the fuzz targets: a failed check prints what was expected and aborts, which
// libFuzzer reports as a crash and saves the input that caused it.
#ifndef TSCALE_FUZZ_CHECK_H_
#define TSCALE_FUZZ_CHECK_H_

#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/status/status.h"

namespace tscale::fuzz {

[[noreturn]] inline void Fail(const char* file, int line, const char* condition,
                              const std::string& detail) {
  std::fprintf(stderr, "%s:%d: invariant failed: %s\n  %s\n", file, line, condition,
               detail.c_str());
  std::abort();
}

}  // namespace tscale::fuzz

// FUZZ_CHECK(condition, detail): `detail` (a std::string expression) is evaluated only on failure.
#define FUZZ_CHECK(condition, detail)                                                 \
  do {                                                                                \
    if (!(condition)) ::tscale::fuzz::Fail(__FILE__, __LINE__, #condition, (detail)); \
  } while (0)

// A refused input must be refused with the code given, never anything else.
#define FUZZ_CHECK_REFUSED(status, expected_code) \
  FUZZ_CHECK((status).code() == (expected_code),  \
             std::string("unexpected status: ") + (status).ToString())

#endif  // TSCALE_FUZZ_CHECK_H_
