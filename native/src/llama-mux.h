// llama-mux.h - internals of loramux (per-sequence LoRA mixes), compiled into libllama.
#pragma once

#include "llama-mux-pool.h"

#include "llama-graph.h"

#include <cstdint>
#include <vector>

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
    // per row: mode, k, 1/T, token index in the ubatch (the fused op's routing input)
    ggml_tensor * route(ggml_context * ctx, bool outputs);                   // F32 [4, n_rows]
    // device form: 0 routed on, 1 arrow, 2 spectr, 3 1/T (each F32 [1, n_rows]); 4 mask F32 [k, n_rows]
    ggml_tensor * route_dev(ggml_context * ctx, bool outputs, int which);

    const llama_mux * mux;
    const int64_t n_tokens;
    const int64_t n_outputs;
    bool routed_at_build = false; // mux->any_routed() when the graph was built (the device form's routed pass)

private:
    std::vector<ggml_tensor *> t_ids[2];
    std::vector<ggml_tensor *> t_w[2];
    std::vector<ggml_tensor *> t_embd;
    ggml_tensor * t_route[2]     = { nullptr, nullptr };
    ggml_tensor * t_dev[2][5]    = { { nullptr } };

    std::vector<int32_t> buf_ids;
    std::vector<float>   buf_w;

    void set_group_rows(const llama_ubatch * ubatch, int o, const std::vector<int32_t> & rows_out, size_t g);
    void set_embd_scales(const llama_ubatch * ubatch);
    void set_route_rows(const llama_ubatch * ubatch, int o, const std::vector<int32_t> & rows_out);
    void start_record(const llama_ubatch * ubatch);
};

// Graph hooks, called from llm_graph_context when params.mux is set.
// res = W cur (already computed); returns res plus the per-token mixed LoRA terms for w.
ggml_tensor * llama_mux_build_mm(const llm_graph_context & gctx, ggml_tensor * w, ggml_tensor * cur, ggml_tensor * res);
// cur = token embeddings of `tokens`; returns cur plus the per-token mixed embedding LoRA terms.
ggml_tensor * llama_mux_build_embd(const llm_graph_context & gctx, ggml_tensor * tokens, ggml_tensor * cur);
