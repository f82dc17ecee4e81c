// The commands of the tscale CLI, except train (train.cc), and what they share.
#include <google/protobuf/descriptor.h>
#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "client/cpp/cli/cli.h"
#include "client/cpp/tensor.h"
#include "server/core/json_keys.h"

namespace tscale::cli {

namespace v1 = ::tscale::v1;

std::string Args::Get(const std::string& name, const std::string& fallback) const {
  auto it = options.find(name);
  return it == options.end() ? fallback : it->second;
}

Context::Context(std::string command, std::string server, client::ClientOptions options)
    : command_(std::move(command)), server_(std::move(server)), options_(std::move(options)) {}

client::Client& Context::client() {
  if (!client_) client_ = std::make_unique<client::Client>(server_, options_);
  return *client_;
}

client::ReplicaGroup* Context::group() {
  if (servers_.empty()) return nullptr;
  if (!group_) {
    group_ = group_retry_time_.has_value()
                 ? std::make_unique<client::ReplicaGroup>(servers_, options_, *group_retry_time_)
                 : std::make_unique<client::ReplicaGroup>(servers_, options_);
  }
  return group_.get();
}

int Context::Fail(const absl::Status& status) const {
  std::string message(status.message());
  // "new_model_id: ..." -> "--as: ...": the server names the API's field; here the user gave an
  // option. A field name counts only as a whole word ("name" is not the start of "names").
  for (const auto& [field, typed] : field_names_) {
    if (absl::StartsWith(message, field) &&
        (message.size() == field.size() ||
         !(absl::ascii_isalnum(message[field.size()]) || message[field.size()] == '_'))) {
      message = absl::StrCat(typed, message.substr(field.size()));
      break;
    }
  }
  // gRPC's text for a port nobody listens on ("failed to connect to all addresses; last error:
  // UNKNOWN: ipv4:...: Failed to connect to remote host: Connection refused") says the same in
  // many more words.
  if (status.code() == absl::StatusCode::kUnavailable &&
      absl::StrContains(absl::AsciiStrToLower(message), "connection refused")) {
    const std::string where = servers_.empty() ? server_ : absl::StrJoin(servers_, ", ");
    message = absl::StrCat("no tscale-server answering at ", where, " (connection refused)");
  }
  std::cerr << "tscale: " << command_ << ": " << absl::StatusCodeToString(status.code()) << ": "
            << message << "\n";
  return kExitFailure;
}

int Context::Usage(absl::string_view message) const {
  std::cerr << "tscale: " << command_ << ": " << message << " (see 'tscale " << command_
            << " --help')\n";
  return kExitUsage;
}

bool Context::GetInt(const Args& args, const std::string& name, int64_t fallback, int64_t min,
                     int64_t max, int64_t* out, int* exit) const {
  *out = fallback;
  if (!args.Has(name)) return true;
  const std::string value = args.Get(name);
  if (!absl::SimpleAtoi(value, out) || *out < min || *out > max) {
    *exit = Usage(
        absl::StrCat(name, ": expected an integer in [", min, ", ", max, "], got '", value, "'"));
    return false;
  }
  return true;
}

void PrintTable(const std::vector<std::string>& header,
                const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width(header.size(), 0);
  auto measure = [&](const std::vector<std::string>& row) {
    for (size_t i = 0; i < row.size() && i < width.size(); ++i) {
      width[i] = std::max(width[i], row[i].size());
    }
  };
  measure(header);
  for (const auto& row : rows) measure(row);
  auto print = [&](const std::vector<std::string>& row) {
    std::string line;
    for (size_t i = 0; i < row.size() && i < width.size(); ++i) {
      const std::string pad(width[i] - row[i].size(), ' ');
      if (i > 0) line += "  ";
      line += i == 0 ? row[i] + pad : pad + row[i];
    }
    std::cout << std::string(absl::StripTrailingAsciiWhitespace(line)) << "\n";
  };
  print(header);
  for (const auto& row : rows) print(row);
}

namespace {

std::string Num(double v) { return absl::StrFormat("%.6g", v); }

// proto3's JSON mapping writes 64-bit integers as strings ("in_features": "64"); a person (and
// a spec file) reads them as numbers. Walks `j` along the message's fields and converts them.
void Int64sAsNumbers(const google::protobuf::Descriptor* type, nlohmann::ordered_json& j) {
  using google::protobuf::FieldDescriptor;
  if (!j.is_object()) return;
  for (auto& item : j.items()) {
    // SpecJson prints the proto's field names.
    const FieldDescriptor* field = type->FindFieldByName(item.key());
    if (field == nullptr) continue;
    auto convert = [&](nlohmann::ordered_json& v) {
      if (field->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
        Int64sAsNumbers(field->message_type(), v);
      } else if (v.is_string() && field->cpp_type() == FieldDescriptor::CPPTYPE_INT64) {
        int64_t n = 0;
        if (absl::SimpleAtoi(v.get<std::string>(), &n)) v = n;
      } else if (v.is_string() && field->cpp_type() == FieldDescriptor::CPPTYPE_UINT64) {
        uint64_t n = 0;
        if (absl::SimpleAtoi(v.get<std::string>(), &n)) v = n;
      }
    };
    if (item.value().is_array()) {
      for (auto& element : item.value()) convert(element);
    } else {
      convert(item.value());
    }
  }
}

std::string SpecJson(const v1::ModelSpec& spec) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  std::string json;
  if (!google::protobuf::util::MessageToJsonString(spec, &json, options).ok()) return "?";
  nlohmann::ordered_json j = nlohmann::ordered_json::parse(json, nullptr, false);
  if (j.is_discarded()) return json;
  Int64sAsNumbers(v1::ModelSpec::descriptor(), j);
  return j.dump();
}

void PrintModelInfo(const v1::ModelInfo& info) {
  const std::vector<std::pair<std::string, std::string>> lines = {
      {"model", info.model_id()},
      {"device", info.device()},
      {"compute", v1::ComputeType_Name(info.compute())},
      {"step", absl::StrCat(info.step())},
      {"in_features", absl::StrCat(info.in_features())},
      {"out_features", absl::StrCat(info.out_features())},
      {"ternary_params", absl::StrCat(info.ternary_params())},
      {"groups", absl::StrCat(info.groups())},
      {"persistent_bytes", absl::StrCat(info.persistent_bytes())},
      {"pending_passes", absl::StrCat(info.pending_passes())},
      {"pending_bytes", absl::StrCat(info.pending_bytes())},
      {"spec", SpecJson(info.spec())},
  };
  for (const auto& [key, value] : lines) {
    std::cout << key << ":" << std::string(18 - key.size(), ' ') << value << "\n";
  }
}

// Reads a ModelSpec from a JSON file with the proto's field names (snake_case or lowerCamelCase).
absl::StatusOr<v1::ModelSpec> ReadSpec(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("--spec: cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  // A key given twice would be read as one of its values without a word; refused, as the server
  // refuses it in a state file's spec.
  if (std::optional<std::string> duplicate = core::FindDuplicateKey(ss.str());
      duplicate.has_value()) {
    return absl::InvalidArgumentError(absl::StrCat("--spec: ", path, ": ", *duplicate));
  }
  v1::ModelSpec spec;
  // protobuf 3.21 has a Status type of its own.
  const auto status = google::protobuf::util::JsonStringToMessage(ss.str(), &spec);
  if (!status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--spec: ", path, " is not a ModelSpec in JSON: ", std::string(status.message())));
  }
  return spec;
}

// "fp32" -> COMPUTE_FP32, ...; false for anything else.
bool ParseCompute(const std::string& name, v1::ComputeType* out) {
  const std::string upper = absl::AsciiStrToUpper(name);
  return v1::ComputeType_Parse(upper, out) || v1::ComputeType_Parse("COMPUTE_" + upper, out);
}

int RunHealth(Context& context, const Args&) {
  bool serving = true;
  const std::pair<std::string, std::string> services[] = {
      {"server", ""}, {client::kTrainerServiceName, client::kTrainerServiceName}};
  for (const auto& [label, service] : services) {
    absl::StatusOr<client::ServingStatus> status = context.client().Health(service);
    if (!status.ok() && status.status().code() == absl::StatusCode::kNotFound) {
      status = client::ServingStatus::kServiceUnknown;  // the server does not know the service
    }
    if (!status.ok()) return context.Fail(status.status());
    std::cout << label << ": " << client::ServingStatusName(*status) << "\n";
    serving = serving && *status == client::ServingStatus::kServing;
  }
  return serving ? kExitOk : kExitFailure;
}

int RunModels(Context& context, const Args&) {
  absl::StatusOr<std::vector<v1::ModelInfo>> models = context.client().ListModels();
  if (!models.ok()) return context.Fail(models.status());
  std::vector<std::vector<std::string>> rows;
  for (const v1::ModelInfo& m : *models) {
    rows.push_back({m.model_id(), m.device(), absl::StrCat(m.step()),
                    absl::StrCat(m.ternary_params()), absl::StrCat(m.persistent_bytes()),
                    absl::StrCat(m.pending_passes())});
  }
  PrintTable({"ID", "DEVICE", "STEP", "PARAMS", "PERSISTENT_BYTES", "PENDING_PASSES"}, rows);
  return kExitOk;
}

int RunCreate(Context& context, const Args& args) {
  if (!args.Has("--spec")) return context.Usage("--spec FILE.json is required");
  v1::CreateModelRequest request;
  request.set_model_id(args.positional[0]);
  if (args.Has("--seed")) {
    uint64_t seed = 0;
    if (!absl::SimpleAtoi(args.Get("--seed"), &seed)) {
      return context.Usage(
          absl::StrCat("--seed: expected an unsigned integer, got '", args.Get("--seed"), "'"));
    }
    request.set_seed(seed);
  }
  request.set_device(args.Get("--device"));
  if (args.Has("--compute")) {
    v1::ComputeType compute;
    if (!ParseCompute(args.Get("--compute"), &compute)) {
      return context.Usage(absl::StrCat("--compute: expected fp32, tf32 or bf16, got '",
                                        args.Get("--compute"), "'"));
    }
    request.set_compute(compute);
  }
  absl::StatusOr<v1::ModelSpec> spec = ReadSpec(args.Get("--spec"));
  if (!spec.ok()) return context.Fail(spec.status());
  *request.mutable_spec() = *std::move(spec);
  absl::StatusOr<v1::ModelInfo> info = context.group() != nullptr
                                           ? context.group()->CreateModel(request)
                                           : context.client().CreateModel(request);
  if (!info.ok()) return context.Fail(info.status());
  PrintModelInfo(*info);
  return kExitOk;
}

int RunInfo(Context& context, const Args& args) {
  absl::StatusOr<v1::ModelInfo> info = context.group() != nullptr
                                           ? context.group()->GetModel(args.positional[0])
                                           : context.client().GetModel(args.positional[0]);
  if (!info.ok()) return context.Fail(info.status());
  PrintModelInfo(*info);
  return kExitOk;
}

int RunDelete(Context& context, const Args& args) {
  v1::DeleteModelRequest request;
  request.set_model_id(args.positional[0]);
  request.set_delete_checkpoints(args.Has("--delete-checkpoints"));
  const absl::Status status = context.group() != nullptr ? context.group()->DeleteModel(request)
                                                         : context.client().DeleteModel(request);
  if (!status.ok()) return context.Fail(status);
  std::cout << "deleted " << args.positional[0]
            << (request.delete_checkpoints() ? " and its checkpoints" : "") << "\n";
  return kExitOk;
}

// ---------------------------------------------------------------- .npy files (forward)

// numpy's .npy format (versions 1 to 3): "\x93NUMPY", the version, the header's length, a
// Python dict literal ({'descr': '<f4', 'fortran_order': False, 'shape': (3, 64), }) and the
// data. Enough of it for a float array in C order.
struct FloatArray {
  std::vector<int64_t> shape;
  std::vector<float> values;
};

absl::StatusOr<FloatArray> ParseNpy(const std::string& what, const std::string& bytes) {
  auto invalid = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", why));
  };
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) {
    return invalid("not a .npy file (it does not start with \\x93NUMPY)");
  }
  const auto byte = [&](size_t i) { return static_cast<uint32_t>(static_cast<uint8_t>(bytes[i])); };
  const uint32_t major = byte(6);
  size_t offset = 0;
  size_t header_len = 0;
  if (major == 1) {
    header_len = byte(8) | byte(9) << 8;
    offset = 10;
  } else if ((major == 2 || major == 3) && bytes.size() >= 12) {
    header_len = byte(8) | byte(9) << 8 | byte(10) << 16 | byte(11) << 24;
    offset = 12;
  } else {
    return invalid(absl::StrCat("expected .npy version 1, 2 or 3, got ", major));
  }
  if (offset + header_len > bytes.size()) return invalid("the header runs past the end");
  const std::string header = bytes.substr(offset, header_len);
  offset += header_len;
  // The value after 'key': in the header's dict, up to the next ',' or '}' outside brackets.
  auto value_of = [&](const std::string& key) -> std::string {
    const size_t at = header.find(absl::StrCat("'", key, "'"));
    if (at == std::string::npos) return "";
    size_t i = header.find(':', at);
    if (i == std::string::npos) return "";
    std::string out;
    int depth = 0;
    for (++i; i < header.size(); ++i) {
      const char c = header[i];
      if (c == '(') ++depth;
      if (c == ')') --depth;
      if (depth == 0 && (c == ',' || c == '}')) break;
      out += c;
    }
    return std::string(absl::StripAsciiWhitespace(out));
  };
  const std::string descr = value_of("descr");
  if (descr != "'<f4'" && descr != "'<f8'") {
    return invalid(absl::StrCat("expected float32 or float64 data ('<f4', '<f8'), got ",
                                descr.empty() ? "no descr" : descr));
  }
  if (value_of("fortran_order") != "False") {
    return invalid("expected an array in C order (fortran_order False)");
  }
  std::string shape_text = value_of("shape");
  if (shape_text.size() < 2 || shape_text.front() != '(' || shape_text.back() != ')') {
    return invalid(absl::StrCat("expected a shape such as (3, 64), got '", shape_text, "'"));
  }
  FloatArray out;
  int64_t count = 1;
  for (absl::string_view dim :
       absl::StrSplit(shape_text.substr(1, shape_text.size() - 2), ',', absl::SkipWhitespace())) {
    int64_t n = 0;
    if (!absl::SimpleAtoi(dim, &n) || n < 0 || n > (int64_t{1} << 40)) {
      return invalid(absl::StrCat("expected a shape such as (3, 64), got '", shape_text, "'"));
    }
    out.shape.push_back(n);
    count *= n;
  }
  const size_t item = descr == "'<f4'" ? 4 : 8;
  if (bytes.size() - offset != static_cast<size_t>(count) * item) {
    return invalid(absl::StrCat("the shape ", shape_text, " needs ", count * item,
                                " bytes of data, the file holds ", bytes.size() - offset));
  }
  out.values.resize(static_cast<size_t>(count));
  for (size_t i = 0; i < out.values.size(); ++i) {
    if (item == 4) {
      std::memcpy(&out.values[i], bytes.data() + offset + 4 * i, 4);
    } else {
      double d;
      std::memcpy(&d, bytes.data() + offset + 8 * i, 8);
      out.values[i] = static_cast<float>(d);
    }
  }
  return out;
}

std::string NpyBytes(const std::vector<int64_t>& shape, const std::vector<float>& values) {
  // "(3, 10)", but "(3,)": Python's tuples.
  const std::string dims =
      shape.size() == 1 ? absl::StrCat(shape[0], ",") : absl::StrJoin(shape, ", ");
  std::string header =
      absl::StrCat("{'descr': '<f4', 'fortran_order': False, 'shape': (", dims, "), }");
  // The data starts at a multiple of 64 bytes; the header ends in a newline.
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::string out = "\x93NUMPY";
  out += '\x01';
  out += '\x00';
  out += static_cast<char>(header.size() & 0xff);
  out += static_cast<char>(header.size() >> 8);
  out += header;
  out.append(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
  return out;
}

int RunForward(Context& context, const Args& args) {
  const std::string& id = args.positional[0];
  const std::string& in_path = args.positional[1];
  const std::string& out_path = args.positional[2];
  std::string in_bytes;
  if (in_path == "-") {
    std::stringstream ss;
    ss << std::cin.rdbuf();
    in_bytes = ss.str();
  } else {
    std::ifstream in(in_path, std::ios::binary);
    if (!in) {
      return context.Fail(absl::NotFoundError(
          absl::StrCat("INPUT: cannot open ", in_path, ": ", std::strerror(errno))));
    }
    std::stringstream ss;
    ss << in.rdbuf();
    in_bytes = ss.str();
  }
  absl::StatusOr<FloatArray> input = ParseNpy(absl::StrCat("INPUT ", in_path), in_bytes);
  if (!input.ok()) return context.Fail(input.status());
  // One sample may come as a vector.
  if (input->shape.size() == 1) input->shape.insert(input->shape.begin(), 1);
  absl::StatusOr<v1::Tensor> tensor = client::MakeTensor(input->values, input->shape);
  if (!tensor.ok()) return context.Fail(tensor.status());
  absl::StatusOr<v1::ForwardResponse> resp = context.client().Forward(id, *tensor, false);
  if (!resp.ok()) return context.Fail(resp.status());
  absl::StatusOr<std::vector<float>> output = client::TensorFloats(resp->output(), "output");
  if (!output.ok()) return context.Fail(output.status());
  const std::vector<int64_t> shape(resp->output().shape().begin(), resp->output().shape().end());
  const std::string out_bytes = NpyBytes(shape, *output);
  const std::string summary = absl::StrCat("forward ", id, " at step ", resp->step(), ": input [",
                                           absl::StrJoin(input->shape, ", "), "] -> output [",
                                           absl::StrJoin(shape, ", "), "]");
  if (out_path == "-") {
    std::cout.write(out_bytes.data(), static_cast<std::streamsize>(out_bytes.size()));
    std::cout.flush();
    if (!std::cout) {
      return context.Fail(absl::InternalError("OUTPUT: writing to standard output failed"));
    }
    std::cerr << summary << "\n";
    return kExitOk;
  }
  errno = 0;
  std::ofstream out(out_path, std::ios::binary | std::ios::trunc);
  if (out) out.write(out_bytes.data(), static_cast<std::streamsize>(out_bytes.size()));
  if (out) out.close();
  if (!out) {
    return context.Fail(absl::InternalError(absl::StrCat("OUTPUT: writing ", out_path, " failed",
                                                         errno != 0 ? ": " : "",
                                                         errno != 0 ? std::strerror(errno) : "")));
  }
  std::cout << summary << ", written to " << out_path << "\n";
  return kExitOk;
}

void PrintCheckpoints(const std::vector<v1::CheckpointInfo>& list) {
  std::vector<std::vector<std::string>> rows;
  for (const v1::CheckpointInfo& c : list) {
    rows.push_back({c.name(), absl::StrCat(c.step()), absl::StrCat(c.bytes()), c.crc32c()});
  }
  PrintTable({"NAME", "STEP", "BYTES", "CRC32C"}, rows);
}

int RunSave(Context& context, const Args& args) {
  absl::StatusOr<v1::CheckpointInfo> info = context.client().SaveCheckpoint(args.positional[0]);
  if (!info.ok()) return context.Fail(info.status());
  std::cout << "saved " << info->model_id() << " at step " << info->step() << " as " << info->name()
            << " (" << info->bytes() << " bytes, crc32c " << info->crc32c() << ")\n";
  return kExitOk;
}

int RunCheckpoints(Context& context, const Args& args) {
  absl::StatusOr<std::vector<v1::CheckpointInfo>> list =
      context.client().ListCheckpoints(args.positional[0]);
  if (!list.ok()) return context.Fail(list.status());
  PrintCheckpoints(*list);
  return kExitOk;
}

int RunRestore(Context& context, const Args& args) {
  v1::RestoreCheckpointRequest request;
  request.set_model_id(args.positional[0]);
  request.set_name(args.Get("--name"));
  request.set_new_model_id(args.Get("--as"));
  request.set_discard_newer(args.Has("--discard-newer"));
  request.set_from_deleted(args.Has("--deleted"));
  if (args.Has("--as") && args.Get("--as").empty()) {
    return context.Usage("--as: expected the new model's id, got ''");
  }
  if (args.Has("--as") && args.Has("--discard-newer")) {
    return context.Usage(
        "--as and --discard-newer: a restore as a new model removes no "
        "checkpoints; give one of them");
  }
  request.set_device(args.Get("--device"));
  if (args.Has("--compute")) {
    v1::ComputeType compute;
    if (!ParseCompute(args.Get("--compute"), &compute)) {
      return context.Usage(absl::StrCat("--compute: expected fp32, tf32 or bf16, got '",
                                        args.Get("--compute"), "'"));
    }
    request.set_compute(compute);
  }
  absl::StatusOr<v1::ModelInfo> info = context.client().RestoreCheckpoint(request);
  if (!info.ok()) return context.Fail(info.status());
  PrintModelInfo(*info);
  return kExitOk;
}

int RunRelease(Context& context, const Args& args) {
  const std::vector<std::string> ids(args.positional.begin() + 1, args.positional.end());
  absl::StatusOr<v1::ReleasePassesResponse> resp =
      context.client().ReleasePasses(args.positional[0], ids);
  if (!resp.ok()) return context.Fail(resp.status());
  std::cout << "released " << resp->released() << " pending pass"
            << (resp->released() == 1 ? "" : "es") << " of " << args.positional[0] << "; "
            << resp->pending_passes() << " pending\n";
  return kExitOk;
}

int RunExport(Context& context, const Args& args) {
  const std::string& id = args.positional[0];
  const std::string& path = args.positional[1];
  if (path == "-") {
    // The file on stdout; what was done goes to stderr, so that a pipe gets the file alone.
    absl::StatusOr<std::string> state = context.client().ExportState(id);
    if (!state.ok()) return context.Fail(state.status());
    std::cout.write(state->data(), static_cast<std::streamsize>(state->size()));
    std::cout.flush();
    if (!std::cout) {
      return context.Fail(absl::InternalError("export: writing to standard output failed"));
    }
    std::cerr << "exported " << id << " to standard output (" << state->size() << " bytes)\n";
    return kExitOk;
  }
  absl::StatusOr<int64_t> bytes = context.client().ExportStateToFile(id, path);
  if (!bytes.ok()) return context.Fail(bytes.status());
  std::cout << "exported " << id << " to " << path << " (" << *bytes << " bytes)\n";
  return kExitOk;
}

int RunImport(Context& context, const Args& args) {
  if (!args.Has("--id")) return context.Usage("--id ID is required");
  v1::ImportHeader header;
  header.set_model_id(args.Get("--id"));
  header.set_replace(args.Has("--replace"));
  header.set_device(args.Get("--device"));
  if (args.Has("--compute")) {
    v1::ComputeType compute;
    if (!ParseCompute(args.Get("--compute"), &compute)) {
      return context.Usage(absl::StrCat("--compute: expected fp32, tf32 or bf16, got '",
                                        args.Get("--compute"), "'"));
    }
    header.set_compute(compute);
  }
  if (args.Has("--spec")) {
    absl::StatusOr<v1::ModelSpec> spec = ReadSpec(args.Get("--spec"));
    if (!spec.ok()) return context.Fail(spec.status());
    *header.mutable_spec() = *std::move(spec);
  }
  absl::StatusOr<v1::ModelInfo> info =
      context.client().ImportStateFromFile(header, args.positional[0]);
  if (absl::IsAlreadyExists(info.status()) && !args.Has("--replace")) {
    return context.Fail(
        absl::AlreadyExistsError(absl::StrCat(info.status().message(), "; --replace replaces it")));
  }
  if (!info.ok()) return context.Fail(info.status());
  PrintModelInfo(*info);
  return kExitOk;
}

std::string BucketLabel(double upper) {
  if (std::isinf(upper)) return upper > 0 ? "<=+inf" : "<=-inf";
  return absl::StrCat("<=", Num(upper));
}

int RunStats(Context& context, const Args& args) {
  const bool per_group = args.Has("--per-group");
  absl::StatusOr<v1::ScaleStats> stats =
      context.client().GetScaleStats(args.positional[0], per_group);
  if (!stats.ok()) return context.Fail(stats.status());
  std::cout << "model " << stats->model_id() << " at step " << stats->step()
            << " (drift = log2 S - E per group)\n\n";
  std::vector<std::vector<std::string>> rows;
  for (const v1::LayerScaleStats& l : stats->layers()) {
    rows.push_back({l.layer(), absl::StrCat(l.groups()), Num(l.drift_mean()), Num(l.drift_min()),
                    Num(l.drift_max()), Num(l.drift_abs_mean()), Num(l.saturated_fraction())});
  }
  PrintTable(
      {"LAYER", "GROUPS", "DRIFT_MEAN", "DRIFT_MIN", "DRIFT_MAX", "DRIFT_ABS_MEAN", "SATURATED"},
      rows);

  // Bucket counts, one column per bucket, labelled by its upper bound. Layers normally share
  // the bounds; a layer whose bounds differ gets a table of its own.
  const v1::LayerScaleStats* previous = nullptr;
  std::vector<std::vector<std::string>> bucket_rows;
  std::vector<std::string> bucket_header;
  auto flush = [&] {
    if (bucket_rows.empty()) return;
    std::cout << "\ngroups per drift bucket (upper bound, inclusive):\n";
    PrintTable(bucket_header, bucket_rows);
    bucket_rows.clear();
  };
  for (const v1::LayerScaleStats& l : stats->layers()) {
    std::vector<double> upper(l.bucket_upper().begin(), l.bucket_upper().end());
    // A server may leave the last (+Inf) bound implicit.
    if (static_cast<int>(upper.size()) + 1 == l.bucket_count_size()) {
      upper.push_back(INFINITY);
    }
    if (previous == nullptr ||
        !std::equal(previous->bucket_upper().begin(), previous->bucket_upper().end(),
                    l.bucket_upper().begin(), l.bucket_upper().end())) {
      flush();
      bucket_header = {"LAYER"};
      for (double u : upper) bucket_header.push_back(BucketLabel(u));
    }
    previous = &l;
    std::vector<std::string> row = {l.layer()};
    for (int64_t c : l.bucket_count()) row.push_back(absl::StrCat(c));
    bucket_rows.push_back(std::move(row));
  }
  flush();

  if (per_group) {
    for (const v1::LayerScaleStats& l : stats->layers()) {
      absl::StatusOr<std::vector<float>> values =
          client::TensorFloats(l.log2_scale(), absl::StrCat(l.layer(), ".log2_scale"));
      if (!values.ok()) return context.Fail(values.status());
      std::cout << "\n" << l.layer() << ": log2 S per group (" << values->size() << ")\n";
      constexpr size_t kPerLine = 8;
      for (size_t i = 0; i < values->size(); i += kPerLine) {
        std::string line = absl::StrFormat("%8d:", i);
        for (size_t j = i; j < std::min(values->size(), i + kPerLine); ++j) {
          absl::StrAppendFormat(&line, " %10.6f", (*values)[j]);
        }
        std::cout << line << "\n";
      }
    }
  }
  return kExitOk;
}

void PrintGroup(const v1::ServerInfo& info) {
  if (info.group_size() <= 1) {
    std::cout << "group:              none\n";
    return;
  }
  std::cout << "group:              rank " << info.group_rank() << " of " << info.group_size()
            << (info.group_formed() ? ", formed" : ", not formed") << " (generation "
            << info.group_generation() << ", " << info.group_backend() << ")";
  if (info.group_missing_ranks_size() > 0) {
    std::cout << "; missing ranks " << absl::StrJoin(info.group_missing_ranks(), ", ");
  }
  std::cout << "\n";
}

int RunServerInfo(Context& context, const Args&) {
  if (client::ReplicaGroup* group = context.group(); group != nullptr) {
    absl::StatusOr<std::vector<v1::ServerInfo>> infos = group->GetServerInfo();
    if (!infos.ok()) return context.Fail(infos.status());
    for (const v1::ServerInfo& info : *infos) {
      std::cout << "version:            " << info.version() << "\n"
                << "default_device:     " << info.default_device() << "\n"
                << "models:             " << info.models() << "\n";
      PrintGroup(info);
    }
    return kExitOk;
  }
  absl::StatusOr<v1::ServerInfo> info = context.client().GetServerInfo();
  if (!info.ok()) return context.Fail(info.status());
  std::cout << "server:             " << context.server() << "\n"
            << "version:            " << info->version() << "\n"
            << "default_device:     " << info->default_device() << "\n"
            << "devices:            " << absl::StrJoin(info->devices(), ", ") << "\n"
            << "models:             " << info->models() << "\n"
            << "max_message_bytes:  " << info->max_message_bytes() << "\n"
            << "max_pending_passes: " << info->max_pending_passes() << "\n"
            << "max_pending_bytes:  " << info->max_pending_bytes() << "\n"
            << "pending_pass_ttl_seconds: " << info->pending_pass_ttl_seconds() << "\n"
            << "max_models:         " << info->max_models() << "\n"
            << "max_device_bytes:   " << info->max_device_bytes() << "\n"
            << "device_bytes_in_use: " << info->device_bytes_in_use() << "\n";
  PrintGroup(*info);
  return kExitOk;
}

const OptionSpec kComputeOption = {"--compute", "C",
                                   "fp32, tf32 or bf16 (default: the server's, fp32)"};

}  // namespace

const std::vector<Command>& Commands() {
  static const std::vector<Command> commands = {
      {"health",
       "",
       "check that the server and the trainer service are SERVING",
       "Asks the standard health service about the server (\"\") and tscale.v1.TernaryTrainer.\n"
       "Exits 0 only when both are SERVING.\n",
       {},
       0,
       0,
       RunHealth,
       {}},
      {"server-info",
       "",
       "print the server's version, devices, limits and replica group",
       "",
       {},
       0,
       0,
       RunServerInfo,
       {}},
      {"models",
       "",
       "list the models: id, device, step, params, persistent bytes, pending passes",
       "",
       {},
       0,
       0,
       RunModels,
       {}},
      {"create",
       "ID --spec FILE.json [--seed N] [--device D] [--compute C]",
       "create a model from a ModelSpec in JSON",
       "The JSON is a tscale.v1.ModelSpec with the proto's field names (snake_case or\n"
       "lowerCamelCase), e.g.\n"
       "  {\"layers\": [{\"name\": \"fc1\", \"ternary_linear\": {\"in_features\": 64,\n"
       "                \"out_features\": 128}},\n"
       "              {\"name\": \"act\", \"activation\": {\"kind\": \"RELU\"}},\n"
       "              {\"name\": \"fc2\", \"ternary_linear\": {\"in_features\": 128,\n"
       "                \"out_features\": 10}}]}\n",
       {{"--spec", "FILE.json", "the model's layers (required)"},
        {"--seed", "N", "initialisation seed (default 0; the same seed gives the same model)"},
        {"--device", "D", "cpu, cuda or cuda:N (default: the server's)"},
        kComputeOption},
       1,
       1,
       RunCreate,
       {{"model_id", "ID"},
        {"spec", "--spec"},
        {"layers", "--spec: layers"},
        {"device", "--device"},
        {"compute", "--compute"}}},
      {"info", "ID", "print a model's description", "", {}, 1, 1, RunInfo, {{"model_id", "ID"}}},
      {"delete",
       "ID [--delete-checkpoints]",
       "delete a model",
       "Without --delete-checkpoints the model's checkpoints (on a server with\n"
       "--checkpoint-dir) move to the server's trash of deleted models: a restart does not\n"
       "bring the model back and a new model may take its id, while 'tscale restore ID\n"
       "--deleted' takes them back for the server's --deleted-retention-hours (default 168).\n",
       {{"--delete-checkpoints", "", "remove the model's checkpoints as well"}},
       1,
       1,
       RunDelete,
       {{"model_id", "ID"}, {"delete_checkpoints", "--delete-checkpoints"}}},
      {"save",
       "ID",
       "checkpoint a model now on the server's disk (--checkpoint-dir)",
       "",
       {},
       1,
       1,
       RunSave,
       {{"model_id", "ID"}}},
      {"checkpoints",
       "ID",
       "list a model's checkpoints: name, step, bytes, crc32c",
       "",
       {},
       1,
       1,
       RunCheckpoints,
       {{"model_id", "ID"}}},
      {"restore",
       "ID [--name N] [--as NEW_ID] [--discard-newer] [--deleted]",
       "load a model from one of its checkpoints (default: the newest valid one)",
       "Into the model ID (created when not loaded), or with --as into a new model NEW_ID, a\n"
       "branch: ID's model and checkpoints stay as they are, and NEW_ID gets its first\n"
       "checkpoint at once. Restoring in place a checkpoint older than ID's newest is refused\n"
       "unless --discard-newer: the later checkpoints are then removed and the model goes on\n"
       "from the one restored. --deleted first takes the checkpoints of the model last\n"
       "deleted under ID back from the server's trash.\n",
       {{"--name", "N", "the checkpoint, e.g. step-00000042 (see 'tscale checkpoints ID')"},
        {"--as", "NEW_ID", "restore as a new model of this id"},
        {"--discard-newer", "", "restoring an older checkpoint in place: remove the later ones"},
        {"--deleted", "", "from the checkpoints of the model deleted under ID"},
        {"--device", "D", "cpu, cuda or cuda:N (default: the server's)"},
        kComputeOption},
       1,
       1,
       RunRestore,
       {{"model_id", "ID"},
        {"name", "--name"},
        {"new_model_id", "--as"},
        {"discard_newer", "--discard-newer"},
        {"from_deleted", "--deleted"},
        {"device", "--device"},
        {"compute", "--compute"}}},
      {"release",
       "ID [PASS_ID...]",
       "release a model's pending training passes (all, or those named)",
       "Passes of Forward(train) calls whose Backward will never come hold memory and count\n"
       "against --max-pending-passes until their TTL; this frees them now.\n",
       {},
       1,
       1 << 20,
       RunRelease,
       {{"model_id", "ID"}, {"pass_ids", "PASS_ID"}}},
      {"export",
       "ID FILE",
       "save a model's whole state to FILE (safetensors; - for stdout)",
       "",
       {},
       2,
       2,
       RunExport,
       {{"model_id", "ID"}}},
      {"import",
       "FILE --id ID [--replace] [--device D] [--spec FILE.json] [--compute C]",
       "load a model from a state FILE (safetensors, as export writes)",
       "The spec comes from --spec when given, else from the file's metadata.\n",
       {{"--id", "ID", "the model's id (required)"},
        {"--replace", "", "replace an existing model of that id"},
        {"--device", "D", "cpu, cuda or cuda:N (default: the server's)"},
        {"--spec", "FILE.json", "the model's layers, for a file without them in its metadata"},
        kComputeOption},
       1,
       1,
       RunImport,
       {{"header.model_id", "--id"},
        {"model_id", "--id"},
        {"header.spec", "--spec"},
        {"layers", "--spec: layers"},
        {"header.device", "--device"},
        {"device", "--device"},
        {"header.compute", "--compute"},
        {"compute", "--compute"},
        {"header.replace", "--replace"},
        {"replace", "--replace"}}},
      {"forward",
       "ID INPUT.npy OUTPUT.npy",
       "run a model forward (inference) on a .npy array, writing the output as .npy",
       "INPUT is a float32 (or float64) array of shape [batch, in_features], or one sample of\n"
       "shape [in_features]; OUTPUT gets float32 [batch, out_features]. '-' reads INPUT from\n"
       "standard input, or writes OUTPUT to standard output (the summary then goes to stderr).\n",
       {},
       3,
       3,
       RunForward,
       {{"model_id", "ID"}, {"input", "INPUT"}}},
      {"stats",
       "ID [--per-group]",
       "print each layer's scale drift statistics and buckets",
       "",
       {{"--per-group", "", "also print every group's log2 S"}},
       1,
       1,
       RunStats,
       {{"model_id", "ID"}}},
      {"train",
       "ID [--steps N] [--batch B] [--loss mse|ce] [--seed S]",
       "train a model on synthetic data with TrainStep",
       "Inputs are drawn from N(0, 1). MSE targets are the inputs through a fixed random linear\n"
       "teacher; CE targets are the argmax of such a teacher's logits (classes = the model's\n"
       "out_features). Progress goes to stderr, the summary to stdout.\n",
       {{"--steps", "N", "training steps (default 100)"},
        {"--batch", "B", "examples per step (default 32)"},
        {"--loss", "mse|ce", "loss function (default mse)"},
        {"--seed", "S", "seed of the synthetic data (default 0)"}},
       1,
       1,
       RunTrain,
       {{"model_id", "ID"}}},
  };
  return commands;
}

}  // namespace tscale::cli
