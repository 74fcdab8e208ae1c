// loramux.h - per-sequence LoRA adapter mixes for llama.cpp (built into the patched libllama).
//
// A pool of LoRA adapters is registered on a llama_context once. Each sequence id can then carry
// its own weighted mix of at most `max_active` pool adapters; tokens of that sequence are decoded
// with  y = W x + sum_a w_a * (alpha_a / r_a) * B_a (A_a x)  (the same sum llama_set_adapters_lora
// computes for a whole context), while tokens of other sequences use their own mixes, all in one
// llama_decode. Setting a mix only writes a small host table: it neither rebuilds the scheduler
// nor prevents graph reuse. Sequences without a mix run the base model (plus any adapters set
// with the stock llama_set_adapters_lora, which still applies to the whole context).
//
// Per token, the cost depends on max_active, not on the size of the pool: the pool's A and B
// matrices are stacked per base weight and selected with ggml_mul_mat_id (top-k form).
//
// Every function returns an int32_t status: LORAMUX_OK (0) or a negative LORAMUX_ERR_* code
// (loramux_strerror names it; loramux_last_error says which adapter, tensor or argument and why).
// No exception or assertion leaves these functions, and a failing call changes nothing. Functions are not thread-safe with respect to llama_decode on the
// same context: call them between decodes.

#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LORAMUX_API_VERSION 6

// Highest number of adapter slots of one pool (slot ids 0..LORAMUX_MAX_SLOTS-1).
#define LORAMUX_MAX_SLOTS 4096

enum loramux_status {
    LORAMUX_OK                       =   0,
    LORAMUX_ERR_NULL_ARG             =  -1, // a required pointer is NULL
    LORAMUX_ERR_NOT_REGISTERED       =  -2, // no pool is registered on this context
    LORAMUX_ERR_BAD_SEQ_ID           =  -3, // seq_id < 0 or >= llama_n_seq_max(ctx)
    LORAMUX_ERR_BAD_ADAPTER_ID       =  -4, // an adapter id is outside [0, n_adapters)
    LORAMUX_ERR_BAD_WEIGHT           =  -5, // a weight is NaN or infinite
    LORAMUX_ERR_TOO_MANY_ACTIVE      =  -6, // more non-zero weights than max_active
    LORAMUX_ERR_DUPLICATE_ADAPTER    =  -7, // the same adapter twice (in a pool or in one mix)
    LORAMUX_ERR_BAD_ARG              =  -8, // a count is out of range
    LORAMUX_ERR_INCOMPATIBLE_ADAPTER =  -9, // adapter of another model, aLoRA, or mismatched shapes
    LORAMUX_ERR_ALLOC                = -10, // a backend buffer (or host memory) could not be allocated
    LORAMUX_ERR_INTERNAL             = -11, // llama.cpp or the standard library threw; nothing was changed
    LORAMUX_ERR_UNAPPLIED            = -12, // a graph met an adapted weight in a shape the hook cannot take
};

// Routing modes of a sequence (loramux_set_seq_routing).
enum loramux_route_mode {
    LORAMUX_ROUTE_FIXED  = 0, // the sequence's fixed mix, or none (the base model)
    LORAMUX_ROUTE_ARROW  = 1, // per token and adapted weight: top-k of |x . v_e|, weights softmax(s / T)
    LORAMUX_ROUTE_SPECTR = 2, // per token and adapted weight: top-k of ||Q_e^T x|| / sqrt(r_e), weights 1/k
    // LoGo (fused CPU op only): per token and adapted weight, top-k of ||D_e x|| / c_e, weights s / sum(s)
    LORAMUX_ROUTE_LOGO           = 3, // c_e = 1 (LoGo's raw signal)
    LORAMUX_ROUTE_LOGO_SPECTRAL  = 4, // c_e = ||D_e||_2 (the delta's largest singular value)
    LORAMUX_ROUTE_LOGO_FROBENIUS = 5, // c_e = ||D_e||_F
};

// LORAMUX_API_VERSION of the library.
LLAMA_API int32_t loramux_api_version(void);

// Static text for a status code.
LLAMA_API const char * loramux_strerror(int32_t status);

// Why the last failing loramux call on this thread failed ("" after a call that succeeded): names
// the pool adapter ("adapter 3"), the tensor and the cause. Valid until the next loramux call.
LLAMA_API const char * loramux_last_error(void);

// Registration flags: host buffers take the device form too (ggml_mul_mat_id), so the CPU runs
// (and tests check) what CUDA runs.
#define LORAMUX_REGISTER_MUL_MAT_ID 1

// Register the pool `adapters[0..n_adapters)` (ids 0..n_adapters-1 in that order) on ctx, with at
// most `max_active` adapters per sequence (clamped to n_adapters). The adapters' A/B tensors are copied into stacked
// tensors on the same devices (the adapters must stay loaded only for token-embedding LoRAs).
// Host buffers use a fused CPU op; device buffers (and host buffers when `flags` has
// LORAMUX_REGISTER_MUL_MAT_ID) use ggml_mul_mat_id, the mixture-of-experts kernels.
// Replaces any earlier registration and clears every sequence's mix; the next decode reserves
// the scheduler once (registration is the only slow call). Unknown flag bits: LORAMUX_ERR_BAD_ARG.
LLAMA_API int32_t loramux_register_adapters(
        struct llama_context       * ctx,
        struct llama_adapter_lora ** adapters,
        int32_t                      n_adapters,
        int32_t                      max_active,
        int32_t                      flags);

// Register an empty pool of adapter slots on ctx (replacing any earlier registration), with at most
// `max_active` adapters per sequence and `flags` as loramux_register_adapters. Adapters are then
// put into slots, and taken out, with loramux_set_slots.
LLAMA_API int32_t loramux_init_pool(struct llama_context * ctx, int32_t max_active, int32_t flags);

// Put adapters[i] into slot slots[i] (an id in [0, LORAMUX_MAX_SLOTS); the id mixes use), or clear
// the slot where adapters[i] is NULL, for i in [0, n). Only these adapters are read, stacked and
// prepared for routing: every other slot's stacked matrices and routing data are copied from the
// current pool, and every sequence keeps its mix and routing. A slot in some sequence's fixed mix
// cannot change (LORAMUX_ERR_BAD_ARG: clear that mix first). An adapter must stay loaded while its
// slot is filled only when it has a token-embedding LoRA (read at decode time). loramux_register_adapters(
// ctx, adapters, n, ...) is loramux_init_pool followed by filling slots 0..n-1 (with max_active
// clamped to n). The next decode reserves the scheduler once. A failing call changes nothing.
LLAMA_API int32_t loramux_set_slots(
        struct llama_context       * ctx,
        int32_t                      n,
        const int32_t              * slots,
        struct llama_adapter_lora ** adapters);

// How the pool's slot changes were made since loramux_init_pool / loramux_register_adapters: by
// building the next pool (copying the untouched slots) or in place. A pool made by
// loramux_init_pool keeps free slices in host-buffer stacks (a quarter more, at least one per
// group), so that one adapter put into a slot (loramux_set_slots with n == 1) whose weights the
// pool already stacks, at a rank within theirs, is written into them alone, and a cleared slot
// becomes a free slice; anything else is a rebuild.
LLAMA_API int32_t loramux_pool_changes(const struct llama_context * ctx, int32_t * n_rebuilt, int32_t * n_in_place);

// Drop the registered pool (all sequences go back to the base model).
LLAMA_API int32_t loramux_unregister(struct llama_context * ctx);

// Number of slot ids in use (the last filled slot + 1; 0 when none), and max_active (0 when no pool).
LLAMA_API int32_t loramux_n_adapters(const struct llama_context * ctx);
LLAMA_API int32_t loramux_max_active(const struct llama_context * ctx);

// LORAMUX_OK, or LORAMUX_ERR_UNAPPLIED when a graph built since registration met an adapted base
// weight in an input shape the per-sequence hook cannot take, or a ubatch whose output rows do not
// match the graph (its adapters were left out there; loramux_last_error says which). Registration
// already refuses every case it can see (mixture-of-experts weights, shapes that differ from the
// base weight, ranks above 512). Nothing in the decode path asserts or aborts.
LLAMA_API int32_t loramux_check_applied(const struct llama_context * ctx);

// Set the mix of sequence seq_id from n (id, weight) pairs; ids index the registered pool, zero
// weights are dropped, at most max_active may be non-zero. n == 0 clears the mix.
LLAMA_API int32_t loramux_set_seq_mix(
        struct llama_context * ctx,
        llama_seq_id           seq_id,
        int32_t                n,
        const int32_t        * ids,
        const float          * weights);

// Same, from a dense vector of n_weights == n_adapters weights (one per slot id; 0 for empty slots).
LLAMA_API int32_t loramux_set_seq_weights(
        struct llama_context * ctx,
        llama_seq_id           seq_id,
        const float          * weights,
        int32_t                n_weights);

// The sequence runs the base model again.
LLAMA_API int32_t loramux_clear_seq_mix(struct llama_context * ctx, llama_seq_id seq_id);

// Copy the sequence's mix into ids/weights (capacity entries); returns the number of active
// adapters (>= 0) or a negative status.
LLAMA_API int32_t loramux_get_seq_mix(
        const struct llama_context * ctx,
        llama_seq_id                 seq_id,
        int32_t                      capacity,
        int32_t                    * ids,
        float                      * weights);

// Route every token of sequence seq_id per adapted weight, inside the graph: at each adapted base
// weight the pool adapters that adapt it are scored against the weight's input x, the top k are
// kept (k in [1, max_active]; fewer where fewer adapters adapt that weight) and mixed with
//   LORAMUX_ROUTE_ARROW:  scores |x . v_e|, v_e the top right singular vector of the adapter's delta
//                         (alpha/r B A); weights softmax(s / temperature) over the top k (temperature > 0);
//   LORAMUX_ROUTE_SPECTR: scores ||Q_e^T x|| / sqrt(r_e), Q_e an orthonormal basis of the delta's row space, r_e its rank;
//                         weights 1/k (temperature is ignored);
//   LORAMUX_ROUTE_LOGO, _LOGO_SPECTRAL, _LOGO_FROBENIUS: scores ||D_e x|| / c_e, D_e = the delta (alpha/r B A, or
//                         alpha/sqrt(r) for rsLoRA: the adapter's scale as llama.cpp applies it), c_e = 1, ||D_e||_2
//                         or ||D_e||_F (0 for a zero delta: it scores 0); weights s / sum(s) over the top k
//                         (temperature is ignored). The fused CPU op only: LORAMUX_ERR_BAD_ARG when the pool uses
//                         the device form (LORAMUX_REGISTER_MUL_MAT_ID or device buffers), and a slot change that
//                         would put a LoGo sequence's pool on the device form is refused the same way.
// The prototypes, bases and LoGo's B^T B and c_e are computed exactly at registration. Replaces the sequence's fixed mix;
// loramux_set_seq_mix or loramux_clear_seq_mix (or mode LORAMUX_ROUTE_FIXED) end the routing.
LLAMA_API int32_t loramux_set_seq_routing(
        struct llama_context * ctx,
        llama_seq_id           seq_id,
        int32_t                mode,
        int32_t                k,
        float                  temperature);

// The sequence's routing: mode (LORAMUX_ROUTE_FIXED when it has a fixed mix or none), k, temperature.
LLAMA_API int32_t loramux_get_seq_routing(
        const struct llama_context * ctx,
        llama_seq_id                 seq_id,
        int32_t                    * mode,
        int32_t                    * k,
        float                      * temperature);

// Number of adapted base weights of the pool (0 when none), and the name of weight i (NULL when i
// is out of range); the record's module ids index this list.
LLAMA_API int32_t      loramux_n_modules(const struct llama_context * ctx);
LLAMA_API const char * loramux_module_name(const struct llama_context * ctx, int32_t i);

// The Arrow prototypes of base weight `name`: writes n_sub pool ids to ids and n_sub x n_in floats
// (unit vectors) to protos when capacity >= n_sub * n_in; returns n_sub (>= 0) or a status.
LLAMA_API int32_t loramux_get_prototypes(
        const struct llama_context * ctx,
        const char                 * name,
        int32_t                      capacity,
        int32_t                    * ids,
        float                      * protos,
        int32_t                    * n_in);

// Record (on != 0) or stop recording which adapters each routed token chose at each adapted weight
// (the fused CPU op only: LORAMUX_ERR_BAD_ARG when the pool uses the device form). Clears the record.
LLAMA_API int32_t loramux_set_record(struct llama_context * ctx, int32_t on);

// Rows recorded since the last loramux_set_record/loramux_take_record: with capacity < the number
// of rows (e.g. 0) returns that number and writes nothing; else writes per row the module id, the
// sequence id, the position, max_active pool ids (-1 past the token's k) and weights, clears the
// record and returns the number of rows.
LLAMA_API int32_t loramux_take_record(
        struct llama_context * ctx,
        int32_t                capacity,
        int32_t              * module,
        int32_t              * seq_id,
        int32_t              * pos,
        int32_t              * ids,
        float                * weights);

#ifdef __cplusplus
}
#endif
