// faiss_c.cpp - FAISS's C API (the functions Kestrel calls) and Kestrel's C extensions
// (faiss_ext.h), implemented on the C++ library libfaiss.a. The only C++ file in Kestrel.
//
// Debian 12's libfaiss-dev ships /usr/include/faiss/c_api/*.h but not libfaiss_c, so this file
// supplies the functions those headers declare, with the same names, signatures and semantics
// (upstream c_api/*.cpp of FAISS 1.7.3), and nothing else links them.
//
// When the system does have libfaiss_c: the C API section below is compiled only when
// KST_HAVE_FAISS_C is 0. It defaults to whether a libfaiss_c library file exists in the usual
// places (checked with __has_include on the file itself: headers cannot tell, since Debian ships
// them without the library), and `-DKST_HAVE_FAISS_C=0/1` overrides it. With it set, the build
// must also link -lfaiss_c (the link then fails loudly on the faiss_* names, never silently mixes
// two implementations). Weak symbols were not used: a weak definition in libkestrel.a still
// beats a libfaiss_c.so definition at link time, and the thread-local error slot must be one
// object shared by whichever faiss_get_last_error is called. The extensions are always compiled;
// they report through that same slot (faiss_last_exception, declared in c_api/error_impl.h).
//
// Exceptions stop at the C boundary: every int-returning function is one `try { ... }` closed
// by KST_FAISS_CATCH, which keeps the exception for faiss_get_last_error() and returns
// FAISS_EXCEPT (-2), STD_EXCEPT (-4) or UNKNOWN_EXCEPT (-1), as upstream's CATCH_AND_HANDLE does
// (minus its printing to std::cerr). The exception is kept whole (std::current_exception), so
// e.g. std::bad_alloc keeps its own message.

#include <faiss/AutoTune.h>
#include <faiss/Clustering.h>
#include <faiss/Index.h>
#include <faiss/IndexFlat.h>
#include <faiss/clone_index.h>
#include <faiss/IndexHNSW.h>
#include <faiss/IndexIDMap.h>
#include <faiss/IndexIVF.h>
#include <faiss/IndexIVFPQ.h>
#include <faiss/IndexPQ.h>
#include <faiss/IndexPreTransform.h>
#include <faiss/VectorTransform.h>
#include <faiss/impl/FaissAssert.h>
#include <faiss/impl/FaissException.h>
#include <faiss/impl/IDSelector.h>
#include <faiss/impl/io.h>
#include <faiss/index_factory.h>
#include <faiss/index_io.h>
#include <faiss/invlists/OnDiskInvertedLists.h>

#include <faiss/c_api/AutoTune_c.h>
#include <faiss/c_api/IndexIVF_c.h>
#include <faiss/c_api/IndexPreTransform_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/error_c.h>
#include <faiss/c_api/error_impl.h>
#include <faiss/c_api/impl/AuxIndexStructures_c.h>
#include <faiss/c_api/index_factory_c.h>
#include <faiss/c_api/index_io_c.h>

#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "index/faiss_ext.h"

#ifndef KST_HAVE_FAISS_C
#if __has_include("/usr/lib/x86_64-linux-gnu/libfaiss_c.so") || \
        __has_include("/usr/lib/x86_64-linux-gnu/libfaiss_c.a") || \
        __has_include("/usr/local/lib/libfaiss_c.so") || __has_include("/usr/local/lib/libfaiss_c.a")
#define KST_HAVE_FAISS_C 1
#else
#define KST_HAVE_FAISS_C 0
#endif
#endif

// ------------------------------------------------------------------------------------------------
// The C boundary
// ------------------------------------------------------------------------------------------------

#define KST_FAISS_CATCH                                   \
    catch (faiss::FaissException&) {                      \
        faiss_last_exception = std::current_exception();  \
        return FAISS_EXCEPT;                              \
    }                                                     \
    catch (std::exception&) {                             \
        faiss_last_exception = std::current_exception();  \
        return STD_EXCEPT;                                \
    }                                                     \
    catch (...) {                                         \
        faiss_last_exception =                            \
                std::make_exception_ptr(std::runtime_error("unknown C++ exception")); \
        return UNKNOWN_EXCEPT;                            \
    }                                                     \
    return OK;

namespace {

using idx = faiss::Index::idx_t;

// Misuse (a NULL handle or output) becomes an error, never a crash.
template <typename T>
T* need(T* p, const char* what) {
    if (!p) throw std::invalid_argument(std::string(what) + " is NULL");
    return p;
}

faiss::Index* ix(FaissIndex* p) { return reinterpret_cast<faiss::Index*>(p); }
// FaissIndexIVF is the same C type as FaissIndex (FAISS_DECLARE_CLASS_INHERITED).
faiss::IndexIVF* ivf(FaissIndexIVF* p) { return reinterpret_cast<faiss::IndexIVF*>(p); }
const faiss::IndexIVF* ivf(const FaissIndexIVF* p) {
    return reinterpret_cast<const faiss::IndexIVF*>(p);
}
const faiss::Index* ix(const FaissIndex* p) { return reinterpret_cast<const faiss::Index*>(p); }
FaissIndex* handle(faiss::Index* p) { return reinterpret_cast<FaissIndex*>(p); }

// libfaiss.a reaches BLAS through index/faiss_blas.c: no index exists unless that works.
void require_blas() {
    kst_error e;
    if (kst_faiss_blas_ready(&e) != KST_OK) throw std::runtime_error(e.msg);
}

// The layers the factory stacks, found from the top: IndexIDMap, IndexPreTransform, then the
// index that does the work (IVF, HNSW, PQ, flat).
struct Layers {
    const faiss::IndexIDMap* id_map = nullptr;
    const faiss::IndexPreTransform* pre = nullptr;
    const faiss::Index* core = nullptr;  // the working index
    const faiss::Index* below_id_map = nullptr;
};

Layers layers_of(const faiss::Index* top) {
    Layers l;
    const faiss::Index* cur = top;
    for (int depth = 0; depth < 4 && cur; depth++) {
        if (auto m = dynamic_cast<const faiss::IndexIDMap*>(cur)) {
            if (!l.id_map) l.id_map = m, l.below_id_map = m->index;
            cur = m->index;
        } else if (auto p = dynamic_cast<const faiss::IndexPreTransform*>(cur)) {
            if (!l.pre) l.pre = p;
            cur = p->index;
        } else {
            break;
        }
    }
    l.core = cur;
    if (!l.below_id_map) l.below_id_map = top;
    return l;
}

const faiss::IndexIVF* ivf_of(const faiss::Index* top) {
    return dynamic_cast<const faiss::IndexIVF*>(layers_of(top).core);
}

const faiss::IndexIVF* need_ivf(const faiss::Index* top) {
    auto ivf = ivf_of(top);
    if (!ivf) throw std::invalid_argument("the index has no IVF layer");
    return ivf;
}

const faiss::ProductQuantizer* pq_of(const faiss::Index* top) {
    const faiss::Index* core = layers_of(top).core;
    if (auto p = dynamic_cast<const faiss::IndexIVFPQ*>(core)) return &p->pq;
    if (auto p = dynamic_cast<const faiss::IndexPQ*>(core)) return &p->pq;
    return nullptr;
}

const faiss::LinearTransform* linear_of(const faiss::Index* top) {
    auto pre = layers_of(top).pre;
    if (!pre || pre->chain.size() != 1) return nullptr;
    return dynamic_cast<const faiss::LinearTransform*>(pre->chain[0]);
}

// FAISS 1.7.3 maps IVF lists (IO_FLAG_MMAP) without checking that they lie inside the file: a
// truncated file reads "fine" and the first search touching the missing pages dies of SIGBUS.
// Checked here instead, so the read fails. Takes ownership of index: deletes it on failure.
faiss::Index* checked_mapped(faiss::Index* index, int fd) {
    auto v = ivf_of(index);
    auto od = v ? dynamic_cast<const faiss::OnDiskInvertedLists*>(v->invlists) : nullptr;
    struct stat st;
    if (od && fstat(fd, &st) == 0) {
        size_t per = sizeof(idx) + od->code_size, total = (size_t)st.st_size;
        for (size_t l = 0; l < od->lists.size(); l++) {
            const faiss::OnDiskOneList& one = od->lists[l];
            if (one.offset > total || one.size > (total - one.offset) / per) {
                size_t need_bytes = one.offset + one.size * per;
                delete index;
                throw std::runtime_error("truncated index file: inverted list " +
                                         std::to_string(l) + " ends at byte " +
                                         std::to_string(need_bytes) + ", the file has " +
                                         std::to_string(total));
            }
        }
    }
    return index;
}

void require_empty(const faiss::Index* top, const char* what) {
    if (top->ntotal != 0)
        throw std::invalid_argument(std::string(what) + " can only be replaced on an empty index "
                                    "(it holds " + std::to_string(top->ntotal) +
                                    " vectors whose codes depend on it)");
}

}  // namespace

#if !KST_HAVE_FAISS_C
// ================================================================================================
// FAISS C API (declarations in /usr/include/faiss/c_api/*.h)
// ================================================================================================

thread_local std::exception_ptr faiss_last_exception;

extern "C" {

// ---- error_c.h ---------------------------------------------------------------------------------

const char* faiss_get_last_error() {
    if (faiss_last_exception) {
        try {
            std::rethrow_exception(faiss_last_exception);
        } catch (std::exception& e) {
            return e.what();  // owned by the kept exception until the thread's next failure
        } catch (...) {
            return "unknown C++ exception";
        }
    }
    return nullptr;
}

// ---- Index_c.h ---------------------------------------------------------------------------------

void faiss_Index_free(FaissIndex* obj) { delete ix(obj); }
int faiss_Index_d(const FaissIndex* obj) { return obj ? (int)ix(obj)->d : 0; }
int faiss_Index_is_trained(const FaissIndex* obj) { return obj ? ix(obj)->is_trained : 0; }
idx_t faiss_Index_ntotal(const FaissIndex* obj) { return obj ? ix(obj)->ntotal : 0; }
FaissMetricType faiss_Index_metric_type(const FaissIndex* obj) {
    return obj ? (FaissMetricType)ix(obj)->metric_type : METRIC_L2;
}
int faiss_Index_verbose(const FaissIndex* obj) { return obj ? ix(obj)->verbose : 0; }
void faiss_Index_set_verbose(FaissIndex* obj, int value) {
    if (obj) ix(obj)->verbose = value != 0;
}

int faiss_Index_train(FaissIndex* index, idx_t n, const float* x) {
    try {
        ix(need(index, "index"))->train(n, need(x, "x"));
    }
    KST_FAISS_CATCH
}

int faiss_Index_add(FaissIndex* index, idx_t n, const float* x) {
    try {
        ix(need(index, "index"))->add(n, need(x, "x"));
    }
    KST_FAISS_CATCH
}

int faiss_Index_add_with_ids(FaissIndex* index, idx_t n, const float* x, const idx_t* xids) {
    try {
        ix(need(index, "index"))->add_with_ids(n, need(x, "x"), need(xids, "xids"));
    }
    KST_FAISS_CATCH
}

int faiss_Index_search(const FaissIndex* index, idx_t n, const float* x, idx_t k,
                       float* distances, idx_t* labels) {
    try {
        need(index, "index");
        // libfaiss 1.7.3's IndexIVF::search does not check this and answers -1 everywhere.
        FAISS_THROW_IF_NOT_MSG(ix(index)->is_trained, "the index is not trained");
        ix(index)->search(n, need(x, "x"), k, need(distances, "distances"),
                          need(labels, "labels"));
    }
    KST_FAISS_CATCH
}

int faiss_Index_assign(FaissIndex* index, idx_t n, const float* x, idx_t* labels, idx_t k) {
    try {
        ix(need(index, "index"))->assign(n, need(x, "x"), need(labels, "labels"), k);
    }
    KST_FAISS_CATCH
}

int faiss_Index_reset(FaissIndex* index) {
    try {
        ix(need(index, "index"))->reset();
    }
    KST_FAISS_CATCH
}

int faiss_Index_remove_ids(FaissIndex* index, const FaissIDSelector* sel, size_t* n_removed) {
    try {
        need(index, "index");
        auto s = reinterpret_cast<const faiss::IDSelector*>(need(sel, "sel"));
        size_t n = ix(index)->remove_ids(*s);
        if (n_removed) *n_removed = n;
    }
    KST_FAISS_CATCH
}

int faiss_Index_reconstruct(const FaissIndex* index, idx_t key, float* recons) {
    try {
        need(index, "index");
        ix(index)->reconstruct(key, need(recons, "recons"));
    }
    KST_FAISS_CATCH
}

int faiss_Index_reconstruct_n(const FaissIndex* index, idx_t i0, idx_t ni, float* recons) {
    try {
        need(index, "index");
        ix(index)->reconstruct_n(i0, ni, need(recons, "recons"));
    }
    KST_FAISS_CATCH
}

int faiss_Index_compute_residual(const FaissIndex* index, const float* x, float* residual,
                                 idx_t key) {
    try {
        need(index, "index");
        ix(index)->compute_residual(need(x, "x"), need(residual, "residual"), key);
    }
    KST_FAISS_CATCH
}

int faiss_Index_compute_residual_n(const FaissIndex* index, idx_t n, const float* x,
                                   float* residuals, const idx_t* keys) {
    try {
        need(index, "index");
        ix(index)->compute_residual_n(n, need(x, "x"), need(residuals, "residuals"),
                                      need(keys, "keys"));
    }
    KST_FAISS_CATCH
}

// Writes its output: see FAISS pull request #4492 (upstream once returned OK without doing so).
int faiss_Index_sa_code_size(const FaissIndex* index, size_t* size) {
    try {
        need(index, "index");
        *need(size, "size") = ix(index)->sa_code_size();
    }
    KST_FAISS_CATCH
}

int faiss_Index_sa_encode(const FaissIndex* index, idx_t n, const float* x, uint8_t* bytes) {
    try {
        need(index, "index");
        ix(index)->sa_encode(n, need(x, "x"), need(bytes, "bytes"));
    }
    KST_FAISS_CATCH
}

int faiss_Index_sa_decode(const FaissIndex* index, idx_t n, const uint8_t* bytes, float* x) {
    try {
        need(index, "index");
        ix(index)->sa_decode(n, need(bytes, "bytes"), need(x, "x"));
    }
    KST_FAISS_CATCH
}

// ---- IndexIVF_c.h ------------------------------------------------------------------------------

void faiss_IndexIVF_free(FaissIndexIVF* obj) { delete ivf(obj); }
FaissIndexIVF* faiss_IndexIVF_cast(FaissIndex* index) {
    return reinterpret_cast<FaissIndexIVF*>(dynamic_cast<faiss::IndexIVF*>(ix(index)));
}
size_t faiss_IndexIVF_nlist(const FaissIndexIVF* obj) { return obj ? ivf(obj)->nlist : 0; }
size_t faiss_IndexIVF_nprobe(const FaissIndexIVF* obj) { return obj ? ivf(obj)->nprobe : 0; }
void faiss_IndexIVF_set_nprobe(FaissIndexIVF* obj, size_t nprobe) {
    if (obj) ivf(obj)->nprobe = nprobe;
}
FaissIndex* faiss_IndexIVF_quantizer(const FaissIndexIVF* obj) {
    return obj ? handle(ivf(obj)->quantizer) : nullptr;
}
char faiss_IndexIVF_quantizer_trains_alone(const FaissIndexIVF* obj) {
    return obj ? ivf(obj)->quantizer_trains_alone : 0;
}
int faiss_IndexIVF_own_fields(const FaissIndexIVF* obj) { return obj ? ivf(obj)->own_fields : 0; }
void faiss_IndexIVF_set_own_fields(FaissIndexIVF* obj, int own) {
    if (obj) ivf(obj)->own_fields = own != 0;
}

size_t faiss_IndexIVF_get_list_size(const FaissIndexIVF* index, size_t list_no) {
    if (!index || list_no >= ivf(index)->nlist) return 0;
    return ivf(index)->get_list_size(list_no);
}

int faiss_IndexIVF_make_direct_map(FaissIndexIVF* index, int new_maintain_direct_map) {
    try {
        need(index, "index");
        ivf(index)->make_direct_map(new_maintain_direct_map != 0);
    }
    KST_FAISS_CATCH
}

double faiss_IndexIVF_imbalance_factor(const FaissIndexIVF* index) {
    return index ? ivf(index)->invlists->imbalance_factor() : 0.0;
}

// Upstream's signature returns nothing: an out-of-range list copies nothing.
void faiss_IndexIVF_invlists_get_ids(const FaissIndexIVF* index, size_t list_no, idx_t* invlist) {
    if (!index || !invlist || list_no >= ivf(index)->nlist) return;
    const faiss::InvertedLists* il = ivf(index)->invlists;
    size_t n = il->list_size(list_no);
    faiss::InvertedLists::ScopedIds ids(il, list_no);
    if (n) std::memcpy(invlist, ids.get(), n * sizeof(idx_t));
}

// ---- IndexPreTransform_c.h ---------------------------------------------------------------------

void faiss_IndexPreTransform_free(FaissIndexPreTransform* obj) { delete ix(obj); }
FaissIndexPreTransform* faiss_IndexPreTransform_cast(FaissIndex* index) {
    return reinterpret_cast<FaissIndexPreTransform*>(
            dynamic_cast<faiss::IndexPreTransform*>(ix(index)));
}
FaissIndex* faiss_IndexPreTransform_index(const FaissIndexPreTransform* obj) {
    return obj ? handle(reinterpret_cast<const faiss::IndexPreTransform*>(obj)->index) : nullptr;
}

// ---- impl/AuxIndexStructures_c.h: ID selectors -------------------------------------------------

void faiss_IDSelector_free(FaissIDSelector* obj) {
    delete reinterpret_cast<faiss::IDSelector*>(obj);
}
int faiss_IDSelector_is_member(const FaissIDSelector* sel, idx_t id) {
    return sel ? reinterpret_cast<const faiss::IDSelector*>(sel)->is_member(id) : 0;
}
int faiss_IDSelectorRange_new(FaissIDSelectorRange** p_sel, idx_t imin, idx_t imax) {
    try {
        *need(p_sel, "p_sel") =
                reinterpret_cast<FaissIDSelectorRange*>(new faiss::IDSelectorRange(imin, imax));
    }
    KST_FAISS_CATCH
}
void faiss_IDSelectorRange_free(FaissIDSelectorRange* obj) {
    delete reinterpret_cast<faiss::IDSelectorRange*>(obj);
}
idx_t faiss_IDSelectorRange_imin(const FaissIDSelectorRange* obj) {
    return obj ? reinterpret_cast<const faiss::IDSelectorRange*>(obj)->imin : 0;
}
idx_t faiss_IDSelectorRange_imax(const FaissIDSelectorRange* obj) {
    return obj ? reinterpret_cast<const faiss::IDSelectorRange*>(obj)->imax : 0;
}
int faiss_IDSelectorBatch_new(FaissIDSelectorBatch** p_sel, size_t n, const idx_t* indices) {
    try {
        need(p_sel, "p_sel");
        if (n) need(indices, "indices");
        *p_sel = reinterpret_cast<FaissIDSelectorBatch*>(new faiss::IDSelectorBatch(n, indices));
    }
    KST_FAISS_CATCH
}
int faiss_IDSelectorBatch_nbits(const FaissIDSelectorBatch* obj) {
    return obj ? reinterpret_cast<const faiss::IDSelectorBatch*>(obj)->nbits : 0;
}
idx_t faiss_IDSelectorBatch_mask(const FaissIDSelectorBatch* obj) {
    return obj ? reinterpret_cast<const faiss::IDSelectorBatch*>(obj)->mask : 0;
}

// ---- AutoTune_c.h: ParameterSpace (nprobe, efSearch, ... by name) ------------------------------

int faiss_ParameterSpace_new(FaissParameterSpace** space) {
    try {
        *need(space, "space") = reinterpret_cast<FaissParameterSpace*>(new faiss::ParameterSpace);
    }
    KST_FAISS_CATCH
}
void faiss_ParameterSpace_free(FaissParameterSpace* obj) {
    delete reinterpret_cast<faiss::ParameterSpace*>(obj);
}
int faiss_ParameterSpace_set_index_parameter(const FaissParameterSpace* space, FaissIndex* index,
                                             const char* name, double value) {
    try {
        auto ps = reinterpret_cast<const faiss::ParameterSpace*>(need(space, "space"));
        ps->set_index_parameter(ix(need(index, "index")), need(name, "name"),
                                value);
    }
    KST_FAISS_CATCH
}
int faiss_ParameterSpace_set_index_parameters(const FaissParameterSpace* space, FaissIndex* index,
                                              const char* params) {
    try {
        auto ps = reinterpret_cast<const faiss::ParameterSpace*>(need(space, "space"));
        ps->set_index_parameters(ix(need(index, "index")), need(params, "params"));
    }
    KST_FAISS_CATCH
}

// ---- index_factory_c.h -------------------------------------------------------------------------

int faiss_index_factory(FaissIndex** p_index, int d, const char* description,
                        FaissMetricType metric) {
    try {
        need(p_index, "p_index");
        *p_index = nullptr;
        require_blas();
        *p_index = handle(faiss::index_factory(d, need(description, "description"),
                                               static_cast<faiss::MetricType>(metric)));
    }
    KST_FAISS_CATCH
}

// ---- index_io_c.h ------------------------------------------------------------------------------

// The C header's FAISS_IO_FLAG_MMAP (1) is not the C++ library's IO_FLAG_MMAP (0x646f0008);
// upstream passes the bits through, so there it has no effect. Here it means what it says; the
// C++ values are passed through unchanged.
static int cxx_io_flags(int io_flags) {
    int f = io_flags & ~FAISS_IO_FLAG_MMAP;
    if (io_flags & FAISS_IO_FLAG_MMAP) f |= faiss::IO_FLAG_MMAP;
    return f;
}

int faiss_write_index(const FaissIndex* idx, FILE* f) {
    try {
        faiss::write_index(ix(need(idx, "idx")), need(f, "f"));
    }
    KST_FAISS_CATCH
}

int faiss_write_index_fname(const FaissIndex* idx, const char* fname) {
    try {
        faiss::write_index(ix(need(idx, "idx")), need(fname, "fname"));
    }
    KST_FAISS_CATCH
}

int faiss_read_index(FILE* f, int io_flags, FaissIndex** p_out) {
    try {
        need(p_out, "p_out");
        *p_out = nullptr;
        require_blas();
        *p_out = handle(checked_mapped(faiss::read_index(need(f, "f"), cxx_io_flags(io_flags)),
                                       fileno(f)));
    }
    KST_FAISS_CATCH
}

int faiss_read_index_fname(const char* fname, int io_flags, FaissIndex** p_out) {
    try {
        need(p_out, "p_out");
        *p_out = nullptr;
        require_blas();
        // Opened here so that the size checked is that of the file FAISS read.
        FILE* f = fopen(need(fname, "fname"), "rb");
        if (!f) FAISS_THROW_FMT("could not open %s for reading: %s", fname, strerror(errno));
        std::unique_ptr<FILE, int (*)(FILE*)> closer(f, fclose);
        faiss::FileIOReader reader(f);
        reader.name = fname;
        *p_out = handle(checked_mapped(faiss::read_index(&reader, cxx_io_flags(io_flags)),
                                       fileno(f)));
    }
    KST_FAISS_CATCH
}

}  // extern "C"
#endif  // !KST_HAVE_FAISS_C

// ================================================================================================
// Kestrel's extensions (faiss_ext.h)
// ================================================================================================

extern "C" {

int kst_faiss_layout_get(const FaissIndex* index, kst_faiss_layout* out) {
    try {
        need(out, "out");
        const faiss::Index* top = ix(need(index, "index"));
        *out = kst_faiss_layout{};
        Layers l = layers_of(top);
        out->d = (int)top->d;
        out->ntotal = top->ntotal;
        out->is_trained = top->is_trained;
        out->metric = (int)top->metric_type;
        out->has_id_map = l.id_map != nullptr;
        out->is_hnsw = dynamic_cast<const faiss::IndexHNSW*>(l.core) != nullptr;
        if (auto lt = linear_of(top)) out->opq_d_in = lt->d_in, out->opq_d_out = lt->d_out;
        if (auto v = dynamic_cast<const faiss::IndexIVF*>(l.core)) {
            out->ivf_d = (int)v->d;
            out->nlist = v->nlist;
            out->code_size = v->code_size;
            auto pq = dynamic_cast<const faiss::IndexIVFPQ*>(v);
            out->by_residual = pq ? pq->by_residual : 0;
        }
        if (auto pq = pq_of(top)) {
            out->pq_M = pq->M;
            out->pq_nbits = pq->nbits;
            out->pq_ksub = pq->ksub;
            out->pq_dsub = pq->dsub;
        }
    }
    KST_FAISS_CATCH
}

int kst_faiss_training_defaults(FaissIndex* index) {
    try {
        faiss::Index* top = ix(need(index, "index"));
        Layers l = layers_of(top);
        auto core = const_cast<faiss::Index*>(l.core);
        if (auto v = dynamic_cast<faiss::IndexIVF*>(core)) v->cp.min_points_per_centroid = 0;
        if (auto p = dynamic_cast<faiss::IndexIVFPQ*>(core)) {
            p->do_polysemous_training = false;
            p->pq.cp.min_points_per_centroid = 0;
        }
        if (auto p = dynamic_cast<faiss::IndexPQ*>(core)) {
            p->do_polysemous_training = false;
            p->pq.cp.min_points_per_centroid = 0;
        }
        if (l.pre)
            for (auto t : l.pre->chain)
                if (auto opq = dynamic_cast<faiss::OPQMatrix*>(t)) opq->verbose = false;
    }
    KST_FAISS_CATCH
}

int kst_faiss_kmeans(size_t d, size_t n, size_t k, const float* x, int niter, int max_per, int seed,
                     float* centroids) {
    try {
        need(x, "x");
        need(centroids, "centroids");
        FAISS_THROW_IF_NOT_MSG(k >= 1 && n >= k, "k-means needs at least k vectors");
        faiss::ClusteringParameters cp;
        cp.niter = niter;
        cp.verbose = false;
        cp.min_points_per_centroid = 0;
        cp.max_points_per_centroid = max_per;
        cp.seed = seed;
        faiss::Clustering cl((int)d, (int)k, cp);
        faiss::IndexFlatL2 q((idx_t)d);
        cl.train((idx_t)n, x, q);
        FAISS_THROW_IF_NOT_MSG(cl.centroids.size() == k * d, "k-means returned a wrong number of centroids");
        std::copy(cl.centroids.begin(), cl.centroids.end(), centroids);
    }
    KST_FAISS_CATCH
}

int kst_faiss_ivf_centroids_get(const FaissIndex* index, float* centroids) {
    try {
        auto v = need_ivf(ix(need(index, "index")));
        need(centroids, "centroids");
        if ((size_t)v->quantizer->ntotal != v->nlist)
            throw std::invalid_argument("the IVF quantizer holds " +
                                        std::to_string(v->quantizer->ntotal) + " centroids, not " +
                                        "nlist = " + std::to_string(v->nlist) + " (untrained?)");
        v->quantizer->reconstruct_n(0, (idx)v->nlist, centroids);
    }
    KST_FAISS_CATCH
}

int kst_faiss_ivf_centroids_set(FaissIndex* index, const float* centroids) {
    try {
        faiss::Index* top = ix(need(index, "index"));
        auto v = const_cast<faiss::IndexIVF*>(need_ivf(top));
        need(centroids, "centroids");
        require_empty(top, "IVF centroids");
        auto flat = dynamic_cast<faiss::IndexFlat*>(v->quantizer);
        if (!flat)
            throw std::invalid_argument("IVF centroids can be set only on a flat coarse quantizer");
        flat->reset();
        flat->add((idx)v->nlist, centroids);
        // Without a PQ codec (IVFFlat) the index is now trained. With one, FAISS cannot tell a
        // trained codebook from its zero-filled start, so the state is kept: replacing centroids
        // of a trained index keeps it trained; kst_faiss_pq_codebook_set completes a new one.
        if (!pq_of(top)) v->is_trained = true;
        if (auto pre = dynamic_cast<faiss::IndexPreTransform*>(top)) {
            bool chain_trained = true;
            for (auto t : pre->chain) chain_trained = chain_trained && t->is_trained;
            pre->is_trained = chain_trained && v->is_trained;
        }
    }
    KST_FAISS_CATCH
}

int kst_faiss_pq_codebook_get(const FaissIndex* index, float* codebook) {
    try {
        auto pq = pq_of(ix(need(index, "index")));
        if (!pq) throw std::invalid_argument("the index has no product quantizer");
        need(codebook, "codebook");
        size_t n = pq->M * pq->ksub * pq->dsub;
        if (pq->centroids.size() != n)
            throw std::invalid_argument("the product quantizer is not trained");
        std::memcpy(codebook, pq->centroids.data(), n * sizeof(float));
    }
    KST_FAISS_CATCH
}

int kst_faiss_pq_codebook_set(FaissIndex* index, const float* codebook) {
    try {
        faiss::Index* top = ix(need(index, "index"));
        auto pq = const_cast<faiss::ProductQuantizer*>(pq_of(top));
        if (!pq) throw std::invalid_argument("the index has no product quantizer");
        need(codebook, "codebook");
        require_empty(top, "the PQ codebook");
        size_t n = pq->M * pq->ksub * pq->dsub;
        pq->centroids.assign(codebook, codebook + n);
        // Derived copies that FAISS keeps beside the codebook.
        if (!pq->transposed_centroids.empty()) pq->sync_transposed_centroids();
        if (!pq->sdc_table.empty()) pq->compute_sdc_table();
        const faiss::Index* core = layers_of(top).core;
        if (auto ivfpq = dynamic_cast<const faiss::IndexIVFPQ*>(core)) {
            auto w = const_cast<faiss::IndexIVFPQ*>(ivfpq);
            w->is_trained = (size_t)w->quantizer->ntotal == w->nlist;
            if (w->is_trained) w->precompute_table();
        } else if (auto ipq = dynamic_cast<const faiss::IndexPQ*>(core)) {
            const_cast<faiss::IndexPQ*>(ipq)->is_trained = true;
        }
    }
    KST_FAISS_CATCH
}

int kst_faiss_opq_matrix_get(const FaissIndex* index, float* A) {
    try {
        auto lt = linear_of(ix(need(index, "index")));
        if (!lt) throw std::invalid_argument("the index has no linear pre-transform (OPQ)");
        need(A, "A");
        size_t n = (size_t)lt->d_in * lt->d_out;
        if (lt->A.size() != n) throw std::invalid_argument("the pre-transform is not trained");
        std::memcpy(A, lt->A.data(), n * sizeof(float));
    }
    KST_FAISS_CATCH
}

int kst_faiss_opq_matrix_set(FaissIndex* index, const float* A) {
    try {
        faiss::Index* top = ix(need(index, "index"));
        auto lt = const_cast<faiss::LinearTransform*>(linear_of(top));
        if (!lt) throw std::invalid_argument("the index has no linear pre-transform (OPQ)");
        need(A, "A");
        require_empty(top, "the OPQ matrix");
        lt->A.assign(A, A + (size_t)lt->d_in * lt->d_out);
        if (lt->have_bias && lt->b.size() != (size_t)lt->d_out) lt->b.assign(lt->d_out, 0.0f);
        lt->is_trained = true;
        lt->set_is_orthonormal();
        auto pre = dynamic_cast<faiss::IndexPreTransform*>(top);
        if (pre) pre->is_trained = pre->index->is_trained;
    }
    KST_FAISS_CATCH
}

int kst_faiss_clone_empty(const FaissIndex* index, FaissIndex** out) {
    try {
        need(out, "out");
        *out = nullptr;
        std::unique_ptr<faiss::Index> c(faiss::clone_index(ix(need(index, "index"))));
        c->reset();
        *out = handle(c.release());
    }
    KST_FAISS_CATCH
}

int kst_faiss_ivf_list_sizes(const FaissIndex* index, size_t* sizes) {
    try {
        auto v = need_ivf(ix(need(index, "index")));
        need(sizes, "sizes");
        for (size_t l = 0; l < v->nlist; l++) sizes[l] = v->invlists->list_size(l);
    }
    KST_FAISS_CATCH
}

int kst_faiss_ivf_list_get(const FaissIndex* index, size_t list_no, idx_t* ids, uint8_t* codes) {
    try {
        auto v = need_ivf(ix(need(index, "index")));
        if (list_no >= v->nlist)
            throw std::invalid_argument("list " + std::to_string(list_no) + " out of range (nlist " +
                                        std::to_string(v->nlist) + ")");
        const faiss::InvertedLists* il = v->invlists;
        size_t n = il->list_size(list_no);
        if (n && ids) {
            faiss::InvertedLists::ScopedIds s(il, list_no);
            std::memcpy(ids, s.get(), n * sizeof(idx_t));
        }
        if (n && codes) {
            faiss::InvertedLists::ScopedCodes s(il, list_no);
            std::memcpy(codes, s.get(), n * il->code_size);
        }
    }
    KST_FAISS_CATCH
}

int kst_faiss_ivf_add_encoded(FaissIndex* index, idx_t n, const idx_t* list_nos,
                              const uint8_t* codes, const idx_t* ids) {
    try {
        faiss::Index* top = ix(need(index, "index"));
        need(list_nos, "list_nos"), need(codes, "codes"), need(ids, "ids");
        Layers l = layers_of(top);
        if (l.id_map)
            throw std::invalid_argument("the index has an id map: encoded entries go to IVF only");
        auto v = const_cast<faiss::IndexIVF*>(need_ivf(top));
        FAISS_THROW_IF_NOT_MSG(v->is_trained, "the index is not trained");
        size_t cs = v->coarse_code_size(), sz = cs + v->code_size;
        std::vector<uint8_t> sa((size_t)n * sz);
        for (idx_t i = 0; i < n; i++) {
            if (list_nos[i] < 0 || (size_t)list_nos[i] >= v->nlist)
                throw std::invalid_argument("entry " + std::to_string(i) + ": list " +
                                            std::to_string(list_nos[i]) + " out of range (nlist " +
                                            std::to_string(v->nlist) + ")");
            v->encode_listno(list_nos[i], sa.data() + (size_t)i * sz);
            std::memcpy(sa.data() + (size_t)i * sz + cs, codes + (size_t)i * v->code_size,
                        v->code_size);
        }
        v->add_sa_codes(n, sa.data(), ids);
        if (l.pre) const_cast<faiss::IndexPreTransform*>(l.pre)->ntotal = v->ntotal;
    }
    KST_FAISS_CATCH
}

int kst_faiss_search(const FaissIndex* index, idx_t n, const float* x, idx_t k, size_t nprobe,
                     int ef_search, float* distances, idx_t* labels) {
    try {
        const faiss::Index* top = ix(need(index, "index"));
        need(x, "x"), need(distances, "distances"), need(labels, "labels");
        FAISS_THROW_IF_NOT_MSG(top->is_trained, "the index is not trained");
        Layers l = layers_of(top);
        // FAISS 1.7.3 takes SearchParameters in IndexIVF, IndexHNSW and IndexPreTransform (which
        // hands them down) but refuses them in IndexIDMap: search below the id map, map labels.
        faiss::SearchParametersIVF p_ivf;
        faiss::SearchParametersHNSW p_hnsw;
        const faiss::SearchParameters* params = nullptr;
        if (auto v = dynamic_cast<const faiss::IndexIVF*>(l.core)) {
            size_t np = nprobe ? nprobe : v->nprobe;
            p_ivf.nprobe = np < v->nlist ? np : v->nlist;
            p_ivf.max_codes = v->max_codes;
            params = &p_ivf;
        } else if (auto h = dynamic_cast<const faiss::IndexHNSW*>(l.core)) {
            p_hnsw.efSearch = ef_search > 0 ? ef_search : h->hnsw.efSearch;
            params = &p_hnsw;
        }
        l.below_id_map->search(n, x, k, distances, labels, params);
        if (l.id_map) {
            const std::vector<idx>& map = l.id_map->id_map;
            for (size_t i = 0; i < (size_t)(n * k); i++)
                if (labels[i] >= 0) labels[i] = map[(size_t)labels[i]];
        }
    }
    KST_FAISS_CATCH
}

// ---- flat vectors for the GPU copy (faiss_ext.h) ------------------------------------------------

int kst_faiss_flat_get(const FaissIndex* index, float* x, idx_t* ids) {
    try {
        const faiss::Index* top = ix(need(index, "index"));
        Layers l = layers_of(top);
        auto flat = dynamic_cast<const faiss::IndexFlat*>(l.core);
        if (!flat || l.pre)
            throw std::invalid_argument("the index is not a flat index (optionally under an id map)");
        size_t n = (size_t)flat->ntotal, d = (size_t)flat->d;
        if (x) std::memcpy(x, flat->get_xb(), n * d * sizeof(float));
        if (ids)
            for (size_t i = 0; i < n; i++) ids[i] = l.id_map ? l.id_map->id_map[i] : (idx_t)i;
    }
    KST_FAISS_CATCH
}

}  // extern "C"
