// server-loramux.h - loramux inside llama-server: per-sequence LoRA mixes for the server's slots.
//
// Part of loramux's patch of tools/server (native/patches/0002-*), overlaid into tools/server by
// native/fetch_llama.py. The --lora adapters are registered once with the patched libllama's
// per-sequence pool (include/loramux.h); each slot's sequence then carries the mix of its
// request, so slots with different mixes decode in one llama_decode. A mix with more non-zero
// scales than --lora-max-active runs as stock llama-server runs every mix: on the whole context,
// batched only with slots of the same scales (logged, counted in /metrics).
#pragma once

#include "common.h"
#include "json.h"
#include "llama.h"

#include <cstdint>
#include <map>
#include <string>
#include <vector>

// A request's "lora_routing": {"mode": "arrow" | "spectr", "k": K, "temperature": T}.
struct server_lora_routing {
    int32_t mode        = 0;    // LORAMUX_ROUTE_FIXED (0): the request's lora scales
    int32_t k           = 0;
    float   temperature = 1.0f;

    bool operator==(const server_lora_routing & o) const {
        return mode == o.mode && k == o.k && temperature == o.temperature;
    }
};

// Throws std::runtime_error naming the field when the value is not a routing object.
server_lora_routing parse_lora_routing(const common_json & data);

// What a slot's sequence runs, built when the slot takes a request.
struct server_loramux_mix {
    std::string key;              // the mix as the prompt cache keys it ("" = the base model)
    bool per_sequence = false;    // set on the slot's own sequence (batches with every such slot)
    std::vector<int32_t> ids;     // non-zero adapters and their scales
    std::vector<float>   scales;
    server_lora_routing  routing;
};

// /metrics: what the decodes mixed.
struct server_loramux_metrics {
    uint64_t n_decode          = 0; // llama_decode calls counted below
    uint64_t n_seqs            = 0; // sum over decodes of the sequences in the decode
    uint64_t n_mixes           = 0; // sum over decodes of the distinct mixes in the decode
    uint64_t seqs_max          = 0;
    uint64_t mixes_max         = 0;
    uint64_t n_fallback        = 0; // requests whose mix ran on the whole context (wider than max_active)

    void add_decode(const std::vector<const server_loramux_mix *> & mixes);
    std::string to_prometheus() const;
};

struct server_loramux {
    int32_t n_adapters = 0;  // --lora adapters
    int32_t max_active = 0;  // 0: no pool registered (stock behaviour)
    std::string status;      // "per-sequence", or why the pool is off

    // Register the --lora adapters on ctx (once, at start). On refusal the reason is logged and
    // kept in status, and every mix runs the stock way.
    void init(llama_context * ctx, const std::vector<common_adapter_lora_info> & loras, int32_t max_active);

    // "" when the request's lora/lora_routing can run here, else the message of a 400.
    std::string check(const std::map<int, float> & lora, const server_lora_routing & routing) const;

    // The mix of a slot's adapter list (scales) and routing.
    server_loramux_mix mix_of(const std::vector<common_adapter_lora_info> & loras, const server_lora_routing & routing) const;

    // Set the mix on sequence seq (or clear it when the mix runs on the whole context); "" or the error.
    std::string apply(llama_context * ctx, llama_seq_id seq, const server_loramux_mix & mix) const;

    // "" after a decode that applied every mix, else why not (loramux_check_applied)
    std::string check_applied(const llama_context * ctx) const;

    // /props "loramux"
    common_json props() const;
};
