// The core's own threads: one BLAS call or one pass over V split into parts that run at once, each part a
// single-threaded BLAS call. A worker that ran a part polls for the next job for 50 microseconds (the jobs of one step
// follow each other closely, and waking a blocked thread can take that long), yielding its core meanwhile, then
// blocks on a condition variable, so the pool does not compete with another thread pool (torch's, OpenBLAS's)
// between steps.
#pragma once

#include <functional>

namespace sparsetarget::cpu {

// Threads a job may use (>= 1), the calling thread included: the step's count, or within a PassThreads scope the
// count for passes over V.
int pool_threads();
// Sets the step's count (n >= 1); throws std::invalid_argument naming n otherwise.
void set_pool_threads(int n);
// Threads for the long passes over V (refresh, correction, logits, top-k); by default every core, also when the
// step's count is kept at one next to torch (a pass runs for seconds between training steps, nothing competes).
int pass_threads();
void set_pass_threads(int n);

// Within its lifetime, on this thread, pool_threads() is pass_threads().
class PassThreads {
 public:
  PassThreads();
  ~PassThreads();
  PassThreads(const PassThreads&) = delete;
  PassThreads& operator=(const PassThreads&) = delete;

 private:
  int saved_;
};

// Runs f(0), ..., f(parts - 1) and returns when all have run, on the calling thread and the workers (which part
// runs where is not fixed). Runs everything on the calling thread when parts <= 1, when called from a worker, or while
// another thread's job holds the pool. Rethrows the first exception a part threw.
void parallel_for(int parts, const std::function<void(int)>& f);

}  // namespace sparsetarget::cpu
