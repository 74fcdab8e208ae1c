// llama-mux.cpp - per-sequence LoRA adapter mixes (loramux), compiled into libllama.
//
// Registration stacks the pool's LoRA matrices per adapted base weight; at decode time each token
// selects the stacked matrices of its sequence's adapters (the fused CPU op, or ggml_mul_mat_id
// like MoE experts on device buffers) and scales them by per-token weights, both graph inputs
// filled from a host table. No exception leaves the C API: each call returns a status, and
// loramux_last_error() says why the last one failed.

#include "llama-mux.h"
#include "llama-mux-route.h"

#include "loramux.h"

#include "llama-adapter.h"
#include "llama-context.h"
#include "llama-impl.h"
#include "llama-model.h"

#include "ggml-backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>


//
// llama_mux
//

uint32_t llama_mux::n_nodes() const {
    // per module: cont, reshape, 2 x mul_mat_id, mul, k x (view + add); the device form's routed
    // pass adds about 30 plus k x (view + add); per embedding LoRA: 4
    return (uint32_t) (modules.size() * (40 + 4 * (size_t) k) + embd.size() * 6 + 16);
}

bool llama_mux::any_routed() const {
    for (int32_t m : seq_mode) {
        if (m != LLAMA_MUX_FIXED) {
            return true;
        }
    }
    return false;
}

//
// llm_graph_input_mux
//

llm_graph_input_mux::llm_graph_input_mux(const llama_mux * mux, int64_t n_tokens, int64_t n_outputs)
    : mux(mux), n_tokens(n_tokens), n_outputs(n_outputs) {
    for (int o = 0; o < 2; ++o) {
        t_ids[o].assign(mux->groups.size(), nullptr);
        t_w[o].assign(mux->groups.size(), nullptr);
    }
    t_embd.assign(mux->embd.size(), nullptr);
    routed_at_build = mux->any_routed();
}

ggml_tensor * llm_graph_input_mux::route(ggml_context * ctx, bool outputs) {
    ggml_tensor *& t = t_route[outputs];
    if (!t) {
        t = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 4, outputs ? n_outputs : n_tokens);
        ggml_format_name(t, "mux_route%s", outputs ? "_out" : "");
        ggml_set_input(t);
    }
    return t;
}

ggml_tensor * llm_graph_input_mux::route_dev(ggml_context * ctx, bool outputs, int which) {
    ggml_tensor *& t = t_dev[outputs][which];
    if (!t) {
        t = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, which == 4 ? mux->k : 1, outputs ? n_outputs : n_tokens);
        ggml_format_name(t, "mux_route_dev%d%s", which, outputs ? "_out" : "");
        ggml_set_input(t);
    }
    return t;
}

// the routing inputs of rows o (0: tokens, 1: output rows): the fused op's [4, n_rows] and the
// device form's flags, temperature and slot mask
void llm_graph_input_mux::set_route_rows(const llama_ubatch * ubatch, int o, const std::vector<int32_t> & rows_out) {
    const int64_t n_rows = o ? n_outputs : n_tokens;
    const int32_t k = mux->k;
    std::vector<float> rt((size_t) 4 * n_rows, 0.0f);
    std::vector<float> dev[5];
    for (int w = 0; w < 4; ++w) {
        dev[w].assign(n_rows, 0.0f);
    }
    dev[4].assign((size_t) k * n_rows, 0.0f);
    for (int64_t r = 0; r < n_rows; ++r) {
        const int32_t i = o ? rows_out[r] : (int32_t) r;
        const llama_seq_id s = i >= 0 ? ubatch->seq_id[i][0] : -1;
        const int32_t mode = (s >= 0 && (uint32_t) s < mux->n_seq_max) ? mux->seq_mode[s] : LLAMA_MUX_FIXED;
        rt[(size_t) r * 4 + 3] = (float) std::max(i, 0);
        if (mode == LLAMA_MUX_FIXED) {
            continue;
        }
        rt[(size_t) r * 4 + 0] = (float) mode;
        rt[(size_t) r * 4 + 1] = (float) mux->seq_rk[s];
        rt[(size_t) r * 4 + 2] = mux->seq_inv_t[s];
        if (llama_mux_is_logo(mode)) { // the fused op only (refused on the device form): its routed pass adds 0 here
            if (t_dev[o][0]) {
                std::lock_guard<std::mutex> lock(mux->unapplied_mutex);
                if (mux->unapplied.empty()) {
                    mux->unapplied = "sequence " + std::to_string(s) + " routes with LoGo, which the device form (ggml_mul_mat_id) does not implement";
                }
            }
            continue;
        }
        dev[0][r] = 1.0f;
        dev[mode == LLAMA_MUX_ARROW ? 1 : 2][r] = 1.0f;
        dev[3][r] = mux->seq_inv_t[s];
        for (int32_t j = mux->seq_rk[s]; j < k; ++j) {
            dev[4][(size_t) r * k + j] = -INFINITY; // slots beyond the sequence's k
        }
    }
    if (t_route[o]) {
        ggml_backend_tensor_set(t_route[o], rt.data(), 0, ggml_nbytes(t_route[o]));
    }
    for (int w = 0; w < 5; ++w) {
        if (t_dev[o][w]) {
            ggml_backend_tensor_set(t_dev[o][w], dev[w].data(), 0, ggml_nbytes(t_dev[o][w]));
        }
    }
}

// a record segment for this ubatch, when recording is on and some token routes
void llm_graph_input_mux::start_record(const llama_ubatch * ubatch) {
    llama_mux_record & rec = mux->record;
    if (!rec.on || !mux->any_routed()) {
        return;
    }
    llama_mux_record_segment seg;
    seg.seq.resize(n_tokens);
    seg.pos.resize(n_tokens);
    for (int64_t i = 0; i < n_tokens; ++i) {
        seg.seq[i] = ubatch->seq_id[i][0];
        seg.pos[i] = ubatch->pos ? ubatch->pos[i] : (int32_t) i;
    }
    const size_t n = mux->module_names.size() * (size_t) n_tokens * mux->k;
    seg.ids.assign(n, -1);
    seg.w.assign(n, 0.0f);
    rec.segs.push_back(std::move(seg));
}

ggml_tensor * llm_graph_input_mux::ids(ggml_context * ctx, int32_t group, bool outputs) {
    ggml_tensor *& t = t_ids[outputs][group];
    if (!t) {
        t = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, mux->k, outputs ? n_outputs : n_tokens);
        ggml_format_name(t, "mux_ids_%d%s", group, outputs ? "_out" : "");
        ggml_set_input(t);
    }
    return t;
}

ggml_tensor * llm_graph_input_mux::weights(ggml_context * ctx, int32_t group, bool outputs) {
    ggml_tensor *& t = t_w[outputs][group];
    if (!t) {
        t = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 1, mux->k, outputs ? n_outputs : n_tokens);
        ggml_format_name(t, "mux_w_%d%s", group, outputs ? "_out" : "");
        ggml_set_input(t);
    }
    return t;
}

ggml_tensor * llm_graph_input_mux::embd_scale(ggml_context * ctx, size_t i) {
    ggml_tensor *& t = t_embd[i];
    if (!t) {
        t = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, n_tokens);
        ggml_format_name(t, "mux_embd_scale_%zu", i);
        ggml_set_input(t);
    }
    return t;
}

void llm_graph_input_mux::set_input(const llama_ubatch * ubatch) {
    // rows of the token tensors are the ubatch's tokens; rows of the output tensors are the
    // tokens flagged as outputs, in ubatch order (the order inp_out_ids selects them in)
    std::vector<int32_t> rows_out;
    for (int64_t i = 0; i < n_tokens; ++i) {
        if (ubatch->output && ubatch->output[i]) {
            rows_out.push_back((int32_t) i);
        }
    }

    if ((int64_t) rows_out.size() != n_outputs) {
        // cannot happen with llama.cpp's own batching; never abort: the unmatched output rows run
        // without a mix (row -1) and loramux_check_applied() reports it after the decode
        std::lock_guard<std::mutex> lock(mux->unapplied_mutex);
        if (mux->unapplied.empty()) {
            mux->unapplied = "the ubatch flags " + std::to_string(rows_out.size()) + " output rows but the graph was built for " +
                             std::to_string(n_outputs) + ": the last layer's output rows got no per-sequence LoRA";
        }
        rows_out.resize((size_t) n_outputs, -1);
    }
    for (int o = 0; o < 2; ++o) {
        for (size_t g = 0; g < mux->groups.size(); ++g) {
            if (t_ids[o][g] || t_w[o][g]) {
                set_group_rows(ubatch, o, rows_out, g);
            }
        }
        set_route_rows(ubatch, o, rows_out);
    }
    start_record(ubatch);
    set_embd_scales(ubatch);
}

// ids/weights of group g per row: each row's sequence's mix, restricted to the group's adapters
void llm_graph_input_mux::set_group_rows(const llama_ubatch * ubatch, int o, const std::vector<int32_t> & rows_out, size_t g) {
    const int32_t k      = mux->k;
    const int64_t n_rows = o ? n_outputs : n_tokens;
    const auto & sub_of  = mux->groups[g].sub_of;
    // empty slots select the group's all-zero slice (index n_sub) at weight 0, so the device form
    // (which computes every slot) adds exactly 0, even where an adapter's output is Inf for this
    // token (0 * Inf would be NaN)
    buf_ids.assign((size_t) k * n_rows, mux->groups[g].n_sub);
    buf_w.assign((size_t) k * n_rows, 0.0f);
    for (int64_t r = 0; r < n_rows; ++r) {
        const int32_t i = o ? rows_out[r] : (int32_t) r;
        // a token shared by several sequences takes the mix of its first sequence id (row -1: none)
        const llama_seq_id s = i >= 0 ? ubatch->seq_id[i][0] : -1;
        const int32_t n      = (s >= 0 && (uint32_t) s < mux->n_seq_max) ? mux->seq_n[s] : 0;
        int32_t slot = 0;
        for (int32_t j = 0; j < n; ++j) {
            const int32_t sub = sub_of[mux->seq_ids[(size_t) s * k + j]];
            if (sub < 0) {
                continue; // this adapter does not adapt the modules of this group
            }
            buf_ids[(size_t) r * k + slot] = sub;
            buf_w  [(size_t) r * k + slot] = mux->seq_w[(size_t) s * k + j];
            ++slot;
        }
    }
    if (t_ids[o][g]) {
        ggml_backend_tensor_set(t_ids[o][g], buf_ids.data(), 0, ggml_nbytes(t_ids[o][g]));
    }
    if (t_w[o][g]) {
        ggml_backend_tensor_set(t_w[o][g], buf_w.data(), 0, ggml_nbytes(t_w[o][g]));
    }
}

// per token: the weight of each embedding LoRA's adapter in the token's sequence's mix, times its scale
void llm_graph_input_mux::set_embd_scales(const llama_ubatch * ubatch) {
    const int32_t k = mux->k;
    for (size_t e = 0; e < t_embd.size(); ++e) {
        ggml_tensor * t = t_embd[e];
        if (!t) {
            continue;
        }
        const auto & em = mux->embd[e];
        buf_w.assign(n_tokens, 0.0f);
        for (int64_t i = 0; i < n_tokens; ++i) {
            const llama_seq_id s = ubatch->seq_id[i][0];
            const int32_t n = (s >= 0 && (uint32_t) s < mux->n_seq_max) ? mux->seq_n[s] : 0;
            for (int32_t j = 0; j < n; ++j) {
                if (mux->seq_ids[(size_t) s * k + j] == em.pool_id) {
                    buf_w[i] = mux->seq_w[(size_t) s * k + j] * em.scale;
                }
            }
        }
        ggml_backend_tensor_set(t, buf_w.data(), 0, ggml_nbytes(t));
    }
}

bool llm_graph_input_mux::can_reuse(const llm_graph_params & params) {
    return params.mux == mux &&
           routed_at_build == mux->any_routed() &&
           params.ubatch.n_tokens == n_tokens &&
           (int64_t) params.n_outputs == n_outputs;
}

//
// graph hooks
//

static llm_graph_input_mux * llama_mux_input(const llm_graph_context & g) {
    if (!g.inp_mux) {
        auto inp = std::make_unique<llm_graph_input_mux>(g.mux, g.n_tokens, g.n_outputs);
        g.inp_mux = static_cast<llm_graph_input_mux *>(g.res->add_input(std::move(inp)));
    }
    return g.inp_mux;
}

//
// CPU kernel: one fused op per adapted weight (host buffers only)
//
// ggml_mul_mat_id is made for a few large experts; here every (token, slot) pair selects a
// small rank-r matrix, so each expert's work is one chunk and runs on one thread, and the B
// stage (dot products of length r) misses the tiled sgemm path. This op instead does, per token,
// dst = res + sum_j w_j * B[id_j] (A[id_j]^T x), skipping empty slots (weight 0), with threads
// splitting the tokens (or, for fewer tokens than threads, each token's output rows).
//
// srcs: 0 res [n_out, nt] f32, 1 x [n_in, nt] f32 (rows may be strided), 2 A [n_in, r_max, n_sub]
// f16/f32, 3 B [r_max, n_out, n_sub] f32, 4 ids [k, nt] i32, 5 w [1, k, nt] f32; 6 route (below).

// srcs 0..5 as above, 6 route [4, nt] f32 (mode, k, 1/T, token index); userdata: the module
static void mux_lora_cpu(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const llama_mux_module & m = *(const llama_mux_module *) userdata;
    const ggml_tensor * res   = dst->src[0];
    const ggml_tensor * x     = dst->src[1];
    const ggml_tensor * ids   = dst->src[4];
    const ggml_tensor * wts   = dst->src[5];
    const ggml_tensor * route = dst->src[6];

    thread_local std::vector<float> scratch; // the portable f16 path converts one row at a time
    const int64_t n_in = dst->src[2]->ne[0];
    if ((int64_t) scratch.size() < std::max(n_in, dst->src[3]->ne[0])) {
        scratch.resize(std::max(n_in, dst->src[3]->ne[0]));
    }
    const llama_mux_cpu_args args = { dst->src[2], dst->src[3], n_in, dst->src[2]->ne[1], scratch.data() };
    const int64_t n_out = args.BT->ne[0];
    const int64_t nt    = dst->ne[1];
    const int64_t k     = ids->ne[0];

    // work items: (token, chunk of output rows); several chunks per token when tokens < threads
    const int64_t n_chunks = nt >= nth ? 1 : (nth + nt - 1) / nt;
    const int64_t rows_per = (n_out + n_chunks - 1) / n_chunks;
    float t[LLAMA_MUX_MAX_RANK];

    for (int64_t item = ith; item < nt * n_chunks; item += nth) {
        const int64_t tok = item / n_chunks;
        const int64_t o0  = (item % n_chunks) * rows_per;
        const int64_t o1  = std::min(n_out, o0 + rows_per);
        if (o0 >= o1) {
            continue;
        }
        float       * out = (float *) ((char *) dst->data + tok * dst->nb[1]);
        const float * rin = (const float *) ((const char *) res->data + tok * res->nb[1]);
        const float * xin = (const float *) ((const char *) x->data + tok * x->nb[1]);
        if (out != rin) {
            memcpy(out + o0, rin + o0, (size_t) (o1 - o0) * sizeof(float));
        }
        const float * rt = (const float *) ((const char *) route->data + tok * route->nb[1]);
        if (rt[0] != 0.0f) {
            llama_mux_route_token(m, args, rt, xin, out, o0, o1);
            continue;
        }
        const int32_t * tid = (const int32_t *) ((const char *) ids->data + tok * ids->nb[1]);
        const char    * tw  = (const char *) wts->data + tok * wts->nb[2];
        for (int64_t j = 0; j < k; ++j) {
            const float w = *(const float *) (tw + j * wts->nb[1]);
            if (w == 0.0f) {
                continue; // an empty slot, or a sequence without a mix
            }
            llama_mux_a_times_x(args, tid[j], xin, t);
            for (int64_t r = 0; r < args.r_max; ++r) {
                t[r] *= w;
            }
            llama_mux_add_b(args, tid[j], t, out, o0, o1);
        }
    }
}

// whether the hook can apply module m at w (input cur, output res); when not, the pool's one
// unapplied weight is set (never silent: loramux_check_applied() reports it after every decode)
static bool mux_shape_ok(const llm_graph_context & g, const llama_mux_module & m, const ggml_tensor * w, const ggml_tensor * cur,
                         const ggml_tensor * res) {
    const int64_t nt    = cur->ne[1];
    const int64_t n_out = m.cpu ? m.b->ne[0] : m.b->ne[1];
    const bool ok =
        cur->ne[0] == m.a->ne[0] && cur->ne[2] == 1 && cur->ne[3] == 1 &&
        res->ne[0] == n_out && res->ne[1] == nt && res->ne[2] == 1 && res->ne[3] == 1 &&
        (nt == g.n_tokens || nt == g.n_outputs);
    if (!ok) {
        std::lock_guard<std::mutex> lock(g.mux->unapplied_mutex);
        if (g.mux->unapplied.empty()) {
            g.mux->unapplied = std::string("weight '") + w->name + "': the graph applies it to an input shape the per-sequence hook cannot take";
            LLAMA_LOG_ERROR("%s: loramux cannot apply per-sequence LoRA to '%s' with input shape [%lld, %lld, %lld]\n",
                    __func__, w->name, (long long) cur->ne[0], (long long) cur->ne[1], (long long) cur->ne[2]);
        }
    }
    return ok;
}

// other backends (CUDA, ...): the MoE kernels, plus the routed pass while some sequence routes
static ggml_tensor * mux_build_device(ggml_context * ctx0, llm_graph_input_mux * inp, const llama_mux_module & m, const char * name,
                                      ggml_tensor * cur, ggml_tensor * res, bool outputs) {
    const int64_t nt = cur->ne[1];
    ggml_tensor * ids = inp->ids(ctx0, m.group, outputs);
    ggml_tensor * wts = inp->weights(ctx0, m.group, outputs);
    ggml_tensor * x = ggml_is_contiguous(cur) ? cur : ggml_cont(ctx0, cur);
    x = ggml_reshape_3d(ctx0, x, x->ne[0], 1, nt);

    ggml_tensor * t = ggml_mul_mat_id(ctx0, m.a, x, ids); // [r_max, k, nt]
    t = ggml_mul(ctx0, t, wts);                           // per-token, per-slot weight
    ggml_tensor * u = ggml_mul_mat_id(ctx0, m.b, t, ids); // [n_out, k, nt]

    for (int32_t j = 0; j < inp->mux->k; ++j) {
        res = ggml_add(ctx0, res, ggml_view_2d(ctx0, u, u->ne[0], nt, u->nb[2], (size_t) j * u->nb[1]));
    }
    if (inp->routed_at_build) {
        ggml_tensor * xr = ggml_reshape_2d(ctx0, x, x->ne[0], nt);
        xr = xr->type == GGML_TYPE_F32 ? xr : ggml_cast(ctx0, xr, GGML_TYPE_F32);
        const llama_mux_route_rows rows = { inp->route_dev(ctx0, outputs, 0), inp->route_dev(ctx0, outputs, 1),
                                            inp->route_dev(ctx0, outputs, 2), inp->route_dev(ctx0, outputs, 3),
                                            inp->route_dev(ctx0, outputs, 4) };
        res = llama_mux_build_routed(ctx0, rows, m, name, xr, res);
    }
    return res;
}

ggml_tensor * llama_mux_build_mm(const llm_graph_context & g, ggml_tensor * w, ggml_tensor * cur, ggml_tensor * res) {
    const llama_mux * mux = g.mux;
    const auto it = mux->modules.find(w->name);
    if (it == mux->modules.end()) {
        return res;
    }
    const llama_mux_module & m = it->second;
    const int64_t nt = cur->ne[1];
    if (!mux_shape_ok(g, m, w, cur, res) || nt == 0) {
        return res;
    }

    ggml_context * ctx0 = g.ctx0;
    const bool outputs = nt != g.n_tokens; // last layer after inp_out_ids: only the output rows
    llm_graph_input_mux * inp = llama_mux_input(g);
    if (!m.cpu) {
        return mux_build_device(ctx0, inp, m, w->name, cur, res, outputs);
    }
    // host buffers: the fused kernel above (B stored transposed, [n_out, r_max, n_sub])
    ggml_tensor * x = cur->type == GGML_TYPE_F32 ? cur : ggml_cast(ctx0, cur, GGML_TYPE_F32);
    x = x->nb[0] == sizeof(float) ? x : ggml_cont(ctx0, x);
    ggml_tensor * r = res->type == GGML_TYPE_F32 ? res : ggml_cast(ctx0, res, GGML_TYPE_F32);
    ggml_tensor * args[7] = { r, x, m.a, m.b, inp->ids(ctx0, m.group, outputs), inp->weights(ctx0, m.group, outputs),
                              inp->route(ctx0, outputs) };
    ggml_tensor * out = ggml_custom_4d(ctx0, GGML_TYPE_F32, res->ne[0], nt, 1, 1, args, 7, mux_lora_cpu, GGML_N_TASKS_MAX,
                                       const_cast<llama_mux_module *>(&m));
    ggml_format_name(out, "mux_lora-%s", w->name);
    return out;
}

ggml_tensor * llama_mux_build_embd(const llm_graph_context & g, ggml_tensor * tokens, ggml_tensor * cur) {
    const llama_mux * mux = g.mux;
    if (mux->embd.empty()) {
        return cur;
    }
    ggml_context * ctx0 = g.ctx0;
    llm_graph_input_mux * inp = llama_mux_input(g);
    for (size_t e = 0; e < mux->embd.size(); ++e) {
        const auto & em = mux->embd[e];  // sizes checked against token_embd at registration (mux_check_weight)
        ggml_tensor * delta = ggml_mul_mat(ctx0, em.b, ggml_get_rows(ctx0, em.a, tokens)); // [n_embd, n_tokens]
        delta = ggml_mul(ctx0, delta, inp->embd_scale(ctx0, e));
        cur = ggml_add(ctx0, cur, delta);
    }
    return cur;
}

//
// errors: a status code, and the reason of the last failing call on this thread
//

static thread_local std::string mux_last_error;

// Record why the current call fails (logged too) and return `status`.
static int32_t mux_fail(int32_t status, const std::string & reason) {
    mux_last_error = reason;
    LLAMA_LOG_ERROR("loramux: %s\n", reason.c_str());
    return status;
}



static std::string mux_adapter_label(int32_t id) {
    return "adapter " + std::to_string(id);
}

static std::string mux_tensor_label(int32_t id, const std::string & name) {
    return mux_adapter_label(id) + ", tensor '" + name + "'";
}

// Run one C API call: nothing thrown inside (llama.cpp and the standard library throw) escapes
// the boundary; it becomes a status code and a reason.
template <typename F>
static int32_t mux_guard(const char * fn, F && body) {
    mux_last_error.clear();
    try {
        return body();
    } catch (const std::bad_alloc &) {
        return mux_fail(LORAMUX_ERR_ALLOC, std::string(fn) + ": out of host memory");
    } catch (const std::exception & e) {
        return mux_fail(LORAMUX_ERR_INTERNAL, std::string(fn) + ": " + e.what());
    } catch (...) {
        return mux_fail(LORAMUX_ERR_INTERNAL, std::string(fn) + ": unknown exception");
    }
}

static llama_mux * mux_of_ctx(const llama_context * ctx) {
    return ctx ? ctx->mux.get() : nullptr;
}

static bool mux_ends_with(const std::string & s, const std::string & suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Read any (float or quantized) tensor as float32 into out; false when its type has no
// conversion to float.
static bool mux_tensor_to_f32(const ggml_tensor * t, std::vector<float> & out) {
    out.resize(ggml_nelements(t));
    if (t->type == GGML_TYPE_F32) {
        ggml_backend_tensor_get(t, out.data(), 0, ggml_nbytes(t));
        return true;
    }
    const auto * traits = ggml_get_type_traits(t->type);
    if (!traits || !traits->to_float) {
        return false;
    }
    std::vector<uint8_t> raw(ggml_nbytes(t));
    ggml_backend_tensor_get(t, raw.data(), 0, raw.size());
    traits->to_float(raw.data(), out.data(), (int64_t) out.size());
    return true;
}

//
// registration: a pool of adapter slots. Every change (loramux_register_adapters, loramux_set_slots)
// builds the next pool from the current one: the slots it does not touch are copied from the
// current stacks and routing data (no adapter is read again, no eigen-decomposition redone); only
// the adapters put into slots are read, scaled and prepared. Steps: check, collect, plan, allocate,
// fill; only a complete pool replaces the current one.
//

// one (adapted weight, pool adapter) pair of the next pool: read from a new adapter (lw), or
// copied from the current pool's stacks (old, old_sub)
struct mux_src {
    int32_t id      = -1;
    int64_t r       = 0;
    bool    f32     = false; // the source's A is f32 (the stack stays f32 only when every A is)
    float   scale   = 1.0f;
    const llama_adapter_lora_weight * lw = nullptr;
    const llama_mux_module * old = nullptr;
    int32_t old_sub = -1;
};

// base weight name -> its sources, by pool id (a deterministic order)
using mux_by_name = std::map<std::string, std::vector<mux_src>>;

struct mux_plan {
    std::string name;
    int32_t group;
    int64_t n_in, n_out, r_max;
    ggml_type type_a;
    ggml_backend_buffer_type_t buft;
};

// one slot change: put `adapter` in `slot`, or clear it (adapter NULL)
struct mux_change {
    int32_t slot;
    llama_adapter_lora * adapter;
};

static int32_t mux_check_changes(const llama_model * model, const llama_mux * cur, const std::vector<mux_change> & changes) {
    for (size_t i = 0; i < changes.size(); ++i) {
        const auto & [slot, adapter] = changes[i];
        if (slot < 0 || slot >= LORAMUX_MAX_SLOTS) {
            return mux_fail(LORAMUX_ERR_BAD_ADAPTER_ID, "slot " + std::to_string(slot) + " is outside [0, " + std::to_string(LORAMUX_MAX_SLOTS) + ")");
        }
        for (size_t j = 0; j < i; ++j) {
            if (changes[j].slot == slot) {
                return mux_fail(LORAMUX_ERR_DUPLICATE_ADAPTER, "slot " + std::to_string(slot) + " is changed twice in one call");
            }
            if (adapter && changes[j].adapter == adapter) {
                return mux_fail(LORAMUX_ERR_DUPLICATE_ADAPTER, mux_adapter_label(slot) + " is the same adapter as " + mux_adapter_label(changes[j].slot));
            }
        }
        if (adapter && adapter->model != model) {
            return mux_fail(LORAMUX_ERR_INCOMPATIBLE_ADAPTER, mux_adapter_label(slot) + " was loaded for another model than this context's");
        }
        if (adapter && !adapter->alora_invocation_tokens.empty()) {
            return mux_fail(LORAMUX_ERR_INCOMPATIBLE_ADAPTER, mux_adapter_label(slot) + " is an activated LoRA (aLoRA): per-sequence mixes cannot apply its invocation tokens");
        }
        for (uint32_t s = 0; cur && s < cur->n_seq_max; ++s) { // a running mix must not change under its sequence
            for (int32_t j = 0; j < cur->seq_n[s]; ++j) {
                if (cur->seq_ids[(size_t) s * cur->k + j] == slot) {
                    return mux_fail(LORAMUX_ERR_BAD_ARG, mux_adapter_label(slot) + " is in the mix of sequence " + std::to_string(s) +
                                                         ": clear that sequence's mix before changing the slot");
                }
            }
        }
    }
    return LORAMUX_OK;
}

// One LoRA tensor pair against the base weight it adapts: what the graph hooks can apply.
static int32_t mux_check_weight(const llama_model * model, int32_t id, const std::string & name, const llama_adapter_lora_weight & lw) {
    const std::string where = mux_tensor_label(id, name);
    if (!lw.a || !lw.b) {
        return mux_fail(LORAMUX_ERR_INCOMPATIBLE_ADAPTER, where + ": lora_a or lora_b is missing");
    }
    // rank: linear lora_a ne = [in, r], lora_b ne = [r, out]; token_embd lora_a ne = [r, vocab], lora_b ne = [r, dim]
    const bool embd = mux_ends_with(name, "token_embd.weight");
    const int64_t rank_a = embd ? lw.a->ne[0] : lw.a->ne[1];
    if (ggml_n_dims(lw.a) > 2 || ggml_n_dims(lw.b) > 2 || rank_a != lw.b->ne[0]) {
        return mux_fail(LORAMUX_ERR_INCOMPATIBLE_ADAPTER, where + ": lora_a/lora_b are not 2-D matrices of one rank");
    }
    for (const ggml_tensor * t : { lw.a, lw.b }) {
        if (t->type != GGML_TYPE_F32) {
            const auto * traits = ggml_get_type_traits(t->type);
            if (!traits || !traits->to_float) {
                return mux_fail(LORAMUX_ERR_INCOMPATIBLE_ADAPTER, where + ": type " + ggml_type_name(t->type) + " cannot be read as float");
            }
        }
    }
    if (lw.b->ne[0] > LLAMA_MUX_MAX_RANK) {
        return mux_fail(LORAMUX_ERR_INCOMPATIBLE_ADAPTER, where + ": rank " + std::to_string(lw.b->ne[0]) +
                " is above the highest rank loramux stacks (" + std::to_string(LLAMA_MUX_MAX_RANK) + ")");
    }
    if (embd) {  // gathered by token id and added to the embeddings: [vocab, dim] must be the base's
        const ggml_tensor * e = model->get_tensor("token_embd.weight");
        if (!e || e->ne[1] != lw.a->ne[1] || e->ne[0] != lw.b->ne[1]) {
            return mux_fail(LORAMUX_ERR_INCOMPATIBLE_ADAPTER, where + ": vocab " + std::to_string(lw.a->ne[1]) + " x dim " +
                    std::to_string(lw.b->ne[1]) + " does not match the base's token_embd" +
                    (e ? " (vocab " + std::to_string(e->ne[1]) + " x dim " + std::to_string(e->ne[0]) + ")" : " (none)"));
        }
        return LORAMUX_OK;
    }
    const ggml_tensor * w = model->get_tensor(name.c_str());
    if (!w) {
        return mux_fail(LORAMUX_ERR_INCOMPATIBLE_ADAPTER, where + ": no such weight in the base model");
    }
    if (ggml_n_dims(w) > 2) {
        return mux_fail(LORAMUX_ERR_INCOMPATIBLE_ADAPTER, where + ": the base weight is " + std::to_string(ggml_n_dims(w)) +
                "-D (mixture-of-experts weights go through build_lora_mm_id, which per-sequence mixes do not hook)");
    }
    if (w->ne[0] != lw.a->ne[0] || w->ne[1] != lw.b->ne[1]) {
        return mux_fail(LORAMUX_ERR_INCOMPATIBLE_ADAPTER, where + ": shape [" + std::to_string(lw.a->ne[0]) + " -> " + std::to_string(lw.b->ne[1]) +
                "] does not match the base weight's [" + std::to_string(w->ne[0]) + " -> " + std::to_string(w->ne[1]) + "]");
    }
    return LORAMUX_OK;
}

static bool mux_changed(const std::vector<mux_change> & changes, int32_t id) {
    return std::any_of(changes.begin(), changes.end(), [id](const mux_change & c) { return c.slot == id; });
}

// the sources of the next pool: the current pool's untouched slots, then the new adapters
static int32_t mux_collect(const llama_model * model, const llama_mux * cur, const std::vector<mux_change> & changes, llama_mux & mux,
                           mux_by_name & by_name) {
    if (cur) {
        for (const auto & [name, m] : cur->modules) {
            const llama_mux_group & grp = cur->groups[m.group];
            for (int32_t sub = 0; sub < grp.n_sub; ++sub) {
                const int32_t id = grp.members[sub];
                if (id >= 0 && !mux_changed(changes, id)) {
                    mux_src src;
                    src.id = id, src.r = m.rank[sub], src.f32 = m.a->type == GGML_TYPE_F32, src.old = &m, src.old_sub = sub;
                    by_name[name].push_back(src);
                }
            }
        }
        for (const auto & em : cur->embd) {
            if (!mux_changed(changes, em.pool_id)) {
                mux.embd.push_back(em);
            }
        }
    }
    for (const auto & [id, adapter] : changes) {
        if (!adapter) {
            continue; // a cleared slot
        }
        for (auto & [name, lw] : adapter->ab_map) {
            const int32_t rc = mux_check_weight(model, id, name, lw);
            if (rc != LORAMUX_OK) {
                return rc;
            }
            if (mux_ends_with(name, "token_embd.weight")) {
                mux.embd.push_back({ id, lw.a, lw.b, lw.get_scale(adapter->alpha, 1.0f) });
                continue;
            }
            mux_src src;
            src.id = id, src.r = lw.b->ne[0], src.f32 = lw.a->type == GGML_TYPE_F32, src.lw = &lw;
            src.scale = lw.get_scale(adapter->alpha, 1.0f);
            by_name[name].push_back(src);
        }
    }
    for (auto & [name, srcs] : by_name) {
        std::sort(srcs.begin(), srcs.end(), [](const mux_src & a, const mux_src & b) { return a.id < b.id; });
    }
    std::sort(mux.embd.begin(), mux.embd.end(), [](const llama_mux_embd & a, const llama_mux_embd & b) { return a.pool_id < b.pool_id; });
    return LORAMUX_OK;
}

// free slices a group of n adapters keeps for in-place loads (pools made by loramux_init_pool,
// host buffers only: the device form's routing has no way to skip a free slice)
static int32_t mux_spare(int32_t n) {
    return std::max(1, (n + 3) / 4);
}

// the group of pool adapters `members` (created on first use), with `spare` free slices after them
static int32_t mux_group_of(llama_mux & mux, std::map<std::vector<int32_t>, int32_t> & group_of, const std::vector<int32_t> & members,
                            int32_t spare) {
    auto it = group_of.find(members);
    if (it != group_of.end()) {
        return it->second;
    }
    const int32_t group = (int32_t) mux.groups.size();
    group_of[members] = group;
    llama_mux_group gr;
    gr.sub_of.assign(mux.n_adapters, -1);
    for (size_t s = 0; s < members.size(); ++s) {
        gr.sub_of[members[s]] = (int32_t) s;
    }
    gr.members = members;
    gr.members.resize(members.size() + spare, -1);
    gr.n_sub     = (int32_t) gr.members.size();
    gr.n_members = (int32_t) members.size();
    mux.groups.push_back(std::move(gr));
    return group;
}

static int32_t mux_plan_stacks(llama_mux & mux, const mux_by_name & by_name, std::vector<mux_plan> & plans) {
    // spare slices only where every weight of a group sits in a host buffer and takes the fused op
    std::map<std::vector<int32_t>, bool> all_host;
    for (const auto & [name, srcs] : by_name) {
        std::vector<int32_t> members;
        for (const auto & s : srcs) {
            members.push_back(s.id);
        }
        const ggml_tensor * a0 = srcs[0].lw ? srcs[0].lw->a : srcs[0].old->a;
        const bool host = a0->buffer && ggml_backend_buft_is_host(ggml_backend_buffer_get_type(a0->buffer)) && !mux.force_mul_mat_id;
        auto it = all_host.emplace(members, host).first;
        it->second = it->second && host;
    }
    std::map<std::vector<int32_t>, int32_t> group_of;
    for (const auto & [name, srcs] : by_name) {
        std::vector<int32_t> members;
        int64_t r_max = 0;
        bool all_f32 = true;
        for (const auto & s : srcs) {
            members.push_back(s.id);
            r_max = std::max<int64_t>(r_max, s.r);
            all_f32 = all_f32 && s.f32;
        }
        const mux_src & s0 = srcs[0];
        const ggml_tensor * a0 = s0.lw ? s0.lw->a : s0.old->a;
        const int64_t n_out = s0.lw ? s0.lw->b->ne[1] : (s0.old->cpu ? s0.old->b->ne[0] : s0.old->b->ne[1]);
        ggml_backend_buffer_type_t buft = a0->buffer ? ggml_backend_buffer_get_type(a0->buffer) : nullptr;
        if (!buft) {
            return mux_fail(LORAMUX_ERR_INCOMPATIBLE_ADAPTER, mux_tensor_label(s0.id, name) + ": its lora_a has no backend buffer");
        }
        const int32_t spare = mux.spare_slices && all_host.at(members) ? mux_spare((int32_t) members.size()) : 0;
        const int32_t group = mux_group_of(mux, group_of, members, spare);
        plans.push_back({ name, group, a0->ne[0], n_out, r_max, all_f32 ? GGML_TYPE_F32 : GGML_TYPE_F16, buft });
    }
    return LORAMUX_OK;
}

static int32_t mux_alloc_stacks(llama_mux & mux, const std::vector<mux_plan> & plans) {
    const bool force_id = mux.force_mul_mat_id;
    std::map<ggml_backend_buffer_type_t, ggml_context *> ctx_of;
    for (const auto & p : plans) {
        if (ctx_of.find(p.buft) == ctx_of.end()) {
            ggml_init_params params = { /*.mem_size =*/ 4 * plans.size() * ggml_tensor_overhead(), /*.mem_buffer =*/ nullptr, /*.no_alloc =*/ true };
            ggml_context * c = ggml_init(params);
            if (!c) {
                return mux_fail(LORAMUX_ERR_ALLOC, "could not create a ggml context for the stacked tensors");
            }
            ctx_of[p.buft] = c;
            mux.ctxs.emplace_back(c);
        }
        ggml_context * c = ctx_of[p.buft];
        const int64_t n_slices = mux.groups[p.group].n_sub + 1; // the last slice is all zeros
        llama_mux_module m;
        m.group = p.group;
        m.index = (int32_t) mux.module_names.size();
        m.cpu   = ggml_backend_buft_is_host(p.buft) && !force_id;
        m.n_in  = p.n_in;
        m.r_max = p.r_max;
        m.rank.assign(mux.groups[p.group].n_sub, 0);
        m.mux   = &mux;
        m.a = ggml_new_tensor_3d(c, p.type_a, p.n_in, p.r_max, n_slices);
        // the fused op's B is stored like A (f16 unless every source is f32): half the memory of
        // the stacks' largest part; the device form keeps f32 for ggml_mul_mat_id
        m.b = m.cpu ? ggml_new_tensor_3d(c, p.type_a, p.n_out, p.r_max, n_slices)
                    : ggml_new_tensor_3d(c, GGML_TYPE_F32, p.r_max, p.n_out, n_slices);
        ggml_format_name(m.a, "mux.%s.a", p.name.c_str());
        ggml_format_name(m.b, "mux.%s.b", p.name.c_str());
        if (!m.cpu) { // the device form's gating inputs (the fused op reads the host copies)
            const int64_t n_sub = mux.groups[p.group].n_sub;
            m.proto_t = ggml_new_tensor_2d(c, GGML_TYPE_F32, p.n_in, n_sub);
            m.basis_t = ggml_new_tensor_2d(c, GGML_TYPE_F32, p.n_in, p.r_max * n_sub);
            ggml_format_name(m.proto_t, "mux.%s.proto", p.name.c_str());
            ggml_format_name(m.basis_t, "mux.%s.basis", p.name.c_str());
        }
        mux.module_names.push_back(p.name);
        mux.modules[p.name] = std::move(m);
    }
    for (auto & [buft, c] : ctx_of) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(c, buft);
        if (!buf) {
            return mux_fail(LORAMUX_ERR_ALLOC, std::string("could not allocate the stacked tensors in a ") + ggml_backend_buft_name(buft) + " buffer");
        }
        ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        mux.bufs.emplace_back(buf);
    }
    return LORAMUX_OK;
}

// one stacked tensor's bytes on the host, in the tensor's own type (f16 or f32): the tensor's own
// memory when its buffer is a host buffer, else a staging copy (uploaded by flush())
struct mux_staging {
    ggml_tensor * t;
    ggml_type type;
    std::vector<uint8_t> copy_;
    uint8_t * data;

    // `read`: start from the tensor's bytes (else zeros)
    mux_staging(ggml_tensor * t, bool read) : t(t), type(t->type) {
        if (t->buffer && ggml_backend_buffer_is_host(t->buffer)) {
            data = (uint8_t *) t->data;
            if (!read) {
                memset(data, 0, ggml_nbytes(t));
            }
            return;
        }
        copy_.assign(ggml_nbytes(t), 0);
        data = copy_.data();
        if (read) {
            ggml_backend_tensor_get(t, data, 0, copy_.size());
        }
    }

    void flush() {
        if (!copy_.empty()) {
            ggml_backend_tensor_set(t, copy_.data(), 0, copy_.size());
        }
    }

    // n elements from f32 at element offset `at`
    void put(size_t at, const float * src, int64_t n) {
        if (type == GGML_TYPE_F32) {
            memcpy(data + at * sizeof(float), src, (size_t) n * sizeof(float));
        } else {
            ggml_fp32_to_fp16_row(src, (ggml_fp16_t *) data + at, n);
        }
    }

    // n elements from another staging's element offset `from` (converted when the types differ)
    void copy(size_t at, const mux_staging & src, size_t from, int64_t n, std::vector<float> & tmp) {
        const size_t es = ggml_type_size(type);
        if (src.type == type) {
            memcpy(data + at * es, src.data + from * es, (size_t) n * es);
            return;
        }
        tmp.resize(n);
        if (src.type == GGML_TYPE_F32) {
            memcpy(tmp.data(), src.data + from * sizeof(float), (size_t) n * sizeof(float));
        } else {
            ggml_fp16_to_fp32_row((const ggml_fp16_t *) src.data + from, tmp.data(), n);
        }
        put(at, tmp.data(), n);
    }
};

// the current pool's stacks of one weight, read back from their buffers once
struct mux_old_stacks {
    const llama_mux_module * m = nullptr;
    std::unique_ptr<mux_staging> a, b;
    std::vector<float> basis;

    void read(const llama_mux_module * old) {
        if (m == old) {
            return;
        }
        m = old;
        a = std::make_unique<mux_staging>(old->a, true);
        b = std::make_unique<mux_staging>(old->b, true);
        if (old->basis_t) {
            basis.resize(ggml_nelements(old->basis_t));
            ggml_backend_tensor_get(old->basis_t, basis.data(), 0, ggml_nbytes(old->basis_t));
        }
    }
};

// a kept slot: its A, B, prototype, gate, LoGo and basis rows copied from the current pool (ranks re-padded)
static void mux_copy_slot(llama_mux_module & m, const mux_src & s, int64_t sub, int64_t n_out, mux_staging & a, mux_staging & b,
                          mux_old_stacks & old, std::vector<float> & tmp) {
    const llama_mux_module & o = *s.old;
    old.read(&o);
    const int64_t n_in = m.n_in, R = m.r_max, oR = o.r_max, os = s.old_sub;
    for (int64_t j = 0; j < s.r; ++j) {
        a.copy((size_t) (sub * R + j) * n_in, *old.a, (size_t) (os * oR + j) * n_in, n_in, tmp);
        if (m.cpu) { // [n_out, r_max, n_sub]: one row of n_out per rank index
            b.copy((size_t) (sub * R + j) * n_out, *old.b, (size_t) (os * oR + j) * n_out, n_out, tmp);
        }
    }
    if (!m.cpu) { // [r_max, n_out, n_sub] f32: r values per output
        for (int64_t out = 0; out < n_out; ++out) {
            b.copy((size_t) (sub * n_out + out) * R, *old.b, (size_t) (os * n_out + out) * oR, s.r, tmp);
        }
        for (int64_t i = 0; i < s.r; ++i) {
            std::copy_n(old.basis.data() + (size_t) (os * oR + i) * n_in, n_in, m.basis.data() + (size_t) (sub * R + i) * n_in);
        }
    }
    std::copy_n(o.proto.data() + (size_t) os * n_in, n_in, m.proto.data() + (size_t) sub * n_in);
    for (int64_t i = 0; i < s.r; ++i) {
        std::copy_n(o.gate_m.data() + (size_t) (os * oR + i) * oR, s.r, m.gate_m.data() + (size_t) (sub * R + i) * R);
        std::copy_n(o.logo_g.data() + (size_t) (os * oR + i) * oR, s.r, m.logo_g.data() + (size_t) (sub * R + i) * R);
    }
    std::copy_n(o.logo_inv_c.data() + (size_t) os * LLAMA_MUX_LOGO_N_CAL, LLAMA_MUX_LOGO_N_CAL,
                m.logo_inv_c.data() + (size_t) sub * LLAMA_MUX_LOGO_N_CAL);
}

// a new slot: its A and alpha/r-scaled B read from the adapter, its routing data prepared
static int32_t mux_read_slot(llama_mux_module & m, const mux_src & s, const std::string & name, int64_t n_sub, int64_t sub, int64_t n_out,
                             mux_staging & a_st, mux_staging & b_st) {
    std::vector<float> a, b; // a [n_in, r], b [r, n_out]
    if (!mux_tensor_to_f32(s.lw->a, a) || !mux_tensor_to_f32(s.lw->b, b)) {
        return mux_fail(LORAMUX_ERR_INCOMPATIBLE_ADAPTER, mux_tensor_label(s.id, name) + ": cannot be read as float");
    }
    const int64_t r = s.r, R = m.r_max;
    a_st.put((size_t) sub * m.n_in * R, a.data(), (int64_t) a.size());
    std::vector<float> b_scaled(b.size());
    std::vector<float> row((size_t) std::max(n_out, r));
    for (int64_t i = 0; i < (int64_t) b.size(); ++i) {
        b_scaled[i] = b[i] * s.scale;
    }
    if (m.cpu) { // transposed: [n_out, r_max] per slice
        for (int64_t j = 0; j < r; ++j) {
            for (int64_t o = 0; o < n_out; ++o) {
                row[o] = b_scaled[o * r + j];
            }
            b_st.put((size_t) (sub * R + j) * n_out, row.data(), n_out);
        }
    } else {
        for (int64_t o = 0; o < n_out; ++o) {
            b_st.put((size_t) (sub * n_out + o) * R, b_scaled.data() + o * r, r);
        }
    }
    if (!llama_mux_route_prepare(m, n_sub, sub, a, b_scaled, r, n_out)) {
        return mux_fail(LORAMUX_ERR_INTERNAL, mux_tensor_label(s.id, name) + ": the eigen-decomposition for its routing prototypes did not converge");
    }
    return LORAMUX_OK;
}

// zero padding beyond each adapter's rank and in the last slice (empty slots select it)
static int32_t mux_fill_stack(llama_mux & mux, const mux_plan & p, const std::vector<mux_src> & srcs) {
    llama_mux_module & m = mux.modules.at(p.name);
    const int64_t n_sub = mux.groups[p.group].n_sub;
    m.proto.assign((size_t) n_sub * p.n_in, 0.0f);
    m.gate_m.assign((size_t) n_sub * p.r_max * p.r_max, 0.0f);
    m.logo_g.assign((size_t) n_sub * p.r_max * p.r_max, 0.0f);
    m.logo_inv_c.assign((size_t) n_sub * LLAMA_MUX_LOGO_N_CAL, 0.0f);
    if (!m.cpu) {
        m.basis.assign((size_t) n_sub * p.r_max * p.n_in, 0.0f);
    }
    mux_staging a(m.a, false), b(m.b, false);
    mux_old_stacks old;
    std::vector<float> tmp;
    for (int64_t sub = 0; sub < (int64_t) srcs.size(); ++sub) { // members first; free slices stay zero
        const mux_src & s = srcs[sub];
        m.rank[sub] = (int32_t) s.r;
        if (s.old) {
            mux_copy_slot(m, s, sub, p.n_out, a, b, old, tmp);
        } else {
            const int32_t rc = mux_read_slot(m, s, p.name, n_sub, sub, p.n_out, a, b);
            if (rc != LORAMUX_OK) {
                return rc;
            }
        }
    }
    a.flush();
    b.flush();
    if (m.proto_t) {
        ggml_backend_tensor_set(m.proto_t, m.proto.data(), 0, ggml_nbytes(m.proto_t));
        ggml_backend_tensor_set(m.basis_t, m.basis.data(), 0, ggml_nbytes(m.basis_t));
        std::vector<float>().swap(m.basis); // only the device copy is used (and read back by the next change)
    }
    return LORAMUX_OK;
}

// why the pool cannot route with LoGo (the device form does not implement it), or empty
static std::string mux_no_logo(const llama_mux & mux) {
    if (mux.force_mul_mat_id) {
        return "the pool was registered with LORAMUX_REGISTER_MUL_MAT_ID (the device form, ggml_mul_mat_id), which does not implement LoGo";
    }
    for (const auto & name : mux.module_names) {
        if (!mux.modules.at(name).cpu) {
            return "weight '" + name + "' uses the device form (ggml_mul_mat_id), which does not implement LoGo";
        }
    }
    return "";
}

// the next pool: the current one (or none) with `changes` applied; set on ctx only when complete
static int32_t mux_rebuild(llama_context * ctx, const llama_mux * cur, int32_t k, int32_t flags, bool spare, const std::vector<mux_change> & changes) {
    const llama_model * model = &ctx->get_model();
    int32_t rc = mux_check_changes(model, cur, changes);
    if (rc != LORAMUX_OK) {
        return rc;
    }
    auto mux = std::make_shared<llama_mux>();
    mux->k          = k;
    mux->n_seq_max  = ctx->n_seq_max();
    mux->force_mul_mat_id = (flags & LORAMUX_REGISTER_MUL_MAT_ID) != 0;
    mux->spare_slices = spare;
    mux->filled = cur ? cur->filled : std::vector<uint8_t>();
    for (const auto & c : changes) {
        if ((size_t) c.slot >= mux->filled.size()) {
            mux->filled.resize((size_t) c.slot + 1, 0);
        }
        mux->filled[c.slot] = c.adapter != nullptr;
    }
    while (!mux->filled.empty() && !mux->filled.back()) {
        mux->filled.pop_back(); // slot ids past the last filled one are free
    }
    mux->n_adapters = (int32_t) mux->filled.size();
    mux->n_rebuilt  = (cur ? cur->n_rebuilt : 0) + (changes.empty() ? 0 : 1);
    mux->n_in_place = cur ? cur->n_in_place : 0;
    if (cur) { // the sequences keep their mixes and routing (no changed slot is in a mix: checked)
        mux->seq_n = cur->seq_n, mux->seq_ids = cur->seq_ids, mux->seq_w = cur->seq_w;
        mux->seq_mode = cur->seq_mode, mux->seq_rk = cur->seq_rk, mux->seq_inv_t = cur->seq_inv_t;
        mux->record.on = cur->record.on;
    } else {
        mux->seq_n.assign(mux->n_seq_max, 0);
        mux->seq_ids.assign((size_t) mux->n_seq_max * mux->k, 0);
        mux->seq_w.assign((size_t) mux->n_seq_max * mux->k, 0.0f);
        mux->seq_mode.assign(mux->n_seq_max, LLAMA_MUX_FIXED);
        mux->seq_rk.assign(mux->n_seq_max, 0);
        mux->seq_inv_t.assign(mux->n_seq_max, 0.0f);
    }

    mux_by_name by_name;
    std::vector<mux_plan> plans;
    if ((rc = mux_collect(model, cur, changes, *mux, by_name)) != LORAMUX_OK ||
        (rc = mux_plan_stacks(*mux, by_name, plans)) != LORAMUX_OK ||
        (rc = mux_alloc_stacks(*mux, plans)) != LORAMUX_OK) {
        return rc;
    }
    const std::string no_logo = mux_no_logo(*mux); // a LoGo sequence keeps its routing only on the fused op
    for (size_t seq = 0; seq < mux->seq_mode.size() && !no_logo.empty(); ++seq) {
        if (llama_mux_is_logo(mux->seq_mode[seq])) {
            return mux_fail(LORAMUX_ERR_BAD_ARG, "sequence " + std::to_string(seq) + " routes with LoGo, and in the changed pool " + no_logo +
                                                     ": end its routing first");
        }
    }
    for (const auto & p : plans) {
        if ((rc = mux_fill_stack(*mux, p, by_name.at(p.name))) != LORAMUX_OK) {
            return rc;
        }
    }
    size_t bytes = 0;
    for (auto & buf : mux->bufs) {
        bytes += ggml_backend_buffer_get_size(buf.get());
    }
    LLAMA_LOG_INFO("%s: loramux pool of %d slots, max %d active per sequence: %zu modules in %zu groups, %zu embedding LoRAs, %.2f MiB\n",
            __func__, mux->n_adapters, mux->k, mux->modules.size(), mux->groups.size(), mux->embd.size(), bytes / 1024.0 / 1024.0);
    ctx->set_mux(std::move(mux)); // only a complete pool replaces the current one
    return LORAMUX_OK;
}

//
// in place: one slot filled into a free slice of every stack it needs, or one slot cleared (host
// buffers of a pool made with loramux_init_pool): only that adapter's rows are written
//

static constexpr int32_t MUX_NOT_IN_PLACE = 1; // the change needs a rebuild

// one weight of the adapter going in: its rows, staged in the stacks' types, and its routing data
struct mux_slot_rows {
    llama_mux_module * m = nullptr;
    int32_t sub = -1; // the free slice of m's group it goes into
    int64_t r = 0;
    std::vector<uint8_t> a, b; // [r_max rows][n_in] and [r_max rows][n_out] (zero beyond r)
    std::vector<float> proto, gate_m, logo_g, logo_inv_c;
};

// f32 values as bytes of type t (f16 or f32)
static std::vector<uint8_t> mux_bytes_of(ggml_type t, const std::vector<float> & v) {
    std::vector<uint8_t> out(v.size() * ggml_type_size(t));
    if (t == GGML_TYPE_F32) {
        memcpy(out.data(), v.data(), out.size());
    } else {
        ggml_fp32_to_fp16_row(v.data(), (ggml_fp16_t *) out.data(), (int64_t) v.size());
    }
    return out;
}

// whether module m takes an adapter weight of rank r and A type t in place, and which free slice
static int32_t mux_free_slice(const llama_mux & mux, const llama_mux_module & m, int64_t r, ggml_type t) {
    const llama_mux_group & grp = mux.groups[m.group];
    if (!m.cpu || r > m.r_max || (m.a->type == GGML_TYPE_F32 && t != GGML_TYPE_F32)) {
        return -1;
    }
    for (int32_t sub = 0; sub < grp.n_sub; ++sub) {
        if (grp.members[sub] < 0) {
            return sub;
        }
    }
    return -1;
}

// read, scale and prepare one weight of the adapter going in, as rows of m's stacks
static int32_t mux_stage_rows(llama_mux_module & m, int32_t id, const std::string & name, const llama_adapter_lora_weight & lw, float scale,
                              mux_slot_rows & rows) {
    std::vector<float> a, b;
    if (!mux_tensor_to_f32(lw.a, a) || !mux_tensor_to_f32(lw.b, b)) {
        return mux_fail(LORAMUX_ERR_INCOMPATIBLE_ADAPTER, mux_tensor_label(id, name) + ": cannot be read as float");
    }
    const int64_t r = lw.b->ne[0], R = m.r_max, n_in = m.n_in, n_out = m.b->ne[0];
    std::vector<float> b_scaled(b.size()), bt((size_t) R * n_out, 0.0f), at((size_t) R * n_in, 0.0f);
    for (size_t i = 0; i < b.size(); ++i) {
        b_scaled[i] = b[i] * scale;
    }
    for (int64_t j = 0; j < r; ++j) {
        std::copy_n(a.data() + j * n_in, n_in, at.data() + j * n_in);
        for (int64_t o = 0; o < n_out; ++o) {
            bt[(size_t) j * n_out + o] = b_scaled[o * r + j];
        }
    }
    llama_mux_module one; // the routing data of this adapter alone (one slice)
    one.n_in = n_in, one.r_max = R, one.cpu = true;
    one.proto.assign((size_t) n_in, 0.0f);
    one.gate_m.assign((size_t) R * R, 0.0f);
    one.logo_g.assign((size_t) R * R, 0.0f);
    one.logo_inv_c.assign((size_t) LLAMA_MUX_LOGO_N_CAL, 0.0f);
    if (!llama_mux_route_prepare(one, 1, 0, a, b_scaled, r, n_out)) {
        return mux_fail(LORAMUX_ERR_INTERNAL, mux_tensor_label(id, name) + ": the eigen-decomposition for its routing prototypes did not converge");
    }
    rows.m = &m, rows.r = r, rows.a = mux_bytes_of(m.a->type, at), rows.b = mux_bytes_of(m.b->type, bt);
    rows.proto = std::move(one.proto), rows.gate_m = std::move(one.gate_m);
    rows.logo_g = std::move(one.logo_g), rows.logo_inv_c = std::move(one.logo_inv_c);
    return LORAMUX_OK;
}

// the groups of the modules the adapter goes into, with it in each one's free slice (a group splits
// when the adapter adapts only some of its weights); returns the new group of each old group
static std::map<int32_t, int32_t> mux_groups_with(llama_mux & mux, const std::vector<mux_slot_rows> & staged, int32_t id) {
    std::map<int32_t, int32_t> moved;
    for (const auto & rows : staged) {
        const int32_t g = rows.m->group;
        if (moved.count(g)) {
            continue;
        }
        llama_mux_group gr = mux.groups[g];
        gr.sub_of[id] = rows.sub;
        gr.members[rows.sub] = id;
        gr.n_members += 1;
        moved[g] = (int32_t) mux.groups.size();
        mux.groups.push_back(std::move(gr));
    }
    return moved;
}

static int32_t mux_fill_in_place(llama_context * ctx, llama_mux & mux, int32_t id, llama_adapter_lora * adapter) {
    if ((size_t) id < mux.filled.size() && mux.filled[id]) {
        return MUX_NOT_IN_PLACE; // replacing an adapter: rebuild
    }
    std::vector<mux_slot_rows> staged;
    std::vector<llama_mux_embd> embd;
    for (auto & [name, lw] : adapter->ab_map) {
        int32_t rc = mux_check_weight(&ctx->get_model(), id, name, lw);
        if (rc != LORAMUX_OK) {
            return rc;
        }
        if (mux_ends_with(name, "token_embd.weight")) {
            embd.push_back({ id, lw.a, lw.b, lw.get_scale(adapter->alpha, 1.0f) });
            continue;
        }
        auto it = mux.modules.find(name);
        const int32_t free = it == mux.modules.end() ? -1 : mux_free_slice(mux, it->second, lw.b->ne[0], lw.a->type);
        if (free < 0) {
            return MUX_NOT_IN_PLACE; // a weight new to the pool, a larger rank, an f32 stack, or no free slice
        }
        staged.emplace_back();
        staged.back().sub = free;
        if ((rc = mux_stage_rows(it->second, id, name, lw, lw.get_scale(adapter->alpha, 1.0f), staged.back())) != LORAMUX_OK) {
            return rc;
        }
    }
    // commit: nothing above changed the pool
    if ((size_t) id >= mux.filled.size()) {
        mux.filled.resize((size_t) id + 1, 0);
        mux.n_adapters = (int32_t) mux.filled.size();
        for (auto & gr : mux.groups) {
            gr.sub_of.resize(mux.filled.size(), -1);
        }
    }
    mux.filled[id] = 1;
    const std::map<int32_t, int32_t> moved = mux_groups_with(mux, staged, id);
    for (auto & rows : staged) {
        llama_mux_module & m = *rows.m;
        const int64_t R = m.r_max, n_in = m.n_in, sub = rows.sub;
        ggml_backend_tensor_set(m.a, rows.a.data(), (size_t) sub * rows.a.size(), rows.a.size());
        ggml_backend_tensor_set(m.b, rows.b.data(), (size_t) sub * rows.b.size(), rows.b.size());
        std::copy(rows.proto.begin(), rows.proto.end(), m.proto.begin() + (size_t) sub * n_in);
        std::copy(rows.gate_m.begin(), rows.gate_m.end(), m.gate_m.begin() + (size_t) sub * R * R);
        std::copy(rows.logo_g.begin(), rows.logo_g.end(), m.logo_g.begin() + (size_t) sub * R * R);
        std::copy(rows.logo_inv_c.begin(), rows.logo_inv_c.end(), m.logo_inv_c.begin() + (size_t) sub * LLAMA_MUX_LOGO_N_CAL);
        m.rank[sub] = (int32_t) rows.r;
        m.group = moved.at(m.group);
    }
    mux.embd.insert(mux.embd.end(), embd.begin(), embd.end());
    std::sort(mux.embd.begin(), mux.embd.end(), [](const llama_mux_embd & a, const llama_mux_embd & b) { return a.pool_id < b.pool_id; });
    return LORAMUX_OK;
}

static int32_t mux_clear_in_place(llama_mux & mux, int32_t id) {
    for (const auto & [name, m] : mux.modules) {
        const llama_mux_group & gr = mux.groups[m.group];
        if ((size_t) id < gr.sub_of.size() && gr.sub_of[id] >= 0 && !m.cpu) {
            return MUX_NOT_IN_PLACE; // the device form's routing cannot skip a free slice
        }
    }
    for (auto & gr : mux.groups) {
        if ((size_t) id < gr.sub_of.size() && gr.sub_of[id] >= 0) {
            gr.members[gr.sub_of[id]] = -1; // a free slice: routing skips it, the next fill writes it whole
            gr.sub_of[id] = -1;
            gr.n_members -= 1;
        }
    }
    mux.embd.erase(std::remove_if(mux.embd.begin(), mux.embd.end(), [id](const llama_mux_embd & e) { return e.pool_id == id; }), mux.embd.end());
    if ((size_t) id < mux.filled.size()) {
        mux.filled[id] = 0;
    }
    return LORAMUX_OK;
}

// one slot changed in place when the pool allows it: OK, MUX_NOT_IN_PLACE, or a failure (nothing changed)
static int32_t mux_change_in_place(llama_context * ctx, llama_mux & mux, const mux_change & change) {
    if (!mux.spare_slices || mux.force_mul_mat_id) {
        return MUX_NOT_IN_PLACE;
    }
    const int32_t rc = change.adapter ? mux_fill_in_place(ctx, mux, change.slot, change.adapter) : mux_clear_in_place(mux, change.slot);
    if (rc == LORAMUX_OK) {
        mux.n_in_place += 1;
        ctx->set_mux(ctx->mux); // the graphs change shape (groups, inputs): reserve once at the next decode
    }
    return rc;
}

static int32_t mux_check_pool_args(llama_context * ctx, int32_t max_active, int32_t flags, const char * fn) {
    if (!ctx) {
        return mux_fail(LORAMUX_ERR_NULL_ARG, std::string(fn) + ": ctx is NULL");
    }
    if (max_active < 1) {
        return mux_fail(LORAMUX_ERR_BAD_ARG, std::string(fn) + ": max_active must be >= 1");
    }
    if (flags & ~LORAMUX_REGISTER_MUL_MAT_ID) {
        return mux_fail(LORAMUX_ERR_BAD_ARG, std::string(fn) + ": unknown flags " + std::to_string(flags));
    }
    return LORAMUX_OK;
}

static int32_t mux_register(llama_context * ctx, llama_adapter_lora ** adapters, int32_t n_adapters, int32_t max_active, int32_t flags) {
    int32_t rc = mux_check_pool_args(ctx, max_active, flags, "loramux_register_adapters");
    if (rc != LORAMUX_OK) {
        return rc;
    }
    if (!adapters || n_adapters < 1) {
        return mux_fail(adapters ? LORAMUX_ERR_BAD_ARG : LORAMUX_ERR_NULL_ARG, "loramux_register_adapters: needs n_adapters >= 1 adapters");
    }
    std::vector<mux_change> changes;
    for (int32_t i = 0; i < n_adapters; ++i) {
        if (!adapters[i]) {
            return mux_fail(LORAMUX_ERR_NULL_ARG, mux_adapter_label(i) + " is NULL");
        }
        changes.push_back({ i, adapters[i] });
    }
    return mux_rebuild(ctx, nullptr, std::min(max_active, n_adapters), flags, false, changes);
}

static int32_t mux_set_slots(llama_context * ctx, int32_t n, const int32_t * slots, llama_adapter_lora ** adapters) {
    if (!ctx || (n > 0 && (!slots || !adapters))) {
        return mux_fail(LORAMUX_ERR_NULL_ARG, "loramux_set_slots: ctx, slots or adapters is NULL");
    }
    const llama_mux * cur = mux_of_ctx(ctx);
    if (!cur) {
        return mux_fail(LORAMUX_ERR_NOT_REGISTERED, "loramux_set_slots: no pool on this context (loramux_init_pool first)");
    }
    if (n < 1) {
        return mux_fail(LORAMUX_ERR_BAD_ARG, "loramux_set_slots: n must be >= 1");
    }
    std::vector<mux_change> changes;
    for (int32_t i = 0; i < n; ++i) {
        changes.push_back({ slots[i], adapters[i] });
    }
    if (n == 1) { // one adapter in or out: in place when the pool has room for it
        int32_t rc = mux_check_changes(&ctx->get_model(), cur, changes);
        if (rc == LORAMUX_OK) {
            rc = mux_change_in_place(ctx, *mux_of_ctx(ctx), changes[0]);
        }
        if (rc != MUX_NOT_IN_PLACE) {
            return rc;
        }
    }
    return mux_rebuild(ctx, cur, cur->k, cur->force_mul_mat_id ? LORAMUX_REGISTER_MUL_MAT_ID : 0, cur->spare_slices, changes);
}

//
// C API
//

int32_t loramux_api_version(void) {
    return LORAMUX_API_VERSION;
}

const char * loramux_strerror(int32_t status) {
    switch (status) {
        case LORAMUX_OK:                       return "ok";
        case LORAMUX_ERR_NULL_ARG:             return "a required pointer is NULL";
        case LORAMUX_ERR_NOT_REGISTERED:       return "no adapter pool is registered on this context";
        case LORAMUX_ERR_BAD_SEQ_ID:           return "sequence id out of range [0, n_seq_max)";
        case LORAMUX_ERR_BAD_ADAPTER_ID:       return "adapter id out of range [0, n_adapters)";
        case LORAMUX_ERR_BAD_WEIGHT:           return "weight is NaN or infinite";
        case LORAMUX_ERR_TOO_MANY_ACTIVE:      return "more non-zero weights than max_active";
        case LORAMUX_ERR_DUPLICATE_ADAPTER:    return "the same adapter appears twice";
        case LORAMUX_ERR_BAD_ARG:              return "count out of range";
        case LORAMUX_ERR_INCOMPATIBLE_ADAPTER: return "an adapter cannot be applied to this model";
        case LORAMUX_ERR_ALLOC:                return "could not allocate memory";
        case LORAMUX_ERR_INTERNAL:             return "internal error";
        case LORAMUX_ERR_UNAPPLIED:            return "a registered adapter weight could not be applied in the graph";
        default:                               return "unknown loramux status";
    }
}

const char * loramux_last_error(void) {
    return mux_last_error.c_str();
}

int32_t loramux_register_adapters(llama_context * ctx, llama_adapter_lora ** adapters, int32_t n_adapters, int32_t max_active, int32_t flags) {
    return mux_guard(__func__, [&] { return mux_register(ctx, adapters, n_adapters, max_active, flags); });
}

int32_t loramux_init_pool(llama_context * ctx, int32_t max_active, int32_t flags) {
    return mux_guard(__func__, [&] {
        const int32_t rc = mux_check_pool_args(ctx, max_active, flags, "loramux_init_pool");
        return rc != LORAMUX_OK ? rc : mux_rebuild(ctx, nullptr, max_active, flags, true, {});
    });
}

int32_t loramux_set_slots(llama_context * ctx, int32_t n, const int32_t * slots, llama_adapter_lora ** adapters) {
    return mux_guard(__func__, [&] { return mux_set_slots(ctx, n, slots, adapters); });
}

int32_t loramux_unregister(llama_context * ctx) {
    return mux_guard(__func__, [&] {
        if (!ctx) {
            return mux_fail(LORAMUX_ERR_NULL_ARG, "loramux_unregister: ctx is NULL");
        }
        if (!ctx->mux) {
            return mux_fail(LORAMUX_ERR_NOT_REGISTERED, "loramux_unregister: no pool is registered on this context");
        }
        ctx->set_mux(nullptr);
        return (int32_t) LORAMUX_OK;
    });
}

int32_t loramux_n_adapters(const llama_context * ctx) {
    const llama_mux * mux = mux_of_ctx(ctx);
    return mux ? mux->n_adapters : 0;
}

int32_t loramux_max_active(const llama_context * ctx) {
    const llama_mux * mux = mux_of_ctx(ctx);
    return mux ? mux->k : 0;
}

int32_t loramux_pool_changes(const llama_context * ctx, int32_t * n_rebuilt, int32_t * n_in_place) {
    return mux_guard(__func__, [&] {
        const llama_mux * mux = mux_of_ctx(ctx);
        if (!ctx || !n_rebuilt || !n_in_place) {
            return mux_fail(LORAMUX_ERR_NULL_ARG, "loramux_pool_changes: ctx, n_rebuilt or n_in_place is NULL");
        }
        if (!mux) {
            return mux_fail(LORAMUX_ERR_NOT_REGISTERED, "loramux_pool_changes: no pool is registered on this context");
        }
        *n_rebuilt  = mux->n_rebuilt;
        *n_in_place = mux->n_in_place;
        return (int32_t) LORAMUX_OK;
    });
}

int32_t loramux_check_applied(const llama_context * ctx) {
    return mux_guard(__func__, [&] {
        const llama_mux * mux = mux_of_ctx(ctx);
        if (!mux) {
            return ctx ? (int32_t) LORAMUX_OK : mux_fail(LORAMUX_ERR_NULL_ARG, "loramux_check_applied: ctx is NULL");
        }
        std::lock_guard<std::mutex> lock(mux->unapplied_mutex);
        if (mux->unapplied.empty()) {
            return (int32_t) LORAMUX_OK;
        }
        mux_last_error = mux->unapplied + "; its adapters were left out of that decode";
        return (int32_t) LORAMUX_ERR_UNAPPLIED;
    });
}

static int32_t mux_check_seq(const llama_context * ctx, llama_seq_id seq_id, llama_mux ** out) {
    if (!ctx) {
        return mux_fail(LORAMUX_ERR_NULL_ARG, "ctx is NULL");
    }
    llama_mux * mux = mux_of_ctx(ctx);
    if (!mux) {
        return mux_fail(LORAMUX_ERR_NOT_REGISTERED, "no pool is registered on this context");
    }
    if (seq_id < 0 || (uint32_t) seq_id >= mux->n_seq_max) {
        return mux_fail(LORAMUX_ERR_BAD_SEQ_ID, "sequence " + std::to_string(seq_id) + " is outside [0, " + std::to_string(mux->n_seq_max) + ")");
    }
    *out = mux;
    return LORAMUX_OK;
}

// validate a mix before writing anything
static int32_t mux_check_mix(const llama_mux & mux, int32_t n, const int32_t * ids, const float * weights) {
    int32_t n_active = 0;
    for (int32_t j = 0; j < n; ++j) {
        if (ids[j] < 0 || ids[j] >= mux.n_adapters || !mux.filled[ids[j]]) {
            return mux_fail(LORAMUX_ERR_BAD_ADAPTER_ID, "adapter id " + std::to_string(ids[j]) + (ids[j] < 0 || ids[j] >= mux.n_adapters ?
                    " is outside [0, " + std::to_string(mux.n_adapters) + ")" : " is an empty slot"));
        }
        if (!std::isfinite(weights[j])) {
            return mux_fail(LORAMUX_ERR_BAD_WEIGHT, mux_adapter_label(ids[j]) + ": weight is NaN or infinite");
        }
        for (int32_t i = 0; i < j; ++i) {
            if (ids[i] == ids[j]) {
                return mux_fail(LORAMUX_ERR_DUPLICATE_ADAPTER, mux_adapter_label(ids[j]) + " appears twice in one mix");
            }
        }
        n_active += weights[j] != 0.0f;
    }
    if (n_active > mux.k) {
        return mux_fail(LORAMUX_ERR_TOO_MANY_ACTIVE, std::to_string(n_active) + " non-zero weights, max_active is " + std::to_string(mux.k));
    }
    return LORAMUX_OK;
}

static int32_t mux_set_mix(llama_context * ctx, llama_seq_id seq_id, int32_t n, const int32_t * ids, const float * weights) {
    llama_mux * mux = nullptr;
    int32_t rc = mux_check_seq(ctx, seq_id, &mux);
    if (rc != LORAMUX_OK) {
        return rc;
    }
    if (n < 0) {
        return mux_fail(LORAMUX_ERR_BAD_ARG, "n is negative");
    }
    if (n > 0 && (!ids || !weights)) {
        return mux_fail(LORAMUX_ERR_NULL_ARG, "ids or weights is NULL");
    }
    if ((rc = mux_check_mix(*mux, n, ids, weights)) != LORAMUX_OK) {
        return rc;
    }
    const size_t base = (size_t) seq_id * mux->k;
    int32_t slot = 0;
    for (int32_t j = 0; j < n; ++j) {
        if (weights[j] != 0.0f) {
            mux->seq_ids[base + slot] = ids[j];
            mux->seq_w  [base + slot] = weights[j];
            ++slot;
        }
    }
    for (int32_t j = slot; j < mux->k; ++j) {
        mux->seq_ids[base + j] = 0;
        mux->seq_w  [base + j] = 0.0f;
    }
    mux->seq_n[seq_id] = slot;
    mux->seq_mode[seq_id] = LLAMA_MUX_FIXED; // a fixed mix (or none) replaces per-token routing
    return LORAMUX_OK;
}

int32_t loramux_set_seq_mix(llama_context * ctx, llama_seq_id seq_id, int32_t n, const int32_t * ids, const float * weights) {
    return mux_guard(__func__, [&] { return mux_set_mix(ctx, seq_id, n, ids, weights); });
}

int32_t loramux_set_seq_weights(llama_context * ctx, llama_seq_id seq_id, const float * weights, int32_t n_weights) {
    return mux_guard(__func__, [&] {
        llama_mux * mux = nullptr;
        const int32_t rc = mux_check_seq(ctx, seq_id, &mux);
        if (rc != LORAMUX_OK) {
            return rc;
        }
        if (!weights) {
            return mux_fail(LORAMUX_ERR_NULL_ARG, "weights is NULL");
        }
        if (n_weights != mux->n_adapters) {
            return mux_fail(LORAMUX_ERR_BAD_ARG, std::to_string(n_weights) + " weights given, the pool has " + std::to_string(mux->n_adapters) + " adapters");
        }
        std::vector<int32_t> ids;
        std::vector<float> nonzero;
        for (int32_t i = 0; i < n_weights; ++i) {
            if (weights[i] != 0.0f || !std::isfinite(weights[i])) { // empty slots take weight 0
                ids.push_back(i);
                nonzero.push_back(weights[i]);
            }
        }
        return mux_set_mix(ctx, seq_id, (int32_t) ids.size(), ids.data(), nonzero.data());
    });
}

int32_t loramux_clear_seq_mix(llama_context * ctx, llama_seq_id seq_id) {
    return mux_guard(__func__, [&] { return mux_set_mix(ctx, seq_id, 0, nullptr, nullptr); });
}

int32_t loramux_get_seq_mix(const llama_context * ctx, llama_seq_id seq_id, int32_t capacity, int32_t * ids, float * weights) {
    return mux_guard(__func__, [&] {
        llama_mux * mux = nullptr;
        const int32_t rc = mux_check_seq(ctx, seq_id, &mux);
        if (rc != LORAMUX_OK) {
            return rc;
        }
        const int32_t n = mux->seq_n[seq_id];
        if (capacity < n) {
            return mux_fail(LORAMUX_ERR_BAD_ARG, "capacity " + std::to_string(capacity) + " is below the mix's " + std::to_string(n) + " entries");
        }
        if (n > 0 && (!ids || !weights)) {
            return mux_fail(LORAMUX_ERR_NULL_ARG, "ids or weights is NULL");
        }
        for (int32_t j = 0; j < n; ++j) {
            ids[j]     = mux->seq_ids[(size_t) seq_id * mux->k + j];
            weights[j] = mux->seq_w  [(size_t) seq_id * mux->k + j];
        }
        return n;
    });
}

//
// per-token routing and its record (the gating itself: llama-mux-route.cpp)
//

static constexpr bool mux_same(int32_t a, int32_t b) { return a == b; }
static_assert(mux_same(LLAMA_MUX_ARROW, LORAMUX_ROUTE_ARROW) && mux_same(LLAMA_MUX_SPECTR, LORAMUX_ROUTE_SPECTR) &&
                  mux_same(LLAMA_MUX_LOGO, LORAMUX_ROUTE_LOGO) && mux_same(LLAMA_MUX_LOGO_SPECTRAL, LORAMUX_ROUTE_LOGO_SPECTRAL) &&
                  mux_same(LLAMA_MUX_LOGO_FROBENIUS, LORAMUX_ROUTE_LOGO_FROBENIUS),
              "enum llama_mux_route follows enum loramux_route_mode");

static int32_t mux_set_routing(llama_context * ctx, llama_seq_id seq_id, int32_t mode, int32_t k, float temperature) {
    llama_mux * mux = nullptr;
    const int32_t rc = mux_check_seq(ctx, seq_id, &mux);
    if (rc != LORAMUX_OK) {
        return rc;
    }
    if (mode == LORAMUX_ROUTE_FIXED) {
        return mux_set_mix(ctx, seq_id, 0, nullptr, nullptr);
    }
    if (mode != LORAMUX_ROUTE_ARROW && mode != LORAMUX_ROUTE_SPECTR && !llama_mux_is_logo(mode)) {
        return mux_fail(LORAMUX_ERR_BAD_ARG, "routing mode " + std::to_string(mode) +
                                                 " is not LORAMUX_ROUTE_FIXED, _ARROW, _SPECTR, _LOGO, _LOGO_SPECTRAL or _LOGO_FROBENIUS");
    }
    if (llama_mux_is_logo(mode)) {
        const std::string why = mux_no_logo(*mux);
        if (!why.empty()) {
            return mux_fail(LORAMUX_ERR_BAD_ARG, "routing mode " + std::to_string(mode) + " (LoGo) for sequence " + std::to_string(seq_id) + ": " + why);
        }
    }
    if (k < 1 || k > mux->k) {
        return mux_fail(LORAMUX_ERR_BAD_ARG, "routing top-k " + std::to_string(k) + " is outside [1, max_active = " + std::to_string(mux->k) + "]");
    }
    if (mode == LORAMUX_ROUTE_ARROW && !(std::isfinite(temperature) && temperature > 0.0f)) {
        return mux_fail(LORAMUX_ERR_BAD_WEIGHT, "Arrow temperature " + std::to_string(temperature) + " is not a finite number > 0");
    }
    mux->seq_n[seq_id]     = 0; // no fixed mix: the fixed slots add 0 for this sequence
    mux->seq_mode[seq_id]  = mode;
    mux->seq_rk[seq_id]    = k;
    mux->seq_inv_t[seq_id] = mode == LORAMUX_ROUTE_ARROW ? 1.0f / temperature : 0.0f;
    return LORAMUX_OK;
}

int32_t loramux_set_seq_routing(llama_context * ctx, llama_seq_id seq_id, int32_t mode, int32_t k, float temperature) {
    return mux_guard(__func__, [&] { return mux_set_routing(ctx, seq_id, mode, k, temperature); });
}

int32_t loramux_get_seq_routing(const llama_context * ctx, llama_seq_id seq_id, int32_t * mode, int32_t * k, float * temperature) {
    return mux_guard(__func__, [&] {
        llama_mux * mux = nullptr;
        const int32_t rc = mux_check_seq(ctx, seq_id, &mux);
        if (rc != LORAMUX_OK) {
            return rc;
        }
        if (!mode || !k || !temperature) {
            return mux_fail(LORAMUX_ERR_NULL_ARG, "mode, k or temperature is NULL");
        }
        *mode = mux->seq_mode[seq_id];
        *k    = *mode == LORAMUX_ROUTE_FIXED ? 0 : mux->seq_rk[seq_id];
        *temperature = mux->seq_inv_t[seq_id] > 0.0f ? 1.0f / mux->seq_inv_t[seq_id] : 0.0f;
        return (int32_t) LORAMUX_OK;
    });
}

int32_t loramux_n_modules(const llama_context * ctx) {
    const llama_mux * mux = mux_of_ctx(ctx);
    return mux ? (int32_t) mux->module_names.size() : 0;
}

const char * loramux_module_name(const llama_context * ctx, int32_t i) {
    const llama_mux * mux = mux_of_ctx(ctx);
    if (!mux || i < 0 || (size_t) i >= mux->module_names.size()) {
        return nullptr;
    }
    return mux->module_names[i].c_str();
}

int32_t loramux_get_prototypes(const llama_context * ctx, const char * name, int32_t capacity, int32_t * ids, float * protos, int32_t * n_in) {
    return mux_guard(__func__, [&] {
        const llama_mux * mux = mux_of_ctx(ctx);
        if (!ctx || !name) {
            return mux_fail(LORAMUX_ERR_NULL_ARG, "loramux_get_prototypes: ctx or name is NULL");
        }
        if (!mux) {
            return mux_fail(LORAMUX_ERR_NOT_REGISTERED, "no pool is registered on this context");
        }
        const auto it = mux->modules.find(name);
        if (it == mux->modules.end()) {
            return mux_fail(LORAMUX_ERR_BAD_ARG, std::string("no adapter of the pool adapts weight '") + name + "'");
        }
        const llama_mux_module & m = it->second;
        const llama_mux_group & grp = mux->groups[m.group];
        if (n_in) {
            *n_in = (int32_t) m.n_in;
        }
        if ((int64_t) capacity < grp.n_members * m.n_in) {
            return (int32_t) grp.n_members;
        }
        if (!ids || !protos) {
            return mux_fail(LORAMUX_ERR_NULL_ARG, "ids or protos is NULL");
        }
        int32_t n = 0;
        for (int32_t sub = 0; sub < grp.n_sub; ++sub) { // free slices left out
            if (grp.members[sub] >= 0) {
                ids[n] = grp.members[sub];
                std::copy_n(m.proto.data() + (size_t) sub * m.n_in, m.n_in, protos + (size_t) n * m.n_in);
                ++n;
            }
        }
        return n;
    });
}

int32_t loramux_set_record(llama_context * ctx, int32_t on) {
    return mux_guard(__func__, [&] {
        llama_mux * mux = mux_of_ctx(ctx);
        if (!ctx) {
            return mux_fail(LORAMUX_ERR_NULL_ARG, "loramux_set_record: ctx is NULL");
        }
        if (!mux) {
            return mux_fail(LORAMUX_ERR_NOT_REGISTERED, "no pool is registered on this context");
        }
        for (const auto & [name, m] : mux->modules) {
            if (on && !m.cpu) {
                return mux_fail(LORAMUX_ERR_BAD_ARG, "weight '" + name + "' uses the device form (ggml_mul_mat_id), which does not record its choices");
            }
        }
        mux->record.segs.clear();
        mux->record.on = on != 0;
        return (int32_t) LORAMUX_OK;
    });
}

int32_t loramux_take_record(llama_context * ctx, int32_t capacity, int32_t * module, int32_t * seq_id, int32_t * pos, int32_t * ids, float * weights) {
    return mux_guard(__func__, [&] {
        llama_mux * mux = mux_of_ctx(ctx);
        if (!mux) {
            return ctx ? mux_fail(LORAMUX_ERR_NOT_REGISTERED, "no pool is registered on this context")
                       : mux_fail(LORAMUX_ERR_NULL_ARG, "loramux_take_record: ctx is NULL");
        }
        const size_t k = mux->k, n_mod = mux->module_names.size();
        int64_t n_rows = 0;
        for (const auto & seg : mux->record.segs) {
            for (size_t i = 0; i < seg.ids.size(); i += k) {
                n_rows += seg.ids[i] >= 0;
            }
        }
        if (n_rows > INT32_MAX || capacity < n_rows) {
            return (int32_t) std::min<int64_t>(n_rows, INT32_MAX);
        }
        if (n_rows > 0 && (!module || !seq_id || !pos || !ids || !weights)) {
            return mux_fail(LORAMUX_ERR_NULL_ARG, "an output array is NULL");
        }
        int64_t row = 0;
        for (const auto & seg : mux->record.segs) {
            const size_t n_tok = seg.seq.size();
            for (size_t md = 0; md < n_mod; ++md) {
                for (size_t t = 0; t < n_tok; ++t) {
                    const size_t base = (md * n_tok + t) * k;
                    if (seg.ids[base] < 0) {
                        continue;
                    }
                    module[row] = (int32_t) md;
                    seq_id[row] = seg.seq[t];
                    pos[row]    = seg.pos[t];
                    std::copy(seg.ids.begin() + base, seg.ids.begin() + base + k, ids + row * k);
                    std::copy(seg.w.begin() + base, seg.w.begin() + base + k, weights + row * k);
                    ++row;
                }
            }
        }
        mux->record.segs.clear();
        return (int32_t) row;
    });
}
