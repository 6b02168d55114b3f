// Host twin of the device plan (plan.cu), for unit tests on the CPU: same counting sort, same expert order rule,
// same task map. Plain C++.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

namespace staticmoe::moe {

struct HostPlan {
  std::vector<int32_t> expert_counts, expert_offsets, expert_order, mtile_prefix, slot_expert, sorted_rows;
  int32_t num_slots = 0;
};

inline HostPlan plan_host(const std::vector<int32_t>& topk_ids, int32_t num_experts, int32_t block_m) {
  HostPlan p;
  p.expert_counts.assign(num_experts, 0);
  for (int32_t e : topk_ids)
    if (e >= 0 && e < num_experts) ++p.expert_counts[e];
  p.expert_offsets.assign(num_experts + 1, 0);
  for (int e = 0; e < num_experts; ++e) p.expert_offsets[e + 1] = p.expert_offsets[e] + p.expert_counts[e];
  p.sorted_rows.assign(p.expert_offsets[num_experts], 0);
  std::vector<int32_t> next(p.expert_offsets.begin(), p.expert_offsets.end() - 1);
  for (size_t i = 0; i < topk_ids.size(); ++i) {
    const int32_t e = topk_ids[i];
    if (e >= 0 && e < num_experts) p.sorted_rows[next[e]++] = int32_t(i);
  }
  std::vector<int32_t> mtiles(num_experts);
  int32_t nonempty = 0;
  for (int e = 0; e < num_experts; ++e) {
    mtiles[e] = (p.expert_counts[e] + block_m - 1) / block_m;
    nonempty += p.expert_counts[e] > 0;
  }
  std::vector<int32_t> by_weight(num_experts);
  for (int e = 0; e < num_experts; ++e) by_weight[e] = e;
  std::stable_sort(by_weight.begin(), by_weight.end(), [&](int a, int b) { return mtiles[a] > mtiles[b]; });
  p.expert_order.assign(num_experts, -1);
  for (int rank = 0; rank < num_experts; ++rank) {
    const bool heavy_half = rank < (nonempty + 1) / 2;
    const int pos = rank >= nonempty ? rank : (heavy_half ? 2 * rank : 2 * (nonempty - 1 - rank) + 1);
    p.expert_order[pos] = by_weight[rank];
  }
  int32_t running = 0;
  for (int32_t e : p.expert_order) {
    if (mtiles[e] == 0) continue;
    running += mtiles[e];
    p.mtile_prefix.push_back(running);
    p.slot_expert.push_back(e);
  }
  p.num_slots = int32_t(p.slot_expert.size());
  return p;
}

}  // namespace staticmoe::moe
