// llama-mux-route.h - per-token routing (Arrow, SpectR, LoGo; llama-mux-route.cpp): the routing data
// computed at registration, the fused CPU op's routed token, and the device form's gating ops.
#pragma once

#include "llama-mux-pool.h"

// routing data of one adapter (sub) of module m from its A (row-major [r][n_in]) and scaled B
// (row-major [n_out][r]) into m.proto, m.gate_m, m.logo_g and m.logo_inv_c (sized by the caller);
// false when the eigen-decomposition did not converge
bool llama_mux_route_prepare(llama_mux_module & m, int64_t n_sub, int64_t sub, const std::vector<float> & a,
                             const std::vector<float> & b_scaled, int64_t r, int64_t n_out);

// fused CPU op, routed token: scores, top-k, weights, then out[o0, o1) += the gated mix
void llama_mux_route_token(const llama_mux_module & m, const llama_mux_cpu_args & args, const float * route_row,
                           const float * xin, float * out, int64_t o0, int64_t o1);

// the device form's per-row graph inputs (llm_graph_input_mux::route_dev), each F32
struct llama_mux_route_rows {
    ggml_tensor * on;     // [1, n_rows] 1 on routed rows
    ggml_tensor * arrow;  // [1, n_rows] 1 on Arrow rows
    ggml_tensor * spectr; // [1, n_rows] 1 on SpectR rows
    ggml_tensor * inv_t;  // [1, n_rows] 1/T (0 for SpectR)
    ggml_tensor * mask;   // [max_active, n_rows] 0 for slots within the row's k, -inf beyond
};

// device form of the routed sequences: res plus the gated mixes (x: [n_in, nt] contiguous f32);
// names its routed input "mux_route_x-<name>" and output terms "mux_route_u-<name>" (the tests read them)
ggml_tensor * llama_mux_build_routed(ggml_context * ctx0, const llama_mux_route_rows & rows, const llama_mux_module & m,
                                     const char * name, ggml_tensor * x, ggml_tensor * res);
