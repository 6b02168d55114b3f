// Integer tuning knobs from the environment (probes only; read once per process by the callers' statics).
// A value that is not an integer >= `min` is reported on stderr and ignored, never silently taken as 0.
#pragma once
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace staticmoe {

inline int64_t env_knob(const char* name, int64_t fallback, int64_t min) {
  const char* v = std::getenv(name);
  if (!v) return fallback;
  char* end = nullptr;
  errno = 0;
  const long long parsed = std::strtoll(v, &end, 10);
  if (end == v || *end != '\0' || errno != 0 || parsed < min) {
    std::fprintf(stderr, "staticmoe: ignoring %s=%s (want an integer >= %lld); using %lld\n", name, v,
                 static_cast<long long>(min), static_cast<long long>(fallback));
    return fallback;
  }
  return parsed;
}

}  // namespace staticmoe
