// Real processes for tests: a private redis-server and our own servers on
// free loopback ports, each in a temp dir, stopped when the object dies.
#ifndef APESERVE_TESTS_PROCESS_UTIL_H_
#define APESERVE_TESTS_PROCESS_UTIL_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

namespace ape::testing {

// A port that was free a moment ago (bind to 0, read it back, close).
inline int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

inline bool PortOpen(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bool ok = connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  close(fd);
  return ok;
}

// A child process; SIGTERM then SIGKILL on Stop() or destruction.
class Process {
 public:
  Process() = default;
  Process(const std::vector<std::string>& argv, const std::string& log_path) { Start(argv, log_path); }
  ~Process() { Stop(); }
  void Start(const std::vector<std::string>& argv, const std::string& log_path) {
    pid_ = fork();
    if (pid_ == 0) {
      if (!log_path.empty()) {
        FILE* f = freopen(log_path.c_str(), "a", stderr);
        (void)f;
        dup2(2, 1);
      }
      std::vector<char*> args;
      for (auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execvp(args[0], args.data());
      _exit(127);
    }
  }
  // Returns the exit status (or -signal); waits up to `grace` after SIGTERM.
  int Stop(std::chrono::milliseconds grace = std::chrono::milliseconds(5000)) {
    if (pid_ <= 0) return exit_;
    kill(pid_, SIGTERM);
    auto deadline = std::chrono::steady_clock::now() + grace;
    int status = 0;
    while (waitpid(pid_, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    pid_ = -1;
    exit_ = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
    return exit_;
  }
  bool Running() {
    if (pid_ <= 0) return false;
    int status;
    return waitpid(pid_, &status, WNOHANG) == 0;
  }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
  int exit_ = 0;
};

inline bool WaitForPort(int port, Process& p, std::chrono::milliseconds timeout = std::chrono::milliseconds(20000)) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (PortOpen(port)) return true;
    if (!p.Running()) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

inline std::string MakeTempDir() {
  char dir[] = "/tmp/apeserve-test-XXXXXX";
  return mkdtemp(dir);
}

// redis-server on a free loopback port, no persistence, in a temp dir.
class RedisServer {
 public:
  explicit RedisServer(std::vector<std::string> extra = {}) : dir_(MakeTempDir()), extra_(std::move(extra)) {
    port_ = FreePort();
    Start();
  }
  ~RedisServer() {
    Stop();
    std::system(("rm -rf " + dir_).c_str());
  }
  void Start() {
    std::vector<std::string> argv = {
        "redis-server", "--port", std::to_string(port_), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir",        dir_,     "--daemonize",         "no"};
    argv.insert(argv.end(), extra_.begin(), extra_.end());
    proc_.Start(argv, dir_ + "/redis.log");
    ok_ = WaitForPort(port_, proc_);
  }
  void Stop() { proc_.Stop(); }
  bool ok() const { return ok_; }
  int port() const { return port_; }
  std::string uri() const { return "redis://127.0.0.1:" + std::to_string(port_); }
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  std::vector<std::string> extra_;
  int port_ = 0;
  bool ok_ = false;
  Process proc_;
};

}  // namespace ape::testing

#endif  // APESERVE_TESTS_PROCESS_UTIL_H_
