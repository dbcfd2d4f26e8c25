#include "util/reader_mostly_mutex.h"

#include <sched.h>
#include <time.h>

namespace qcowfs {

unsigned ReaderMostlyMutex::ThreadSlot() {
  static std::atomic<unsigned> next{0};
  thread_local unsigned slot = next.fetch_add(1, std::memory_order_relaxed) % kSlots;
  return slot;
}

void ReaderMostlyMutex::WaitForWriter() {
  // The writer holds wmu_ until its section ends.
  std::lock_guard<std::mutex> wait(wmu_);
}

void ReaderMostlyMutex::Lock() {
  wmu_.lock();
  writer_.store(true, std::memory_order_seq_cst);
  for (Slot& s : slots_) {
    // Readers in flight finish their request (microseconds, or a target timeout at
    // worst): spin briefly, then sleep in growing steps up to 1 ms.
    for (unsigned i = 0; s.readers.load(std::memory_order_seq_cst) != 0; i++) {
      if (i < 100) {
        sched_yield();
        continue;
      }
      long ns = i < 200 ? 20000 : 1000000;
      timespec t{0, ns};
      nanosleep(&t, nullptr);
    }
  }
}

void ReaderMostlyMutex::Unlock() {
  writer_.store(false, std::memory_order_seq_cst);
  wmu_.unlock();
}

}  // namespace qcowfs
