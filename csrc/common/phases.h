// Where a CPU kernel's time goes, phase by phase: opt-in counters read from Python (clfast.ops.cpu_phases,
// benchmarks/probe_attention.py).
//
// A kernel wraps each section of its work in a PhaseTimer: the GEMMs (common/brgemm.h times every call), operand
// packing, the element-wise code between the GEMMs, the stores of the results, and each parallel task's whole body
// (kTask: what the tasks spend outside the named phases is loop and bookkeeping code). Each phase sums, over all
// threads, its nanoseconds, its sections and their work (a GEMM's multiply-adds M*N*K, an element-wise section's
// elements). Off by default: a disabled timer costs one relaxed atomic load. cpu_phase_timing(true) resets the
// counters and starts them; the sums are exact counts of sections, and wall-clock times that include whatever the
// OS did to the thread meanwhile.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace clfast::cpu {

enum class Phase : int { kGemm = 0, kPack, kElementwise, kStore, kTask, kCount };
constexpr int kPhases = static_cast<int>(Phase::kCount);
// The phases' names, in enum order (the rows of cpu_phase_counters).
constexpr const char* kPhaseNames[kPhases] = {"gemm", "pack", "elementwise", "store", "task"};

struct PhaseCounters {
  std::atomic<int64_t> ns[kPhases];
  std::atomic<int64_t> sections[kPhases];
  std::atomic<int64_t> work[kPhases];
};

inline std::atomic<bool>& phase_timing_on() {
  static std::atomic<bool> on{false};
  return on;
}

inline PhaseCounters& phase_counters() {
  static PhaseCounters counters{};
  return counters;
}

// Zeroes the counters and turns the timers on or off (call it outside the kernels' parallel regions).
inline void set_phase_timing(bool on) {
  PhaseCounters& c = phase_counters();
  for (int i = 0; i < kPhases; ++i) {
    c.ns[i].store(0, std::memory_order_relaxed);
    c.sections[i].store(0, std::memory_order_relaxed);
    c.work[i].store(0, std::memory_order_relaxed);
  }
  phase_timing_on().store(on, std::memory_order_release);
}

// Times the scope it lives in as one section of `phase` with `work` units of work, when the timers are on.
class PhaseTimer {
 public:
  explicit PhaseTimer(Phase phase, int64_t work = 0)
      : on_(phase_timing_on().load(std::memory_order_relaxed)), phase_(static_cast<int>(phase)), work_(work) {
    if (on_) {
      t0_ = std::chrono::steady_clock::now();
    }
  }
  ~PhaseTimer() {
    if (on_) {
      const auto ns =
          std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0_).count();
      PhaseCounters& c = phase_counters();
      c.ns[phase_].fetch_add(ns, std::memory_order_relaxed);
      c.sections[phase_].fetch_add(1, std::memory_order_relaxed);
      c.work[phase_].fetch_add(work_, std::memory_order_relaxed);
    }
  }
  PhaseTimer(const PhaseTimer&) = delete;
  PhaseTimer& operator=(const PhaseTimer&) = delete;

 private:
  const bool on_;
  const int phase_;
  const int64_t work_;
  std::chrono::steady_clock::time_point t0_{};
};

}  // namespace clfast::cpu
