// llama-mux-route.cpp - per-token routing of loramux (Arrow, SpectR, LoGo), compiled into libllama.
//
// A routed sequence has no fixed mix: at every adapted weight, each of its tokens scores the
// adapters that adapt that weight (its group) against the weight's real input x, keeps the top k
// and mixes them, the way a mixture-of-experts layer gates its experts:
//   Arrow   score |x . v_e| (v_e: top right singular vector of the delta), weights softmax(s / T);
//   SpectR  score ||Q_e^T x|| / sqrt(r_e) (Q_e: orthonormal row space of the delta, r_e its rank), weights 1/k;
//   LoGo    score ||D_e x|| / c_e (D_e = s_e B_e A_e the delta, c_e a calibration: 1, ||D_e||_2 or ||D_e||_F),
//           weights s / sum(s) over the top k; the fused CPU op only (the device form refuses it).
// The routing data is computed here once per adapter and weight at registration, exactly from A
// and the scaled B (no power iteration); the fused CPU op gates inside its token loop, the device
// form with ggml ops (mul_mat, argsort_top_k, get_rows, soft_max, then the two mul_mat_id).

#include "llama-mux-route.h"

#include "loramux.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

//
// registration: prototypes from small eigen-decompositions (r x r, never n_in x n_in)
//

// Eigen-decomposition of the symmetric n x n matrix a (row-major, destroyed) by cyclic Jacobi
// rotations: values[i] with eigenvector column i of vecs (row-major). False when it does not converge.
static bool mux_sym_eig(std::vector<double> & a, int64_t n, std::vector<double> & values, std::vector<double> & vecs) {
    vecs.assign((size_t) n * n, 0.0);
    for (int64_t i = 0; i < n; ++i) {
        vecs[i * n + i] = 1.0;
    }
    double total = 0.0;
    for (double v : a) {
        total += v * v;
    }
    for (int sweep = 0; sweep < 100; ++sweep) {
        double off = 0.0;
        for (int64_t p = 0; p < n; ++p) {
            for (int64_t q = p + 1; q < n; ++q) {
                off += a[p * n + q] * a[p * n + q];
            }
        }
        if (off <= 1e-26 * total || off == 0.0) {
            values.resize(n);
            for (int64_t i = 0; i < n; ++i) {
                values[i] = a[i * n + i];
            }
            return true;
        }
        for (int64_t p = 0; p < n; ++p) {
            for (int64_t q = p + 1; q < n; ++q) {
                const double apq = a[p * n + q];
                if (apq == 0.0) {
                    continue;
                }
                const double theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
                const double c = 1.0 / std::sqrt(t * t + 1.0);
                const double s = t * c;
                for (int64_t k = 0; k < n; ++k) { // a <- J^T a J, columns then rows
                    const double akp = a[k * n + p], akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for (int64_t k = 0; k < n; ++k) {
                    const double apk = a[p * n + k], aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for (int64_t k = 0; k < n; ++k) {
                    const double vkp = vecs[k * n + p], vkq = vecs[k * n + q];
                    vecs[k * n + p] = c * vkp - s * vkq;
                    vecs[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    return false;
}

// A = U S V^T from A A^T = U S^2 U^T: the rows of M = S^+ U^T (r x r, row-major; rows of
// numerically zero singular values are 0), so that V^T x = M (A x).
static bool mux_row_space(const std::vector<float> & a, int64_t r, int64_t n_in, std::vector<double> & m) {
    std::vector<double> g((size_t) r * r, 0.0);
    for (int64_t i = 0; i < r; ++i) {
        for (int64_t j = i; j < r; ++j) {
            double sum = 0.0;
            for (int64_t n = 0; n < n_in; ++n) {
                sum += (double) a[i * n_in + n] * a[j * n_in + n];
            }
            g[i * r + j] = g[j * r + i] = sum;
        }
    }
    std::vector<double> values, u;
    if (!mux_sym_eig(g, r, values, u)) {
        return false;
    }
    const double top = *std::max_element(values.begin(), values.end());
    m.assign((size_t) r * r, 0.0);
    for (int64_t i = 0; i < r; ++i) {
        if (values[i] <= 1e-12 * top || values[i] <= 0.0) {
            continue;
        }
        const double inv_s = 1.0 / std::sqrt(values[i]);
        for (int64_t j = 0; j < r; ++j) {
            m[i * r + j] = u[j * r + i] * inv_s;
        }
    }
    return true;
}

// LoGo's data of one delta D = B A (B scaled): B^T B (r x r, row-major), ||D||_2^2 and ||D||_F^2
struct mux_delta_norms {
    std::vector<double> btb;
    double spectral2  = 0.0;
    double frobenius2 = 0.0;
};

// The delta's top right singular vector. With V = A^T M^T (the row space above), D = B A =
// (B A V) V^T, so the top right singular vector of D is V w for the top eigenvector w of the r x r
// K = (A V)^T (B^T B) (A V), where A V = G M^T and G = A A^T. Returns the unit v = A^T (M^T w), and
// in `norms` B^T B, ||D||_2^2 (K's top eigenvalue) and ||D||_F^2 = trace(B^T B A A^T).
static bool mux_top_vector(const std::vector<float> & a, const std::vector<float> & b, const std::vector<double> & m,
                           int64_t r, int64_t n_in, int64_t n_out, std::vector<double> & v, mux_delta_norms & norms) {
    std::vector<double> g((size_t) r * r, 0.0);
    for (int64_t i = 0; i < r; ++i) {
        for (int64_t j = 0; j < r; ++j) {
            double sum = 0.0;
            for (int64_t n = 0; n < n_in; ++n) {
                sum += (double) a[i * n_in + n] * a[j * n_in + n];
            }
            g[i * r + j] = sum;
        }
    }
    std::vector<double> av((size_t) r * r, 0.0); // A V = G M^T  [r (rank index of A)][r (basis index)]
    for (int64_t i = 0; i < r; ++i) {
        for (int64_t c = 0; c < r; ++c) {
            double sum = 0.0;
            for (int64_t j = 0; j < r; ++j) {
                sum += g[i * r + j] * m[c * r + j];
            }
            av[i * r + c] = sum;
        }
    }
    std::vector<double> & btb = norms.btb; // B^T B
    btb.assign((size_t) r * r, 0.0);
    for (int64_t i = 0; i < r; ++i) {
        for (int64_t j = i; j < r; ++j) {
            double sum = 0.0;
            for (int64_t o = 0; o < n_out; ++o) {
                sum += (double) b[o * r + i] * b[o * r + j];
            }
            btb[i * r + j] = btb[j * r + i] = sum;
        }
    }
    norms.frobenius2 = 0.0; // trace(B^T B A A^T)
    for (int64_t i = 0; i < r; ++i) {
        for (int64_t j = 0; j < r; ++j) {
            norms.frobenius2 += btb[i * r + j] * g[j * r + i];
        }
    }
    std::vector<double> tb((size_t) r * r, 0.0); // (B^T B) (A V)
    for (int64_t i = 0; i < r; ++i) {
        for (int64_t d = 0; d < r; ++d) {
            double sum = 0.0;
            for (int64_t j = 0; j < r; ++j) {
                sum += btb[i * r + j] * av[j * r + d];
            }
            tb[i * r + d] = sum;
        }
    }
    std::vector<double> k((size_t) r * r, 0.0); // K = (A V)^T (B^T B) (A V)
    for (int64_t c = 0; c < r; ++c) {
        for (int64_t d = 0; d < r; ++d) {
            double sum = 0.0;
            for (int64_t i = 0; i < r; ++i) {
                sum += av[i * r + c] * tb[i * r + d];
            }
            k[c * r + d] = sum;
        }
    }
    std::vector<double> values, w;
    if (!mux_sym_eig(k, r, values, w)) {
        return false;
    }
    const int64_t top = std::max_element(values.begin(), values.end()) - values.begin();
    norms.spectral2 = std::max(values[top], 0.0);
    // v = V w = A^T (M^T w)
    std::vector<double> z(r, 0.0);
    for (int64_t j = 0; j < r; ++j) {
        for (int64_t c = 0; c < r; ++c) {
            z[j] += m[c * r + j] * w[c * r + top];
        }
    }
    v.assign(n_in, 0.0);
    double norm = 0.0;
    for (int64_t n = 0; n < n_in; ++n) {
        for (int64_t j = 0; j < r; ++j) {
            v[n] += (double) a[j * n_in + n] * z[j];
        }
        norm += v[n] * v[n];
    }
    norm = std::sqrt(norm);
    for (double & x : v) {
        x = norm > 0.0 ? x / norm : 0.0;
    }
    return true;
}

bool llama_mux_route_prepare(llama_mux_module & m, int64_t n_sub, int64_t sub, const std::vector<float> & a,
                             const std::vector<float> & b_scaled, int64_t r, int64_t n_out) {
    const int64_t n_in = m.n_in, r_max = m.r_max;
    std::vector<double> mm, v;
    mux_delta_norms norms;
    if (!mux_row_space(a, r, n_in, mm) || !mux_top_vector(a, b_scaled, mm, r, n_in, n_out, v, norms)) {
        return false;
    }
    // LoGo: G_e = B_s^T B_s, and 1 / c_e per calibration (1, ||D_e||_2, ||D_e||_F; 0 for a zero delta)
    for (int64_t i = 0; i < r; ++i) {
        for (int64_t j = 0; j < r; ++j) {
            m.logo_g[((size_t) sub * r_max + i) * r_max + j] = (float) norms.btb[i * r + j];
        }
    }
    const double cal[LLAMA_MUX_LOGO_N_CAL] = { 1.0, std::sqrt(norms.spectral2), std::sqrt(std::max(norms.frobenius2, 0.0)) };
    for (int32_t c = 0; c < LLAMA_MUX_LOGO_N_CAL; ++c) {
        const float inv = cal[c] > 0.0 ? (float) (1.0 / cal[c]) : 0.0f;
        m.logo_inv_c[(size_t) sub * LLAMA_MUX_LOGO_N_CAL + c] = std::isfinite(inv) ? inv : 0.0f;
    }
    for (int64_t n = 0; n < n_in; ++n) {
        m.proto[(size_t) sub * n_in + n] = (float) v[n];
    }
    // SpectR's score divided by sqrt(r): ||Q_e^T x|| / sqrt(r_e), the RMS of x's projections on the
    // adapter's basis, so that adapters of different ranks compete on equal terms (the plain norm
    // grows with the rank); with one rank in the pool the choices are SpectR's own
    const double per_rank = 1.0 / std::sqrt((double) r);
    for (double & x : mm) {
        x *= per_rank;
    }
    for (int64_t i = 0; i < r; ++i) {
        for (int64_t j = 0; j < r; ++j) {
            m.gate_m[((size_t) sub * r_max + i) * r_max + j] = (float) mm[i * r + j];
        }
    }
    if (!m.cpu) { // Q_e columns (device form): column i = sum_j M[i][j] A[j]
        m.basis.resize((size_t) n_sub * r_max * n_in, 0.0f);
        for (int64_t i = 0; i < r; ++i) {
            float * q = m.basis.data() + (size_t) (sub * r_max + i) * n_in;
            for (int64_t n = 0; n < n_in; ++n) {
                double sum = 0.0;
                for (int64_t j = 0; j < r; ++j) {
                    sum += mm[i * r + j] * a[j * n_in + n];
                }
                q[n] = (float) sum;
            }
        }
    }
    return true;
}

//
// the fused CPU op: one routed token
//

void llama_mux_route_token(const llama_mux_module & m, const llama_mux_cpu_args & args, const float * route_row,
                           const float * xin, float * out, int64_t o0, int64_t o1) {
    const llama_mux & mux = *m.mux;
    const llama_mux_group & grp = mux.groups[m.group];
    const int64_t n_sub = grp.n_sub, r_max = args.r_max, n_in = args.n_in;
    const int32_t mode  = (int32_t) route_row[0];
    const int64_t k     = std::min<int64_t>((int64_t) route_row[1], grp.n_members);
    const float   inv_t = route_row[2];
    const bool    logo  = llama_mux_is_logo(mode);

    thread_local std::vector<float>   score, t_all;
    thread_local std::vector<int32_t> order;
    score.resize(n_sub);
    order.resize(n_sub);
    if (mode != LLAMA_MUX_ARROW) {
        t_all.resize((size_t) n_sub * r_max);
    }
    for (int64_t e = 0; e < n_sub; ++e) {
        if (grp.members[e] < 0) {
            score[e] = -INFINITY; // a free slice is never chosen (k <= n_members)
            continue;
        }
        if (mode == LLAMA_MUX_ARROW) {
            score[e] = std::fabs(llama_mux_dot_f32(m.proto.data() + (size_t) e * n_in, xin, n_in));
            continue;
        }
        float * t = t_all.data() + (size_t) e * r_max; // A_e x, kept for the chosen adapters
        llama_mux_a_times_x(args, e, xin, t);
        const float * mat = (logo ? m.logo_g : m.gate_m).data() + (size_t) e * r_max * r_max;
        double sq = 0.0;
        for (int64_t i = 0; i < r_max; ++i) {
            const double qi = llama_mux_dot_f32(mat + (size_t) i * r_max, t, r_max);
            sq += logo ? (double) t[i] * qi : qi * qi;
        }
        if (logo) { // ||D_e x|| / c_e = sqrt(t^T G_e t) / c_e
            score[e] = (float) (std::sqrt(std::max(sq, 0.0)) * m.logo_inv_c[(size_t) e * LLAMA_MUX_LOGO_N_CAL + (mode - LLAMA_MUX_LOGO)]);
        } else { // SpectR: ||Q_e^T x|| / sqrt(r_e) = ||M_e (A_e x)|| (M_e per rank)
            score[e] = (float) std::sqrt(sq);
        }
    }
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t i, int32_t j) {
        return score[i] > score[j] || (score[i] == score[j] && i < j);
    });
    float w[LLAMA_MUX_MAX_RANK];
    float t[LLAMA_MUX_MAX_RANK];
    double total = 0.0;
    for (int64_t j = 0; j < k; ++j) { // Arrow: softmax over the top k (the first is the largest); LoGo: s / sum(s)
        w[j] = mode == LLAMA_MUX_ARROW ? std::exp((score[order[j]] - score[order[0]]) * inv_t) : logo ? score[order[j]] : 1.0f;
        total += w[j];
    }
    if (!(total > 0.0)) { // LoGo with every top score 0: each chosen term is 0 too (D_e x = 0 or D_e = 0)
        std::fill(w, w + k, 1.0f);
        total = (double) k;
    }
    for (int64_t j = 0; j < k; ++j) {
        w[j] = (float) (w[j] / total);
        const int32_t e = order[j];
        if (mode == LLAMA_MUX_ARROW) {
            llama_mux_a_times_x(args, e, xin, t);
        } else {
            std::copy(t_all.data() + (size_t) e * r_max, t_all.data() + (size_t) (e + 1) * r_max, t);
        }
        for (int64_t i = 0; i < r_max; ++i) {
            t[i] *= w[j];
        }
        llama_mux_add_b(args, e, t, out, o0, o1);
    }
    // the record: one row per (module, token), written once (by the chunk holding row 0)
    if (o0 == 0 && mux.record.on && !mux.record.segs.empty()) {
        llama_mux_record_segment & seg = mux.record.segs.back();
        const int64_t tok = (int64_t) route_row[3];
        const int64_t n_tokens = (int64_t) seg.seq.size();
        if (tok >= 0 && tok < n_tokens) {
            const size_t base = (((size_t) m.index * n_tokens) + tok) * mux.k;
            for (int64_t j = 0; j < k; ++j) {
                seg.ids[base + j] = grp.members[order[j]];
                seg.w[base + j]   = w[j];
            }
        }
    }
}

//
// the device form: the same gating with ggml ops, a second mul_mat_id pass for routed tokens
//

ggml_tensor * llama_mux_build_routed(ggml_context * ctx0, const llama_mux_route_rows & rows, const llama_mux_module & m,
                                     const char * name, ggml_tensor * x, ggml_tensor * res) {
    const int64_t nt    = x->ne[1];
    const int64_t n_sub = m.mux->groups[m.group].n_sub;
    const int32_t k     = (int32_t) std::min<int64_t>(m.mux->k, n_sub);

    // scores [n_sub, nt]: arrow |P^T x| on arrow tokens, SpectR ||Q_e^T x|| / sqrt(r_e) on spectr tokens
    ggml_tensor * s_arrow  = ggml_abs(ctx0, ggml_mul_mat(ctx0, m.proto_t, x));
    ggml_tensor * q        = ggml_sqr(ctx0, ggml_mul_mat(ctx0, m.basis_t, x)); // [r_max * n_sub, nt]
    q = ggml_sum_rows(ctx0, ggml_reshape_3d(ctx0, q, m.r_max, n_sub, nt));     // [1, n_sub, nt]
    ggml_tensor * s_spectr = ggml_sqrt(ctx0, ggml_reshape_2d(ctx0, q, n_sub, nt));
    ggml_tensor * s = ggml_add(ctx0, ggml_mul(ctx0, s_arrow, rows.arrow), ggml_mul(ctx0, s_spectr, rows.spectr));

    ggml_tensor * ids = ggml_argsort_top_k(ctx0, s, k);                              // [k, nt]
    ggml_tensor * w   = ggml_get_rows(ctx0, ggml_reshape_3d(ctx0, s, 1, n_sub, nt), ids); // [1, k, nt]
    w = ggml_mul(ctx0, ggml_reshape_2d(ctx0, w, k, nt), rows.inv_t);           // s / T (0 for SpectR)
    ggml_tensor * mask = rows.mask;                                                   // [max_active, nt]
    if (k < m.mux->k) {
        mask = ggml_cont(ctx0, ggml_view_2d(ctx0, mask, k, nt, mask->nb[1], 0));
    }
    w = ggml_soft_max(ctx0, ggml_add(ctx0, w, mask));                                 // [k, nt]
    w = ggml_reshape_3d(ctx0, w, 1, k, nt);

    // tokens of other sequences enter with x = 0, so they add exactly 0 here
    ggml_tensor * xr = ggml_mul(ctx0, x, rows.on);
    ggml_format_name(xr, "mux_route_x-%s", name);
    xr = ggml_reshape_3d(ctx0, xr, xr->ne[0], 1, nt);
    ggml_tensor * t = ggml_mul(ctx0, ggml_mul_mat_id(ctx0, m.a, xr, ids), w); // [r_max, k, nt]
    ggml_tensor * u = ggml_mul_mat_id(ctx0, m.b, t, ids);                      // [n_out, k, nt]
    ggml_format_name(u, "mux_route_u-%s", name);
    for (int32_t j = 0; j < k; ++j) {
        res = ggml_add(ctx0, res, ggml_view_2d(ctx0, u, u->ne[0], nt, u->nb[2], (size_t) j * u->nb[1]));
    }
    return res;
}
