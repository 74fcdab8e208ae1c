// llama-mux-kernel.h - the fused CPU op's two stages (llama-mux-kernel.cpp): t = A[sub] x, and
// out[o0, o1) += B[sub] t over the stacked matrices of one adapted weight.
#pragma once

#include "ggml.h"

#include <cstdint>

// Highest LoRA rank the stacks take (the CPU kernel keeps one token's rank vector on the stack).
#define LLAMA_MUX_MAX_RANK 512

// one adapted weight's stacks as the fused op sees them (A and BT, B transposed, both f16, or f32
// when every source adapter is f32)
struct llama_mux_cpu_args {
    const ggml_tensor * A;
    const ggml_tensor * BT;
    int64_t n_in, r_max;
    float * scratch; // max(n_in, n_out) floats for the portable f16 path
};

void  llama_mux_a_times_x(const llama_mux_cpu_args & args, int64_t sub, const float * xin, float * t);
void  llama_mux_add_b(const llama_mux_cpu_args & args, int64_t sub, const float * t, float * out, int64_t o0, int64_t o1);
float llama_mux_dot_f32(const float * a, const float * x, int64_t n);
