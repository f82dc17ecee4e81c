// The commands of the tscale CLI, except train (train.cc), and what they share.
#include <algorithm>
#include <cmath>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <google/protobuf/util/json_util.h>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/cpp/cli/cli.h"
#include "client/cpp/tensor.h"

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
  if (!group_) group_ = std::make_unique<client::ReplicaGroup>(servers_, options_);
  return group_.get();
}

int Context::Fail(const absl::Status& status) const {
  std::cerr << "tscale: " << command_ << ": " << absl::StatusCodeToString(status.code()) << ": "
            << status.message() << "\n";
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
    *exit = Usage(absl::StrCat(name, ": expected an integer in [", min, ", ", max, "], got '",
                               value, "'"));
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

std::string SpecJson(const v1::ModelSpec& spec) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  std::string json;
  if (!google::protobuf::util::MessageToJsonString(spec, &json, options).ok()) return "?";
  return json;
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
  v1::ModelSpec spec;
  // protobuf 3.21 has a Status type of its own.
  const auto status = google::protobuf::util::JsonStringToMessage(ss.str(), &spec);
  if (!status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--spec: ", path, " is not a ModelSpec in JSON: ",
                                                   std::string(status.message())));
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
  const absl::Status status = context.group() != nullptr
                                  ? context.group()->DeleteModel(request)
                                  : context.client().DeleteModel(request);
  if (!status.ok()) return context.Fail(status);
  std::cout << "deleted " << args.positional[0] << "\n";
  return kExitOk;
}

int RunExport(Context& context, const Args& args) {
  const std::string& id = args.positional[0];
  const std::string& path = args.positional[1];
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
  PrintTable({"LAYER", "GROUPS", "DRIFT_MEAN", "DRIFT_MIN", "DRIFT_MAX", "DRIFT_ABS_MEAN",
              "SATURATED"},
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
    if (previous == nullptr || !std::equal(previous->bucket_upper().begin(),
                                           previous->bucket_upper().end(),
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
  if (info.group_size() <= 1) return;
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
            << "max_pending_bytes:  " << info->max_pending_bytes() << "\n";
  PrintGroup(*info);
  return kExitOk;
}

const OptionSpec kComputeOption = {"--compute", "C",
                                   "fp32, tf32 or bf16 (default: the server's, fp32)"};

}  // namespace

const std::vector<Command>& Commands() {
  static const std::vector<Command> commands = {
      {"health", "", "check that the server and the trainer service are SERVING",
       "Asks the standard health service about the server (\"\") and tscale.v1.TernaryTrainer.\n"
       "Exits 0 only when both are SERVING.\n",
       {}, 0, 0, RunHealth},
      {"server-info", "", "print the server's version, devices and limits", "", {}, 0, 0,
       RunServerInfo},
      {"models", "", "list the models: id, device, step, params, persistent bytes, pending passes",
       "", {}, 0, 0, RunModels},
      {"create", "ID --spec FILE.json [--seed N] [--device D] [--compute C]",
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
       1, 1, RunCreate},
      {"info", "ID", "print a model's description", "", {}, 1, 1, RunInfo},
      {"delete", "ID", "delete a model", "", {}, 1, 1, RunDelete},
      {"export", "ID FILE", "save a model's whole state to FILE (safetensors)", "", {}, 2, 2,
       RunExport},
      {"import", "FILE --id ID [--replace] [--device D] [--spec FILE.json] [--compute C]",
       "load a model from a state FILE (safetensors, as export writes)",
       "The spec comes from --spec when given, else from the file's metadata.\n",
       {{"--id", "ID", "the model's id (required)"},
        {"--replace", "", "replace an existing model of that id"},
        {"--device", "D", "cpu, cuda or cuda:N (default: the server's)"},
        {"--spec", "FILE.json", "the model's layers, for a file without them in its metadata"},
        kComputeOption},
       1, 1, RunImport},
      {"stats", "ID [--per-group]", "print each layer's scale drift statistics and buckets", "",
       {{"--per-group", "", "also print every group's log2 S"}}, 1, 1, RunStats},
      {"train", "ID [--steps N] [--batch B] [--loss mse|ce] [--seed S]",
       "train a model on synthetic data with TrainStep",
       "Inputs are drawn from N(0, 1). MSE targets are the inputs through a fixed random linear\n"
       "teacher; CE targets are the argmax of such a teacher's logits (classes = the model's\n"
       "out_features). Progress goes to stderr, the summary to stdout.\n",
       {{"--steps", "N", "training steps (default 100)"},
        {"--batch", "B", "examples per step (default 32)"},
        {"--loss", "mse|ce", "loss function (default mse)"},
        {"--seed", "S", "seed of the synthetic data (default 0)"}},
       1, 1, RunTrain},
  };
  return commands;
}

}  // namespace tscale::cli
