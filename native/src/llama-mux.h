// llama-mux.h - internals of loramux (per-sequence LoRA mixes), compiled into libllama.
#pragma once

#include "llama-graph.h"

#include "ggml-cpp.h"

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

struct llama_adapter_lora;

// Highest LoRA rank the stacks take (the CPU kernel keeps one token's rank vector on the stack).
#define LLAMA_MUX_MAX_RANK 512

// One adapted base weight: the pool's A and B matrices for it, stacked.
//   a: [n_in, r_max, n_sub + 1] (f16, or f32 when every source is f32)
//   b: [r_max, n_out, n_sub + 1] f32 for ggml_mul_mat_id (device buffers), or, when cpu,
//      transposed [n_out, r_max, n_sub + 1] for the fused CPU kernel (host buffers)
// Each adapter's alpha/r is folded into its B; ranks below r_max are zero-padded; the last slice
// (index n_sub) is all zeros: empty slots select it.
struct llama_mux_module {
    ggml_tensor * a = nullptr;
    ggml_tensor * b = nullptr;
    int32_t group = -1; // which pool adapters the stack holds (index into llama_mux::groups)
    bool    cpu   = false; // host buffers: applied with the fused CPU kernel (unless LORAMUX_MUL_MAT_ID=1)
};

// A set of pool adapters that share the same stacked layout (all modules adapted by exactly
// those adapters): maps pool ids to their index in the stacks.
struct llama_mux_group {
    std::vector<int32_t> sub_of; // [n_adapters] -> index in the stack, or -1
    int32_t n_sub = 0;
};

// Token-embedding LoRA of one pool adapter (applied densely, per token).
struct llama_mux_embd {
    int32_t       pool_id = -1;
    ggml_tensor * a       = nullptr; // the adapter's own tensors: [r, n_vocab]
    ggml_tensor * b       = nullptr; // [r, n_embd]
    float         scale   = 1.0f;    // alpha / r
};

struct llama_mux {
    int32_t  n_adapters = 0;
    int32_t  k          = 1; // max active adapters per sequence
    uint32_t n_seq_max  = 0;

    std::vector<llama_adapter_lora *> adapters;

    std::unordered_map<std::string, llama_mux_module> modules; // by base weight name
    std::vector<llama_mux_group> groups;
    std::vector<llama_mux_embd>  embd;

    std::vector<ggml_context_ptr>        ctxs;
    std::vector<ggml_backend_buffer_ptr> bufs;

    // per-sequence mixes: seq_n[s] active entries in seq_ids/seq_w[s*k .. s*k+k)
    std::vector<int32_t> seq_n;
    std::vector<int32_t> seq_ids;
    std::vector<float>   seq_w;

    // the first adapted weight a graph could not apply (shape the hook cannot take), or empty;
    // graphs are built from a const pool, so this is the one mutable, locked field
    mutable std::mutex  unapplied_mutex;
    mutable std::string unapplied;

    // upper bound of the graph nodes the mux adds to one graph
    uint32_t n_nodes() const;
};

// Graph input: per-token (and per-output-row) adapter ids and weights of each group, filled in
// set_input() from the tokens' sequence ids. Tensors are created on first use while building.
class llm_graph_input_mux : public llm_graph_input_i {
public:
    llm_graph_input_mux(const llama_mux * mux, int64_t n_tokens, int64_t n_outputs);
    virtual ~llm_graph_input_mux() = default;

    void set_input(const llama_ubatch * ubatch) override;
    bool can_reuse(const llm_graph_params & params) override;

    ggml_tensor * ids    (ggml_context * ctx, int32_t group, bool outputs); // I32 [k, n_rows]
    ggml_tensor * weights(ggml_context * ctx, int32_t group, bool outputs); // F32 [1, k, n_rows]
    ggml_tensor * embd_scale(ggml_context * ctx, size_t i);                 // F32 [1, n_tokens]

    const llama_mux * mux;
    const int64_t n_tokens;
    const int64_t n_outputs;

private:
    std::vector<ggml_tensor *> t_ids[2];
    std::vector<ggml_tensor *> t_w[2];
    std::vector<ggml_tensor *> t_embd;

    std::vector<int32_t> buf_ids;
    std::vector<float>   buf_w;
};

// Graph hooks, called from llm_graph_context when params.mux is set.
// res = W cur (already computed); returns res plus the per-token mixed LoRA terms for w.
ggml_tensor * llama_mux_build_mm(const llm_graph_context & gctx, ggml_tensor * w, ggml_tensor * cur, ggml_tensor * res);
// cur = token embeddings of `tokens`; returns cur plus the per-token mixed embedding LoRA terms.
ggml_tensor * llama_mux_build_embd(const llm_graph_context & gctx, ggml_tensor * tok_embd, ggml_tensor * tokens, ggml_tensor * cur);
