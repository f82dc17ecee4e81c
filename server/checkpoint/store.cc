#include "server/checkpoint/store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "server/core/registry.h"

namespace tscale::checkpoint {
namespace {

constexpr char kPrefix[] = "step-";
constexpr char kSuffix[] = ".safetensors";
// The trash of deleted models, inside the store's folder; a model id never starts with '.'.
constexpr char kTrash[] = ".deleted";
// Headers of our files are a few KiB; a larger one is not ours, or is damaged.
constexpr uint64_t kMaxHeaderBytes = 64 << 20;

absl::Status IoError(absl::string_view what, const std::string& path) {
  const int err = errno;
  std::string msg = absl::StrCat("checkpoint: ", what, " ", path, ": ", std::strerror(err));
  // Out of room: a full disk, a quota, or a file-size limit (EFBIG, with SIGXFSZ ignored).
  if (err == ENOSPC || err == EDQUOT || err == EFBIG) return absl::ResourceExhaustedError(msg);
  return absl::InternalError(msg);
}

absl::Status FsyncPath(const std::string& path, int flags) {
  const int fd = open(path.c_str(), flags | O_CLOEXEC);
  if (fd < 0) return IoError("opening", path);
  const int rc = fsync(fd);
  const int err = errno;
  close(fd);
  errno = err;
  return rc == 0 ? absl::OkStatus() : IoError("syncing", path);
}

absl::Status MakeDir(const std::string& path) {
  if (mkdir(path.c_str(), 0755) == 0 || errno == EEXIST) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0) return IoError("reading", path);
    if (!S_ISDIR(st.st_mode)) {
      return absl::InvalidArgumentError(absl::StrCat("checkpoint: ", path, " is not a folder"));
    }
    return absl::OkStatus();
  }
  return IoError("creating the folder", path);
}

// MakeDir of `path` and of each missing folder above it (mkdir -p): --checkpoint-dir A/B/C needs
// no A/B beforehand.
absl::Status MakeDirs(const std::string& path) {
  for (size_t slash = path.find('/', 1); slash != std::string::npos;
       slash = path.find('/', slash + 1)) {
    const std::string parent = path.substr(0, slash);
    if (parent.empty() || parent.back() == '/') continue;  // "//" inside a path
    struct stat st;
    if (stat(parent.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) continue;
    if (absl::Status s = MakeDir(parent); !s.ok()) return s;
  }
  return MakeDir(path);
}

std::vector<std::string> Entries(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return out;
  while (const dirent* e = readdir(d)) {
    const std::string name = e->d_name;
    if (name != "." && name != "..") out.push_back(name);
  }
  closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

bool IsTemporary(const std::string& name) {
  return absl::StartsWith(name, ".") && absl::StrContains(name, ".tmp");
}

// The step a checkpoint's name holds: "step-<digits>.safetensors".
bool ParseName(absl::string_view name, int64_t* step) {
  if (!absl::ConsumePrefix(&name, kPrefix)) return false;
  absl::ConsumeSuffix(&name, kSuffix);
  if (name.empty() || name.size() > 18) return false;
  for (char c : name) {
    if (c < '0' || c > '9') return false;
  }
  return absl::SimpleAtoi(name, step);
}

// The checkpoint files of a folder, by step, newest last.
std::vector<std::pair<int64_t, std::string>> CheckpointFiles(const std::string& dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  for (const std::string& name : Entries(dir)) {
    int64_t step = 0;
    if (absl::EndsWith(name, kSuffix) && ParseName(name, &step)) out.emplace_back(step, name);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// The file's __metadata__, from its header alone.
absl::StatusOr<std::map<std::string, std::string>> ReadMetadata(const std::string& path,
                                                                int64_t* size) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return absl::NotFoundError(absl::StrCat("checkpoint: cannot open ", path));
  *size = static_cast<int64_t>(in.tellg());
  in.seekg(0);
  unsigned char len_bytes[8] = {};
  if (*size < 8 || !in.read(reinterpret_cast<char*>(len_bytes), 8)) {
    return absl::DataLossError(absl::StrCat(path, ": shorter than a safetensors header"));
  }
  uint64_t len = 0;
  for (int i = 7; i >= 0; --i) len = (len << 8) | len_bytes[i];
  if (len > kMaxHeaderBytes || len > static_cast<uint64_t>(*size) - 8) {
    return absl::DataLossError(absl::StrCat(path, ": header length ", len, " does not fit"));
  }
  std::string header(len, '\0');
  if (!in.read(header.data(), static_cast<std::streamsize>(len))) {
    return absl::DataLossError(absl::StrCat(path, ": cannot read the header"));
  }
  std::map<std::string, std::string> out;
  nlohmann::json j = nlohmann::json::parse(header, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return absl::DataLossError(absl::StrCat(path, ": header is not JSON"));
  if (auto it = j.find("__metadata__"); it != j.end() && it->is_object()) {
    for (const auto& [k, v] : it->items()) {
      if (v.is_string()) out[k] = v.get<std::string>();
    }
  }
  return out;
}

}  // namespace

std::string CheckpointName(int64_t step) { return absl::StrFormat("%s%08d", kPrefix, step); }

absl::StatusOr<std::unique_ptr<CheckpointStore>> CheckpointStore::Open(
    const std::string& dir, std::function<void(const std::string&)> log,
    absl::Duration deleted_retention) {
  if (dir.empty()) return absl::InvalidArgumentError("checkpoint folder: expected a path, got ''");
  if (absl::Status s = MakeDirs(dir); !s.ok()) return s;
  std::unique_ptr<CheckpointStore> store(new CheckpointStore(dir));
  store->deleted_retention_ = deleted_retention;
  store->log_ = log;
  store->ExpireTrash();
  for (const std::string& id : store->ModelIds()) {
    const std::string model_dir = store->ModelDir(id);
    for (const std::string& name : Entries(model_dir)) {
      if (!IsTemporary(name)) continue;
      const std::string path = absl::StrCat(model_dir, "/", name);
      if (unlink(path.c_str()) == 0) {
        if (log) log(absl::StrCat("removed stale temporary file ", path));
      } else if (log) {
        log(absl::StrCat("cannot remove stale temporary file ", path, ": ", std::strerror(errno)));
      }
    }
  }
  return store;
}

std::string CheckpointStore::ModelDir(absl::string_view model_id) const {
  return absl::StrCat(dir_, "/", model_id);
}

std::vector<std::string> CheckpointStore::ModelIds() const {
  std::vector<std::string> out;
  for (const std::string& name : Entries(dir_)) {
    struct stat st;
    if (core::ValidateModelId(name).ok() && stat(ModelDir(name).c_str(), &st) == 0 &&
        S_ISDIR(st.st_mode)) {
      out.push_back(name);
    }
  }
  return out;
}

absl::StatusOr<CheckpointInfo> CheckpointStore::Save(absl::string_view model_id, int64_t step,
                                                     absl::string_view file) {
  if (absl::Status s = core::ValidateModelId(model_id); !s.ok()) return s;
  const std::string model_dir = ModelDir(model_id);
  if (absl::Status s = MakeDir(model_dir); !s.ok()) return s;
  static std::atomic<uint64_t> counter{0};
  const std::string name = CheckpointName(step);
  const std::string path = absl::StrCat(model_dir, "/", name, kSuffix);
  const std::string tmp =
      absl::StrCat(model_dir, "/.", name, kSuffix, ".tmp-", getpid(), "-", counter.fetch_add(1));
  const int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return IoError("creating", tmp);
  absl::Status status;
  for (size_t off = 0; off < file.size() && status.ok();) {
    const ssize_t n = write(fd, file.data() + off, file.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      status = IoError("writing", tmp);
      break;
    }
    off += static_cast<size_t>(n);
  }
  if (status.ok() && fsync(fd) != 0) status = IoError("syncing", tmp);
  if (close(fd) != 0 && status.ok()) status = IoError("closing", tmp);
  if (status.ok()) {
    absl::MutexLock lock(&mu_);
    if (rename(tmp.c_str(), path.c_str()) != 0) status = IoError("renaming into place", path);
  }
  if (!status.ok()) {
    unlink(tmp.c_str());
    return status;
  }
  // The rename is durable once the folder is.
  if (absl::Status s = FsyncPath(model_dir, O_RDONLY | O_DIRECTORY); !s.ok()) return s;

  CheckpointInfo info;
  info.model_id = std::string(model_id);
  info.name = name;
  info.path = path;
  info.step = step;
  info.bytes = static_cast<int64_t>(file.size());
  int64_t size = 0;
  if (auto md = ReadMetadata(path, &size); md.ok()) info.crc32c = (*md)["crc32c"];
  return info;
}

absl::StatusOr<std::vector<CheckpointInfo>> CheckpointStore::List(
    absl::string_view model_id) const {
  if (absl::Status s = core::ValidateModelId(model_id); !s.ok()) return s;
  const std::string model_dir = ModelDir(model_id);
  std::vector<CheckpointInfo> out;
  for (const auto& [step, file] : CheckpointFiles(model_dir)) {
    CheckpointInfo info;
    info.model_id = std::string(model_id);
    info.name = file.substr(0, file.size() - std::strlen(kSuffix));
    info.path = absl::StrCat(model_dir, "/", file);
    info.step = step;
    auto md = ReadMetadata(info.path, &info.bytes);
    if (!md.ok()) continue;
    info.crc32c = (*md)["crc32c"];
    out.push_back(std::move(info));
  }
  if (out.empty()) {
    return absl::NotFoundError(
        absl::StrCat("model_id: no checkpoints of '", model_id, "' in ", dir_));
  }
  return out;
}

absl::StatusOr<LoadedCheckpoint> CheckpointStore::Load(
    absl::string_view model_id, absl::string_view name,
    const std::function<absl::Status(const DecodedState&)>& accept) const {
  if (absl::Status s = core::ValidateModelId(model_id); !s.ok()) return s;
  const std::string model_dir = ModelDir(model_id);
  std::vector<std::pair<int64_t, std::string>> candidates;
  if (!name.empty()) {
    int64_t step = 0;
    if (!ParseName(name, &step)) {
      return absl::InvalidArgumentError(
          absl::StrCat("name: expected a checkpoint name such as step-00000042, got '", name, "'"));
    }
    const std::string file = absl::StrCat(CheckpointName(step), kSuffix);
    struct stat st;
    if (stat(absl::StrCat(model_dir, "/", file).c_str(), &st) != 0) {
      return absl::NotFoundError(
          absl::StrCat("name: no checkpoint '", name, "' of model '", model_id, "'"));
    }
    candidates.emplace_back(step, file);
  } else {
    candidates = CheckpointFiles(model_dir);
    std::reverse(candidates.begin(), candidates.end());
    if (candidates.empty()) {
      return absl::NotFoundError(
          absl::StrCat("model_id: no checkpoints of '", model_id, "' in ", dir_));
    }
  }
  LoadedCheckpoint out;
  for (const auto& [step, file] : candidates) {
    const std::string path = absl::StrCat(model_dir, "/", file);
    std::ifstream in(path, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    absl::Status problem;
    if (!in.good() && !in.eof()) problem = absl::DataLossError("cannot be read");
    absl::StatusOr<DecodedState> decoded = DecodeState(bytes);
    const int64_t size = static_cast<int64_t>(bytes.size());
    // A file of ours that does not parse is damaged, whatever the parser calls it.
    if (problem.ok() && !decoded.ok()) problem = absl::DataLossError(decoded.status().message());
    if (problem.ok() && (!decoded->step.has_value() || *decoded->step != step)) {
      problem = absl::DataLossError(absl::StrCat(
          "the metadata's step (",
          decoded->step.has_value() ? absl::StrCat(*decoded->step) : std::string("none"),
          ") is not the name's (", step, ")"));
    }
    if (problem.ok() && !decoded->spec.has_value()) {
      problem = absl::DataLossError("the metadata holds no spec");
    }
    if (problem.ok() && accept) {
      problem = accept(*decoded);
      // Only DataLoss marks the file as damaged; another refusal (a limit, a device this server
      // lacks) would refuse the older files as well.
      if (!problem.ok() && problem.code() != absl::StatusCode::kDataLoss) return problem;
    }
    if (!problem.ok()) {
      out.skipped.push_back(absl::StrCat(path, ": ", problem.ToString()));
      continue;
    }
    out.info.model_id = std::string(model_id);
    out.info.name = CheckpointName(step);
    out.info.path = path;
    out.info.step = step;
    out.info.bytes = size;
    out.info.crc32c = decoded->metadata.count("crc32c") ? decoded->metadata.at("crc32c") : "";
    out.state = *std::move(decoded);
    return out;
  }
  return absl::DataLossError(
      absl::StrCat("checkpoint of '", model_id, "' damaged: ", absl::StrJoin(out.skipped, "; ")));
}

absl::Status CheckpointStore::Remove(absl::string_view model_id) {
  if (absl::Status s = core::ValidateModelId(model_id); !s.ok()) return s;
  const std::string model_dir = ModelDir(model_id);
  absl::MutexLock lock(&mu_);
  struct stat st;
  if (stat(model_dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::NotFoundError(absl::StrCat("model_id: no checkpoints of '", model_id, "'"));
  }
  for (const std::string& name : Entries(model_dir)) {
    const std::string path = absl::StrCat(model_dir, "/", name);
    if (unlink(path.c_str()) != 0 && errno != ENOENT) return IoError("removing", path);
  }
  if (rmdir(model_dir.c_str()) != 0) return IoError("removing", model_dir);
  return FsyncPath(dir_, O_RDONLY | O_DIRECTORY);
}

std::string CheckpointStore::TrashDir() const { return absl::StrCat(dir_, "/", kTrash); }

namespace {

// "<model_id>@<seconds>" or "<model_id>@<seconds>.<n>": the model and the time of the deletion.
bool ParseTrashName(const std::string& name, std::string* model_id, int64_t* seconds) {
  const size_t at = name.rfind('@');
  if (at == std::string::npos || at == 0) return false;
  *model_id = name.substr(0, at);
  absl::string_view t = absl::string_view(name).substr(at + 1);
  t = t.substr(0, t.find('.'));
  return core::ValidateModelId(*model_id).ok() && absl::SimpleAtoi(t, seconds);
}

// Removes a folder of files (checkpoints and temporaries; nothing deeper).
absl::Status RemoveFolder(const std::string& dir) {
  for (const std::string& name : Entries(dir)) {
    const std::string path = absl::StrCat(dir, "/", name);
    if (unlink(path.c_str()) != 0 && errno != ENOENT) return IoError("removing", path);
  }
  if (rmdir(dir.c_str()) != 0 && errno != ENOENT) return IoError("removing", dir);
  return absl::OkStatus();
}

}  // namespace

int CheckpointStore::ExpireTrash(absl::Time now) {
  if (deleted_retention_ <= absl::ZeroDuration()) return 0;
  const std::string trash = TrashDir();
  absl::MutexLock lock(&mu_);
  int removed = 0;
  for (const std::string& name : Entries(trash)) {
    std::string id;
    int64_t seconds = 0;
    if (!ParseTrashName(name, &id, &seconds)) continue;
    if (now - absl::FromUnixSeconds(seconds) < deleted_retention_) continue;
    const std::string path = absl::StrCat(trash, "/", name);
    absl::Status s = RemoveFolder(path);
    if (log_) {
      log_(s.ok() ? absl::StrCat("removed the checkpoints of deleted model '", id, "' (", path,
                                 "): older than the retention of deleted models")
                  : absl::StrCat("cannot remove ", path, ": ", s.ToString()));
    }
    if (s.ok()) ++removed;
  }
  if (removed > 0) (void)FsyncPath(trash, O_RDONLY | O_DIRECTORY);
  return removed;
}

absl::Status CheckpointStore::MoveToTrash(absl::string_view model_id, absl::Time now) {
  if (absl::Status s = core::ValidateModelId(model_id); !s.ok()) return s;
  ExpireTrash(now);
  const std::string model_dir = ModelDir(model_id);
  const std::string trash = TrashDir();
  absl::MutexLock lock(&mu_);
  struct stat st;
  if (stat(model_dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::NotFoundError(absl::StrCat("model_id: no checkpoints of '", model_id, "'"));
  }
  if (absl::Status s = MakeDir(trash); !s.ok()) return s;
  const std::string base = absl::StrCat(trash, "/", model_id, "@", absl::ToUnixSeconds(now));
  std::string target = base;
  // Deleted twice within a second: both stay.
  for (int n = 1; stat(target.c_str(), &st) == 0; ++n) target = absl::StrCat(base, ".", n);
  if (rename(model_dir.c_str(), target.c_str()) != 0) {
    return IoError(absl::StrCat("moving ", model_dir, " to"), target);
  }
  if (absl::Status s = FsyncPath(trash, O_RDONLY | O_DIRECTORY); !s.ok()) return s;
  return FsyncPath(dir_, O_RDONLY | O_DIRECTORY);
}

absl::Status CheckpointStore::TakeFromTrash(absl::string_view model_id) {
  if (absl::Status s = core::ValidateModelId(model_id); !s.ok()) return s;
  const std::string model_dir = ModelDir(model_id);
  const std::string trash = TrashDir();
  absl::MutexLock lock(&mu_);
  std::string newest;
  int64_t newest_seconds = -1;
  for (const std::string& name : Entries(trash)) {
    std::string id;
    int64_t seconds = 0;
    // Entries come sorted, so of one second the later suffix wins.
    if (ParseTrashName(name, &id, &seconds) && id == model_id && seconds >= newest_seconds) {
      newest = name;
      newest_seconds = seconds;
    }
  }
  if (newest.empty()) {
    return absl::NotFoundError(absl::StrCat("from_deleted: no deleted checkpoints of '", model_id,
                                            "' in ", trash,
                                            " (removed by hand, or older than "
                                            "the server's --deleted-retention-hours)"));
  }
  if (!CheckpointFiles(model_dir).empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("from_deleted: model '", model_id, "' has checkpoints of its own in ",
                     model_dir, "; restore the deleted ones as another model by moving ", trash,
                     "/", newest, " to a folder of that name"));
  }
  // An empty folder (or one of temporaries) is in the way of the rename.
  if (absl::Status s = RemoveFolder(model_dir); !s.ok()) return s;
  const std::string source = absl::StrCat(trash, "/", newest);
  if (rename(source.c_str(), model_dir.c_str()) != 0) {
    return IoError(absl::StrCat("moving ", source, " to"), model_dir);
  }
  if (absl::Status s = FsyncPath(trash, O_RDONLY | O_DIRECTORY); !s.ok()) return s;
  return FsyncPath(dir_, O_RDONLY | O_DIRECTORY);
}

absl::Status CheckpointStore::RemoveAfter(absl::string_view model_id, int64_t step) {
  const std::string model_dir = ModelDir(model_id);
  absl::MutexLock lock(&mu_);
  bool removed = false;
  for (const auto& [s, file] : CheckpointFiles(model_dir)) {
    if (s <= step) continue;
    const std::string path = absl::StrCat(model_dir, "/", file);
    if (unlink(path.c_str()) != 0 && errno != ENOENT) return IoError("removing", path);
    removed = true;
  }
  return removed ? FsyncPath(model_dir, O_RDONLY | O_DIRECTORY) : absl::OkStatus();
}

absl::Status CheckpointStore::Prune(absl::string_view model_id, int keep) {
  if (keep <= 0) return absl::OkStatus();
  const std::string model_dir = ModelDir(model_id);
  absl::MutexLock lock(&mu_);
  auto files = CheckpointFiles(model_dir);
  const int excess = static_cast<int>(files.size()) - keep;
  for (int i = 0; i < excess; ++i) {
    const std::string path = absl::StrCat(model_dir, "/", files[i].second);
    if (unlink(path.c_str()) != 0 && errno != ENOENT) return IoError("removing", path);
  }
  return excess > 0 ? FsyncPath(model_dir, O_RDONLY | O_DIRECTORY) : absl::OkStatus();
}

}  // namespace tscale::checkpoint
