// Duplicate keys in a JSON text. nlohmann's parser (as most) keeps the last of two equal keys
// silently, so {"in_features": 64, "in_features": 32} would be read as 32 with no word; a spec
// with such a key is refused instead, naming the key and where it is. Header-only (nlohmann and
// Abseil), for the server's spec parser and the CLI's.
#ifndef TSCALE_SERVER_CORE_JSON_KEYS_H_
#define TSCALE_SERVER_CORE_JSON_KEYS_H_

#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace tscale::core {

namespace json_keys_internal {

// SAX events of one parse: the path to where the parser is, and the keys of each open object.
class DuplicateKeyFinder : public nlohmann::json_sax<nlohmann::json> {
 public:
  // "duplicate key 'k' in layers[1].ternary_linear"; empty while none was found.
  const std::string& found() const { return found_; }

  bool null() override { return Value(); }
  bool boolean(bool) override { return Value(); }
  bool number_integer(number_integer_t) override { return Value(); }
  bool number_unsigned(number_unsigned_t) override { return Value(); }
  bool number_float(number_float_t, const string_t&) override { return Value(); }
  bool string(string_t&) override { return Value(); }
  bool binary(binary_t&) override { return Value(); }
  bool start_object(std::size_t) override {
    Value();
    frames_.emplace_back(/*is_object=*/true);
    return true;
  }
  bool key(string_t& key) override {
    Frame& frame = frames_.back();
    if (!frame.keys.insert(key).second) {
      const std::string where = Path();
      found_ = absl::StrCat("duplicate key '", key, "' ",
                            where.empty() ? "at the top level" : absl::StrCat("in ", where),
                            " (JSON keeps only one of them; give each key once)");
      return false;  // stops the parse: one is enough
    }
    frame.key = key;
    return true;
  }
  bool end_object() override {
    frames_.pop_back();
    return true;
  }
  bool start_array(std::size_t) override {
    Value();
    frames_.emplace_back(/*is_object=*/false);
    return true;
  }
  bool end_array() override {
    frames_.pop_back();
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override {
    return false;
  }

 private:
  struct Frame {
    explicit Frame(bool object) : is_object(object) {}
    bool is_object = false;
    std::string key;  // in an object: the key of the value being read
    std::set<std::string> keys;
    int64_t index = -1;  // in an array: the index of the value being read
  };

  // Counts a value (scalar, object or array) in the array it is an element of.
  bool Value() {
    if (!frames_.empty() && !frames_.back().is_object) ++frames_.back().index;
    return true;
  }

  // The path of the innermost open object, e.g. "layers[1].ternary_linear".
  std::string Path() const {
    std::string path;
    for (size_t i = 0; i + 1 < frames_.size(); ++i) {
      const Frame& f = frames_[i];
      if (f.is_object) {
        absl::StrAppend(&path, path.empty() ? "" : ".", f.key);
      } else {
        absl::StrAppend(&path, "[", f.index, "]");
      }
    }
    return path;
  }

  std::vector<Frame> frames_;
  std::string found_;
};

}  // namespace json_keys_internal

// The first key that occurs twice in one object of `text`, described with the path of that object
// ("duplicate key 'in_features' in layers[0].ternary_linear ..."); nullopt when every object's
// keys differ, or when the text is not JSON (the caller's parser reports that in its own words).
inline std::optional<std::string> FindDuplicateKey(absl::string_view text) {
  json_keys_internal::DuplicateKeyFinder finder;
  nlohmann::json::sax_parse(text.begin(), text.end(), &finder);
  if (finder.found().empty()) return std::nullopt;
  return finder.found();
}

}  // namespace tscale::core

#endif  // TSCALE_SERVER_CORE_JSON_KEYS_H_
