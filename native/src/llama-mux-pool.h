// llama-mux-pool.h - loramux's data model (the registered pool, its stacks, groups, per-sequence
// mixes and routing, the record), shared by llama-mux.cpp and llama-mux-route.cpp.
#pragma once

#include "llama-mux-kernel.h"

#include "ggml-cpp.h"

#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

struct llama_adapter_lora;

// One adapted base weight: the pool's A and B matrices for it, stacked.
//   a: [n_in, r_max, n_sub + 1] (f16, or f32 when every source is f32)
//   b: [r_max, n_out, n_sub + 1] f32 for ggml_mul_mat_id (device buffers), or, when cpu,
//      transposed [n_out, r_max, n_sub + 1] for the fused CPU kernel (host buffers), typed as a
// Each adapter's alpha/r is folded into its B; ranks below r_max are zero-padded; the last slice
// (index n_sub) is all zeros: empty slots select it.
//
// Per-token routing (Arrow, SpectR, LoGo) gates each token among the group's adapters from data computed
// once at registration, exactly from the stacked A and scaled B of each adapter e (delta
// D_e = scale_e B_e A_e; A_e = U_e S_e V_e^T from the eigen-decomposition of A_e A_e^T):
//   Arrow prototype  v_e = the top right singular vector of D_e (unit, sign-free), score |x . v_e|;
//   SpectR basis     Q_e = V_e (orthonormal row space of A_e = of D_e), score ||Q_e^T x|| / sqrt(r_e) = ||M_e A_e x||
//                    with M_e = S_e^+ U_e^T (r x r), so the fused op reuses A_e x for the chosen adapters;
//   LoGo             score ||D_e x|| / c_e = sqrt(t^T G_e t) / c_e with t = A_e x and G_e = B_s^T B_s (r x r, B_s the
//                    scaled B), c_e a calibration: 1, ||D_e||_2 or ||D_e||_F (fused CPU op only).
struct llama_mux_module {
    ggml_tensor * a = nullptr;
    ggml_tensor * b = nullptr;
    int32_t group = -1; // which pool adapters the stack holds (index into llama_mux::groups)
    int32_t index = -1; // position in llama_mux::module_names (the record's module id)
    bool    cpu   = false; // host buffers: applied with the fused CPU kernel (unless registered with LORAMUX_REGISTER_MUL_MAT_ID)
    int64_t n_in  = 0;
    int64_t r_max = 0;
    std::vector<int32_t> rank; // [n_sub] each stacked adapter's own rank (<= r_max)
    const struct llama_mux * mux = nullptr; // the pool (the fused op records its choices there)

    // routing data, host copies (always): proto [n_sub][n_in] f32, gate_m [n_sub][r_max][r_max] f32,
    // logo_g [n_sub][r_max][r_max] f32 (G_e), logo_inv_c [n_sub][LLAMA_MUX_LOGO_N_CAL] f32 (1 / c_e per
    // calibration, in the order of the LoGo modes; 0 where c_e = 0: a zero adapter scores 0)
    std::vector<float> proto;
    std::vector<float> gate_m;
    std::vector<float> logo_g;
    std::vector<float> logo_inv_c;
    // device form only: proto_t F32 [n_in, n_sub], basis_t F32 [n_in, r_max * n_sub] (Q_e zero-padded)
    ggml_tensor * proto_t = nullptr;
    ggml_tensor * basis_t = nullptr;
    std::vector<float> basis; // host staging of basis_t during registration ([n_sub * r_max][n_in])
};

// A set of pool adapters that share the same stacked layout (all modules adapted by exactly
// those adapters): maps pool ids to their index in the stacks.
// A group may hold free slices (members -1): spare room that loramux_set_slots fills in place (host
// buffers of a pool made with loramux_init_pool only); routing skips them.
struct llama_mux_group {
    std::vector<int32_t> sub_of;  // [n_adapters] -> index in the stack, or -1
    std::vector<int32_t> members; // [n_sub] -> pool id, or -1 for a free slice
    int32_t n_sub     = 0;        // slices, free ones included (the all-zero slice is index n_sub)
    int32_t n_members = 0;        // slices holding an adapter
};

// Routing modes of a sequence (enum loramux_route_mode): fixed mix, Arrow, SpectR, LoGo with its
// three calibrations (raw, spectral, Frobenius; the fused CPU op only).
enum llama_mux_route : int32_t {
    LLAMA_MUX_FIXED = 0, LLAMA_MUX_ARROW = 1, LLAMA_MUX_SPECTR = 2,
    LLAMA_MUX_LOGO = 3, LLAMA_MUX_LOGO_SPECTRAL = 4, LLAMA_MUX_LOGO_FROBENIUS = 5,
};
constexpr int32_t LLAMA_MUX_LOGO_N_CAL = 3; // calibration index = mode - LLAMA_MUX_LOGO

inline bool llama_mux_is_logo(int32_t mode) {
    return mode >= LLAMA_MUX_LOGO && mode < LLAMA_MUX_LOGO + LLAMA_MUX_LOGO_N_CAL;
}

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
    int32_t  n_adapters = 0; // slot ids 0..n_adapters-1 (the last one filled)
    int32_t  k          = 1; // max active adapters per sequence
    uint32_t n_seq_max  = 0;
    bool     force_mul_mat_id = false; // LORAMUX_REGISTER_MUL_MAT_ID: host buffers take the device form
    bool     spare_slices     = false; // made by loramux_init_pool: host-buffer groups keep free slices to fill in place
    int32_t  n_rebuilt        = 0;     // slot changes that built the next pool (loramux_pool_changes)
    int32_t  n_in_place       = 0;     // slot changes written into the current pool's free slices

    // slot id -> filled; ids past the end are empty. The adapters themselves are read only while
    // their slot is filled; a token-embedding LoRA's tensors are read at decode time (embd below)
    std::vector<uint8_t> filled;

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

    // why a graph could not apply the pool somewhere (the first adapted weight in a shape the hook
    // cannot take, or output rows that do not match the graph), or empty; graphs are built from a
    // const pool, so this is the one mutable, locked field
    mutable std::mutex  unapplied_mutex;
    mutable std::string unapplied;

    // upper bound of the graph nodes the mux adds to one graph
    uint32_t n_nodes() const;

    // whether any sequence routes per token (the device form then adds its gating ops)
    bool any_routed() const;
};
