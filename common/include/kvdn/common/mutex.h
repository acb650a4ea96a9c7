// kvdn::Mutex, MutexLock and CondVar: std::mutex / std::condition_variable carrying Abseil's
// thread-safety annotations (ABSL_GUARDED_BY works with them as with absl::Mutex).
//
// Why not absl::Mutex: Debian ships Abseil as shared libraries built without ThreadSanitizer, so
// TSan cannot see absl::Mutex's happens-before edges and reports false races on everything it
// guards. std::mutex goes through pthread, which TSan intercepts, so the tsan preset checks our
// locking.
#ifndef KVDN_COMMON_MUTEX_H_
#define KVDN_COMMON_MUTEX_H_

#include <chrono>
#include <condition_variable>
#include <mutex>

#include "absl/base/thread_annotations.h"
#include "absl/time/time.h"

namespace kvdn {

class ABSL_LOCKABLE Mutex {
 public:
  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  void Unlock() ABSL_UNLOCK_FUNCTION() { mu_.unlock(); }

 private:
  friend class CondVar;
  std::mutex mu_;
};

class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) { mu_->Lock(); }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() { mu_->Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* const mu_;
};

// Waiters re-check their condition in a loop; spurious wake-ups are allowed.
class CondVar {
 public:
  // REQUIRES: mu held. Releases it while waiting and holds it again on return.
  void Wait(Mutex* mu) {
    std::unique_lock<std::mutex> lock(mu->mu_, std::adopt_lock);
    cv_.wait(lock);
    lock.release();
  }
  // As Wait, for at most `timeout`. Returns true if it timed out.
  bool WaitWithTimeout(Mutex* mu, absl::Duration timeout) {
    std::unique_lock<std::mutex> lock(mu->mu_, std::adopt_lock);
    const bool timed_out =
        cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout)) == std::cv_status::timeout;
    lock.release();
    return timed_out;
  }
  void Signal() { cv_.notify_one(); }
  void SignalAll() { cv_.notify_all(); }

 private:
  std::condition_variable cv_;
};

}  // namespace kvdn

#endif  // KVDN_COMMON_MUTEX_H_
