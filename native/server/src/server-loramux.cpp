// server-loramux.cpp - see server-loramux.h
#include "server-loramux.h"

#include "log.h"
#include "loramux.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <set>
#include <stdexcept>

static const char * route_mode_name(int32_t mode) {
    switch (mode) {
        case LORAMUX_ROUTE_ARROW:  return "arrow";
        case LORAMUX_ROUTE_SPECTR: return "spectr";
        default:                   return "fixed";
    }
}

server_lora_routing parse_lora_routing(const common_json & data) {
    server_lora_routing r;
    if (data.is_null()) {
        return r;
    }
    if (!data.is_object() || !data.contains("mode") || !data.at("mode").is_string()) {
        throw std::runtime_error(
            "'lora_routing' must be an object {\"mode\": \"arrow\" | \"spectr\", \"k\": K, \"temperature\": T}");
    }
    const std::string mode = data.at("mode").get<std::string>();
    if (mode == "arrow") {
        r.mode = LORAMUX_ROUTE_ARROW;
    } else if (mode == "spectr") {
        r.mode = LORAMUX_ROUTE_SPECTR;
    } else {
        throw std::runtime_error("'lora_routing.mode' must be \"arrow\" or \"spectr\", got \"" + mode + "\"");
    }
    if (!data.contains("k") || !data.at("k").is_number_integer()) {
        throw std::runtime_error("'lora_routing.k' (how many adapters each token mixes) must be an integer");
    }
    r.k = data.at("k").get<int32_t>();
    if (data.contains("temperature") && !data.at("temperature").is_null()) {
        if (!data.at("temperature").is_number()) {
            throw std::runtime_error("'lora_routing.temperature' must be a number");
        }
        r.temperature = data.at("temperature").get<float>();
    }
    return r;
}

void server_loramux_metrics::add_decode(const std::vector<const server_loramux_mix *> & mixes) {
    std::set<std::string> keys;
    for (const auto * m : mixes) {
        keys.insert(m->key);
    }
    n_decode++;
    n_seqs  += mixes.size();
    n_mixes += keys.size();
    seqs_max  = std::max<uint64_t>(seqs_max, mixes.size());
    mixes_max = std::max<uint64_t>(mixes_max, keys.size());
}

std::string server_loramux_metrics::to_prometheus() const {
    struct item { const char * name; const char * type; const char * help; double value; };
    const double n = std::max<double>((double) n_decode, 1.0);
    const item items[] = {
        {"loramux_decode_sequences_per_decode", "gauge",   "Average number of sequences (slots) per llama_decode() call", n_seqs / n},
        {"loramux_decode_mixes_per_decode",     "gauge",   "Average number of distinct LoRA mixes per llama_decode() call", n_mixes / n},
        {"loramux_decode_sequences_max",        "gauge",   "Most sequences seen in one llama_decode() call", (double) seqs_max},
        {"loramux_decode_mixes_max",            "gauge",   "Most distinct LoRA mixes seen in one llama_decode() call", (double) mixes_max},
        {"loramux_decode_sequences_total",      "counter", "Sequences summed over llama_decode() calls", (double) n_seqs},
        {"loramux_decode_mixes_total",          "counter", "Distinct LoRA mixes summed over llama_decode() calls", (double) n_mixes},
        {"loramux_fallback_requests_total",     "counter", "Requests whose mix was wider than --lora-max-active and ran on the whole context (stock batching)", (double) n_fallback},
    };
    std::string out;
    char line[512];
    for (const auto & it : items) {
        snprintf(line, sizeof(line), "# HELP llamacpp:%s %s\n# TYPE llamacpp:%s %s\nllamacpp:%s %.17g\n",
                 it.name, it.help, it.name, it.type, it.name, it.value);
        out += line;
    }
    return out;
}

void server_loramux::init(llama_context * ctx, const std::vector<common_adapter_lora_info> & loras, int32_t max_active_arg) {
    n_adapters = (int32_t) loras.size();
    max_active = 0;
    if (loras.empty()) {
        status = "no --lora adapters";
        return;
    }
    if (max_active_arg < 1) {
        status = "--lora-max-active " + std::to_string(max_active_arg) + ": per-sequence mixes are off";
        LOG_WRN("loramux: %s; every mix runs on the whole context (stock batching)\n", status.c_str());
        return;
    }
    std::vector<llama_adapter_lora *> ptrs;
    for (const auto & la : loras) {
        ptrs.push_back(la.ptr);
    }
    const int32_t rc = loramux_register_adapters(ctx, ptrs.data(), (int32_t) ptrs.size(), max_active_arg, 0);
    if (rc != LORAMUX_OK) {
        status = std::string("registration refused: ") + loramux_strerror(rc) + ": " + loramux_last_error();
        LOG_WRN("loramux: %s; every mix runs on the whole context (stock batching)\n", status.c_str());
        return;
    }
    max_active = loramux_max_active(ctx);
    status = "per-sequence";
    LOG_INF("loramux: %d adapters registered; a mix of up to %d adapters (or arrow/spectr routing) runs per sequence, "
            "and slots with different mixes share decodes\n", n_adapters, max_active);
}

std::string server_loramux::check(const std::map<int, float> & lora, const server_lora_routing & routing) const {
    for (const auto & [id, scale] : lora) {
        if (id < 0 || id >= n_adapters) {
            return "lora id " + std::to_string(id) + " is out of range: this server has " + std::to_string(n_adapters) +
                   " adapter(s)" + (n_adapters > 0 ? " (ids 0.." + std::to_string(n_adapters - 1) + ", see GET /lora-adapters)" : " (start it with --lora FILE)");
        }
        if (!std::isfinite(scale)) {
            return "lora id " + std::to_string(id) + ": the scale must be a finite number";
        }
    }
    if (routing.mode != LORAMUX_ROUTE_FIXED) {
        if (max_active == 0) {
            return std::string("'lora_routing' (") + route_mode_name(routing.mode) + ") needs the per-sequence adapter pool, which is off here: " + status;
        }
        if (routing.k < 1 || routing.k > max_active) {
            return "'lora_routing.k' is " + std::to_string(routing.k) + ": it must be between 1 and --lora-max-active (" + std::to_string(max_active) + ")";
        }
        if (routing.mode == LORAMUX_ROUTE_ARROW && !(routing.temperature > 0.0f && std::isfinite(routing.temperature))) {
            return "'lora_routing.temperature' must be a positive finite number for arrow";
        }
    }
    return "";
}

server_loramux_mix server_loramux::mix_of(const std::vector<common_adapter_lora_info> & loras, const server_lora_routing & routing) const {
    server_loramux_mix mix;
    mix.routing = routing;
    char part[64];
    if (routing.mode != LORAMUX_ROUTE_FIXED) {
        snprintf(part, sizeof(part), "%s:k=%d:t=%.9g", route_mode_name(routing.mode), routing.k, routing.temperature);
        mix.key = part;
        mix.per_sequence = max_active > 0;
        return mix;
    }
    bool alora = false;
    for (size_t i = 0; i < loras.size(); ++i) {
        if (loras[i].scale == 0.0f) {
            continue;
        }
        mix.ids.push_back((int32_t) i);
        mix.scales.push_back(loras[i].scale);
        alora = alora || llama_adapter_get_alora_n_invocation_tokens(loras[i].ptr) > 0;
        snprintf(part, sizeof(part), "%s%zu:%.9g", mix.key.empty() ? "" : ",", i, loras[i].scale);
        mix.key += part;
    }
    mix.per_sequence = max_active > 0 && !alora && (int32_t) mix.ids.size() <= max_active;
    return mix;
}

std::string server_loramux::apply(llama_context * ctx, llama_seq_id seq, const server_loramux_mix & mix) const {
    if (max_active == 0) {
        return "";
    }
    int32_t rc = LORAMUX_OK;
    if (!mix.per_sequence) {
        rc = loramux_clear_seq_mix(ctx, seq);
    } else if (mix.routing.mode != LORAMUX_ROUTE_FIXED) {
        rc = loramux_set_seq_routing(ctx, seq, mix.routing.mode, mix.routing.k, mix.routing.temperature);
    } else {
        rc = loramux_set_seq_mix(ctx, seq, (int32_t) mix.ids.size(), mix.ids.data(), mix.scales.data());
    }
    if (rc != LORAMUX_OK) {
        return std::string("cannot set the mix {") + mix.key + "}: " + loramux_strerror(rc) + ": " + loramux_last_error();
    }
    return "";
}

std::string server_loramux::check_applied(const llama_context * ctx) const {
    if (max_active == 0 || loramux_check_applied(ctx) == LORAMUX_OK) {
        return "";
    }
    return std::string("loramux: ") + loramux_last_error();
}

common_json server_loramux::props() const {
    common_json out = common_json::object();
    out["api_version"]     = loramux_api_version();
    out["n_adapters"]      = n_adapters;
    out["max_active"]      = max_active;
    out["per_sequence"]    = max_active > 0;
    out["status"]          = status;
    out["routing_modes"]   = max_active > 0 ? std::vector<std::string>{"arrow", "spectr"} : std::vector<std::string>{};
    return out;
}
