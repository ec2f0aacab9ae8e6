// The core's own threads: one BLAS call or one pass over V split into parts that run at once, each part a
// single-threaded BLAS call. Idle workers block on a condition variable (they never spin), so the pool does not
// compete with another thread pool (torch's, OpenBLAS's) between jobs.
#pragma once

#include <functional>

namespace sparsetarget::cpu {

// Threads a job may use (>= 1), the calling thread included.
int pool_threads();
// Sets it (n >= 1); throws std::invalid_argument naming n otherwise.
void set_pool_threads(int n);

// Runs f(0), ..., f(parts - 1) and returns when all have run: part 0 and any left over on the calling thread, the
// others on the workers. Runs everything on the calling thread when parts <= 1, when called from a worker, or while
// another thread's job holds the pool. Rethrows the first exception a part threw.
void parallel_for(int parts, const std::function<void(int)>& f);

}  // namespace sparsetarget::cpu
