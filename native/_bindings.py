"""One-to-one ctypes bindings of native/include/loramux.h (the C prototype above each).

Bound on the libllama handle llama_cpp itself loaded (``llama_cpp.llama_cpp._lib``), so there is
one library in the process. Call :func:`bind` once (``loramux.native`` does) before using them.
"""

from __future__ import annotations

import ctypes
from typing import Any

c_int32_p = ctypes.POINTER(ctypes.c_int32)
c_float_p = ctypes.POINTER(ctypes.c_float)
llama_context_p = ctypes.c_void_p
llama_adapter_lora_p = ctypes.c_void_p
llama_adapter_lora_pp = ctypes.POINTER(ctypes.c_void_p)

# Status codes (enum loramux_status; tests/test_native_abi.py checks them against the header).
LORAMUX_OK = 0
LORAMUX_ERR_NULL_ARG = -1
LORAMUX_ERR_NOT_REGISTERED = -2
LORAMUX_ERR_BAD_SEQ_ID = -3
LORAMUX_ERR_BAD_ADAPTER_ID = -4
LORAMUX_ERR_BAD_WEIGHT = -5
LORAMUX_ERR_TOO_MANY_ACTIVE = -6
LORAMUX_ERR_DUPLICATE_ADAPTER = -7
LORAMUX_ERR_BAD_ARG = -8
LORAMUX_ERR_INCOMPATIBLE_ADAPTER = -9
LORAMUX_ERR_ALLOC = -10
LORAMUX_ERR_INTERNAL = -11
LORAMUX_ERR_UNAPPLIED = -12

# Registration flags.
LORAMUX_REGISTER_MUL_MAT_ID = 1  # host buffers take the device form (ggml_mul_mat_id) too
LORAMUX_MAX_SLOTS = 4096  # slot ids of one pool: 0..LORAMUX_MAX_SLOTS-1

# Routing modes (enum loramux_route_mode).
LORAMUX_ROUTE_FIXED = 0
LORAMUX_ROUTE_ARROW = 1
LORAMUX_ROUTE_SPECTR = 2
LORAMUX_ROUTE_LOGO = 3  # LoGo, raw (c_e = 1); the fused CPU op only
LORAMUX_ROUTE_LOGO_SPECTRAL = 4  # LoGo, c_e = ||D_e||_2
LORAMUX_ROUTE_LOGO_FROBENIUS = 5  # LoGo, c_e = ||D_e||_F

# name -> (argtypes, restype), in the order of loramux.h
_PROTOTYPES: dict[str, tuple[list[Any], Any]] = {
    # int32_t loramux_api_version(void);
    "loramux_api_version": ([], ctypes.c_int32),
    # const char * loramux_strerror(int32_t status);
    "loramux_strerror": ([ctypes.c_int32], ctypes.c_char_p),
    # const char * loramux_last_error(void);
    "loramux_last_error": ([], ctypes.c_char_p),
    # int32_t loramux_register_adapters(struct llama_context * ctx, struct llama_adapter_lora ** adapters,
    #                                   int32_t n_adapters, int32_t max_active, int32_t flags);
    "loramux_register_adapters": ([llama_context_p, llama_adapter_lora_pp, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32], ctypes.c_int32),
    # int32_t loramux_init_pool(struct llama_context * ctx, int32_t max_active, int32_t flags);
    "loramux_init_pool": ([llama_context_p, ctypes.c_int32, ctypes.c_int32], ctypes.c_int32),
    # int32_t loramux_set_slots(struct llama_context * ctx, int32_t n, const int32_t * slots,
    #                           struct llama_adapter_lora ** adapters);
    "loramux_set_slots": ([llama_context_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32), llama_adapter_lora_pp], ctypes.c_int32),
    # int32_t loramux_pool_changes(const struct llama_context * ctx, int32_t * n_rebuilt, int32_t * n_in_place);
    "loramux_pool_changes": ([llama_context_p, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int32)], ctypes.c_int32),
    # int32_t loramux_unregister(struct llama_context * ctx);
    "loramux_unregister": ([llama_context_p], ctypes.c_int32),
    # int32_t loramux_n_adapters(const struct llama_context * ctx);
    "loramux_n_adapters": ([llama_context_p], ctypes.c_int32),
    # int32_t loramux_max_active(const struct llama_context * ctx);
    "loramux_max_active": ([llama_context_p], ctypes.c_int32),
    # int32_t loramux_check_applied(const struct llama_context * ctx);
    "loramux_check_applied": ([llama_context_p], ctypes.c_int32),
    # int32_t loramux_set_seq_mix(struct llama_context * ctx, llama_seq_id seq_id, int32_t n,
    #                             const int32_t * ids, const float * weights);
    "loramux_set_seq_mix": ([llama_context_p, ctypes.c_int32, ctypes.c_int32, c_int32_p, c_float_p], ctypes.c_int32),
    # int32_t loramux_set_seq_weights(struct llama_context * ctx, llama_seq_id seq_id,
    #                                 const float * weights, int32_t n_weights);
    "loramux_set_seq_weights": ([llama_context_p, ctypes.c_int32, c_float_p, ctypes.c_int32], ctypes.c_int32),
    # int32_t loramux_clear_seq_mix(struct llama_context * ctx, llama_seq_id seq_id);
    "loramux_clear_seq_mix": ([llama_context_p, ctypes.c_int32], ctypes.c_int32),
    # int32_t loramux_get_seq_mix(const struct llama_context * ctx, llama_seq_id seq_id, int32_t capacity,
    #                             int32_t * ids, float * weights);
    "loramux_get_seq_mix": ([llama_context_p, ctypes.c_int32, ctypes.c_int32, c_int32_p, c_float_p], ctypes.c_int32),
    # int32_t loramux_set_seq_routing(struct llama_context * ctx, llama_seq_id seq_id, int32_t mode, int32_t k,
    #                                 float temperature);
    "loramux_set_seq_routing": ([llama_context_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.c_float], ctypes.c_int32),
    # int32_t loramux_get_seq_routing(const struct llama_context * ctx, llama_seq_id seq_id, int32_t * mode,
    #                                 int32_t * k, float * temperature);
    "loramux_get_seq_routing": ([llama_context_p, ctypes.c_int32, c_int32_p, c_int32_p, c_float_p], ctypes.c_int32),
    # int32_t loramux_n_modules(const struct llama_context * ctx);
    "loramux_n_modules": ([llama_context_p], ctypes.c_int32),
    # const char * loramux_module_name(const struct llama_context * ctx, int32_t i);
    "loramux_module_name": ([llama_context_p, ctypes.c_int32], ctypes.c_char_p),
    # int32_t loramux_get_prototypes(const struct llama_context * ctx, const char * name, int32_t capacity,
    #                                int32_t * ids, float * protos, int32_t * n_in);
    "loramux_get_prototypes": ([llama_context_p, ctypes.c_char_p, ctypes.c_int32, c_int32_p, c_float_p, c_int32_p], ctypes.c_int32),
    # int32_t loramux_set_record(struct llama_context * ctx, int32_t on);
    "loramux_set_record": ([llama_context_p, ctypes.c_int32], ctypes.c_int32),
    # int32_t loramux_take_record(struct llama_context * ctx, int32_t capacity, int32_t * module, int32_t * seq_id,
    #                             int32_t * pos, int32_t * ids, float * weights);
    "loramux_take_record": ([llama_context_p, ctypes.c_int32, c_int32_p, c_int32_p, c_int32_p, c_int32_p, c_float_p], ctypes.c_int32),
}

_lib: ctypes.CDLL | None = None


def bind(lib: ctypes.CDLL) -> None:
    """Set argtypes/restype of every loramux function on ``lib`` and keep it for the wrappers."""
    global _lib
    for name, (argtypes, restype) in _PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    _lib = lib


def lib() -> ctypes.CDLL:
    if _lib is None:
        raise RuntimeError("loramux native bindings are not bound: check loramux.native.available() first")
    return _lib


def strerror(status: int) -> str:
    return lib().loramux_strerror(status).decode("utf-8", errors="replace")


def last_error() -> str:
    """Why the last failing loramux call on this thread failed (empty after a success)."""
    return (lib().loramux_last_error() or b"").decode("utf-8", errors="replace")


def reason(status: int) -> str:
    """The status code's text, with the library's detailed reason when it has one."""
    detail = last_error()
    return f"{strerror(status)}: {detail}" if detail else strerror(status)


def loramux_check_applied(ctx) -> int:
    return lib().loramux_check_applied(ctx)


def loramux_api_version() -> int:
    return lib().loramux_api_version()


def loramux_register_adapters(ctx, adapters, n_adapters: int, max_active: int, flags: int = 0) -> int:
    return lib().loramux_register_adapters(ctx, adapters, n_adapters, max_active, flags)


def loramux_init_pool(ctx, max_active: int, flags: int = 0) -> int:
    return lib().loramux_init_pool(ctx, max_active, flags)


def loramux_set_slots(ctx, n: int, slots, adapters) -> int:
    return lib().loramux_set_slots(ctx, n, slots, adapters)


def loramux_pool_changes(ctx, n_rebuilt, n_in_place) -> int:
    return lib().loramux_pool_changes(ctx, n_rebuilt, n_in_place)


def loramux_unregister(ctx) -> int:
    return lib().loramux_unregister(ctx)


def loramux_n_adapters(ctx) -> int:
    return lib().loramux_n_adapters(ctx)


def loramux_max_active(ctx) -> int:
    return lib().loramux_max_active(ctx)


def loramux_set_seq_mix(ctx, seq_id: int, n: int, ids, weights) -> int:
    return lib().loramux_set_seq_mix(ctx, seq_id, n, ids, weights)


def loramux_set_seq_weights(ctx, seq_id: int, weights, n_weights: int) -> int:
    return lib().loramux_set_seq_weights(ctx, seq_id, weights, n_weights)


def loramux_clear_seq_mix(ctx, seq_id: int) -> int:
    return lib().loramux_clear_seq_mix(ctx, seq_id)


def loramux_get_seq_mix(ctx, seq_id: int, capacity: int, ids, weights) -> int:
    return lib().loramux_get_seq_mix(ctx, seq_id, capacity, ids, weights)


def loramux_set_seq_routing(ctx, seq_id: int, mode: int, k: int, temperature: float) -> int:
    return lib().loramux_set_seq_routing(ctx, seq_id, mode, k, temperature)


def loramux_get_seq_routing(ctx, seq_id: int, mode, k, temperature) -> int:
    return lib().loramux_get_seq_routing(ctx, seq_id, mode, k, temperature)


def loramux_n_modules(ctx) -> int:
    return lib().loramux_n_modules(ctx)


def loramux_module_name(ctx, i: int) -> bytes | None:
    return lib().loramux_module_name(ctx, i)


def loramux_get_prototypes(ctx, name: bytes, capacity: int, ids, protos, n_in) -> int:
    return lib().loramux_get_prototypes(ctx, name, capacity, ids, protos, n_in)


def loramux_set_record(ctx, on: int) -> int:
    return lib().loramux_set_record(ctx, on)


def loramux_take_record(ctx, capacity: int, module, seq_id, pos, ids, weights) -> int:
    return lib().loramux_take_record(ctx, capacity, module, seq_id, pos, ids, weights)
