#include "thread_pool_cpu.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace sparsetarget::cpu {
namespace {

thread_local bool t_in_worker = false;  // on a worker, or on a caller running a job: nested jobs run inline

// How long a worker that finished a part, or a caller waiting for the others, polls before it blocks: the jobs of
// one step follow each other within tens of microseconds, and waking a blocked thread (on a virtual machine, an idle
// virtual CPU) can take as long. Between steps every thread blocks after this much.
constexpr std::chrono::microseconds kSpinTime{50};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Polls pred for up to kSpinTime; true when it held. Yields the core now and then, so that a thread of another pool
// waiting for this core (torch's, next to a training step) gets it.
template <class P>
bool spin_until(const P& pred) {
  const auto until = std::chrono::steady_clock::now() + kSpinTime;
  for (int i = 0;; ++i) {
    if (pred()) return true;
    if ((i & 63) == 63) {
      if (std::chrono::steady_clock::now() > until) return false;
      std::this_thread::yield();
    }
    cpu_relax();
  }
}

// Workers are added on demand and live as long as the process. A child of fork() has the object but none of its
// threads: it runs every job on the calling thread.
class Pool {
 public:
  bool usable() const { return getpid() == owner_; }

  // Runs a job of `parts` parts with at least parts - 1 workers; false when another job holds the pool.
  bool run(int parts, const std::function<void(int)>& f) {
    std::unique_lock<std::mutex> job(job_mu_, std::try_to_lock);
    if (!job.owns_lock()) return false;
    while (static_cast<int>(workers_.size()) < parts - 1) workers_.emplace_back([this] { work(); });
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = &f;
      parts_ = parts;
      next_ = 0;
      unfinished_.store(parts);
      error_ = nullptr;
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    take_parts();
    spin_until([this] { return unfinished_.load(std::memory_order_acquire) == 0; });
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return unfinished_.load() == 0; });
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
    return true;
  }

 private:
  void work() {
    t_in_worker = true;
    std::uint64_t seen = 0;
    bool worked = false;
    for (;;) {
      // a worker that ran a part of the last job polls for the next one; the others (a job of few parts on a
      // machine of many cores) block at once
      if (worked) spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        seen = generation_.load();
      }
      worked = take_parts();
    }
  }

  // Runs parts of the current job until none is left; true when it ran at least one.
  bool take_parts() {
    for (bool ran = false;; ran = true) {
      int part = 0;
      const std::function<void(int)>* f = nullptr;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (job_ == nullptr || next_ >= parts_) return ran;
        part = next_++;
        f = job_;
      }
      std::exception_ptr error;
      try {
        (*f)(part);
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(mu_);
      if (error && !error_) error_ = error;
      if (unfinished_.fetch_sub(1) == 1) done_.notify_all();
    }
  }

  const pid_t owner_ = getpid();
  std::vector<std::thread> workers_;  // guarded by job_mu_
  std::mutex job_mu_;                 // one job at a time
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* job_ = nullptr;
  int parts_ = 0, next_ = 0;
  std::atomic<int> unfinished_{0};            // written under mu_, polled without it
  std::atomic<std::uint64_t> generation_{0};  // written under mu_, polled without it
  std::exception_ptr error_;
};

// Never destroyed: workers blocked in wait() cannot be joined at static destruction without racing interpreter
// shutdown, and a forked child must not join threads it does not have.
Pool& the_pool() {
  static Pool* const pool = new Pool;  // NOLINT: intentionally leaked process-wide singleton
  return *pool;
}

int default_threads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
}

std::atomic<int> g_threads{0};       // 0: not chosen (default_threads())
std::atomic<int> g_pass_threads{0};  // 0: not chosen (default_threads())
thread_local int t_override = 0;     // set by PassThreads

void check_count(int n) {
  if (n < 1) throw std::invalid_argument("n must be >= 1, got " + std::to_string(n));
}

}  // namespace

int pool_threads() {
  if (t_override > 0) return t_override;
  const int n = g_threads.load();
  return n > 0 ? n : default_threads();
}

void set_pool_threads(int n) {
  check_count(n);
  g_threads.store(n);
}

int pass_threads() {
  const int n = g_pass_threads.load();
  return n > 0 ? n : default_threads();
}

void set_pass_threads(int n) {
  check_count(n);
  g_pass_threads.store(n);
}

PassThreads::PassThreads() : saved_(t_override) { t_override = pass_threads(); }
PassThreads::~PassThreads() { t_override = saved_; }

void parallel_for(int parts, const std::function<void(int)>& f) {
  if (parts > 1 && !t_in_worker && the_pool().usable()) {
    t_in_worker = true;
    struct Reset {
      ~Reset() { t_in_worker = false; }
    } reset;
    if (the_pool().run(parts, f)) return;
  }
  for (int i = 0; i < parts; ++i) f(i);
}

}  // namespace sparsetarget::cpu
