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
//
// Per-token routing (Arrow, SpectR) gates each token among the group's adapters from data computed
// once at registration, exactly from the stacked A and scaled B of each adapter e (delta
// D_e = scale_e B_e A_e; A_e = U_e S_e V_e^T from the eigen-decomposition of A_e A_e^T):
//   Arrow prototype  v_e = the top right singular vector of D_e (unit, sign-free), score |x . v_e|;
//   SpectR basis     Q_e = V_e (orthonormal row space of A_e = of D_e), score ||Q_e^T x|| = ||M_e A_e x||
//                    with M_e = S_e^+ U_e^T (r x r), so the fused op reuses A_e x for the chosen adapters.
struct llama_mux_module {
    ggml_tensor * a = nullptr;
    ggml_tensor * b = nullptr;
    int32_t group = -1; // which pool adapters the stack holds (index into llama_mux::groups)
    int32_t index = -1; // position in llama_mux::module_names (the record's module id)
    bool    cpu   = false; // host buffers: applied with the fused CPU kernel (unless LORAMUX_MUL_MAT_ID=1)
    int64_t n_in  = 0;
    int64_t r_max = 0;
    const struct llama_mux * mux = nullptr; // the pool (the fused op records its choices there)

    // routing data, host copies (always): proto [n_sub][n_in] f32, gate_m [n_sub][r_max][r_max] f32
    std::vector<float> proto;
    std::vector<float> gate_m;
    // device form only: proto_t F32 [n_in, n_sub], basis_t F32 [n_in, r_max * n_sub] (Q_e zero-padded)
    ggml_tensor * proto_t = nullptr;
    ggml_tensor * basis_t = nullptr;
    std::vector<float> basis; // host staging of basis_t during registration ([n_sub * r_max][n_in])
};

// A set of pool adapters that share the same stacked layout (all modules adapted by exactly
// those adapters): maps pool ids to their index in the stacks.
struct llama_mux_group {
    std::vector<int32_t> sub_of;  // [n_adapters] -> index in the stack, or -1
    std::vector<int32_t> members; // [n_sub] -> pool id
    int32_t n_sub = 0;
};

// Routing modes of a sequence (enum loramux_route_mode): fixed mix, Arrow, SpectR.
enum llama_mux_route : int32_t { LLAMA_MUX_FIXED = 0, LLAMA_MUX_ARROW = 1, LLAMA_MUX_SPECTR = 2 };

// Per-token choices of routed tokens, kept while recording is on: one segment per ubatch, with
// ids/w [n_modules][n_tokens][k] (pool ids, -1 where nothing was written). set_input() starts a
// segment; the fused op writes its own token rows (threads never share a row).
struct llama_mux_record_segment {
    std::vector<int32_t> seq;
    std::vector<int32_t> pos;
    std::vector<int32_t> ids;
    std::vector<float>   w;
};

struct llama_mux_record {
    bool on = false;
    std::vector<llama_mux_record_segment> segs;
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

    // per-sequence routing: mode (llama_mux_route), top-k and 1/temperature (0 for SpectR)
    std::vector<int32_t> seq_mode;
    std::vector<int32_t> seq_rk;
    std::vector<float>   seq_inv_t;

    std::vector<std::string> module_names; // the record's module ids, in registration order

    // choices of routed tokens (written by the fused op during compute, hence mutable)
    mutable llama_mux_record record;

    // the first adapted weight a graph could not apply (shape the hook cannot take), or empty;
    // graphs are built from a const pool, so this is the one mutable, locked field
    mutable std::mutex  unapplied_mutex;
    mutable std::string unapplied;

    // upper bound of the graph nodes the mux adds to one graph
    uint32_t n_nodes() const;

    // whether any sequence routes per token (the device form then adds its gating ops)
    bool any_routed() const;
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

    void set_route_rows(const llama_ubatch * ubatch, int o, const std::vector<int32_t> & rows_out);
    void start_record(const llama_ubatch * ubatch);
};

// Graph hooks, called from llm_graph_context when params.mux is set.
// res = W cur (already computed); returns res plus the per-token mixed LoRA terms for w.
ggml_tensor * llama_mux_build_mm(const llm_graph_context & gctx, ggml_tensor * w, ggml_tensor * cur, ggml_tensor * res);
// cur = token embeddings of `tokens`; returns cur plus the per-token mixed embedding LoRA terms.
ggml_tensor * llama_mux_build_embd(const llm_graph_context & gctx, ggml_tensor * tok_embd, ggml_tensor * tokens, ggml_tensor * cur);

//
// shared between llama-mux.cpp and llama-mux-route.cpp
//

llm_graph_input_mux * llama_mux_input(const llm_graph_context & g);

// device form of the routed sequences: res plus the gated mixes (x: [n_in, nt] contiguous f32);
// names its routed input "mux_route_x-<name>" and output terms "mux_route_u-<name>" (the tests read them)
ggml_tensor * llama_mux_build_routed(const llm_graph_context & g, const llama_mux_module & m, const char * name, ggml_tensor * x, ggml_tensor * res, bool outputs);

// routing data of one adapter (sub) of module m from its A (row-major [r][n_in]) and scaled B
// (row-major [n_out][r]); false when the eigen-decomposition did not converge
bool llama_mux_route_prepare(llama_mux_module & m, int64_t n_sub, int64_t sub, const std::vector<float> & a, const std::vector<float> & b_scaled, int64_t r, int64_t n_out);

// fused CPU op, routed token: scores, top-k, weights, then out[o0, o1) += the gated mix
struct llama_mux_cpu_args {
    const ggml_tensor * A;
    const ggml_tensor * BT;
    int64_t n_in, r_max;
    float * scratch; // n_in floats for the portable f16 path
};
void llama_mux_route_token(const llama_mux_module & m, const llama_mux_cpu_args & args, const float * route_row, const float * xin, float * out, int64_t o0, int64_t o1);
// out[o0, o1) += B[sub] t, and t = w * A[sub] x (the two stages of the fused op)
void llama_mux_a_times_x(const llama_mux_cpu_args & args, int64_t sub, const float * xin, float * t);
void llama_mux_add_b(const llama_mux_cpu_args & args, int64_t sub, const float * t, float * out, int64_t o0, int64_t o1);
float llama_mux_dot_f32(const float * a, const float * x, int64_t n);

// errors (llama-mux.cpp): record the reason of the failing call and return status
int32_t llama_mux_fail(int32_t status, const std::string & reason);
