// Peak arithmetic throughput of this CPU, measured: an fp32 FMA loop and an int8 dot-product
// (VNNI vpdpbusd) loop, on 1..N threads. pipeline/runtime/roofline.py compiles and runs it.
//
// Each loop keeps 12 independent accumulators in vector registers, enough to hide the
// instruction latency (4-5 cycles) on every x86 core with one or two vector pipes, so the
// loop runs at the issue rate of the instruction: the machine's peak for that data type.
// The widest ISA the CPU has is chosen at run time (target attributes, no -march), so one
// binary built anywhere measures any x86-64 CPU honestly: AVX-512 where present, else AVX2.
//
// Counting: one FMA lane = 2 FLOP; one vpdpbusd lane = 4 u8 x s8 products summed into an
// int32 = 8 OP (4 multiplies, 4 adds), the convention the roofline report uses for kernels
// (2 x multiply-accumulates).
//
//   peak_probe <fp32|int8> <threads> <seconds>
// prints one JSON object: {"kind", "isa", "threads", "ops_per_s", "seconds"}; exit 2 when
// the CPU has no instruction for the kind (int8 without VNNI).

#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
// Results are written here so the compiler cannot drop the loops.
std::atomic<uint64_t> g_sink{0};

#define REPEAT12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

// --- fp32 FMA ---------------------------------------------------------------------------
__attribute__((target("avx512f"))) double fma_avx512(uint64_t iters) {
  // acc = acc * a + b converges to a finite value: no overflow, no denormals.
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-3f);
#define DECL(i) __m512 acc##i = _mm512_set1_ps(float(i));
  REPEAT12(DECL)
#undef DECL
  for (uint64_t n = 0; n < iters; ++n) {
#define STEP(i) acc##i = _mm512_fmadd_ps(acc##i, a, b);
    REPEAT12(STEP)
#undef STEP
  }
  __m512 sum = _mm512_setzero_ps();
#define ADD(i) sum = _mm512_add_ps(sum, acc##i);
  REPEAT12(ADD)
#undef ADD
  g_sink += uint64_t(_mm512_reduce_add_ps(sum));
  return double(iters) * 12 * 16 * 2;
}

__attribute__((target("avx2,fma"))) double fma_avx2(uint64_t iters) {
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(1e-3f);
#define DECL(i) __m256 acc##i = _mm256_set1_ps(float(i));
  REPEAT12(DECL)
#undef DECL
  for (uint64_t n = 0; n < iters; ++n) {
#define STEP(i) acc##i = _mm256_fmadd_ps(acc##i, a, b);
    REPEAT12(STEP)
#undef STEP
  }
  __m256 sum = _mm256_setzero_ps();
#define ADD(i) sum = _mm256_add_ps(sum, acc##i);
  REPEAT12(ADD)
#undef ADD
  float lanes[8];
  _mm256_storeu_ps(lanes, sum);
  g_sink += uint64_t(lanes[0]);
  return double(iters) * 12 * 8 * 2;
}

// --- int8 dot products (u8 x s8 -> s32) ---------------------------------------------------
__attribute__((target("avx512f,avx512vnni"))) double vnni_avx512(uint64_t iters) {
  const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-5);
#define DECL(i) __m512i acc##i = _mm512_set1_epi32(i);
  REPEAT12(DECL)
#undef DECL
  for (uint64_t n = 0; n < iters; ++n) {
#define STEP(i) acc##i = _mm512_dpbusd_epi32(acc##i, a, b);
    REPEAT12(STEP)
#undef STEP
  }
  __m512i sum = _mm512_setzero_si512();
#define ADD(i) sum = _mm512_add_epi32(sum, acc##i);
  REPEAT12(ADD)
#undef ADD
  g_sink += uint64_t(_mm512_reduce_add_epi32(sum));
  return double(iters) * 12 * 64 * 2;
}

__attribute__((target("avx2,avxvnni"))) double vnni_avx2(uint64_t iters) {
  const __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-5);
#define DECL(i) __m256i acc##i = _mm256_set1_epi32(i);
  REPEAT12(DECL)
#undef DECL
  for (uint64_t n = 0; n < iters; ++n) {
#define STEP(i) acc##i = _mm256_dpbusd_avx_epi32(acc##i, a, b);
    REPEAT12(STEP)
#undef STEP
  }
  __m256i sum = _mm256_setzero_si256();
#define ADD(i) sum = _mm256_add_epi32(sum, acc##i);
  REPEAT12(ADD)
#undef ADD
  g_sink += uint64_t(_mm256_extract_epi32(sum, 0));
  return double(iters) * 12 * 32 * 2;
}

using Loop = double (*)(uint64_t);

struct Choice {
  const char* isa;
  Loop loop;
};

Choice choose(const std::string& kind) {
  __builtin_cpu_init();
  if (kind == "fp32") {
    if (__builtin_cpu_supports("avx512f")) return {"avx512f", fma_avx512};
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return {"avx2-fma", fma_avx2};
  } else if (kind == "int8") {
    if (__builtin_cpu_supports("avx512vnni")) return {"avx512-vnni", vnni_avx512};
    if (__builtin_cpu_supports("avxvnni")) return {"avx-vnni", vnni_avx2};
  }
  return {nullptr, nullptr};
}

// Ops per second of `threads` threads each running `iters` iterations, started together.
double run_threads(Loop loop, int threads, uint64_t iters) {
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<double> ops(threads, 0.0);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      ready++;
      while (!go.load(std::memory_order_acquire)) {
      }
      ops[t] = loop(iters);
    });
  }
  while (ready.load() < threads) {
  }
  auto start = Clock::now();
  go.store(true, std::memory_order_release);
  for (auto& th : pool) th.join();
  double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  double total = 0;
  for (double o : ops) total += o;
  return total / seconds;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s <fp32|int8> <threads> <seconds>\n", argv[0]);
    return 1;
  }
  std::string kind = argv[1];
  int threads = std::atoi(argv[2]);
  double seconds = std::atof(argv[3]);
  if ((kind != "fp32" && kind != "int8") || threads < 1 || !(seconds > 0)) {
    std::fprintf(stderr, "bad arguments: kind must be fp32 or int8, threads >= 1, "
                         "seconds > 0\n");
    return 1;
  }
  Choice choice = choose(kind);
  if (choice.loop == nullptr) {
    std::printf("{\"kind\": \"%s\", \"isa\": null, \"threads\": %d, \"ops_per_s\": null}\n",
                kind.c_str(), threads);
    return 2;
  }
  // Calibrate on one thread (also warms up the clock and the vector units), then size the
  // timed run to last about `seconds`.
  uint64_t iters = 1 << 16;
  for (;;) {
    auto start = Clock::now();
    choice.loop(iters);
    double took = std::chrono::duration<double>(Clock::now() - start).count();
    if (took > 0.02) {
      iters = uint64_t(double(iters) * seconds / took) + 1;
      break;
    }
    iters *= 4;
  }
  double rate = run_threads(choice.loop, threads, iters);
  std::printf("{\"kind\": \"%s\", \"isa\": \"%s\", \"threads\": %d, \"ops_per_s\": %.6e, "
              "\"sink\": %llu}\n",
              kind.c_str(), choice.isa, threads, rate,
              static_cast<unsigned long long>(g_sink.load() & 1));
  return 0;
}
