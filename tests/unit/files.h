// Files and folders for the tests, through POSIX calls. Not std::filesystem: PyTorch's LibTorch
// (on CUDA hosts) exports std::filesystem symbols of its own build, which shadow the C++
// library's and crash callers built with another compiler.
#ifndef TSCALE_TESTS_UNIT_FILES_H_
#define TSCALE_TESTS_UNIT_FILES_H_

#include <dirent.h>
#include <ftw.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace tscale::testing {

inline bool Exists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

inline int64_t FileSize(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 ? static_cast<int64_t>(st.st_size) : -1;
}

// Modification time in nanoseconds since the epoch; -1 when missing.
inline int64_t ModifiedNs(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) return -1;
  return static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
}

// The names in a folder, sorted, without "." and "..".
inline std::vector<std::string> ListDir(const std::string& dir) {
  std::vector<std::string> out;
  if (DIR* d = opendir(dir.c_str())) {
    while (const dirent* e = readdir(d)) {
      const std::string name = e->d_name;
      if (name != "." && name != "..") out.push_back(name);
    }
    closedir(d);
  }
  std::sort(out.begin(), out.end());
  return out;
}

inline void RemoveAll(const std::string& path) {
  nftw(
      path.c_str(),
      [](const char* p, const struct stat*, int, FTW*) { return remove(p); }, 16,
      FTW_DEPTH | FTW_PHYS);
}

// A new folder under /tmp, removed with its contents when the object goes.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/tscale-test-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() { RemoveAll(path_); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace tscale::testing

#endif  // TSCALE_TESTS_UNIT_FILES_H_
