// pybind11 bindings for fmtl_edge._kernels.  No Python-level logic lives here:
// fmtl_edge/aggregation.py and fmtl_edge/affinity/search.py validate arguments,
// own the docstrings and pick the backend.  These functions re-check what
// memory safety depends on (sizes, ranges) and raise ValueError otherwise.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <string>

#ifndef FMTL_EDGE_VERSION
#define FMTL_EDGE_VERSION "unknown"  // a build outside scikit-build-core (CMakeLists.txt passes the version)
#endif

#include "affinity.hpp"
#include "aggregate.hpp"
#ifdef FMTL_WITH_CUDA
#include "aggregate_cuda.hpp"
#endif

namespace py = pybind11;
using namespace fmtl;

namespace {

// RAII holder of a contiguous read-only buffer view.
struct BufferView {
  Py_buffer view{};
  bool held = false;
  explicit BufferView(const py::handle& obj) {
    if (PyObject_GetBuffer(obj.ptr(), &view, PyBUF_C_CONTIGUOUS) != 0) throw py::error_already_set();
    held = true;
  }
  BufferView(const BufferView&) = delete;
  BufferView(BufferView&& o) noexcept : view(o.view), held(o.held) { o.held = false; }
  ~BufferView() { if (held) PyBuffer_Release(&view); }
};

DType to_dtype(int code, const std::string& who) {
  if (code < 0 || code > 2) throw py::value_error(who + ": unknown dtype code " + std::to_string(code) + " (0=float32, 1=float16, 2=bfloat16)");
  return DType(code);
}

std::vector<SliceSpec> to_slices(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& a,
                                 int64_t n_params) {
  if (a.ndim() != 2 || a.shape(1) != 2) throw py::value_error("slices must have shape (S, 2) of (offset, length)");
  std::vector<SliceSpec> s(size_t(a.shape(0)));
  auto r = a.unchecked<2>();
  for (py::ssize_t i = 0; i < a.shape(0); ++i) {
    s[i].offset = r(i, 0);
    s[i].length = r(i, 1);
    if (s[i].offset < 0 || s[i].length < 0 || s[i].offset > n_params || s[i].length > n_params - s[i].offset)
      throw py::value_error("slice " + std::to_string(i) + " is out of range of the " + std::to_string(n_params) + " parameters");
  }
  return s;
}

float* out_ptr(py::array& out) {
  if (!out.dtype().is(py::dtype::of<float>())) throw py::value_error("out must be a float32 array");
  if (!(out.flags() & py::array::c_style)) throw py::value_error("out must be C-contiguous");
  if (!out.writeable()) throw py::value_error("out must be writeable");
  return static_cast<float*>(out.mutable_data());
}

[[noreturn]] void raise_agg(const AggError& e, const char* what) {
  std::ostringstream os;
  if (e.kind == 1) {
    if (e.client >= 0) os << "client " << e.client << ": ";
    os << "input contains a non-finite value (NaN or Inf) at parameter index " << e.index;
    if (e.slice >= 0) os << " (slice " << e.slice << ")";
  } else {
    os << "the float32 weighted sum overflowed";
    if (e.slice >= 0) os << " in slice " << e.slice;
    os << " (inputs are finite; scale the weights or inputs down)";
  }
  os << "; " << what;
  throw py::value_error(os.str());
}

struct Clients {
  std::vector<BufferView> views;
  std::vector<Input> inputs;
};

Clients to_inputs(const py::sequence& xs, const std::vector<int>& dtypes, int64_t n_params) {
  if (size_t(py::len(xs)) != dtypes.size()) throw py::value_error("inputs and dtypes differ in length");
  Clients c;
  c.views.reserve(dtypes.size());
  for (size_t k = 0; k < dtypes.size(); ++k) {
    const DType d = to_dtype(dtypes[k], "client " + std::to_string(k));
    c.views.emplace_back(xs[k]);
    const Py_buffer& v = c.views.back().view;
    const int64_t want = n_params * dtype_size(d);
    if (int64_t(v.len) != want)
      throw py::value_error("client " + std::to_string(k) + ": buffer holds " + std::to_string(v.len) + " bytes, expected " +
                            std::to_string(want) + " (" + std::to_string(n_params) + " elements)");
    c.inputs.push_back(Input{v.buf, d, n_params});
  }
  return c;
}

std::vector<uint8_t> to_contrib(const py::array_t<uint8_t, py::array::c_style | py::array::forcecast>& a, size_t S, size_t K) {
  if (a.ndim() != 2 || size_t(a.shape(0)) != S || size_t(a.shape(1)) != K)
    throw py::value_error("contrib must have shape (S, K) = (" + std::to_string(S) + ", " + std::to_string(K) + ")");
  return std::vector<uint8_t>(a.data(), a.data() + S * K);
}

std::vector<double> to_weights(const py::array_t<double, py::array::c_style | py::array::forcecast>& a, size_t K) {
  if (a.ndim() != 1 || size_t(a.shape(0)) != K) throw py::value_error("weights must have shape (K,)");
  std::vector<double> w(a.data(), a.data() + K);
  for (size_t k = 0; k < K; ++k)
    if (!(w[k] > 0.0) || !std::isfinite(w[k]))
      throw py::value_error("client " + std::to_string(k) + ": weight must be positive and finite");
  return w;
}

py::array_t<double> square(const py::array_t<double, py::array::c_style | py::array::forcecast>& S, int* n) {
  if (S.ndim() != 2 || S.shape(0) != S.shape(1)) throw py::value_error("S must be a square (n, n) matrix");
  *n = int(S.shape(0));
  return S;
}

void check_n(int n) {
  if (n < 1 || n > kMaxTasks)
    throw py::value_error("S has n = " + std::to_string(n) + " tasks; the subset kernels support 1.." + std::to_string(kMaxTasks));
}

py::tuple masks_to_groups(const std::vector<uint32_t>& masks) {
  py::list groups;
  for (uint32_t m : masks) {
    py::list g;
    for (int i = 0; i < 32; ++i) if (m >> i & 1u) g.append(i);
    groups.append(py::tuple(g));
  }
  return py::tuple(groups);
}

}  // namespace

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "fmtl-edge native kernels (CPU aggregation, optional CUDA aggregation, affinity search). "
            "Use fmtl_edge.aggregation and fmtl_edge.affinity for the documented API.";
#ifdef FMTL_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.def("cuda_device_count", []() { return cuda::device_count(); });
  m.def("cuda_version", []() { return cuda::version_string(); });
#else
  m.attr("cuda_compiled") = false;
  m.def("cuda_device_count", []() { return 0; });
  m.def("cuda_version", []() { return std::string("not compiled"); });
#endif
  m.def("cuda_available", []() {
#ifdef FMTL_WITH_CUDA
    return cuda::device_count() > 0;
#else
    return false;
#endif
  }, "True when the CUDA kernel was compiled and a CUDA device is usable.");
  m.attr("max_tasks") = kMaxTasks;
  m.def("default_threads", &default_threads);
  m.def("scratch_bytes", &scratch_bytes, "Bytes held by the reusable rollback scratch of weighted_average_slices.");
  m.def("release_scratch", &release_scratch, "Frees the reusable rollback scratch (it is re-grown on demand).");
  m.attr("__version__") = FMTL_EDGE_VERSION;  // the package version, passed in by CMakeLists.txt

  m.def("weighted_average_slices",
        [](py::array out, const py::sequence& xs, const std::vector<int>& dtypes,
           const py::array_t<double, py::array::c_style | py::array::forcecast>& weights,
           const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& slices,
           const py::array_t<uint8_t, py::array::c_style | py::array::forcecast>& contrib, int n_threads,
           bool rollback) {
          float* o = out_ptr(out);
          const int64_t P = int64_t(out.size());
          Clients c = to_inputs(xs, dtypes, P);
          const std::vector<double> w = to_weights(weights, c.inputs.size());
          const std::vector<SliceSpec> sl = to_slices(slices, P);
          const std::vector<uint8_t> cb = to_contrib(contrib, sl.size(), c.inputs.size());
          AggError e;
          {
            py::gil_scoped_release nogil;
            e = weighted_average_slices(o, c.inputs, w, sl, cb.data(), n_threads, rollback);
          }
          if (e.kind) raise_agg(e, rollback ? "nothing was written to out" : "out may be partly updated (rollback=False)");
        },
        py::arg("out"), py::arg("inputs"), py::arg("dtypes"), py::arg("weights"), py::arg("slices"),
        py::arg("contrib"), py::arg("n_threads") = 0, py::arg("rollback") = true);

  auto robust = [](bool median) {
    return [median](py::array out, const py::sequence& xs, const std::vector<int>& dtypes,
                    const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& slices,
                    const py::array_t<uint8_t, py::array::c_style | py::array::forcecast>& contrib,
                    double trim_fraction, int n_threads) {
      float* o = out_ptr(out);
      const int64_t P = int64_t(out.size());
      Clients c = to_inputs(xs, dtypes, P);
      const std::vector<SliceSpec> sl = to_slices(slices, P);
      const std::vector<uint8_t> cb = to_contrib(contrib, sl.size(), c.inputs.size());
      if (!(trim_fraction >= 0.0 && trim_fraction < 0.5)) throw py::value_error("trim_fraction must be in [0, 0.5)");
      AggError e;
      {
        py::gil_scoped_release nogil;
        e = median ? coordinate_median(o, c.inputs, sl, cb.data(), n_threads)
                   : trimmed_mean(o, c.inputs, sl, cb.data(), trim_fraction, n_threads);
      }
      if (e.kind) raise_agg(e, "nothing was written to out");
    };
  };
  m.def("coordinate_median", robust(true), py::arg("out"), py::arg("inputs"), py::arg("dtypes"), py::arg("slices"),
        py::arg("contrib"), py::arg("trim_fraction") = 0.0, py::arg("n_threads") = 0);
  m.def("trimmed_mean", robust(false), py::arg("out"), py::arg("inputs"), py::arg("dtypes"), py::arg("slices"),
        py::arg("contrib"), py::arg("trim_fraction"), py::arg("n_threads") = 0);

#ifdef FMTL_WITH_CUDA
  m.def("weighted_average_slices_cuda",
        [](uintptr_t out, int64_t n_params, const std::vector<uintptr_t>& ptrs, const std::vector<int>& dtypes,
           const py::array_t<double, py::array::c_style | py::array::forcecast>& weights,
           const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& slices,
           const py::array_t<uint8_t, py::array::c_style | py::array::forcecast>& contrib, uintptr_t stream,
           bool check_finite, int device) {
          if (ptrs.size() != dtypes.size()) throw py::value_error("ptrs and dtypes differ in length");
          std::vector<Input> in(ptrs.size());
          for (size_t k = 0; k < ptrs.size(); ++k)
            in[k] = Input{reinterpret_cast<const void*>(ptrs[k]), to_dtype(dtypes[k], "client " + std::to_string(k)), n_params};
          const std::vector<double> w = to_weights(weights, in.size());
          const std::vector<SliceSpec> sl = to_slices(slices, n_params);
          const std::vector<uint8_t> cb = to_contrib(contrib, sl.size(), in.size());
          AggError e;
          {
            py::gil_scoped_release nogil;
            e = cuda::weighted_average_slices(reinterpret_cast<float*>(out), in, w, sl, cb.data(), stream, check_finite,
                                              device);
          }
          if (e.kind) raise_agg(e, "nothing was written to out");
        },
        py::arg("out_ptr"), py::arg("n_params"), py::arg("input_ptrs"), py::arg("dtypes"), py::arg("weights"),
        py::arg("slices"), py::arg("contrib"), py::arg("stream") = 0, py::arg("check_finite") = true,
        py::arg("device") = -1);
#endif

  py::class_<Accumulator>(m, "Accumulator")
      .def(py::init([](int64_t n_params, const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& slices) {
             if (n_params < 0) throw py::value_error("n_params must be >= 0");
             return new Accumulator(n_params, to_slices(slices, n_params));
           }),
           py::arg("n_params"), py::arg("slices"))
      .def("add",
           [](Accumulator& a, const py::object& x, int dtype, double weight,
              const py::array_t<uint8_t, py::array::c_style | py::array::forcecast>& contrib, int n_threads) {
             if (a.poisoned()) throw py::value_error("accumulator overflowed earlier; call reset()");
             if (!(weight > 0.0) || !std::isfinite(weight)) throw py::value_error("weight must be positive and finite");
             if (contrib.ndim() != 1 || contrib.shape(0) != a.n_slices())
               throw py::value_error("contrib must have shape (S,) = (" + std::to_string(a.n_slices()) + ",)");
             std::vector<int> dts{dtype};
             py::list xs;
             xs.append(x);
             Clients c = to_inputs(xs, dts, a.n_params());
             AggError e;
             {
               py::gil_scoped_release nogil;
               e = a.add(c.inputs[0], weight, contrib.data(), n_threads);
             }
             if (e.kind == 1) raise_agg(e, "the accumulator is unchanged");
             if (e.kind == 2) raise_agg(e, "the accumulator is now invalid; call reset()");
           },
           py::arg("x"), py::arg("dtype"), py::arg("weight"), py::arg("contrib"), py::arg("n_threads") = 0)
      .def("result",
           [](const Accumulator& a, py::array out, int n_threads) {
             float* o = out_ptr(out);
             if (int64_t(out.size()) != a.n_params())
               throw py::value_error("out has " + std::to_string(out.size()) + " elements, expected " + std::to_string(a.n_params()));
             {
               py::gil_scoped_release nogil;
               a.result(o, n_threads);
             }
             return out;
           },
           py::arg("out"), py::arg("n_threads") = 0)
      .def("reset", &Accumulator::reset)
      .def_property_readonly("n_added", &Accumulator::n_added)
      .def_property_readonly("n_params", &Accumulator::n_params)
      .def_property_readonly("state_bytes", &Accumulator::state_bytes)
      .def_property_readonly("total_weight", [](const Accumulator& a) {
        return py::array_t<double>(py::ssize_t(a.total_weight().size()), a.total_weight().data());
      });

  // ---- affinity ----
  m.def("self_affinity", [](const py::array_t<double, py::array::c_style | py::array::forcecast>& S) {
    int n = 0;
    auto a = square(S, &n);
    std::vector<double> r = self_affinity(a.data(), n);
    py::array_t<double> out({n, n});
    std::copy(r.begin(), r.end(), out.mutable_data());
    return out;
  }, py::arg("S"));
  m.def("subset_scores", [](const py::array_t<double, py::array::c_style | py::array::forcecast>& Sd, int n_threads) {
    int n = 0;
    auto a = square(Sd, &n);
    check_n(n);
    std::vector<double> r;
    {
      py::gil_scoped_release nogil;
      r = subset_scores(a.data(), n, n_threads);
    }
    py::array_t<double> out(py::ssize_t(r.size()));
    std::copy(r.begin(), r.end(), out.mutable_data());
    return out;
  }, py::arg("S_with_diag"), py::arg("n_threads") = 0);
  m.def("best_partition", [](const py::array_t<double, py::array::c_style | py::array::forcecast>& Sd, int k,
                             bool at_most, int n_threads) {
    int n = 0;
    auto a = square(Sd, &n);
    check_n(n);
    if (k < 1 || (!at_most && k > n)) throw py::value_error("n_splits must be in 1..n");
    PartitionResult r;
    {
      py::gil_scoped_release nogil;
      std::vector<double> f = subset_scores(a.data(), n, n_threads);
      r = best_partition(f, n, k, at_most, n_threads);
    }
    return py::make_tuple(masks_to_groups(r.groups), r.score);
  }, py::arg("S_with_diag"), py::arg("k"), py::arg("at_most") = false, py::arg("n_threads") = 0);
  m.def("tag_select", [](const py::array_t<double, py::array::c_style | py::array::forcecast>& Sd, int max_groups,
                         int n_threads) {
    int n = 0;
    auto a = square(Sd, &n);
    check_n(n);
    if (max_groups < 1) throw py::value_error("max_groups must be >= 1");
    TagResult r;
    {
      py::gil_scoped_release nogil;
      r = tag_select(a.data(), n, max_groups, n_threads);
    }
    return py::make_tuple(masks_to_groups(r.groups), py::tuple(py::cast(r.assignment)), r.score);
  }, py::arg("S_with_diag"), py::arg("max_groups"), py::arg("n_threads") = 0);
}
