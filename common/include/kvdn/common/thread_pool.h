// A fixed pool of threads running queued tasks, and ParallelFor on it.
#ifndef KVDN_COMMON_THREAD_POOL_H_
#define KVDN_COMMON_THREAD_POOL_H_

#include <atomic>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "kvdn/common/mutex.h"

namespace kvdn {

// Thread-safe. The destructor runs the tasks still queued, then joins.
class ThreadPool {
 public:
  explicit ThreadPool(int threads) {
    for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { Run(); });
  }
  ~ThreadPool() {
    {
      MutexLock lock(&mu_);
      stop_ = true;
    }
    cv_.SignalAll();
    for (auto& t : workers_) t.join();
  }
  void Submit(std::function<void()> task) {
    {
      MutexLock lock(&mu_);
      tasks_.push_back(std::move(task));
    }
    // One task, one worker: waking them all (8 in kvdnd's blocking pool) to find one task made
    // every hop onto the pool cost seven needless wake-ups, which a 2-core host pays in full.
    cv_.Signal();
  }
  // Calls fn(i) for i in [0, n) on up to `width` threads (the caller's among them); returns when
  // every call has returned. REQUIRES: not called from a task of this pool with width > 1.
  void ParallelFor(size_t n, int width, const std::function<void(size_t)>& fn) {
    if (n == 0) return;
    struct Shared {
      std::atomic<size_t> next{0};
      Mutex mu;
      CondVar cv;
      int running ABSL_GUARDED_BY(mu) = 0;
    };
    auto shared = std::make_shared<Shared>();
    auto loop = [shared, n, &fn] {
      for (size_t i; (i = shared->next.fetch_add(1)) < n;) fn(i);
    };
    const int helpers = static_cast<int>(std::min<size_t>(n, std::max(width, 1))) - 1;
    {
      MutexLock lock(&shared->mu);
      shared->running = helpers;
    }
    for (int h = 0; h < helpers; ++h) {
      Submit([shared, loop] {
        loop();
        MutexLock lock(&shared->mu);
        if (--shared->running == 0) shared->cv.SignalAll();
      });
    }
    loop();
    MutexLock lock(&shared->mu);
    while (shared->running > 0) shared->cv.Wait(&shared->mu);
  }

 private:
  void Run() {
    for (;;) {
      std::function<void()> task;
      {
        MutexLock lock(&mu_);
        while (!stop_ && tasks_.empty()) cv_.Wait(&mu_);
        if (tasks_.empty()) return;
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }

  Mutex mu_;
  CondVar cv_;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

}  // namespace kvdn

#endif  // KVDN_COMMON_THREAD_POOL_H_
