// The lane reduction of the CPU kernels' inner loops.
//
// One accumulator makes a chain of dependent additions that the compiler may neither
// vectorise nor reorder (that would change the rounding; no -ffast-math here). So term i goes
// to lane i % kLanes (the tail after the last whole group of kLanes to lane 0), and the lanes
// are combined in a fixed tree: lane l with lane l + w for w = kLanes / 2, ..., 1. The loop
// then vectorises, and the result depends on n alone, never on the thread count or the ISA.
#pragma once

#include <cstdint>

namespace ganops {

// The reduction of term(0), ..., term(n - 1) in that lane order, starting from Acc(0); combine
// is its step: a sum (ganops::Plus), or the NaN-propagating max of the infinity norm.
template <typename Acc, typename Term, typename Combine>
inline Acc lane_reduce(int64_t n, Term&& term, Combine combine) {
  constexpr int kLanes = 16;
  Acc lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = Acc(0);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] = combine(lanes[l], term(i + l));
  }
  for (; i < n; ++i) lanes[0] = combine(lanes[0], term(i));
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) lanes[l] = combine(lanes[l], lanes[l + w]);
  }
  return lanes[0];
}

}  // namespace ganops
