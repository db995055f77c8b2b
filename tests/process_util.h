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
#include <cstdio>
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

// What a shell command printed on stdout (empty if it could not run).
inline std::string CommandOutput(const std::string& cmd) {
  std::string out;
  FILE* f = popen(cmd.c_str(), "r");
  if (f == nullptr) return out;
  char buf[4096];
  for (size_t n; (n = fread(buf, 1, sizeof(buf), f)) > 0;) out.append(buf, n);
  pclose(f);
  return out;
}

// A Redis Cluster of `masters` redis-server processes (no replicas) on free
// loopback ports, one temp dir, made with `redis-cli --cluster create`;
// ok() once every node says cluster_state:ok. Each node's cluster bus gets a
// free port of its own (--cluster-port). Every node is stopped and the dir
// removed when the object dies. `extra` goes to every redis-server;
// `password` sets requirepass and masterauth on every node.
class RedisClusterServer {
 public:
  explicit RedisClusterServer(int masters = 3, std::vector<std::string> extra = {}, std::string password = "")
      : dir_(MakeTempDir()), password_(std::move(password)), procs_(masters) {
    for (int i = 0; i < masters; ++i) {
      const int port = FreePort();
      int bus = FreePort();
      while (bus == port) bus = FreePort();
      ports_.push_back(port);
      const std::string conf = "nodes-" + std::to_string(port) + ".conf";
      std::vector<std::string> argv = {
          "redis-server", "--port", std::to_string(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
          "--dir",        dir_,     "--daemonize",        "no"};
      argv.insert(argv.end(),
                  {"--cluster-enabled", "yes", "--cluster-port", std::to_string(bus), "--cluster-config-file", conf,
                   "--cluster-node-timeout", "5000", "--cluster-require-full-coverage", "no"});
      if (!password_.empty()) argv.insert(argv.end(), {"--requirepass", password_, "--masterauth", password_});
      argv.insert(argv.end(), extra.begin(), extra.end());
      procs_[i].Start(argv, dir_ + "/redis-" + std::to_string(port) + ".log");
    }
    for (int i = 0; i < masters; ++i) {
      if (!WaitForPort(ports_[i], procs_[i])) return;
    }
    std::string create = "redis-cli" + Auth() + " --cluster create";
    for (int p : ports_) create += " 127.0.0.1:" + std::to_string(p);
    create += " --cluster-replicas 0 --cluster-yes >>" + dir_ + "/create.log 2>&1";
    if (std::system(create.c_str()) != 0) return;
    ok_ = WaitUntilOk(std::chrono::seconds(20));
  }
  ~RedisClusterServer() {
    for (Process& p : procs_) p.Stop();
    std::system(("rm -rf " + dir_).c_str());
  }
  RedisClusterServer(const RedisClusterServer&) = delete;
  RedisClusterServer& operator=(const RedisClusterServer&) = delete;

  bool ok() const { return ok_; }
  const std::vector<int>& ports() const { return ports_; }
  // redis+cluster://[:password@]127.0.0.1:P1,127.0.0.1:P2,...
  std::string uri() const {
    std::string u = "redis+cluster://" + (password_.empty() ? "" : ":" + password_ + "@");
    for (size_t i = 0; i < ports_.size(); ++i) u += (i ? ",127.0.0.1:" : "127.0.0.1:") + std::to_string(ports_[i]);
    return u;
  }
  // `redis-cli -p <port of node i> [-a password] <args>` as a shell command.
  std::string Cli(size_t i, const std::string& args) const {
    return "redis-cli -p " + std::to_string(ports_[i]) + Auth() + " " + args;
  }
  std::string NodeId(size_t i) const { return Trim(CommandOutput(Cli(i, "cluster myid"))); }
  // Stops node i (SIGTERM, then SIGKILL after the grace period).
  void StopNode(size_t i) { procs_[i].Stop(); }
  bool WaitUntilOk(std::chrono::milliseconds timeout) const {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      bool all = true;
      for (size_t i = 0; i < ports_.size() && all; ++i) {
        all = CommandOutput(Cli(i, "cluster info")).find("cluster_state:ok") != std::string::npos;
      }
      if (all) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }
  const std::string& dir() const { return dir_; }

 private:
  std::string Auth() const { return password_.empty() ? "" : " -a " + password_ + " --no-auth-warning"; }
  static std::string Trim(std::string s) {
    while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
    return s;
  }

  std::string dir_;
  std::string password_;
  std::vector<int> ports_;
  std::vector<Process> procs_;
  bool ok_ = false;
};

}  // namespace ape::testing

#endif  // APESERVE_TESTS_PROCESS_UTIL_H_
