// Fused G-SWA decode step: the body of an `mx.fast.metal_kernel` (MLX generates the signature).
// Layouts: see metal_kernels/gswa.py. Inputs q, global_k, global_v, ring_k, ring_v, gate (fp32),
// lengths (int32), scale (fp32 scalar); output out. Template: T (KV dtype), O (output dtype),
// D (head dim), N_Q (query heads per KV head), NSG (simdgroups per threadgroup).
//
// One threadgroup per (batch b, KV head g, loop row r): it reads the global K/V of (b, g) and
// the ring of (r, b, g) once for all N_Q query heads that share them. Its NSG simdgroups take
// keys s = sg, sg + NSG, ...; the 32 lanes of a simdgroup split the head dim, EPL contiguous
// elements each, so one key row is one coalesced read and its scores are one simd_sum each.
// Each simdgroup keeps an online softmax (running max m, sum l, output o) per query head and
// branch; the threadgroup then merges the NSG partial softmaxes and applies the gate.

constexpr int EPL = (D + 31) / 32;
const int B = q_shape[0];
const int H = q_shape[1];
const int R = q_shape[2];
const int G = global_k_shape[1];
const int S = global_k_shape[2];
const int W = ring_k_shape[3];
const int b = int(threadgroup_position_in_grid.z);
const int g = int(threadgroup_position_in_grid.y) / R;
const int r = int(threadgroup_position_in_grid.y) % R;
const int sg = int(simdgroup_index_in_threadgroup);
const int lane = int(thread_index_in_simdgroup);
const int len = lengths[b];

float q_lane[N_Q][EPL];
for (int i = 0; i < N_Q; i++) {
  const int64_t row = (int64_t((b * H + g * N_Q + i) * R + r)) * D;
  for (int e = 0; e < EPL; e++) {
    const int d = lane * EPL + e;
    q_lane[i][e] = d < D ? static_cast<float>(q[row + d]) : 0.0f;
  }
}

// Branch 0: loop 1's global K/V, slots 0..len-1. Branch 1: this row's ring, whose first
// min(len, W) slots are valid.
float m[2][N_Q], l[2][N_Q], o[2][N_Q][EPL];
for (int br = 0; br < 2; br++) {
  const int64_t base = br == 0 ? int64_t(b * G + g) * S * D
                               : int64_t((r * B + b) * G + g) * W * D;
  const device T* keys = (br == 0 ? global_k : ring_k) + base;
  const device T* values = (br == 0 ? global_v : ring_v) + base;
  const int n_keys = br == 0 ? metal::min(len, S) : metal::min(len, W);
  for (int i = 0; i < N_Q; i++) {
    m[br][i] = -INFINITY;
    l[br][i] = 0.0f;
    for (int e = 0; e < EPL; e++) o[br][i][e] = 0.0f;
  }
  for (int s = sg; s < n_keys; s += NSG) {
    float k[EPL], v[EPL];
    for (int e = 0; e < EPL; e++) {
      const int d = lane * EPL + e;
      k[e] = d < D ? static_cast<float>(keys[int64_t(s) * D + d]) : 0.0f;
      v[e] = d < D ? static_cast<float>(values[int64_t(s) * D + d]) : 0.0f;
    }
    for (int i = 0; i < N_Q; i++) {
      float partial = 0.0f;
      for (int e = 0; e < EPL; e++) partial += q_lane[i][e] * k[e];
      const float score = metal::simd_sum(partial) * scale;
      const float m_new = metal::max(m[br][i], score);
      const float correction = metal::exp(m[br][i] - m_new);
      const float p = metal::exp(score - m_new);
      m[br][i] = m_new;
      l[br][i] = l[br][i] * correction + p;
      for (int e = 0; e < EPL; e++) o[br][i][e] = o[br][i][e] * correction + p * v[e];
    }
  }
}

// Merge: softmax over all keys = sum over simdgroups of exp(m_sg - M) * o_sg / L, with
// M = max_sg m_sg and L = sum_sg exp(m_sg - M) * l_sg. A simdgroup without keys has m = -inf
// and contributes nothing.
threadgroup float tg_max[2][NSG][N_Q];
threadgroup float tg_sum[2][NSG][N_Q];
threadgroup float tg_out[NSG][N_Q][EPL * 32];
if (lane == 0) {
  for (int br = 0; br < 2; br++) {
    for (int i = 0; i < N_Q; i++) {
      tg_max[br][sg][i] = m[br][i];
      tg_sum[br][sg][i] = l[br][i];
    }
  }
}
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);

for (int i = 0; i < N_Q; i++) {
  const float gate_i = gate[(b * H + g * N_Q + i) * R + r];
  float weight[2];
  for (int br = 0; br < 2; br++) {
    float max_all = -INFINITY;
    for (int j = 0; j < NSG; j++) max_all = metal::max(max_all, tg_max[br][j][i]);
    float sum_all = 0.0f;
    for (int j = 0; j < NSG; j++) sum_all += tg_sum[br][j][i] * metal::exp(tg_max[br][j][i] - max_all);
    const float share = br == 0 ? gate_i : 1.0f - gate_i;
    weight[br] = share * metal::exp(m[br][i] - max_all) / sum_all;
  }
  for (int e = 0; e < EPL; e++) {
    tg_out[sg][i][lane * EPL + e] = o[0][i][e] * weight[0] + o[1][i][e] * weight[1];
  }
}
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);

for (int idx = int(thread_index_in_threadgroup); idx < N_Q * D; idx += NSG * 32) {
  const int i = idx / D;
  const int d = idx % D;
  float y = 0.0f;
  for (int j = 0; j < NSG; j++) y += tg_out[j][i][d];
  out[(int64_t((b * H + g * N_Q + i) * R + r)) * D + d] = static_cast<O>(y);
}
