// How deeply a JSON text nests, measured before it is parsed: parsers and their error messages
// recurse once per level, so texts from the network are refused beyond a depth first.
#ifndef TSCALE_SERVER_CORE_JSON_DEPTH_H_
#define TSCALE_SERVER_CORE_JSON_DEPTH_H_

#include <algorithm>

#include "absl/strings/string_view.h"

namespace tscale::core {

// The deepest nesting of '[' / '{' outside strings. Exact for valid JSON, and never below what a
// parser would reach on invalid JSON.
inline int JsonNestingDepth(absl::string_view text) {
  int depth = 0;
  int max_depth = 0;
  bool in_string = false;
  bool escaped = false;
  for (char ch : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (ch == '\\') {
        escaped = true;
      } else if (ch == '"') {
        in_string = false;
      }
    } else if (ch == '"') {
      in_string = true;
    } else if (ch == '[' || ch == '{') {
      max_depth = std::max(max_depth, ++depth);
    } else if ((ch == ']' || ch == '}') && depth > 0) {
      --depth;
    }
  }
  return max_depth;
}

}  // namespace tscale::core

#endif  // TSCALE_SERVER_CORE_JSON_DEPTH_H_
